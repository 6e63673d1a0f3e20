//! guest-conventions.md on real KVM: image formats, ports, how a VM ends,
//! #GP delivery, and multi-vCPU behaviour.

use msrwasm::PolicySpec;
use msrwasm::Unhandled;
use msrwasm_cli::runner::VmEnd;
use msrwasm_tests::{guest, kvm_available, run, test_plugin};

fn with(plugins: &[&str], unhandled: Unhandled) -> PolicySpec {
    let paths: Vec<_> = plugins.iter().map(|p| test_plugin(p)).collect();
    PolicySpec::from_paths(&paths, unhandled)
}

#[test]
fn fault_is_gp_through_the_guest_idt_and_values_reach_edx_eax() {
    if !kvm_available() {
        return;
    }
    let r = run(&guest("gp_idt.elf"), 1, with(&["values.wat"], Unhandled::Gp)).unwrap();
    r.expect_status(0);
    assert_eq!(r.report.stats.total().gp, 2);
    assert_eq!(r.report.stats.plugins["values"].fault, 2);
}

#[test]
fn each_vcpu_sees_its_index_and_state_add_sums_exactly() {
    if !kvm_available() {
        return;
    }
    let vcpus = 4;
    let r = run(&guest("multi_vcpu.elf"), vcpus, with(&["counter.wat"], Unhandled::Gp)).unwrap();
    r.expect_status(0);
    let per_vcpu: Vec<u64> = r.report.stats.vcpus.values().map(|s| s.wrmsr).collect();
    assert_eq!(per_vcpu, vec![300; vcpus as usize]);
    for v in 0..vcpus {
        let seen: Vec<_> = r
            .trace
            .iter()
            .filter(|t| t.vcpu == v && t.index == "0x4d530010")
            .collect();
        assert_eq!(seen[0].value.as_deref(), Some(format!("{v:#x}").as_str()));
    }
}

#[test]
fn flat_binaries_start_in_real_mode_at_0x1000() {
    if !kvm_available() {
        return;
    }
    let r = run(&guest("realmode.bin"), 1, with(&["values.wat"], Unhandled::Gp)).unwrap();
    r.expect_status(42);
    assert_eq!(r.serial, "real\n");
}

#[test]
fn all_vcpus_halting_ends_with_status_0() {
    if !kvm_available() {
        return;
    }
    let r = run(&guest("msr_loop.elf"), 2, with(&["echo.wat"], Unhandled::Gp)).unwrap();
    r.expect_status(0);
    assert_eq!(r.report.end, VmEnd::AllHalted);
    assert_eq!(r.report.stats.total().rdmsr, 100_000);
}

#[test]
fn a_triple_fault_is_reported_with_registers() {
    if !kvm_available() {
        return;
    }
    let r = run(&guest("triple_fault.elf"), 1, PolicySpec::default()).unwrap();
    let VmEnd::Crash(report) = &r.report.end else {
        panic!("expected a crash, got {:?}", r.report.end)
    };
    assert!(report.what.contains("triple fault"), "{report}");
    assert_eq!(report.rip, 0x20_0000, "RIP of the ud2 at the entry point");
    assert_ne!(report.cr0 & 1, 0);
    assert_ne!(r.report.exit_status(), 0);
}

#[test]
fn unanswered_accesses_follow_the_unhandled_policy() {
    if !kvm_available() {
        return;
    }
    // msr_loop reads an MSR nobody answers: gp would fault in a guest with
    // no IDT (triple fault); ignore and log let it finish.
    for policy in [Unhandled::Ignore, Unhandled::Log] {
        let r = run(&guest("msr_loop.elf"), 1, PolicySpec::from_paths(&[], policy)).unwrap();
        r.expect_status(0);
        assert_eq!(r.report.stats.total().unhandled(), 50_000);
    }
    let r = run(&guest("msr_loop.elf"), 1, PolicySpec::default()).unwrap();
    assert!(matches!(&r.report.end, VmEnd::Crash(c) if c.what.contains("triple fault")));
}
