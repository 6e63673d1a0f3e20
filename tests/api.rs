//! The control API of a running VM (`run --api-sock`), on real KVM: what it
//! answers, what it refuses, and that it never disturbs the vCPUs.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use msrwasm::PolicySpec;
use msrwasm::tools::request;
use msrwasm_cli::runner::{Vm, VmConfig, VmEnd};
use msrwasm_tests::{answering, guest, kvm_available, wait_until};

struct Api {
    dir: tempfile::TempDir,
    sock: PathBuf,
    stop: msrwasm_cli::runner::StopHandle,
    engine: msrwasm::Engine,
    thread: std::thread::JoinHandle<msrwasm_cli::runner::VmReport>,
    trace: PathBuf,
}

/// A 2-vCPU VM on the endless MSR guest, its plugin answering 1, with the
/// API, a trace and a footprint.
fn start_with_api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    for v in [1, 2] {
        std::fs::write(dir.path().join(format!("v{v}.wasm")), answering(v)).unwrap();
    }
    let manifest = dir.path().join("vm.toml");
    std::fs::write(&manifest, "[[plugin]]\nname = \"p\"\npath = \"v1.wasm\"\n").unwrap();
    let sock = dir.path().join("api.sock");
    let trace = dir.path().join("trace.jsonl");
    let mut config = VmConfig::new(guest("msr_forever.elf"), PolicySpec::from_manifest(&manifest).unwrap());
    config.vcpus = 2;
    config.watch = true;
    config.api_sock = Some(sock.clone());
    config.trace = Some(trace.clone());
    config.footprint = Some(dir.path().join("footprint.json"));
    config.serial = Box::new(std::io::sink());
    let vm = Vm::new(config).unwrap();
    let (stop, engine) = (vm.stop_handle(), vm.engine().clone());
    let thread = std::thread::spawn(move || vm.run().unwrap());
    wait_until("the API answers", || {
        sock.exists() && request(&sock, "GET", "/v1/status", None).is_ok()
    });
    Api {
        dir,
        sock,
        stop,
        engine,
        thread,
        trace,
    }
}

fn get(sock: &Path, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = request(sock, "GET", path, None).unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

#[test]
fn status_policy_reload_state_footprint_and_metrics() {
    if !kvm_available() {
        return;
    }
    let api = start_with_api();
    let sock = &api.sock;
    let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the owner may connect");

    let (code, s) = get(sock, "/v1/status");
    assert_eq!(code, 200);
    assert_eq!(
        (s["generation"].as_u64(), s["vcpus"].as_u64(), s["unhandled"].as_str()),
        (Some(1), Some(2), Some("gp"))
    );
    assert_eq!(s["plugins"][0]["name"], "p");
    assert_eq!(s["plugins"][0]["flavour"], "core");

    // A new policy through the API; relative paths resolve against the
    // directory of the manifest the VM started with.
    let (code, body) = request(
        sock,
        "PUT",
        "/v1/policy",
        Some(b"[[plugin]]\nname = \"p\"\npath = \"v2.wasm\"\n".to_vec()),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let scope = api.engine.state().scope("p");
    wait_until("version 2 answers", || scope.get(1) == 2);
    // A later change of the manifest file the VM started with does not undo it.
    msrwasm_tests::atomic_write(
        &api.dir.path().join("vm.toml"),
        b"[[plugin]]\nname = \"p\"\npath = \"v1.wasm\"\nmsrs = []\n",
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(scope.get(1), 2, "the API-set policy stays");
    let (code, body) = request(
        sock,
        "PUT",
        "/v1/policy",
        Some(b"[[plugin]]\nname = \"p\"\npath = \"nope.wasm\"\n".to_vec()),
    )
    .unwrap();
    assert_eq!(code, 400);
    let refused: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(refused["errors"][0].as_str().unwrap().contains("nope.wasm"), "{body}");

    assert_eq!(request(sock, "POST", "/v1/reload", None).unwrap().0, 200);

    // State: export, then import changed values.
    let (code, state) = get(sock, "/v1/state");
    assert_eq!((code, state["p"]["1"].as_str()), (200, Some("2")));
    // A store for a plugin the VM does not run is refused, naming it, and
    // nothing of the request is restored.
    let (code, body) = request(
        sock,
        "PUT",
        "/v1/state",
        Some(br#"{"p": {"7": "-5"}, "other": {"1": "9"}}"#.to_vec()),
    )
    .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("no plugin named `other`"), "{body}");
    let (_, state) = get(sock, "/v1/state");
    assert_eq!((state["p"].get("7"), state.get("other")), (None, None));
    let (code, _) = request(sock, "PUT", "/v1/state", Some(br#"{"p": {"7": "-5"}}"#.to_vec())).unwrap();
    assert_eq!(code, 200);
    let (_, state) = get(sock, "/v1/state");
    assert_eq!(state["p"]["7"].as_str(), Some("-5"));
    assert_eq!(
        request(sock, "PUT", "/v1/state", Some(b"{\"p\": {\"x\": 1}}".to_vec()))
            .unwrap()
            .0,
        400
    );

    let (code, footprint) = get(sock, "/v1/footprint");
    assert_eq!(code, 200);
    assert_eq!(footprint[0]["index"], "0x4d530020");
    assert_eq!(footprint[0]["vcpus"], serde_json::json!([0, 1]));

    let (code, metrics) = request(sock, "GET", "/metrics", None).unwrap();
    assert_eq!(code, 200);
    parse_metrics(&metrics);

    for (method, path, want) in [
        ("GET", "/nothing", 404),
        ("DELETE", "/v1/status", 405),
        ("GET", "/v1/policy", 405),
    ] {
        assert_eq!(request(sock, method, path, None).unwrap().0, want, "{method} {path}");
    }
    api.stop.stop();
    let report = api.thread.join().unwrap();
    assert_eq!(report.end, VmEnd::Signal(15));
    assert!(!api.sock.exists(), "the socket is removed at the end");
    assert!(matches!(report.footprint, Some(Ok(_))), "{:?}", report.footprint);
}

/// `/metrics` must parse with the standard Python parsers (Prometheus text
/// and OpenMetrics) and carry the metrics the API documents.
fn parse_metrics(text: &str) {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
text = sys.stdin.read()
names = {f.name for f in text_string_to_metric_families(text)}
om_names = {f.name for f in om(text)}
want = {"msrwasm_msr_accesses", "msrwasm_plugin_calls", "msrwasm_plugin_errors", "msrwasm_plugin_quarantines",
        "msrwasm_plugin_call_seconds", "msrwasm_reloads", "msrwasm_policy_generation"}
missing = (want - names) | (want - om_names)
assert not missing, missing
print("ok")
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Python Prometheus parsers refused /metrics (tests/setup.sh installs prometheus-client):\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Raw bytes to the socket, the answer (until the server closes).
fn raw(sock: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server may answer (413) and close before taking the whole body:
    // a broken pipe here is expected, the answer is still readable.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn oversized_malformed_and_slow_requests_get_errors_and_block_nobody() {
    if !kvm_available() {
        return;
    }
    let api = start_with_api();
    let sock = api.sock.clone();
    // Too large.
    let body = vec![b'a'; 2 << 20];
    let mut req = format!(
        "PUT /v1/policy HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    assert!(raw(&sock, &req).starts_with("HTTP/1.1 413"));
    // Not HTTP at all.
    let answer = raw(&sock, b"\x00\x01garbage\r\n\r\n");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // Not TOML, not JSON.
    assert_eq!(
        request(&sock, "PUT", "/v1/policy", Some(vec![0xff, 0xfe])).unwrap().0,
        400
    );
    assert_eq!(
        request(&sock, "PUT", "/v1/state", Some(b"[1,2".to_vec())).unwrap().0,
        400
    );
    // A client that never finishes its headers, and one that never sends
    // the body it announced: others are served meanwhile, and both get cut.
    let mut slow_headers = UnixStream::connect(&sock).unwrap();
    slow_headers.write_all(b"GET /v1/sta").unwrap();
    let mut slow_body = UnixStream::connect(&sock).unwrap();
    slow_body
        .write_all(b"PUT /v1/policy HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .unwrap();
    for _ in 0..20 {
        assert_eq!(get(&sock, "/v1/status").0, 200);
    }
    slow_body.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = String::new();
    let _ = slow_body.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    slow_headers.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    let n = slow_headers.read_to_end(&mut rest).unwrap_or(0);
    let _ = n;
    // Connections over the limit, silent ones included, are answered 503
    // at once and closed; once the silent ones are cut, clients are served.
    let silent: Vec<UnixStream> = (0..msrwasm::api::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let answer = raw(&sock, b"");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("too many connections"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once, not after a timeout"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while request(&sock, "GET", "/v1/status", None).map(|r| r.0).unwrap_or(0) != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the silent connections were never cut"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(silent);
    api.stop.stop();
    assert_eq!(api.thread.join().unwrap().end, VmEnd::Signal(15));
}

/// A plugin whose `init` spins `ms` milliseconds (by `msr.now_ns`) and
/// that answers 3: a policy change to it takes a while.
fn slow_init(ms: u64) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
          (import "msr" "reply" (func $reply (param i64)))
          (import "msr" "now_ns" (func $now (result i64)))
          (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
          (func (export "init") (result i32) (local $end i64)
            (local.set $end (i64.add (call $now) (i64.const {ns})))
            (block $done (loop $spin
              (br_if $done (i64.ge_s (call $now) (local.get $end)))
              (br $spin)))
            (i32.const 0))
          (func (export "rdmsr") (param i32) (result i32)
            (call $reply (i64.const 3))
            (i32.const 0)))"#,
        ns = ms * 1_000_000
    ))
    .unwrap()
}

/// A complete `PUT /v1/policy` request.
fn put_policy(manifest: &str) -> Vec<u8> {
    format!(
        "PUT /v1/policy HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{manifest}",
        manifest.len()
    )
    .into_bytes()
}

/// Policy changes queued without bound on the blocking pool and ran even
/// after their clients had hung up: 100 abandoned PUTs kept the operator's
/// PUT unanswered for minutes. Now one change runs, MAX_WAITING_CHANGES
/// wait, more get 503 at once, and a waiting change whose client hung up
/// is dropped, never applied.
#[test]
fn policy_changes_queue_boundedly_and_abandoned_ones_never_apply() {
    if !kvm_available() {
        return;
    }
    let api = start_with_api();
    let sock = api.sock.clone();
    std::fs::write(api.dir.path().join("slow.wasm"), slow_init(400)).unwrap();
    // Each a new version (its config differs), so each runs `init` again.
    let slow = |n: u32| {
        format!(
            "[[plugin]]\nname = \"p\"\npath = \"slow.wasm\"\ninit_timeout_us = 10000000\n[plugin.config]\nn = {n}\n"
        )
    };
    let fast = "[[plugin]]\nname = \"p\"\npath = \"v2.wasm\"\n";
    let put = |manifest: String| {
        let sock = sock.clone();
        std::thread::spawn(move || request(&sock, "PUT", "/v1/policy", Some(manifest.into_bytes())).unwrap())
    };
    // How long a slow change takes here.
    let started = std::time::Instant::now();
    assert_eq!(put(slow(0)).join().unwrap().0, 200);
    let slow_change = started.elapsed();
    assert!(slow_change > Duration::from_millis(500), "{slow_change:?}");

    // One slow change runs; 100 more are sent and their clients hang up at
    // once; then the operator's change.
    let generation = api.engine.generation();
    let running = put(slow(1));
    std::thread::sleep(slow_change / 4);
    for n in 0..100 {
        let mut abandoned = UnixStream::connect(&sock).unwrap();
        let _ = abandoned.write_all(&put_policy(&slow(100 + n)));
    }
    // (Retried while the server still holds connections it has not yet
    // seen end: those get 503 at once.)
    let started = std::time::Instant::now();
    let (code, body) = loop {
        let answer = request(&sock, "PUT", "/v1/policy", Some(fast.as_bytes().to_vec()));
        match answer {
            Ok((503, _)) if started.elapsed() < slow_change + Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(answer) => break answer,
            Err(e) => panic!("the operator's change, after {:?}: {e}", started.elapsed()),
        }
    };
    let waited = started.elapsed();
    assert_eq!(code, 200, "{body}");
    assert!(
        waited < slow_change + Duration::from_secs(5),
        "the operator's change waited {waited:?} (one slow change takes {slow_change:?})"
    );
    assert_eq!(running.join().unwrap().0, 200);
    std::thread::sleep(slow_change + Duration::from_secs(1));
    assert_eq!(
        api.engine.generation(),
        generation + 2,
        "only the running change and the operator's were applied"
    );

    // The queue is bounded: with one change running and MAX_WAITING_CHANGES
    // waiting, another change (or a reload) is refused at once.
    let running = put(slow(2));
    std::thread::sleep(slow_change / 4);
    let waiting: Vec<_> = (0..msrwasm::api::MAX_WAITING_CHANGES as u32)
        .map(|n| {
            let waiting = put(slow(3 + n));
            std::thread::sleep(Duration::from_millis(50));
            waiting
        })
        .collect();
    let started = std::time::Instant::now();
    let (code, body) = request(&sock, "PUT", "/v1/policy", Some(fast.as_bytes().to_vec())).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("a policy change is in progress"), "{body}");
    let (code, body) = request(&sock, "POST", "/v1/reload", None).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
    assert_eq!(running.join().unwrap().0, 200);
    for w in waiting {
        let (code, body) = w.join().unwrap();
        assert_eq!(code, 200, "{body}");
    }
    api.stop.stop();
    assert_eq!(api.thread.join().unwrap().end, VmEnd::Signal(15));
}

/// A thousand requests (status, metrics, policy swaps) while two vCPUs run
/// at full exit rate: no exit lost, no wrong answer, and the trace agrees
/// with the counters.
#[test]
fn a_thousand_requests_while_two_vcpus_run_lose_nothing() {
    if !kvm_available() {
        return;
    }
    let api = start_with_api();
    let sock = api.sock.clone();
    let mut swaps = 0;
    for i in 0..1000 {
        let (code, _) = match i % 10 {
            0 => {
                swaps += 1;
                let v = 1 + swaps % 2;
                let manifest = format!("[[plugin]]\nname = \"p\"\npath = \"v{v}.wasm\"\n");
                request(&sock, "PUT", "/v1/policy", Some(manifest.into_bytes())).unwrap()
            }
            1..=4 => request(&sock, "GET", "/metrics", None).unwrap(),
            _ => request(&sock, "GET", "/v1/status", None).unwrap(),
        };
        assert_eq!(code, 200, "request {i}");
    }
    let generation = api.engine.generation();
    api.stop.stop();
    let report = api.thread.join().unwrap();
    assert_eq!(report.end, VmEnd::Signal(15));
    let trace = std::fs::read_to_string(&api.trace).unwrap();
    let records: Vec<msrwasm::tools::TraceRecord> = trace.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let t = report.trace.as_ref().unwrap();
    assert_eq!(t.dropped, 0, "the trace kept up");
    for vcpu in 0..2u32 {
        let traced = records.iter().filter(|r| r.vcpu == vcpu).count() as u64;
        assert_eq!(
            traced, report.exits[vcpu as usize].rdmsr,
            "vCPU {vcpu}: every exit traced once"
        );
        assert_eq!(
            traced, report.stats.vcpus[&vcpu].rdmsr,
            "vCPU {vcpu}: the counters agree"
        );
    }
    assert!(
        records
            .iter()
            .all(|r| r.outcome == "ok" && matches!(r.value.as_deref(), Some("0x1" | "0x2")))
    );
    assert!(generation >= 90, "most swaps went live: generation {generation}");
}
