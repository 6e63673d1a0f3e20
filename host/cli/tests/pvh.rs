//! PVH guests as `msrwasm guests` writes them, run by `msrwasm run` on real
//! KVM: the PVH entry note, 32-bit protected mode, COM1, a plugin's MSR and
//! KVM's, the power-off sequence, and a hot reload seen from the guest.

#[path = "../../../tests/support/common.rs"]
mod common;
use common::kvm_available;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Generous bound on every wait: a slow, nested, loaded machine is fine.
const TIMEOUT: Duration = Duration::from_secs(60);

fn msrwasm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_msrwasm"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A plugin claiming MSR 0x35 and answering `value`.
fn plugin(value: u64) -> String {
    format!(
        r#"(module
  (import "msr" "reply" (func $reply (param i64)))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "claim") (param $n i32) (result i64)
    (if (result i64) (i32.eqz (local.get $n))
      (then (i64.const 0x0000003500000035))
      (else (i64.const -1))))
  (func (export "rdmsr") (param $index i32) (result i32)
    (if (i32.ne (local.get $index) (i32.const 0x35)) (then (return (i32.const 2))))
    (call $reply (i64.const {value:#x}))
    (i32.const 0)))
"#
    )
}

/// Writes `text` to `path` whole: a temporary file renamed into place.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `msrwasm guests DIR/g`.
fn guests(dir: &Path) -> PathBuf {
    let out = dir.join("g");
    let o = msrwasm().arg("guests").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// The PVH entry linux-loader (as cloud-hypervisor and Firecracker use it)
/// finds in the ELF at `path`.
fn pvh_entry(path: &Path) -> PvhBootCapability {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let mut file = std::fs::File::open(path).unwrap();
    Elf::load(&mem, None, &mut file, Some(GuestAddress(0x10_0000)))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .pvh_boot_cap
}

/// A running `msrwasm run`, killed (by its own handle) if the test fails
/// before it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for `child` to end, at most TIMEOUT (then fails; the drop kills it).
fn wait(mut child: Running, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: still running after {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of the child's standard output, as they come.
fn lines(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next line containing `needle`, waiting at most TIMEOUT.
fn line_with(rx: &Receiver<String>, needle: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("no {needle:?} within {TIMEOUT:?}; output: {seen:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the guest ended without {needle:?}; output: {seen:?}"),
        }
    }
}

#[test]
fn guests_writes_pvh_guests_with_the_pvh_note() {
    let dir = tempfile::tempdir().unwrap();
    let g = guests(dir.path());
    for name in ["pvh.elf", "pvh_reload.elf"] {
        assert!(
            matches!(pvh_entry(&g.join(name)), PvhBootCapability::PvhEntryPresent(_)),
            "{name}: no XEN_ELFNOTE_PHYS32_ENTRY note"
        );
    }
    // What `guests` wrote is enough to build a PVH guest (the documented
    // command line).
    let built = dir.path().join("built.elf");
    let o = Command::new("cc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-I"])
        .arg(&g)
        .arg("-T")
        .arg(g.join("pvh.ld"))
        .arg("-o")
        .arg(&built)
        .arg(g.join("pvh.S"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(matches!(pvh_entry(&built), PvhBootCapability::PvhEntryPresent(_)));
    // The existing long-mode guests have no PVH note.
    assert!(!matches!(
        pvh_entry(&g.join("msr_loop.elf")),
        PvhBootCapability::PvhEntryPresent(_)
    ));
}

#[test]
fn pvh_guest_prints_a_plugin_msr_and_a_kvm_msr_and_powers_off() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = guests(dir.path());
    let p = dir.path().join("answer.wat");
    std::fs::write(&p, plugin(0x1234_5678_9abc)).unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    // Native code and Pulley bytecode (the no-JIT mode) answer alike.
    for mode in ["jit", "no-jit"] {
        let child = msrwasm()
            .args(["run", "--mode", mode, "--plugin"])
            .arg(&p)
            .arg(g.join("pvh.elf"))
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .map(Running)
            .unwrap();
        let status = wait(child, "pvh.elf");
        let out = std::fs::read_to_string(&out_path).unwrap();
        let err = std::fs::read_to_string(&err_path).unwrap();
        assert_eq!(status.code(), Some(0), "{mode}: {out}\n{err}");
        assert!(
            out.contains("pvh: MSR 0x35 (plugin) = 0x0000123456789abc\n"),
            "{mode}: the plugin's value:\n{out}"
        );
        // KVM's own IA32_APIC_BASE: the local APIC's default base, enabled
        // (bit 11), the bootstrap processor (bit 8).
        assert!(
            out.contains("pvh: MSR 0x1b (KVM) = 0x00000000fee00900\n"),
            "{mode}: KVM's value:\n{out}"
        );
        assert!(err.contains("powered off"), "{mode}: {err}");
    }

    // Without a plugin the read of 0x35 faults: the guest says so and
    // fails (status 1 on msrwasm's exit port) instead of dying.
    let o = msrwasm().arg("run").arg(g.join("pvh.elf")).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", stderr(&o));
    assert!(out.contains("pvh: MSR 0x35 (plugin) = #GP\n"), "{out}");
}

#[test]
fn pvh_reload_guest_sees_a_hot_reload_and_powers_off() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let g = guests(dir.path());
    let p = dir.path().join("live.wat");
    std::fs::write(&p, plugin(0x1111)).unwrap();
    let mut child = msrwasm()
        .arg("run")
        .arg("--plugin")
        .arg(&p)
        .arg(g.join("pvh_reload.elf"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    let rx = lines(&mut child.0);
    let mut seen = Vec::new();
    let first = line_with(&rx, "reading until it changes", &mut seen);
    assert_eq!(
        first,
        "pvh_reload: MSR 0x35 = 0x0000000000001111, reading until it changes"
    );
    // The guest has its first value: a new version of the plugin now.
    replace(&p, &plugin(0x2222));
    let changed = line_with(&rx, "changed from", &mut seen);
    assert!(
        changed.starts_with("pvh_reload: MSR 0x35 changed from 0x0000000000001111 to 0x0000000000002222 after 0x"),
        "{changed}"
    );
    assert!(changed.ends_with(" reads"), "{changed}");
    let status = wait(child, "pvh_reload.elf");
    assert_eq!(status.code(), Some(0), "{seen:?}");
}
