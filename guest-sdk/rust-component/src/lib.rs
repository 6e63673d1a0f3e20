//! Write msrwasm plugins as WebAssembly components: the WIT world
//! `msrwasm:plugin/plugin@1.0.0` (`guest-sdk/wit/plugin.wit`), bindings by
//! `wit-bindgen`, plus the helpers every msrwasm SDK has.
//!
//! A plugin implements [`Plugin`] (the `handler` interface) on a type and
//! exports it with [`export_plugin!`]:
//!
//! ```ignore
//! use msrwasm_component_sdk::{MsrRange, Plugin, ReadResult, WriteResult, export_plugin};
//! struct Hello;
//! impl Plugin for Hello {
//!     fn init() -> Result<(), String> { Ok(()) }
//!     fn claims() -> Option<Vec<MsrRange>> { msrwasm_component_sdk::claims(&[(0x4d53_0000, 0x4d53_0000)]) }
//!     fn rdmsr(_index: u32) -> ReadResult { ReadResult::Value(42) }
//!     fn wrmsr(_index: u32, _value: u64) -> WriteResult { WriteResult::Fault }
//! }
//! export_plugin!(Hello);
//! ```
//!
//! Built for anything but wasm32 (`cargo test`), the host imports are
//! replaced by stand-ins: vCPU 0, reason `Unknown`, clock 0, [`config`]
//! returns the default, an in-process state store, logs are dropped.
//!
//! Results: a read answers `ReadResult::Value(v)`, `ReadResult::Fault`
//! (#GP) or `ReadResult::Pass` (decline); a write `WriteResult::Handled`,
//! `WriteResult::Fault` or `WriteResult::Pass`; `init` refuses the load with
//! `Err(text)`.

/// Generated bindings of the world; [`export_plugin!`] refers to them.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "msrwasm_component_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::exports::msrwasm::plugin::handler::{Guest as Plugin, MsrRange, ReadResult, WriteResult};
pub use bindings::msrwasm::plugin::host::{ExitReason, Level};

#[cfg(target_arch = "wasm32")]
use bindings::msrwasm::plugin::host as imp;

/// An inclusive MSR range.
pub const fn range(first: u32, last: u32) -> MsrRange {
    MsrRange { first, last }
}

/// What `claims()` returns for a list of inclusive `(first, last)` ranges.
pub fn claims(ranges: &[(u32, u32)]) -> Option<Vec<MsrRange>> {
    Some(ranges.iter().map(|&(first, last)| range(first, last)).collect())
}

/// Index of the vCPU making the current access (0-based).
pub fn vcpu() -> u32 {
    #[cfg(target_arch = "wasm32")]
    return imp::vcpu();
    #[cfg(not(target_arch = "wasm32"))]
    0
}

/// Why the current access left KVM.
pub fn reason() -> ExitReason {
    #[cfg(target_arch = "wasm32")]
    return imp::reason();
    #[cfg(not(target_arch = "wasm32"))]
    ExitReason::Unknown
}

/// Host monotonic clock, nanoseconds.
pub fn now_ns() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return imp::now_ns();
    #[cfg(not(target_arch = "wasm32"))]
    0
}

/// Integer `name` from the manifest's `[plugin.config]`, or `default`.
pub fn config(name: &str, default: i64) -> i64 {
    #[cfg(target_arch = "wasm32")]
    return imp::config(name).unwrap_or(default);
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = name;
        default
    }
}

/// A line in the host log (rate-limited by the host).
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    imp::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (level, message);
}

pub fn error(message: &str) {
    log(Level::Error, message)
}
pub fn warn(message: &str) {
    log(Level::Warn, message)
}
pub fn info(message: &str) {
    log(Level::Info, message)
}
pub fn debug(message: &str) {
    log(Level::Debug, message)
}

/// The VM-wide integer store: private to the plugin's name, shared by all
/// vCPUs, kept across hot reloads. Missing keys read 0; adds wrap.
pub mod state {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::msrwasm::plugin::host as imp;

    #[cfg(not(target_arch = "wasm32"))]
    mod imp {
        use std::collections::HashMap;
        use std::sync::Mutex;
        static STORE: Mutex<Option<HashMap<i32, i64>>> = Mutex::new(None);
        fn with<R>(f: impl FnOnce(&mut HashMap<i32, i64>) -> R) -> R {
            f(STORE.lock().unwrap().get_or_insert_with(HashMap::new))
        }
        pub fn state_get(key: i32) -> i64 {
            with(|s| s.get(&key).copied().unwrap_or(0))
        }
        pub fn state_set(key: i32, value: i64) {
            with(|s| {
                s.insert(key, value);
            })
        }
        pub fn state_add(key: i32, delta: i64) -> i64 {
            with(|s| {
                let v = s.entry(key).or_insert(0);
                *v = v.wrapping_add(delta);
                *v
            })
        }
    }

    pub fn get(key: i32) -> i64 {
        imp::state_get(key)
    }
    pub fn set(key: i32, value: i64) {
        imp::state_set(key, value)
    }
    /// Atomic add; returns the new value.
    pub fn add(key: i32, delta: i64) -> i64 {
        imp::state_add(key, delta)
    }
    pub fn get_u64(key: i32) -> u64 {
        get(key) as u64
    }
    pub fn set_u64(key: i32, value: u64) {
        set(key, value as i64)
    }
    pub fn add_u64(key: i32, delta: u64) -> u64 {
        add(key, delta as i64) as u64
    }
}

/// Exports a type implementing [`Plugin`] as the component's `handler`.
/// (Only on wasm32: natively, the type's functions stay callable from tests.)
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::export!($plugin with_types_in $crate::bindings);
        #[cfg(not(target_arch = "wasm32"))]
        const _: [fn(u32) -> $crate::ReadResult; 1] = [<$plugin as $crate::Plugin>::rdmsr];
    };
}

/// Embeds plugin metadata (the `msrwasm.meta` custom section, TOML) in the
/// component's core module: `plugin_meta!(b"name = 'x'\nversion = '1.0.0'\n");`
#[macro_export]
macro_rules! plugin_meta {
    ($toml:expr) => {
        #[cfg(target_arch = "wasm32")]
        #[used]
        #[unsafe(link_section = "msrwasm.meta")]
        static MSRWASM_META: [u8; $toml.len()] = *$toml;
    };
}
