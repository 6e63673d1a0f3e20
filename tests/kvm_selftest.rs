//! The rows of Linux's `userspace_msr_exit_test.c` that need no forced
//! emulation prefix, reproduced on msrwasm: the selftest's filters become
//! plugin claims, its user-space handlers become plugins.

use msrwasm::PolicySpec;
use msrwasm_tests::{guest, kvm_available, manifest, run, test_plugin};

fn echo() -> String {
    test_plugin("echo.wat").display().to_string()
}

#[test]
fn filter_allow() {
    if !kvm_available() {
        return;
    }
    let (_dir, spec) = manifest(&format!(
        "[[plugin]]\nname = \"allow\"\npath = \"{}\"\nmsrs = [\"0x1fc\", \"0x2ff\", \"0x474f4f00\"]\n",
        test_plugin("selftest_allow.wat").display()
    ));
    let run = run(&guest("selftest_allow.elf"), 1, spec).unwrap();
    run.expect_status(0);
    // 3 reads + 5 writes, all deflected by the filter; 3 of them #GP
    // (XSS <- 1, FLUSH_CMD read, FLUSH_CMD <- 0, in their stand-ins' roles).
    assert_eq!(run.trace.len(), 8);
    assert!(
        run.trace.iter().all(|r| r.reason == "filter" && r.by == "plugin"),
        "{:#?}",
        run.trace
    );
    assert_eq!(run.report.stats.total().gp, 3);
}

#[test]
fn filter_deny_trapped_and_untrapped() {
    if !kvm_available() {
        return;
    }
    // Trapped: SYSCALL_MASK and GS_BASE reads and POWER_CTL writes are
    // claimed (filtered); a catch-all instance answers what KVM does not know.
    let (_d1, trapped) = manifest(&format!(
        "unhandled = \"ignore\"\n\
         [[plugin]]\nname = \"deny\"\npath = \"{e}\"\nmsrs = [\"0xc0000084\", \"0xc0000101\", \"0x1fc\"]\n\
         [[plugin]]\nname = \"unknown\"\npath = \"{e}\"\n[plugin.config]\nmode = 1\n",
        e = echo()
    ));
    let t = run(&guest("selftest_deny.elf"), 1, trapped).unwrap();
    t.expect_status(0);
    for index in ["0xc0000084", "0xc0000101"] {
        let reads = t.traced("rdmsr", index);
        assert_eq!(reads.len(), 1, "{index}");
        assert_eq!(
            (reads[0].reason.as_str(), reads[0].plugin.as_deref()),
            ("filter", Some("deny"))
        );
    }
    let power = t.traced("wrmsr", "0x1fc");
    assert_eq!(power.len(), 1);
    assert_eq!(
        (power[0].value.as_deref(), power[0].reason.as_str()),
        (Some("0x1234"), "filter")
    );
    assert_eq!(
        power[0].by, "kvm",
        "the plugin passes, so KVM's own POWER_CTL takes the write"
    );
    let beef = t.traced("rdmsr", "0xdeadbeef");
    assert_eq!(
        (beef[0].reason.as_str(), beef[0].plugin.as_deref()),
        ("unknown", Some("unknown"))
    );
    let beef_w = t.traced("wrmsr", "0xdeadbeef");
    assert_eq!(
        (beef_w[0].reason.as_str(), beef_w[0].value.as_deref()),
        ("unknown", Some("0x1234"))
    );

    // Untrapped: no claims; KVM handles its MSRs in the kernel.
    let (_d2, untrapped) = manifest(&format!(
        "unhandled = \"ignore\"\n[[plugin]]\nname = \"unknown\"\npath = \"{}\"\n[plugin.config]\nmode = 0\n",
        echo()
    ));
    let u = run(&guest("selftest_deny.elf"), 1, untrapped).unwrap();
    u.expect_status(0);
    assert!(
        u.traced("rdmsr", "0xc0000084").is_empty(),
        "no exit for an unclaimed MSR KVM knows"
    );
    assert_eq!(u.traced("rdmsr", "0xdeadbeef")[0].reason, "unknown");
}

#[test]
fn permission_bitmap_fs_then_gs_then_none() {
    if !kvm_available() {
        return;
    }
    for (mode, claims) in [(1, "[\"0xc0000100\"]"), (2, "[\"0xc0000101\"]"), (3, "[]")] {
        let (_dir, spec) = manifest(&format!(
            "[[plugin]]\nname = \"bitmap\"\npath = \"{e}\"\nmsrs = {claims}\n\
             [[plugin]]\nname = \"mode\"\npath = \"{e}\"\n[plugin.config]\nmode = {mode}\n",
            e = echo()
        ));
        let r = run(&guest("selftest_bitmap.elf"), 1, spec).unwrap();
        r.expect_status(0);
        let deflected: Vec<_> = r
            .trace
            .iter()
            .filter(|t| t.reason == "filter")
            .map(|t| t.index.as_str())
            .collect();
        let expected: &[&str] = match mode {
            1 => &["0xc0000100"],
            2 => &["0xc0000101"],
            _ => &[],
        };
        assert_eq!(deflected, expected, "mode {mode}");
    }
}

#[test]
fn quick_form_without_manifest() {
    if !kvm_available() {
        return;
    }
    // `--plugin values.wat` with the default unhandled = gp.
    let spec = PolicySpec::from_paths(&[test_plugin("values.wat")], Default::default());
    run(&guest("gp_idt.elf"), 1, spec).unwrap().expect_status(0);
}
