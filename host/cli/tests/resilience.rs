//! The `msrwasm` process against hostile files, pipes and signals: it never
//! panics, hangs or grows without bound, and always ends with its status
//! and its summary. Each test failed before its fix.

#[path = "../../../tests/support/common.rs"]
mod common;
use common::{kvm_available, mkfifo};

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_msrwasm"));
    c.env("MSRWASM_CACHE_DIR", cache());
    c
}

fn cache() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/msrwasm-test-cache");
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir);
    dir
}

/// Waits for `child` at most `limit`, reading its output meanwhile; a hang
/// is a failure (and the child is killed), not a stuck test.
fn wait(child: Child, limit: Duration, what: &str) -> Output {
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let started = Instant::now();
    while !waiter.is_finished() {
        if started.elapsed() > limit {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            let out = waiter.join().unwrap();
            panic!(
                "{what}: still running after {limit:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    waiter.join().unwrap()
}

fn run(args: &[&str], limit: Duration) -> Output {
    let child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait(child, limit, &format!("{args:?}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The built-in guests, written once per test.
fn guests(dir: &Path) -> PathBuf {
    let o = run(&["guests", dir.to_str().unwrap()], Duration::from_secs(30));
    assert!(o.status.success(), "{}", stderr(&o));
    dir.to_owned()
}

const ANSWER: &str = r#"(module (import "msr" "reply" (func $r (param i64)))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param i32) (result i32) (call $r (i64.const 7)) (i32.const 0)))"#;

#[test]
fn fifos_devices_and_directories_are_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    for (args, needle) in [
        (vec!["run", "--plugin", f, "g"], "is a FIFO"),
        (vec!["run", "--plugin", "/dev/zero", "g"], "character device"),
        (vec!["run", "--manifest", f, "g"], "is a FIFO"),
        (vec!["run", "--manifest", "/dev/urandom", "g"], "character device"),
        (vec!["check", "/dev/zero"], "character device"),
        (vec!["run", f], "is a FIFO, not a regular file"),
        (vec!["run", "/dev/zero"], "character device"),
    ] {
        let o = run(&args, Duration::from_secs(20));
        let err = stderr(&o) + &String::from_utf8_lossy(&o.stdout);
        assert!(matches!(o.status.code(), Some(1 | 2)), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_compile_bomb_is_refused_before_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.wasm");
    let funcs = "(func)".repeat(100_001);
    std::fs::write(
        &bomb,
        wat::parse_str(format!(
            r#"(module (func (export "msrwasm_abi_version") (result i32) (i32.const 1)) (func (export "rdmsr") (param i32) (result i32) (i32.const 2)) {funcs})"#
        ))
        .unwrap(),
    )
    .unwrap();
    let started = Instant::now();
    let o = run(
        &["--no-cache", "check", bomb.to_str().unwrap()],
        Duration::from_secs(60),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("more than 100000 functions"), "{out}");
    eprintln!("refused in {:?}", started.elapsed());
}

#[test]
fn closed_standard_output_and_error_never_panic() {
    if !kvm_available() {
        return;
    }
    for args in [
        vec!["demo"],
        vec!["check", "/nonexistent.wasm"],
        vec!["guests", "/nonexistent/dir/x"],
    ] {
        let mut child = bin()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Both pipes closed before msrwasm writes a byte: every write fails
        // with EPIPE.
        drop(child.stdout.take());
        drop(child.stderr.take());
        let o = wait(child, Duration::from_secs(120), &format!("{args:?}"));
        assert_ne!(o.status.code(), Some(101), "{args:?} panicked");
        if args[0] == "demo" {
            assert_eq!(o.status.code(), Some(0), "the VM finished with its own status");
        }
    }
}

#[test]
fn too_little_memory_for_the_vcpu_stacks_is_refused() {
    let o = run(&["run", "--mem", "3", "--vcpus", "64", "g"], Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("too small for 64 vCPUs"), "{}", stderr(&o));
}

#[test]
fn a_trace_on_a_full_disk_is_reported_and_the_vm_finishes() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = guests(dir.path());
    let plugin = dir.path().join("answer.wat");
    std::fs::write(&plugin, ANSWER).unwrap();
    let o = run(
        &[
            "run",
            "--plugin",
            plugin.to_str().unwrap(),
            "--trace",
            "/dev/full",
            g.join("msr_loop.elf").to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("all vCPUs halted"), "{err}");
    assert!(
        err.contains("dropped") && err.contains("No space left on device"),
        "{err}"
    );
}

/// A running `msrwasm run` and everything it wrote to standard error.
struct Running {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Running {
    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{sig}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for the end (at most `limit`): exit status and standard error.
    fn finish(mut self, limit: Duration) -> (Option<i32>, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "still running after {limit:?}: {}",
                    String::from_utf8_lossy(&self.stderr.lock().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(Duration::from_millis(50));
        (
            status.code(),
            String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned(),
        )
    }
}

/// Starts a VM on the endless MSR guest; returns once its vCPUs run.
fn start_forever(dir: &Path, extra: &[&str]) -> Running {
    let g = guests(dir);
    let plugin = dir.join("answer.wat");
    if !plugin.exists() {
        std::fs::write(&plugin, ANSWER).unwrap();
    }
    let mut args = vec!["--log".to_owned(), "info".into(), "run".into(), "--plugin".into()];
    args.push(plugin.to_str().unwrap().into());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(g.join("msr_forever.elf").to_str().unwrap().into());
    let mut child = bin()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&stderr.lock().unwrap()).contains("vCPUs running") {
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&stderr.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Running { child, stderr }
}

#[test]
fn every_termination_signal_ends_the_run_with_its_status() {
    if !kvm_available() {
        return;
    }
    for (sig, code) in [("HUP", 129), ("QUIT", 131), ("USR1", 138), ("ALRM", 142)] {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.jsonl");
        let vm = start_forever(dir.path(), &["--trace", trace.to_str().unwrap()]);
        vm.signal(sig);
        let (status, err) = vm.finish(Duration::from_secs(30));
        assert_eq!(status, Some(code), "SIG{sig}: {err}");
        assert!(
            err.contains(&format!("stopped by signal {} (SIG{sig})", code - 128)),
            "{err}"
        );
        let lines = std::fs::read_to_string(&trace).unwrap().lines().count();
        assert!(
            lines > 0 && err.contains(&format!("{lines} trace records written")),
            "SIG{sig}: {err}"
        );
    }
}

#[test]
fn a_stalled_trace_reader_never_holds_up_the_end_of_a_run() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("trace.fifo");
    mkfifo(&fifo);
    // A reader that opens the FIFO and never reads.
    let mut reader = Command::new("sh")
        .arg("-c")
        .arg(format!("exec sleep 60 < '{}'", fifo.display()))
        .spawn()
        .unwrap();
    let vm = start_forever(dir.path(), &["--trace", fifo.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(500));
    vm.signal("INT");
    let (status, err) = vm.finish(Duration::from_secs(20));
    let _ = reader.kill();
    let _ = reader.wait();
    assert_eq!(status, Some(130), "{err}");
    assert!(err.contains("trace could not be finished"), "{err}");
}

#[test]
fn a_fifo_trace_without_a_reader_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("trace.fifo");
    mkfifo(&fifo);
    let o = run(
        &["run", "--trace", fifo.to_str().unwrap(), "/nonexistent.elf"],
        Duration::from_secs(20),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("a FIFO with no reader"), "{}", stderr(&o));
}

#[test]
fn a_trace_file_deleted_while_the_vm_runs_is_reported() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    let vm = start_forever(dir.path(), &["--trace", trace.to_str().unwrap()]);
    std::fs::remove_file(&trace).unwrap();
    vm.signal("TERM");
    let (status, err) = vm.finish(Duration::from_secs(30));
    assert_eq!(status, Some(143));
    assert!(err.contains("the trace file was deleted while the VM ran"), "{err}");
}

#[test]
fn sigterm_during_a_reload_compile_does_not_wait_for_the_compile() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = start_forever(dir.path(), &["--no-cache"]);
    // A new version that takes many seconds to compile (99,000 functions,
    // under the function limit).
    let big = slow_to_compile();
    let temp = dir.path().join("answer.wat.tmp");
    std::fs::write(&temp, big).unwrap();
    std::fs::rename(&temp, dir.path().join("answer.wat")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    vm.signal("TERM");
    let (status, err) = vm.finish(Duration::from_secs(30));
    assert_eq!(status, Some(143), "{err}");
    // Bound, not benchmark: the compile takes far longer than this.
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
}

/// A plugin that takes many seconds to compile (99,000 functions, under
/// the function limit) and answers 8.
fn slow_to_compile() -> Vec<u8> {
    let funcs: String = (0..99_000)
        .map(|i| format!("(func (result i32) (i32.const {i}))"))
        .collect();
    wat::parse_str(format!(
        r#"(module (import "msr" "reply" (func $r (param i64))) (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
           (func (export "rdmsr") (param i32) (result i32) (call $r (i64.const 8)) (i32.const 0)) {funcs})"#
    ))
    .unwrap()
}

#[test]
fn unhandled_log_logs_a_bounded_number_of_distinct_msrs() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("distinct.bin");
    std::fs::write(&g, DISTINCT_MSRS_GUEST).unwrap();
    let o = run(
        &["run", "--unhandled", "log", g.to_str().unwrap()],
        Duration::from_secs(60),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let logged = err.lines().filter(|l| l.contains("logged once per VM")).count();
    assert_eq!(logged, 4096, "one line per distinct MSR up to the bound");
    assert!(err.contains("further ones are not logged individually"), "{err}");
}

#[test]
fn check_refuses_the_claims_run_refuses_and_escapes_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let claimer = |name: &str, claims: &[(u32, u32)]| {
        let body: String = claims
            .iter()
            .enumerate()
            .map(|(n, (f, l))| {
                format!(
                    "(if (i32.eq (local.get 0) (i32.const {n})) (then (return (i64.const {}))))",
                    (u64::from(*f) << 32 | u64::from(*l)) as i64
                )
            })
            .collect();
        let path = dir.path().join(format!("{name}.wat"));
        std::fs::write(
            &path,
            format!(
                r#"(module (@custom "msrwasm.meta" "name = \"x\\u001b[2J\\nsha256:   fake\"")
                  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
                  (func (export "claim") (param i32) (result i64) {body} (i64.const -1))
                  (func (export "rdmsr") (param i32) (result i32) (i32.const 2)))"#
            ),
        )
        .unwrap();
        path
    };
    let x2apic = claimer("x2apic", &[(0x800, 0x800)]);
    let many: Vec<(u32, u32)> = (0..17u32)
        .map(|i| (0x5000_0000 + i * 0x10_0000, 0x5000_0000 + i * 0x10_0000))
        .collect();
    let ranges = claimer("ranges", &many);
    let all = claimer("all", &[(0xc002_0000, u32::MAX)]);
    for (path, needle) in [(&x2apic, "x2APIC"), (&ranges, "KVM allows 16"), (&all, "KVM allows 16")] {
        let o = run(&["check", path.to_str().unwrap()], Duration::from_secs(20));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(out.contains(needle), "{out}");
    }
    let ok = claimer("ok", &[(0x4d53_0000, 0x4d53_0000)]);
    let o = run(&["check", ok.to_str().unwrap()], Duration::from_secs(20));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(!out.contains('\u{1b}') && !out.contains("\nsha256:   fake"), "{out:?}");
    assert!(out.contains("\\u{1b}[2J\\nsha256:   fake"), "{out}");
}

/// Issue #21: SIGXCPU, SIGPWR, SIGVTALRM, SIGPROF, SIGIO and the real-time
/// signals ended the run without its summary or footprint and left the API
/// socket behind. Every terminating signal now ends it the same way.
#[test]
fn every_terminating_signal_ends_the_run_cleanly_with_socket_and_footprint() {
    if !kvm_available() {
        return;
    }
    let rt3 = libc::SIGRTMIN() + 3;
    for sig in [
        libc::SIGXCPU,
        libc::SIGPWR,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        rt3,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let footprint = dir.path().join("footprint.json");
        let vm = start_forever(
            dir.path(),
            &[
                "--api-sock",
                sock.to_str().unwrap(),
                "--footprint",
                footprint.to_str().unwrap(),
            ],
        );
        assert!(sock.exists());
        vm.signal(&sig.to_string());
        let (status, err) = vm.finish(Duration::from_secs(30));
        assert_eq!(status, Some(128 + sig), "signal {sig}: {err}");
        assert!(err.contains(&format!("stopped by signal {sig} (SIG")), "{err}");
        assert!(err.contains("footprint written to"), "signal {sig}: {err}");
        let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&footprint).unwrap()).unwrap();
        assert!(!written.as_array().unwrap().is_empty(), "signal {sig}");
        assert!(!sock.exists(), "signal {sig}: the API socket was left behind");
    }
}

/// Issue #21: a signal during start-up (here a compile of many seconds;
/// the same holds for `init` on every vCPU) acted only once start-up was
/// over, or killed the process without a word.
#[test]
fn a_signal_during_start_up_ends_it_at_once_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let big = slow_to_compile();
    let plugin = dir.path().join("big.wasm");
    std::fs::write(&plugin, big).unwrap();
    let guest = dir.path().join("exit.bin");
    std::fs::write(&guest, [0xb0, 0x00, 0xe6, 0xf4]).unwrap();
    for sig in [libc::SIGTERM, libc::SIGPWR] {
        let child = bin()
            .args([
                "--no-cache",
                "run",
                "--plugin",
                plugin.to_str().unwrap(),
                guest.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let started = Instant::now();
        let killed = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status();
        assert!(killed.unwrap().success());
        let o = wait(child, Duration::from_secs(30), "start-up signal");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(128 + sig), "{err}");
        assert!(err.contains("during start-up; the guest did not run"), "{err}");
        // Bound, not benchmark: the compile takes far longer.
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}

/// Issue #21: log lines were written to standard error from vCPU threads;
/// with standard error on a pipe nobody reads, a guest touching many
/// distinct MSRs blocked every vCPU in write(2) for good.
#[test]
fn a_standard_error_nobody_reads_never_blocks_the_guest() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("distinct.bin");
    std::fs::write(&g, DISTINCT_MSRS_GUEST).unwrap();
    let mut child = bin()
        .args(["run", "--unhandled", "log", g.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Hold the pipe open and never read it.
    let _unread = child.stderr.take();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the guest was blocked by an unread standard error");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

/// Real mode: RDMSR 0x4d540000 ..= 0x4d541387 (5000 distinct MSRs), exit 0.
const DISTINCT_MSRS_GUEST: [u8; 23] = [
    0x66, 0xb9, 0x00, 0x00, 0x54, 0x4d, // mov ecx, 0x4d540000
    0x0f, 0x32, // rdmsr
    0x66, 0x41, // inc ecx
    0x66, 0x81, 0xf9, 0x88, 0x13, 0x54, 0x4d, // cmp ecx, 0x4d541388
    0x75, 0xf3, // jne rdmsr
    0xb0, 0x00, 0xe6, 0xf4, // mov al, 0; out 0xf4, al
];

/// Issue #21: `--footprint` and `pull -o` replaced FIFOs, devices and
/// symbolic links, and a footprint in a missing directory was lost at the
/// end of the run. Both are refused at start now.
#[test]
fn outputs_that_are_not_regular_files_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("out.fifo");
    mkfifo(&fifo);
    let link = dir.path().join("stdout");
    std::os::unix::fs::symlink("/proc/self/fd/1", &link).unwrap();
    let missing = dir.path().join("missing/footprint.json");
    let guest = dir.path().join("exit.bin");
    std::fs::write(&guest, [0xb0, 0x00, 0xe6, 0xf4]).unwrap();
    for (path, words) in [
        (&fifo, "FIFO, device or socket"),
        (&link, "symbolic link"),
        (&missing, "cannot be used"),
    ] {
        let o = run(
            &["run", "--footprint", path.to_str().unwrap(), guest.to_str().unwrap()],
            Duration::from_secs(20),
        );
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(words), "{}", stderr(&o));
        let o = run(
            &["pull", "oci://127.0.0.1:9/x/y:1", "-o", path.to_str().unwrap()],
            Duration::from_secs(20),
        );
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(words), "{}", stderr(&o));
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
}

/// Issue #21: `run --plugin` had no way to raise `memory_max_kib`, so Go,
/// Python and JavaScript plugins could not run without a manifest.
#[test]
fn run_plugin_takes_the_limits_a_manifest_would_set() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("big_memory.wat");
    std::fs::write(
        &plugin,
        r#"(module (import "msr" "reply" (func $r (param i64))) (memory 32)
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param i32) (result i32) (call $r (i64.const 7)) (i32.const 0)))"#,
    )
    .unwrap();
    let guest = dir.path().join("exit.bin");
    std::fs::write(&guest, [0xb0, 0x00, 0xe6, 0xf4]).unwrap();
    let args = |extra: &[&str]| {
        let mut a = vec!["run", "--plugin", plugin.to_str().unwrap()];
        a.extend_from_slice(extra);
        a.push(guest.to_str().unwrap());
        run(&a, Duration::from_secs(30))
    };
    let o = args(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("memory_max_kib = 2048"), "{}", stderr(&o));
    let o = args(&[
        "--memory-max-kib",
        "4096",
        "--timeout-us",
        "5000",
        "--on-error",
        "value=0x5",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = args(&["--on-error", "skip"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("value=N"), "{}", stderr(&o));
}

/// Issue #21: the reload log said `cached=false` even when the disk cache
/// (filled by `msrwasm check`) served the plugin.
#[test]
fn the_version_log_says_where_the_compiled_code_came_from() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let plugin = dir.path().join("answer.wat");
    std::fs::write(&plugin, ANSWER).unwrap();
    let guest = dir.path().join("exit.bin");
    std::fs::write(&guest, [0xb0, 0x00, 0xe6, 0xf4]).unwrap();
    let o = run(
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "check",
            plugin.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--log",
            "info",
            "run",
            "--plugin",
            plugin.to_str().unwrap(),
            guest.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("plugin version validated"))
        .unwrap_or_default();
    assert!(line.contains("disk cache"), "{err}");
}
