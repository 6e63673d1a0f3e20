//! msrwasm: run KVM guests and answer their deflected MSR accesses with
//! sandboxed WebAssembly plugins.
//!
//! - [`plugin`]: loading, validating and calling plugins (ABI v1).
//! - [`policy`]: the manifest, the chain of plugins, the MSR filter.
//! - [`vm`]: the VM runner on KVM and the vCPU exit handling.
//! - [`trace`]: the JSON-lines record of every MSR access.

pub mod bench;
pub mod check;
pub mod demo;
pub mod plugin;
pub mod policy;
pub mod reload;
pub mod script;
mod sys;
pub mod trace;
pub mod vm;

/// Reads a number as manifests and scripts write them: `0x606` or `1542`.
pub fn manifest_number(word: &str) -> Option<u64> {
    let word = word.trim();
    match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => word.parse().ok(),
    }
}
