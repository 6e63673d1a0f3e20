//! A minimal VMM that embeds msrwasm: it owns the VM, guest memory, the
//! vCPU thread and its run loop (kvm-ioctls, kvm-bindings, vm-memory), and
//! hands MSR exits to msrwasm's public API. It shows, on a real guest:
//!
//! 1. a plugin answering an MSR KVM does not know;
//! 2. a claimed MSR every plugin passes on, answered by KVM's own MSR;
//! 3. a filter range the VMM owns (it deflects reads of IA32_TSC to itself),
//!    merged with the plugins' claims into one KVM MSR filter;
//! 4. a hot reload of the plugin file while the guest runs;
//! 5. a programmatic policy update that a later file reload does not undo.
//!
//! It uses only msrwasm's stable API (the crate root, `kvm`, `watch`,
//! `filter`), owns its `VmFd` by value as Firecracker does, and keeps the
//! dispatcher in a `Send + Sync` vCPU struct as cloud-hypervisor does.
//! It exits 0 once all five were seen. Run it (needs /dev/kvm):
//!
//! ```sh
//! cargo run -p msrwasm --example vmm_loop
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use msrwasm::filter::VmmRange;
use msrwasm::{Engine, ExitReason, PolicySpec, Reply, Unhandled, kvm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// An MSR KVM does not know: the plugin answers it.
const PLUGIN_MSR: u32 = 0x4d53_0042;
/// A claimed MSR the plugin passes on: KVM's own value answers it.
const FALLBACK_MSR: u32 = 0x174; // IA32_SYSENTER_CS
/// The VMM's own filter range: it answers reads of the TSC itself.
const VMM_MSR: u32 = 0x10;
const VMM_TSC: u64 = 0x5eed;

/// Real-mode guest at 0x1000: RDMSR the three MSRs, forever.
const GUEST: [u8; 26] = [
    0x66, 0xb9, 0x42, 0x00, 0x53, 0x4d, // mov ecx, 0x4d530042
    0x0f, 0x32, // rdmsr
    0x66, 0xb9, 0x74, 0x01, 0x00, 0x00, // mov ecx, 0x174
    0x0f, 0x32, // rdmsr
    0x66, 0xb9, 0x10, 0x00, 0x00, 0x00, // mov ecx, 0x10
    0x0f, 0x32, // rdmsr
    0xeb, 0xe6, // jmp 0x1000
];

/// The plugin: answers PLUGIN_MSR with `config("value") + version * 1000`,
/// passes on everything else it is asked about.
fn plugin(version: u64) -> String {
    format!(
        r#"(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "config" (func $config (param i32 i32 i64) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "value")
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param $i i32) (result i32)
    (if (i32.ne (local.get $i) (i32.const {PLUGIN_MSR})) (then (return (i32.const 2))))
    (call $reply (i64.add (call $config (i32.const 0) (i32.const 5) (i64.const 1)) (i64.const {})))
    (i32.const 0)))"#,
        version * 1000
    )
}

/// What the vCPU thread saw: (MSR, value, who answered).
type Seen = (u32, u64, &'static str);

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plugin_path = dir.path().join("answer.wat");
    std::fs::write(&plugin_path, plugin(1))?;

    // The VMM's VM and memory.
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    register_memory(&vm, &mem)?;
    mem.write_slice(&GUEST, GuestAddress(0x1000))?;

    // --- msrwasm: enable MSR exits, build the engine with the VMM's filter.
    kvm::check_support(&kvm)?;
    kvm::enable_user_space_msrs(&vm)?;
    let mut spec = PolicySpec::from_paths(std::slice::from_ref(&plugin_path), Unhandled::Gp);
    spec.plugins[0].msrs = Some(vec![(FALLBACK_MSR, FALLBACK_MSR), (PLUGIN_MSR, PLUGIN_MSR)]);
    let own = VmmRange {
        first: VMM_MSR,
        last: VMM_MSR,
        read: true,
        write: false,
    };
    let engine = Engine::builder()
        .filter(kvm::KvmFilter::new(&kvm, &vm, vec![own])?)
        .build(spec.clone())?;
    let _watcher = msrwasm::watch::Watcher::spawn(&engine)?;
    // ---

    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    (regs.rip, regs.rflags) = (0x1000, 2);
    vcpu.set_regs(&regs)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let mut vcpu = Vcpu {
        fd: vcpu,
        msrs: engine.dispatcher(0),
    };
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || vcpu.run_loop(&stop, &tx))
    };

    // The scenario: each step waits until the guest shows its effect.
    let deadline = Instant::now() + Duration::from_secs(60);
    let wait_for = |what: &str, want: &mut dyn FnMut(&Seen) -> bool| -> Result<()> {
        loop {
            let seen = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            match seen {
                Ok(seen) if want(&seen) => {
                    println!("seen: {what} ({:#x} = {:#x}, answered by {})", seen.0, seen.1, seen.2);
                    return Ok(());
                }
                Ok(_) => {}
                Err(_) => bail!("never saw: {what}"),
            }
        }
    };
    let mut todo: BTreeSet<&str> = ["plugin", "kvm", "vmm"].into();
    wait_for("the plugin, the KVM fallback and the VMM's own range", &mut |s| {
        todo.remove(s.2);
        todo.is_empty()
    })?;

    std::fs::write(&plugin_path, plugin(2))?;
    wait_for("a hot reload of the plugin file", &mut |s| {
        *s == (PLUGIN_MSR, 2001, "plugin")
    })?;

    spec.plugins[0].config.insert("value".into(), 7);
    let generation = engine.update(spec).context("update refused")?;
    println!("update(): generation {generation}");
    wait_for("the programmatic update", &mut |s| *s == (PLUGIN_MSR, 2007, "plugin"))?;

    std::fs::write(&plugin_path, plugin(3))?;
    wait_for("a later file reload that keeps the update's config", &mut |s| {
        *s == (PLUGIN_MSR, 3007, "plugin")
    })?;

    stop.store(true, Ordering::Release);
    thread.join().expect("vCPU thread")?;
    println!("all seen; {} MSR accesses answered", engine.stats().total().rdmsr);
    Ok(())
}

/// The VMM's vCPU: like cloud-hypervisor's, it must be `Send + Sync`.
struct Vcpu {
    fd: VcpuFd,
    msrs: msrwasm::Dispatcher,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Vcpu>()
};

impl Vcpu {
    /// The VMM's run loop. The MSR integration is the `msr_access` match
    /// arm and the `handle_exit` call.
    fn run_loop(&mut self, stop: &AtomicBool, tx: &Sender<Seen>) -> Result<()> {
        while !stop.load(Ordering::Acquire) {
            let access = match self.fd.run()? {
                exit @ (VcpuExit::X86Rdmsr(_) | VcpuExit::X86Wrmsr(_)) => kvm::msr_access(&exit),
                other => bail!("unexpected exit {other:?}"),
            };
            let Some(access) = access else { continue };
            if access.index == VMM_MSR && access.reason == ExitReason::Filter {
                // The VMM's own range: answered by the VMM, not by msrwasm.
                kvm::complete(&mut self.fd, Reply::Read(VMM_TSC))?;
                let _ = tx.send((VMM_MSR, VMM_TSC, "vmm"));
                continue;
            }
            let outcome = self.msrs.handle_exit(&mut self.fd, access)?;
            let value = match outcome.reply {
                Reply::Read(v) => v,
                _ => u64::MAX,
            };
            let _ = tx.send((access.index, value, outcome.by.kind()));
        }
        Ok(())
    }
}

/// Registers guest memory with KVM: VMM code, not msrwasm's.
#[allow(unsafe_code)]
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: mem.get_host_address(region.start_addr())? as u64,
        };
        // SAFETY: the mapping belongs to `mem`, which lives until the process
        // ends (main owns it past the vCPU thread's end), and slots do not
        // overlap.
        unsafe { vm.set_user_memory_region(region_desc)? };
    }
    Ok(())
}
