//! `msrwasm bench`: how much plugins cost, measured side by side in one run.
//!
//! 1. End to end on KVM: one guest loop of RDMSR on an unknown MSR,
//!    answered by a native Rust handler, by a trivial wasm plugin, and by a
//!    chain of two plugins (the first passes), all on the same exit path.
//!    Configurations are interleaved round by round; medians are reported.
//!    The trivial plugin also runs in the no-JIT mode (Pulley bytecode).
//! 2. The dispatcher alone, without KVM: synthetic exits through the same
//!    exit handler (generation check, fuel, plugin call, counters), in the
//!    JIT mode, the JIT mode without signals-based traps, and no-JIT.
//! 3. Scaling: the wasm plugin on 1 vCPU and on 2 vCPUs.
//! 4. Hot reload: on a running 2-vCPU VM, the time from renaming a new
//!    plugin version into place to the first exit that version answers, and
//!    the longest gap between two exits any vCPU saw meanwhile.
//! 5. Budget enforcement: how long a plugin that never returns (a wasm loop,
//!    a loop of host calls) runs before the default 1000 µs budget stops it.

use std::sync::Arc;
use std::time::Instant;

use msrwasm::PluginSettings;
use msrwasm::filter::RecordingFilter;
use msrwasm::tools::Plugin;
use msrwasm::tools::Runtime;
use msrwasm::tools::StateStore;
use msrwasm::{Access, Engine, ExecMode, ExitReason, NoKvm, PolicySpec, Reply, Unhandled};

use crate::runner::{Vm, VmConfig, VmEnd, VmError};

/// The guest: RDMSR 0x4d53424d in a loop, then HLT (`host/cli/guests/msr_loop.S`).
pub const LOOP_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/msr_loop.elf"));
/// The reload guest: RDMSR 0x4d530020 forever (`host/cli/guests/msr_forever.S`).
pub const FOREVER_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/msr_forever.elf"));
/// RDMSRs each vCPU of the loop guest executes.
pub const LOOP_ITERATIONS: u64 = 50_000;
const LOOP_MSR: u32 = 0x4d53_424d;

/// Answers every read with its index: the least a plugin can do.
pub const ANSWER_WAT: &str = r#"(module
  (import "msr" "reply" (func $reply (param i64)))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param $i i32) (result i32)
    (call $reply (i64.extend_i32_u (local.get $i)))
    (i32.const 0)))"#;
/// Passes on everything: the first link of the two-plugin chain.
pub const PASS_WAT: &str = r#"(module
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param $i i32) (result i32) (i32.const 2)))"#;

fn native_answer(_vcpu: u32, access: Access) -> Reply {
    Reply::Read(u64::from(access.index))
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot write benchmark files")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Engine(#[from] msrwasm::EngineError),
    #[error(transparent)]
    Load(#[from] msrwasm::LoadError),
    #[error("the benchmark guest did not finish cleanly: {0:?}")]
    Guest(VmEnd),
}

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Rounds of each end-to-end configuration (the median is reported).
    pub rounds: usize,
    /// Synthetic exits for the dispatcher measurement.
    pub dispatches: u64,
    /// Plugin versions swapped in for the reload measurement.
    pub swaps: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            rounds: 5,
            dispatches: 2_000_000,
            swaps: 50,
        }
    }
}

/// The figures, all from one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub release_build: bool,
    pub rounds: usize,
    pub exits_per_round: u64,
    /// Median exits/s, 1 vCPU.
    pub native_exits_per_s: f64,
    pub wasm_exits_per_s: f64,
    pub chain_exits_per_s: f64,
    /// wasm/native and chain/native (1.0 = as fast as native).
    pub wasm_vs_native: f64,
    pub chain_vs_native: f64,
    /// The trivial plugin in the no-JIT mode (Pulley), and no-JIT/native.
    pub nojit_exits_per_s: f64,
    pub nojit_vs_native: f64,
    /// The wasm plugin with call timing and the footprint on (what the
    /// control API's metrics use), and its ratio to the plain wasm run.
    pub observed_exits_per_s: f64,
    pub observed_vs_wasm: f64,
    /// Observed, with the metrics endpoint scraped and `ctl top` refreshed
    /// every 10 ms; its ratio to Observed; the median time of one top
    /// refresh and of one scrape (milliseconds), and how many were made.
    pub scraped_exits_per_s: f64,
    pub scraped_vs_observed: f64,
    pub top_refresh_ms: f64,
    pub scrape_ms: f64,
    pub polls: usize,
    /// Dispatcher alone, nanoseconds per synthetic exit: the native
    /// handler through a function pointer (the runner's native path), the
    /// dispatcher with no plugin (`unhandled` answers), one plugin, a chain.
    pub dispatch_native_ns: f64,
    pub dispatch_nobody_ns: f64,
    pub dispatch_wasm_ns: f64,
    pub dispatch_chain_ns: f64,
    /// One plugin, JIT without signals-based traps, and no-JIT.
    pub dispatch_nosignals_ns: f64,
    pub dispatch_nojit_ns: f64,
    /// Total exits/s of the wasm plugin on 2 vCPUs, and its ratio to 1 vCPU.
    pub wasm_2vcpu_exits_per_s: f64,
    pub scaling_2_vs_1: f64,
    /// Hot reload, rename to first answer by the new version, milliseconds.
    pub swaps: usize,
    pub reload_median_ms: f64,
    pub reload_worst_ms: f64,
    /// Longest gap between consecutive MSR exits on any vCPU during the
    /// swaps, milliseconds (includes the host scheduler's preemptions).
    pub longest_vcpu_gap_ms: f64,
    /// The same, over a window of the same length before any swap.
    pub longest_vcpu_gap_no_swap_ms: f64,
    /// Longest time a policy switch (with the new version's first answer,
    /// instantiation included) held a vCPU, milliseconds.
    pub longest_switch_ms: f64,
    /// Median time until an endless wasm loop / an endless loop of host
    /// calls was stopped, with the default 1000 µs budget, microseconds.
    pub runaway_wasm_us: f64,
    pub runaway_host_calls_us: f64,
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut s = String::new();
        if !self.release_build {
            s += "WARNING: debug build; run `cargo run --release -p msrwasm -- bench` for meaningful figures\n";
        }
        s += &format!(
            "end to end on KVM, 1 vCPU, {} RDMSR exits per round, median of {} rounds:\n",
            self.exits_per_round, self.rounds
        );
        s += &format!("  native Rust handler   {:>10.0} exits/s\n", self.native_exits_per_s);
        s += &format!(
            "  trivial wasm plugin   {:>10.0} exits/s   wasm/native  = {:.3}\n",
            self.wasm_exits_per_s, self.wasm_vs_native
        );
        s += &format!(
            "  chain of 2 plugins    {:>10.0} exits/s   chain/native = {:.3}\n",
            self.chain_exits_per_s, self.chain_vs_native
        );
        s += &format!(
            "  wasm plugin, no-JIT   {:>10.0} exits/s   no-JIT/native = {:.3}   no-JIT/JIT = {:.3}\n",
            self.nojit_exits_per_s,
            self.nojit_vs_native,
            self.nojit_exits_per_s / self.wasm_exits_per_s
        );
        s += &format!(
            "  + metrics & footprint {:>10.0} exits/s   observed/wasm = {:.3}\n",
            self.observed_exits_per_s, self.observed_vs_wasm
        );
        s += &format!(
            "  + scraped & top 100/s {:>10.0} exits/s   scraped/observed = {:.3}   ({} polls: top refresh {:.2} ms, scrape {:.2} ms, median)\n",
            self.scraped_exits_per_s, self.scraped_vs_observed, self.polls, self.top_refresh_ms, self.scrape_ms
        );
        s += "dispatcher alone (synthetic exits, no KVM):\n";
        s += &format!(
            "  native handler        {:>8.1} ns/exit   (fn pointer, as the runner calls it)\n",
            self.dispatch_native_ns
        );
        s += &format!(
            "  dispatcher, no plugin {:>8.1} ns/exit   (generation check, claim lookup, unhandled, counters)\n",
            self.dispatch_nobody_ns
        );
        s += &format!(
            "  one wasm plugin       {:>8.1} ns/exit   plugin call = {:.1} ns\n",
            self.dispatch_wasm_ns,
            self.dispatch_wasm_ns - self.dispatch_nobody_ns
        );
        s += &format!("  chain of 2 plugins    {:>8.1} ns/exit\n", self.dispatch_chain_ns);
        s += &format!(
            "  no signal traps       {:>8.1} ns/exit   plugin call = {:.1} ns   (one plugin, JIT, signals_based_traps(false))\n",
            self.dispatch_nosignals_ns,
            self.dispatch_nosignals_ns - self.dispatch_nobody_ns
        );
        s += &format!(
            "  no-JIT                {:>8.1} ns/exit   plugin call = {:.1} ns   (one plugin, Pulley interpreter)\n",
            self.dispatch_nojit_ns,
            self.dispatch_nojit_ns - self.dispatch_nobody_ns
        );
        s += &format!(
            "scaling: wasm plugin on 2 vCPUs {:.0} exits/s = {:.2}x one vCPU\n",
            self.wasm_2vcpu_exits_per_s, self.scaling_2_vs_1
        );
        s += &format!(
            "hot reload, {} swaps on 2 running vCPUs:\n  rename -> first answer by the new version: median {:.1} ms, worst {:.1} ms\n",
            self.swaps, self.reload_median_ms, self.reload_worst_ms
        );
        s += &format!(
            "  longest switch on a vCPU (switch + first answer, instantiation included): {:.3} ms\n",
            self.longest_switch_ms
        );
        s += &format!(
            "  longest gap between two exits on a vCPU: {:.3} ms during swaps, {:.3} ms in a window without swaps\n",
            self.longest_vcpu_gap_ms, self.longest_vcpu_gap_no_swap_ms
        );
        s += &format!(
            "budget (timeout_us = 1000): an endless wasm loop is stopped after {:.0} us, an endless loop of host calls after {:.0} us\n",
            self.runaway_wasm_us, self.runaway_host_calls_us
        );
        s
    }
}

/// The ways of answering the loop guest.
#[derive(Clone, Copy)]
enum Answerer {
    Native,
    /// No plugin: `unhandled = "ignore"` answers (the dispatcher's own
    /// work without a plugin call).
    Nobody,
    Wasm,
    Chain,
    /// The wasm plugin in [`ExecMode::NoJit`].
    NoJit,
    /// The wasm plugin, JIT, with `signals_based_traps(false)`.
    NoSignals,
    /// The wasm plugin with what the control API turns on: call timing
    /// (the metrics' histogram) and the MSR footprint.
    Observed,
    /// Observed, with the metrics endpoint scraped and `ctl top` refreshing
    /// every [`POLL`] throughout the run.
    Scraped,
}

/// How often the `Scraped` run is scraped and refreshed: 100 times a
/// second, a hundred times harsher than a 1 s Prometheus scrape interval
/// and a 1 s `top`, so that the cost shows above noise.
const POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Milliseconds each `top` refresh and each scrape took.
type Polled = (Vec<f64>, Vec<f64>);

/// Scrapes `metrics` (a TCP address) and refreshes a `top` view of the API
/// at `socket` every [`POLL`] until `stop`; returns how long each top
/// refresh and each scrape took, milliseconds.
fn poll_vm(metrics: std::net::SocketAddr, socket: &std::path::Path, stop: &std::sync::atomic::AtomicBool) -> Polled {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let (mut refreshes, mut scrapes) = (Vec::new(), Vec::new());
    let mut top = crate::top::Top::new(socket);
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        if let Ok(mut s) = std::net::TcpStream::connect(metrics) {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut body = Vec::new();
            if s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").is_ok() && s.read_to_end(&mut body).is_ok() {
                scrapes.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        let started = Instant::now();
        if top.refresh().is_ok() {
            refreshes.push(started.elapsed().as_secs_f64() * 1e3);
        }
        std::thread::sleep(POLL);
    }
    (refreshes, scrapes)
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Result<Self, std::io::Error> {
        let dir = tempfile::Builder::new().prefix("msrwasm-bench-").tempdir()?;
        std::fs::write(dir.path().join("loop.elf"), LOOP_GUEST)?;
        std::fs::write(dir.path().join("answer.wat"), ANSWER_WAT)?;
        std::fs::write(dir.path().join("pass.wat"), PASS_WAT)?;
        Ok(Self { dir })
    }

    fn policy(&self, answerer: Answerer) -> PolicySpec {
        let p = |f: &str| self.dir.path().join(f);
        let plugins = match answerer {
            Answerer::Native | Answerer::Nobody => vec![],
            Answerer::Wasm | Answerer::NoJit | Answerer::NoSignals | Answerer::Observed | Answerer::Scraped => {
                vec![p("answer.wat")]
            }
            Answerer::Chain => vec![p("pass.wat"), p("answer.wat")],
        };
        let unhandled = match answerer {
            Answerer::Nobody => Unhandled::Ignore,
            _ => Unhandled::Gp,
        };
        PolicySpec::from_paths(&plugins, unhandled)
    }

    /// One run; returns total exits/s over all vCPUs.
    fn run(&self, answerer: Answerer, vcpus: u32) -> Result<f64, BenchError> {
        self.run_polled(answerer, vcpus).map(|(rate, _)| rate)
    }

    /// One run; returns total exits/s over all vCPUs and, for `Scraped`,
    /// the milliseconds each top refresh and each scrape took.
    fn run_polled(&self, answerer: Answerer, vcpus: u32) -> Result<(f64, Polled), BenchError> {
        let mut config = VmConfig::new(self.dir.path().join("loop.elf"), self.policy(answerer));
        config.vcpus = vcpus;
        config.mem_mib = 16;
        config.serial = Box::new(std::io::sink());
        if let Answerer::NoJit = answerer {
            config.mode = ExecMode::NoJit;
        }
        if let Answerer::Observed | Answerer::Scraped = answerer {
            config.time_calls = true;
            config.footprint = Some(self.dir.path().join("footprint.json"));
        }
        let socket = self.dir.path().join("api.sock");
        let mut metrics = None;
        if let Answerer::Scraped = answerer {
            // A free port, found by binding it once.
            let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            config.metrics_addr = Some(addr);
            config.api_sock = Some(socket.clone());
            metrics = Some(addr);
        }
        let mut vm = Vm::new(config)?;
        if let Answerer::Native = answerer {
            vm = vm.with_native_msr(native_answer);
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = metrics.map(|addr| {
            let (stop, socket) = (stop.clone(), socket.clone());
            std::thread::spawn(move || poll_vm(addr, &socket, &stop))
        });
        let report = vm.run();
        stop.store(true, std::sync::atomic::Ordering::Release);
        let polled = poller.map(|t| t.join().unwrap_or_default()).unwrap_or_default();
        let report = report?;
        let rdmsr = report.total_exits().rdmsr;
        if report.end != VmEnd::AllHalted || rdmsr != LOOP_ITERATIONS * u64::from(vcpus) {
            return Err(BenchError::Guest(report.end));
        }
        Ok((rdmsr as f64 / report.elapsed.as_secs_f64(), polled))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds per synthetic RDMSR exit through the dispatcher. The
/// native baseline is what the runner's native path does per exit: a call
/// through a `NativeMsr` function pointer the compiler cannot see through
/// (so it cannot inline the handler or hoist it out of the loop).
fn dispatch_ns(files: &Files, answerer: Answerer, n: u64) -> Result<f64, BenchError> {
    let access = Access::read(LOOP_MSR, ExitReason::Unknown);
    let expected = match answerer {
        Answerer::Nobody => Reply::Read(0),
        _ => Reply::Read(u64::from(LOOP_MSR)),
    };
    if let Answerer::Native | Answerer::Observed = answerer {
        let native: crate::runner::NativeMsr = native_answer;
        let started = Instant::now();
        for vcpu in 0..n {
            let handler = std::hint::black_box(native);
            let reply = handler(std::hint::black_box(vcpu as u32), std::hint::black_box(access));
            if std::hint::black_box(reply) != expected {
                return Err(BenchError::Guest(VmEnd::Error("native answer changed".into())));
            }
        }
        return Ok(started.elapsed().as_nanos() as f64 / n as f64);
    }
    let mode = match answerer {
        Answerer::NoJit => ExecMode::NoJit,
        _ => ExecMode::Jit,
    };
    let engine = Engine::builder()
        .mode(mode)
        .signals_based_traps(!matches!(answerer, Answerer::NoSignals))
        .filter(RecordingFilter::default())
        .build(files.policy(answerer))?;
    let mut dispatcher = engine.dispatcher(0);
    dispatcher.warm_up()?;
    let started = Instant::now();
    for _ in 0..n {
        let reply = dispatcher.handle(std::hint::black_box(access), &mut NoKvm).reply;
        if std::hint::black_box(reply) != expected {
            return Err(BenchError::Guest(VmEnd::Error(format!(
                "unexpected dispatch result {reply:?}"
            ))));
        }
    }
    Ok(started.elapsed().as_nanos() as f64 / n as f64)
}

/// A plugin version that answers `k` and notes `k` in state key 1.
fn reload_version(k: usize) -> String {
    format!(
        r#"(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "state_set" (func $set (param i32 i64)))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param i32) (result i32)
    (call $set (i32.const 1) (i64.const {k}))
    (call $reply (i64.const {k}))
    (i32.const 0)))"#
    )
}

/// What the reload measurement found.
struct ReloadFigures {
    latencies_ms: Vec<f64>,
    gap_ms: f64,
    gap_no_swap_ms: f64,
    switch_ms: f64,
}

/// Swaps `swaps` versions into a running VM, after letting it run as long
/// without swaps for comparison.
fn reload_latency(files: &Files, swaps: usize) -> Result<ReloadFigures, BenchError> {
    let dir = files.dir.path();
    std::fs::write(dir.join("forever.elf"), FOREVER_GUEST)?;
    let plugin = dir.join("swap.wat");
    std::fs::write(&plugin, reload_version(1))?;
    let trace = dir.join("reload.jsonl");
    let mut config = VmConfig::new(
        dir.join("forever.elf"),
        PolicySpec::from_paths(std::slice::from_ref(&plugin), Unhandled::Gp),
    );
    config.vcpus = 2;
    config.mem_mib = 16;
    config.trace = Some(trace.clone());
    config.serial = Box::new(std::io::sink());
    config.watch = true;
    let vm = Vm::new(config)?;
    let (stop, epoch, scope) = (vm.stop_handle(), vm.trace_epoch(), vm.engine().state().scope("swap"));
    let running = std::thread::spawn(move || vm.run());
    let live = |k: usize| {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while scope.get(1) != k as i64 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        true
    };
    let mut renamed_at = Vec::new();
    let mut ok = live(1);
    // A quiet stretch about as long as the swaps will take, to compare gaps.
    let quiet_from = epoch.elapsed();
    std::thread::sleep(std::time::Duration::from_millis(30 * swaps as u64));
    let quiet_to = epoch.elapsed();
    for k in 2..swaps + 2 {
        if !ok {
            break;
        }
        let temp = dir.join("swap.wat.new");
        std::fs::write(&temp, reload_version(k))?;
        renamed_at.push((k, epoch.elapsed()));
        std::fs::rename(&temp, &plugin)?;
        ok = live(k);
    }
    stop.stop();
    let report = running
        .join()
        .map_err(|_| BenchError::Guest(VmEnd::Error("VM thread panicked".into())))??;
    if !ok || report.end != VmEnd::Signal(libc::SIGTERM) {
        return Err(BenchError::Guest(report.end));
    }
    let records: Vec<msrwasm::tools::TraceRecord> = std::fs::read_to_string(&trace)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let first_at = |k: usize| {
        let value = format!("{k:#x}");
        records
            .iter()
            .find(|r| r.value.as_deref() == Some(value.as_str()))
            .map(|r| r.t_ns)
    };
    let latencies = renamed_at
        .iter()
        .filter_map(|&(k, at)| first_at(k).map(|t| (t as f64 - at.as_nanos() as f64) / 1e6))
        .collect();
    let longest_gap = |from: u64, to: u64| {
        let mut longest = 0u64;
        for vcpu in 0..2 {
            let times: Vec<u64> = records
                .iter()
                .filter(|r| r.vcpu == vcpu && (from..to).contains(&r.t_ns))
                .map(|r| r.t_ns)
                .collect();
            longest = longest.max(times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0));
        }
        longest as f64 / 1e6
    };
    let swaps_from = renamed_at.first().map_or(0, |(_, at)| at.as_nanos() as u64);
    Ok(ReloadFigures {
        latencies_ms: latencies,
        gap_ms: longest_gap(swaps_from, u64::MAX),
        gap_no_swap_ms: longest_gap(quiet_from.as_nanos() as u64, quiet_to.as_nanos() as u64),
        switch_ms: report.stats.total().longest_switch_ns as f64 / 1e6,
    })
}

/// Median microseconds until a call of `rdmsr_body` (which never returns)
/// is stopped by the default budget.
fn runaway_us(rdmsr_body: &str) -> Result<f64, BenchError> {
    let wat = format!(
        r#"(module (import "msr" "vcpu" (func $vcpu (result i32)))
          (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
          (func (export "rdmsr") (param i32) (result i32) {rdmsr_body}))"#
    );
    let settings = PluginSettings::new("runaway", "runaway.wat");
    let plugin = Arc::new(Plugin::from_bytes(
        &Runtime::shared(),
        settings,
        wat.as_bytes(),
        &StateStore::default(),
    )?);
    let mut times = Vec::new();
    for _ in 0..21 {
        let mut instance = plugin.instantiate(0)?;
        let started = Instant::now();
        let result = instance.rdmsr(LOOP_MSR, ExitReason::Unknown.bits());
        times.push(started.elapsed().as_secs_f64() * 1e6);
        if result != Err(msrwasm::CallError::Timeout) {
            return Err(BenchError::Guest(VmEnd::Error(format!(
                "the runaway plugin was not stopped: {result:?}"
            ))));
        }
    }
    Ok(median(times))
}

/// Runs every measurement; `progress` hears what is being measured.
pub fn run(options: BenchOptions, mut progress: impl FnMut(&str)) -> Result<BenchReport, BenchError> {
    let files = Files::new()?;
    let rounds = options.rounds.max(1);
    let (mut native, mut wasm, mut chain, mut two, mut observed) = (vec![], vec![], vec![], vec![], vec![]);
    let mut nojit = vec![];
    let (mut scraped, mut top_ms, mut scrape_ms) = (vec![], vec![], vec![]);
    for round in 1..=rounds {
        progress(&format!("end to end, round {round}/{rounds}"));
        native.push(files.run(Answerer::Native, 1)?);
        wasm.push(files.run(Answerer::Wasm, 1)?);
        nojit.push(files.run(Answerer::NoJit, 1)?);
        observed.push(files.run(Answerer::Observed, 1)?);
        let (rate, (refreshes, scrapes)) = files.run_polled(Answerer::Scraped, 1)?;
        scraped.push(rate);
        top_ms.extend(refreshes);
        scrape_ms.extend(scrapes);
        chain.push(files.run(Answerer::Chain, 1)?);
        two.push(files.run(Answerer::Wasm, 2)?);
    }
    progress("dispatcher alone");
    // Interleaved too, so that frequency changes hit all three alike.
    let (mut dn, mut de, mut dw, mut dc) = (vec![], vec![], vec![], vec![]);
    let (mut ds, mut dj) = (vec![], vec![]);
    for _ in 0..3 {
        dn.push(dispatch_ns(&files, Answerer::Native, options.dispatches)?);
        de.push(dispatch_ns(&files, Answerer::Nobody, options.dispatches)?);
        dw.push(dispatch_ns(&files, Answerer::Wasm, options.dispatches)?);
        dc.push(dispatch_ns(&files, Answerer::Chain, options.dispatches)?);
        ds.push(dispatch_ns(&files, Answerer::NoSignals, options.dispatches)?);
        dj.push(dispatch_ns(&files, Answerer::NoJit, options.dispatches)?);
    }
    progress(&format!("hot reload, {} swaps", options.swaps));
    let reload = reload_latency(&files, options.swaps.max(1))?;
    let worst = reload.latencies_ms.iter().copied().fold(0.0, f64::max);
    progress("budget enforcement");
    let runaway_wasm = runaway_us("(loop $l (br $l)) (i32.const 2)")?;
    let runaway_host = runaway_us("(loop $l (drop (call $vcpu)) (br $l)) (i32.const 2)")?;
    let nojit = median(nojit);
    let (native, wasm, chain, two, observed, scraped) = (
        median(native),
        median(wasm),
        median(chain),
        median(two),
        median(observed),
        median(scraped),
    );
    Ok(BenchReport {
        release_build: !cfg!(debug_assertions),
        rounds,
        exits_per_round: LOOP_ITERATIONS,
        native_exits_per_s: native,
        wasm_exits_per_s: wasm,
        chain_exits_per_s: chain,
        wasm_vs_native: wasm / native,
        chain_vs_native: chain / native,
        nojit_exits_per_s: nojit,
        nojit_vs_native: nojit / native,
        observed_exits_per_s: observed,
        observed_vs_wasm: observed / wasm,
        scraped_exits_per_s: scraped,
        scraped_vs_observed: scraped / observed,
        polls: top_ms.len(),
        top_refresh_ms: if top_ms.is_empty() { f64::NAN } else { median(top_ms) },
        scrape_ms: if scrape_ms.is_empty() {
            f64::NAN
        } else {
            median(scrape_ms)
        },
        dispatch_native_ns: median(dn),
        dispatch_nobody_ns: median(de),
        dispatch_wasm_ns: median(dw),
        dispatch_chain_ns: median(dc),
        dispatch_nosignals_ns: median(ds),
        dispatch_nojit_ns: median(dj),
        wasm_2vcpu_exits_per_s: two,
        scaling_2_vs_1: two / wasm,
        swaps: reload.latencies_ms.len(),
        reload_median_ms: median(reload.latencies_ms),
        reload_worst_ms: worst,
        longest_vcpu_gap_ms: reload.gap_ms,
        longest_vcpu_gap_no_swap_ms: reload.gap_no_swap_ms,
        longest_switch_ms: reload.switch_ms,
        runaway_wasm_us: runaway_wasm,
        runaway_host_calls_us: runaway_host,
    })
}

/// How `msrwasm bench --plugin FILE...` runs each plugin.
#[derive(Clone, Debug)]
pub struct PluginBench {
    /// Manifest `memory_max_kib` and `timeout_us` of each plugin.
    pub memory_max_kib: u64,
    pub timeout_us: u64,
    /// The MSR read in the dispatch measurement.
    pub msr: u32,
    /// Synthetic exits per dispatch round.
    pub dispatches: u64,
    /// Versions swapped into a running VM (0: skip).
    pub reload_swaps: usize,
    /// Grant every plugin host energy, read from here.
    pub energy: Option<msrwasm::EnergyOptions>,
}

impl PluginBench {
    fn spec(&self, file: &std::path::Path) -> PolicySpec {
        let mut spec = PolicySpec::from_paths(&[file.to_owned()], Unhandled::Ignore);
        spec.plugins[0].memory_max_kib = self.memory_max_kib;
        spec.plugins[0].timeout_us = self.timeout_us;
        spec.plugins[0].energy = self.energy.is_some();
        spec
    }
}

/// What `msrwasm bench --plugin FILE...` measures of each plugin.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PluginFigures {
    pub file: String,
    pub flavour: String,
    pub size_bytes: u64,
    /// Compile and validate, no cache.
    pub cold_load_ms: f64,
    /// Load from the on-disk cache of compiled plugins.
    pub warm_load_ms: f64,
    pub warm_vs_cold: f64,
    /// One more instance (what each vCPU and each reload costs).
    pub instantiate_us: f64,
    /// Resident memory per instance, KiB.
    pub rss_per_instance_kib: f64,
    /// Median ns per synthetic RDMSR of `msr` through the dispatcher.
    pub dispatch_ns: f64,
    /// Plugin errors (timeouts, traps) during the dispatch measurement:
    /// anything but 0 makes `dispatch_ns` meaningless.
    pub dispatch_errors: u64,
    /// The longest single dispatch among `dispatches` calls timed one by
    /// one, µs: what one access can hold a vCPU (set `timeout_us` above it).
    pub worst_call_us: f64,
    /// Reloads of a new version of this plugin on a 2-vCPU VM whose vCPUs
    /// exit continuously: the longest time a switch held a vCPU, ms.
    pub reload_swaps: usize,
    pub reload_longest_switch_ms: Option<f64>,
}

impl PluginFigures {
    pub fn table(rows: &[PluginFigures], msr: u32) -> String {
        let mut s = format!(
            "{:<44} {:>9} {:>7} {:>9} {:>8} {:>6} {:>9} {:>9} {:>11} {:>9} {:>6} {:>9}\n",
            "plugin",
            "flavour",
            "KiB",
            "cold ms",
            "warm ms",
            "warm%",
            "inst. us",
            "KiB/inst",
            format!("ns/rd {msr:#x}"),
            "worst us",
            "errors",
            "switch ms"
        );
        for r in rows {
            let skip = r.file.chars().count().saturating_sub(44);
            let name: String = r.file.chars().skip(skip).collect();
            s += &format!(
                "{:<44} {:>9} {:>7.0} {:>9.1} {:>8.1} {:>5.1}% {:>9.1} {:>9.0} {:>11.1} {:>9.1} {:>6} {:>9}\n",
                name,
                r.flavour,
                r.size_bytes as f64 / 1024.0,
                r.cold_load_ms,
                r.warm_load_ms,
                r.warm_vs_cold * 100.0,
                r.instantiate_us,
                r.rss_per_instance_kib,
                r.dispatch_ns,
                r.worst_call_us,
                r.dispatch_errors,
                r.reload_longest_switch_ms.map_or("-".into(), |v| format!("{v:.3}")),
            );
        }
        s
    }
}

/// Resident set size of this process, KiB.
fn rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(0.0, |pages| pages * 4.0)
}

/// Measures each plugin in `files`: load cold and warm, instantiate,
/// memory per instance, dispatch of an RDMSR of `msr`, and (with
/// `reload_swaps` > 0, on KVM) the longest switch when new versions of it
/// are swapped into a 2-vCPU VM whose vCPUs exit continuously.
pub fn plugins(
    files: &[std::path::PathBuf],
    how: &PluginBench,
    mut progress: impl FnMut(&str),
) -> Result<Vec<PluginFigures>, BenchError> {
    let PluginBench {
        msr,
        dispatches,
        reload_swaps,
        ..
    } = *how;
    let mut rows = Vec::new();
    for file in files {
        progress(&format!("{}: loading", file.display()));
        let bytes = msrwasm::tools::read_plugin_file(file)?;
        let spec = how.spec(file);
        let build = |cache: Option<&std::path::Path>| -> Result<(Engine, f64), BenchError> {
            let mut builder = Engine::builder().filter(RecordingFilter::default());
            if let Some(energy) = &how.energy {
                builder = builder.energy(energy.clone());
            }
            if let Some(dir) = cache {
                builder = builder.cache_dir(dir);
            }
            let started = Instant::now();
            let engine = builder.build(spec.clone())?;
            Ok((engine, started.elapsed().as_secs_f64() * 1e3))
        };
        let cache = tempfile::Builder::new().prefix("msrwasm-bench-cache-").tempdir()?;
        let (_, cold) = build(Some(cache.path()))?; // compiles, fills the cache
        let (_, cold2) = build(None)?;
        let (engine, warm) = build(Some(cache.path()))?;
        let cold = cold.min(cold2);
        let plugin = msrwasm::tools::loaded(&engine.policy())[0].clone();
        progress(&format!("{}: instances", file.display()));
        let before = rss_kib();
        let mut instances = Vec::new();
        let mut times = Vec::new();
        for i in 0..16 {
            let started = Instant::now();
            instances.push(plugin.instantiate(i)?);
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
        let per_instance = (rss_kib() - before) / instances.len() as f64;
        drop(instances);
        progress(&format!("{}: dispatch", file.display()));
        let mut dispatcher = engine.dispatcher(0);
        dispatcher.warm_up()?;
        let access = Access::read(msr, ExitReason::Filter);
        let mut rounds = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            for _ in 0..dispatches {
                std::hint::black_box(dispatcher.handle(std::hint::black_box(access), &mut NoKvm).reply);
            }
            rounds.push(started.elapsed().as_nanos() as f64 / dispatches as f64);
        }
        // Each call timed alone: the worst single call (a garbage
        // collection inside one call of a JavaScript or Python plugin, say)
        // is what holds a vCPU, and what `timeout_us` must cover.
        let mut worst_ns = 0u128;
        for _ in 0..dispatches {
            let started = Instant::now();
            std::hint::black_box(dispatcher.handle(std::hint::black_box(access), &mut NoKvm).reply);
            worst_ns = worst_ns.max(started.elapsed().as_nanos());
        }
        let dispatch_errors = engine.stats().plugins.values().map(|p| p.errors).sum();
        let switch = match reload_swaps {
            0 => None,
            n => {
                progress(&format!("{}: {n} reloads on 2 busy vCPUs", file.display()));
                Some(reload_switch(file, &bytes, how)?)
            }
        };
        rows.push(PluginFigures {
            file: file.display().to_string(),
            flavour: format!("{:?}", plugin.flavour()).to_lowercase(),
            size_bytes: bytes.len() as u64,
            cold_load_ms: cold,
            warm_load_ms: warm,
            warm_vs_cold: warm / cold,
            instantiate_us: median(times),
            rss_per_instance_kib: per_instance,
            dispatch_ns: median(rounds),
            dispatch_errors,
            worst_call_us: worst_ns as f64 / 1e3,
            reload_swaps,
            reload_longest_switch_ms: switch,
        });
    }
    Ok(rows)
}

/// Swaps `swaps` new versions of `bytes` (differing only in their
/// `msrwasm.meta` version) into a 2-vCPU VM running the forever guest;
/// returns the longest switch any vCPU saw, ms.
fn reload_switch(file: &std::path::Path, bytes: &[u8], how: &PluginBench) -> Result<f64, BenchError> {
    let swaps = how.reload_swaps;
    let dir = tempfile::Builder::new().prefix("msrwasm-bench-reload-").tempdir()?;
    let binary = msrwasm::tools::to_binary(file, bytes)?;
    let version = |k: usize| -> Result<Vec<u8>, BenchError> {
        let mut meta = msrwasm::tools::meta::read(&binary)
            .map_err(|e| BenchError::Guest(VmEnd::Error(format!("{}: {e}", file.display()))))?
            .unwrap_or_default();
        meta.insert("version".into(), format!("bench-{k}"));
        msrwasm::tools::meta::write(&binary, &meta)
            .map_err(|e| BenchError::Guest(VmEnd::Error(format!("{}: {e}", file.display()))))
    };
    let plugin = dir.path().join("plugin.wasm");
    std::fs::write(&plugin, version(0)?)?;
    std::fs::write(dir.path().join("forever.elf"), FOREVER_GUEST)?;
    let mut config = VmConfig::new(dir.path().join("forever.elf"), how.spec(&plugin));
    if let Some(energy) = &how.energy {
        config.energy = energy.clone();
    }
    config.vcpus = 2;
    config.mem_mib = 16;
    config.serial = Box::new(std::io::sink());
    let vm = Vm::new(config)?;
    let (stop, engine) = (vm.stop_handle(), vm.engine().clone());
    let running = std::thread::spawn(move || vm.run());
    for k in 1..=swaps {
        let next = dir.path().join("plugin.wasm.new");
        std::fs::write(&next, version(k)?)?;
        std::fs::rename(&next, &plugin)?;
        let before = engine.generation();
        let switched = engine.stats().total().switches;
        let reloads = engine.refresh(&Default::default());
        if engine.generation() == before {
            stop.stop();
            let _ = running.join();
            return Err(BenchError::Guest(VmEnd::Error(format!(
                "version {k} was not applied: {reloads:?}"
            ))));
        }
        // Every vCPU takes the switch at its next exit.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while engine.stats().total().switches < switched + 2 && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    stop.stop();
    let report = running
        .join()
        .map_err(|_| BenchError::Guest(VmEnd::Error("VM thread panicked".into())))??;
    Ok(report.stats.total().longest_switch_ns as f64 / 1e6)
}
