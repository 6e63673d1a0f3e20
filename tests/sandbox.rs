//! Untrusted plugins on a live guest: a corpus of hostile plugins, each
//! either contained at call time (the guest gets the configured outcome and
//! keeps running, the error counters match) or refused at load with a
//! message naming the file.

use msrwasm::OnError;
use msrwasm::PolicySpec;
use msrwasm::Unhandled;
use msrwasm_tests::{guest, kvm_available, run};

const HEADER: &str = r#"
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "log" (func $log (param i32 i32 i32)))
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))
  (import "msr" "state_add" (func $add (param i32 i64) (result i64)))
  (memory (export "memory") 1)
  (table 2 funcref)
  (type $sig (func (result i32)))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))"#;

/// A plugin from `body` (its rdmsr/wrmsr and helpers), with the ABI header.
fn plugin(body: &str) -> String {
    format!("(module {HEADER}\n{body})")
}

/// rdmsr misbehaves with `code`; wrmsr is not exported (writes PASS).
fn bad_read(code: &str) -> String {
    plugin(&format!(
        r#"(func $r (export "rdmsr") (param $i i32) (result i32) {code})"#
    ))
}

/// rdmsr answers 0x77; wrmsr misbehaves with `code`.
fn bad_write(code: &str) -> String {
    plugin(&format!(
        r#"(func (export "rdmsr") (param $i i32) (result i32) (call $reply (i64.const 0x77)) (i32.const 0))
           (func (export "wrmsr") (param $i i32) (param $v i64) (result i32) {code})"#
    ))
}

/// What the guest reports.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    reads_gp: u64,
    writes_gp: u64,
    value: u64,
}

fn seen(serial: &str) -> Seen {
    let field = |name: &str| {
        let at = serial
            .find(&format!("{name} 0x"))
            .unwrap_or_else(|| panic!("no {name} in {serial:?}"))
            + name.len()
            + 3;
        u64::from_str_radix(&serial[at..at + 16], 16).unwrap()
    };
    Seen {
        reads_gp: field("reads_gp"),
        writes_gp: field("writes_gp"),
        value: field("value"),
    }
}

/// Runs the hostile guest against `wat` with the plugin settings `set`;
/// returns what the guest saw and the plugin's counters.
fn contained(
    name: &str,
    wat: &str,
    set: impl FnOnce(&mut msrwasm::PluginSettings),
    unhandled: Unhandled,
) -> (Seen, msrwasm::PluginStats) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.wat"));
    std::fs::write(&path, wat).unwrap();
    let mut spec = PolicySpec::from_paths(&[path], unhandled);
    set(&mut spec.plugins[0]);
    let r = run(&guest("hostile.elf"), 1, spec).unwrap_or_else(|e| panic!("{name}: refused at load: {e}"));
    r.expect_status(0);
    (seen(&r.serial), r.report.stats.plugins[name].clone())
}

/// Plugins that fail on every read (or write): 5 errors start a quarantine,
/// the other 3 accesses skip the plugin.
const READ_FAILURES: &[(&str, &str)] = &[
    ("endless_loop", "(loop $l (br $l)) (i32.const 0)"),
    ("deep_recursion", "(call $r (local.get $i))"),
    ("unreachable", "unreachable"),
    ("status_3", "(i32.const 3)"),
    ("status_negative", "(i32.const -1)"),
    ("handled_without_reply", "(i32.const 0)"),
    (
        "log_out_of_bounds",
        "(call $log (i32.const 2) (i32.const 65530) (i32.const 64)) (i32.const 2)",
    ),
    (
        "log_huge_length",
        "(call $log (i32.const 2) (i32.const 0) (i32.const 0x7fffffff)) (i32.const 2)",
    ),
    (
        "config_out_of_bounds",
        "(drop (call $config (i32.const -8) (i32.const 16) (i64.const 0))) (i32.const 2)",
    ),
    ("divide_by_zero", "(i32.div_u (i32.const 1) (i32.const 0))"),
    ("memory_out_of_bounds", "(i32.load (i32.const 70000))"),
    ("call_null_table_entry", "(call_indirect (type $sig) (i32.const 1))"),
    (
        "state_hammer",
        "(loop $l (drop (call $add (i32.const 0) (i64.const 1))) (br $l)) (i32.const 0)",
    ),
];

const WRITE_FAILURES: &[(&str, &str)] = &[
    ("reply_outside_rdmsr", "(call $reply (i64.const 1)) (i32.const 0)"),
    ("write_status_7", "(i32.const 7)"),
];

#[test]
fn failing_plugins_fault_or_pass_as_configured_and_get_quarantined() {
    if !kvm_available() {
        return;
    }
    for &(name, code) in READ_FAILURES.iter().chain(WRITE_FAILURES) {
        let on_read = READ_FAILURES.iter().any(|(n, _)| *n == name);
        let wat = if on_read { bad_read(code) } else { bad_write(code) };

        // on_error = fault, unhandled = gp: every failing access is a #GP,
        // the errors and the quarantined (unanswered) accesses alike.
        let (seen, c) = contained(name, &wat, |s| s.on_error = OnError::Fault, Unhandled::Gp);
        let expected = if on_read {
            Seen {
                reads_gp: 8,
                writes_gp: 8,
                value: 0,
            }
        } else {
            Seen {
                reads_gp: 0,
                writes_gp: 8,
                value: 0x77,
            }
        };
        assert_eq!(seen, expected, "{name}");
        quarantine_accounting(name, on_read, c);

        // on_error = pass, unhandled = ignore: the guest never notices.
        let (seen, c) = contained(name, &wat, |s| s.on_error = OnError::Pass, Unhandled::Ignore);
        let value = if on_read { 0 } else { 0x77 };
        assert_eq!(
            seen,
            Seen {
                reads_gp: 0,
                writes_gp: 0,
                value
            },
            "{name}"
        );
        quarantine_accounting(name, on_read, c);
    }
}

/// The 5th error quarantines the plugin, which is then skipped; every
/// access it was asked about is either an error or a skip. (How many of
/// each depends on the wall clock: a slow run can outlast the 1 s backoff
/// and call the plugin, failing, once more.)
fn quarantine_accounting(name: &str, on_read: bool, c: msrwasm::PluginStats) {
    // A catch-all plugin is asked about all 16 accesses once it fails on
    // reads; one failing on writes answered its 8 reads first.
    let asked = if on_read { 16 } else { 8 };
    assert!(c.errors >= 5 && c.quarantines >= 1, "{name}: {c:?}");
    assert_eq!(c.errors + c.skipped, asked, "{name}: {c:?}");
}

#[test]
fn resource_hogs_are_capped_without_errors() {
    if !kvm_available() {
        return;
    }
    // Grows memory a page at a time until refused: the 1024 KiB cap makes
    // memory.grow return -1 (no trap) at 16 pages, which it reports.
    let bomb = bad_read(
        "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) (call $reply (i64.extend_i32_u (memory.size))) (i32.const 0)",
    );
    let (seen, c) = contained("memory_bomb", &bomb, |s| s.on_error = OnError::Fault, Unhandled::Gp);
    assert_eq!((seen.reads_gp, seen.value), (0, 16));
    assert_eq!(c.errors, 0);
    // 500 log lines per call: rate-limited by the host, not an error. The
    // rate limit is what this tests, so the call gets room: its 500 host
    // calls are charged 500 µs, and their real CPU time on the nested CI
    // host, under a loaded test run, took three of eight calls past the
    // default 1 ms budget.
    let spam = bad_read(
        "(local $n i32) (local.set $n (i32.const 500)) (loop $l (call $log (i32.const 2) (i32.const 0) (i32.const 4)) (local.tee $n (i32.sub (local.get $n) (i32.const 1))) (br_if $l)) (call $reply (i64.const 5)) (i32.const 0)",
    );
    let (seen, c) = contained(
        "log_spam",
        &spam,
        |s| {
            s.on_error = OnError::Fault;
            s.timeout_us = 20_000;
        },
        Unhandled::Gp,
    );
    assert_eq!((seen.reads_gp, seen.value, c.errors), (0, 5, 0));
}

/// Plugins refused before the VM starts, and the words that must say why.
#[test]
fn hostile_modules_are_refused_at_load_naming_the_file_and_reason() {
    let cases: &[(&str, String, &str)] = &[
        ("trap_in_init", plugin(r#"(func (export "rdmsr") (param i32) (result i32) (i32.const 2)) (func (export "init") (result i32) unreachable)"#), "init() failed"),
        ("init_refuses", plugin(r#"(func (export "rdmsr") (param i32) (result i32) (i32.const 2)) (func (export "init") (result i32) (i32.const 9))"#), "init() refused the load: code 9"),
        ("start_loops", plugin(r#"(func (export "rdmsr") (param i32) (result i32) (i32.const 2)) (func $s (loop $l (br $l))) (start $s)"#), "timed out"),
        ("huge_table", r#"(module (table 10000000 funcref) (func (export "msrwasm_abi_version") (result i32) (i32.const 1)) (func (export "rdmsr") (param i32) (result i32) (i32.const 2)))"#.into(), "over the 65536-element limit"),
        ("huge_memory", r#"(module (memory 2000) (func (export "msrwasm_abi_version") (result i32) (i32.const 1)) (func (export "rdmsr") (param i32) (result i32) (i32.const 2)))"#.into(), "memory_max_kib = 128000"),
        ("claim_loops", plugin(r#"(func (export "rdmsr") (param i32) (result i32) (i32.const 2)) (func (export "claim") (param i32) (result i64) (loop $l (br $l)) (i64.const -1))"#), "claim() failed: timed out"),
        ("claim_reversed", plugin(r#"(func (export "rdmsr") (param i32) (result i32) (i32.const 2)) (func (export "claim") (param i32) (result i64) (i64.const 0x0000002000000010))"#), "is reversed"),
        ("foreign_import", r#"(module (import "env" "socket" (func (param i32) (result i32))) (func (export "msrwasm_abi_version") (result i32) (i32.const 1)) (func (export "rdmsr") (param i32) (result i32) (i32.const 2)))"#.into(), "imports `env.socket`, which the host does not provide"),
        ("wasi_global", r#"(module (import "wasi_snapshot_preview1" "fd_write" (global i32)) (func (export "msrwasm_abi_version") (result i32) (i32.const 1)) (func (export "rdmsr") (param i32) (result i32) (i32.const 2)))"#.into(), "`wasi_snapshot_preview1.fd_write`, which the host does not provide"),
        ("wrong_rdmsr_type", r#"(module (func (export "msrwasm_abi_version") (result i32) (i32.const 1)) (func (export "rdmsr") (param i64) (result i64) (i64.const 2)))"#.into(), "export `rdmsr` has type (i64) -> i64"),
        ("nothing_exported", "(module)".into(), "missing export `msrwasm_abi_version`"),
        ("random_bytes", String::from_utf8_lossy(&[0x00, 0x61, 0x73, 0x6d, 0x09, 0x09]).into_owned(), "not WebAssembly"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, wat, reason) in cases {
        let path = dir.path().join(format!("{name}.wat"));
        std::fs::write(&path, wat).unwrap();
        let e = load_error(&path);
        assert!(e.contains(&format!("{name}.wat")) && e.contains(reason), "{name}: {e}");
    }
    // A file over the size limit is refused before it is read.
    let huge = dir.path().join("huge.wasm");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(msrwasm::tools::MAX_PLUGIN_BYTES + 1)
        .unwrap();
    let e = load_error(&huge);
    assert!(e.contains("huge.wasm") && e.contains("over the 64 MiB limit"), "{e}");
}

fn load_error(path: &std::path::Path) -> String {
    let spec = msrwasm_tests::quick(path);
    let engine = msrwasm::Engine::builder()
        .filter(msrwasm::filter::RecordingFilter::default())
        .build(spec);
    match engine {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => msrwasm::tools::error_chain(&e),
    }
}

#[test]
fn an_msr_storm_over_every_index_class_keeps_the_host_answering() {
    if !kvm_available() {
        return;
    }
    let vcpus = 2;
    for (plugin_wat, expect_plugin_answers) in [
        (
            "(module (func (export \"msrwasm_abi_version\") (result i32) (i32.const 1)) (func (export \"rdmsr\") (param i32) (result i32) (i32.const 2)) (func (export \"wrmsr\") (param i32 i64) (result i32) (i32.const 2)))",
            false,
        ),
        (
            "(module (import \"msr\" \"reply\" (func $r (param i64))) (func (export \"msrwasm_abi_version\") (result i32) (i32.const 1)) (func (export \"rdmsr\") (param i32) (result i32) (call $r (i64.const 7)) (i32.const 0)) (func (export \"wrmsr\") (param i32 i64) (result i32) (i32.const 0)))",
            true,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catchall.wat");
        std::fs::write(&path, plugin_wat).unwrap();
        let r = run(
            &guest("msr_storm.elf"),
            vcpus,
            PolicySpec::from_paths(&[path], Unhandled::Gp),
        )
        .unwrap();
        r.expect_status(0);
        assert_eq!(r.report.total_exits().unexpected, 0);
        let t = r.report.stats.total();
        assert_eq!(r.report.stats.plugins["catchall"].errors, 0);
        for v in 0..vcpus {
            assert!(r.serial.contains(&format!("vcpu {v} gp ")), "{}", r.serial);
        }
        // Every deflected access got exactly one answer, and every #GP the
        // host injected reached a guest: the guests counted them.
        let traced_gp = r.trace.iter().filter(|x| x.outcome == "gp").count() as u64;
        assert_eq!(traced_gp, t.gp);
        let guest_gp: u64 = r
            .serial
            .lines()
            .filter_map(|l| l.split(" gp 0x").nth(1))
            .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
            .sum();
        // With INVAL deflected too, every #GP (reserved EFER bits included)
        // comes from the host's answers, and each one reached the guest.
        assert_eq!(guest_gp, t.gp, "guest saw {guest_gp} #GP, host injected {}", t.gp);
        if expect_plugin_answers {
            assert!(r.report.stats.plugins["catchall"].handled > 0);
        }
        let classes: std::collections::BTreeSet<&str> = r.trace.iter().map(|x| x.reason.as_str()).collect();
        eprintln!(
            "deflection reasons seen: {classes:?}, host #GP {}, guest #GP {guest_gp}",
            t.gp
        );
    }
}

#[test]
fn a_quarantined_plugin_serves_again_once_a_fixed_version_is_dropped_in() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flaky.wat");
    std::fs::write(&path, bad_read("unreachable")).unwrap();
    let mut spec = PolicySpec::from_paths(std::slice::from_ref(&path), Unhandled::Ignore);
    spec.plugins[0].on_error = OnError::Pass;
    let vm = msrwasm_tests::start(&guest("msr_forever.elf"), 1, spec);
    // Give the broken version time to fail, get quarantined and be skipped.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let fixed = "(module (import \"msr\" \"reply\" (func $r (param i64))) (import \"msr\" \"state_set\" (func $s (param i32 i64)))
        (func (export \"msrwasm_abi_version\") (result i32) (i32.const 1))
        (func (export \"rdmsr\") (param i32) (result i32) (call $s (i32.const 1) (i64.const 0x42)) (call $r (i64.const 0x42)) (i32.const 0)))";
    msrwasm_tests::atomic_write(&path, fixed.as_bytes());
    let scope = vm.state.scope("flaky");
    msrwasm_tests::wait_until("the fixed version answers", || scope.get(1) == 0x42);
    let run = vm.finish();
    let c = run.report.stats.plugins["flaky"].clone();
    assert!(c.errors >= 5 && c.quarantines >= 1 && c.skipped > 0, "{c:?}");
    assert!(c.handled > 0, "{c:?}");
    // Once the fixed version answered, every later access is its answer.
    let first = run
        .trace
        .iter()
        .position(|r| r.status == "handled")
        .expect("handled answers");
    assert!(
        run.trace[first..]
            .iter()
            .all(|r| r.value.as_deref() == Some("0x42") && r.by == "plugin")
    );
    assert!(
        run.trace[..first]
            .iter()
            .all(|r| r.by == "unhandled" || r.status == "error"),
        "before: errors or skipped"
    );
}

/// The smallest component that implements the plugin world: every access
/// passes. `extra` is spliced in at the top level (more core modules and
/// instances).
fn passing_component(extra: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(component
            (core module $m
                (memory (export "mem") 1)
                ;; init: ok; claims: none (both zero bytes at address 0)
                (func (export "init") (result i32) (i32.const 0))
                (func (export "claims") (result i32) (i32.const 0))
                ;; read-result `pass` (case 2) at address 16
                (data (i32.const 16) "\02")
                (func (export "rdmsr") (param i32) (result i32) (i32.const 16))
                (func (export "wrmsr") (param i32 i64) (result i32) (i32.const 2)))
            (core instance $i (instantiate $m))
            {extra}
            (type $range (record (field "first" u32) (field "last" u32)))
            (type $read (variant (case "value" u64) (case "fault") (case "pass")))
            (type $write (enum "handled" "fault" "pass"))
            (func $init (result (result (error string))) (canon lift (core func $i "init") (memory (core memory $i "mem"))))
            (func $claims (result (option (list $range))) (canon lift (core func $i "claims") (memory (core memory $i "mem"))))
            (func $rdmsr (param "index" u32) (result $read) (canon lift (core func $i "rdmsr") (memory (core memory $i "mem"))))
            (func $wrmsr (param "index" u32) (param "value" u64) (result $write) (canon lift (core func $i "wrmsr")))
            (instance $handler
                (export "msr-range" (type $range))
                (export "read-result" (type $read))
                (export "write-result" (type $write))
                (export "init" (func $init))
                (export "claims" (func $claims))
                (export "rdmsr" (func $rdmsr))
                (export "wrmsr" (func $wrmsr)))
            (export "msrwasm:plugin/handler@1.0.0" (instance $handler)))"#
    ))
    .expect("valid component text")
}

/// A component's core instances and memories count together against one
/// store's limits (256 instances; one `memory_max_kib` for all its
/// memories): over either, it is refused at load, naming the file.
#[test]
fn components_over_the_instance_or_memory_total_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, passing_component(extra)).unwrap();
        path
    };
    // The control: the same component with room to spare loads.
    let fine = write(
        "fine.wasm",
        &format!(
            "(core module $e (memory 2)) {}",
            "(core instance (instantiate $e))".repeat(3)
        ),
    );
    msrwasm::Engine::builder()
        .filter(msrwasm::filter::RecordingFilter::default())
        .build(msrwasm_tests::quick(&fine))
        .expect("a component within the limits loads");
    // 300 instances of one empty module: within the 64-module limit, over
    // the 256-instance one.
    let instances = write(
        "instances.wasm",
        &format!("(core module $e) {}", "(core instance (instantiate $e))".repeat(300)),
    );
    let e = load_error(&instances);
    assert!(
        e.contains("instances.wasm") && e.contains("instance count too high"),
        "{e}"
    );
    // Nine more memories of 128 KiB: each fits the 1024 KiB default, their
    // sum does not.
    let memories = write(
        "memories.wasm",
        &format!(
            "(core module $e (memory 2)) {}",
            "(core instance (instantiate $e))".repeat(9)
        ),
    );
    let e = load_error(&memories);
    assert!(
        e.contains("memories.wasm")
            && e.contains("a component's memories together")
            && e.contains("memory_max_kib = 1024"),
        "{e}"
    );
}
