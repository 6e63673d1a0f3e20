//! The `msrwasm` command line as users and scripts drive it: exit statuses,
//! messages for bad input, the demo, signals.

#[path = "../../../tests/support/common.rs"]
mod common;
use common::kvm_available;

use std::process::{Command, Output, Stdio};

fn msrwasm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msrwasm"))
        .args(args)
        .output()
        .expect("running msrwasm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Bad input exits with status 2 and a message, never a panic.
fn refused(args: &[&str], needle: &str) {
    let o = msrwasm(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn help_lists_the_commands() {
    let o = msrwasm(&["--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for cmd in ["run", "demo", "bench", "check", "test", "meta", "guests"] {
        assert!(out.contains(cmd), "{out}");
    }
    let run_help = String::from_utf8_lossy(&msrwasm(&["run", "--help"]).stdout).into_owned();
    for flag in [
        "--vcpus",
        "--mem",
        "--manifest",
        "--plugin",
        "--unhandled",
        "--trace",
        "Exit status",
    ] {
        assert!(run_help.contains(flag), "{run_help}");
    }
}

#[test]
fn bad_guest_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    refused(
        &["run", "/nonexistent/guest.elf"],
        "guest image /nonexistent/guest.elf: No such file",
    );
    refused(&["run", d.to_str().unwrap()], "is a directory");
    let empty = d.join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    refused(&["run", empty.to_str().unwrap()], "is empty");
    let huge = d.join("huge.bin");
    std::fs::File::create(&huge).unwrap().set_len(4 << 30).unwrap();
    refused(
        &["run", "--mem", "64", huge.to_str().unwrap()],
        "does not fit in guest memory",
    );
    let bad_elf = d.join("bad.elf");
    std::fs::write(&bad_elf, b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0").unwrap();
    refused(&["run", bad_elf.to_str().unwrap()], "not a usable ELF executable");
}

#[test]
fn bad_numbers_and_conflicting_options() {
    refused(&["run", "--vcpus", "0", "g"], "--vcpus");
    refused(&["run", "--vcpus", "many", "g"], "invalid value 'many'");
    refused(&["run", "--mem", "1", "g"], "--mem");
    refused(&["run", "--unhandled", "explode", "g"], "invalid value 'explode'");
    refused(
        &["run", "--manifest", "m.toml", "--plugin", "p.wat", "g"],
        "cannot be used with",
    );
}

#[test]
fn bad_manifests_and_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("vm.toml");
    std::fs::write(
        &manifest,
        "unhandled = \"gp\"\n[[plugin]]\nname = \"x\"\npath = \"missing.wasm\"\n",
    )
    .unwrap();
    refused(
        &["run", "--manifest", manifest.to_str().unwrap(), "g"],
        "vm.toml:4: key `plugin.path` of plugin `x`: no such file",
    );
    std::fs::write(&manifest, "unhandled = \n").unwrap();
    refused(&["run", "--manifest", manifest.to_str().unwrap(), "g"], "vm.toml:1:");
    let plugin = dir.path().join("junk.wasm");
    std::fs::write(&plugin, [0xde, 0xad, 0xbe, 0xef]).unwrap();
    refused(
        &["run", "--plugin", plugin.to_str().unwrap(), "g"],
        "junk.wasm: not WebAssembly",
    );
}

#[test]
fn demo_runs_by_itself_and_summarises() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    let o = msrwasm(&["demo", "--trace", trace.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    for vcpu in ["vcpu 0", "vcpu 1"] {
        // Every round shows the topology; the hot swap, paced by the host
        // while the vCPUs wait at the gate, replaces 0x20004 (2 cores, 4
        // threads) with 0x20002 (SMT hidden) for good.
        let rounds: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("{vcpu}: MSR_CORE_THREAD_COUNT")))
            .map(|l| match l {
                _ if l.contains("= 0x0000000000020004") => "smt",
                _ if l.contains("= 0x0000000000020002") => "nosmt",
                _ => l,
            })
            .collect();
        assert_eq!(rounds, ["smt", "smt", "nosmt", "nosmt"], "{out}");
        let gp = format!("{vcpu}: WRMSR MSR_PKG_POWER_LIMIT (0x610) -> #GP count 0x0000000000000001");
        assert!(out.contains(&gp), "{out}");
        let profile = format!("{vcpu}: VM_IGNNE (0xc0010115) written and read back, #GP count 0x0000000000000000");
        assert!(out.contains(&profile), "{out}");
    }
    assert!(err.contains("plugin windows: 4 handled, 0 fault"), "{err}");
    assert!(
        err.contains("all vCPUs halted") && err.contains("plugin rapl: 8 handled, 2 fault"),
        "{err}"
    );
    assert!(err.contains("policy changes: 1 applied, 0 refused"), "{err}");
    assert!(err.contains("new version in force"), "{err}");
    let trace = std::fs::read_to_string(&trace).unwrap();
    let lines = trace.lines().filter(|l| !l.contains("\"0x4d530002\"")).count();
    assert_eq!(
        lines, 24,
        "2 vCPUs x (4 rounds x 2 + 1 + 2 + 1) accesses besides the gate"
    );
}

#[test]
fn sigterm_stops_a_running_vm_with_143() {
    if !kvm_available() {
        return;
    }
    // A flat real-mode guest that says it runs ('R' on COM1), then spins
    // forever: mov dx, 0x3f8; mov al, 'R'; out dx, al; jmp $.
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("spin.bin");
    std::fs::write(&guest, [0xba, 0xf8, 0x03, 0xb0, b'R', 0xee, 0xeb, 0xfe]).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_msrwasm"))
        .args(["run", "--vcpus", "2", guest.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Ready when both vCPUs run: two 'R's.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    while seen.iter().filter(|&&b| b == b'R').count() < 2 {
        let mut byte = [0u8];
        use std::io::Read;
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "the guest never ran");
        seen.push(byte[0]);
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
}

#[test]
fn guest_exit_port_sets_the_status() {
    if !kvm_available() {
        return;
    }
    // mov al, 42; out 0xf4, al
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("exit.bin");
    std::fs::write(&guest, [0xb0, 42, 0xe6, 0xf4]).unwrap();
    let o = msrwasm(&["run", guest.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(42), "{}", stderr(&o));
}

/// Assembles the raw guest `src` into `elf` with only what `msrwasm guests`
/// wrote into `guests` (guest.inc, elf.ld), as docs/guest-conventions.md says.
fn assemble(guests: &std::path::Path, src: &std::path::Path, elf: &std::path::Path) {
    let o = Command::new("cc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-I"])
        .arg(guests)
        .arg("-T")
        .arg(guests.join("elf.ld"))
        .arg("-o")
        .arg(elf)
        .arg(src)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}: {}", src.display(), stderr(&o));
}

#[test]
fn guests_writes_the_built_in_images() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("new");
    let o = msrwasm(&["guests", out_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["demo.elf", "msr_loop.elf", "msr_forever.elf"] {
        let bytes = std::fs::read(out_dir.join(name)).unwrap();
        assert!(bytes.starts_with(b"\x7fELF"), "{name}");
    }
    // What it writes is enough to write a guest: the example, and a
    // profile's replay guest, build with it alone and run as documented.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let example = dir.path().join("example.elf");
    assemble(&out_dir, &out_dir.join("example.S"), &example);
    let replay = dir.path().join("replay.elf");
    assemble(
        &out_dir,
        format!("{root}/plugins/profiles/linux/linux_replay.S").as_ref(),
        &replay,
    );
    if !kvm_available() {
        return;
    }
    let o = msrwasm(&[
        "run",
        "--plugin",
        &format!("{root}/plugins/topology.wat"),
        example.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "one #GP: {}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("replay: 0x0000000000000001 #GP"));
    let manifest = format!("{root}/plugins/profiles/linux/manifest.toml");
    let o = msrwasm(&["run", "--manifest", &manifest, replay.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// `policy record` and `policy diff` as documented: a footprint of the bare
/// Linux replay becomes a profile under which the replay runs clean.
#[test]
fn policy_record_turns_a_footprint_into_a_working_policy() {
    if !kvm_available() {
        return;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let o = msrwasm(&["guests", &d("g")]);
    assert!(o.status.success());
    assemble(
        dir.path().join("g").as_ref(),
        format!("{root}/plugins/profiles/windows/windows_replay.S").as_ref(),
        dir.path().join("replay.elf").as_ref(),
    );
    let o = msrwasm(&[
        "run",
        "--unhandled",
        "log",
        "--footprint",
        &d("before.json"),
        &d("replay.elf"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = msrwasm(&[
        "policy",
        "record",
        &d("before.json"),
        "--out",
        &d("p"),
        "--msr",
        "0x1ad=gp",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = msrwasm(&["check", "--manifest", &d("p/manifest.toml"), &d("p/recorded.wat")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = msrwasm(&[
        "test",
        "--manifest",
        &d("p/manifest.toml"),
        "--case",
        &d("p/recorded.test"),
        &d("p/recorded.wat"),
    ]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    let o = msrwasm(&[
        "run",
        "--manifest",
        &d("p/manifest.toml"),
        "--footprint",
        &d("after.json"),
        &d("replay.elf"),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "only 0x1ad, recorded as #GP, faults: {}",
        stderr(&o)
    );
    let o = msrwasm(&["policy", "diff", &d("before.json"), &d("after.json")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("~ rdmsr 0x88: answered by unhandled -> plugin:recorded"));
    let o = msrwasm(&["policy", "diff", &d("after.json"), &d("after.json")]);
    assert_eq!(o.status.code(), Some(0));
    refused(
        &[
            "policy",
            "record",
            &d("before.json"),
            "--out",
            &d("q"),
            "--msr",
            "0x12345=gp",
        ],
        "no unhandled access",
    );
    refused(
        &[
            "policy",
            "record",
            &d("before.json"),
            "--out",
            &d("q"),
            "--action",
            "maybe",
        ],
        "zero, recorded, gp or value=N",
    );
}

#[test]
fn check_reports_and_fails_on_refused_plugins() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let rapl = format!("{root}/plugins/synthetic_rapl.wat");
    let o = msrwasm(&["check", &rapl]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    for line in [
        "synthetic_rapl.wat: ok",
        "claims:   0x606, 0x610-0x614",
        "init:     ok",
        "meta:     name = rapl",
    ] {
        assert!(out.contains(line), "{out}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wat");
    std::fs::write(&bad, "(module)").unwrap();
    let o = msrwasm(&["check", "--json", &rapl, bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let reports: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(reports[0]["ok"], true);
    assert_eq!(reports[1]["ok"], false);
    assert!(
        reports[1]["error"]
            .as_str()
            .unwrap()
            .contains("missing export `msrwasm_abi_version`")
    );
    // init refuses nonsense config: check says so
    let o = msrwasm(&["check", "--config", "tdp_watts=0", &rapl]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("init() refused the load: code 1"));
}

#[test]
fn test_runs_a_case_script_without_kvm() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let rapl = format!("{root}/plugins/synthetic_rapl.wat");
    let case = format!("{root}/tests/conformance/rapl.case");
    let o = msrwasm(&["test", &rapl, "--case", &case]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.ends_with("15 passed, 0 failed\n"), "{out}");
    // A wrong expectation is reported with file and line, and fails.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.case");
    std::fs::write(&wrong, "rdmsr 0x606 -> 0x1\n").unwrap();
    let o = msrwasm(&["test", &rapl, "--case", wrong.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out.contains("wrong.case:1: rdmsr 0x606 on vCPU 0: expected 0x1, got 0xa0e03"),
        "{out}"
    );
    std::fs::write(&wrong, "rdmsr 0x606\n").unwrap();
    refused(
        &["test", &rapl, "--case", wrong.to_str().unwrap()],
        "wrong.case:1: an access needs `-> EXPECTED`",
    );
}

#[test]
fn meta_sets_and_shows_plugin_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("p.wasm");
    let wasm = wat::parse_str(
        r#"(module (func (export "msrwasm_abi_version") (result i32) (i32.const 1)) (func (export "rdmsr") (param i32) (result i32) (i32.const 2)))"#,
    )
    .unwrap();
    std::fs::write(&plugin, wasm).unwrap();
    let p = plugin.to_str().unwrap();
    assert!(String::from_utf8_lossy(&msrwasm(&["meta", p]).stdout).contains("no msrwasm.meta section"));
    assert!(
        msrwasm(&["meta", p, "--set", "name=p", "--set", "version=0.2.0"])
            .status
            .success()
    );
    let shown = String::from_utf8_lossy(&msrwasm(&["meta", p]).stdout).into_owned();
    assert_eq!(shown, "name = p\nversion = 0.2.0\n");
    assert!(String::from_utf8_lossy(&msrwasm(&["check", p]).stdout).contains("meta:     version = 0.2.0"));
    refused(&["meta", p, "--set", "novalue"], "expected KEY=VALUE");
}

/// `run --footprint FILE` writes what the guest touched at exit (private,
/// written atomically), and `policy suggest` turns it into a manifest
/// skeleton; what is not a footprint is refused, a FIFO without waiting.
#[test]
fn footprint_at_exit_and_policy_suggest() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // Real mode: rdmsr 0x4d530001; wrmsr 0x4d530001 <- 0; exit 0.
    let guest = dir.path().join("touch.bin");
    let mut code = vec![0x66, 0xb9, 0x01, 0x00, 0x53, 0x4d, 0x0f, 0x32];
    code.extend([0x66, 0x31, 0xc0, 0x66, 0x31, 0xd2, 0x0f, 0x30]);
    code.extend([0xb0, 0x00, 0xe6, 0xf4]);
    std::fs::write(&guest, code).unwrap();
    let footprint = dir.path().join("footprint.json");
    let o = msrwasm(&[
        "run",
        "--unhandled",
        "ignore",
        "--footprint",
        footprint.to_str().unwrap(),
        guest.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mode = std::fs::metadata(&footprint).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let entries: serde_json::Value = serde_json::from_slice(&std::fs::read(&footprint).unwrap()).unwrap();
    assert_eq!(entries.as_array().map(Vec::len), Some(2), "{entries}");
    assert_eq!(entries[0]["op"], "rdmsr");
    assert_eq!(entries[1]["answered_by"]["unhandled"], 1);

    let o = msrwasm(&["policy", "suggest", footprint.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("filter_default = \"deny\""), "{out}");
    assert!(out.contains("0x4d530001: rdmsr 1, wrmsr 1 (unknown)"), "{out}");

    std::fs::write(dir.path().join("not.json"), "[{\"op\": 1}]").unwrap();
    refused(
        &["policy", "suggest", dir.path().join("not.json").to_str().unwrap()],
        "not a footprint",
    );
    let fifo = dir.path().join("fifo");
    common::mkfifo(&fifo);
    refused(&["policy", "suggest", fifo.to_str().unwrap()], "FIFO");
}
