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
//! use std::sync::Arc;
//! use kvm_ioctls::{Kvm, VcpuExit};
//! use msrwasm::{Engine, PolicySpec, kvm};
//!
//! let vm = Arc::new(Kvm::new()?.create_vm()?);
//! kvm::enable_user_space_msrs(&vm)?;                       // INVAL | UNKNOWN | FILTER exits
//! let spec = PolicySpec::from_manifest("vm.toml".as_ref())?;
//! let engine = Engine::builder()
//!     .filter(kvm::KvmFilter::new(vm.clone(), vec![]))    // merged with the VMM's own ranges
//!     .build(spec)?;
//! let _watcher = msrwasm::watch::Watcher::spawn(&engine)?; // hot reload (feature `watch`)
//! let mut vcpu = vm.create_vcpu(0)?;
//! let mut msrs = engine.dispatcher(0);
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
//! # Modules
//!
//! - [`plugin`]: loading, validating and calling plugins (ABI v1), the
//!   runtime (CPU budget, clock), the state store.
//! - [`policy`]: manifests, the chain, claims, the filter plan and the
//!   KVM fallback rules.
//! - [`dispatch`]: the per-vCPU dispatcher and its typed outcomes.
//! - [`engine`]: the one owner of every policy change.
//! - [`events`], [`stats`], [`trace`]: what happens, counted and recorded.
//! - [`kvm`] (feature `kvm`): enabling exits, decoding, completing them,
//!   KVM's own MSRs, the filter sink.
//! - [`watch`] (feature `watch`): a file watcher driving hot reload.
//! - [`api`] (feature `api`): the control API of a running VM (HTTP on a
//!   Unix socket) with Prometheus metrics.
//! - [`footprint`]: which MSRs a guest touches, and a manifest from that.
//! - [`oci`]: `oci://` plugins, following tags; the registry client
//!   (push, pull, cache) with feature `oci`.

#![warn(missing_docs)]

#[cfg(feature = "api")]
pub mod api;
pub mod check;
pub mod dispatch;
pub mod engine;
pub mod events;
pub mod files;
pub mod footprint;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod oci;
pub mod plugin;
pub mod policy;
pub mod script;
pub mod stats;
mod sys;
pub mod trace;
#[cfg(feature = "watch")]
pub mod watch;

pub use dispatch::{Access, AnsweredBy, Dispatcher, ExitReason, KvmMsrs, NoKvm, Op, Outcome, Reply};
pub use engine::{Engine, EngineBuilder, EngineError};
pub use events::{Events, Reload, VcpuEvents};
pub use policy::{PolicyError, PolicySpec, Unhandled};

/// Waits at most `grace` for `thread` to end and joins it if it did; else
/// leaves it to end by itself and returns `None` (the helper threads' stop
/// rule: a stalled peer never holds up a shutdown).
pub fn join_within<T>(
    thread: std::thread::JoinHandle<T>,
    grace: std::time::Duration,
) -> Option<std::thread::Result<T>> {
    let deadline = std::time::Instant::now() + grace;
    while !thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    thread.is_finished().then(|| thread.join())
}

/// Reads a number as manifests and scripts write them: `0x606` or `1542`.
pub fn parse_number(word: &str) -> Option<u64> {
    let word = word.trim();
    match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => word.parse().ok(),
    }
}

/// `0x35`, or `0x610-0x61f` for a range.
pub fn format_range((first, last): (u32, u32)) -> String {
    if first == last {
        format!("{first:#x}")
    } else {
        format!("{first:#x}-{last:#x}")
    }
}

/// An error and its sources on one line, `outer: inner: innermost`.
pub fn error_chain<E: std::error::Error + ?Sized>(e: &E) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out += ": ";
            out += &text;
        }
        source = s.source();
    }
    out
}
