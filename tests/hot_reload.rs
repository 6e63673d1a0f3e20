//! Hot reload on a running VM: real files, real notify, real KVM.

use std::collections::HashSet;
use std::io::Write;

use msrwasm::PolicySpec;
use msrwasm::tools::content_hash;
use msrwasm_cli::runner::VmEnd;
use msrwasm_tests::{
    LivePlugin, answering as version, atomic_write, guest, kvm_available, live_plugin, quick, start, wait_until,
};

fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("test WAT")
}

#[test]
fn atomic_rename_and_in_place_rewrite_take_over_cleanly() {
    if !kvm_available() {
        return;
    }
    let LivePlugin {
        dir: _dir,
        plugin,
        vm,
        scope,
    } = live_plugin();

    atomic_write(&plugin, &version(2));
    wait_until("version 2 answers", || scope.get(1) == 2);

    // In place: truncate, then write in two steps with a pause, as a slow
    // compiler would. The half-written file must never serve.
    let v3 = version(3);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&plugin)
        .unwrap();
    f.write_all(&v3[..v3.len() / 2]).unwrap();
    f.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(60));
    f.write_all(&v3[v3.len() / 2..]).unwrap();
    drop(f);
    wait_until("version 3 answers", || scope.get(1) == 3);
    let run = vm.finish();

    assert_eq!(run.report.end, VmEnd::Signal(15), "stopped by the test, not by a crash");
    let values: Vec<u64> = run
        .trace
        .iter()
        .map(|r| {
            assert_eq!((r.outcome.as_str(), r.by.as_str()), ("ok", "plugin"), "{r:?}");
            u64::from_str_radix(r.value.as_deref().unwrap().trim_start_matches("0x"), 16).unwrap()
        })
        .collect();
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "old values, then new values, never back"
    );
    assert_eq!(values.iter().copied().collect::<HashSet<_>>(), HashSet::from([1, 2, 3]));
    assert!(run.report.stats.reloads_applied >= 2);
}

/// A file written continuously beside the plugin (a trace, a log) makes
/// a stream of events; it must not keep postponing the check until the
/// once-a-second rescan (it did: every swap took a full second).
#[test]
fn a_busy_neighbour_file_does_not_delay_a_reload() {
    if !kvm_available() {
        return;
    }
    let LivePlugin { dir, plugin, vm, scope } = live_plugin();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), dir.path().join("busy.log"));
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(path).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all(b"a line of log\n").unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut slowest = std::time::Duration::ZERO;
    for v in 2..=6 {
        atomic_write(&plugin, &version(v));
        let renamed = std::time::Instant::now();
        wait_until("the new version answers", || scope.get(1) == v as i64);
        slowest = slowest.max(renamed.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    vm.finish();
    // Not a timing benchmark: a full rescan period (1 s) per swap is the
    // bug; the event path takes a debounce (20 ms) plus a compile.
    assert!(
        slowest < std::time::Duration::from_secs(1) * 9 / 10, // the watcher's 1 s rescan
        "a swap waited {slowest:?}, as long as the periodic rescan"
    );
}

#[test]
fn a_reload_storm_loses_nothing_and_never_serves_a_refused_version() {
    if !kvm_available() {
        return;
    }
    const STOP: u64 = 0x5709;
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("storm.wasm");
    std::fs::write(&plugin, version(1)).unwrap();
    let vm = start(&guest("msr_until_stop.elf"), 2, quick(&plugin));
    let scope = vm.state.scope("storm");
    wait_until("version 1 answers", || scope.get(1) == 1);

    let wrong_abi = wat(
        r#"(module (func (export "msrwasm_abi_version") (result i32) (i32.const 2))
        (func (export "rdmsr") (param i32) (result i32) (i32.const 2)))"#,
    );
    let mut bad_hashes = HashSet::new();
    let mut good = 1;
    for i in 0..240u32 {
        let content = match i % 4 {
            0 => {
                good += 1;
                version(good)
            }
            1 => (0..64).map(|b| (b * 37 + i) as u8).collect(), // corrupt
            2 => version(900)[..20].to_vec(),                   // truncated
            _ => wrong_abi.clone(),
        };
        if i % 4 != 0 {
            bad_hashes.insert(content_hash(&content)[..16].to_owned());
        }
        if i % 2 == 0 {
            atomic_write(&plugin, &content);
        } else {
            std::fs::write(&plugin, &content).unwrap();
        }
        // Mostly faster than the debounce, so writes coalesce as in a real
        // storm; every fifth write settles long enough to be judged (5 and
        // 4 are coprime, so every kind of content gets judged).
        std::thread::sleep(std::time::Duration::from_millis(if i % 5 == 0 { 30 } else { 4 }));
    }
    atomic_write(&plugin, &version(STOP));
    let run = vm.join(std::time::Duration::from_secs(30));
    run.expect_status(0);

    for (v, stats) in run.report.exits.iter().enumerate() {
        let line = format!("vcpu {v} count 0x");
        let at = run.serial.find(&line).unwrap_or_else(|| panic!("{}", run.serial)) + line.len();
        let guest_count = u64::from_str_radix(&run.serial[at..at + 16], 16).unwrap();
        assert_eq!(
            guest_count + 1,
            stats.rdmsr,
            "vCPU {v}: every read the guest made was answered once"
        );
        let traced: Vec<_> = run.trace.iter().filter(|r| r.vcpu == v as u32).collect();
        assert_eq!(traced.len() as u64, stats.rdmsr);
        assert_eq!(
            traced.last().unwrap().value.as_deref(),
            Some("0x5709"),
            "the final version is live"
        );
    }
    for r in &run.trace {
        assert_eq!((r.by.as_str(), r.outcome.as_str()), ("plugin", "ok"), "{r:?}");
        assert!(
            !bad_hashes.contains(r.version.as_deref().unwrap()),
            "answered by a refused version: {r:?}"
        );
    }
    // 48 settled writes: about 12 of each kind judged (timing decides exactly).
    assert!(
        run.report.stats.reloads_applied >= 5 && run.report.stats.reloads_refused >= 10,
        "{}",
        run.report.summary()
    );
}

#[test]
fn a_manifest_change_moves_the_msr_filter_on_the_running_vm() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("claimer.wat"),
        r#"(module
          (import "msr" "reply" (func $reply (param i64)))
          (import "msr" "state_add" (func $add (param i32 i64) (result i64)))
          (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
          (func (export "rdmsr") (param $i i32) (result i32)
            (drop (call $add (i32.const 0) (i64.const 1)))
            (call $reply (i64.extend_i32_u (local.get $i)))
            (i32.const 0)))"#,
    )
    .unwrap();
    let manifest = dir.path().join("vm.toml");
    let with_claims = |msrs: &str| format!("[[plugin]]\nname = \"claimer\"\npath = \"claimer.wat\"\nmsrs = [{msrs}]\n");
    std::fs::write(&manifest, with_claims("")).unwrap();
    let vm = start(
        &guest("fs_base_loop.elf"),
        1,
        PolicySpec::from_manifest(&manifest).unwrap(),
    );
    let scope = vm.state.scope("claimer");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(scope.get(0), 0, "FS_BASE is KVM's while nobody claims it");

    atomic_write(&manifest, with_claims("\"0xc0000100\"").as_bytes());
    wait_until("FS_BASE reaches the plugin", || scope.get(0) > 0);

    // A broken manifest is refused as a whole; the claim stays in force.
    atomic_write(
        &manifest,
        b"[[plugin]]\nname = \"claimer\"\npath = \"claimer.wat\"\nmsrs = [\"0x20-0x10\"]\n",
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = scope.get(0);
    wait_until("the claim still deflects FS_BASE", || scope.get(0) > before);

    atomic_write(&manifest, with_claims("").as_bytes());
    let mut last = scope.get(0);
    wait_until("FS_BASE stops being deflected", || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = scope.get(0);
        std::mem::replace(&mut last, now) == now
    });
    let run = vm.finish();
    assert_eq!(run.report.end, VmEnd::Signal(15));
    for r in &run.trace {
        assert_eq!((r.index.as_str(), r.reason.as_str()), ("0xc0000100", "filter"), "{r:?}");
        // An exit in flight while the claim goes away is answered by KVM's
        // own FS_BASE: the fallback for filtered MSRs nobody answers.
        match r.by.as_str() {
            "plugin" => assert_eq!(r.value.as_deref(), Some("0xc0000100")),
            by => assert_eq!(by, "kvm", "{r:?}"),
        }
    }
    assert_eq!(
        (run.report.stats.reloads_applied, run.report.stats.reloads_refused),
        (2, 1),
        "{}",
        run.report.summary()
    );
}

#[test]
fn state_carries_across_reloads() {
    if !kvm_available() {
        return;
    }
    // Both versions count reads in state key 0; v2 tags its answers.
    let counter = |tag: u64| {
        wat(&format!(
            r#"(module
              (import "msr" "reply" (func $reply (param i64)))
              (import "msr" "state_add" (func $add (param i32 i64) (result i64)))
              (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
              (func (export "rdmsr") (param i32) (result i32)
                (call $reply (i64.or (call $add (i32.const 0) (i64.const 1)) (i64.const {tag})))
                (i32.const 0)))"#
        ))
    };
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("counter.wasm");
    std::fs::write(&plugin, counter(0)).unwrap();
    let vm = start(&guest("msr_forever.elf"), 1, quick(&plugin));
    let scope = vm.state.scope("counter");
    wait_until("some reads counted", || scope.get(0) > 100);
    let v2 = counter(1 << 40);
    atomic_write(&plugin, &v2);
    let v2_hash = content_hash(&v2);
    wait_until("version 2 is live", || {
        vm.engine.policy().plugins().next().unwrap().version == v2_hash
    });
    let live_at = scope.get(0);
    wait_until("version 2 answered for a while", || scope.get(0) > live_at + 1000);
    let run = vm.finish();
    let values: Vec<u64> = run
        .trace
        .iter()
        .map(|r| u64::from_str_radix(r.value.as_deref().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    let counts: Vec<u64> = values.iter().map(|v| v & ((1 << 40) - 1)).collect();
    assert!(counts.windows(2).all(|w| w[1] == w[0] + 1), "the count never restarts");
    let first_v2 = values.iter().position(|v| v >> 40 == 1).expect("version 2 answered");
    assert!(first_v2 > 0 && counts[first_v2] > 100, "v2 continued v1's count");
}

/// Far more file events than the watcher queues between two `process()`
/// calls (4096; inotify's own queue may overflow too): the events past the
/// bound are dropped, the plugin's change among them, and the change is
/// still applied. KVM-free: the engine and its watcher, driven by hand.
#[test]
fn a_flood_of_file_events_past_the_watcher_queue_loses_no_change() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("p.wasm");
    std::fs::write(&plugin, version(1)).unwrap();
    let engine = msrwasm::Engine::builder()
        .filter(msrwasm::filter::RecordingFilter::default())
        .build(quick(&plugin))
        .unwrap();
    let mut watcher = msrwasm::watch::Watcher::new(&engine).unwrap();
    assert!(watcher.process().is_empty(), "nothing changed yet");
    // Each file: create, modify, close-write: 15,000 events.
    for i in 0..5000 {
        std::fs::write(dir.path().join(format!("noise-{i}.log")), b"x").unwrap();
    }
    atomic_write(&plugin, &version(2));
    let mut applied = Vec::new();
    wait_until("the change is applied", || {
        applied.extend(
            watcher
                .process()
                .into_iter()
                .filter(|r| matches!(r, msrwasm::Reload::Applied { .. })),
        );
        !applied.is_empty()
    });
    assert_eq!(applied.len(), 1, "{applied:?}");
}
