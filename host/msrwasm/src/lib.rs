//! msrwasm answers a KVM guest's deflected MSR accesses (RDMSR/WRMSR) with
//! sandboxed WebAssembly plugins: an engine any rust-vmm VMM embeds in its
//! own vCPU loop.
//!
//! Linux bounces to user space the MSR accesses KVM does not handle, and
//! those an MSR filter denies (`KVM_CAP_X86_USER_SPACE_MSR`,
//! `KVM_EXIT_X86_RDMSR/WRMSR`, `KVM_X86_SET_MSR_FILTER`). An [`Engine`]
//! holds the VM's policy (plugins in chain order, their claims, what
//! happens to accesses nobody answers); each vCPU thread owns a
//! [`Dispatcher`] that answers accesses and follows policy changes (hot
//! reloads, [`Engine::update`], the control API) by itself.
//!
//! # In a VMM's vCPU loop
//!
//! ```no_run
//! # #[cfg(feature = "kvm")] fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use kvm_ioctls::{Kvm, VcpuExit};
//! use msrwasm::{Engine, PolicySpec, kvm};
//!
//! let kvm_fd = Kvm::new()?;
//! let vm = kvm_fd.create_vm()?;                            // the VMM keeps its VmFd by value
//! kvm::enable_user_space_msrs(&vm)?;                       // INVAL | UNKNOWN | FILTER exits
//! let spec = PolicySpec::from_manifest("vm.toml".as_ref())?;
//! let engine = Engine::builder()
//!     .filter(kvm::KvmFilter::new(&kvm_fd, &vm, vec![])?) // merged with the VMM's own ranges
//!     .build(spec)?;
//! let _watcher = msrwasm::watch::Watcher::spawn(&engine)?; // hot reload (feature `watch`)
//! let mut vcpu = vm.create_vcpu(0)?;
//! let mut msrs = engine.dispatcher(0);                     // Send + Sync: keep it in your vCPU struct
//! loop {
//!     let access = match vcpu.run()? {
//!         exit @ (VcpuExit::X86Rdmsr(_) | VcpuExit::X86Wrmsr(_)) => kvm::msr_access(&exit),
//!         VcpuExit::Hlt => break,
//!         _ => None, // the VMM's own exits
//!     };
//!     if let Some(access) = access {
//!         // Plugins, then KVM's own MSR, then `unhandled`; completes the exit.
//!         msrs.handle_exit(&mut vcpu, access)?;
//!     }
//! }
//! # Ok(()) }
//! # #[cfg(not(feature = "kvm"))] fn main() {}
//! ```
//!
//! `examples/vmm_loop.rs` is a complete VMM; `docs/embedding.md` the guide.
//!
//! # The API
//!
//! Everything an embedder needs is re-exported here; the modules behind it
//! are private. This is the stable API (`docs/embedding.md` lists it):
//!
//! - the engine: [`Engine`], [`EngineBuilder`], [`Dispatcher`], [`Policy`],
//!   [`Status`], [`PluginStatus`], [`StatsSnapshot`], [`VcpuStats`],
//!   [`PluginStats`], [`StateSnapshot`], [`Clock`], [`GuestClock`];
//! - the MSR vocabulary: [`Access`], [`Op`], [`ExitReason`], [`Reply`],
//!   [`Outcome`], [`AnsweredBy`], [`PluginInfo`], [`Flavour`],
//!   [`KvmMsrs`], [`NoKvm`];
//! - the policy as written: [`PolicySpec`], [`PluginSettings`],
//!   [`OnError`], [`Unhandled`], [`FilterDefault`];
//! - events: [`Events`], [`VcpuEvents`], [`Reload`], [`Cause`],
//!   [`CallResult`]; two ready-made sinks, [`Trace`] and [`Footprint`];
//! - errors: [`EngineError`], [`UpdateError`], [`PolicyError`],
//!   [`ManifestError`], [`LoadError`], [`CallError`], [`RuntimeError`],
//!   [`StoreFull`], [`RestoreError`], [`TraceError`];
//! - hardened processes: [`ExecMode`] (JIT or no JIT),
//!   [`EngineBuilder::signals_based_traps`], [`Engine::prepare_thread`];
//! - [`filter`]: the VMM's side of the MSR filter ([`filter::FilterSink`]);
//! - [`kvm`] (feature `kvm`, default): enabling exits, decoding and
//!   completing them, KVM's own MSRs, a ready-made filter sink;
//! - [`watch`] (feature `watch`, default): a file watcher driving hot
//!   reload, as a pollable fd plus `process()`;
//! - [`api`] (feature `api`): the control API of a running VM (HTTP on a
//!   Unix socket) with Prometheus metrics;
//! - [`oci`]: `oci://` plugins and following tags; the registry client
//!   (push, pull, cache) with feature `oci`.
//!
//! Feature `cranelift` (default) is the compiler: without it the engine
//! runs only plugins compiled beforehand into its disk cache (`msrwasm
//! check --mode no-jit --cache-dir DIR`) and links no code generator
//! (`docs/embedding.md`, section 9: hardened VMMs).
//!
//! Feature `tools` adds a `tools` module: the building blocks of the
//! `msrwasm` command (`check`, `test`, `meta`, `bench`) and of the test
//! suite. It is not part of the stable API.
//!
//! Logs go through `tracing`; a VMM that uses the `log` crate instead gets
//! them as `log` records when no `tracing` subscriber is installed.

#![warn(missing_docs)]

#[cfg(feature = "api")]
pub mod api;
#[cfg(feature = "tools")]
mod check;
mod dispatch;
mod energy;
mod engine;
mod events;
mod files;
mod footprint;
#[cfg(feature = "kvm")]
pub mod kvm;
mod msr;
pub mod oci;
mod plugin;
mod policy;
#[cfg(feature = "tools")]
mod script;
mod stats;
mod sys;
mod trace;
mod util;
#[cfg(feature = "watch")]
pub mod watch;

pub use dispatch::Dispatcher;
pub use energy::{EnergyError, EnergyOptions};
pub use engine::{Engine, EngineBuilder, EngineError, PluginStatus, Status, UpdateError};
pub use events::{CallResult, Cause, Events, Reload, VcpuEvents};
pub use footprint::{Footprint, FootprintEntry};
pub use msr::{Access, AnsweredBy, ExitReason, Flavour, KvmMsrs, NoKvm, Op, Outcome, PluginInfo, Reply, Unhandled};
pub use plugin::clock::{Clock, GuestClock};
pub use plugin::state::{RestoreError, StateSnapshot, StoreFull};
pub use plugin::{CallError, ExecMode, LoadError, OnError, PluginSettings, RuntimeError};
pub use policy::{FilterDefault, MAX_TEMPLATES, ManifestError, MsrTemplate, Policy, PolicyError, PolicySpec};
pub use stats::{PluginStats, StatsSnapshot, VcpuStats};
pub use trace::{Trace, TraceError, TraceReport};

/// The VMM's side of the KVM MSR filter: msrwasm hands a
/// [`FilterPlan`](crate::filter::FilterPlan) (what plugins claim, the
/// firewall) to a [`FilterSink`](crate::filter::FilterSink) whenever it
/// changes; the sink merges it with the VMM's own
/// [`VmmRange`](crate::filter::VmmRange)s
/// ([`FilterPlan::ranges`](crate::filter::FilterPlan::ranges)) and programs
/// KVM (`kvm::KvmFilter` does).
pub mod filter {
    pub use crate::policy::filter::{
        FilterError, FilterPlan, FilterRanges, FilterSink, FilterWindow, RecordingFilter, VmmRange,
    };
}

/// The building blocks of the `msrwasm` command and of msrwasm's tests
/// (feature `tools`): loading and calling one plugin outside an engine,
/// `msrwasm check` and `msrwasm test`, plugin metadata, the manifest
/// suggestion from a footprint, the control API's client, file helpers.
/// Not part of the stable API: it changes with the command.
#[cfg(feature = "tools")]
pub mod tools {
    #[cfg(feature = "api")]
    pub use crate::api::request;
    pub use crate::check::{CheckReport, check, check_cached, check_with};
    pub use crate::engine::localize;
    pub use crate::files::{ReadError, check_output, open_regular, read_regular, write_atomic, write_atomic_mode};
    pub use crate::footprint::suggest;
    pub use crate::oci::local::{annotations, is_reference};
    pub use crate::plugin::cache::default_dir as default_cache_dir;
    pub use crate::plugin::clock::{HostClock, ManualClock};
    pub use crate::plugin::state::{StateScope, StateStore};
    pub use crate::plugin::{
        Answer, MAX_PLUGIN_BYTES, ModuleCache, Plugin, PluginInstance, Runtime, RuntimeOptions, content_hash, meta,
        read_plugin_file, sanitize, to_binary,
    };
    pub use crate::script::{ScriptError, ScriptReport, run as run_script, run_cached as run_script_cached};
    pub use crate::trace::TraceRecord;
    pub use crate::util::{error_chain, format_range, join_within, parse_number};

    /// The loaded plugins of `policy`, in chain order.
    pub fn loaded(policy: &crate::Policy) -> &[std::sync::Arc<Plugin>] {
        policy.chain()
    }
}
