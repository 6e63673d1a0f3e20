//! Every load-time refusal of the plugin spec gives a message that names
//! the file and the problem, before any guest runs.

use std::path::PathBuf;

use msrwasm::PolicySpec;
use msrwasm::Unhandled;
use msrwasm_cli::runner::{self as vm, VmConfig};
use msrwasm_tests::{guest, kvm_available, shipped_plugin};

const VERSION: &str = r#"(func (export "msrwasm_abi_version") (result i32) i32.const 1)"#;
const RDMSR: &str = r#"(func (export "rdmsr") (param i32) (result i32) i32.const 2)"#;

/// Loads `content` as plugin `file` into a VM and returns the error text.
fn refusal(file: &str, content: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, content).unwrap();
    load_error(vec![path])
}

fn load_error(plugins: Vec<PathBuf>) -> String {
    let mut config = VmConfig::new(guest("msr_loop.elf"), PolicySpec::from_paths(&plugins, Unhandled::Gp));
    config.mem_mib = 16;
    config.serial = Box::new(std::io::sink());
    match vm::run(config) {
        Ok(report) => panic!("the plugin was accepted and the VM ran: {:?}", report.end),
        Err(e) => msrwasm::tools::error_chain(&e),
    }
}

#[test]
fn missing_export() {
    let e = refusal("noversion.wat", format!("(module {RDMSR})").as_bytes());
    assert!(
        e.contains("noversion.wat") && e.contains("missing export `msrwasm_abi_version`"),
        "{e}"
    );
    let e = refusal("nohandler.wat", format!("(module {VERSION})").as_bytes());
    assert!(
        e.contains("nohandler.wat") && e.contains("exports neither `rdmsr`"),
        "{e}"
    );
}

#[test]
fn wrong_signature() {
    let e = refusal(
        "sig.wat",
        format!("(module {VERSION} (func (export \"wrmsr\") (param i32 i32) (result i32) i32.const 2))").as_bytes(),
    );
    assert!(
        e.contains("sig.wat")
            && e.contains("export `wrmsr` has type (i32, i32) -> i32, ABI v1 requires (i32, i64) -> i32"),
        "{e}"
    );
}

#[test]
fn unknown_import() {
    let e = refusal(
        "imp.wat",
        format!("(module (import \"msr\" \"open_file\" (func)) {VERSION} {RDMSR})").as_bytes(),
    );
    assert!(
        e.contains("imp.wat") && e.contains("imports `msr.open_file`, which the host does not provide"),
        "{e}"
    );
    let e = refusal(
        "wasi.wat",
        format!("(module (import \"env\" \"abort\" (func)) (import \"wasi_snapshot_preview1\" \"sock_open\" (func)) (import \"wasi_snapshot_preview1\" \"proc_exit\" (func (param i32))) {VERSION} {RDMSR})")
            .as_bytes(),
    );
    // Every unsupported import is named; WASI's proc_exit is provided.
    assert!(
        e.contains("wasi.wat") && e.contains("imports `env.abort`, `wasi_snapshot_preview1.sock_open`, which"),
        "{e}"
    );
}

#[test]
fn wrong_abi_version() {
    let e = refusal(
        "v2.wat",
        format!("(module (func (export \"msrwasm_abi_version\") (result i32) i32.const 2) {RDMSR})").as_bytes(),
    );
    assert!(
        e.contains("v2.wat") && e.contains("msrwasm_abi_version() returned 2; this host speaks ABI version 1"),
        "{e}"
    );
}

#[test]
fn not_wasm_at_all() {
    let e = refusal("random.wasm", &[0x13, 0x37, 0xff, 0x00, 0x80, 0x81]);
    assert!(e.contains("random.wasm") && e.contains("not WebAssembly"), "{e}");
    let e = refusal("truncated.wasm", b"\0asm\x01\x00\x00\x00\x01\x05");
    assert!(e.contains("truncated.wasm") && e.contains("not WebAssembly"), "{e}");
    let e = refusal("empty.wasm", b"");
    assert!(e.contains("empty.wasm: not WebAssembly: the file is empty"), "{e}");
    let e = load_error(vec![PathBuf::from("/nonexistent/plugin.wasm")]);
    assert!(e.contains("/nonexistent/plugin.wasm: cannot read"), "{e}");
}

#[test]
fn unfilterable_claim() {
    if !kvm_available() {
        return;
    }
    let claim = r#"(func (export "claim") (param i32) (result i64) (if (result i64) (i32.eqz (local.get 0)) (then (i64.const 0x0000080200000802)) (else (i64.const -1))))"#;
    let e = refusal("x2apic.wat", format!("(module {VERSION} {RDMSR} {claim})").as_bytes());
    assert!(
        e.contains("plugin `x2apic` claims 0x802-0x802") && e.contains("KVM cannot filter them"),
        "{e}"
    );
}

#[test]
fn init_refusal_and_bad_config() {
    // synthetic_rapl.wat refuses tdp_watts <= 0 in init.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("vm.toml");
    std::fs::write(
        &manifest,
        format!(
            "[[plugin]]\nname = \"rapl\"\npath = \"{}\"\n[plugin.config]\ntdp_watts = -5\n",
            shipped_plugin("synthetic_rapl.wat").display()
        ),
    )
    .unwrap();
    let spec = PolicySpec::from_manifest(&manifest).unwrap();
    let mut config = VmConfig::new(guest("msr_loop.elf"), spec);
    config.mem_mib = 16;
    config.serial = Box::new(std::io::sink());
    let e = msrwasm::tools::error_chain(&vm::run(config).expect_err("refused"));
    assert!(e.contains("synthetic_rapl.wat: init() refused the load: code 1"), "{e}");
}
