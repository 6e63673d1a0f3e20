//! msrwasm inside a hardened VMM: the engine runs under real seccomp filters
//! (built with the `seccompiler` crate, kill action) that mirror the thread
//! profiles of cloud-hypervisor (JIT mode) or Firecracker (no-JIT mode: no
//! `PROT_EXEC`, no `mprotect` on the vCPU thread, read/write anonymous
//! `mmap` only there, no thread created after start). On a real guest it
//! shows a plugin answer, a plugin error (after a `memory.grow`: the vCPU
//! makes a fresh instance), a KVM fallback, a firewall refusal and a hot
//! reload, all under the filters; any syscall outside them kills the
//! process with SIGSYS. It exits non-zero unless all five were seen.
//!
//! ```sh
//! # JIT mode, cloud-hypervisor's profile:
//! cargo run -p msrwasm --example hardened_vmm -- jit
//! # no-JIT mode, Firecracker's profile (Pulley, compiled in this process):
//! cargo run -p msrwasm --example hardened_vmm -- no-jit
//! # no-JIT mode in a build without the compiler: plugins compiled
//! # elsewhere, found in DIR/cache by content
//! cargo run -p msrwasm --example hardened_vmm -- write-plugins DIR
//! msrwasm check --mode no-jit --cache-dir DIR/cache DIR/answer.wat DIR/answer-v2.wat
//! cargo run -p msrwasm --no-default-features --features kvm,watch --example hardened_vmm -- no-jit DIR
//! ```
//!
//! The order is the point: everything that maps memory, installs signal
//! handlers or starts threads happens before the filters (engine, watcher,
//! `Engine::prepare_thread`, `Dispatcher::warm_up`); after them the VMM
//! thread only drives reloads (`Watcher::process`) and the vCPU thread only
//! answers exits. `docs/embedding.md` lists every rule msrwasm adds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_msr_filter, kvm_msrs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use msrwasm::{Engine, ExecMode, PolicySpec, Reload, Reply, kvm};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// A plugin answers it (KVM does not know it).
const PLUGIN_MSR: u32 = 0x4d53_0042;
/// Claimed, passed on by the plugin: KVM's own value answers (the firewall
/// allows it).
const FALLBACK_MSR: u32 = 0x174; // IA32_SYSENTER_CS
/// Not in the firewall's `allow` list: refused with #GP.
const DENIED_MSR: u32 = 0x1b; // IA32_APIC_BASE
/// The plugin grows its memory, then traps: #GP (`on_error = "fault"`).
const TRAP_MSR: u32 = 0x4d53_0043;

/// Real-mode guest at 0x1000: RDMSR the three MSRs forever, and the
/// trapping one once (a flag at 0x2000).
const GUEST: [u8; 46] = [
    0x66, 0xb9, 0x42, 0x00, 0x53, 0x4d, // mov ecx, 0x4d530042
    0x0f, 0x32, // rdmsr
    0x66, 0xb9, 0x74, 0x01, 0x00, 0x00, // mov ecx, 0x174
    0x0f, 0x32, // rdmsr
    0x66, 0xb9, 0x1b, 0x00, 0x00, 0x00, // mov ecx, 0x1b
    0x0f, 0x32, // rdmsr: #GP
    0x80, 0x3e, 0x00, 0x20, 0x00, // cmp byte [0x2000], 0
    0x75, 0x0d, // jne +13
    0xc6, 0x06, 0x00, 0x20, 0x01, // mov byte [0x2000], 1
    0x66, 0xb9, 0x43, 0x00, 0x53, 0x4d, // mov ecx, 0x4d530043
    0x0f, 0x32, // rdmsr: #GP
    0xeb, 0xd2, // jmp 0x1000
];
/// The #GP handler at 0x1100 (IVT vector 13): skip the 2-byte RDMSR.
const GP_HANDLER: [u8; 9] = [
    0x55, // push bp
    0x89, 0xe5, // mov bp, sp
    0x83, 0x46, 0x02, 0x02, // add word [bp+2], 2
    0x5d, // pop bp
    0xcf, // iret
];

fn plugin(version: u64) -> String {
    format!(
        r#"(module
  (import "msr" "reply" (func $reply (param i64)))
  (memory (export "memory") 1)
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param $i i32) (result i32)
    (if (i32.eq (local.get $i) (i32.const {TRAP_MSR}))
      (then (drop (memory.grow (i32.const 16))) (unreachable)))
    (if (i32.ne (local.get $i) (i32.const {PLUGIN_MSR})) (then (return (i32.const 2))))
    (call $reply (i64.const {}))
    (i32.const 0)))"#,
        version * 1000 + 42
    )
}

fn manifest() -> String {
    format!(
        "filter_default = \"deny\"\nallow = [\"{FALLBACK_MSR:#x}\"]\nunhandled = \"gp\"\n\n[[plugin]]\nname = \"answer\"\npath = \"answer.wat\"\nmsrs = [\"{PLUGIN_MSR:#x}\", \"{FALLBACK_MSR:#x}\", \"{TRAP_MSR:#x}\"]\n"
    )
}

/// The plugin files, the manifest, and where the reload's new version waits.
fn write_plugins(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("answer.wat"), plugin(1))?;
    std::fs::write(dir.join("answer-v2.wat"), plugin(2))?;
    std::fs::write(dir.join("vm.toml"), manifest())?;
    Ok(())
}

/// What the vCPU thread saw: (MSR, value, who answered).
type Seen = (u32, u64, &'static str);

fn main() {
    // Errors are printed without a backtrace: resolving one maps the
    // executable's debug info, which the filters (rightly) forbid.
    if let Err(e) = run() {
        eprintln!("hardened_vmm: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, dir) = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["write-plugins", dir] => return write_plugins(Path::new(dir)),
        [mode] => (mode.parse::<ExecMode>().map_err(anyhow::Error::msg)?, None),
        [mode, dir] => (
            mode.parse::<ExecMode>().map_err(anyhow::Error::msg)?,
            Some(PathBuf::from(dir)),
        ),
        _ => bail!("usage: hardened_vmm jit|no-jit [DIR]  |  hardened_vmm write-plugins DIR"),
    };
    // The files live in a temporary directory (an absolute path: a
    // relative one would make every reload call `getcwd`). Given a DIR,
    // they come from there and their code from DIR/cache, compiled
    // elsewhere; else this process compiles them and keeps the code in
    // memory only (a disk cache write needs `rename`, which neither
    // profile allows).
    let temp = tempfile::tempdir()?;
    let cache = match dir {
        Some(dir) => {
            for file in ["answer.wat", "answer-v2.wat", "vm.toml"] {
                std::fs::copy(dir.join(file), temp.path().join(file))
                    .with_context(|| format!("{}", dir.join(file).display()))?;
            }
            Some(std::path::absolute(dir.join("cache"))?)
        }
        None => {
            write_plugins(temp.path())?;
            None
        }
    };
    let dir = temp.path().to_owned();
    let profile = match mode {
        ExecMode::Jit => Profile::CloudHypervisor,
        _ => Profile::Firecracker, // no-JIT
    };
    println!("mode {}, filters mirroring {profile:?}", mode.name());
    one_malloc_arena();

    // The VMM's VM and memory.
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    register_memory(&vm, &mem)?;
    mem.write_slice(&GUEST, GuestAddress(0x1000))?;
    mem.write_slice(&GP_HANDLER, GuestAddress(0x1100))?;
    mem.write_obj(0x0000_1100u32, GuestAddress(13 * 4))?; // IVT[13] = 0000:1100

    // --- msrwasm, all before the filters: the engine (its epoch thread),
    // the watcher (notify's thread), this thread's signal stack.
    kvm::check_support(&kvm)?;
    kvm::enable_user_space_msrs(&vm)?;
    let spec = PolicySpec::from_manifest(&dir.join("vm.toml"))?;
    let mut builder = Engine::builder().mode(mode);
    if let Some(cache) = cache {
        builder = builder.cache_dir(cache);
    }
    let engine = builder.filter(kvm::KvmFilter::new(&kvm, &vm, vec![])?).build(spec)?;
    let mut watcher = msrwasm::watch::Watcher::new(&engine)?;
    engine.prepare_thread();
    // ---

    let vcpu = vm.create_vcpu(0)?;
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    let mut sregs = vcpu.get_sregs()?;
    (sregs.cs.base, sregs.cs.selector) = (0, 0);
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    (regs.rip, regs.rflags, regs.rsp) = (0x1000, 2, 0x8000);
    vcpu.set_regs(&regs)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let (ready_tx, ready_rx) = channel();
    let mut vcpu = Vcpu {
        fd: vcpu,
        msrs: engine.dispatcher(0),
    };
    let vcpu_filter = profile.vcpu()?;
    let vcpu_thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || -> Result<Vcpu> {
                vcpu.msrs.warm_up()?; // instances and this thread's signal stack
                seccompiler::apply_filter(&vcpu_filter)?;
                let _ = ready_tx.send(());
                vcpu.run_loop(&stop, &tx)?;
                // Closed on the VMM thread, whose filter allows what closing
                // needs (debug builds of std check the fd with fcntl).
                Ok(vcpu)
            })?
    };
    // The operator: another process in real life (it writes files, which
    // the VMM's filter forbids); a thread started before the filters here.
    let (swap_tx, swap_rx) = channel::<()>();
    let operator = {
        let dir = dir.clone();
        std::thread::spawn(move || -> Result<()> {
            if swap_rx.recv().is_ok() {
                let staged = dir.join(".answer.wat.new");
                std::fs::copy(dir.join("answer-v2.wat"), &staged)?;
                std::fs::rename(&staged, dir.join("answer.wat"))?;
            }
            // At the end (the VMM hangs up) it removes the temporary files.
            while swap_rx.recv().is_ok() {}
            drop(temp);
            Ok(())
        })
    };
    // The VMM thread's epoll: set up before its filter, as a VMM does.
    let epoll = Epoll::new()?;
    let wfd = std::os::fd::AsRawFd::as_raw_fd(&watcher);
    epoll.ctl(ControlOperation::Add, wfd, EpollEvent::new(EventSet::IN, wfd as u64))?;
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the vCPU thread never applied its filter")?;
    seccompiler::apply_filter(&profile.vmm()?)?;
    println!("filters applied: vCPU and VMM threads; no new thread from here on");

    // The VMM thread's event loop: reloads, and what the guest saw.
    let mut todo: BTreeSet<&str> = [
        "plugin answer",
        "plugin error",
        "KVM fallback",
        "firewall refusal",
        "hot reload",
    ]
    .into();
    let mut reloaded = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut swapped = false;
    let mut events = [EpollEvent::default(); 4];
    while !todo.is_empty() && Instant::now() < deadline {
        if epoll.wait(10, &mut events)? > 0 {
            for reload in watcher.process() {
                println!("reload: {reload:?}");
                reloaded |= matches!(reload, Reload::Applied { .. });
            }
        }
        for (msr, value, by) in rx.try_iter() {
            let seen = match (msr, by) {
                (PLUGIN_MSR, "plugin") if value == 1042 => "plugin answer",
                (PLUGIN_MSR, "plugin") if value == 2042 && reloaded => "hot reload",
                (TRAP_MSR, "plugin") if value == u64::MAX => "plugin error",
                (FALLBACK_MSR, "kvm") => "KVM fallback",
                (DENIED_MSR, "firewall") => "firewall refusal",
                _ => continue,
            };
            if todo.remove(seen) {
                println!("seen: {seen} ({msr:#x} = {value:#x}, answered by {by})");
            }
        }
        if !swapped && todo.len() == 1 && todo.contains("hot reload") {
            swapped = swap_tx.send(()).is_ok();
        }
    }
    stop.store(true, Ordering::Release);
    drop(vcpu_thread.join().expect("vCPU thread")?);
    drop(swap_tx);
    operator.join().expect("operator thread")?;
    if !todo.is_empty() {
        bail!("never seen under the filters: {todo:?}");
    }
    let stats = engine.stats().total();
    println!(
        "all seen under the filters, no SIGSYS; {} RDMSR exits answered",
        stats.rdmsr
    );
    Ok(())
}

/// The VMM's vCPU.
struct Vcpu {
    fd: VcpuFd,
    msrs: msrwasm::Dispatcher,
}

impl Vcpu {
    /// The run loop. The MSR integration is the `msr_access` match arm and
    /// the `handle_exit` call.
    fn run_loop(&mut self, stop: &AtomicBool, tx: &Sender<Seen>) -> Result<()> {
        while !stop.load(Ordering::Acquire) {
            let access = match self.fd.run()? {
                exit @ (VcpuExit::X86Rdmsr(_) | VcpuExit::X86Wrmsr(_)) => kvm::msr_access(&exit),
                other => bail!("unexpected exit {other:?}"),
            };
            let Some(access) = access else { continue };
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

// KVM ioctl numbers the filters name (kvm-ioctls keeps its own private).
const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_iow_nr!(KVM_X86_SET_MSR_FILTER, KVMIO, 0xc6, kvm_msr_filter);
ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, kvm_userspace_memory_region);
ioctl_io_nr!(KVM_NMI, KVMIO, 0x9a);

/// Whose thread profiles the filters mirror.
#[derive(Clone, Copy, Debug)]
enum Profile {
    /// cloud-hypervisor's vCPU and VMM threads (`vmm/src/seccomp_filters.rs`).
    CloudHypervisor,
    /// Firecracker's x86_64 vCPU and VMM threads (`resources/seccomp`).
    Firecracker,
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Syscalls allowed whatever their arguments.
fn allow(rules: &mut Rules, syscalls: &[i64]) {
    for s in syscalls {
        rules.insert(*s, Vec::new());
    }
}

/// A syscall allowed when all of `conds` hold (one more alternative).
fn allow_if(rules: &mut Rules, syscall: i64, conds: Vec<Cond>) -> Result<()> {
    rules.entry(syscall).or_default().push(SeccompRule::new(conds)?);
    Ok(())
}

fn arg_eq(index: u8, value: u64) -> Result<Cond> {
    Ok(Cond::new(index, Len::Dword, Op::Eq, value)?)
}

/// `ioctl(fd, request, ...)` for each request.
fn ioctls(rules: &mut Rules, requests: &[u64]) -> Result<()> {
    for r in requests {
        allow_if(rules, libc::SYS_ioctl, vec![arg_eq(1, *r)?])?;
    }
    Ok(())
}

/// `mmap` with exactly these flags and no `PROT_EXEC`.
fn mmap_no_exec(rules: &mut Rules, flags: &[i32]) -> Result<()> {
    for f in flags {
        let no_exec = Cond::new(2, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0)?;
        allow_if(rules, libc::SYS_mmap, vec![arg_eq(3, *f as u64)?, no_exec])?;
    }
    Ok(())
}

fn compile(rules: Rules) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// cloud-hypervisor's rules common to all its threads.
const CH_COMMON: [i64; 8] = [
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_read,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_write,
];

/// Futex operations Firecracker allows: WAIT, WAKE, WAIT_PRIVATE,
/// WAIT_BITSET_PRIVATE, WAKE_PRIVATE.
const FC_FUTEX_OPS: [u64; 5] = [0, 1, 128, 137, 129];

impl Profile {
    fn vcpu(self) -> Result<BpfProgram> {
        use libc::*;
        let mut r = Rules::new();
        match self {
            Profile::CloudHypervisor => {
                allow(&mut r, &CH_COMMON);
                allow(
                    &mut r,
                    &[
                        SYS_brk,
                        SYS_clock_gettime,
                        SYS_clock_nanosleep,
                        SYS_close,
                        SYS_dup,
                        SYS_exit,
                        SYS_epoll_ctl,
                        SYS_fcntl,
                        SYS_fstat,
                        SYS_fsync,
                        SYS_futex,
                        SYS_getcwd,
                        SYS_getrandom,
                        SYS_lseek,
                        SYS_madvise,
                        SYS_mmap,
                        SYS_mprotect,
                        SYS_mremap,
                        SYS_munmap,
                        SYS_nanosleep,
                        SYS_newfstatat,
                        SYS_open,
                        SYS_pread64,
                        SYS_pwrite64,
                        SYS_pwritev2,
                        SYS_readlink,
                        SYS_recvfrom,
                        SYS_recvmsg,
                        SYS_rt_sigreturn,
                        SYS_sched_yield,
                        SYS_sendmsg,
                        SYS_sendto,
                        SYS_shutdown,
                        SYS_sigaltstack,
                        SYS_statx,
                        SYS_unlink,
                        SYS_writev,
                    ],
                );
                allow_if(
                    &mut r,
                    SYS_openat,
                    vec![Cond::new(
                        2,
                        Len::Dword,
                        Op::MaskedEq(O_ACCMODE as u64),
                        O_RDONLY as u64,
                    )?],
                )?;
                allow_if(&mut r, SYS_prctl, vec![arg_eq(0, PR_GET_NAME as u64)?])?;
                ioctls(
                    &mut r,
                    &[
                        KVM_RUN(),
                        KVM_CHECK_EXTENSION(),
                        KVM_NMI(),
                        KVM_SET_USER_MEMORY_REGION(),
                    ],
                )?;
                // msrwasm's delta: KVM's own MSRs for the fallback.
                ioctls(&mut r, &[KVM_GET_MSRS(), KVM_SET_MSRS()])?;
            }
            Profile::Firecracker => {
                allow(
                    &mut r,
                    &[
                        SYS_brk,
                        SYS_clock_gettime,
                        SYS_close,
                        SYS_epoll_ctl,
                        SYS_eventfd2,
                        SYS_exit,
                        SYS_exit_group,
                        SYS_fstat,
                        SYS_gettid,
                        SYS_mremap,
                        SYS_munmap,
                        SYS_open,
                        SYS_restart_syscall,
                        SYS_rt_sigaction,
                        SYS_rt_sigprocmask,
                        SYS_rt_sigreturn,
                        SYS_sched_yield,
                        SYS_sendmsg,
                        SYS_sigaltstack,
                        SYS_tkill,
                        SYS_write,
                    ],
                );
                for op in FC_FUTEX_OPS {
                    allow_if(&mut r, SYS_futex, vec![arg_eq(1, op)?])?;
                }
                allow_if(&mut r, SYS_madvise, vec![arg_eq(2, MADV_DONTNEED as u64)?])?;
                // Read/write anonymous private memory only: no PROT_NONE
                // reservation, no PROT_EXEC, no mprotect at all.
                allow_if(
                    &mut r,
                    SYS_mmap,
                    vec![
                        arg_eq(3, (MAP_ANONYMOUS | MAP_PRIVATE) as u64)?,
                        arg_eq(2, (PROT_READ | PROT_WRITE) as u64)?,
                    ],
                )?;
                mmap_no_exec(&mut r, &[MAP_SHARED])?;
                allow_if(&mut r, SYS_timerfd_settime, vec![arg_eq(1, 0)?])?;
                ioctls(&mut r, &[KVM_RUN(), KVM_GET_MSRS()])?;
                // msrwasm's delta: KVM's own MSRs for a WRMSR fallback.
                ioctls(&mut r, &[KVM_SET_MSRS()])?;
            }
        }
        compile(r)
    }

    fn vmm(self) -> Result<BpfProgram> {
        use libc::*;
        let mut r = Rules::new();
        match self {
            Profile::CloudHypervisor => {
                allow(&mut r, &CH_COMMON);
                allow(
                    &mut r,
                    &[
                        SYS_accept4,
                        SYS_access,
                        SYS_arch_prctl,
                        SYS_bind,
                        SYS_brk,
                        SYS_clock_gettime,
                        SYS_clock_nanosleep,
                        SYS_clone,
                        SYS_clone3,
                        SYS_close,
                        SYS_close_range,
                        SYS_connect,
                        SYS_dup,
                        SYS_epoll_create1,
                        SYS_epoll_ctl,
                        SYS_epoll_pwait,
                        SYS_epoll_wait,
                        SYS_eventfd2,
                        SYS_exit,
                        SYS_exit_group,
                        SYS_fallocate,
                        SYS_fcntl,
                        SYS_fdatasync,
                        SYS_fstat,
                        SYS_fsync,
                        SYS_ftruncate,
                        SYS_faccessat,
                        SYS_newfstatat,
                        SYS_futex,
                        SYS_getcwd,
                        SYS_getdents64,
                        SYS_getpgid,
                        SYS_getpgrp,
                        SYS_getrandom,
                        SYS_getsockname,
                        SYS_gettimeofday,
                        SYS_getuid,
                        SYS_kill,
                        SYS_listen,
                        SYS_lseek,
                        SYS_madvise,
                        SYS_mbind,
                        SYS_memfd_create,
                        SYS_mmap,
                        SYS_mprotect,
                        SYS_mremap,
                        SYS_munmap,
                        SYS_nanosleep,
                        SYS_open,
                        SYS_openat,
                        SYS_openat2,
                        SYS_pipe2,
                        SYS_poll,
                        SYS_ppoll,
                        SYS_prctl,
                        SYS_pread64,
                        SYS_preadv,
                        SYS_prlimit64,
                        SYS_pwrite64,
                        SYS_pwritev,
                        SYS_pwritev2,
                        SYS_readv,
                        SYS_readlink,
                        SYS_readlinkat,
                        SYS_recvfrom,
                        SYS_recvmsg,
                        SYS_restart_syscall,
                        SYS_rseq,
                        SYS_rt_sigreturn,
                        SYS_sched_getaffinity,
                        SYS_sched_setaffinity,
                        SYS_sched_yield,
                        SYS_seccomp,
                        SYS_sendmsg,
                        SYS_sendto,
                        SYS_set_robust_list,
                        SYS_setsid,
                        SYS_setsockopt,
                        SYS_shutdown,
                        SYS_sigaltstack,
                        SYS_socket,
                        SYS_socketpair,
                        SYS_stat,
                        SYS_statfs,
                        SYS_statx,
                        SYS_timerfd_create,
                        SYS_timerfd_settime,
                        SYS_umask,
                        SYS_unlink,
                        SYS_unlinkat,
                        SYS_wait4,
                        SYS_writev,
                    ],
                );
                ioctls(
                    &mut r,
                    &[KVM_CHECK_EXTENSION(), KVM_SET_USER_MEMORY_REGION(), KVM_NMI()],
                )?;
            }
            Profile::Firecracker => {
                allow(
                    &mut r,
                    &[
                        SYS_accept4,
                        SYS_brk,
                        SYS_clock_gettime,
                        SYS_close,
                        SYS_connect,
                        SYS_epoll_ctl,
                        SYS_epoll_pwait,
                        SYS_eventfd2,
                        SYS_exit,
                        SYS_exit_group,
                        SYS_fcntl,
                        SYS_fstat,
                        SYS_fsync,
                        SYS_ftruncate,
                        SYS_getrandom,
                        SYS_gettid,
                        SYS_lseek,
                        SYS_madvise,
                        SYS_memfd_create,
                        SYS_mincore,
                        SYS_mremap,
                        SYS_msync,
                        SYS_munmap,
                        SYS_open,
                        SYS_read,
                        SYS_readv,
                        SYS_recvfrom,
                        SYS_recvmsg,
                        SYS_restart_syscall,
                        SYS_rt_sigaction,
                        SYS_rt_sigprocmask,
                        SYS_rt_sigreturn,
                        SYS_sched_yield,
                        SYS_sendmsg,
                        SYS_sendto,
                        SYS_sigaltstack,
                        SYS_socket,
                        SYS_stat,
                        SYS_timerfd_create,
                        SYS_timerfd_settime,
                        SYS_tkill,
                        SYS_write,
                        SYS_writev,
                    ],
                );
                for op in FC_FUTEX_OPS {
                    allow_if(&mut r, SYS_futex, vec![arg_eq(1, op)?])?;
                }
                let private_anon = MAP_PRIVATE | MAP_ANONYMOUS;
                mmap_no_exec(
                    &mut r,
                    &[
                        MAP_FIXED | private_anon,
                        MAP_SHARED,
                        private_anon,
                        MAP_SHARED | MAP_POPULATE,
                        MAP_SHARED | MAP_NORESERVE,
                        MAP_PRIVATE | MAP_NORESERVE | MAP_ANONYMOUS,
                        MAP_SHARED | MAP_NORESERVE | MAP_FIXED,
                    ],
                )?;
                allow_if(
                    &mut r,
                    SYS_mprotect,
                    vec![Cond::new(2, Len::Dword, Op::MaskedEq(PROT_EXEC as u64), 0)?],
                )?;
                ioctls(&mut r, &[KVM_SET_USER_MEMORY_REGION()])?;
                // What Firecracker's musl filter needs on glibc.
                allow(&mut r, &[SYS_epoll_wait, SYS_getpid, SYS_tgkill]);
                allow_if(
                    &mut r,
                    SYS_futex,
                    vec![arg_eq(1, (FUTEX_WAIT_BITSET | FUTEX_CLOCK_REALTIME) as u64)?],
                )?;
            }
        }
        // msrwasm's delta: program the MSR filter on a reload.
        ioctls(&mut r, &[KVM_X86_SET_MSR_FILTER()])?;
        if let Profile::Firecracker = self {
            // msrwasm's delta: a reload reads the changed files (metadata,
            // read-only opens).
            allow(&mut r, &[SYS_statx, SYS_readlink]);
            allow_if(
                &mut r,
                SYS_openat,
                vec![Cond::new(
                    2,
                    Len::Dword,
                    Op::MaskedEq(O_ACCMODE as u64),
                    O_RDONLY as u64,
                )?],
            )?;
        }
        compile(r)
    }
}

/// glibc gives each thread its own malloc arena and grows it with
/// `mprotect`, which Firecracker's vCPU profile forbids (its musl build
/// has no such arenas). One arena for the whole process, set before any
/// thread starts, grows with `brk` and `mmap` instead.
#[allow(unsafe_code)]
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes a malloc tunable; no thread but this
    // one exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
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
