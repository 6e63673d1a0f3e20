//! msrwasm: run KVM guests and answer their deflected MSR accesses with
//! sandboxed WebAssembly plugins.
//!
//! - [`plugin`]: loading, validating and calling plugins (ABI v1).
//! - [`policy`]: the manifest, the chain of plugins, the MSR filter.
//! - [`vm`]: the VM runner on KVM and the vCPU exit handling.
//! - [`trace`]: the JSON-lines record of every MSR access.

pub mod bench;
pub mod demo;
pub mod plugin;
pub mod policy;
pub mod reload;
mod sys;
pub mod trace;
pub mod vm;
