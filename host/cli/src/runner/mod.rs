//! Running a raw guest on KVM with its MSR accesses answered by a policy.

pub mod boot;
pub mod exit;
pub mod image;
pub mod io;
mod signals;
mod vcpu;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_enable_cap};
use kvm_ioctls::{Cap, Kvm, MsrExitReason, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::plugin::ModuleCache;
use crate::plugin::state::StateStore;
use crate::policy::{PluginCounters, Policy, PolicyCell, PolicyError, PolicySpec};
use crate::reload::{ReloadStats, Reloader, Watcher};
use crate::trace::{TraceError, TraceWriter};
pub use exit::VcpuStats;
use image::{ImageError, LoadedImage};
use io::IoBus;
pub use io::SerialOut;
pub use signals::install_termination_handlers;
use vcpu::{Event, VcpuThread};

/// Default guest memory, MiB.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// Smallest guest memory: room for the boot structures, a 1 MiB image base
/// and the stacks.
pub const MIN_MEM_MIB: u64 = 2;
/// Largest guest memory this host maps.
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Most vCPUs a raw guest may have.
pub const MAX_VCPUS: u32 = 64;

/// Everything `msrwasm run` needs.
pub struct VmConfig {
    pub vcpus: u32,
    pub mem_mib: u64,
    pub guest: PathBuf,
    pub policy: PolicySpec,
    pub trace: Option<PathBuf>,
    pub serial: SerialOut,
    /// Hot reload: watch the manifest and plugin files and put changed
    /// versions in force while the VM runs.
    pub watch: bool,
}

/// Why a VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("--mem {0}: must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")]
    Mem(u64),
    #[error("cannot use KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("this KVM lacks {0}, which msrwasm needs (Linux 5.10 or newer)")]
    MissingCap(&'static str),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Watch(#[from] crate::reload::WatchError),
    #[error("the vCPU stacks at the top of memory [{bottom:#x}, {top:#x}) overlap the guest image; raise --mem")]
    StackOverlap { bottom: u64, top: u64 },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Registers of a vCPU that could not go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrashReport {
    pub vcpu: u32,
    pub what: String,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl std::fmt::Display for CrashReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vCPU {}: {}\n  RIP={:#018x} RSP={:#018x} RFLAGS={:#x}\n  CR0={:#x} CR3={:#x} CR4={:#x} EFER={:#x}",
            self.vcpu, self.what, self.rip, self.rsp, self.rflags, self.cr0, self.cr3, self.cr4, self.efer
        )
    }
}

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest wrote the exit port.
    ExitPort(u8),
    /// Every vCPU executed HLT.
    AllHalted,
    /// Triple fault, internal KVM error, failed entry or unexpected exit.
    Crash(Box<CrashReport>),
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The host itself failed while running.
    Error(String),
}

/// Exit status of a crashed VM or a host failure while running.
pub const STATUS_CRASH: i32 = 1;

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct VmReport {
    pub end: VmEnd,
    pub elapsed: Duration,
    pub vcpus: Vec<VcpuStats>,
    /// Counters per plugin name, summed over vCPUs and policy generations.
    pub plugins: BTreeMap<String, PluginCounters>,
    /// Records written to the trace file, if any.
    pub traced: Option<u64>,
    /// Hot reloads put in force, and refused.
    pub reloads_applied: u64,
    pub reloads_refused: u64,
}

impl VmReport {
    /// The process exit status `guest-conventions.md` asks for.
    pub fn exit_status(&self) -> i32 {
        match &self.end {
            VmEnd::ExitPort(v) => i32::from(*v),
            VmEnd::AllHalted => 0,
            VmEnd::Crash(_) | VmEnd::Error(_) => STATUS_CRASH,
            VmEnd::Signal(sig) => 128 + sig,
        }
    }

    /// All vCPUs' counters added up.
    pub fn total(&self) -> VcpuStats {
        self.vcpus.iter().fold(VcpuStats::default(), |mut t, s| {
            t += s;
            t
        })
    }

    /// A few lines for standard error.
    pub fn summary(&self) -> String {
        let t = self.total();
        let end = match &self.end {
            VmEnd::ExitPort(v) => format!("guest wrote exit port: status {v}"),
            VmEnd::AllHalted => "all vCPUs halted".into(),
            VmEnd::Crash(report) => format!("crashed: {report}"),
            VmEnd::Signal(sig) => format!("stopped by signal {sig}"),
            VmEnd::Error(e) => format!("host error: {e}"),
        };
        let secs = self.elapsed.as_secs_f64();
        let mut s = format!(
            "msrwasm: {end} after {secs:.2}s\nmsrwasm: {} exits, {} rdmsr + {} wrmsr deflected ({:.0}/s), {} #GP, {} KVM fallback, {} unhandled, {} port I/O ({} unknown), {} MMIO, {} unexpected\n",
            t.exits,
            t.rdmsr,
            t.wrmsr,
            (t.rdmsr + t.wrmsr) as f64 / secs.max(1e-9),
            t.gp,
            t.kvm_fallback,
            t.unhandled,
            t.port_io,
            t.unknown_ports,
            t.mmio,
            t.unexpected
        );
        for (name, c) in &self.plugins {
            s += &format!(
                "msrwasm: plugin {name}: {} handled, {} fault, {} pass, {} errors",
                c.handled, c.fault, c.pass, c.errors
            );
            if c.quarantines + c.skipped > 0 {
                s += &format!(", {} quarantines ({} accesses skipped)", c.quarantines, c.skipped);
            }
            s += "\n";
        }
        if self.reloads_applied + self.reloads_refused > 0 {
            s += &format!(
                "msrwasm: hot reload: {} applied, {} refused\n",
                self.reloads_applied, self.reloads_refused
            );
        }
        if let Some(n) = self.traced {
            s += &format!("msrwasm: {n} trace records written\n");
        }
        s
    }
}

/// A VM set up and ready to run.
pub struct Vm {
    vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    spec: PolicySpec,
    cell: Arc<PolicyCell>,
    state: Arc<StateStore>,
    cache: Arc<ModuleCache>,
    io: Arc<IoBus>,
    trace: Option<PathBuf>,
    watch: bool,
    native: Option<exit::NativeMsr>,
    stop: StopHandle,
    epoch: Instant,
}

/// Ends a running VM from another thread (as SIGTERM would, status 143).
#[derive(Clone, Debug, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn requested(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Vm {
    /// Loads the policy, creates the VM and loads the guest.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if !(1..=MAX_VCPUS).contains(&config.vcpus) {
            return Err(VmError::Vcpus(config.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&config.mem_mib) {
            return Err(VmError::Mem(config.mem_mib));
        }
        let state = Arc::new(StateStore::default());
        let cache = Arc::new(ModuleCache::default());
        let policy = Arc::new(Policy::load(&config.policy, &state, &cache)?);

        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        for (cap, name) in [
            (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
            (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let reasons = MsrExitReason::Inval | MsrExitReason::Unknown | MsrExitReason::Filter;
        let mut cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(reasons.bits());
        vm.enable_cap(&cap)
            .map_err(kvm_err("enabling KVM_CAP_X86_USER_SPACE_MSR"))?;
        policy.filter().apply(&vm).map_err(PolicyError::from)?;

        let mem_size = config.mem_mib << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .map_err(|e| VmError::Memory(e.to_string()))?;
        crate::sys::register_guest_memory(&vm, &mem).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let image = image::load(&config.guest, &mem, mem_size)?;
        if let LoadedImage::Elf { segments, .. } = &image {
            boot::write_long_mode_tables(&mem, mem_size).map_err(|e| VmError::Memory(e.to_string()))?;
            let bottom = boot::stack_range(mem_size, u64::from(config.vcpus) - 1).0;
            if bottom < boot::ELF_MIN_ADDR || segments.iter().any(|&(_, end)| end > bottom) {
                return Err(VmError::StackOverlap { bottom, top: mem_size });
            }
        }

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let fd = vm.create_vcpu(u64::from(index)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = cpuid.clone();
            for entry in cpuid.as_mut_slice() {
                match entry.function {
                    1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24),
                    0xb | 0x1f => entry.edx = index,
                    _ => {}
                }
            }
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            let (sregs, regs) = match &image {
                LoadedImage::Elf { entry, .. } => (
                    boot::long_mode_sregs(sregs),
                    boot::long_mode_regs(*entry, mem_size, u64::from(index), u64::from(config.vcpus)),
                ),
                LoadedImage::Flat { .. } => (boot::real_mode_sregs(sregs), boot::real_mode_regs()),
            };
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            vcpus.push(fd);
        }

        Ok(Self {
            vm: Arc::new(vm),
            _mem: mem,
            vcpus,
            spec: config.policy,
            cell: Arc::new(PolicyCell::new(policy)),
            state,
            cache,
            io: Arc::new(IoBus::new(config.serial)),
            trace: config.trace,
            watch: config.watch,
            native: None,
            stop: StopHandle::default(),
            epoch: Instant::now(),
        })
    }

    /// Answers MSR accesses with a Rust function instead of the plugin
    /// chain, on the very same exit path: the baseline `msrwasm bench`
    /// compares plugins against.
    pub fn with_native_msr(mut self, handler: exit::NativeMsr) -> Self {
        self.native = Some(handler);
        self
    }

    /// A handle that ends the VM once it runs.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The instant trace timestamps (`t_ns`) count from.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// The VM-wide plugin state store.
    pub fn state(&self) -> &Arc<StateStore> {
        &self.state
    }

    /// Runs every vCPU on its own thread until the VM ends.
    pub fn run(self) -> Result<VmReport, VmError> {
        signals::install_kick_handler();
        let (trace_writer, trace_tx) = match &self.trace {
            Some(path) => {
                let (w, tx) = TraceWriter::create(path)?;
                (Some(w), Some(tx))
            }
            None => (None, None),
        };
        let epoch = self.epoch;
        // Every plugin is instantiated on every vCPU before any vCPU runs:
        // init() failures are reported now, and all vCPUs start together.
        let mut handlers = Vec::new();
        for index in 0..self.vcpus.len() as u32 {
            let mut handler =
                exit::ExitHandler::new(index, self.cell.clone(), self.io.clone(), trace_tx.clone(), epoch);
            handler.set_native(self.native);
            handler
                .chain_mut()
                .warm_up()
                .map_err(|e| VmError::Policy(PolicyError::Load(e)))?;
            handlers.push(handler);
        }
        let reloads = Arc::new(ReloadStats::default());
        let watcher = match self.watch {
            true => Some(Watcher::start(Reloader::new(
                self.spec.clone(),
                self.cell.clone(),
                self.vm.clone(),
                self.state.clone(),
                self.cache.clone(),
                reloads.clone(),
            ))?),
            false => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (events_tx, events) = channel();
        let count = self.vcpus.len();
        let mut threads: Vec<JoinHandle<exit::ExitHandler>> = Vec::new();
        let mut setup_error = None;
        let started = Instant::now();
        for ((index, fd), handler) in self.vcpus.into_iter().enumerate().zip(handlers) {
            let index = index as u32;
            let thread = VcpuThread {
                index,
                fd,
                handler,
                stop: stop.clone(),
                events: events_tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || thread.run());
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    setup_error = Some(VmError::Memory(format!("cannot start a vCPU thread: {e}")));
                    break;
                }
            }
        }
        drop(trace_tx);
        drop(events_tx);

        let mut end = None;
        if setup_error.is_none() {
            let mut halted = 0;
            end = Some(loop {
                match events.recv_timeout(Duration::from_millis(20)) {
                    Ok(Event::Halted) => {
                        halted += 1;
                        if halted == count {
                            break VmEnd::AllHalted;
                        }
                    }
                    Ok(Event::End(end)) => break end,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some(sig) = signals::termination_requested() {
                            break VmEnd::Signal(sig);
                        }
                        if self.stop.requested() {
                            break VmEnd::Signal(libc::SIGTERM);
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        break VmEnd::Error("every vCPU thread ended".into());
                    }
                }
            });
        }
        let elapsed = started.elapsed();

        drop(watcher);
        stop.store(true, Ordering::Release);
        let handlers = signals::stop_threads(threads);
        self.io.flush();
        if let Some(e) = setup_error {
            return Err(e);
        }
        let mut report = VmReport {
            end: end.expect("set when setup succeeded"),
            elapsed,
            vcpus: Vec::new(),
            plugins: BTreeMap::new(),
            traced: None,
            reloads_applied: reloads.applied.load(Ordering::Relaxed),
            reloads_refused: reloads.refused.load(Ordering::Relaxed),
        };
        for handler in handlers {
            match handler {
                Ok(h) => {
                    for (name, c) in h.plugin_counters() {
                        *report.plugins.entry(name).or_default() += c;
                    }
                    report.vcpus.push(h.stats);
                }
                Err(what) => report.end = VmEnd::Error(what),
            }
        }
        if let Some(writer) = trace_writer {
            report.traced = Some(writer.finish()?);
        }
        Ok(report)
    }
}

/// Sets up and runs a VM in one call.
pub fn run(config: VmConfig) -> Result<VmReport, VmError> {
    Vm::new(config)?.run()
}
