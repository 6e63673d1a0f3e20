//! What an operator's tools see of a running `msrwasm run`: JSON log lines
//! a collector parses, the read-only metrics endpoint, and `msrwasm ctl
//! top` in a real terminal (tmux). The real Prometheus server is in
//! `tests/monitoring.rs`.

#[path = "../../../tests/support/common.rs"]
mod common;
use common::{kvm_available, tool_available};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_msrwasm")
}

/// The built-in guests, written by `msrwasm guests`.
fn guests(dir: &Path) -> PathBuf {
    let out = dir.join("guests");
    let o = Command::new(bin()).arg("guests").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A plugin that answers every read with 7 and logs every call.
const LOGGER: &str = r#"(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hello \"collector\"")
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param i32) (result i32)
    (call $log (i32.const 1) (i32.const 0) (i32.const 17))
    (call $reply (i64.const 7))
    (i32.const 0)))"#;

/// A temporary directory with the built-in guests and `plugin` (WAT) as
/// `p.wat`.
fn setup(plugin: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let guests = guests(dir.path());
    let path = dir.path().join("p.wat");
    std::fs::write(&path, plugin).unwrap();
    (dir, guests, path)
}

/// The logger without its log call.
fn quiet() -> String {
    LOGGER.replace("(call $log (i32.const 1) (i32.const 0) (i32.const 17))", "")
}

/// A VM that stops when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SIGTERM: the VM ends cleanly and removes what it announced.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every log line is one JSON object a collector can parse, naming the VM,
/// the event, and the plugin and its version where one is involved.
#[test]
fn json_log_lines_name_the_vm_the_event_and_the_plugin() {
    if !kvm_available() {
        return;
    }
    let (_dir, guests, plugin) = setup(LOGGER);
    let o = Command::new(bin())
        .args([
            "run",
            "--name",
            "web-1",
            "--log-format",
            "json",
            "--log",
            "info",
            "--no-watch",
            "--plugin",
        ])
        .arg(&plugin)
        .arg(guests.join("msr_loop.elf"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let mut plugin_lines = 0;
    let mut dropped_notes = 0;
    let mut summary = Vec::new();
    for line in err.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["time", "level", "vm", "event", "message"] {
            assert!(v.get(key).is_some(), "no `{key}` in {line}");
        }
        assert_eq!(v["vm"], "web-1", "{line}");
        match v["event"].as_str() {
            Some("plugin_log") => {
                plugin_lines += 1;
                assert_eq!(
                    (v["plugin"].as_str(), v["level"].as_str()),
                    (Some("p"), Some("WARN")),
                    "{line}"
                );
                assert_eq!(v["version"].as_str().map(str::len), Some(16), "{line}");
                assert_eq!(v["message"], "plugin says: hello \"collector\"", "{line}");
            }
            Some("plugin_log_dropped") => dropped_notes += 1,
            Some("msrwasm") => summary.push(v["message"].as_str().unwrap_or_default().to_owned()),
            _ => {}
        }
    }
    // The command's own lines (the summary) are JSON too.
    assert!(
        summary.iter().any(|l| l.starts_with("msrwasm: all vCPUs halted")),
        "{summary:#?}"
    );
    // 50,000 calls, rate-limited to 20 lines per second per instance.
    assert!((1..=40).contains(&plugin_lines), "{plugin_lines} plugin lines:\n{err}");
    assert!(dropped_notes <= 2, "{err}");
}

/// A tiny HTTP/1.0 exchange, bounded in time.
fn http(addr: &str, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The metrics endpoint serves `GET /metrics` and nothing else.
#[test]
fn the_metrics_endpoint_is_read_only_and_announced() {
    if !kvm_available() {
        return;
    }
    let (dir, guests, plugin) = setup(&quiet());
    let sd = dir.path().join("sd");
    std::fs::create_dir(&sd).unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--name", "db-2", "--metrics-addr", "0", "--metrics-sd-dir"])
        .arg(&sd)
        .arg("--plugin")
        .arg(&plugin)
        .arg(guests.join("msr_forever.elf"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let vm = Running(child);
    let entry = sd.join("msrwasm-db-2.json");
    wait_for("the discovery entry", Duration::from_secs(30), || entry.exists());
    let text = std::fs::read_to_string(&entry).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v[0]["labels"]["vm"], "db-2");
    let addr = v[0]["targets"][0].as_str().unwrap().to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let metrics = http(&addr, "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(
        metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"),
        "{metrics}"
    );
    assert!(
        metrics.contains("msrwasm_msr_accesses_total{op=\"rdmsr\",answered_by=\"plugin\"}"),
        "{metrics}"
    );
    for (request, status) in [
        ("GET /v1/status HTTP/1.0\r\n\r\n", "404"),
        ("PUT /v1/policy HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}", "404"),
        ("POST /metrics HTTP/1.0\r\n\r\n", "405"),
    ] {
        let answer = http(&addr, request);
        assert!(
            answer.lines().next().is_some_and(|l| l.contains(status)),
            "{request:?}: {answer}"
        );
    }

    drop(vm);
    assert!(!entry.exists(), "the entry is removed when the VM ends");
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    assert!(
        err.contains(&format!("msrwasm: metrics of VM db-2 at http://{addr}/metrics")),
        "{err}"
    );
}

/// A VM name that is not a safe file name and label value is refused.
#[test]
fn bad_names_and_addresses_are_refused() {
    for (args, needle) in [
        (vec!["run", "--name", "../x", "g.elf"], "a VM name is"),
        (
            vec!["run", "--metrics-addr", "localhost:x", "g.elf"],
            "neither a port nor",
        ),
        (vec!["run", "--metrics-sd-dir", "/tmp", "g.elf"], "--metrics-addr"),
        (
            vec!["ctl", "--api-sock", "/x", "top", "--interval", "0"],
            "between 0.1 and 60",
        ),
    ] {
        let o = Command::new(bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

fn tmux(socket: &str, args: &[&str]) -> String {
    let o = Command::new("tmux").args(["-L", socket]).args(args).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `msrwasm ctl top` in a real terminal: it draws, refreshes, sorts on a
/// key and quits on another.
#[test]
fn top_runs_in_a_real_terminal() {
    if !kvm_available() {
        return;
    }
    if !tool_available("tmux") {
        return;
    }
    let (dir, guests, plugin) = setup(&quiet());
    let sock = dir.path().join("vm.sock");
    let _vm = Running(
        Command::new(bin())
            .args(["run", "--vcpus", "2", "--api-sock"])
            .arg(&sock)
            .arg("--plugin")
            .arg(&plugin)
            .arg(guests.join("msr_forever.elf"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the API socket", Duration::from_secs(30), || sock.exists());
    let server = format!("msrwasm-top-{}", std::process::id());
    let command = format!(
        "{} ctl --api-sock {} top --interval 0.2; echo TOP-ENDED; sleep 30",
        bin(),
        sock.display()
    );
    tmux(&server, &["new-session", "-d", "-x", "160", "-y", "40", &command]);
    let capture = || tmux(&server, &["capture-pane", "-p"]);
    let result = std::panic::catch_unwind(|| {
        wait_for("the first frame with a rate", Duration::from_secs(20), || {
            let screen = capture();
            screen.contains("0x4d530020") && screen.contains("plugin:p 100%") && screen.contains("sorted by rate")
        });
        let rate = |screen: &str| -> f64 {
            screen
                .lines()
                .find(|l| l.starts_with("rdmsr") && l.contains("0x4d530020"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|r| r.parse().ok())
                .unwrap_or(0.0)
        };
        // The first frame has no rate yet; the next ones do.
        wait_for("a rate", Duration::from_secs(10), || rate(&capture()) > 0.0);
        let screen = capture();
        assert!(screen.contains("PLUGIN") && screen.contains("vCPUs 2"), "{screen}");
        tmux(&server, &["send-keys", "i"]);
        wait_for("sorting by index", Duration::from_secs(10), || {
            capture().contains("sorted by index")
        });
        tmux(&server, &["send-keys", "q"]);
        wait_for("top to quit", Duration::from_secs(10), || {
            capture().contains("TOP-ENDED")
        });
    });
    tmux(&server, &["kill-server"]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
