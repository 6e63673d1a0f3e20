//! Every SDK README, walked as a newcomer would, from an empty folder
//! outside the repository (`guest-sdk/walkthrough.sh`): one plugin per SDK
//! built with its real toolchain, then `msrwasm check` and `msrwasm test`.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::Command;

#[test]
fn every_sdk_readme_builds_a_plugin_outside_the_repository() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = repo.join("target/msrwasm-test-cache");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cache)
        .unwrap();
    let out = Command::new("bash")
        .arg(repo.join("guest-sdk/walkthrough.sh"))
        .env("MSRWASM", env!("CARGO_BIN_EXE_msrwasm"))
        .env("MSRWASM_CACHE_DIR", &cache)
        .output()
        .expect("running guest-sdk/walkthrough.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for sdk in [
        "wat",
        "rust",
        "c",
        "zig",
        "assemblyscript",
        "go",
        "python",
        "javascript",
        "rust-component",
    ] {
        assert!(
            stdout.contains(&format!("walkthrough {sdk}: ok")),
            "{sdk}:\n{stdout}\n{stderr}"
        );
    }
}
