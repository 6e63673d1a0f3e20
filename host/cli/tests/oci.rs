//! `msrwasm push`, `pull`, and `oci://` in `check`, `test` and `run`,
//! against a real registry on 127.0.0.1: what a user types.

#[path = "../../../tests/support/common.rs"]
mod common;
#[path = "../../../tests/support/registry.rs"]
mod registry;

use std::path::Path;
use std::process::{Command, Output};

use registry::Registry;

fn bin(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_msrwasm"));
    c.env("MSRWASM_CACHE_DIR", cache)
        .env_remove("MSRWASM_REGISTRY_USER")
        .env_remove("MSRWASM_REGISTRY_PASSWORD")
        .env_remove("MSRWASM_REGISTRY_CA")
        .env_remove("MSRWASM_REGISTRY_TIMEOUT_S")
        // No user Docker config leaks in.
        .env("DOCKER_CONFIG", cache.join("no-docker-config"));
    c
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn rapl() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/synthetic_rapl.wat")
}

#[test]
fn push_pull_check_and_test_by_reference() {
    let registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let reference = registry.reference("platform/rapl:1.0.0");
    let o = bin(cache.path())
        .args(["push"])
        .arg(rapl())
        .arg(&reference)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("pushed {reference}@sha256:")), "{out}");
    assert!(out.contains("org.opencontainers.image.title = rapl"), "{out}");
    // Another team pulls it into a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rapl.wasm");
    let o = bin(cache.path())
        .args(["pull", &reference, "-o"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let pulled = std::fs::read(&file).unwrap();
    assert_eq!(pulled, wat::parse_file(rapl()).unwrap(), "WAT is pushed compiled");
    // check and test take the reference as they take a file.
    let o = bin(cache.path()).args(["check", &reference]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let case = dir.path().join("rapl.case");
    std::fs::write(&case, "rdmsr 0x606 -> 0xa0e03\n").unwrap();
    let o = bin(cache.path())
        .args(["test", &reference, "--case"])
        .arg(&case)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 passed, 0 failed"));
}

#[test]
fn refused_plugins_bad_references_and_missing_tags_are_named() {
    let registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A plugin `run` would refuse is not pushed.
    let bad = dir.path().join("bad.wat");
    std::fs::write(
        &bad,
        "(module (func (export \"rdmsr\") (param i32) (result i32) i32.const 0))",
    )
    .unwrap();
    let o = bin(cache.path())
        .arg("push")
        .arg(&bad)
        .arg(registry.reference("x/bad:v1"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not pushed"), "{}", text(&o));
    for (reference, says) in [
        ("oci://127.0.0.1:1/Upper:v1", "lowercase"),
        ("https://example.com/x", "expected oci://"),
        (&registry.reference("x/missing:v9")[..], "x/missing:v9"),
    ] {
        let o = bin(cache.path()).args(["pull", reference]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(says), "{says}: {}", text(&o));
    }
}

#[test]
fn credentials_come_from_the_environment_or_the_docker_config() {
    use std::os::unix::fs::PermissionsExt;
    let registry = Registry::start(&[("team", "pa55")]);
    let cache = tempfile::tempdir().unwrap();
    let reference = registry.reference("private/rapl:v1");
    // Anonymous: refused by the registry.
    let o = bin(cache.path())
        .arg("push")
        .arg(rapl())
        .arg(&reference)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // Environment variables.
    let o = bin(cache.path())
        .env("MSRWASM_REGISTRY_USER", "team")
        .env("MSRWASM_REGISTRY_PASSWORD", "pa55")
        .arg("push")
        .arg(rapl())
        .arg(&reference)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // One without the other is a mistake, said so.
    let o = bin(cache.path())
        .env("MSRWASM_REGISTRY_USER", "team")
        .args(["pull", &reference])
        .output()
        .unwrap();
    assert!(
        text(&o).contains("set both MSRWASM_REGISTRY_USER and MSRWASM_REGISTRY_PASSWORD"),
        "{}",
        text(&o)
    );
    // The Docker config file (as `docker login` writes it).
    let docker = tempfile::tempdir().unwrap();
    // base64("team:pa55"), as `docker login` stores it.
    let auth = "dGVhbTpwYTU1";
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{auth}"}}}}}}"#, registry.port),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = bin(cache.path())
        .env("DOCKER_CONFIG", docker.path())
        .args(["pull", &reference, "-o"])
        .arg(out.path().join("p.wasm"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // A FIFO as the Docker config does not hang the pull.
    let fifo_dir = tempfile::tempdir().unwrap();
    common::mkfifo(&fifo_dir.path().join("config.json"));
    let o = bin(cache.path())
        .env("DOCKER_CONFIG", fifo_dir.path())
        .args(["pull", &reference])
        .current_dir(out.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "anonymous, refused: {}", text(&o));
    assert!(text(&o).contains("FIFO"), "{}", text(&o));
    // A credential helper the Docker config names runs (a working one
    // gives the login); one that hangs is cut off by
    // MSRWASM_REGISTRY_TIMEOUT_S, and a bad value of that is said so.
    let helpers = tempfile::tempdir().unwrap();
    let hung_pid = helpers.path().join("hung.pid");
    for (name, script) in [
        (
            "good",
            "cat >/dev/null\necho '{\"Username\":\"team\",\"Secret\":\"pa55\"}'".to_owned(),
        ),
        ("hang", format!("echo $$ > {}\nexec sleep 60", hung_pid.display())),
    ] {
        let path = helpers.path().join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        helpers.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let pull = |helper: &str, timeout: &str| {
        let docker = tempfile::tempdir().unwrap();
        std::fs::write(
            docker.path().join("config.json"),
            format!(r#"{{"credsStore":"{helper}"}}"#),
        )
        .unwrap();
        let fresh = tempfile::tempdir().unwrap();
        bin(fresh.path())
            .env("DOCKER_CONFIG", docker.path())
            .env("PATH", &path)
            .env("MSRWASM_REGISTRY_TIMEOUT_S", timeout)
            .args(["pull", &reference, "-o"])
            .arg(fresh.path().join("p.wasm"))
            .output()
            .unwrap()
    };
    let o = pull("good", "30");
    assert!(o.status.success(), "{}", text(&o));
    let o = pull("hang", "2");
    if let Ok(pid) = std::fs::read_to_string(&hung_pid) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("private/rapl:v1: the Docker credential helper did not answer within 2 s"),
        "{}",
        text(&o)
    );
    let o = pull("good", "0");
    assert!(
        o.status.code() == Some(2)
            && text(&o).contains("MSRWASM_REGISTRY_TIMEOUT_S = \"0\": give whole seconds, 1 to 3600"),
        "{}",
        text(&o)
    );
}

#[test]
fn remote_registries_are_spoken_to_over_https_only() {
    let cache = tempfile::tempdir().unwrap();
    // Not a loopback name (0.0.0.0 refuses at once here): what matters is
    // the scheme tried.
    let o = bin(cache.path())
        .args(["pull", "oci://0.0.0.0:1/team/rapl:v1"])
        .env("MSRWASM_LOG", "debug")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("https://0.0.0.0:1/"), "{t}");
    assert!(!t.contains("http://0.0.0.0"), "{t}");
}

/// A registry off loopback with a private CA's certificate: refused until
/// `MSRWASM_REGISTRY_CA` names the CA, then push and pull work (the
/// manifest GET msrwasm makes itself and oci-client's requests alike).
#[test]
fn a_private_registry_ca_is_trusted_through_msrwasm_registry_ca() {
    let registry = Registry::start_tls();
    let ca = registry.ca.clone().unwrap();
    let reference = registry.reference("team/rapl:v1");
    let cache = tempfile::tempdir().unwrap();
    let o = bin(cache.path())
        .arg("push")
        .arg(rapl())
        .arg(&reference)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("certificate"), "{}", text(&o));
    let o = bin(cache.path())
        .arg("push")
        .arg(rapl())
        .arg(&reference)
        .env("MSRWASM_REGISTRY_CA", &ca)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for (trusted, cache) in [
        (false, tempfile::tempdir().unwrap()),
        (true, tempfile::tempdir().unwrap()),
    ] {
        let mut pull = bin(cache.path());
        pull.args(["pull", &reference, "-o"]).arg(cache.path().join("p.wasm"));
        if trusted {
            pull.env("MSRWASM_REGISTRY_CA", &ca);
        }
        let o = pull.output().unwrap();
        match trusted {
            true => assert!(o.status.success() && text(&o).contains("sha256:"), "{}", text(&o)),
            false => assert!(
                o.status.code() == Some(2) && text(&o).contains("certificate"),
                "{}",
                text(&o)
            ),
        }
    }
}

#[test]
fn run_takes_an_oci_plugin() {
    if !common::kvm_available() {
        return;
    }
    let registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let reference = registry.reference("platform/rapl:1.0.0");
    let o = bin(cache.path())
        .arg("push")
        .arg(rapl())
        .arg(&reference)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let guests = tempfile::tempdir().unwrap();
    let o = bin(cache.path()).arg("guests").arg(guests.path()).output().unwrap();
    assert!(o.status.success());
    let o = bin(cache.path())
        .args(["run", "--unhandled", "ignore", "--plugin", &reference])
        .arg(guests.path().join("msr_loop.elf"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("plugin rapl:"), "{}", text(&o));
}
