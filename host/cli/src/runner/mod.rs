//! `msrwasm run`: a raw-guest VMM on kvm-ioctls, built only on msrwasm's
//! public engine API (the same API any VMM embeds): it owns the VM, guest
//! memory, vCPU threads and their run loops; msrwasm answers MSR exits.

pub mod boot;
pub mod image;
pub mod io;
mod memory;
pub mod metrics;
pub mod signals;
mod vcpu;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use msrwasm::Events;
use msrwasm::PolicySpec;
use msrwasm::StatsSnapshot;
use msrwasm::Trace;
use msrwasm::TraceError;
use msrwasm::TraceReport;
use msrwasm::kvm::{KvmError, KvmFilter};
use msrwasm::{Engine, EngineError};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use image::{ImageError, LoadedImage};
use io::IoBus;
pub use io::SerialOut;
pub use signals::install_termination_handlers;
use vcpu::{Event, VcpuThread};
pub use vcpu::{ExitStats, NativeMsr};

/// Default guest memory, MiB.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// Smallest guest memory: room for the boot structures, a 1 MiB image base
/// and a stack.
pub const MIN_MEM_MIB: u64 = 2;
/// Largest guest memory this host maps.
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Most vCPUs a raw guest may have.
pub const MAX_VCPUS: u32 = 64;

/// Everything `msrwasm run` needs.
pub struct VmConfig {
    /// vCPUs, each on its own thread.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// The guest image.
    pub guest: PathBuf,
    /// The MSR policy.
    pub policy: PolicySpec,
    /// `--trace FILE`.
    pub trace: Option<PathBuf>,
    /// Where COM1 output goes.
    pub serial: SerialOut,
    /// Hot reload: watch the manifest and plugin files.
    pub watch: bool,
    /// More event sinks (the footprint, the API's metrics, a test's probe).
    pub events: Vec<Arc<dyn Events>>,
    /// Time every plugin call (for the call-time histogram).
    pub time_calls: bool,
    /// Cache compiled plugins in this directory.
    pub cache_dir: Option<PathBuf>,
    /// How plugin code runs.
    pub mode: msrwasm::ExecMode,
    /// Serve the control API on this Unix socket.
    pub api_sock: Option<PathBuf>,
    /// Write the MSR footprint to this file at exit.
    pub footprint: Option<PathBuf>,
    /// Fetches `oci://` plugins; also follows `pull_policy = "always"` tags.
    pub oci: Option<Arc<dyn msrwasm::oci::Fetch>>,
    /// The VM's name (`--name`): the `vm` label of its metrics and of its
    /// JSON log lines.
    pub name: String,
    /// Serve `GET /metrics` on this TCP address (`--metrics-addr`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Announce the metrics endpoint in this Prometheus file-discovery
    /// directory (`--metrics-sd-dir`).
    pub metrics_sd_dir: Option<PathBuf>,
    /// Where host energy comes from for plugins granted it.
    pub energy: msrwasm::EnergyOptions,
}

impl VmConfig {
    /// A config with the defaults of `msrwasm run`.
    pub fn new(guest: impl Into<PathBuf>, policy: PolicySpec) -> Self {
        Self {
            vcpus: 1,
            mem_mib: DEFAULT_MEM_MIB,
            guest: guest.into(),
            policy,
            trace: None,
            serial: Box::new(std::io::stdout()),
            watch: false,
            events: Vec::new(),
            time_calls: false,
            cache_dir: None,
            mode: msrwasm::ExecMode::Jit,
            api_sock: None,
            footprint: None,
            oci: None,
            name: "vm".into(),
            metrics_addr: None,
            metrics_sd_dir: None,
            energy: msrwasm::EnergyOptions::default(),
        }
    }
}

/// Why a VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("--mem {0}: must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")]
    Mem(u64),
    #[error("cannot use KVM: {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    KvmSupport(#[from] KvmError),
    #[error("cannot map guest memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    #[error("cannot write the boot structures")]
    Boot(#[source] vm_memory::GuestMemoryError),
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Policy(#[from] msrwasm::PolicyError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Watch(#[from] msrwasm::watch::WatchError),
    #[error(transparent)]
    Api(#[from] msrwasm::api::ApiError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(
        "--mem {mem_mib} MiB is too small for {vcpus} vCPUs: their {stack_kib} KiB stacks and the image need at least {needed_mib} MiB; raise --mem"
    )]
    Stacks {
        mem_mib: u64,
        vcpus: u32,
        stack_kib: u64,
        needed_mib: u64,
    },
    #[error("the vCPU stacks at the top of memory [{bottom:#x}, {top:#x}) overlap the guest image; raise --mem")]
    StackOverlap { bottom: u64, top: u64 },
    #[error("--footprint")]
    Footprint(#[source] std::io::Error),
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
    /// The guest wrote ACPI S5 to port 0x600 (cloud-hypervisor's power off).
    PowerOff,
    /// The guest wrote the i8042 reset command (0xfe) to port 0x64
    /// (Firecracker's way out): the guest asks to stop.
    Reset,
    /// Every vCPU executed HLT.
    AllHalted,
    /// Triple fault, internal KVM error, failed entry or unexpected exit.
    Crash(Box<CrashReport>),
    /// A termination signal (SIGINT, SIGTERM, SIGHUP, ...), or a stop
    /// handle (reported as SIGTERM).
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
    /// Per vCPU: exits the runner saw (ports, MMIO, MSRs ...).
    pub exits: Vec<ExitStats>,
    /// The engine's counters (MSR accesses, plugins, reloads).
    pub stats: StatsSnapshot,
    /// How the trace ended, if there was one.
    pub trace: Option<TraceReport>,
    /// Serial output bytes dropped because standard output did not keep up.
    pub serial_dropped: u64,
    /// Where the footprint went (or why it did not).
    pub footprint: Option<Result<PathBuf, String>>,
}

impl VmReport {
    /// The process exit status the guest conventions ask for.
    pub fn exit_status(&self) -> i32 {
        match &self.end {
            VmEnd::ExitPort(v) => i32::from(*v),
            VmEnd::AllHalted | VmEnd::PowerOff | VmEnd::Reset => 0,
            VmEnd::Crash(_) | VmEnd::Error(_) => STATUS_CRASH,
            VmEnd::Signal(sig) => 128 + sig,
        }
    }

    /// All vCPUs' exit counters added up.
    pub fn total_exits(&self) -> ExitStats {
        self.exits.iter().fold(ExitStats::default(), |mut t, s| {
            t += s;
            t
        })
    }

    /// A few lines for standard error.
    pub fn summary(&self) -> String {
        let t = self.total_exits();
        let m = self.stats.total();
        let end = match &self.end {
            VmEnd::ExitPort(v) => format!("guest wrote exit port: status {v}"),
            VmEnd::AllHalted => "all vCPUs halted".into(),
            VmEnd::PowerOff => "guest powered off (ACPI S5 on port 0x600)".into(),
            VmEnd::Reset => "guest asked for a reset (0xfe on port 0x64), which ends the VM".into(),
            VmEnd::Crash(report) => format!("crashed: {report}"),
            VmEnd::Signal(sig) => format!("stopped by signal {sig} ({})", signals::name(*sig)),
            VmEnd::Error(e) => format!("host error: {e}"),
        };
        let secs = self.elapsed.as_secs_f64();
        let mut s = format!(
            "msrwasm: {end} after {secs:.2}s\nmsrwasm: {} exits, {} rdmsr + {} wrmsr deflected ({:.0}/s), {} #GP, {} KVM fallback or template, {} unhandled, {} port I/O ({} unknown), {} MMIO, {} unexpected\n",
            t.exits,
            m.rdmsr,
            m.wrmsr,
            (m.rdmsr + m.wrmsr) as f64 / secs.max(1e-9),
            m.gp,
            m.kvm_fallback(),
            m.unhandled(),
            t.port_io,
            t.unknown_ports,
            t.mmio,
            t.unexpected
        );
        for (name, c) in &self.stats.plugins {
            s += &format!(
                "msrwasm: plugin {name}: {} handled, {} fault, {} pass, {} errors",
                c.handled, c.fault, c.pass, c.errors
            );
            if c.quarantines + c.skipped > 0 {
                s += &format!(", {} quarantines ({} accesses skipped)", c.quarantines, c.skipped);
            }
            s += "\n";
        }
        if self.stats.reloads_applied + self.stats.reloads_refused > 0 {
            s += &format!(
                "msrwasm: policy changes: {} applied, {} refused\n",
                self.stats.reloads_applied, self.stats.reloads_refused
            );
        }
        if let Some(t) = &self.trace {
            s += &format!("msrwasm: {} trace records written", t.written);
            if t.dropped > 0 {
                s += &format!(", {} dropped (the trace could not keep up or failed)", t.dropped);
            }
            if let Some(e) = &t.error {
                s += &format!("; trace write error: {e}");
            }
            if t.deleted {
                s += "; the trace file was deleted while the VM ran";
            }
            s += "\n";
        }
        match &self.footprint {
            Some(Ok(path)) => s += &format!("msrwasm: footprint written to {}\n", path.display()),
            Some(Err(e)) => s += &format!("msrwasm: footprint not written: {e}\n"),
            None => {}
        }
        if self.serial_dropped > 0 {
            s += &format!(
                "msrwasm: {} bytes of serial output dropped (standard output did not keep up)\n",
                self.serial_dropped
            );
        }
        s
    }
}

/// Ends a running VM from another thread (reported as SIGTERM, status 143).
#[derive(Clone, Debug, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the VM to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn requested(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A VM set up and ready to run.
pub struct Vm {
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    engine: Engine,
    trace: Option<Arc<Trace>>,
    footprint: Option<(Arc<msrwasm::Footprint>, Option<PathBuf>)>,
    api_sock: Option<PathBuf>,
    oci: Option<Arc<dyn msrwasm::oci::Fetch>>,
    name: String,
    metrics_addr: Option<std::net::SocketAddr>,
    metrics_sd_dir: Option<PathBuf>,
    io: Arc<IoBus>,
    watch: bool,
    native: Option<vcpu::NativeMsr>,
    stop: StopHandle,
}

impl Vm {
    /// Creates the VM, the engine (loading the policy and programming the
    /// filter through msrwasm's KVM filter sink) and loads the guest.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if !(1..=MAX_VCPUS).contains(&config.vcpus) {
            return Err(VmError::Vcpus(config.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&config.mem_mib) {
            return Err(VmError::Mem(config.mem_mib));
        }
        // Checked before any work: a footprint the end of the run cannot
        // write is refused now, not lost then.
        if let Some(path) = &config.footprint {
            msrwasm::tools::check_output(path).map_err(VmError::Footprint)?;
        }
        let mem_size = config.mem_mib << 20;
        let stacks = u64::from(config.vcpus) * boot::STACK_SIZE;
        if stacks + boot::ELF_MIN_ADDR + (1 << 20) > mem_size {
            return Err(VmError::Stacks {
                mem_mib: config.mem_mib,
                vcpus: config.vcpus,
                stack_kib: boot::STACK_SIZE >> 10,
                needed_mib: (stacks + boot::ELF_MIN_ADDR + (1 << 20)).div_ceil(1 << 20),
            });
        }

        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        msrwasm::kvm::check_support(&kvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        msrwasm::kvm::enable_user_space_msrs(&vm)?;

        let trace = config.trace.as_deref().map(Trace::create).transpose()?.map(Arc::new);
        let footprint = (config.footprint.is_some() || config.api_sock.is_some())
            .then(|| (Arc::new(msrwasm::Footprint::new()), config.footprint.clone()));
        let mut builder = Engine::builder()
            .filter(KvmFilter::new(&kvm, &vm, Vec::new())?)
            .mode(config.mode)
            .time_calls(config.time_calls || config.api_sock.is_some())
            .energy(config.energy.clone());
        if let Some(dir) = &config.cache_dir {
            builder = builder.cache_dir(dir);
        }
        if let Some(oci) = &config.oci {
            builder = builder.oci(oci.clone());
        }
        if let Some(trace) = &trace {
            builder = builder.events(trace.clone());
        }
        if let Some((footprint, _)) = &footprint {
            builder = builder.events(footprint.clone());
        }
        for sink in config.events {
            builder = builder.events(sink);
        }
        let engine = builder.build(config.policy)?;

        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).map_err(VmError::Memory)?;
        memory::register_guest_memory(&vm, &mem).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let image = image::load(&config.guest, &mem, mem_size)?;
        let segments = match &image {
            LoadedImage::Elf { segments, .. } => {
                boot::write_long_mode_tables(&mem, mem_size).map_err(VmError::Boot)?;
                Some(segments)
            }
            LoadedImage::Pvh { segments, .. } => {
                boot::write_pvh_boot(&mem, mem_size).map_err(VmError::Boot)?;
                Some(segments)
            }
            LoadedImage::Flat { .. } => None,
        };
        if let Some(segments) = segments {
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
                LoadedImage::Pvh { entry, .. } => (
                    boot::pvh_sregs(sregs),
                    boot::pvh_regs(*entry, mem_size, u64::from(index), u64::from(config.vcpus)),
                ),
                LoadedImage::Flat { .. } => (boot::real_mode_sregs(sregs), boot::real_mode_regs()),
            };
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            vcpus.push(fd);
        }

        Ok(Self {
            _vm: vm,
            _mem: mem,
            vcpus,
            engine,
            trace,
            footprint,
            api_sock: config.api_sock,
            oci: config.oci,
            name: config.name,
            metrics_addr: config.metrics_addr,
            metrics_sd_dir: config.metrics_sd_dir,
            io: Arc::new(IoBus::new(config.serial)),
            watch: config.watch,
            native: None,
            stop: StopHandle::default(),
        })
    }

    /// Answers MSR accesses with a Rust function instead of the plugin
    /// chain, on the same exit path: the baseline `msrwasm bench` compares
    /// plugins against.
    pub fn with_native_msr(mut self, handler: vcpu::NativeMsr) -> Self {
        self.native = Some(handler);
        self
    }

    /// A handle that ends the VM once it runs.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The instant trace timestamps (`t_ns`) count from.
    pub fn trace_epoch(&self) -> Instant {
        self.trace.as_ref().map_or_else(Instant::now, |t| t.epoch())
    }

    /// The engine answering this VM's MSR accesses.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Runs every vCPU on its own thread until the VM ends.
    pub fn run(self) -> Result<VmReport, VmError> {
        signals::install_kick_handler();
        // Every plugin is instantiated on every vCPU before any vCPU runs:
        // init() failures are reported now, and all vCPUs start together.
        let mut dispatchers = Vec::new();
        for index in 0..self.vcpus.len() as u32 {
            let mut d = self.engine.dispatcher(index);
            d.warm_up()
                .map_err(|e| VmError::Policy(msrwasm::PolicyError::Load(e)))?;
            dispatchers.push(d);
        }
        // From here on, the run loop below answers termination signals
        // (what this creates next is cleaned up on the way out).
        signals::running();
        let watcher = match self.watch {
            true => Some(msrwasm::watch::Watcher::spawn(&self.engine)?),
            false => None,
        };
        let follower = match &self.oci {
            Some(oci) => Some(msrwasm::oci::Follower::spawn(&self.engine, oci.clone()).map_err(VmError::Thread)?),
            None => None,
        };
        let api = match &self.api_sock {
            Some(path) => Some(msrwasm::api::ApiServer::start(
                path,
                msrwasm::api::ApiState {
                    engine: self.engine.clone(),
                    footprint: self.footprint.as_ref().map(|(f, _)| f.clone()),
                },
            )?),
            None => None,
        };
        let metrics = match self.metrics_addr {
            Some(addr) => {
                let m = metrics::Metrics::start(addr, self.engine.clone(), self.metrics_sd_dir.as_deref(), &self.name)?;
                crate::err!(
                    "msrwasm: metrics of VM {} at http://{}/metrics",
                    self.name,
                    m.local_addr()
                );
                if let Some(entry) = m.entry() {
                    tracing::info!(entry = %entry.display(), "announced to Prometheus file discovery");
                }
                Some(m)
            }
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (events_tx, events) = channel();
        let count = self.vcpus.len();
        let mut threads: Vec<JoinHandle<ExitStats>> = Vec::new();
        let mut setup_error = None;
        let started = Instant::now();
        for ((index, fd), dispatcher) in self.vcpus.into_iter().enumerate().zip(dispatchers) {
            let thread = VcpuThread {
                index: index as u32,
                fd,
                msrs: dispatcher,
                io: self.io.clone(),
                native: self.native,
                stop: stop.clone(),
                events: events_tx.clone(),
                stats: ExitStats::default(),
            };
            match std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || thread.run())
            {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    setup_error = Some(VmError::Thread(e));
                    break;
                }
            }
        }
        drop(events_tx);
        if setup_error.is_none() {
            tracing::info!("{count} vCPUs running");
        }

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

        // No more changes: a compile in flight is discarded, not waited for.
        self.engine.close();
        drop(api);
        // The discovery entry goes first: Prometheus stops scraping a VM
        // that is ending.
        drop(metrics);
        if let Some(w) = watcher {
            w.stop(Duration::from_millis(100));
        }
        if let Some(f) = follower {
            f.stop(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Release);
        let exits = signals::stop_threads(threads);
        let serial_dropped = self.io.finish(Duration::from_secs(1));
        if let Some(e) = setup_error {
            return Err(e);
        }
        let mut report = VmReport {
            end: end.expect("set when setup succeeded"),
            elapsed,
            exits: Vec::new(),
            stats: self.engine.stats(),
            trace: None,
            serial_dropped,
            footprint: None,
        };
        for result in exits {
            match result {
                Ok(stats) => report.exits.push(stats),
                Err(what) => report.end = VmEnd::Error(what),
            }
        }
        // The dispatchers (and their trace sinks) are gone with the threads.
        report.trace = self.trace.as_ref().map(|t| t.finish(Duration::from_secs(2)));
        if let Some((footprint, Some(path))) = &self.footprint {
            report.footprint = Some(write_footprint(path, footprint).map(|()| path.clone()));
        }
        Ok(report)
    }
}

/// Writes the footprint as JSON, whole or not at all (a temporary file
/// renamed into place).
fn write_footprint(path: &std::path::Path, footprint: &msrwasm::Footprint) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(&footprint.entries()).map_err(|e| e.to_string())?;
    msrwasm::tools::write_atomic(path, &json).map_err(|e| format!("{}: {e}", path.display()))
}

/// Sets up and runs a VM in one call.
pub fn run(config: VmConfig) -> Result<VmReport, VmError> {
    Vm::new(config)?.run()
}
