//! The dispatcher on synthetic exits: no KVM, every decision path.

use std::collections::HashMap;

use super::*;
use crate::engine::Engine;
use crate::plugin::{OnError, PluginSettings};
use crate::policy::filter::RecordingFilter;
use crate::policy::{FilterDefault, PolicySpec};

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

const PASS: &str = "i32.const 2";
const ANSWER_7: &str = "(call $reply (i64.const 7)) i32.const 0";

fn wat(rdmsr_body: &str) -> String {
    format!(
        r#"(module (import "msr" "reply" (func $reply (param i64))) (global $g (mut i32) (i32.const 0))
            (func (export "msrwasm_abi_version") (result i32) i32.const 1)
            (func (export "rdmsr") (param $i i32) (result i32) {rdmsr_body})
            (func (export "wrmsr") (param $i i32) (param $v i64) (result i32) i32.const 2))"#
    )
}

/// Plugins in a temporary directory, composed into an engine.
struct Setup {
    dir: tempfile::TempDir,
    spec: PolicySpec,
}

impl Setup {
    fn new(unhandled: Unhandled) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            spec: PolicySpec {
                unhandled,
                ..PolicySpec::default()
            },
        }
    }

    fn plugin(mut self, name: &str, body: &str, msrs: Option<Vec<(u32, u32)>>, on_error: OnError) -> Self {
        let path = self.dir.path().join(format!("{name}.wat"));
        std::fs::write(&path, wat(body)).unwrap();
        let mut settings = PluginSettings::new(name, path);
        settings.msrs = msrs;
        settings.on_error = on_error;
        self.spec.plugins.push(settings);
        self
    }

    fn engine(&self) -> Engine {
        Engine::builder()
            .filter(RecordingFilter::default())
            .build(self.spec.clone())
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn read(index: u32, reason: ExitReason) -> Access {
    Access::read(index, reason)
}

fn by_name(outcome: &Outcome<'_>) -> String {
    match outcome.by {
        AnsweredBy::Plugin { plugin, error, .. } => format!("{}{}", plugin.name, if error { "!" } else { "" }),
        AnsweredBy::Kvm => "kvm".into(),
        AnsweredBy::Template => "template".into(),
        AnsweredBy::Unhandled(u) => format!("unhandled:{u}"),
        AnsweredBy::Firewall(u) => format!("firewall:{u}"),
    }
}

#[test]
fn first_non_pass_answer_in_chain_order_wins() {
    let s = Setup::new(Unhandled::Gp)
        .plugin("a", PASS, Some(vec![(0x4d53_0010, 0x4d53_0020)]), OnError::Fault)
        .plugin("b", ANSWER_7, Some(vec![(0x4d53_0015, 0x4d53_0015)]), OnError::Fault)
        .plugin(
            "c",
            "(call $reply (i64.const 9)) i32.const 0",
            Some(vec![(0x4d53_0015, 0x4d53_0015)]),
            OnError::Fault,
        );
    let engine = s.engine();
    let mut d = engine.dispatcher(0);
    let o = d.handle(read(0x4d53_0015, ExitReason::Filter), &mut NoKvm);
    assert_eq!((o.reply, by_name(&o), o.generation), (Reply::Read(7), "b".into(), 1));
    // Everybody passes on 0x4d530010, KVM does not know it: unhandled = gp.
    let o = d.handle(read(0x4d53_0010, ExitReason::Filter), &mut NoKvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Gp, "unhandled:gp".into()));
    let stats = engine.stats();
    assert_eq!(stats.plugins["a"].pass, 2);
    assert_eq!(stats.plugins["b"].handled, 1);
    assert_eq!(
        stats.plugins["c"].handled + stats.plugins["c"].pass,
        0,
        "c is never asked"
    );
    assert_eq!(
        (stats.total().rdmsr, stats.total().gp, stats.total().unhandled()),
        (2, 1, 1)
    );
}

#[test]
fn claimed_msrs_fall_back_to_kvm_only_where_kvm_behaves_as_for_the_guest() {
    let s = Setup::new(Unhandled::Gp).plugin(
        "a",
        PASS,
        Some(vec![
            (0xce, 0xce),
            (0x174, 0x175),
            (0xc000_0100, 0xc000_0101),
            (0x4d53_0000, 0x4d53_0000),
        ]),
        OnError::Fault,
    );
    let engine = s.engine();
    let mut d = engine.dispatcher(0);
    let mut kvm = FakeKvm {
        msrs: HashMap::from([(0xc000_0100, 0x1234), (0xc000_0101, 5), (0x174, 8), (0xce, 0xabc)]),
        read_only: vec![0xc000_0101],
    };
    let o = d.handle(read(0xc000_0100, ExitReason::Filter), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Read(0x1234), "kvm".into()));
    let o = d.handle(Access::write(0xc000_0100, 0x99, ExitReason::Filter), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Written, "kvm".into()));
    assert_eq!(kvm.msrs[&0xc000_0100], 0x99);
    // KVM knows the MSR but refuses the write: #GP, as for the guest.
    let o = d.handle(Access::write(0xc000_0101, 1, ExitReason::Filter), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Gp, "kvm".into()));
    // MSR_PLATFORM_INFO: reads are KVM's, a guest write always faults (and
    // KVM's host-initiated write, which would accept it, is not used).
    assert_eq!(
        d.handle(read(0xce, ExitReason::Filter), &mut kvm).reply,
        Reply::Read(0xabc)
    );
    let o = d.handle(Access::write(0xce, 0, ExitReason::Filter), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Gp, "kvm".into()));
    assert_eq!(kvm.msrs[&0xce], 0xabc);
    // An MSR msrwasm does not know KVM's guest behaviour for: unhandled.
    let o = d.handle(read(0x4d53_0000, ExitReason::Filter), &mut kvm);
    assert_eq!(by_name(&o), "unhandled:gp");
    // Not a filter exit: no fallback even if KVM knows it.
    let o = d.handle(read(0xc000_0100, ExitReason::Unknown), &mut kvm);
    assert_eq!(by_name(&o), "unhandled:gp");
}

#[test]
fn claims_over_msrs_kvm_checks_only_for_guests_are_refused() {
    for (msr, name) in [(0x10, "IA32_TSC"), (0x34, "MSR_SMI_COUNT"), (0xc000_0080, "IA32_EFER")] {
        let s = Setup::new(Unhandled::Gp).plugin("observer", PASS, Some(vec![(msr, msr)]), OnError::Fault);
        let result = Engine::builder()
            .filter(RecordingFilter::default())
            .build(s.spec.clone());
        match (msr, result) {
            // SMI_COUNT: a guest write always faults, which the host gives itself.
            (0x34, Ok(_)) => {}
            (_, Err(e)) => assert!(e.to_string().contains(name), "{e}"),
            (_, Ok(_)) => panic!("{name} claimed"),
        }
    }
}

#[test]
fn unhandled_policies_and_invalid_accesses() {
    for (policy, read_reply, write_reply) in [
        (Unhandled::Gp, Reply::Gp, Reply::Gp),
        (Unhandled::Ignore, Reply::Read(0), Reply::Written),
        (Unhandled::Log, Reply::Read(0), Reply::Written),
    ] {
        let engine = Setup::new(policy).engine();
        let mut d = engine.dispatcher(0);
        let o = d.handle(read(0x4b56_4dfe, ExitReason::Unknown), &mut NoKvm);
        assert_eq!((o.reply, o.by), (read_reply, AnsweredBy::Unhandled(policy)));
        let o = d.handle(Access::write(0x4b56_4dfe, 3, ExitReason::Unknown), &mut NoKvm);
        assert_eq!(o.reply, write_reply);
        // KVM found the access invalid (reason INVAL): #GP whatever the
        // policy, as kvm.ignore_msrs does.
        let o = d.handle(Access::write(0xc000_0100, 1 << 63, ExitReason::Inval), &mut NoKvm);
        assert_eq!(o.reply, Reply::Gp, "{policy}");
    }
}

#[test]
fn a_default_deny_firewall_never_falls_back_for_msrs_outside_allow() {
    let mut s = Setup::new(Unhandled::Ignore);
    s.spec.filter_default = FilterDefault::Deny;
    s.spec.allow = vec![(0x174, 0x174)];
    let engine = s.engine();
    let mut d = engine.dispatcher(0);
    let mut kvm = FakeKvm {
        msrs: HashMap::from([(0x174, 1), (0x175, 2)]),
        ..FakeKvm::default()
    };
    // 0x175 is outside allow: KVM's value is not given; unhandled decides,
    // and the outcome says the firewall refused it.
    let o = d.handle(read(0x175, ExitReason::Filter), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Read(0), "firewall:ignore".into()));
    assert_eq!(o.reason, ExitReason::Filter);
    // An MSR KVM does not know is not the firewall's doing.
    let o = d.handle(read(0x4d53_0001, ExitReason::Unknown), &mut kvm);
    assert_eq!(
        (by_name(&o), o.reason),
        ("unhandled:ignore".into(), ExitReason::Unknown)
    );
}

/// cloud-hypervisor's `Vcpu` trait is `Send + Sync`: a dispatcher must fit
/// in such a struct whatever the plugins and the VMM's sinks hold.
#[test]
fn a_dispatcher_is_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    struct NotSync(std::cell::Cell<u64>);
    impl VcpuEvents for NotSync {
        fn access(&mut self, _: &Access, _: &Outcome<'_>) {
            self.0.set(self.0.get() + 1);
        }
    }
    struct Sinks;
    impl Events for Sinks {
        fn vcpu(&self, _: u32) -> Option<Box<dyn VcpuEvents>> {
            Some(Box::new(NotSync(std::cell::Cell::new(0))))
        }
    }
    let s = Setup::new(Unhandled::Gp).plugin("p", ANSWER_7, None, OnError::Fault);
    let engine = Engine::builder()
        .filter(RecordingFilter::default())
        .events(Arc::new(Sinks))
        .build(s.spec.clone())
        .unwrap();
    let mut d = engine.dispatcher(0);
    d.warm_up().unwrap();
    send_sync(&d);
    // Used from another thread through a shared lock, as a VMM would.
    let shared = Arc::new(Mutex::new(d));
    let on_other = shared.clone();
    let reply = std::thread::spawn(move || {
        on_other
            .lock()
            .unwrap()
            .handle(read(1, ExitReason::Unknown), &mut NoKvm)
            .reply
    })
    .join()
    .unwrap();
    assert_eq!(reply, Reply::Read(7));
}

#[test]
fn on_error_decides_and_a_fresh_instance_follows() {
    // Traps on its first call only (a global flips), so the fresh instance
    // made after the failure traps again: each access is an error.
    let body = "(if (i32.eqz (global.get $g)) (then (global.set $g (i32.const 1)) (unreachable))) (call $reply (i64.const 7)) i32.const 0";
    for (on_error, first) in [(OnError::Fault, Reply::Gp), (OnError::Pass, Reply::Read(0))] {
        let engine = Setup::new(Unhandled::Ignore)
            .plugin("flaky", body, None, on_error)
            .engine();
        let mut d = engine.dispatcher(0);
        assert_eq!(
            d.handle(read(1, ExitReason::Unknown), &mut NoKvm).reply,
            first,
            "{on_error:?}"
        );
        assert_eq!(engine.stats().plugins["flaky"].errors, 1);
        assert_eq!(d.handle(read(1, ExitReason::Unknown), &mut NoKvm).reply, first);
        assert_eq!(engine.stats().plugins["flaky"].errors, 2);
    }
}

/// Issue #21: a quarantined plugin used to be skipped "as PASS" whatever
/// its `on_error`, so the guest read KVM's value of an MSR the plugin
/// modelled. Now its own failure policy answers while it is quarantined.
#[test]
fn a_quarantined_plugin_answers_with_its_on_error_never_kvms_value() {
    const PLATFORM_INFO: u32 = 0xce;
    let mut kvm = FakeKvm::default();
    kvm.msrs.insert(PLATFORM_INFO, 0x8000_0000);
    for (on_error, expected) in [
        (OnError::Fault, Reply::Gp),
        (OnError::Value(0x1234), Reply::Read(0x1234)),
        (OnError::Pass, Reply::Read(0x8000_0000)),
    ] {
        let engine = Setup::new(Unhandled::Gp)
            .plugin(
                "model",
                "unreachable",
                Some(vec![(PLATFORM_INFO, PLATFORM_INFO)]),
                on_error,
            )
            .engine();
        let mut d = engine.dispatcher(0);
        let access = read(PLATFORM_INFO, ExitReason::Filter);
        // Five errors quarantine it; every later access is skipped, not called.
        for _ in 0..8 {
            assert_eq!(d.handle(access, &mut kvm).reply, expected, "{on_error}");
        }
        let c = &engine.stats().plugins["model"];
        assert_eq!((c.errors, c.quarantines, c.skipped), (5, 1, 3), "{on_error}");
        let write = d.handle(Access::write(PLATFORM_INFO, 1, ExitReason::Filter), &mut kvm);
        match on_error {
            OnError::Value(_) => assert_eq!(write.reply, Reply::Written),
            OnError::Fault => assert_eq!(write.reply, Reply::Gp),
            OnError::Pass => {}
        }
    }
}

#[test]
fn on_error_parses_its_three_forms_and_names_what_is_wrong() {
    assert_eq!("fault".parse::<OnError>(), Ok(OnError::Fault));
    assert_eq!("pass".parse::<OnError>(), Ok(OnError::Pass));
    assert_eq!("value=0x10".parse::<OnError>(), Ok(OnError::Value(16)));
    assert_eq!("value=7".parse::<OnError>(), Ok(OnError::Value(7)));
    for bad in ["Fault", "value=", "value=0xg", "skip"] {
        let e = bad.parse::<OnError>().unwrap_err();
        assert!(e.contains("value=N") && e.contains(bad), "{e}");
    }
    assert_eq!(OnError::Value(16).to_string(), "value=0x10");
}

#[test]
fn a_dispatcher_follows_updates_by_itself() {
    let s = Setup::new(Unhandled::Gp).plugin("p", ANSWER_7, None, OnError::Fault);
    let engine = s.engine();
    let mut d = engine.dispatcher(0);
    assert_eq!(d.handle(read(1, ExitReason::Unknown), &mut NoKvm).reply, Reply::Read(7));
    let mut spec = s.spec.clone();
    spec.unhandled = Unhandled::Ignore;
    spec.plugins.clear();
    let generation = engine.update(spec).unwrap();
    let o = d.handle(read(1, ExitReason::Unknown), &mut NoKvm);
    assert_eq!((o.reply, o.generation), (Reply::Read(0), generation));
    assert_eq!(engine.stats().total().switches, 1);
}

/// A VMM that renames its plugin on every update must not grow the
/// per-vCPU counters without bound: past `stats::MAX_NAMES`, names no
/// longer in the policy are forgotten.
#[test]
fn counters_for_renamed_plugins_are_bounded() {
    let s = Setup::new(Unhandled::Gp).plugin("p", ANSWER_7, None, OnError::Fault);
    let engine = s.engine();
    let mut d = engine.dispatcher(0);
    let renames = crate::stats::MAX_NAMES + 40;
    for n in 0..renames {
        let mut spec = s.spec.clone();
        spec.plugins[0].name = format!("p{n}");
        engine.update(spec).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(d.handle(read(1, ExitReason::Unknown), &mut NoKvm).reply, Reply::Read(7));
    }
    let stats = engine.stats();
    assert!(
        stats.plugins.len() <= crate::stats::MAX_NAMES + 1,
        "{}",
        stats.plugins.len()
    );
    assert_eq!(stats.plugins[&format!("p{}", renames - 1)].handled, 1);
    assert_eq!(stats.total().rdmsr, renames as u64);
}

#[test]
fn a_change_is_validated_on_every_vcpu_before_it_goes_live() {
    // init refuses on vCPU 1 only: refused at start for a 2-vCPU VM, and
    // refused the same way by a later change.
    let picky = r#"(module (import "msr" "vcpu" (func $vcpu (result i32)))
        (func (export "msrwasm_abi_version") (result i32) i32.const 1)
        (func (export "init") (result i32) (call $vcpu))
        (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#;
    let s = Setup::new(Unhandled::Gp).plugin("p", ANSWER_7, None, OnError::Fault);
    let engine = s.engine();
    let _d0 = engine.dispatcher(0);
    let _d1 = engine.dispatcher(1);
    std::fs::write(&s.spec.plugins[0].path, picky).unwrap();
    let reloads = engine.refresh(&Default::default());
    assert!(
        matches!(&reloads[..], [crate::events::Reload::Refused { errors, .. }] if errors[0].contains("on vCPU 1")),
        "{reloads:?}"
    );
    assert_eq!(engine.generation(), 1);
}

/// CPU templates: the host's value with the bits forced, a plugin's
/// answer with the bits forced, writes to a read-only MSR taken over
/// fault, an MSR nobody can give a value for goes to `unhandled`, and a
/// revised template is in force at the next exit.
#[test]
fn templates_force_bits_over_kvm_and_plugins_and_follow_updates() {
    let template = |index: u32, bitmap: &str| crate::policy::MsrTemplate::parse(index, bitmap).unwrap();
    let mut s = Setup::new(Unhandled::Gp)
        .plugin("p", ANSWER_7, Some(vec![(0x4d53_0001, 0x4d53_0001)]), OnError::Fault)
        .plugin("q", PASS, Some(vec![(0x4d53_0002, 0x4d53_0002)]), OnError::Fault);
    s.spec.templates = vec![
        template(0x10a, "0b10x0"),
        template(0x4d53_0001, "0b1000"),
        template(0x4d53_0002, "0b1"),
    ];
    let engine = s.engine();
    let mut d = engine.dispatcher(0);
    let mut kvm = FakeKvm::default();
    kvm.msrs.insert(0x10a, 0b0111);
    let o = d.handle(read(0x10a, ExitReason::Filter), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Read(0b1010), "template".into()));
    let o = d.handle(read(0x4d53_0001, ExitReason::Filter), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Read(0b1000), "p".into()));
    let o = d.handle(Access::write(0x10a, 0, ExitReason::Filter), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Gp, "template".into()));
    // The plugin passes and KVM's value is not the guest's: `unhandled` decides.
    let o = d.handle(read(0x4d53_0002, ExitReason::Unknown), &mut kvm);
    assert_eq!((o.reply, by_name(&o)), (Reply::Gp, "unhandled:gp".into()));
    // Template MSRs are deflected through the filter.
    assert!(
        engine
            .policy()
            .filter()
            .deflect
            .iter()
            .any(|&(f, l)| f <= 0x10a && 0x10a <= l)
    );
    // A revised template (a hot reload) is in force at the next exit.
    let mut revised = s.spec.clone();
    revised.templates = vec![template(0x10a, "0b0000")];
    engine.update(revised).unwrap();
    let o = d.handle(read(0x10a, ExitReason::Filter), &mut kvm);
    assert_eq!(o.reply, Reply::Read(0));
    // A writable MSR (IA32_PAT) takes no template unless a plugin models
    // it; under a deny firewall, a template MSR must be allowed.
    for (extra, why) in [("", "guests may write it"), ("deny", "firewall")] {
        let mut spec = Setup::new(Unhandled::Gp).spec;
        spec.templates = vec![template(if extra.is_empty() { 0x277 } else { 0x10a }, "0b1")];
        if !extra.is_empty() {
            spec.filter_default = FilterDefault::Deny;
        }
        let e = Engine::builder()
            .filter(RecordingFilter::default())
            .build(spec)
            .err()
            .unwrap();
        assert!(crate::util::error_chain(&e).contains(why), "{e:?}");
    }
    // Claims on IA32_ARCH_CAPABILITIES are refused without a template.
    let mut claims = Setup::new(Unhandled::Gp).plugin("q", PASS, Some(vec![(0x10a, 0x10a)]), OnError::Fault);
    assert!(
        Engine::builder()
            .filter(RecordingFilter::default())
            .build(claims.spec.clone())
            .is_err()
    );
    claims.spec.templates = vec![template(0x10a, "0bx")];
    assert!(
        Engine::builder()
            .filter(RecordingFilter::default())
            .build(claims.spec)
            .is_ok()
    );
}
