//! The wasm runtime plugins run on: one wasmtime `Engine` configured for
//! bounded execution, the linker of host functions, the per-call CPU budget
//! and the plugin clock.
//!
//! # The CPU budget
//!
//! Every call into a plugin (and `_initialize`, `init`, `claim`, a start
//! function) has a budget of CPU time. Two mechanisms enforce it:
//!
//! - **Fuel** stops pure wasm loops precisely: the budget is converted to
//!   fuel at a rate measured at start-up on this machine (several samples of
//!   the calling thread's CPU time, the fastest one kept, so that fuel never
//!   runs out before the budget does on cheap code).
//! - **Thread CPU time** is the real bound: an epoch ticker interrupts
//!   running wasm every [`RuntimeOptions::tick`]; at each interruption the
//!   call's CPU time so far (host functions, `memory.grow`, bulk memory and
//!   table operations and slow instructions included) is compared with the
//!   budget. A call therefore ends within its budget plus two ticks of CPU
//!   time, whatever it does; CPU time, not wall time, so a vCPU thread the
//!   host scheduler preempts is not blamed.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, Linker};

use super::clock::{Clock, HostClock};
use super::imports::{self, PluginCtx};

/// Bound on the wasm stack, so deep recursion traps instead of overflowing
/// the calling (vCPU) thread.
pub const MAX_WASM_STACK: usize = 256 * 1024;

/// Default interval of the epoch ticker.
pub const DEFAULT_TICK: Duration = Duration::from_micros(500);

/// How plugin code runs: the choice a hardened VMM makes.
///
/// | | [`ExecMode::Jit`] (default) | [`ExecMode::NoJit`] |
/// |---|---|---|
/// | code | native machine code (Cranelift) | Pulley bytecode, run by wasmtime's interpreter |
/// | executable memory | mapped at every load (`PROT_EXEC`) | never |
/// | signal handlers | wasmtime's (unless [`EngineBuilder::signals_based_traps`](crate::EngineBuilder::signals_based_traps)`(false)`) | none |
/// | linear memory | a reservation plus guard pages (`mmap`, `mprotect`) | the heap (`malloc`, `realloc`) |
/// | compiler threads | rayon's pool, started with the runtime | none |
/// | a trivial plugin call | about 50 ns | about 10 times that (`msrwasm bench` measures both) |
///
/// A plugin compiled for one mode does not load in the other; the disk
/// cache keeps them apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExecMode {
    /// Native code: the fastest, for VMMs that allow `PROT_EXEC` mappings.
    #[default]
    Jit,
    /// No executable memory is ever mapped, msrwasm does no `mprotect` on a
    /// vCPU thread (on glibc, one malloc arena, `mallopt(M_ARENA_MAX, 1)`,
    /// keeps malloc from doing one) and no thread is started after
    /// start-up: for seccomp profiles such as Firecracker's. Bounds and
    /// traps are checked explicitly.
    NoJit,
}

impl ExecMode {
    /// The mode's name in flags and logs: `jit` or `no-jit`.
    pub fn name(self) -> &'static str {
        match self {
            ExecMode::Jit => "jit",
            ExecMode::NoJit => "no-jit",
        }
    }
}

impl std::str::FromStr for ExecMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "jit" => Ok(ExecMode::Jit),
            "no-jit" => Ok(ExecMode::NoJit),
            _ => Err(format!("unknown execution mode `{s}`: expected `jit` or `no-jit`")),
        }
    }
}

/// How a [`Runtime`] is made.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// A wasmtime configuration to start from (for example with a profiler
    /// or a custom allocator set). msrwasm overrides what bounded execution
    /// needs: fuel, epoch interruption, the wasm stack cap and the
    /// component model. `None`: wasmtime's defaults.
    pub config: Option<Config>,
    /// The clock plugins read (`msr.now_ns`).
    pub clock: Arc<dyn Clock>,
    /// How often the CPU-time bound is checked in running wasm.
    pub tick: Duration,
    /// How plugin code runs.
    pub mode: ExecMode,
    /// Whether wasmtime may install SIGSEGV/SIGBUS/SIGILL/SIGFPE handlers
    /// and rely on them for traps (guard pages, hardware traps). `false`
    /// for VMMs that own those signals: every bound is then checked in the
    /// code (slower). Always `false` in [`ExecMode::NoJit`].
    pub signals_based_traps: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            config: None,
            clock: Arc::new(HostClock::new()),
            tick: DEFAULT_TICK,
            mode: ExecMode::Jit,
            signals_based_traps: true,
        }
    }
}

/// Why a runtime cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime refused the configuration.
    #[error("cannot create the wasm engine")]
    Engine(#[source] wasmtime::Error),
    /// The host function definitions do not link.
    #[error("cannot define the plugin host functions")]
    Linker(#[source] wasmtime::Error),
    /// The epoch ticker thread could not start.
    #[error("cannot start the epoch ticker thread")]
    Ticker(#[source] std::io::Error),
}

/// The engine, linker, budget calibration and clock shared by every plugin
/// of a msrwasm engine.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginCtx>,
    component_linker: wasmtime::component::Linker<PluginCtx>,
    fuel_per_us: u64,
    clock: Arc<dyn Clock>,
    tick: Duration,
    mode: ExecMode,
    signals_based_traps: bool,
    limiter: Arc<imports::LogLimiter>,
    ticker: Option<Ticker>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("fuel_per_us", &self.fuel_per_us)
            .field("tick", &self.tick)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Creates a runtime: configures wasmtime, calibrates the fuel rate and
    /// starts the epoch ticker (one thread, stopped when the runtime drops).
    pub fn new(options: RuntimeOptions) -> Result<Arc<Self>, RuntimeError> {
        let mut config = options.config.unwrap_or_default();
        let signals_based_traps = options.signals_based_traps && options.mode == ExecMode::Jit;
        configure(&mut config, options.mode, signals_based_traps).map_err(RuntimeError::Engine)?;
        let engine = Engine::new(&config).map_err(RuntimeError::Engine)?;
        let linker = imports::core_linker(&engine).map_err(RuntimeError::Linker)?;
        let component_linker = super::component::linker(&engine).map_err(RuntimeError::Linker)?;
        let tick = options
            .tick
            .clamp(Duration::from_micros(50), Duration::from_millis(100));
        let fuel_per_us = calibrate(&engine);
        let ticker = Ticker::start(engine.clone(), tick).map_err(RuntimeError::Ticker)?;
        Ok(Arc::new(Self {
            engine,
            linker,
            component_linker,
            fuel_per_us,
            clock: options.clock,
            tick,
            mode: options.mode,
            signals_based_traps,
            limiter: Arc::new(imports::LogLimiter::new()),
            ticker: Some(ticker),
        }))
    }

    /// A process-wide runtime with default options, for tools that load
    /// plugins outside an engine (`msrwasm check`, `msrwasm test`).
    pub fn shared() -> Arc<Self> {
        Self::shared_for(ExecMode::Jit)
    }

    /// As [`Runtime::shared`], in `mode`.
    pub fn shared_for(mode: ExecMode) -> Arc<Self> {
        static SHARED: [OnceLock<Arc<Runtime>>; 2] = [OnceLock::new(), OnceLock::new()];
        let slot = match mode {
            ExecMode::Jit => 0,
            ExecMode::NoJit => 1,
        };
        SHARED[slot]
            .get_or_init(|| {
                Runtime::new(RuntimeOptions {
                    mode,
                    ..RuntimeOptions::default()
                })
                .expect("the default wasm runtime starts")
            })
            .clone()
    }

    /// Whether wasmtime's signal handlers are in use.
    pub fn signals_based_traps(&self) -> bool {
        self.signals_based_traps
    }

    /// What compiled code of this runtime is tied to, as a short hex key:
    /// the versions and the code settings. Builds with and without the
    /// compiler give the same key, so a plugin compiled by `msrwasm check
    /// --cache-dir` loads in an engine without Cranelift. (wasmtime checks
    /// every artifact's real compatibility again when it loads.)
    pub fn code_key(&self) -> String {
        let text = format!(
            "msrwasm {} wasmtime 48 {} {} signals={} pulley={}",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::ARCH,
            self.mode.name(),
            self.signals_based_traps,
            self.engine.is_pulley(),
        );
        super::hex(&<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())[..8])
    }

    /// Does on the calling thread, now, what wasmtime otherwise does the
    /// first time the thread runs wasm: allocate its signal stack (an
    /// `mmap` and an `mprotect`). A VMM whose seccomp filter forbids those
    /// calls runs this on each such thread before applying the filter.
    pub fn prepare_thread() {
        Engine::tls_eager_initialize();
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn linker(&self) -> &Linker<PluginCtx> {
        &self.linker
    }

    pub(crate) fn component_linker(&self) -> &wasmtime::component::Linker<PluginCtx> {
        &self.component_linker
    }

    pub(crate) fn log_limiter(&self) -> Arc<imports::LogLimiter> {
        self.limiter.clone()
    }

    /// The clock plugins read.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Fuel this machine burns per microsecond of CPU time on the cheapest
    /// wasm code (the calibration described in the module docs).
    pub fn fuel_per_us(&self) -> u64 {
        self.fuel_per_us
    }

    /// The epoch tick: the granularity of the CPU-time bound.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// The budget of a call of `us` microseconds.
    pub(crate) fn budget(&self, us: u64) -> Budget {
        Budget {
            fuel: us.saturating_mul(self.fuel_per_us),
            cpu_ns: us.saturating_mul(1000),
            tick_ns: self.tick.as_nanos() as u64,
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.stop();
        }
    }
}

/// What one call may spend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Wasm fuel.
    pub fuel: u64,
    /// Thread CPU time, nanoseconds.
    pub cpu_ns: u64,
    /// The epoch tick, nanoseconds.
    pub tick_ns: u64,
}

/// What msrwasm needs of a wasmtime configuration, applied over `config`:
/// fuel and epoch interruption for the CPU budget, a bounded wasm stack,
/// the component model, and what `mode` and `signals_based_traps` ask.
pub fn configure(config: &mut Config, mode: ExecMode, signals_based_traps: bool) -> wasmtime::Result<()> {
    config.consume_fuel(true);
    config.epoch_interruption(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    config.wasm_component_model(true);
    if !signals_based_traps {
        config.signals_based_traps(false);
        // Explicit bounds checks instead of guard pages: no reservation,
        // no guard, no copy-on-write image, so that linear memory is plain
        // heap memory wasmtime grows with `realloc`.
        config.memory_reservation(0);
        config.memory_guard_size(0);
        config.memory_reservation_for_growth(0);
        config.memory_init_cow(false);
        // wasmtime turns off Cranelift's Spectre guards with it: they fault
        // on purpose, and bounds are then checked by compare and branch.
    }
    if mode == ExecMode::NoJit {
        config.target("pulley64")?;
        #[cfg(feature = "cranelift")]
        config.parallel_compilation(false);
    }
    Ok(())
}

#[cfg(not(feature = "cranelift"))]
fn calibrate(_: &Engine) -> u64 {
    // Nothing to measure with: no compiler. The highest rate leaves the
    // bound to thread CPU time (checked every tick), never stops cheap code
    // early.
    50_000
}

/// Measures fuel per microsecond of thread CPU time on a busy loop: five
/// samples, the fastest kept (bounded so a disturbed machine cannot make
/// budgets absurd).
#[cfg(feature = "cranelift")]
fn calibrate(engine: &Engine) -> u64 {
    const PROBE_FUEL: u64 = 2_000_000;
    let Ok(module) = wasmtime::Module::new(engine, "(module (func (export \"spin\") (loop $l (br $l))))") else {
        return 1000;
    };
    let measure = || -> Option<u64> {
        let mut store = wasmtime::Store::new(engine, ());
        store.set_fuel(PROBE_FUEL).ok()?;
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).ok()?;
        let spin = instance.get_typed_func::<(), ()>(&mut store, "spin").ok()?;
        let started = crate::sys::thread_cpu_ns();
        let _ = spin.call(&mut store, ());
        let ns = crate::sys::thread_cpu_ns().saturating_sub(started).max(1000);
        Some(PROBE_FUEL * 1000 / ns)
    };
    (0..5)
        .filter_map(|_| measure())
        .max()
        .unwrap_or(1000)
        .clamp(100, 50_000)
}

/// The thread that advances the engine's epoch every tick.
struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("msrwasm-epoch".into())
            .spawn(move || {
                let (lock, cvar) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !*stopped {
                    stopped = cvar.wait_timeout(stopped, tick).unwrap_or_else(|e| e.into_inner()).0;
                    engine.increment_epoch();
                }
            })?;
        Ok(Self { stop, thread })
    }

    fn stop(self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A measurement that cannot be made (here: an engine without fuel
    /// metering) gives the fixed fallback rate, never an absurd one.
    #[test]
    fn calibration_that_cannot_measure_falls_back_to_1000_fuel_per_us() {
        let engine = Engine::new(&wasmtime::Config::new()).unwrap();
        assert_eq!(calibrate(&engine), 1000);
    }
}
