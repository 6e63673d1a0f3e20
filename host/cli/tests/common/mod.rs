//! What the CLI test files share (`mod common;`).

#![allow(dead_code)]

/// Whether KVM tests can run. Under CI (`CI=true`) a missing `/dev/kvm` is
/// a failure; elsewhere the test is reported as skipped, on standard error
/// and in `$MSRWASM_SKIP_LOG` (which `tests/run.sh` counts), never as a pass.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "/dev/kvm is missing under CI=true: KVM tests must run in CI"
        );
        let test = std::thread::current().name().unwrap_or("a test").to_owned();
        eprintln!("SKIPPED: {test}: /dev/kvm is missing or not accessible");
        if let Some(log) = std::env::var_os("MSRWASM_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "{test}");
            }
        }
    }
    ok
}

/// Makes a FIFO at `path` (nobody writes to it: a reader would block).
pub fn mkfifo(path: &std::path::Path) {
    let made = std::process::Command::new("mkfifo").arg(path).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", path.display());
}
