//! Plugins from a real OCI registry (the CNCF distribution registry on
//! 127.0.0.1, started here) answering real guests: push then run, a moved
//! tag rolled out to a running VM, the registry down, wrong digests,
//! htpasswd authentication, truncated and corrupt blobs; and a hostile
//! fake registry (huge manifest, silent and trickling peers, an oversized
//! layer).

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
