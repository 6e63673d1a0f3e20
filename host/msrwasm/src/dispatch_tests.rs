use std::collections::HashMap;

use super::*;
use crate::plugin::state::StateStore;
use crate::plugin::{Plugin, PluginSettings};
use crate::policy::{NoKvm, Policy, Unhandled};

fn rd(h: &mut ExitHandler, index: u32, reason: u32) -> Action {
    h.handle(Exit::Rdmsr { index, reason }, &mut NoKvm)
}

fn wr(h: &mut ExitHandler, index: u32, value: u64, reason: u32) -> Action {
    h.handle(Exit::Wrmsr { index, value, reason }, &mut NoKvm)
}

fn echo_policy(unhandled: Unhandled) -> Arc<Policy> {
    let wat = r#"(module (import "msr" "reply" (func $reply (param i64)))
        (func (export "msrwasm_abi_version") (result i32) i32.const 1)
        (func (export "claim") (param i32) (result i64) (if (result i64) (i32.eqz (local.get 0)) (then (i64.const 0x0000001000000010)) (else (i64.const -1))))
        (func (export "rdmsr") (param i32) (result i32) (call $reply (i64.const 0x1234)) i32.const 0)
        (func (export "wrmsr") (param i32 i64) (result i32) i32.const 1))"#;
    let plugin = Plugin::from_bytes(
        PluginSettings::new("echo", "echo.wat"),
        wat.as_bytes(),
        &StateStore::default(),
    )
    .unwrap();
    Arc::new(Policy::from_plugins(vec![Arc::new(plugin)], unhandled).unwrap())
}

fn handler(trace: Option<TraceSender>) -> (ExitHandler, Arc<PolicyCell>) {
    let cell = Arc::new(PolicyCell::new(echo_policy(Unhandled::Gp)));
    let io = Arc::new(IoBus::new(Box::new(std::io::sink())));
    (ExitHandler::new(0, cell.clone(), io, trace, Instant::now()), cell)
}

#[test]
fn msr_exits_complete_with_the_chain_answer() {
    let (mut h, _) = handler(None);
    assert_eq!(rd(&mut h, 0x10, REASON_FILTER), Action::CompleteMsr(Some(0x1234)));
    assert_eq!(wr(&mut h, 0x10, 1, REASON_FILTER), Action::CompleteMsr(None));
    assert_eq!(rd(&mut h, 0x11, REASON_UNKNOWN), Action::CompleteMsr(None));
    assert_eq!(
        (h.stats.rdmsr, h.stats.wrmsr, h.stats.gp, h.stats.unhandled),
        (2, 1, 2, 1)
    );
}

#[test]
fn ports_hlt_and_crashes() {
    let (mut h, _) = handler(None);
    assert_eq!(
        h.handle(
            Exit::IoOut {
                port: 0xf4,
                data: vec![42]
            },
            &mut NoKvm
        ),
        Action::Exit(42)
    );
    assert_eq!(
        h.handle(
            Exit::IoOut {
                port: 0x80,
                data: vec![1]
            },
            &mut NoKvm
        ),
        Action::Resume
    );
    let mut buf = [0u8; 4];
    h.io_in(0x71, &mut buf);
    assert_eq!(buf, [0xff; 4]);
    assert_eq!(h.stats.unknown_ports, 2);
    assert_eq!(h.handle(Exit::Hlt, &mut NoKvm), Action::Halt);
    assert!(matches!(h.handle(Exit::Shutdown, &mut NoKvm), Action::Crash(w) if w.contains("triple fault")));
    assert!(matches!(
        h.handle(Exit::FailEntry { reason: 0x21, cpu: 1 }, &mut NoKvm),
        Action::Crash(_)
    ));
}

#[test]
fn unexpected_exits_are_counted_errors_not_panics() {
    let (mut h, _) = handler(None);
    let action = h.handle(
        Exit::Unexpected {
            what: "Debug(..)".into(),
        },
        &mut NoKvm,
    );
    assert!(matches!(action, Action::Crash(w) if w.contains("Debug")));
    assert_eq!(h.stats.unexpected, 1);
}

#[test]
fn a_new_generation_is_picked_up_at_the_next_msr_exit() {
    let (mut h, cell) = handler(None);
    assert_eq!(rd(&mut h, 0x99, REASON_UNKNOWN), Action::CompleteMsr(None));
    cell.replace(echo_policy(Unhandled::Ignore));
    assert_eq!(rd(&mut h, 0x99, REASON_UNKNOWN), Action::CompleteMsr(Some(0)));
    assert_eq!(rd(&mut h, 0x10, REASON_FILTER), Action::CompleteMsr(Some(0x1234)));
    let counters: HashMap<_, _> = h.plugin_counters().into_iter().fold(HashMap::new(), |mut m, (n, c)| {
        *m.entry(n).or_insert(0) += c.handled;
        m
    });
    assert_eq!(counters["echo"], 1);
}

#[test]
fn trace_records_say_who_answered() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut h, _) = handler(Some(tx));
    rd(&mut h, 0x10, REASON_FILTER);
    wr(&mut h, 0x22, 5, REASON_UNKNOWN);
    let r1 = rx.try_recv().unwrap();
    assert_eq!(
        (r1.op.as_str(), r1.index.as_str(), r1.value.as_deref()),
        ("rdmsr", "0x10", Some("0x1234"))
    );
    assert_eq!(
        (
            r1.by.as_str(),
            r1.plugin.as_deref(),
            r1.status.as_str(),
            r1.outcome.as_str()
        ),
        ("plugin", Some("echo"), "handled", "ok")
    );
    assert_eq!(r1.reason, "filter");
    assert_eq!(r1.version.as_ref().map(String::len), Some(16));
    let r2 = rx.try_recv().unwrap();
    assert_eq!(
        (
            r2.by.as_str(),
            r2.status.as_str(),
            r2.outcome.as_str(),
            r2.value.as_deref()
        ),
        ("unhandled", "gp", "gp", Some("0x5"))
    );
}
