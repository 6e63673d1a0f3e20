//! One plugin, five languages: the reference RAPL plugin in WAT
//! (`plugins/rapl.wat`), Rust, C, Zig and AssemblyScript (`examples/rapl/`),
//! each built from source with its real toolchain, must answer identically:
//! through `msrwasm test` with a scripted clock, and on a live guest.

use std::path::PathBuf;

use msrwasm::policy::PolicySpec;
use msrwasm_tests::{
    build_as_plugin, build_c_plugin, build_rust_plugin, build_zig_plugin, guest, kvm_available, manifest, repo, run,
};

fn every_language() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("wat", repo().join("plugins/rapl.wat")),
        ("rust", build_rust_plugin("examples/rapl/rust", "rapl")),
        ("c", build_c_plugin("examples/rapl/c/rapl.c")),
        ("zig", build_zig_plugin("examples/rapl/zig/rapl.zig")),
        (
            "assemblyscript",
            build_as_plugin("examples/rapl/assemblyscript/rapl.ts"),
        ),
    ]
}

#[test]
fn every_language_passes_the_same_script() {
    let case = repo().join("tests/conformance/rapl.case");
    for (lang, wasm) in every_language() {
        let report =
            msrwasm::script::run(msrwasm_tests::settings(&wasm), &case).unwrap_or_else(|e| panic!("{lang}: {e}"));
        assert!(report.failures.is_empty(), "{lang}: {:#?}", report.failures);
        assert_eq!(report.passed, 15, "{lang}");
        let check = msrwasm::check::check(msrwasm_tests::settings(&wasm));
        assert!(check.ok, "{lang}: {check:?}");
        assert_eq!(
            check.claims.as_deref(),
            Some(&["0x606".to_string(), "0x610-0x614".to_string()][..]),
            "{lang}"
        );
    }
}

#[test]
fn every_language_answers_a_live_guest_identically() {
    let plugins = every_language();
    if !kvm_available() {
        return;
    }
    let mut outputs = Vec::new();
    for (lang, wasm) in &plugins {
        let (_dir, spec): (_, PolicySpec) = manifest(&format!(
            "unhandled = \"ignore\"\n[[plugin]]\nname = \"rapl\"\npath = \"{}\"\n[plugin.config]\ntdp_watts = 95\n",
            wasm.display()
        ));
        let r = run(&guest("rapl_reader.elf"), 1, spec).unwrap_or_else(|e| panic!("{lang}: {e}"));
        r.expect_status(0);
        outputs.push((lang, r.serial));
    }
    let expected = "rdmsr 0x606 = 0x00000000000a0e03\nrdmsr 0x610 = 0x00000000000082f8\nrdmsr 0x613 = 0x0000000000000000\n\
                    rdmsr 0x614 = 0x00000000000002f8\nrdmsr 0x612 = 0x0000000000000000\nwrmsr 0x610 #GP = 0x0000000000000001\n\
                    energy advances\n";
    for (lang, serial) in &outputs {
        assert_eq!(serial, expected, "{lang}");
    }
}

#[test]
fn metadata_from_the_sdks_or_added_afterwards() {
    // Zig and AssemblyScript builds get theirs with `msrwasm meta --set`
    // (msrwasm::plugin::meta::write); the plugin must still pass the script.
    for (lang, wasm) in [
        ("zig", build_zig_plugin("examples/rapl/zig/rapl.zig")),
        (
            "assemblyscript",
            build_as_plugin("examples/rapl/assemblyscript/rapl.ts"),
        ),
    ] {
        let fields =
            msrwasm::plugin::meta::Meta::from([("name".into(), "rapl".into()), ("version".into(), "1.0.0".into())]);
        let tagged = wasm.with_extension("meta.wasm");
        std::fs::write(
            &tagged,
            msrwasm::plugin::meta::write(&std::fs::read(&wasm).unwrap(), &fields).unwrap(),
        )
        .unwrap();
        let report = msrwasm::script::run(
            msrwasm_tests::settings(&tagged),
            &repo().join("tests/conformance/rapl.case"),
        )
        .unwrap();
        assert!(report.failures.is_empty(), "{lang}: {:?}", report.failures);
        assert_eq!(
            msrwasm::check::check(msrwasm_tests::settings(&tagged)).meta,
            Some(fields),
            "{lang}"
        );
    }

    for (lang, wasm) in [
        ("rust", build_rust_plugin("examples/rapl/rust", "rapl")),
        ("c", build_c_plugin("examples/rapl/c/rapl.c")),
        ("wat", repo().join("plugins/rapl.wat")),
    ] {
        let meta = msrwasm::check::check(msrwasm_tests::settings(&wasm))
            .meta
            .unwrap_or_else(|| panic!("{lang}: no metadata"));
        assert_eq!(
            (meta["name"].as_str(), meta["version"].as_str()),
            ("rapl", "1.0.0"),
            "{lang}"
        );
    }
}
