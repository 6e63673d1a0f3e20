//! Plugins: reading, validating and compiling a module once, then running
//! it as one instance (and one `Store`) per vCPU.

pub mod abi;
pub mod cache;
pub mod clock;
pub mod component;
pub mod health;
mod imports;
pub mod limits;
pub mod meta;
pub mod runtime;
pub mod state;
pub mod wasi;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(feature = "cranelift")]
use wasmtime::component::Component;
use wasmtime::{InstancePre, Module, Store, Trap, TypedFunc, UpdateDeadline};

pub use crate::msr::{Flavour, PluginInfo};
pub use abi::Shape;
pub use cache::ModuleCache;
use cache::{Artifact, Source};
pub use imports::sanitize;
use imports::{Limits, PluginCtx};
pub use runtime::{ExecMode, Runtime, RuntimeError, RuntimeOptions};
use state::{StateScope, StateStore};

/// The boxed error source of failures that come from wasmtime.
pub type WasmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the guest gets when a plugin fails (trap, timeout, bad status, ...)
/// and while the plugin is quarantined after repeated failures: the
/// plugin's own, explicit choice, in the manner of Envoy's fail-closed and
/// fail-open. Manifest `on_error`: `"fault"` (default), `"pass"` or
/// `"value=N"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Fail closed: the access gets #GP.
    #[default]
    Fault,
    /// Fail open: as if the plugin had returned PASS (the next plugin, KVM's
    /// own handling or `unhandled` decide).
    Pass,
    /// A fixed answer: reads get this value, writes are accepted and dropped.
    Value(u64),
}

impl std::str::FromStr for OnError {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "fault" => Ok(Self::Fault),
            "pass" => Ok(Self::Pass),
            _ => text
                .strip_prefix("value=")
                .and_then(crate::util::parse_number)
                .map(Self::Value)
                .ok_or_else(|| {
                    format!("on_error must be \"fault\", \"pass\" or \"value=N\" (N decimal or 0x hex), not {text:?}")
                }),
        }
    }
}

impl std::fmt::Display for OnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fault => f.write_str("fault"),
            Self::Pass => f.write_str("pass"),
            Self::Value(v) => write!(f, "value={v:#x}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for OnError {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for OnError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Per-plugin settings from the manifest (or defaults for `--plugin`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginSettings {
    /// Unique within a policy; also the scope of the plugin's state store.
    pub name: String,
    /// The `.wasm` or `.wat` file.
    pub path: PathBuf,
    /// Manifest `msrs`: overrides the plugin's own claim list.
    pub msrs: Option<Vec<(u32, u32)>>,
    /// What a plugin error does to the access.
    pub on_error: OnError,
    /// Per-call CPU budget, microseconds.
    pub timeout_us: u64,
    /// Budget of `_initialize` and `init`, microseconds (`None`: 100 x `timeout_us`).
    pub init_timeout_us: Option<u64>,
    /// Linear memory cap, KiB.
    pub memory_max_kib: u64,
    /// Refuse any other content.
    pub sha256: Option<String>,
    /// Integers the plugin reads with `msr.config`.
    pub config: BTreeMap<String, i64>,
    /// The registry artifact `path` came from (`path = "oci://..."`); until
    /// the engine fetches it, `path` holds the reference text.
    pub source: Option<crate::oci::OciSource>,
    /// The manifest grants host energy (`grants = ["energy"]`): the plugin
    /// may import `msr_energy_v1` (core) or `msrwasm:plugin/energy`
    /// (component), and the host samples energy while it is loaded.
    pub energy: bool,
    /// The manifest grants CPU templates (`grants = ["templates"]`): the
    /// templates in the plugin's metadata apply to the VM.
    pub templates: bool,
    /// The manifest confirms claims on MSRs guests read at high rates
    /// (`hot_msrs = true`): no exit-storm warning for this plugin.
    pub hot_msrs: bool,
}

impl PluginSettings {
    /// Default per-call budget.
    pub const DEFAULT_TIMEOUT_US: u64 = 1000;
    /// Default linear memory cap.
    pub const DEFAULT_MEMORY_MAX_KIB: u64 = 1024;

    /// Defaults for a plugin given by path alone.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            msrs: None,
            on_error: OnError::Fault,
            timeout_us: Self::DEFAULT_TIMEOUT_US,
            init_timeout_us: None,
            memory_max_kib: Self::DEFAULT_MEMORY_MAX_KIB,
            sha256: None,
            config: BTreeMap::new(),
            source: None,
            energy: false,
            templates: false,
            hot_msrs: false,
        }
    }

    /// Whether `path` still holds an `oci://` reference the engine has not
    /// fetched yet.
    pub fn is_unfetched(&self) -> bool {
        self.source.is_some() && self.path.to_str().is_some_and(crate::oci::is_reference)
    }

    /// The budget of `_initialize` and `init`.
    pub fn init_budget_us(&self) -> u64 {
        self.init_timeout_us.unwrap_or(self.timeout_us.saturating_mul(100))
    }
}

/// Why a plugin cannot be loaded. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// This build has no compiler (feature `cranelift` off) and the
    /// engine's disk cache has no code compiled for this content.
    #[error(
        "plugin {}: not compiled for this engine, and this build has no compiler (feature `cranelift`): compile it with `msrwasm --cache-dir DIR check --mode no-jit` and build the engine with that cache_dir (a private directory; the log says why an entry there was not used)",
        path.display()
    )]
    NoCompiler {
        /// The file.
        path: PathBuf,
    },
    /// The file cannot be read.
    #[error("plugin {}: cannot read", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: crate::files::ReadError,
    },
    /// The content is not the pinned one.
    #[error("plugin {}: content sha256 {actual} does not match the pinned sha256 {expected}", path.display())]
    Sha256Mismatch {
        /// The file.
        path: PathBuf,
        /// The manifest's `sha256`.
        expected: String,
        /// What the file holds.
        actual: String,
    },
    /// Neither a wasm binary nor WAT text that compiles.
    #[error("plugin {}: not WebAssembly", path.display())]
    NotWasm {
        /// The file.
        path: PathBuf,
        /// What the parser or compiler said.
        #[source]
        source: WasmError,
    },
    /// Over a compile limit: refused before compiling.
    #[error("plugin {}: {reason}", path.display())]
    Limits {
        /// The file.
        path: PathBuf,
        /// Which limit, and how far over.
        reason: String,
    },
    /// Does not match the plugin ABI (exports, imports, signatures).
    #[error("plugin {}: {reason}", path.display())]
    Abi {
        /// The file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// `msrwasm_abi_version` returned something else than 1.
    #[error("plugin {}: msrwasm_abi_version() returned {version}; this host speaks ABI version {}", path.display(), abi::ABI_VERSION)]
    AbiVersion {
        /// The file.
        path: PathBuf,
        /// What it returned.
        version: i32,
    },
    /// `init` returned non-zero (or an error, for components).
    #[error("plugin {}: init() refused the load: {reason}", path.display())]
    InitRefused {
        /// The file.
        path: PathBuf,
        /// The code or message.
        reason: String,
    },
    /// Instantiation, `_initialize`, `init` or `claim` failed.
    #[error("plugin {}: {what} failed", path.display())]
    Instantiate {
        /// The file.
        path: PathBuf,
        /// Which step.
        what: &'static str,
        /// The trap or error.
        #[source]
        source: WasmError,
    },
    /// The plugin imports a host capability the manifest does not grant it.
    #[error("plugin {}: imports {capability}, which the manifest does not grant plugin `{name}` (add grants = [\"{grant}\"] to its [[plugin]] entry)", path.display())]
    NotGranted {
        /// The file.
        path: PathBuf,
        /// The plugin's name.
        name: String,
        /// What it imports.
        capability: &'static str,
        /// The grant that allows it.
        grant: &'static str,
    },
    /// Granted host energy, which the host cannot read.
    #[error("plugin {}: granted host energy, which this host cannot give", path.display())]
    Energy {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::energy::EnergyError,
    },
    /// The claim list is malformed.
    #[error("plugin {}: claim(): {reason}", path.display())]
    Claim {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Compiles a validated binary for `engine` (native or Pulley code).
#[cfg(feature = "cranelift")]
fn compile(engine: &wasmtime::Engine, binary: &[u8], component: bool, path: &Path) -> Result<Artifact, LoadError> {
    let not_wasm = |e: wasmtime::Error| LoadError::NotWasm {
        path: path.to_owned(),
        source: one_line_error(e),
    };
    Ok(match component {
        true => Artifact::Component(Component::new(engine, binary).map_err(not_wasm)?),
        false => Artifact::Module(Module::new(engine, binary).map_err(not_wasm)?),
    })
}

/// Without the compiler, only the disk cache provides code.
#[cfg(not(feature = "cranelift"))]
fn compile(_: &wasmtime::Engine, _: &[u8], _: bool, path: &Path) -> Result<Artifact, LoadError> {
    Err(LoadError::NoCompiler { path: path.to_owned() })
}

/// A compiled, validated plugin version, ready to be instantiated on every
/// vCPU.
pub struct Plugin {
    info: PluginInfo,
    name: Arc<str>,
    settings: PluginSettings,
    shape: Shape,
    /// The claim list in force: the manifest's `msrs`, else the plugin's
    /// own; `None` means the plugin is asked for every deflected access but
    /// puts nothing into the MSR filter.
    claims: Option<Vec<(u32, u32)>>,
    compiled: Compiled,
    runtime: Arc<Runtime>,
    limiter: Arc<imports::LogLimiter>,
    state: Arc<StateScope>,
    config: Arc<BTreeMap<String, i64>>,
    health: health::Health,
    #[cfg_attr(not(feature = "tools"), allow(dead_code))]
    meta: Option<meta::Meta>,
    /// The energy sampler, for a plugin granted it.
    energy: Option<Arc<crate::energy::EnergyHub>>,
    /// CPU templates the plugin carries in its metadata
    /// (`template.0x10a = "0b..."`), so that an OCI tag rolls them out.
    templates: Vec<crate::policy::MsrTemplate>,
    /// Where its compiled code came from (the reload log says).
    compiled_from: Source,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("info", &self.info)
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

/// A validated, compiled plugin of either flavour.
enum Compiled {
    Core(InstancePre<PluginCtx>),
    Component {
        pre: component::bindings::PluginEnergyPre<PluginCtx>,
        #[cfg_attr(not(feature = "tools"), allow(dead_code))]
        imports: Vec<String>,
        #[cfg_attr(not(feature = "tools"), allow(dead_code))]
        exports: Vec<String>,
    },
}

/// `module.name` of every import of a core module.
fn module_imports(module: &Module) -> Vec<String> {
    module
        .imports()
        .map(|i| format!("{}.{}", i.module(), i.name()))
        .collect()
}

/// Whether a plugin's imports (core `module.name`, component interface
/// names, any version) include the host energy capability.
pub(crate) fn imports_energy(imports: &[String]) -> bool {
    imports.iter().any(|i| {
        i.strip_prefix(imports::ENERGY_MODULE)
            .is_some_and(|rest| rest.starts_with('.'))
            || i.starts_with(component::ENERGY_PACKAGE_PREFIX)
    })
}

pub use crate::files::MAX_PLUGIN_BYTES;
pub use crate::util::content_hash;
pub(crate) use crate::util::hex;

/// Reads a plugin file: a regular file of at most [`MAX_PLUGIN_BYTES`],
/// opened without blocking (a FIFO or device is refused, not waited on).
pub fn read_plugin_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    crate::files::read_regular(path, MAX_PLUGIN_BYTES).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Plugin {
    #[cfg(feature = "tools")]
    /// Reads, compiles and validates the plugin `settings` names, running
    /// `init` and `claim` on a probe instance (vCPU 0).
    pub fn load(runtime: &Arc<Runtime>, settings: PluginSettings, state: &StateStore) -> Result<Self, LoadError> {
        let bytes = read_plugin_file(&settings.path)?;
        Self::build(runtime, settings, &bytes, content_hash(&bytes), state, None, None)
    }

    #[cfg(any(test, feature = "tools"))]
    /// As [`Plugin::load`], from bytes already read (`settings.path` names them).
    pub fn from_bytes(
        runtime: &Arc<Runtime>,
        settings: PluginSettings,
        bytes: &[u8],
        state: &StateStore,
    ) -> Result<Self, LoadError> {
        Self::build(runtime, settings, bytes, content_hash(bytes), state, None, None)
    }

    /// As [`Plugin::from_bytes`], compiling through `cache`; `sha256` is
    /// the bytes' [`content_hash`], which the callers have computed already.
    ///
    /// `energy` is the VM's host energy: with it, host capabilities need
    /// the settings' grant and a granted plugin gets the sampler (a host
    /// that cannot give energy refuses it). Without it (`msrwasm check` and
    /// `test`, which load a plugin outside any VM), imports of the
    /// capability are accepted and trap if called.
    pub(crate) fn build(
        runtime: &Arc<Runtime>,
        settings: PluginSettings,
        bytes: &[u8],
        sha256: String,
        state: &StateStore,
        energy: Option<&crate::energy::EnergyGate>,
        cache: Option<&ModuleCache>,
    ) -> Result<Self, LoadError> {
        let path = settings.path.clone();
        if let Some(expected) = &settings.sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(LoadError::Sha256Mismatch {
                path,
                expected: expected.clone(),
                actual: sha256,
            });
        }
        let binary = to_binary(&path, bytes)?;
        let is_component = wasmparser::Parser::is_component(&binary);
        limits::check(&binary, settings.memory_max_kib).map_err(|reason| LoadError::Limits {
            path: path.clone(),
            reason,
        })?;
        let abi_err = |reason: String| LoadError::Abi {
            path: path.clone(),
            reason,
        };
        let engine = runtime.engine();
        let (artifact, source) = match cache.and_then(|c| c.get(&sha256, engine, is_component)) {
            Some(hit) => hit,
            None => (compile(engine, &binary, is_component, &path)?, Source::Compiled),
        };
        let meta = meta::read(&binary).map_err(abi_err)?;
        let templates = meta::templates(meta.as_ref()).map_err(abi_err)?;
        let not_granted = |capability| LoadError::NotGranted {
            path: path.clone(),
            name: settings.name.clone(),
            capability,
            grant: "energy",
        };
        let (compiled, shape, flavour) = match &artifact {
            Artifact::Module(module) => {
                if energy.is_some() && !settings.energy && imports_energy(&module_imports(module)) {
                    return Err(not_granted("host energy (`msr_energy_v1`)"));
                }
                let shape = abi::check_shape(module).map_err(abi_err)?;
                let pre = runtime
                    .linker()
                    .instantiate_pre(module)
                    .map_err(|e| abi_err(wasm_error_text(&e)))?;
                (Compiled::Core(pre), shape, Flavour::Core)
            }
            Artifact::Component(c) => {
                let (imports, exports, unsupported) = component::interface(engine, c);
                if energy.is_some() && !settings.energy && imports_energy(&imports) {
                    return Err(not_granted("host energy (`msrwasm:plugin/energy@1.0.0`)"));
                }
                if !unsupported.is_empty() {
                    return Err(abi_err(format!(
                        "imports {}, which the host does not provide (a component plugin may import `{}` and WASI 0.2 interfaces, served deny-by-default; not wasi:http, nothing else)",
                        unsupported
                            .iter()
                            .map(|i| format!("`{i}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        component::HOST_INTERFACE
                    )));
                }
                if !exports.iter().any(|e| e == component::HANDLER_INTERFACE) {
                    return Err(abi_err(format!(
                        "exports no `{}`: not an msrwasm plugin component (the world is msrwasm:plugin/plugin@1.0.0)",
                        component::HANDLER_INTERFACE
                    )));
                }
                let pre = runtime
                    .component_linker()
                    .instantiate_pre(c)
                    .and_then(component::bindings::PluginEnergyPre::new)
                    .map_err(|e| abi_err(wasm_error_text(&e)))?;
                (
                    Compiled::Component { pre, imports, exports },
                    Shape {
                        rdmsr: true,
                        wrmsr: true,
                        init: true,
                        claim: true,
                        ..Shape::default()
                    },
                    Flavour::Component,
                )
            }
        };
        let energy = match energy {
            Some(gate) if settings.energy => Some(gate.hub(runtime.clock()).map_err(|source| LoadError::Energy {
                path: path.clone(),
                source,
            })?),
            _ => None,
        };
        let name: Arc<str> = settings.name.as_str().into();
        let mut plugin = Self {
            energy,
            info: PluginInfo {
                name: settings.name.clone(),
                path: settings.path.clone(),
                version: sha256.clone(),
                flavour,
            },
            name,
            state: state.scope(&settings.name),
            config: Arc::new(settings.config.clone()),
            claims: settings.msrs.clone(),
            settings,
            shape,
            compiled,
            runtime: runtime.clone(),
            limiter: runtime.log_limiter(),
            health: health::Health::new(health::QuarantinePolicy::default()),
            meta,
            templates,
            compiled_from: source,
        };
        plugin.probe()?;
        if let Some(cache) = cache {
            // Only validated versions are kept: a refused one costs nothing later.
            cache.insert(&sha256, &artifact, source);
        }
        Ok(plugin)
    }

    /// Checks the version, runs `init` and reads the claims on a throwaway
    /// instance (vCPU 0).
    fn probe(&mut self) -> Result<(), LoadError> {
        if let Compiled::Component { .. } = &self.compiled {
            return self.probe_component();
        }
        let path = self.settings.path.clone();
        let (mut store, instance) = self.instantiate_raw(0)?;
        set_budget(&mut store, self.runtime.budget(self.settings.timeout_us));
        let version = instance
            .get_typed_func::<(), i32>(&mut store, "msrwasm_abi_version")
            .and_then(|f| f.call(&mut store, ()))
            .map_err(|e| LoadError::Instantiate {
                path: path.clone(),
                what: "msrwasm_abi_version()",
                source: trap_error(e),
            })?;
        if version != abi::ABI_VERSION {
            return Err(LoadError::AbiVersion { path, version });
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
                set_budget(&mut store, self.runtime.budget(self.settings.timeout_us));
                let packed = claim.call(&mut store, n).map_err(|e| LoadError::Instantiate {
                    path: path.clone(),
                    what: "claim()",
                    source: trap_error(e),
                })?;
                if packed == -1 {
                    break;
                }
                if n == abi::MAX_CLAIM_RANGES {
                    return Err(LoadError::Claim {
                        path,
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

    fn probe_component(&mut self) -> Result<(), LoadError> {
        let path = self.settings.path.clone();
        let mut instance = self.instantiate_component(0)?;
        if self.claims.is_some() {
            return Ok(());
        }
        set_budget(&mut instance.store, self.runtime.budget(self.settings.timeout_us));
        let claims = instance
            .plugin
            .msrwasm_plugin_handler()
            .call_claims(&mut instance.store)
            .map_err(|e| LoadError::Instantiate {
                path: path.clone(),
                what: "claims()",
                source: trap_error(e),
            })?;
        self.claims = match claims {
            None => None,
            Some(list) if list.len() > abi::MAX_CLAIM_RANGES as usize => {
                return Err(LoadError::Claim {
                    path,
                    reason: format!("{} ranges, more than {}", list.len(), abi::MAX_CLAIM_RANGES),
                });
            }
            Some(list) => Some(
                list.iter()
                    .map(|r| match r.first <= r.last {
                        true => Ok((r.first, r.last)),
                        false => Err(LoadError::Claim {
                            path: path.clone(),
                            reason: format!("range {:#x}-{:#x} is reversed", r.first, r.last),
                        }),
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(())
    }

    /// A store for vCPU `vcpu` with this plugin's limits, budget callback
    /// and (when the plugin needs it) WASI context.
    fn store(&self, vcpu: u32) -> Store<PluginCtx> {
        let component = matches!(self.compiled, Compiled::Component { .. });
        let limits = Limits {
            memory_cap: usize::try_from(self.settings.memory_max_kib * 1024).unwrap_or(usize::MAX),
            memory_used: 0,
            table_elements: limits::MAX_TABLE_ELEMENTS,
            memories: if component { 64 } else { 1 },
            tables: if component { 64 } else { 4 },
            instances: if component { 256 } else { 1 },
        };
        let init_budget = self.runtime.budget(self.settings.init_budget_us());
        let mut ctx = PluginCtx::new(
            self.name.clone(),
            self.info.short_version().into(),
            vcpu,
            self.state.clone(),
            self.config.clone(),
            self.runtime.clock().clone(),
            self.limiter.clone(),
            limits,
            init_budget,
        );
        ctx.energy = self.energy.clone();
        if component {
            ctx.wasi = Some(wasi::WasiState {
                ctx: wasi::context(&ctx.log).build(),
                table: wasi::table(),
            });
        } else if self.shape.wasi {
            ctx.wasi_p1 = Some(Box::new(wasi::context(&ctx.log).build_p1()));
        }
        let mut store = Store::new(self.runtime.engine(), ctx);
        store.limiter(|ctx| &mut ctx.limits);
        store.epoch_deadline_callback(|mut cx| {
            let ctx = cx.data_mut();
            let now = crate::sys::thread_cpu_ns();
            // The first interruption may come up to a tick after the call
            // started: count that tick as spent.
            let used = match ctx.cpu_mark {
                None => {
                    ctx.cpu_mark = Some(now);
                    ctx.budget.tick_ns
                }
                Some(mark) => now.saturating_sub(mark).saturating_add(ctx.budget.tick_ns),
            };
            if used > ctx.budget.cpu_ns {
                Err(Trap::Interrupt.into())
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        // A start function and `_initialize` run under the init budget.
        set_budget(&mut store, init_budget);
        store
    }

    /// A component instance for `vcpu` with `init` run.
    fn instantiate_component(&self, vcpu: u32) -> Result<component::Instance, LoadError> {
        let Compiled::Component { pre, .. } = &self.compiled else {
            unreachable!("instantiate_component is only called for components")
        };
        let path = &self.settings.path;
        let mut store = self.store(vcpu);
        let plugin = pre.instantiate(&mut store).map_err(|e| LoadError::Instantiate {
            path: path.clone(),
            what: "instantiation",
            source: instantiation_error(e, self.settings.memory_max_kib),
        })?;
        set_budget(&mut store, self.runtime.budget(self.settings.init_budget_us()));
        let init = plugin
            .msrwasm_plugin_handler()
            .call_init(&mut store)
            .map_err(|e| LoadError::Instantiate {
                path: path.clone(),
                what: "init()",
                source: trap_error(e),
            })?;
        if let Err(reason) = init {
            let mut reason = sanitize(&reason);
            reason.truncate(1024);
            return Err(LoadError::InitRefused {
                path: path.clone(),
                reason,
            });
        }
        Ok(component::Instance { store, plugin })
    }

    fn instantiate_raw(&self, vcpu: u32) -> Result<(Store<PluginCtx>, wasmtime::Instance), LoadError> {
        let Compiled::Core(pre) = &self.compiled else {
            unreachable!("instantiate_raw is only called for core modules")
        };
        let mut store = self.store(vcpu);
        let instance = pre.instantiate(&mut store).map_err(|e| LoadError::Instantiate {
            path: self.settings.path.clone(),
            what: "instantiation",
            source: instantiation_error(e, self.settings.memory_max_kib),
        })?;
        if self.shape.initialize {
            instance
                .get_typed_func::<(), ()>(&mut store, "_initialize")
                .and_then(|f| f.call(&mut store, ()))
                .map_err(|e| LoadError::Instantiate {
                    path: self.settings.path.clone(),
                    what: "_initialize()",
                    source: trap_error(e),
                })?;
        }
        Ok((store, instance))
    }

    fn run_init(&self, store: &mut Store<PluginCtx>, instance: &wasmtime::Instance) -> Result<(), LoadError> {
        if !self.shape.init {
            return Ok(());
        }
        let path = &self.settings.path;
        set_budget(store, self.runtime.budget(self.settings.init_budget_us()));
        let code = instance
            .get_typed_func::<(), i32>(&mut *store, "init")
            .and_then(|f| f.call(&mut *store, ()))
            .map_err(|e| LoadError::Instantiate {
                path: path.clone(),
                what: "init()",
                source: trap_error(e),
            })?;
        if code != 0 {
            return Err(LoadError::InitRefused {
                path: path.clone(),
                reason: format!("code {code}"),
            });
        }
        Ok(())
    }

    /// A fresh instance for vCPU `vcpu`, `_initialize` and `init` already run.
    pub fn instantiate(self: &Arc<Self>, vcpu: u32) -> Result<PluginInstance, LoadError> {
        let budget = self.runtime.budget(self.settings.timeout_us);
        if let Compiled::Component { .. } = &self.compiled {
            return Ok(PluginInstance {
                inner: Inner::Component(self.instantiate_component(vcpu)?),
                budget,
            });
        }
        let (mut store, instance) = self.instantiate_raw(vcpu)?;
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
            inner: Inner::Core { store, rdmsr, wrmsr },
            budget,
        })
    }

    /// Where this version's compiled code came from: compiled now, or a
    /// cache (a `msrwasm check` of the same content fills the disk cache).
    pub(crate) fn compiled_from(&self) -> Source {
        self.compiled_from
    }

    /// Who this version is.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// The plugin's name in the policy.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    /// Its settings.
    pub fn settings(&self) -> &PluginSettings {
        &self.settings
    }

    /// Hex SHA-256 of the content this plugin was compiled from.
    pub fn sha256(&self) -> &str {
        &self.info.version
    }

    /// Core module or component.
    pub fn flavour(&self) -> Flavour {
        self.info.flavour
    }

    #[cfg(feature = "tools")]
    /// The ABI exports found.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    #[cfg(feature = "tools")]
    /// The `msrwasm.meta` section, if the plugin carries one.
    pub fn meta(&self) -> Option<&meta::Meta> {
        self.meta.as_ref()
    }

    #[cfg(feature = "tools")]
    /// Names of the plugin's exports and imports (`module.name` for core
    /// modules, interface names for components).
    pub fn interface(&self) -> (Vec<String>, Vec<String>) {
        match &self.compiled {
            Compiled::Core(pre) => {
                let module = pre.module();
                let exports = module.exports().map(|e| e.name().to_owned()).collect();
                (exports, module_imports(module))
            }
            Compiled::Component { imports, exports, .. } => (exports.clone(), imports.clone()),
        }
    }

    /// Error history and quarantine of this version.
    pub fn health(&self) -> &health::Health {
        &self.health
    }

    /// The CPU templates this plugin carries (in its metadata).
    pub fn templates(&self) -> &[crate::policy::MsrTemplate] {
        &self.templates
    }

    /// The claim list in force (`None`: a catch-all).
    pub fn claims(&self) -> Option<&[(u32, u32)]> {
        self.claims.as_deref()
    }
}

/// Gives the next call (or init, claim, start function) its budget.
fn set_budget(store: &mut Store<PluginCtx>, budget: runtime::Budget) {
    // Fuel is always enabled on msrwasm's engines (runtime::configure).
    let _ = store.set_fuel(budget.fuel);
    store.set_epoch_deadline(1);
    let ctx = store.data_mut();
    ctx.budget = budget;
    ctx.cpu_mark = None;
    ctx.host_budget_ns = budget.cpu_ns;
}

/// The wasm binary of `bytes`: as is, or compiled from WAT text (`path`
/// names the file in errors).
pub fn to_binary<'a>(path: &Path, bytes: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, LoadError> {
    let not_wasm = |reason: String| LoadError::NotWasm {
        path: path.to_owned(),
        source: reason.into(),
    };
    if bytes.is_empty() {
        return Err(not_wasm("the file is empty".into()));
    }
    if bytes.starts_with(b"\0asm") {
        return Ok(bytes.into());
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| not_wasm("neither a wasm binary (no \\0asm magic) nor WAT text (not UTF-8)".into()))?;
    wat::parse_str(text)
        .map(Into::into)
        .map_err(|e| not_wasm(one_line(&e.to_string())))
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

fn one_line_error(e: wasmtime::Error) -> WasmError {
    wasm_error_text(&e).into()
}

/// A wasmtime error and its causes on one line, without wasm backtraces.
fn wasm_error_text(e: &wasmtime::Error) -> String {
    let root: &(dyn std::error::Error + 'static) = e.as_ref();
    let parts: Vec<String> = std::iter::successors(Some(root), |e| e.source())
        .map(|e| one_line(&e.to_string()))
        .filter(|m| !m.starts_with("error while executing at wasm backtrace") && !m.is_empty())
        .collect();
    match parts.is_empty() {
        true => one_line(&format!("{e}")),
        false => parts.join(": "),
    }
}

/// Whether `e` is one of the traps the budget causes.
fn is_timeout(e: &wasmtime::Error) -> bool {
    matches!(e.downcast_ref::<Trap>(), Some(Trap::OutOfFuel | Trap::Interrupt))
}

/// A readable account of a wasm failure, naming the budget or limit for the
/// traps the host causes itself.
fn trap_error(e: wasmtime::Error) -> WasmError {
    if is_timeout(&e) {
        return "timed out (exceeded its CPU budget: timeout_us, or init_timeout_us for _initialize/init)".into();
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return format!("called proc_exit({}): a plugin may not exit", exit.0).into();
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => "wasm stack overflow".into(),
        _ => one_line_error(e),
    }
}

/// An instantiation failure, with the manifest key to change when a limit
/// caused it.
fn instantiation_error(e: wasmtime::Error, memory_max_kib: u64) -> WasmError {
    let text = wasm_error_text(&e);
    if text.contains("memory minimum size") && text.contains("exceeds memory limits") {
        return format!(
            "{}: the initial memory (a component's memories together) is larger than memory_max_kib = {memory_max_kib} KiB (default {}); raise memory_max_kib in the manifest or shrink the plugin's memory (e.g. a smaller stack)",
            one_line(&text),
            PluginSettings::DEFAULT_MEMORY_MAX_KIB
        )
        .into();
    }
    if text.contains("mmap") || text.contains("Cannot allocate memory") {
        return format!(
            "{}: the host could not reserve address space for another plugin instance; run fewer plugins or vCPUs",
            one_line(&text)
        )
        .into();
    }
    trap_error(e)
}

/// How a plugin answered one access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// HANDLED; for a read, the replied value.
    Handled(u64),
    /// FAULT: the guest gets #GP.
    Fault,
    /// PASS: the next plugin decides.
    Pass,
}

/// Why a call is a plugin error (decided by the plugin's `on_error`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The plugin trapped.
    #[error("trapped: {0}")]
    Trap(String),
    /// The call used up its CPU budget.
    #[error("timed out (exceeded its CPU budget, timeout_us)")]
    Timeout,
    /// A status outside 0, 1, 2.
    #[error("returned status {0}, which is not HANDLED (0), FAULT (1) or PASS (2)")]
    BadStatus(i32),
    /// HANDLED from `rdmsr` without a reply.
    #[error("returned HANDLED from rdmsr without calling msr.reply")]
    NoReply,
    /// A fresh instance could not be made.
    #[error("re-instantiation failed: {0}")]
    Instantiate(String),
}

/// One vCPU's instance of a plugin, with its own `Store`.
pub struct PluginInstance {
    inner: Inner,
    budget: runtime::Budget,
}

enum Inner {
    Core {
        store: Store<PluginCtx>,
        rdmsr: Option<TypedFunc<i32, i32>>,
        wrmsr: Option<TypedFunc<(i32, i64), i32>>,
    },
    Component(component::Instance),
}

impl PluginInstance {
    /// Asks the plugin about `RDMSR index` (`reason`: KVM's exit reason bits).
    pub fn rdmsr(&mut self, index: u32, reason: u32) -> Result<Answer, CallError> {
        match &mut self.inner {
            Inner::Core { store, rdmsr, .. } => {
                // Borrowed, not cloned: cloning a TypedFunc clones its
                // registered type, which costs more than the call itself.
                let Some(func) = rdmsr else {
                    return Ok(Answer::Pass);
                };
                store.data_mut().begin(reason, true);
                set_budget(store, self.budget);
                let status = func.call(&mut *store, index as i32);
                let reply = store.data_mut().end();
                match into_answer(status)? {
                    Answer::Handled(_) => reply.map(Answer::Handled).ok_or(CallError::NoReply),
                    other => Ok(other),
                }
            }
            Inner::Component(c) => {
                c.store.data_mut().begin(reason, false);
                set_budget(&mut c.store, self.budget);
                let answer = c.rdmsr(index);
                c.store.data_mut().end();
                answer.map_err(call_error)
            }
        }
    }

    /// Asks the plugin about `WRMSR index, value`.
    pub fn wrmsr(&mut self, index: u32, value: u64, reason: u32) -> Result<Answer, CallError> {
        match &mut self.inner {
            Inner::Core { store, wrmsr, .. } => {
                let Some(func) = wrmsr else {
                    return Ok(Answer::Pass);
                };
                store.data_mut().begin(reason, false);
                set_budget(store, self.budget);
                let status = func.call(&mut *store, (index as i32, value as i64));
                store.data_mut().end();
                into_answer(status)
            }
            Inner::Component(c) => {
                c.store.data_mut().begin(reason, false);
                set_budget(&mut c.store, self.budget);
                let answer = c.wrmsr(index, value);
                c.store.data_mut().end();
                answer.map_err(call_error)
            }
        }
    }
}

fn call_error(e: wasmtime::Error) -> CallError {
    match is_timeout(&e) {
        true => CallError::Timeout,
        false => CallError::Trap(trap_error(e).to_string()),
    }
}

fn into_answer(status: wasmtime::Result<i32>) -> Result<Answer, CallError> {
    match status {
        Ok(abi::STATUS_HANDLED) => Ok(Answer::Handled(0)),
        Ok(abi::STATUS_FAULT) => Ok(Answer::Fault),
        Ok(abi::STATUS_PASS) => Ok(Answer::Pass),
        Ok(other) => Err(CallError::BadStatus(other)),
        Err(e) => Err(call_error(e)),
    }
}

#[cfg(test)]
mod tests;
