//! The default-deny MSR firewall (`filter_default = "deny"`, `allow`), and
//! `unhandled = "log"` logging each distinct MSR once per VM, on live
//! guests. The log lines are captured from this test binary's subscriber.

use std::sync::{Arc, Mutex, OnceLock};

use msrwasm_tests::{guest, kvm_available, manifest, run, start, test_plugin, wait_until};

fn echo() -> String {
    test_plugin("echo.wat").display().to_string()
}

/// Everything msrwasm logs in this process, as text.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per test binary");
        buf
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(needle: &str) -> usize {
    let logs = logs();
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    text.lines().filter(|l| l.contains(needle)).count()
}

/// Linux's `userspace_msr_exit_test` msr_filter_deny: with a deny-default
/// filter and no ranges, every MSR access, even of MSRs KVM knows, leaves
/// KVM with reason FILTER and user space (here: a catch-all plugin, then
/// `unhandled = "ignore"`) answers.
#[test]
fn msr_filter_deny_sends_every_access_to_user_space() {
    if !kvm_available() {
        return;
    }
    let (_dir, spec) = manifest(&format!(
        "filter_default = \"deny\"\nunhandled = \"ignore\"\n\
         [[plugin]]\nname = \"user_space\"\npath = \"{}\"\n[plugin.config]\nmode = 1\n",
        echo()
    ));
    let r = run(&guest("selftest_deny.elf"), 1, spec).unwrap();
    r.expect_status(0);
    assert_eq!(r.trace.len(), 8, "{:#?}", r.trace);
    assert!(r.trace.iter().all(|t| t.reason == "filter"), "{:#?}", r.trace);
    // Denied writes the plugin passes on are not handed back to KVM.
    let power = r.traced("wrmsr", "0x1fc");
    assert_eq!(power[0].by, "firewall");
}

#[test]
fn msrs_kvm_knows_outside_allow_fault_with_one_log_line_each() {
    if !kvm_available() {
        return;
    }
    logs();
    let (_dir, spec) = manifest(&format!(
        "filter_default = \"deny\"\nallow = [\"0xc0000100\"]\nunhandled = \"gp\"\n\
         [[plugin]]\nname = \"claims\"\npath = \"{}\"\nmsrs = [\"0x4d530000\"]\n",
        echo()
    ));
    let r = run(&guest("firewall.elf"), 1, spec).unwrap();
    r.expect_status(0);
    assert_eq!(r.traced("rdmsr", "0x10").len(), 2);
    assert!(
        r.traced("rdmsr", "0x10")
            .iter()
            .all(|t| t.outcome == "gp" && t.reason == "filter")
    );
    assert!(r.traced("rdmsr", "0xc0000100").is_empty(), "allowed: stays in KVM");
    assert_eq!(logged("rdmsr 0x10 denied by the MSR firewall"), 1);
    assert_eq!(logged("wrmsr 0x174 <- 0x0 denied by the MSR firewall"), 1);
}

#[test]
fn unhandled_log_logs_each_msr_once_per_vm_across_reloads() {
    if !kvm_available() {
        return;
    }
    logs();
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("p.wasm");
    std::fs::write(&plugin, msrwasm_tests::answering(1)).unwrap();
    let manifest = dir.path().join("vm.toml");
    // The plugin claims another MSR: msr_forever's 0x4d530020 goes to `log`.
    let text = |v: u32| {
        format!("unhandled = \"log\"\n[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\nmsrs = [\"0x4d53{v:04x}\"]\n")
    };
    std::fs::write(&manifest, text(1)).unwrap();
    let vm = start(
        &guest("msr_forever.elf"),
        1,
        msrwasm::PolicySpec::from_manifest(&manifest).unwrap(),
    );
    let engine = vm.engine.clone();
    wait_until("the MSR is logged", || logged("rdmsr 0x4d530020 unhandled") >= 1);
    for v in 2..5 {
        msrwasm_tests::atomic_write(&manifest, text(v).as_bytes());
        wait_until("the new manifest is live", || engine.generation() == u64::from(v));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let run = vm.finish();
    assert!(run.trace.iter().all(|t| t.by == "unhandled"));
    assert_eq!(logged("rdmsr 0x4d530020 unhandled"), 1, "once per VM, not per policy");
}
