//! What every test crate shares: whether KVM tests can run (a skip is
//! never a pass), and FIFOs. Included by `tests/lib.rs` and by the CLI's
//! tests (`host/cli/tests`) with `#[path]`.

#![allow(dead_code)]

/// Whether KVM tests can run. Under CI (`CI=true`) a missing `/dev/kvm` is
/// a failure, not a skip. Elsewhere the test is reported as skipped (see
/// [`record_skip`]).
pub fn kvm_available() -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("/dev/kvm is missing or not accessible, and CI=true: KVM tests must run in CI");
        }
        record_skip("/dev/kvm is missing or not accessible");
    }
    usable
}

/// Reports the running test as skipped: on standard error, and as a line
/// in `$MSRWASM_SKIP_LOG` (which `tests/run.sh` counts, so that a skip is
/// never counted as a pass).
pub fn record_skip(why: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    eprintln!("SKIPPED: {test}: {why}");
    if let Some(log) = std::env::var_os("MSRWASM_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// Makes a FIFO at `path` (nobody writes to it: a reader would block).
pub fn mkfifo(path: &std::path::Path) {
    let made = std::process::Command::new("mkfifo").arg(path).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", path.display());
}

/// Whether the command `tool` (installed by `tests/setup.sh`) can run.
/// Under CI (`CI=true`) a missing tool is a failure; elsewhere the test is
/// reported as skipped.
pub fn tool_available(tool: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("`{tool}` is missing, and CI=true: tests/setup.sh installs it");
        }
        record_skip(&format!("`{tool}` is not installed (tests/setup.sh installs it)"));
    }
    found
}
