use std::collections::HashMap;

use super::*;
use crate::plugin::PluginSettings;
use crate::plugin::abi::{REASON_FILTER, REASON_UNKNOWN};

/// KVM as far as the fallback sees it: the MSRs it knows, and which writes
/// it accepts.
#[derive(Default)]
struct FakeKvm {
    msrs: HashMap<u32, u64>,
    read_only: Vec<u32>,
}

impl KvmMsrs for FakeKvm {
    fn get(&mut self, index: u32) -> Option<u64> {
        self.msrs.get(&index).copied()
    }
    fn set(&mut self, index: u32, value: u64) -> bool {
        if self.read_only.contains(&index) || !self.msrs.contains_key(&index) {
            return false;
        }
        self.msrs.insert(index, value);
        true
    }
}

fn plugin(
    name: &str,
    rdmsr_body: &str,
    msrs: Option<Vec<(u32, u32)>>,
    on_error: OnError,
    state: &StateStore,
) -> Arc<Plugin> {
    let wat = format!(
        r#"(module (import "msr" "reply" (func $reply (param i64)))
            (func (export "msrwasm_abi_version") (result i32) i32.const 1)
            (func (export "rdmsr") (param $i i32) (result i32) {rdmsr_body})
            (func (export "wrmsr") (param $i i32) (param $v i64) (result i32) i32.const 2))"#
    );
    let mut settings = PluginSettings::new(name, format!("{name}.wat"));
    settings.msrs = msrs;
    settings.on_error = on_error;
    Arc::new(Plugin::from_bytes(settings, wat.as_bytes(), state).unwrap())
}

fn read(index: u32, reason: u32) -> Access {
    Access {
        index,
        reason,
        write: None,
    }
}

const PASS: &str = "i32.const 2";
const ANSWER_7: &str = "(call $reply (i64.const 7)) i32.const 0";

#[test]
fn first_non_pass_answer_in_file_order_wins() {
    let s = StateStore::default();
    let a = plugin("a", PASS, Some(vec![(0x10, 0x20)]), OnError::Fault, &s);
    let b = plugin("b", ANSWER_7, Some(vec![(0x15, 0x15)]), OnError::Fault, &s);
    let c = plugin(
        "c",
        "(call $reply (i64.const 9)) i32.const 0",
        Some(vec![(0x15, 0x15)]),
        OnError::Fault,
        &s,
    );
    let policy = Arc::new(Policy::from_plugins(vec![a, b, c], Unhandled::Gp).unwrap());
    let mut chain = VcpuChain::new(policy, 0);
    let mut kvm = FakeKvm::default();
    let d = chain.answer(read(0x15, REASON_FILTER), &mut kvm);
    assert_eq!(
        d,
        Decision {
            result: Some(7),
            by: Responder::Plugin {
                position: 1,
                error: false
            }
        }
    );
    assert_eq!(chain.counters()[0].pass, 1);
    assert_eq!(chain.counters()[2], PluginCounters::default(), "c is never asked");
    // Everybody passes on 0x10, KVM does not know it: unhandled = gp.
    let d = chain.answer(read(0x10, REASON_FILTER), &mut kvm);
    assert_eq!(
        d,
        Decision {
            result: None,
            by: Responder::Unhandled(Unhandled::Gp)
        }
    );
}

#[test]
fn filtered_msrs_fall_back_to_kvm_when_all_pass() {
    let s = StateStore::default();
    let a = plugin("a", PASS, Some(vec![(0xc000_0100, 0xc000_0101)]), OnError::Fault, &s);
    let policy = Arc::new(Policy::from_plugins(vec![a], Unhandled::Gp).unwrap());
    let mut chain = VcpuChain::new(policy, 0);
    let mut kvm = FakeKvm {
        msrs: HashMap::from([(0xc000_0100, 0x1234), (0xc000_0101, 5)]),
        read_only: vec![0xc000_0101],
    };
    assert_eq!(
        chain.answer(read(0xc000_0100, REASON_FILTER), &mut kvm).result,
        Some(0x1234)
    );
    let write = Access {
        index: 0xc000_0100,
        reason: REASON_FILTER,
        write: Some(0x99),
    };
    assert_eq!(
        chain.answer(write, &mut kvm),
        Decision {
            result: Some(0),
            by: Responder::Kvm
        }
    );
    assert_eq!(kvm.msrs[&0xc000_0100], 0x99);
    // KVM knows the MSR but refuses the write: #GP, as KVM would.
    let refused = Access {
        index: 0xc000_0101,
        reason: REASON_FILTER,
        write: Some(1),
    };
    assert_eq!(
        chain.answer(refused, &mut kvm),
        Decision {
            result: None,
            by: Responder::Kvm
        }
    );
    // Not a filter exit: no fallback even if KVM knows it.
    assert_eq!(
        chain.answer(read(0xc000_0100, REASON_UNKNOWN), &mut kvm).by,
        Responder::Unhandled(Unhandled::Gp)
    );
}

#[test]
fn unhandled_policies() {
    for (policy, result) in [
        (Unhandled::Gp, None),
        (Unhandled::Ignore, Some(0)),
        (Unhandled::Log, Some(0)),
    ] {
        let mut chain = VcpuChain::new(Arc::new(Policy::from_plugins(vec![], policy).unwrap()), 0);
        let mut kvm = FakeKvm::default();
        assert_eq!(
            chain.answer(read(0x4b56_4d00, REASON_UNKNOWN), &mut kvm),
            Decision {
                result,
                by: Responder::Unhandled(policy)
            }
        );
        let w = Access {
            index: 0x4b56_4d00,
            reason: REASON_UNKNOWN,
            write: Some(3),
        };
        assert_eq!(chain.answer(w, &mut kvm).result, result);
    }
}

#[test]
fn on_error_decides_and_a_fresh_instance_follows() {
    let s = StateStore::default();
    // Traps on its first call only (a global flips), so the fresh instance made
    // after the failure must answer 7 again from a clean state.
    let body = "(if (i32.eqz (global.get $g)) (then (global.set $g (i32.const 1)) (unreachable))) (call $reply (i64.const 7)) i32.const 0";
    let wat = format!(
        r#"(module (import "msr" "reply" (func $reply (param i64))) (global $g (mut i32) (i32.const 0))
            (func (export "msrwasm_abi_version") (result i32) i32.const 1)
            (func (export "rdmsr") (param $i i32) (result i32) {body}))"#
    );
    for (on_error, first) in [(OnError::Fault, None), (OnError::Pass, Some(0))] {
        let mut settings = PluginSettings::new("flaky", "flaky.wat");
        settings.on_error = on_error;
        let p = Arc::new(Plugin::from_bytes(settings, wat.as_bytes(), &s).unwrap());
        let mut chain = VcpuChain::new(Arc::new(Policy::from_plugins(vec![p], Unhandled::Ignore).unwrap()), 0);
        let mut kvm = FakeKvm::default();
        assert_eq!(
            chain.answer(read(1, REASON_UNKNOWN), &mut kvm).result,
            first,
            "{on_error:?}"
        );
        assert_eq!(chain.counters()[0].errors, 1);
        // the broken instance was dropped: the next one traps again on its first call
        assert_eq!(chain.answer(read(1, REASON_UNKNOWN), &mut kvm).result, first);
        assert_eq!(chain.counters()[0].errors, 2);
    }
}

#[test]
fn x2apic_claims_are_refused_when_composing() {
    let s = StateStore::default();
    let a = plugin("apic", PASS, Some(vec![(0x800, 0x80f)]), OnError::Fault, &s);
    let e = Policy::from_plugins(vec![a], Unhandled::Gp).unwrap_err();
    assert!(e.to_string().contains("plugin `apic` claims 0x800-0x80f"), "{e}");
}

#[test]
fn a_replaced_policy_gets_a_new_generation() {
    let cell = PolicyCell::new(Arc::new(Policy::from_plugins(vec![], Unhandled::Gp).unwrap()));
    let g = cell.generation();
    let g2 = cell.replace(Arc::new(Policy::from_plugins(vec![], Unhandled::Ignore).unwrap()));
    assert_ne!(g, g2);
    assert_eq!(cell.generation(), g2);
    assert_eq!(cell.current().1.unhandled(), Unhandled::Ignore);
}
