//! Plugins from a real OCI registry (the CNCF distribution registry on
//! 127.0.0.1, started here) answering real guests: push then run, a moved
//! tag rolled out to a running VM, the registry down, wrong digests,
//! htpasswd authentication, truncated and corrupt blobs; and hostile fake
//! registries (huge manifest, silent and trickling peers, an oversized
//! layer, token realms and redirects to plain HTTP off loopback, 32 plugins
//! on a registry that never answers).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use msrwasm::PolicySpec;
use msrwasm::oci::OciError;
use msrwasm::oci::OciRef;
use msrwasm::oci::store::OciStore;
use msrwasm::oci::store::StoreOptions;
use msrwasm_tests::registry::{Registry, truncate_half};
use msrwasm_tests::{answering, guest, kvm_available, start_with, wait_until};

fn store(cache: &Path) -> Arc<OciStore> {
    Arc::new(OciStore::open(cache, StoreOptions::default()).unwrap())
}

fn oci_ref(text: &str) -> OciRef {
    OciRef::parse(text).unwrap()
}

fn push(store: &OciStore, reference: &str, value: u64) -> msrwasm::oci::store::Pushed {
    store
        .push(&answering(value), BTreeMap::new(), &oci_ref(reference))
        .unwrap_or_else(|e| panic!("{}", msrwasm::tools::error_chain(&e)))
}

/// The value the plugin version answering the guest last recorded.
fn live(state: &msrwasm::tools::StateStore, plugin: &str) -> Option<i64> {
    state.snapshot().get(plugin).and_then(|s| s.get(&1).copied())
}

/// The value of a traced access.
fn value(t: &msrwasm::tools::TraceRecord) -> Option<u64> {
    t.value.as_deref().and_then(msrwasm::tools::parse_number)
}

fn manifest(dir: &Path, body: &str) -> PolicySpec {
    let path = dir.join("vm.toml");
    std::fs::write(&path, body).unwrap();
    PolicySpec::from_manifest(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_pushed_plugin_runs_from_its_oci_reference() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let store = store(cache.path());
    let reference = registry.reference("team/answer:v1");
    let pushed = push(&store, &reference, 7);
    let dir = tempfile::tempdir().unwrap();
    let spec = manifest(
        dir.path(),
        &format!("[[plugin]]\nname = \"answer\"\npath = \"{reference}\"\n"),
    );
    let vm = start_with(&guest("msr_forever.elf"), 1, spec, |c| c.oci = Some(store.clone())).unwrap();
    wait_until("the pulled plugin answers", || live(&vm.state, "answer") == Some(7));
    let status = vm.engine.status();
    assert_eq!(
        status.plugins[0].version,
        pushed.layer_digest.trim_start_matches("sha256:")
    );
    let run = vm.finish();
    let other: Vec<_> = run
        .trace
        .iter()
        .filter(|t| t.plugin.as_deref() != Some("answer") || value(t) != Some(7))
        .collect();
    assert!(other.is_empty(), "{other:#?}");
    // By digest, too.
    let pinned = oci_ref(&reference).pinned(&pushed.manifest_digest).to_string();
    let spec = manifest(
        dir.path(),
        &format!("[[plugin]]\nname = \"answer\"\npath = \"{pinned}\"\n"),
    );
    let vm = start_with(&guest("msr_forever.elf"), 1, spec, |c| c.oci = Some(store.clone())).unwrap();
    wait_until("the pinned plugin answers", || live(&vm.state, "answer") == Some(7));
    vm.finish();
}

/// Pushing a new version to a followed tag reaches the running VM through
/// hot reload; a version that does not load never answers; the registry
/// failing leaves the running version serving. Prints the tag-move to
/// first-answer latency over 20 pushes (poll_s = 1).
#[test]
fn a_moved_tag_rolls_out_to_a_running_vm() {
    if !kvm_available() {
        return;
    }
    let mut registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let store = store(cache.path());
    let reference = registry.reference("team/rollout:stable");
    push(&store, &reference, 100);
    let dir = tempfile::tempdir().unwrap();
    let spec = manifest(
        dir.path(),
        &format!("[[plugin]]\nname = \"p\"\npath = \"{reference}\"\npull_policy = \"always\"\npoll_s = 1\n"),
    );
    let vm = start_with(&guest("msr_forever.elf"), 2, spec, |c| c.oci = Some(store.clone())).unwrap();
    wait_until("version 100 answers", || live(&vm.state, "p") == Some(100));
    let mut latencies = Vec::new();
    for v in 101..=120u64 {
        push(&store, &reference, v);
        let pushed = Instant::now();
        let deadline = pushed + Duration::from_secs(30);
        while live(&vm.state, "p") != Some(v as i64) {
            assert!(Instant::now() < deadline, "version {v} never answered");
            std::thread::sleep(Duration::from_millis(2));
        }
        latencies.push(pushed.elapsed());
    }
    latencies.sort();
    eprintln!(
        "tag move -> first answer by the new version over {} pushes (poll_s = 1): median {:?}, worst {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    // A version that does not load: refused, 120 keeps answering.
    let generation = vm.engine.generation();
    store
        .push(b"\0asm\x01\0\0\0", BTreeMap::new(), &oci_ref(&reference))
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(live(&vm.state, "p"), Some(120));
    assert_eq!(vm.engine.generation(), generation);
    // The registry goes away: 120 keeps answering.
    registry.stop();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(live(&vm.state, "p"), Some(120));
    // It comes back with a new version: followed again.
    registry.resume();
    push(&store, &reference, 121);
    wait_until("version 121 answers after the outage", || {
        live(&vm.state, "p") == Some(121)
    });
    let run = vm.finish();
    let answered: std::collections::BTreeSet<u64> = run.trace.iter().filter_map(value).collect();
    assert!(answered.iter().all(|v| (100..=121).contains(v)), "{answered:?}");
}

#[test]
fn with_the_registry_down_a_vm_starts_from_the_cache() {
    if !kvm_available() {
        return;
    }
    let mut registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let store = store(cache.path());
    let reference = registry.reference("team/cached:v1");
    push(&store, &reference, 5);
    // Fetched once (this host ran it before).
    store.pull(&oci_ref(&reference)).unwrap();
    registry.stop();
    let dir = tempfile::tempdir().unwrap();
    for policy in ["if-not-present", "always"] {
        let spec = manifest(
            dir.path(),
            &format!("[[plugin]]\nname = \"c\"\npath = \"{reference}\"\npull_policy = \"{policy}\"\n"),
        );
        let vm = start_with(&guest("msr_forever.elf"), 1, spec, |c| c.oci = Some(store.clone())).unwrap();
        wait_until("the cached plugin answers", || live(&vm.state, "c") == Some(5));
        vm.finish();
    }
    // Not in the cache and the registry is down: refused, named.
    let missing = registry.reference("team/never-pulled:v1");
    let spec = manifest(dir.path(), &format!("[[plugin]]\nname = \"m\"\npath = \"{missing}\"\n"));
    let e = start_with(&guest("msr_forever.elf"), 1, spec, |c| c.oci = Some(store.clone()))
        .err()
        .expect("refused");
    let e = msrwasm::tools::error_chain(&e);
    assert!(e.contains("plugin `m`") && e.contains(&missing), "{e}");
}

#[test]
fn a_wrong_digest_or_sha256_is_refused_and_named() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let store = store(cache.path());
    let reference = registry.reference("team/pinned:v1");
    let pushed = push(&store, &reference, 9);
    let dir = tempfile::tempdir().unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let pinned_wrong = format!("{reference}@{wrong}");
    let pinned_right_sha_wrong = format!("{reference}@{}", pushed.manifest_digest);
    for (path, extra, says) in [
        (&pinned_wrong, "", "manifest unknown"),
        (
            &pinned_right_sha_wrong,
            &format!("sha256 = \"{}\"\n", "1".repeat(64))[..],
            "plugin.sha256",
        ),
        (
            &reference,
            &format!("sha256 = \"{}\"\n", "1".repeat(64))[..],
            "plugin.sha256",
        ),
    ] {
        let spec = manifest(
            dir.path(),
            &format!("[[plugin]]\nname = \"w\"\npath = \"{path}\"\n{extra}"),
        );
        let e = start_with(&guest("msr_forever.elf"), 1, spec, |c| c.oci = Some(store.clone()))
            .err()
            .expect("refused");
        let e = msrwasm::tools::error_chain(&e);
        assert!(
            e.contains("plugin `w`") && e.contains(path.as_str()) && e.contains(says),
            "{e}"
        );
    }
    // A manifest whose digest differs from the pin (the registry serves
    // other content under the tag than the digest the user pinned): the
    // pin is what the client asks for, so the registry's answer must match.
    let by_tag_and_digest = format!("{reference}@{}", pushed.manifest_digest);
    push(&store, &reference, 10);
    let r = oci_ref(&by_tag_and_digest);
    // The digest wins over the tag: still version 9's manifest.
    let pulled = store.pull(&r).unwrap();
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
}

#[test]
fn an_htpasswd_registry_needs_the_credentials() {
    let registry = Registry::start(&[("ci", "s3cret")]);
    let cache = tempfile::tempdir().unwrap();
    let reference = oci_ref(&registry.reference("team/private:v1"));
    let anonymous = store(cache.path());
    let e = anonymous.push(&answering(1), BTreeMap::new(), &reference).unwrap_err();
    assert!(matches!(e, OciError::Registry { .. }), "{e:?}");
    let with = |user: &str, password: &str| {
        OciStore::open(
            cache.path(),
            StoreOptions {
                credentials: Some((user.into(), password.into())),
                ..StoreOptions::default()
            },
        )
        .unwrap()
    };
    assert!(
        with("ci", "wrong")
            .push(&answering(1), BTreeMap::new(), &reference)
            .is_err()
    );
    let good = with("ci", "s3cret");
    good.push(&answering(1), BTreeMap::new(), &reference).unwrap();
    assert!(good.pull(&reference).is_ok());
    assert!(anonymous.pull(&reference).is_err(), "anonymous pulls are refused too");
}

#[test]
fn truncated_blobs_never_answer_and_corrupt_cache_entries_are_fetched_again() {
    let registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let store = store(cache.path());
    let reference = registry.reference("team/truncated:v1");
    let pushed = push(&store, &reference, 3);
    // The registry's copy is cut short: refused, naming the layer.
    let blob = registry.blob_file(&pushed.layer_digest);
    let good = std::fs::read(&blob).unwrap();
    truncate_half(&blob);
    let e = store.pull(&oci_ref(&reference)).unwrap_err();
    assert!(
        matches!(&e, OciError::Digest { what, .. } if what.contains("wasm layer")),
        "{}",
        msrwasm::tools::error_chain(&e)
    );
    assert!(
        store.cached(&oci_ref(&reference)).is_none(),
        "nothing unverified is cached"
    );
    // Repaired: pulled and cached.
    std::fs::write(&blob, &good).unwrap();
    let pulled = store.pull(&oci_ref(&reference)).unwrap();
    assert!(store.cached(&oci_ref(&reference)).is_some());
    // The cached copy is corrupted: detected, removed, fetched again.
    std::fs::write(&pulled.blob, b"\0asm garbage").unwrap();
    assert!(store.cached(&oci_ref(&reference)).is_none());
    assert!(!pulled.blob.exists(), "the corrupt entry is removed");
    let fresh = OciStore::open(cache.path(), StoreOptions::default()).unwrap();
    let again = fresh.pull(&oci_ref(&reference)).unwrap();
    assert_eq!(std::fs::read(&again.blob).unwrap(), answering(3));
}

/// A followed tag moved to a manifest whose layer is corrupt in the
/// registry: the VM keeps the version it has; that content never answers.
#[test]
fn a_followed_tag_moved_to_a_corrupt_layer_changes_nothing() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let store = store(cache.path());
    let reference = registry.reference("team/follow:prod");
    push(&store, &reference, 1);
    let dir = tempfile::tempdir().unwrap();
    let spec = manifest(
        dir.path(),
        &format!("[[plugin]]\nname = \"f\"\npath = \"{reference}\"\npull_policy = \"always\"\npoll_s = 1\n"),
    );
    let vm = start_with(&guest("msr_forever.elf"), 1, spec, |c| c.oci = Some(store.clone())).unwrap();
    wait_until("version 1 answers", || live(&vm.state, "f") == Some(1));
    // Version 666 goes to another tag, its layer is damaged in storage,
    // then its manifest is put under the followed tag.
    let staging = registry.reference("team/follow:staging");
    let bad = push(&store, &staging, 666);
    truncate_half(&registry.blob_file(&bad.layer_digest));
    let (status, body) = registry
        .http(
            "GET",
            &format!("/v2/team/follow/manifests/{}", bad.manifest_digest),
            None,
            &[],
        )
        .unwrap();
    assert_eq!(status, 200);
    let (status, _) = registry
        .http(
            "PUT",
            "/v2/team/follow/manifests/prod",
            Some("application/vnd.oci.image.manifest.v1+json"),
            &body,
        )
        .unwrap();
    assert_eq!(status, 201);
    std::thread::sleep(Duration::from_millis(3000));
    let run = vm.finish();
    assert!(
        run.trace.iter().all(|t| value(t) == Some(1)),
        "only version 1 ever answered"
    );
}

/// What the hostile registry does.
#[derive(Clone, Copy, PartialEq)]
enum Hostile {
    /// A 5 MiB manifest.
    HugeManifest,
    /// A manifest of no stated length that never ends, as fast as it goes.
    Flood,
    /// Reads the request, then never answers.
    Silent,
    /// A 1000-byte manifest sent a byte every 100 ms.
    Trickle,
    /// A good manifest whose layer of 100 bytes arrives as 8 MiB.
    OversizedLayer,
}

/// A registry on 127.0.0.1 that misbehaves as told; returns its address.
fn hostile_registry(mode: Hostile) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let layer_digest = format!("sha256:{}", "a".repeat(64));
    let config = b"{}";
    let config_digest = format!("sha256:{}", msrwasm::tools::content_hash(config));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.wasm.config.v0+json","digest":"{config_digest}","size":2}},"layers":[{{"mediaType":"application/wasm","digest":"{layer_digest}","size":100}}]}}"#
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let manifest = manifest.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head += &line;
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let answer = |stream: &mut std::net::TcpStream, kind: &str, body: &[u8]| {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(head.as_bytes());
                        let _ = stream.write_all(body);
                    };
                    let manifest_type = "application/vnd.oci.image.manifest.v1+json";
                    match (mode, path.as_str()) {
                        (_, "/v2/") => answer(&mut stream, "application/json", b"{}"),
                        (Hostile::Silent, _) => {
                            std::thread::sleep(Duration::from_secs(600));
                            return;
                        }
                        (Hostile::HugeManifest, p) if p.contains("/manifests/") => {
                            let mut body = manifest.clone().into_bytes();
                            body.resize(5 << 20, b' ');
                            answer(&mut stream, manifest_type, &body);
                        }
                        (Hostile::Flood, p) if p.contains("/manifests/") => {
                            let _ = stream.write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: {manifest_type}\r\nConnection: close\r\n\r\n"
                                )
                                .as_bytes(),
                            );
                            let spaces = vec![b' '; 64 << 10];
                            while stream.write_all(&spaces).is_ok() {}
                            return;
                        }
                        (Hostile::Trickle, p) if p.contains("/manifests/") => {
                            let _ = stream.write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: {manifest_type}\r\nContent-Length: 1000\r\n\r\n"
                                )
                                .as_bytes(),
                            );
                            while stream.write_all(b" ").is_ok() {
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            return;
                        }
                        (_, p) if p.contains("/manifests/") => answer(&mut stream, manifest_type, manifest.as_bytes()),
                        (_, p) if p.contains("/blobs/") => {
                            answer(&mut stream, "application/octet-stream", &vec![0u8; 8 << 20])
                        }
                        _ => {
                            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                        }
                    }
                }
            });
        }
    });
    address
}

/// Registries are untrusted: a huge or endless manifest, a silent or trickling peer
/// and an oversized layer are refused or cut off by the deadline, and the
/// store stays usable.
#[test]
fn hostile_registries_are_refused_or_cut_off() {
    let cache = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        deadline: Duration::from_secs(4),
        read_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    let store = OciStore::open(cache.path(), options).unwrap();
    for (mode, says) in [
        (Hostile::HugeManifest, "5242880-byte manifest"),
        // Cut off at the limit, long before the deadline.
        (Hostile::Flood, "manifest of more than 4194304 bytes"),
        (Hostile::Silent, "operation timed out"),        // read_timeout
        (Hostile::Trickle, "did not answer within 4 s"), // the deadline
        (Hostile::OversizedLayer, "100 bytes"),
    ] {
        let reference = oci_ref(&format!("oci://{}/team/bad:v1", hostile_registry(mode)));
        let started = Instant::now();
        let e = store.pull(&reference).expect_err("refused");
        let e = msrwasm::tools::error_chain(&e);
        assert!(e.contains(says) && e.contains("team/bad:v1"), "{e}");
        // Bound, not benchmark: the deadline is 4 s.
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    }
    assert_eq!(
        std::fs::read_dir(cache.path().join("blobs/sha256")).map_or(0, |d| d.count()),
        0,
        "nothing refused was cached"
    );
}

/// A tiny HTTP/1.1 server on `bind` (port 0 there): answers each request
/// (one per connection) with what `answer(method, path, head)` returns, and
/// records every byte it receives. Returns its port and that record.
fn fake_http(
    bind: &str,
    answer: impl Fn(&str, &str, &str) -> Vec<u8> + Send + Sync + 'static,
) -> (u16, Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(bind).unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (answer, record) = (Arc::new(answer), received.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let (answer, record) = (answer.clone(), record.clone());
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then the body its Content-Length gives.
                let head_end = loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            record.lock().unwrap().extend_from_slice(&request);
                            return;
                        }
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                    if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&request[..head_end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                while request.len() < head_end + length {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                record.lock().unwrap().extend_from_slice(&request);
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let _ = stream.write_all(&answer(method, path, &head));
            });
        }
    });
    (port, received)
}

/// An HTTP answer (the connection is closed after it).
fn http_answer(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        out += &format!("{name}: {value}\r\n");
    }
    out += "\r\n";
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A name or address of this machine that the transport rule does not
/// count as loopback (only `localhost`, 127.0.0.0/8 and ::1 written out
/// are): an address of a non-loopback interface (found by routing a UDP
/// socket; nothing is sent), else the host name, when it resolves here.
/// `port` is a server bound to 0.0.0.0 that must be reachable through it.
fn off_loopback_host(port: u16) -> String {
    use std::net::ToSocketAddrs;
    let mut candidates = Vec::new();
    if let Ok(socket) = std::net::UdpSocket::bind("0.0.0.0:0")
        && socket.connect("192.0.2.1:9").is_ok()
        && let Ok(address) = socket.local_addr()
        && !address.ip().is_loopback()
        && !address.ip().is_unspecified()
    {
        candidates.push(address.ip().to_string());
    }
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        candidates.push(name.trim().to_owned());
    }
    candidates
        .into_iter()
        .filter(|host| !host.is_empty() && !oci_ref(&format!("oci://{host}/probe")).is_loopback())
        .find(|host| {
            (host.as_str(), port).to_socket_addrs().is_ok_and(|mut addresses| {
                addresses.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
            })
        })
        .expect("this machine has no address or name off loopback that reaches itself")
}

/// What the fake token-authenticated registry does.
struct Fake {
    /// The `realm` of its `Bearer` challenge.
    realm: String,
    /// Where a layer GET is redirected (`None`: served).
    blob_redirect: Option<String>,
    /// The `Location` of a blob upload.
    upload_location: String,
}

const FAKE_USER: &str = "ci";
const FAKE_PASSWORD: &str = "s3cret-Pa55";
const FAKE_TOKEN: &str = "tok-9f2c";

/// A registry on 127.0.0.1 that wants a token from the realm `fake` names
/// (for `Bearer tok-9f2c`), holding `team/x:v1` = `layer`. Returns its port.
fn token_registry(fake: Arc<std::sync::Mutex<Fake>>, layer: Vec<u8>) -> u16 {
    let layer_digest = format!("sha256:{}", msrwasm::tools::content_hash(&layer));
    let config_digest = format!("sha256:{}", msrwasm::tools::content_hash(b"{}"));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.wasm.config.v0+json","digest":"{config_digest}","size":2}},"layers":[{{"mediaType":"application/wasm","digest":"{layer_digest}","size":{}}}]}}"#,
        layer.len()
    );
    let (port, _) = fake_http("127.0.0.1:0", move |method, path, head| {
        let fake = fake.lock().unwrap();
        let authorized = head.contains(&format!("authorization: Bearer {FAKE_TOKEN}"))
            || head.contains(&format!("Authorization: Bearer {FAKE_TOKEN}"));
        let challenge = format!(r#"Bearer realm="{}",service="fake""#, fake.realm);
        let unauthorized = || http_answer("401 Unauthorized", &[("WWW-Authenticate", &challenge)], b"");
        match (method, path) {
            (_, "/v2/") => unauthorized(),
            _ if !authorized => unauthorized(),
            ("GET", p) if p.starts_with("/v2/team/x/manifests/") => http_answer(
                "200 OK",
                &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
                manifest.as_bytes(),
            ),
            ("GET", p) if p.starts_with("/v2/team/x/blobs/") => match &fake.blob_redirect {
                Some(to) => http_answer("307 Temporary Redirect", &[("Location", to)], b""),
                None => http_answer("200 OK", &[], &layer),
            },
            ("POST", "/v2/team/x/blobs/uploads/") => {
                http_answer("202 Accepted", &[("Location", &fake.upload_location)], b"")
            }
            _ => http_answer("404 Not Found", &[], b""),
        }
    });
    port
}

/// A token service on 0.0.0.0 (reachable by every address of this machine)
/// granting `tok-9f2c` to the fake login; records what it receives.
fn token_service() -> (u16, Arc<std::sync::Mutex<Vec<u8>>>) {
    fake_http("0.0.0.0:0", |_, _, head| {
        // base64("ci:s3cret-Pa55")
        match head.contains("Basic Y2k6czNjcmV0LVBhNTU=") {
            true => http_answer("200 OK", &[], format!(r#"{{"token":"{FAKE_TOKEN}"}}"#).as_bytes()),
            false => http_answer("401 Unauthorized", &[], b"{}"),
        }
    })
}

/// A store logging in as the fake registry's user (as
/// `MSRWASM_REGISTRY_USER`/`MSRWASM_REGISTRY_PASSWORD` do).
fn logged_in(cache: &Path) -> OciStore {
    OciStore::open(
        cache,
        StoreOptions {
            credentials: Some((FAKE_USER.into(), FAKE_PASSWORD.into())),
            deadline: Duration::from_secs(10),
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// Whether `bytes` hold the login or the token, in the clear or in base64.
fn holds_credentials(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    [FAKE_PASSWORD, "Y2k6czNjcmV0LVBhNTU=", FAKE_TOKEN, "uthorization"]
        .iter()
        .any(|secret| text.contains(secret))
}

/// Credentials travel only where docs/oci.md says: a loopback registry's
/// token realm gets the login over plain HTTP when it is on loopback too;
/// one on plain HTTP off loopback (here an address or name of this machine
/// that is not written as loopback) is refused and receives nothing, and
/// so is a blob redirect or an upload location there. A redirect to
/// another (loopback) host is followed without the `Authorization` header.
#[test]
fn credentials_and_redirects_never_go_to_plain_http_off_loopback() {
    let layer = answering(4);
    let (token_port, token_log) = token_service();
    let (cdn_port, cdn_log) = fake_http("0.0.0.0:0", {
        let layer = layer.clone();
        move |_, _, _| http_answer("200 OK", &[], &layer)
    });
    let off = off_loopback_host(token_port);
    eprintln!("off loopback: {off}");
    let fake = Arc::new(std::sync::Mutex::new(Fake {
        realm: format!("http://127.0.0.1:{token_port}/token"),
        blob_redirect: None,
        upload_location: format!("http://127.0.0.1:{cdn_port}/upload"),
    }));
    let registry = token_registry(fake.clone(), layer.clone());
    let reference = oci_ref(&format!("oci://127.0.0.1:{registry}/team/x:v1"));
    let taken = |log: &Arc<std::sync::Mutex<Vec<u8>>>| std::mem::take(&mut *log.lock().unwrap());

    // A loopback realm of a loopback registry: the login goes there, the
    // token to the registry.
    let cache = tempfile::tempdir().unwrap();
    let pulled = logged_in(cache.path())
        .pull(&reference)
        .unwrap_or_else(|e| panic!("{}", msrwasm::tools::error_chain(&e)));
    assert_eq!(std::fs::read(&pulled.blob).unwrap(), layer);
    let seen = String::from_utf8_lossy(&taken(&token_log)).into_owned();
    assert!(
        seen.contains("Basic Y2k6czNjcmV0LVBhNTU=") && seen.contains("scope=repository%3Ateam%2Fx%3Apull"),
        "{seen}"
    );

    // The realm on plain HTTP off loopback: refused before anything is
    // sent there (oci-client sent the login there as Basic auth).
    fake.lock().unwrap().realm = format!("http://{off}:{token_port}/token");
    let cache = tempfile::tempdir().unwrap();
    let e = logged_in(cache.path()).pull(&reference).expect_err("refused");
    let e = msrwasm::tools::error_chain(&e);
    assert!(
        e.contains("the token realm") && e.contains("plain HTTP") && e.contains("team/x:v1"),
        "{e}"
    );
    let seen = taken(&token_log);
    assert!(
        seen.is_empty(),
        "the realm off loopback received {:?}",
        String::from_utf8_lossy(&seen)
    );
    // Pushing too.
    let e = logged_in(cache.path())
        .push(&answering(5), BTreeMap::new(), &reference)
        .expect_err("refused");
    assert!(msrwasm::tools::error_chain(&e).contains("the token realm"), "{e}");
    assert!(taken(&token_log).is_empty());
    fake.lock().unwrap().realm = format!("http://127.0.0.1:{token_port}/token");

    // The layer redirected to another loopback host: followed, without the
    // registry's credentials.
    fake.lock().unwrap().blob_redirect = Some(format!("http://127.0.0.2:{cdn_port}/blob"));
    let cache = tempfile::tempdir().unwrap();
    let pulled = logged_in(cache.path())
        .pull(&reference)
        .unwrap_or_else(|e| panic!("{}", msrwasm::tools::error_chain(&e)));
    assert_eq!(std::fs::read(&pulled.blob).unwrap(), layer);
    let seen = taken(&cdn_log);
    assert!(
        seen.starts_with(b"GET /blob ") && !holds_credentials(&seen),
        "{}",
        String::from_utf8_lossy(&seen)
    );

    // Redirected to plain HTTP off loopback: refused, nothing sent there
    // (oci-client followed it).
    fake.lock().unwrap().blob_redirect = Some(format!("http://{off}:{cdn_port}/blob"));
    let cache = tempfile::tempdir().unwrap();
    let e = logged_in(cache.path()).pull(&reference).expect_err("refused");
    let e = msrwasm::tools::error_chain(&e);
    assert!(e.contains("a redirect to") && e.contains("plain HTTP"), "{e}");
    let seen = taken(&cdn_log);
    assert!(
        seen.is_empty(),
        "the redirect target received {:?}",
        String::from_utf8_lossy(&seen)
    );

    // An upload location on plain HTTP off loopback: refused, the layer is
    // not sent there (oci-client sent it).
    fake.lock().unwrap().upload_location = format!("http://{off}:{cdn_port}/upload");
    let e = logged_in(cache.path())
        .push(&answering(6), BTreeMap::new(), &reference)
        .expect_err("refused");
    let e = msrwasm::tools::error_chain(&e);
    assert!(e.contains("the upload location") && e.contains("plain HTTP"), "{e}");
    let seen = taken(&cdn_log);
    assert!(
        seen.is_empty(),
        "the upload location received {:?}",
        String::from_utf8_lossy(&seen)
    );
}

/// The `oci://` plugins of one policy load are fetched together under one
/// deadline: 32 of them on a registry that accepts connections and never
/// answers fail the load in about one deadline (2 s here), not 32 in a row
/// (64 s; 64 minutes at the default 120 s). All are asked at once.
#[test]
fn thirty_two_plugins_on_a_silent_registry_cost_one_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    std::thread::spawn({
        let accepted = accepted.clone();
        move || {
            for stream in listener.incoming().flatten() {
                accepted.lock().unwrap().push(stream); // held open, never answered
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let plugins: String = (0..32)
        .map(|i| format!("[[plugin]]\nname = \"p{i}\"\npath = \"oci://127.0.0.1:{port}/team/p{i}:v1\"\n"))
        .collect();
    let spec = manifest(dir.path(), &plugins);
    let cache = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(2);
    let store = OciStore::open(
        cache.path(),
        StoreOptions {
            deadline,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let e = msrwasm::Engine::builder()
        .oci(Arc::new(store))
        .build(spec)
        .expect_err("refused");
    let took = started.elapsed();
    let e = msrwasm::tools::error_chain(&e);
    assert!(e.contains("did not answer within 2 s"), "{e}");
    eprintln!("32 oci:// plugins on a silent registry, 2 s deadline: the load failed after {took:?}");
    // A bound, not a benchmark: one deadline plus slack, not 32.
    assert!(took < deadline * 4, "{took:?}");
    let connections = accepted.lock().unwrap().len();
    assert!(
        (1..=msrwasm::oci::MAX_PARALLEL_FETCHES).contains(&connections),
        "{connections} connections"
    );
}

/// A CPU template carried by a plugin (`policy import-template --plugin`):
/// moving its tag rolls the revised template out to a running VM, whose
/// next reads get the new bits.
#[test]
fn a_moved_tag_rolls_a_revised_cpu_template_out() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::start(&[]);
    let cache = tempfile::tempdir().unwrap();
    let store = store(cache.path());
    let reference = registry.reference("fleet/template:stable");
    // A bit KVM offers in IA32_ARCH_CAPABILITIES, forced to 0, then to 1.
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: 0x10a,
        ..Default::default()
    }])
    .unwrap();
    kvm.get_msrs(&mut msrs).unwrap();
    let bit = msrs.as_slice()[0].data.trailing_zeros();
    assert!(bit < 64, "KVM offers no ARCH_CAPABILITIES bit");
    let version = |forced: char| {
        let mut bits = vec!['x'; 64];
        bits[63 - bit as usize] = forced;
        let t = msrwasm::MsrTemplate::parse(0x10a, &format!("0b{}", bits.iter().collect::<String>())).unwrap();
        let wat = msrwasm_cli::profile::templates_plugin(&[t], "template", "test");
        store
            .push(&wat::parse_str(&wat).unwrap(), BTreeMap::new(), &oci_ref(&reference))
            .unwrap();
        t
    };
    let v1 = version('0');
    let dir = tempfile::tempdir().unwrap();
    let spec = manifest(
        dir.path(),
        &format!(
            "[[plugin]]\nname = \"template\"\npath = \"{reference}\"\npull_policy = \"always\"\npoll_s = 1\nmsrs = []\ngrants = [\"templates\"]\n"
        ),
    );
    let vm = start_with(&guest("template_forever.elf"), 1, spec, |c| c.oci = Some(store.clone())).unwrap();
    let generation = vm.engine.generation();
    std::thread::sleep(Duration::from_millis(200));
    let v2 = version('1');
    wait_until("the revised template is in force", || {
        vm.engine.generation() > generation
    });
    std::thread::sleep(Duration::from_millis(300));
    let run = vm.finish();
    let reads: Vec<u64> = run
        .trace
        .iter()
        .filter(|t| t.by == "template")
        .filter_map(value)
        .collect();
    assert!(reads.len() > 10, "{}", reads.len());
    let (first, last) = (reads[0], reads[reads.len() - 1]);
    assert_eq!(first >> bit & 1, 0, "{first:#x}");
    assert_eq!(last >> bit & 1, 1, "{last:#x}");
    assert_eq!(v1.apply(first), first);
    assert_eq!(v2.apply(last), last);
}
