//! Plugins: compiling and validating a module once, then running it as one
//! instance (and one `Store`) per vCPU.

pub mod abi;
pub mod health;
mod imports;
pub mod meta;
pub mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, InstancePre, Module, Store, StoreLimits, StoreLimitsBuilder, Trap, TypedFunc};

pub use abi::Shape;
use imports::PluginCtx;
use state::{StateScope, StateStore};

/// Bound on the wasm stack, so deep recursion traps instead of overflowing
/// the vCPU thread.
pub const MAX_WASM_STACK: usize = 256 * 1024;

/// The one wasmtime `Engine` of the process.
///
/// The per-call CPU budget is enforced with fuel rather than epochs: fuel
/// counts the plugin's own work, so a vCPU thread preempted by the host
/// scheduler in the middle of a call is not mistaken for a runaway plugin.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        Engine::new(&config).expect("the static wasmtime configuration is valid")
    })
}

/// Fuel this machine burns per microsecond of plugin CPU time, measured
/// once per process on a busy loop, so that `timeout_us` means time.
pub fn fuel_per_us() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        const PROBE_FUEL: u64 = 4_000_000;
        let measure = || -> Option<u64> {
            let module = Module::new(engine(), "(module (func (export \"spin\") (loop $l (br $l))))").ok()?;
            let mut store = Store::new(engine(), ());
            store.set_fuel(PROBE_FUEL).ok()?;
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).ok()?;
            let spin = instance.get_typed_func::<(), ()>(&mut store, "spin").ok()?;
            let started = std::time::Instant::now();
            let _ = spin.call(&mut store, ());
            let us = started.elapsed().as_micros().max(1) as u64;
            Some(PROBE_FUEL / us)
        };
        // Bounds keep a disturbed measurement from making budgets absurd.
        measure().unwrap_or(1000).clamp(100, 20_000)
    })
}

/// What a plugin does when it fails (trap, timeout, bad status, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The access gets #GP.
    #[default]
    Fault,
    /// As if the plugin had returned PASS.
    Pass,
}

/// Per-plugin settings from the manifest (or defaults for `--plugin`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginSettings {
    pub name: String,
    pub path: PathBuf,
    /// Manifest `msrs`: overrides the plugin's own `claim` export.
    pub msrs: Option<Vec<(u32, u32)>>,
    pub on_error: OnError,
    pub timeout_us: u64,
    pub memory_max_kib: u64,
    pub sha256: Option<String>,
    pub config: BTreeMap<String, i64>,
}

impl PluginSettings {
    pub const DEFAULT_TIMEOUT_US: u64 = 1000;
    pub const DEFAULT_MEMORY_MAX_KIB: u64 = 1024;

    /// Defaults for a plugin given by path alone.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            msrs: None,
            on_error: OnError::Fault,
            timeout_us: Self::DEFAULT_TIMEOUT_US,
            memory_max_kib: Self::DEFAULT_MEMORY_MAX_KIB,
            sha256: None,
            config: BTreeMap::new(),
        }
    }
}

/// Why a plugin cannot be loaded. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("plugin {}: {size} bytes is over the {} MiB limit for plugin files", path.display(), MAX_PLUGIN_BYTES >> 20)]
    TooLarge { path: PathBuf, size: u64 },
    #[error("plugin {}: content sha256 {actual} does not match the pinned sha256 {expected}", path.display())]
    Sha256Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("plugin {}: not WebAssembly: {reason}", path.display())]
    NotWasm { path: PathBuf, reason: String },
    #[error("plugin {}: {reason}", path.display())]
    Abi { path: PathBuf, reason: String },
    #[error("plugin {}: msrwasm_abi_version() returned {version}; this host speaks ABI version {}", path.display(), abi::ABI_VERSION)]
    AbiVersion { path: PathBuf, version: i32 },
    #[error("plugin {}: init() refused the load with code {code}", path.display())]
    InitRefused { path: PathBuf, code: i32 },
    #[error("plugin {}: {what} failed: {reason}", path.display())]
    Instantiate {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("plugin {}: claim(): {reason}", path.display())]
    Claim { path: PathBuf, reason: String },
}

/// A compiled, validated plugin, ready to be instantiated on every vCPU.
pub struct Plugin {
    settings: PluginSettings,
    sha256: String,
    shape: Shape,
    /// The claim list in force: the manifest's `msrs`, else the plugin's
    /// `claim` export; `None` means the plugin is asked for every deflected
    /// access but puts nothing into the MSR filter.
    claims: Option<Vec<(u32, u32)>>,
    pre: InstancePre<PluginCtx>,
    state: Arc<StateScope>,
    config: Arc<BTreeMap<String, i64>>,
    health: health::Health,
    meta: Option<meta::Meta>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.settings.name)
            .field("path", &self.settings.path)
            .field("sha256", &self.sha256)
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

/// A clock a test controls: nanoseconds that `msr.now_ns` returns.
pub type ManualClock = Arc<std::sync::atomic::AtomicU64>;

/// Largest plugin file the host reads (a guard against mistakes such as
/// pointing `path` at a disk image).
pub const MAX_PLUGIN_BYTES: u64 = 64 << 20;

/// Reads a plugin file, refusing directories and files over
/// [`MAX_PLUGIN_BYTES`] before reading them.
pub fn read_plugin_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.is_dir() {
        return Err(read_err(std::io::Error::other("it is a directory")));
    }
    if meta.len() > MAX_PLUGIN_BYTES {
        return Err(LoadError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    std::fs::read(path).map_err(read_err)
}

/// Hex SHA-256 of a plugin file's content: its version identity.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Plugin {
    /// Reads, compiles and validates the plugin `settings` names, running
    /// `init` and `claim` on a probe instance.
    pub fn load(settings: PluginSettings, state: &StateStore) -> Result<Self, LoadError> {
        let bytes = read_plugin_file(&settings.path)?;
        Self::from_bytes(settings, &bytes, state)
    }

    /// As [`Plugin::load`], reusing a compiled module of the same content
    /// from `cache` (and adding to it).
    pub fn load_cached(settings: PluginSettings, state: &StateStore, cache: &ModuleCache) -> Result<Self, LoadError> {
        let bytes = read_plugin_file(&settings.path)?;
        Self::from_bytes_cached(settings, &bytes, state, cache)
    }

    /// As [`Plugin::load_cached`], from bytes already read.
    pub fn from_bytes_cached(
        settings: PluginSettings,
        bytes: &[u8],
        state: &StateStore,
        cache: &ModuleCache,
    ) -> Result<Self, LoadError> {
        Self::build(settings, bytes, state, Some(cache))
    }

    /// As [`Plugin::load`], from bytes already read (`settings.path` names them).
    pub fn from_bytes(settings: PluginSettings, bytes: &[u8], state: &StateStore) -> Result<Self, LoadError> {
        Self::build(settings, bytes, state, None)
    }

    fn build(
        settings: PluginSettings,
        bytes: &[u8],
        state: &StateStore,
        cache: Option<&ModuleCache>,
    ) -> Result<Self, LoadError> {
        let path = settings.path.clone();
        let sha256 = content_hash(bytes);
        if let Some(expected) = &settings.sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(LoadError::Sha256Mismatch {
                path,
                expected: expected.clone(),
                actual: sha256,
            });
        }
        let module = match cache.and_then(|c| c.get(&sha256)) {
            Some(module) => module,
            None => {
                let module = compile(&path, bytes)?;
                if let Some(cache) = cache {
                    cache.insert(&sha256, &module);
                }
                module
            }
        };
        let meta = meta::read(bytes).map_err(|reason| LoadError::Abi {
            path: path.clone(),
            reason,
        })?;
        let shape = abi::check_shape(&module).map_err(|reason| LoadError::Abi {
            path: path.clone(),
            reason,
        })?;
        let pre = imports::linker().instantiate_pre(&module).map_err(|e| LoadError::Abi {
            path: path.clone(),
            reason: format!("{e:#}"),
        })?;
        let mut plugin = Self {
            state: state.scope(&settings.name),
            config: Arc::new(settings.config.clone()),
            claims: settings.msrs.clone(),
            settings,
            sha256,
            shape,
            pre,
            health: health::Health::new(health::QuarantinePolicy::default()),
            meta,
        };
        plugin.probe()?;
        Ok(plugin)
    }

    /// Checks the version, runs `init` and reads `claim` on a throwaway instance.
    fn probe(&mut self) -> Result<(), LoadError> {
        let path = &self.settings.path;
        let (mut store, instance) = self.instantiate_raw(0, None)?;
        let version = instance
            .get_typed_func::<(), i32>(&mut store, "msrwasm_abi_version")
            .and_then(|f| f.call(&mut store, ()))
            .map_err(|e| LoadError::Instantiate {
                path: path.clone(),
                what: "msrwasm_abi_version()",
                reason: describe_trap(&e),
            })?;
        if version != abi::ABI_VERSION {
            return Err(LoadError::AbiVersion {
                path: path.clone(),
                version,
            });
        }
        self.run_init(&mut store, &instance)?;
        if self.claims.is_none() && self.shape.claim {
            let claim = instance
                .get_typed_func::<i32, i64>(&mut store, "claim")
                .map_err(|e| LoadError::Claim {
                    path: path.clone(),
                    reason: format!("{e:#}"),
                })?;
            let mut ranges = Vec::new();
            for n in 0..=abi::MAX_CLAIM_RANGES {
                set_fuel(&mut store, self.fuel());
                let packed = claim.call(&mut store, n).map_err(|e| LoadError::Claim {
                    path: path.clone(),
                    reason: describe_trap(&e),
                })?;
                if packed == -1 {
                    break;
                }
                if n == abi::MAX_CLAIM_RANGES {
                    return Err(LoadError::Claim {
                        path: path.clone(),
                        reason: format!("more than {} ranges (the list must end with -1)", abi::MAX_CLAIM_RANGES),
                    });
                }
                ranges.push(abi::unpack_claim(packed).map_err(|reason| LoadError::Claim {
                    path: path.clone(),
                    reason,
                })?);
            }
            // An empty list means what no export means: a catch-all.
            self.claims = (!ranges.is_empty()).then_some(ranges);
        }
        Ok(())
    }

    /// The per-call budget in fuel.
    fn fuel(&self) -> u64 {
        self.settings.timeout_us.saturating_mul(fuel_per_us())
    }

    fn instantiate_raw(
        &self,
        vcpu: u32,
        clock: Option<ManualClock>,
    ) -> Result<(Store<PluginCtx>, wasmtime::Instance), LoadError> {
        let limits = self.store_limits();
        let ctx = PluginCtx::new(
            &self.settings.name,
            vcpu,
            self.state.clone(),
            self.config.clone(),
            limits,
            clock,
        );
        let mut store = Store::new(engine(), ctx);
        store.limiter(|ctx| &mut ctx.limits);
        // A start function runs during instantiation: it gets the same budget.
        set_fuel(&mut store, self.fuel());
        let instance = self.pre.instantiate(&mut store).map_err(|e| LoadError::Instantiate {
            path: self.settings.path.clone(),
            what: "instantiation",
            reason: describe_trap(&e),
        })?;
        Ok((store, instance))
    }

    fn store_limits(&self) -> StoreLimits {
        StoreLimitsBuilder::new()
            .memory_size(usize::try_from(self.settings.memory_max_kib * 1024).unwrap_or(usize::MAX))
            .memories(1)
            .tables(4)
            .table_elements(65_536)
            .instances(1)
            .trap_on_grow_failure(false)
            .build()
    }

    fn run_init(&self, store: &mut Store<PluginCtx>, instance: &wasmtime::Instance) -> Result<(), LoadError> {
        if !self.shape.init {
            return Ok(());
        }
        let path = &self.settings.path;
        set_fuel(store, self.fuel());
        let code = instance
            .get_typed_func::<(), i32>(&mut *store, "init")
            .and_then(|f| f.call(&mut *store, ()))
            .map_err(|e| LoadError::Instantiate {
                path: path.clone(),
                what: "init()",
                reason: describe_trap(&e),
            })?;
        if code != 0 {
            return Err(LoadError::InitRefused {
                path: path.clone(),
                code,
            });
        }
        Ok(())
    }

    /// A fresh instance for vCPU `vcpu`, `init` already run.
    pub fn instantiate(self: &Arc<Self>, vcpu: u32) -> Result<PluginInstance, LoadError> {
        self.instantiate_with_clock(vcpu, None)
    }

    /// As [`Plugin::instantiate`], with `msr.now_ns` read from `clock`
    /// instead of the host's clock when given (for scripted tests).
    pub fn instantiate_with_clock(
        self: &Arc<Self>,
        vcpu: u32,
        clock: Option<ManualClock>,
    ) -> Result<PluginInstance, LoadError> {
        let (mut store, instance) = self.instantiate_raw(vcpu, clock)?;
        self.run_init(&mut store, &instance)?;
        let rdmsr = self
            .shape
            .rdmsr
            .then(|| instance.get_typed_func(&mut store, "rdmsr"))
            .transpose();
        let wrmsr = self
            .shape
            .wrmsr
            .then(|| instance.get_typed_func(&mut store, "wrmsr"))
            .transpose();
        let (rdmsr, wrmsr) = rdmsr.and_then(|r| Ok((r, wrmsr?))).map_err(|e| LoadError::Abi {
            path: self.settings.path.clone(),
            reason: format!("{e:#}"),
        })?;
        Ok(PluginInstance {
            store,
            rdmsr,
            wrmsr,
            fuel: self.fuel(),
        })
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    pub fn settings(&self) -> &PluginSettings {
        &self.settings
    }

    /// Hex SHA-256 of the content this plugin was compiled from.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The `msrwasm.meta` section, if the plugin carries one.
    pub fn meta(&self) -> Option<&meta::Meta> {
        self.meta.as_ref()
    }

    /// Names of the module's exports and imports (`module.name`).
    pub fn interface(&self) -> (Vec<String>, Vec<String>) {
        let module = self.pre.module();
        let exports = module.exports().map(|e| e.name().to_owned()).collect();
        let imports = module
            .imports()
            .map(|i| format!("{}.{}", i.module(), i.name()))
            .collect();
        (exports, imports)
    }

    /// Error history and quarantine of this version.
    pub fn health(&self) -> &health::Health {
        &self.health
    }

    pub fn claims(&self) -> Option<&[(u32, u32)]> {
        self.claims.as_deref()
    }
}

/// Gives the next call (or init, claim, start function) its budget: `fuel`
/// for wasm code and as much time again for host calls.
fn set_fuel(store: &mut Store<PluginCtx>, fuel: u64) {
    store.set_fuel(fuel).expect("fuel is enabled on the engine");
    store.data_mut().host_budget_ns = fuel.saturating_mul(1000) / fuel_per_us();
}

/// Compiled modules by content hash, so that content seen before (a
/// rollback, a file touched without change) goes live without compiling.
/// In memory only; the oldest entries go first.
#[derive(Default)]
pub struct ModuleCache {
    modules: std::sync::Mutex<std::collections::VecDeque<(String, Module)>>,
}

impl ModuleCache {
    /// Modules kept at most.
    pub const CAPACITY: usize = 64;

    fn get(&self, sha256: &str) -> Option<Module> {
        let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        modules.iter().find(|(h, _)| h == sha256).map(|(_, m)| m.clone())
    }

    fn insert(&self, sha256: &str, module: &Module) {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if modules.len() == Self::CAPACITY {
            modules.pop_front();
        }
        modules.push_back((sha256.to_owned(), module.clone()));
    }

    /// Whether content with this hash is compiled already.
    pub fn contains(&self, sha256: &str) -> bool {
        self.get(sha256).is_some()
    }

    /// Number of modules held.
    pub fn len(&self) -> usize {
        self.modules.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn compile(path: &Path, bytes: &[u8]) -> Result<Module, LoadError> {
    let not_wasm = |reason: String| LoadError::NotWasm {
        path: path.to_owned(),
        reason,
    };
    if bytes.is_empty() {
        return Err(not_wasm("the file is empty".into()));
    }
    if !bytes.starts_with(b"\0asm") && std::str::from_utf8(bytes).is_err() {
        return Err(not_wasm(
            "neither a wasm binary (no \\0asm magic) nor WAT text (not UTF-8)".into(),
        ));
    }
    Module::new(engine(), bytes).map_err(|e| not_wasm(one_line(&format!("{e:#}"))))
}

/// Folds a multi-line parser message (message, `--> <anon>:L:C`, source
/// excerpt) into one log-friendly line.
fn one_line(message: &str) -> String {
    let mut lines = message.lines().map(str::trim);
    let mut out = lines.next().unwrap_or_default().to_owned();
    for line in lines {
        if let Some(location) = line.strip_prefix("--> ") {
            let mut parts = location.rsplitn(3, ':');
            if let (Some(column), Some(line)) = (parts.next(), parts.next()) {
                out += &format!(" (line {line}, column {column})");
            }
        } else if !line.is_empty() && !line.starts_with('|') && !line.chars().next().is_some_and(|c| c.is_ascii_digit())
        {
            out += &format!("; {line}");
        }
    }
    out
}

/// A readable account of a wasm failure, naming the budget or limit for the
/// traps the host causes itself.
fn describe_trap(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => "timed out (exceeded its CPU budget, timeout_us)".into(),
        Some(Trap::StackOverflow) => "wasm stack overflow".into(),
        _ => format!("{e:#}"),
    }
}

/// How a plugin answered one access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// HANDLED; for a read, the replied value.
    Handled(u64),
    Fault,
    Pass,
}

/// Why a call is a plugin error (decided by the plugin's `on_error`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("trapped: {0}")]
    Trap(String),
    #[error("timed out (exceeded its CPU budget)")]
    Timeout,
    #[error("returned status {0}, which is not HANDLED (0), FAULT (1) or PASS (2)")]
    BadStatus(i32),
    #[error("returned HANDLED from rdmsr without calling msr.reply")]
    NoReply,
}

/// One vCPU's instance of a plugin, with its own `Store`.
pub struct PluginInstance {
    store: Store<PluginCtx>,
    rdmsr: Option<TypedFunc<i32, i32>>,
    wrmsr: Option<TypedFunc<(i32, i64), i32>>,
    /// The per-call budget.
    fuel: u64,
}

impl PluginInstance {
    /// Asks the plugin about `RDMSR index`.
    pub fn rdmsr(&mut self, index: u32, reason: u32) -> Result<Answer, CallError> {
        // Borrowed, not cloned: cloning a TypedFunc clones its registered
        // type, which costs more than the call itself.
        let Some(func) = &self.rdmsr else {
            return Ok(Answer::Pass);
        };
        self.store.data_mut().begin(reason, true);
        set_fuel(&mut self.store, self.fuel);
        let status = func.call(&mut self.store, index as i32);
        let reply = self.store.data_mut().end();
        match into_answer(status)? {
            Answer::Handled(_) => reply.map(Answer::Handled).ok_or(CallError::NoReply),
            other => Ok(other),
        }
    }

    /// Asks the plugin about `WRMSR index, value`.
    pub fn wrmsr(&mut self, index: u32, value: u64, reason: u32) -> Result<Answer, CallError> {
        let Some(func) = &self.wrmsr else {
            return Ok(Answer::Pass);
        };
        self.store.data_mut().begin(reason, false);
        set_fuel(&mut self.store, self.fuel);
        let status = func.call(&mut self.store, (index as i32, value as i64));
        self.store.data_mut().end();
        into_answer(status)
    }
}

fn into_answer(status: wasmtime::Result<i32>) -> Result<Answer, CallError> {
    match status {
        Ok(abi::STATUS_HANDLED) => Ok(Answer::Handled(0)),
        Ok(abi::STATUS_FAULT) => Ok(Answer::Fault),
        Ok(abi::STATUS_PASS) => Ok(Answer::Pass),
        Ok(other) => Err(CallError::BadStatus(other)),
        Err(e) if matches!(e.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) => Err(CallError::Timeout),
        Err(e) => Err(CallError::Trap(describe_trap(&e))),
    }
}

#[cfg(test)]
mod tests;
