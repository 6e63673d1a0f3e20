//! Fleet CPU templates (`[[template]]`, `msrwasm policy import-template`)
//! on real KVM: the guest reads the host's value with the template's bits
//! forced, whether KVM or a plugin gives the value; bits the host's KVM
//! cannot offer, and MSRs nobody can model, are refused naming the MSR and
//! the bits; a revised template reaches a running VM by hot reload.

use msrwasm::{MsrTemplate, PolicySpec};
use msrwasm_tests::{guest, kvm_available, manifest, repo, run};

/// The value the guest printed.
fn printed(serial: &str) -> u64 {
    let hex = serial
        .lines()
        .find_map(|l| l.strip_prefix("arch_capabilities 0x"))
        .unwrap_or_else(|| panic!("{serial}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// What KVM offers guests in IA32_ARCH_CAPABILITIES on this host.
fn supported() -> u64 {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: 0x10a,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(kvm.get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

fn template_manifest(bitmap: &str, extra: &str) -> (tempfile::TempDir, PolicySpec) {
    manifest(&format!(
        "unhandled = \"gp\"\n{extra}\n[[template]]\nmsr = \"0x10a\"\nbitmap = \"{bitmap}\"\n"
    ))
}

#[test]
fn the_guest_reads_the_hosts_value_with_the_templates_bits() {
    if !kvm_available() {
        return;
    }
    // The host's value: what KVM gives this vCPU (KVM_GET_MSRS), which an
    // all-`x` template passes through unchanged. (The test VMM's CPUID does
    // not advertise ARCH_CAPABILITIES, so without a template KVM faults
    // the guest's read, and holds 0 or its feature value for the vCPU.)
    let (_d, spec) = template_manifest("0bx", "");
    let r = run(&guest("template_reader.elf"), 1, spec).unwrap();
    r.expect_status(0);
    let host = printed(&r.serial);
    assert!(host == 0 || host == supported(), "{host:#x}");
    // Force bit 0 (RDCL_NO) to 0 and bit 5 (MDS_NO) to what KVM offers.
    let mds = supported() >> 5 & 1;
    let bitmap = format!("0b{}{mds}xxxx0", "x".repeat(58));
    let template = MsrTemplate::parse(0x10a, &bitmap).unwrap();
    let (_d, spec) = template_manifest(&bitmap, "");
    let started = std::time::Instant::now();
    let r = run(&guest("template_reader.elf"), 1, spec).unwrap();
    let took = started.elapsed();
    r.expect_status(0); // no #GP
    assert_eq!(
        printed(&r.serial),
        template.apply(host),
        "host {host:#x}, bitmap {bitmap}"
    );
    assert_eq!(r.trace.len(), 20_001, "every read exits");
    assert!(r.trace.iter().all(|t| t.by == "template"), "{:?}", &r.trace[..1]);
    let (_d, bare) = manifest("unhandled = \"gp\"\n");
    let without = run(&guest("template_reader.elf"), 1, bare).unwrap();
    // Without it, KVM decides: in the kernel (CPUID advertises the MSR) or
    // #GP on every read (it does not, as with this test VMM's CPUID).
    assert!(without.trace.iter().all(|t| t.by != "template"));
    assert!(
        [0, 255].contains(&without.report.exit_status()),
        "{}",
        without.report.exit_status()
    );
    eprintln!(
        "template on 0x10a: host {host:#x} -> guest {:#x}; 20001 reads took {took:?} with the template ({:.0} exits/s); without it the guest took {} #GP",
        template.apply(host),
        20_001.0 / took.as_secs_f64(),
        without.report.exit_status()
    );
}

#[test]
fn a_plugins_answer_gets_the_templates_bits_too() {
    if !kvm_available() {
        return;
    }
    let echo = msrwasm_tests::test_plugin("echo.wat");
    // echo.wat answers a read with the MSR index (0x10a); the template
    // forces bit 1 (set in 0x10a) to 0 and the lowest bit KVM offers to 1.
    let offered = supported().trailing_zeros() as usize;
    assert!(offered < 64 && offered != 1, "{:#x}", supported());
    let mut bits = vec!['x'; 64];
    bits[63 - 1] = '0';
    bits[63 - offered] = '1';
    let (_d, spec) = template_manifest(
        &format!("0b{}", bits.iter().collect::<String>()),
        &format!(
            "[[plugin]]\nname = \"echo\"\npath = \"{}\"\nmsrs = [\"0x10a\"]\n",
            echo.display()
        ),
    );
    let r = run(&guest("template_reader.elf"), 1, spec).unwrap();
    r.expect_status(0);
    assert_eq!(printed(&r.serial), (0x10a & !0b10) | 1 << offered, "{}", r.serial);
}

#[test]
fn bits_the_host_cannot_provide_are_refused_naming_msr_and_bits() {
    if !kvm_available() {
        return;
    }
    let missing = (0..64)
        .find(|b| supported() >> b & 1 == 0)
        .expect("a bit KVM does not offer");
    let mut bits = vec!['x'; 64];
    bits[63 - missing] = '1';
    let bitmap = format!("0b{}", bits.iter().collect::<String>());
    let (_d, spec) = template_manifest(&bitmap, "");
    let e = match run(&guest("template_reader.elf"), 1, spec) {
        Ok(_) => panic!("a template asking for bit {missing} was accepted"),
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
    };
    assert!(
        e.contains("template for MSR 0x10a") && e.contains(&format!("bit {missing}")) && e.contains("cannot provide"),
        "{e}"
    );
    // An MSR KVM does not know, which no plugin answers, cannot be modelled.
    let (_d, spec) = manifest("[[template]]\nmsr = \"0x4d530099\"\nbitmap = \"0b1\"\n");
    let e = format!(
        "{:#}",
        anyhow::Error::from(run(&guest("template_reader.elf"), 1, spec).err().unwrap())
    );
    assert!(
        e.contains("template for MSR 0x4d530099") && e.contains("cannot be modelled"),
        "{e}"
    );
}

#[test]
fn manifest_and_import_refusals_name_the_msr() {
    for (text, needle) in [
        ("[[template]]\nmsr = \"0x830\"\nbitmap = \"0b1\"\n", "x2APIC"),
        (
            "[[template]]\nmsr = \"0x10a\"\nbitmap = \"0b12\"\n",
            "MSR 0x10a: bitmap character '2'",
        ),
        ("[[template]]\nmsr = \"0x10a\"\nbitmap = \"1\"\n", "must start with 0b"),
        (
            "[[template]]\nmsr = \"0x10a\"\nbitmap = \"0b1\"\n[[template]]\nmsr = \"0x10a\"\nbitmap = \"0b0\"\n",
            "two templates",
        ),
        (
            &format!("[[template]]\nmsr = \"0x10a\"\nbitmap = \"0b{}\"\n", "1".repeat(65)),
            "65 bits",
        ),
    ] {
        let e = PolicySpec::parse("vm.toml".as_ref(), text).unwrap_err().to_string();
        assert!(e.contains("vm.toml:") && e.contains(needle), "{text}\n=> {e}");
    }
    // IA32_TSC: KVM's guest handling cannot be reproduced.
    let (_d, spec) = manifest("[[template]]\nmsr = \"0x10\"\nbitmap = \"0b1\"\n");
    let e = msrwasm::Engine::builder()
        .filter(msrwasm::filter::RecordingFilter::default())
        .build(spec)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("cannot be modelled"), "{e:#}");
    // The published-style templates of this repository import: as
    // manifest entries, and as a plugin that carries them.
    let mut imported = Vec::new();
    for t in ["t2s", "t2cl", "t2a"] {
        let (templates, ignored) =
            msrwasm_cli::profile::import_firecracker(&repo().join(format!("plugins/templates/{t}-style.json")))
                .unwrap();
        let text = msrwasm_cli::profile::templates_manifest(&templates, t);
        assert_eq!(
            PolicySpec::parse("t.toml".as_ref(), &text).unwrap().templates,
            templates
        );
        let wat = msrwasm_cli::profile::templates_plugin(&templates, t, t);
        let meta = msrwasm::tools::meta::read(wat.as_bytes()).unwrap().unwrap();
        assert_eq!(
            meta.keys().filter(|k| k.starts_with("template.")).count(),
            templates.len()
        );
        imported.push((t, templates.len(), ignored.len()));
    }
    assert_eq!(imported, [("t2s", 1, 1), ("t2cl", 1, 0), ("t2a", 0, 1)]);
}
