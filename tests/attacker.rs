//! What an attacker (or an unlucky operator) did to the host, case by case,
//! on real KVM with real files: each test failed before its fix.

use std::os::unix::fs::symlink;

use msrwasm::PolicySpec;
use msrwasm_cli::runner::VmEnd;
use msrwasm_tests::{
    LivePlugin, answering, atomic_write, guest, kvm_available, live_plugin, manifest, mkfifo, quick, run, start,
    test_plugin, wait_until,
};

/// An observer that claims MSRs and passes on everything used to let the
/// guest write SMI_COUNT and UCODE_REV (host-initiated KVM_SET_MSRS skips
/// the guest checks); `unhandled = "ignore"` completed accesses KVM found
/// invalid. The guest now sees what KVM gives guests.
#[test]
fn observer_plugins_never_loosen_kvm_checks() {
    if !kvm_available() {
        return;
    }
    let (_dir, spec) = manifest(&format!(
        "unhandled = \"ignore\"\n[[plugin]]\nname = \"observer\"\npath = \"{}\"\nmsrs = [\"0x34\", \"0x8b\", \"0xce\"]\n",
        test_plugin("observer.wat").display()
    ));
    let r = run(&guest("kvm_checks.elf"), 1, spec).unwrap();
    r.expect_status(0);
    let observed = |index: &str| r.trace.iter().filter(|t| t.index == index).count();
    assert_eq!(observed("0x34"), 2, "the observer saw both SMI_COUNT accesses");
    assert!(
        r.trace
            .iter()
            .filter(|t| t.index == "0xc0000100")
            .all(|t| t.reason == "inval")
    );
}

/// Claims over MSRs whose guest checks depend on state msrwasm cannot see
/// are refused at load, naming the MSR and the plugin.
#[test]
fn claims_kvm_could_not_honour_are_refused_at_load() {
    for (msr, name) in [
        ("0x10", "IA32_TSC"),
        ("0x1b", "IA32_APIC_BASE"),
        ("0x3a", "IA32_FEATURE_CONTROL"),
        ("0x3b", "IA32_TSC_ADJUST"),
        ("0x345", "IA32_PERF_CAPABILITIES"),
        ("0xc0000080", "IA32_EFER"),
        ("0x0-0xfff", "IA32_TSC"),
    ] {
        let (_dir, spec) = manifest(&format!(
            "[[plugin]]\nname = \"observer\"\npath = \"{}\"\nmsrs = [\"{msr}\"]\n",
            test_plugin("observer.wat").display()
        ));
        let e = msrwasm::Engine::builder()
            .filter(msrwasm::filter::RecordingFilter::default())
            .build(spec)
            .unwrap_err();
        let e = msrwasm::tools::error_chain(&e);
        assert!(e.contains("plugin `observer` claims") && e.contains(name), "{msr}: {e}");
    }
}

/// A plugin rewritten in place with a pause mid-write: the first half was a
/// valid plugin (answering 0), and used to go live. Now a file modified in
/// place is read only once its writer closed it.
#[test]
fn a_plugin_written_in_place_never_serves_its_first_half() {
    if !kvm_available() {
        return;
    }
    // The prefix answers what is in memory at 0 (zero); the whole file
    // adds a data segment that puts 7 there.
    let prefix = wat::parse_str(
        r#"(module (import "msr" "reply" (func (param i64))) (memory 1)
          (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
          (func (export "rdmsr") (param i32) (result i32) (call 0 (i64.load (i32.const 0))) (i32.const 0)))"#,
    )
    .unwrap();
    let mut data = vec![1u8, 0x00, 0x41, 0x00, 0x0b, 8, 7, 0, 0, 0, 0, 0, 0, 0];
    data.splice(0..0, [11u8, 14]);
    let whole: Vec<u8> = prefix.iter().chain(&data).copied().collect();
    wasmparser::Validator::new().validate_all(&prefix).unwrap();
    wasmparser::Validator::new().validate_all(&whole).unwrap();

    let LivePlugin {
        dir: _dir, plugin, vm, ..
    } = live_plugin();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&plugin)
            .unwrap();
        f.write_all(&prefix).unwrap();
        f.sync_all().unwrap();
        // Far longer than the debounce: the watcher sees a quiet, valid file.
        std::thread::sleep(std::time::Duration::from_millis(400));
        f.write_all(&data).unwrap();
    }
    let engine = vm.engine.clone();
    let whole_hash = msrwasm::tools::content_hash(&whole);
    wait_until("the whole file is live", || {
        engine.policy().plugins().next().unwrap().version == whole_hash
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let run = vm.finish();
    assert_eq!(run.report.end, VmEnd::Signal(15));
    let values: Vec<&str> = run.trace.iter().filter_map(|r| r.value.as_deref()).collect();
    assert!(!values.contains(&"0x0"), "the half-written file answered");
    assert_eq!(values.last(), Some(&"0x7"));
}

/// Runs `scenario` on a live VM whose plugin path is `plugin` (answering 1
/// at first); it must make a version answering 2 live.
fn reload_scenario(what: &str, spec: PolicySpec, scenario: impl FnOnce()) {
    let vm = start(&guest("msr_forever.elf"), 1, spec);
    let name = vm.engine.policy().plugins().next().unwrap().name.clone();
    let scope = vm.state.scope(&name);
    wait_until(&format!("{what}: version 1 answers"), || scope.get(1) == 1);
    scenario();
    wait_until(&format!("{what}: version 2 answers"), || scope.get(1) == 2);
    let run = vm.finish();
    assert_eq!(run.report.end, VmEnd::Signal(15), "{what}");
    assert!(run.trace.iter().all(|r| r.outcome == "ok"), "{what}");
}

#[test]
fn hot_reload_follows_a_deleted_and_recreated_directory() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("plugins");
    std::fs::create_dir(&sub).unwrap();
    let plugin = sub.join("p.wasm");
    std::fs::write(&plugin, answering(1)).unwrap();
    reload_scenario("directory re-created", quick(&plugin), || {
        std::fs::remove_dir_all(&sub).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(&plugin, answering(2)).unwrap();
    });
}

#[test]
fn hot_reload_follows_a_kubernetes_data_symlink_swap() {
    if !kvm_available() {
        return;
    }
    // A ConfigMap volume: cfg/p.wasm -> ..data/p.wasm, ..data -> ..v1.
    let cfg = tempfile::tempdir().unwrap();
    let c = cfg.path();
    std::fs::create_dir(c.join("..v1")).unwrap();
    std::fs::write(c.join("..v1/p.wasm"), answering(1)).unwrap();
    symlink("..v1", c.join("..data")).unwrap();
    symlink("..data/p.wasm", c.join("p.wasm")).unwrap();
    reload_scenario("..data swap", quick(&c.join("p.wasm")), || {
        std::fs::create_dir(c.join("..v2")).unwrap();
        std::fs::write(c.join("..v2/p.wasm"), answering(2)).unwrap();
        symlink("..v2", c.join("..data_tmp")).unwrap();
        std::fs::rename(c.join("..data_tmp"), c.join("..data")).unwrap();
        std::fs::remove_dir_all(c.join("..v1")).unwrap();
    });
}

#[test]
fn hot_reload_follows_a_symlink_target_edited_elsewhere() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    std::fs::write(b.join("real.wasm"), answering(1)).unwrap();
    symlink("../b/real.wasm", a.join("p.wasm")).unwrap();
    reload_scenario("symlink target", quick(&a.join("p.wasm")), || {
        atomic_write(&b.join("real.wasm"), &answering(2));
    });
}

#[test]
fn hot_reload_of_a_manifest_whose_plugin_path_goes_through_dot_dot() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for v in [1, 2] {
        std::fs::write(m.join(format!("v{v}.wasm")), answering(v)).unwrap();
    }
    let manifest = m.join("vm.toml");
    std::fs::write(&manifest, "[[plugin]]\nname = \"p\"\npath = \"../m/v1.wasm\"\n").unwrap();
    reload_scenario(
        "manifest beside a ../ path",
        PolicySpec::from_manifest(&manifest).unwrap(),
        || {
            atomic_write(&manifest, b"[[plugin]]\nname = \"p\"\npath = \"../m/v2.wasm\"\n");
        },
    );
}

#[test]
fn a_manifest_that_arrives_before_its_plugin_goes_live_when_the_plugin_does() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("v1.wasm"), answering(1)).unwrap();
    let manifest = dir.path().join("vm.toml");
    std::fs::write(&manifest, "[[plugin]]\nname = \"p\"\npath = \"v1.wasm\"\n").unwrap();
    reload_scenario(
        "plugin after manifest",
        PolicySpec::from_manifest(&manifest).unwrap(),
        || {
            atomic_write(&manifest, b"[[plugin]]\nname = \"p\"\npath = \"later/v2.wasm\"\n");
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::fs::create_dir(dir.path().join("later")).unwrap();
            atomic_write(&dir.path().join("later/v2.wasm"), &answering(2));
        },
    );
}

/// A manifest replaced by a FIFO nobody writes to, then by a device, on a
/// running VM: each is refused without blocking the reload path, and the
/// good manifest that follows goes live.
#[test]
fn a_manifest_swapped_for_a_fifo_or_a_device_is_refused_and_reloads_go_on() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("v1.wasm"), answering(1)).unwrap();
    std::fs::write(dir.path().join("v2.wasm"), answering(2)).unwrap();
    let manifest = dir.path().join("vm.toml");
    std::fs::write(&manifest, "[[plugin]]\nname = \"p\"\npath = \"v1.wasm\"\n").unwrap();
    reload_scenario(
        "manifest swapped for a FIFO",
        PolicySpec::from_manifest(&manifest).unwrap(),
        || {
            let fifo = dir.path().join("fifo");
            mkfifo(&fifo);
            std::fs::rename(&fifo, &manifest).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(500));
            let temp = dir.path().join("link.tmp");
            symlink("/dev/zero", &temp).unwrap();
            std::fs::rename(&temp, &manifest).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(500));
            atomic_write(&manifest, b"[[plugin]]\nname = \"p\"\npath = \"v2.wasm\"\n");
        },
    );
}

#[test]
fn a_good_plugin_beside_a_broken_manifest_in_one_batch_goes_live() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("p.wasm");
    std::fs::write(&plugin, answering(1)).unwrap();
    let manifest = dir.path().join("vm.toml");
    std::fs::write(&manifest, "[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\n").unwrap();
    reload_scenario(
        "plugin with a broken manifest",
        PolicySpec::from_manifest(&manifest).unwrap(),
        || {
            atomic_write(&plugin, &answering(2));
            atomic_write(&manifest, b"[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\ncolour = 1\n");
        },
    );
}

#[test]
fn a_change_made_before_the_watcher_started_is_found() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("p.wasm");
    std::fs::write(&plugin, answering(1)).unwrap();
    let mut config = msrwasm_cli::runner::VmConfig::new(guest("msr_forever.elf"), quick(&plugin));
    config.watch = true;
    config.serial = Box::new(std::io::sink());
    let vm = msrwasm_cli::runner::Vm::new(config).unwrap();
    // Loaded; now the file changes; only then does the VM (and its watcher) start.
    atomic_write(&plugin, &answering(2));
    let (stop, engine) = (vm.stop_handle(), vm.engine().clone());
    let running = std::thread::spawn(move || vm.run());
    let scope = engine.state().scope("p");
    wait_until("version 2 answers", || scope.get(1) == 2);
    stop.stop();
    assert_eq!(running.join().unwrap().unwrap().end, VmEnd::Signal(15));
}

#[test]
fn a_plugin_swapped_for_a_device_is_refused_and_the_running_version_stays() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("p.wasm");
    std::fs::write(dir.path().join("real1.wasm"), answering(1)).unwrap();
    symlink("real1.wasm", &plugin).unwrap();
    let swap = |target: &str| {
        let temp = dir.path().join("link.tmp");
        symlink(target, &temp).unwrap();
        std::fs::rename(&temp, &plugin).unwrap();
    };
    reload_scenario("/dev/zero, then a good version", quick(&plugin), || {
        swap("/dev/zero");
        // A FIFO nobody writes to would block a reader for ever.
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        std::thread::sleep(std::time::Duration::from_millis(300));
        swap("fifo");
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::write(dir.path().join("real2.wasm"), answering(2)).unwrap();
        swap("real2.wasm");
    });
}
