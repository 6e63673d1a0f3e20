//! One plugin, nine languages: the synthetic RAPL demo plugin in WAT
//! (`plugins/synthetic_rapl.wat`), Rust, C, Zig and AssemblyScript (core modules), Go
//! (a core module with WASI), and Python, JavaScript and Rust (components,
//! `examples/rapl/`), each built from source with its real toolchain, must
//! answer identically: through `msrwasm test` with a scripted clock, and on
//! a live guest, with the same manifest keys (only `memory_max_kib` differs:
//! what each runtime needs).

use std::path::{Path, PathBuf};

use msrwasm::Flavour;
use msrwasm::PluginSettings;
use msrwasm::PolicySpec;
use msrwasm::tools::ModuleCache;
use msrwasm::tools::Runtime;
use msrwasm_tests::{
    build_as_plugin, build_c_plugin, build_go_plugin, build_js_plugin, build_python_plugin, build_rust_component,
    build_rust_plugin, build_zig_plugin, cache_dir, guest, kvm_available, manifest, repo, run,
};

/// Every build of the RAPL plugin, with the memory cap its runtime needs.
fn every_language() -> Vec<(&'static str, PathBuf, u64)> {
    vec![
        ("wat", repo().join("plugins/synthetic_rapl.wat"), 1024),
        ("rust", build_rust_plugin("examples/rapl/rust", "rapl"), 1024),
        ("c", build_c_plugin("examples/rapl/c/rapl.c"), 1024),
        ("zig", build_zig_plugin("examples/rapl/zig/rapl.zig"), 1024),
        (
            "assemblyscript",
            build_as_plugin("examples/rapl/assemblyscript/rapl.ts"),
            1024,
        ),
        ("go", build_go_plugin("examples/rapl/go", "rapl"), 4096),
        (
            "rust-component",
            build_rust_component("examples/rapl/rust-component", "rapl_component"),
            1024,
        ),
        ("python", build_python_plugin("examples/rapl/python", "rapl"), 16384),
        ("javascript", build_js_plugin("examples/rapl/javascript/rapl.js"), 81920),
    ]
}

/// The settings a manifest gives the plugin: the language's memory, and
/// for the runtimes with a garbage collector (Go, Python, JavaScript: a
/// memory above the default) a 150 ms budget, as the JavaScript README
/// recommends: a collection inside one call can take tens of milliseconds.
fn settings(wasm: &Path, memory_max_kib: u64) -> PluginSettings {
    let mut s = msrwasm_tests::settings(wasm);
    s.memory_max_kib = memory_max_kib;
    if memory_max_kib > PluginSettings::DEFAULT_MEMORY_MAX_KIB {
        s.timeout_us = 150_000;
    }
    s
}

#[test]
fn every_language_passes_the_same_script() {
    let case = repo().join("tests/conformance/rapl.case");
    let cache = ModuleCache::with_disk(&cache_dir(), &Runtime::shared());
    for (lang, wasm, kib) in every_language() {
        let report = msrwasm::tools::run_script_cached(settings(&wasm, kib), &case, Some(&cache_dir()))
            .unwrap_or_else(|e| panic!("{lang}: {e}"));
        assert!(report.failures.is_empty(), "{lang}: {:#?}", report.failures);
        assert_eq!(report.passed, 15, "{lang}");
        let check = msrwasm::tools::check_cached(settings(&wasm, kib), &cache);
        assert!(check.ok, "{lang}: {check:?}");
        let flavour = match lang {
            "rust-component" | "python" | "javascript" => Flavour::Component,
            _ => Flavour::Core,
        };
        assert_eq!(check.flavour, Some(flavour), "{lang}");
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
    for (lang, wasm, kib) in &plugins {
        // The budget `settings` gives: garbage-collected languages pause
        // inside a call now and then (their READMEs say so).
        let timeout_us = settings(wasm, *kib).timeout_us;
        let (_dir, spec): (_, PolicySpec) = manifest(&format!(
            "unhandled = \"ignore\"\n[[plugin]]\nname = \"rapl\"\npath = \"{}\"\nmemory_max_kib = {kib}\ntimeout_us = {timeout_us}\n[plugin.config]\ntdp_watts = 95\n",
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
    // Go, Python and JavaScript cannot write a custom section from source:
    // theirs comes from `msrwasm meta --set` (msrwasm::tools::meta::write)
    // after the build, and the plugin must still pass the script.
    let all = every_language();
    for (lang, wasm, kib) in all.iter().filter(|(l, ..)| ["go", "python", "javascript"].contains(l)) {
        let fields =
            msrwasm::tools::meta::Meta::from([("name".into(), "rapl".into()), ("version".into(), "1.0.0".into())]);
        let tagged = wasm.with_extension("meta.wasm");
        std::fs::write(
            &tagged,
            msrwasm::tools::meta::write(&std::fs::read(wasm).unwrap(), &fields).unwrap(),
        )
        .unwrap();
        let report = msrwasm::tools::run_script_cached(
            settings(&tagged, *kib),
            &repo().join("tests/conformance/rapl.case"),
            Some(&cache_dir()),
        )
        .unwrap();
        assert!(report.failures.is_empty(), "{lang}: {:?}", report.failures);
        let cache = ModuleCache::with_disk(&cache_dir(), &Runtime::shared());
        assert_eq!(
            msrwasm::tools::check_cached(settings(&tagged, *kib), &cache).meta,
            Some(fields),
            "{lang}"
        );
    }
    // The others embed it from source (SDK macros, WAT's @custom).
    for (lang, wasm, kib) in all.iter().filter(|(l, ..)| !["go", "python", "javascript"].contains(l)) {
        let cache = ModuleCache::with_disk(&cache_dir(), &Runtime::shared());
        let meta = msrwasm::tools::check_cached(settings(wasm, *kib), &cache)
            .meta
            .unwrap_or_else(|| panic!("{lang}: no metadata"));
        assert_eq!(
            (meta["name"].as_str(), meta["version"].as_str()),
            ("rapl", "1.0.0"),
            "{lang}"
        );
    }
}
