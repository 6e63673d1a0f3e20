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
    let err = |wat: &str| crate::error_chain(&wat_plugin("bad", wat, &state).unwrap_err());
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
        Arc::new(Plugin::build(&Runtime::shared(), settings, &bytes, &state, Some(&cache)).unwrap())
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
