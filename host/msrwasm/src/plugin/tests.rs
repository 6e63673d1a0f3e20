use super::*;

/// A plugin from WAT text with default settings.
pub(crate) fn wat_plugin(name: &str, wat: &str, state: &StateStore) -> Result<Arc<Plugin>, LoadError> {
    let settings = PluginSettings::new(name, format!("{name}.wat"));
    Plugin::from_bytes(&Runtime::shared(), settings, wat.as_bytes(), state).map(Arc::new)
}

const HEADER: &str = r#"(func (export "msrwasm_abi_version") (result i32) i32.const 1)"#;

fn module(body: &str) -> String {
    format!(r#"(module (import "msr" "reply" (func $reply (param i64))) {HEADER} {body})"#)
}

fn instance(body: &str) -> PluginInstance {
    wat_plugin("t", &module(body), &StateStore::default())
        .unwrap()
        .instantiate(0)
        .unwrap()
}

#[test]
fn handled_reads_return_the_replied_value() {
    let mut i = instance(
        r#"(func (export "rdmsr") (param i32) (result i32) (call $reply (i64.extend_i32_u (local.get 0))) i32.const 0)"#,
    );
    assert_eq!(i.rdmsr(0xc000_0080, 2), Ok(Answer::Handled(0xc000_0080)));
    assert_eq!(i.wrmsr(1, 2, 2), Ok(Answer::Pass), "no wrmsr export means PASS");
}

#[test]
fn plugin_errors_are_classified() {
    let mut i = instance(
        r#"(func (export "rdmsr") (param i32) (result i32) i32.const 0)
        (func (export "wrmsr") (param i32 i64) (result i32) (call $reply (i64.const 1)) i32.const 0)"#,
    );
    assert_eq!(i.rdmsr(1, 2), Err(CallError::NoReply));
    let e = i.wrmsr(1, 0, 2);
    assert!(
        matches!(&e, Err(CallError::Trap(m)) if m.contains("outside rdmsr")),
        "{e:?}"
    );

    let mut i = instance(r#"(func (export "rdmsr") (param i32) (result i32) i32.const 7)"#);
    assert_eq!(i.rdmsr(1, 2), Err(CallError::BadStatus(7)));
    let mut i = instance(r#"(func (export "rdmsr") (param i32) (result i32) unreachable)"#);
    assert!(matches!(i.rdmsr(1, 2), Err(CallError::Trap(_))));
}

#[test]
fn an_endless_loop_is_cut_off_by_the_budget() {
    let mut i = instance(r#"(func (export "rdmsr") (param i32) (result i32) (loop $l (br $l)) i32.const 2)"#);
    let t = std::time::Instant::now();
    assert_eq!(i.rdmsr(1, 2), Err(CallError::Timeout));
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn config_vcpu_reason_and_state_reach_the_plugin() {
    let wat = r#"(module
        (import "msr" "reply" (func $reply (param i64)))
        (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))
        (import "msr" "vcpu" (func $vcpu (result i32)))
        (import "msr" "reason" (func $reason (result i32)))
        (import "msr" "state_add" (func $add (param i32 i64) (result i64)))
        (memory (export "memory") 1)
        (data (i32.const 0) "watts")
        (func (export "msrwasm_abi_version") (result i32) i32.const 1)
        (func (export "rdmsr") (param i32) (result i32)
          (if (i32.eq (local.get 0) (i32.const 1)) (then (call $reply (call $config (i32.const 0) (i32.const 5) (i64.const 9))) (return (i32.const 0))))
          (if (i32.eq (local.get 0) (i32.const 2)) (then (call $reply (i64.extend_i32_u (call $vcpu))) (return (i32.const 0))))
          (if (i32.eq (local.get 0) (i32.const 3)) (then (call $reply (i64.extend_i32_u (call $reason))) (return (i32.const 0))))
          (call $reply (call $add (i32.const 5) (i64.const 1)))
          i32.const 0))"#;
    let state = StateStore::default();
    let mut settings = PluginSettings::new("cfg", "cfg.wat");
    settings.config.insert("watts".into(), 95);
    let plugin = Arc::new(Plugin::from_bytes(&Runtime::shared(), settings, wat.as_bytes(), &state).unwrap());
    let (mut a, mut b) = (plugin.instantiate(0).unwrap(), plugin.instantiate(3).unwrap());
    assert_eq!(a.rdmsr(1, 2), Ok(Answer::Handled(95)));
    assert_eq!(b.rdmsr(2, 2), Ok(Answer::Handled(3)));
    assert_eq!(a.rdmsr(3, 4), Ok(Answer::Handled(4)));
    assert_eq!(a.rdmsr(9, 2), Ok(Answer::Handled(1)));
    assert_eq!(b.rdmsr(9, 2), Ok(Answer::Handled(2)), "state is shared between vCPUs");
    assert_eq!(state.scope("cfg").get(5), 2);
}

#[test]
fn bad_pointers_to_log_trap() {
    let wat = r#"(module (import "msr" "log" (func $log (param i32 i32 i32))) (memory (export "memory") 1)
        (func (export "msrwasm_abi_version") (result i32) i32.const 1)
        (func (export "rdmsr") (param i32) (result i32) (call $log (i32.const 2) (i32.const 65530) (i32.const 100)) i32.const 2))"#;
    let mut i = wat_plugin("log", wat, &StateStore::default())
        .unwrap()
        .instantiate(0)
        .unwrap();
    assert!(matches!(i.rdmsr(1, 2), Err(CallError::Trap(m)) if m.contains("outside linear memory")));
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let state = StateStore::default();
    let err = |wat: &str| crate::util::error_chain(&wat_plugin("bad", wat, &state).unwrap_err());
    assert!(err("").contains("bad.wat: not WebAssembly: the file is empty"));
    assert!(
        err("(module (func (export \"rdmsr\") (param i32) (result i32) i32.const 2))")
            .contains("missing export `msrwasm_abi_version`")
    );
    assert!(err(r#"(module (func (export "msrwasm_abi_version") (result i32) i32.const 2) (func (export "rdmsr") (param i32) (result i32) i32.const 2))"#)
        .contains("msrwasm_abi_version() returned 2"));
    assert!(err(&module(r#"(func (export "rdmsr") (param i32) (result i32) i32.const 2) (func (export "init") (result i32) i32.const 5)"#))
        .contains("init() refused the load: code 5"));
    let bytes = Plugin::from_bytes(
        &Runtime::shared(),
        PluginSettings::new("x", "x.wasm"),
        b"\x00asm\x01\x00\x00\x00\xff",
        &state,
    )
    .unwrap_err();
    assert!(
        bytes.to_string().starts_with("plugin x.wasm: not WebAssembly"),
        "{bytes}"
    );
}

#[test]
fn claims_come_from_the_export_unless_the_manifest_overrides() {
    let body = r#"(func (export "rdmsr") (param i32) (result i32) i32.const 2)
        (func (export "claim") (param i32) (result i64)
          (if (result i64) (i32.eqz (local.get 0)) (then (i64.const 0x0000060600000611)) (else (i64.const -1))))"#;
    let state = StateStore::default();
    let p = wat_plugin("c", &module(body), &state).unwrap();
    assert_eq!(p.claims(), Some(&[(0x606, 0x611)][..]));
    let mut settings = PluginSettings::new("c", "c.wat");
    settings.msrs = Some(vec![(0x35, 0x35)]);
    let p = Plugin::from_bytes(&Runtime::shared(), settings, module(body).as_bytes(), &state).unwrap();
    assert_eq!(p.claims(), Some(&[(0x35, 0x35)][..]));
    let endless = r#"(func (export "rdmsr") (param i32) (result i32) i32.const 2)
        (func (export "claim") (param i32) (result i64) (i64.const 0x0000000100000001))"#;
    assert!(
        wat_plugin("e", &module(endless), &state)
            .unwrap_err()
            .to_string()
            .contains("more than 64 ranges")
    );
}

#[test]
fn sha256_pins_content() {
    let wat = module(r#"(func (export "rdmsr") (param i32) (result i32) i32.const 2)"#);
    let mut settings = PluginSettings::new("p", "p.wat");
    settings.sha256 = Some("0".repeat(64));
    let e = Plugin::from_bytes(
        &Runtime::shared(),
        settings.clone(),
        wat.as_bytes(),
        &StateStore::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not match the pinned sha256"));
    settings.sha256 = Some(content_hash(wat.as_bytes()).to_ascii_uppercase());
    assert!(Plugin::from_bytes(&Runtime::shared(), settings, wat.as_bytes(), &StateStore::default()).is_ok());
}

#[test]
fn content_seen_before_comes_from_the_cache_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.wat");
    let version = |v: u64| {
        module(&format!(
            r#"(func (export "rdmsr") (param i32) (result i32) (call $reply (i64.const {v})) i32.const 0)"#
        ))
    };
    let (cache, state) = (ModuleCache::default(), StateStore::default());
    let load = || {
        let bytes = std::fs::read(&path).unwrap();
        let settings = PluginSettings::new("v", &path);
        let sha256 = content_hash(&bytes);
        Arc::new(Plugin::build(&Runtime::shared(), settings, &bytes, sha256, &state, None, Some(&cache)).unwrap())
    };
    std::fs::write(&path, version(1)).unwrap();
    let v1 = load();
    std::fs::write(&path, version(2)).unwrap();
    load();
    assert_eq!(cache.len(), 2);
    // Rollback to v1: same content, same compiled module, nothing new cached.
    std::fs::write(&path, version(1)).unwrap();
    let again = load();
    assert_eq!(cache.len(), 2);
    assert_eq!(again.sha256(), v1.sha256());
    assert_eq!(again.instantiate(0).unwrap().rdmsr(0, 2), Ok(Answer::Handled(1)));
}

/// Work fuel does not see (host calls, `memory.grow` past the cap, bulk
/// table operations, slow instructions) used to run 3x-27x past
/// `timeout_us`. Every call now ends within its budget of CPU time plus two
/// epoch ticks. (A bound on CPU time, with generous slack: not a benchmark.)
#[test]
fn the_cpu_budget_bounds_what_fuel_does_not_count() {
    let bodies = [
        (
            "memory.grow past the cap",
            "(loop $l (drop (memory.grow (i32.const 1))) (br $l))",
        ),
        (
            "table.copy of 65536 elements",
            "(loop $l (table.copy (i32.const 0) (i32.const 1) (i32.const 65535)) (br $l))",
        ),
        (
            "f64 sqrt and div",
            "(local $x f64) (loop $l (local.set $x (f64.div (f64.sqrt (local.get $x)) (f64.const 3))) (br $l))",
        ),
        (
            "4 KB log lines",
            "(loop $l (call $log (i32.const 3) (i32.const 0) (i32.const 4096)) (br $l))",
        ),
    ];
    for (what, body) in bodies {
        let wat = format!(
            r#"(module (import "msr" "log" (func $log (param i32 i32 i32)))
              (memory (export "memory") 1) (table 65536 65536 funcref)
              (func (export "msrwasm_abi_version") (result i32) i32.const 1)
              (func (export "rdmsr") (param i32) (result i32) {body} (i32.const 2)))"#
        );
        let mut settings = PluginSettings::new("hog", "hog.wat");
        settings.timeout_us = 20_000;
        let plugin =
            Arc::new(Plugin::from_bytes(&Runtime::shared(), settings, wat.as_bytes(), &StateStore::default()).unwrap());
        let mut instance = plugin.instantiate(0).unwrap();
        let started = crate::sys::thread_cpu_ns();
        let result = instance.rdmsr(1, 2);
        let used_ms = (crate::sys::thread_cpu_ns() - started) as f64 / 1e6;
        assert_eq!(result, Err(CallError::Timeout), "{what}");
        let bound_ms = 3.0 * 20.0 + 2.0 * Runtime::shared().tick().as_secs_f64() * 1e3 + 20.0;
        assert!(used_ms < bound_ms, "{what}: {used_ms:.1} ms of CPU for a 20 ms budget");
    }
}

#[test]
fn a_state_store_full_of_keys_is_a_plugin_error_not_host_memory() {
    let wat = r#"(module (import "msr" "state_set" (func $set (param i32 i64))) (global $k (mut i32) (i32.const 0))
        (func (export "msrwasm_abi_version") (result i32) i32.const 1)
        (func (export "rdmsr") (param i32) (result i32)
          (loop $l (call $set (global.get $k) (i64.const 1)) (global.set $k (i32.add (global.get $k) (i32.const 1))) (br $l))
          (i32.const 2)))"#;
    let state = StateStore::default();
    let mut settings = PluginSettings::new("keys", "keys.wat");
    settings.timeout_us = 1_000_000;
    let plugin = Arc::new(Plugin::from_bytes(&Runtime::shared(), settings, wat.as_bytes(), &state).unwrap());
    let result = plugin.instantiate(0).unwrap().rdmsr(1, 2);
    assert!(
        matches!(&result, Err(CallError::Trap(m)) if m.contains("state store is full")),
        "{result:?}"
    );
    assert_eq!(state.scope("keys").len(), state::MAX_KEYS);
}

#[test]
fn refused_versions_never_enter_the_module_cache() {
    let cache = ModuleCache::new();
    let refusing = module(
        r#"(func (export "rdmsr") (param i32) (result i32) i32.const 2) (func (export "init") (result i32) i32.const 3)"#,
    );
    let settings = PluginSettings::new("r", "r.wat");
    let bytes = refusing.as_bytes();
    assert!(
        Plugin::build(
            &Runtime::shared(),
            settings,
            bytes,
            content_hash(bytes),
            &StateStore::default(),
            None,
            Some(&cache)
        )
        .is_err()
    );
    assert!(cache.is_empty());
}

#[test]
fn wasi_is_there_but_grants_nothing() {
    // A WASI reactor: _initialize runs first; stdout goes to the log; a
    // clock poll returns at once; opening a file fails; proc_exit is an error.
    let wat = r#"(module
        (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (import "msr" "reply" (func $reply (param i64)))
        (memory (export "memory") 1)
        (global $ready (mut i32) (i32.const 0))
        (data (i32.const 100) "hello from wasi\n")
        (func (export "_initialize") (global.set $ready (i32.const 1)))
        (func (export "msrwasm_abi_version") (result i32) (global.get $ready))
        (func (export "rdmsr") (param $i i32) (result i32)
          (if (i32.eq (local.get $i) (i32.const 1)) (then
            ;; iovec at 0: base 100, len 16; written count at 8
            (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 16))
            (call $reply (i64.extend_i32_u (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
            (return (i32.const 0))))
          (if (i32.eq (local.get $i) (i32.const 2)) (then
            (call $reply (i64.extend_i32_u (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 5)
              (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 16))))
            (return (i32.const 0))))
          (if (i32.eq (local.get $i) (i32.const 3)) (then
            ;; one clock subscription of an hour at 200 (tag 0 at 208), event at 300, count at 400
            (i64.store (i32.const 224) (i64.const 3600000000000))
            (call $reply (i64.extend_i32_u (call $poll (i32.const 200) (i32.const 300) (i32.const 1) (i32.const 400))))
            (return (i32.const 0))))
          (call $exit (i32.const 3))
          (i32.const 2)))"#;
    let plugin = wat_plugin("wasi", wat, &StateStore::default()).unwrap();
    let mut i = plugin.instantiate(0).unwrap();
    assert_eq!(i.rdmsr(1, 2), Ok(Answer::Handled(0)), "fd_write to stdout succeeds");
    assert_ne!(
        i.rdmsr(2, 2),
        Ok(Answer::Handled(0)),
        "path_open fails: no preopened directory"
    );
    let started = std::time::Instant::now();
    assert_eq!(i.rdmsr(3, 2), Ok(Answer::Handled(0)), "poll_oneoff returns at once");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "it did not sleep for an hour"
    );
    let e = i.rdmsr(4, 2);
    assert!(
        matches!(&e, Err(CallError::Trap(m)) if m.contains("proc_exit(3)")),
        "{e:?}"
    );
}

/// Issue #21: `random_get` (and WASI 0.2 `get-random-bytes`) of 32 MiB
/// cost about 100 ms per access, allocated 32 MiB on the host per call and
/// was answered normally. Now one call gets at most MAX_RANDOM_BYTES, and
/// every call is charged to the plugin's budget.
#[test]
fn wasi_random_is_bounded_per_call_and_charged_to_the_budget() {
    let wat = r#"(module
        (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
        (import "msr" "reply" (func $reply (param i64)))
        (memory (export "memory") 2)
        (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
        (func (export "rdmsr") (param $i i32) (result i32)
          (if (i32.eq (local.get $i) (i32.const 1)) (then
            ;; 64 bytes: fine, and not all zero
            (call $reply (i64.extend_i32_u (call $random (i32.const 0) (i32.const 64))))
            (if (i64.eqz (i64.or (i64.load (i32.const 0)) (i64.load (i32.const 8)))) (then unreachable))
            (return (i32.const 0))))
          (if (i32.eq (local.get $i) (i32.const 2)) (then
            ;; 32 MiB in one call
            (drop (call $random (i32.const 0) (i32.const 33554432)))
            (call $reply (i64.const 0))
            (return (i32.const 0))))
          ;; the largest calls allowed, endlessly: the budget ends it
          (loop $l (drop (call $random (i32.const 0) (i32.const 65536))) (br $l))
          (i32.const 2)))"#;
    let plugin = wat_plugin("random", wat, &StateStore::default()).unwrap();
    let mut i = plugin.instantiate(0).unwrap();
    assert_eq!(i.rdmsr(1, 2), Ok(Answer::Handled(0)));
    let e = i.rdmsr(2, 2);
    assert!(
        matches!(&e, Err(CallError::Trap(m)) if m.contains("over the 65536-byte limit")),
        "{e:?}"
    );
    let mut i = plugin.instantiate(0).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(i.rdmsr(3, 2), Err(CallError::Timeout));
    // Bound, not benchmark: 1 ms of budget, charged ~66 µs per call.
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn a_components_wasi_handle_table_is_bounded() {
    let mut table = super::wasi::table();
    for i in 0..super::wasi::MAX_HANDLES {
        table.push(i).unwrap();
    }
    assert!(table.push(0usize).is_err(), "one handle over the bound");
}

/// The hardened modes: Pulley (no JIT) and JIT without signal handlers run
/// the same plugins with the same answers, and every bound still holds
/// (out-of-bounds memory, a trap, an endless loop), checked by the code
/// instead of guard pages and signal handlers.
#[test]
fn hardened_modes_answer_alike_and_keep_every_bound() {
    let nojit = Runtime::shared_for(ExecMode::NoJit);
    assert!(nojit.engine().is_pulley(), "no-JIT runs Pulley bytecode");
    assert!(!nojit.signals_based_traps());
    let nosignals = Runtime::new(RuntimeOptions {
        signals_based_traps: false,
        ..RuntimeOptions::default()
    })
    .unwrap();
    assert!(!nosignals.engine().is_pulley());
    let keys = [Runtime::shared().code_key(), nojit.code_key(), nosignals.code_key()];
    assert!(
        keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2],
        "{keys:?}"
    );

    let body = r#"(memory 1)
        (func (export "rdmsr") (param $i i32) (result i32)
          (if (i32.eq (local.get $i) (i32.const 1)) (then (drop (i32.load (i32.const 70000)))))
          (if (i32.eq (local.get $i) (i32.const 2)) (then (drop (i32.div_u (i32.const 1) (i32.const 0)))))
          (if (i32.eq (local.get $i) (i32.const 3)) (then (loop $l (br $l))))
          (if (i32.eq (local.get $i) (i32.const 4)) (then (memory.grow (i32.const 3)) (drop)
            (i32.store (i32.const 200000) (i32.const 7))
            (call $reply (i64.extend_i32_u (i32.load (i32.const 200000)))) (return (i32.const 0))))
          (call $reply (i64.extend_i32_u (local.get $i)))
          (i32.const 0))"#;
    for runtime in [nojit, nosignals] {
        let settings = PluginSettings::new("t", "t.wat");
        let plugin =
            Arc::new(Plugin::from_bytes(&runtime, settings, module(body).as_bytes(), &StateStore::default()).unwrap());
        let mut i = plugin.instantiate(0).unwrap();
        assert_eq!(i.rdmsr(0x10, 2), Ok(Answer::Handled(0x10)));
        for index in [1, 2] {
            let e = i.rdmsr(index, 2);
            assert!(matches!(e, Err(CallError::Trap(_))), "{index}: {e:?}");
        }
        let t = std::time::Instant::now();
        assert_eq!(i.rdmsr(3, 2), Err(CallError::Timeout));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(
            i.rdmsr(4, 2),
            Ok(Answer::Handled(7)),
            "memory.grow, then a store past the first page"
        );
    }
}

#[test]
fn execution_modes_parse_by_name() {
    assert_eq!("jit".parse(), Ok(ExecMode::Jit));
    assert_eq!("no-jit".parse(), Ok(ExecMode::NoJit));
    let e = "nojit".parse::<ExecMode>().unwrap_err();
    assert!(e.contains("`nojit`") && e.contains("`no-jit`"), "{e}");
    assert_eq!(ExecMode::NoJit.name(), "no-jit");
}
