//! The engine's change path: who owns the policy, what is reported.

use std::sync::Mutex;

use super::*;
use crate::msr::{Access, ExitReason, NoKvm, Reply};
use crate::policy::filter::RecordingFilter;

fn answering(value: u64) -> String {
    format!(
        r#"(module (import "msr" "reply" (func $reply (param i64)))
            (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))
            (memory (export "memory") 1) (data (i32.const 0) "add")
            (func (export "msrwasm_abi_version") (result i32) i32.const 1)
            (func (export "rdmsr") (param i32) (result i32)
              (call $reply (i64.add (i64.const {value}) (call $config (i32.const 0) (i32.const 3) (i64.const 0))))
              i32.const 0))"#
    )
}

/// A manifest with one catch-all plugin, in a temporary directory.
fn manifest_vm(config_add: i64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.wat"), answering(100)).unwrap();
    let manifest = dir.path().join("vm.toml");
    write_manifest(&manifest, config_add);
    (dir, manifest)
}

fn write_manifest(path: &Path, config_add: i64) {
    let text = format!("[[plugin]]\nname = \"p\"\npath = \"p.wat\"\n[plugin.config]\nadd = {config_add}\n");
    // A new inode and mtime, so the change is seen whatever the clock's grain.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn read(engine: &Engine) -> Reply {
    let mut d = engine.dispatcher(0);
    d.handle(Access::read(0x4d53_0000, ExitReason::Unknown), &mut NoKvm)
        .reply
}

fn engine(manifest: &Path) -> Engine {
    Engine::builder()
        .filter(RecordingFilter::default())
        .build(PolicySpec::from_manifest(manifest).unwrap())
        .unwrap()
}

/// `engine.spec()` -> edit -> `engine.update(spec)` used to keep the
/// manifest, so a later edit of the manifest file silently reverted the
/// programmatic change. A programmatic change now owns the policy.
#[test]
fn an_update_is_never_reverted_by_a_later_manifest_edit() {
    let (_dir, manifest) = manifest_vm(1);
    let engine = engine(&manifest);
    assert_eq!(read(&engine), Reply::Read(101));
    assert_eq!(engine.watched_files().len(), 2, "the manifest and its plugin");

    let mut spec = engine.spec();
    assert_eq!(spec.manifest(), None, "spec() never names a manifest");
    spec.plugins[0].config.insert("add".into(), 7);
    engine.update(spec).unwrap();
    assert_eq!(read(&engine), Reply::Read(107));
    assert!(
        !engine.watched_files().contains(&manifest),
        "the manifest is no longer followed"
    );

    write_manifest(&manifest, 2);
    assert!(engine.reload_all().iter().all(|r| !matches!(r, Reload::Applied { .. })));
    assert_eq!(read(&engine), Reply::Read(107), "the update stays");

    // Handing the policy back to the file is explicit.
    engine.follow_manifest(&manifest).unwrap();
    assert_eq!(read(&engine), Reply::Read(102));
    write_manifest(&manifest, 3);
    engine.refresh(&HashSet::new());
    assert_eq!(read(&engine), Reply::Read(103), "followed again");
}

/// Every policy, the first included, is reported to the event sinks.
#[test]
fn the_first_load_is_an_event_like_every_later_one() {
    #[derive(Default)]
    struct Seen(Mutex<Vec<Reload>>);
    impl Events for Seen {
        fn reload(&self, reload: &Reload) {
            self.0.lock().unwrap().push(reload.clone());
        }
    }
    let (dir, manifest) = manifest_vm(1);
    let seen = Arc::new(Seen::default());
    let engine = Engine::builder()
        .filter(RecordingFilter::default())
        .events(seen.clone())
        .build(PolicySpec::from_manifest(&manifest).unwrap())
        .unwrap();
    assert_eq!(
        seen.0.lock().unwrap().as_slice(),
        [Reload::Applied {
            cause: Cause::Start,
            generation: 1
        }]
    );
    assert_eq!(engine.stats().reloads_applied, 0, "the counters count changes only");

    // A refused first policy is reported too, before build() returns it.
    std::fs::write(dir.path().join("p.wat"), "(module").unwrap();
    let refused = Arc::new(Seen::default());
    let built = Engine::builder()
        .filter(RecordingFilter::default())
        .events(refused.clone())
        .build(PolicySpec::from_manifest(&manifest).unwrap());
    assert!(built.is_err());
    assert!(matches!(
        refused.0.lock().unwrap().as_slice(),
        [Reload::Refused { cause: Cause::Start, errors }] if errors[0].contains("p.wat")
    ));
}

/// `update` errors are `std::error::Error`s that keep every reason and
/// their sources.
#[test]
fn update_errors_are_errors_with_sources() {
    let (dir, manifest) = manifest_vm(1);
    let engine = engine(&manifest);
    let mut spec = engine.spec();
    let mut second = spec.plugins[0].clone();
    second.name = "q".into();
    second.path = dir.path().join("missing.wat");
    spec.plugins[0].path = dir.path().join("also-missing.wat");
    spec.plugins.push(second);
    let err = engine.update(spec).unwrap_err();
    let as_error: &dyn std::error::Error = &err;
    assert_eq!(err.errors().len(), 2);
    assert!(as_error.to_string().contains("2 reasons"), "{as_error}");
    let source = as_error.source().expect("the first reason is the source");
    assert!(
        crate::util::error_chain(source).contains("also-missing.wat"),
        "{}",
        crate::util::error_chain(source)
    );
    assert_eq!(read(&engine), Reply::Read(101), "the running policy stays");
}
