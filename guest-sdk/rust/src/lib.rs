//! Write [msrwasm](https://github.com/) MSR plugins in Rust.
//!
//! A plugin is a `no_std` `cdylib` built for `wasm32-unknown-unknown`.
//! Implement [`Plugin`] and export it with [`export_plugin!`]; the macro
//! writes the ABI v1 exports (`msrwasm_abi_version`, `init`, `claim`,
//! `rdmsr`, `wrmsr`) and this crate wraps every `msr.*` import.
//!
//! ```ignore
//! #![cfg_attr(target_arch = "wasm32", no_std)] // std natively, for unit tests
//! use msrwasm_sdk::{Decline, Plugin, config, export_plugin};
//!
//! #[derive(Default)]
//! struct CoreCount { value: u64 }
//!
//! impl Plugin for CoreCount {
//!     const CLAIMS: &'static [(u32, u32)] = &[(0x35, 0x35)];
//!
//!     fn init(&mut self) -> Result<(), i32> {
//!         let cores = config("cores", 1);
//!         self.value = ((cores as u64) << 16) | cores as u64;
//!         Ok(())
//!     }
//!
//!     fn rdmsr(&mut self, index: u32) -> Result<u64, Decline> {
//!         match index {
//!             0x35 => Ok(self.value),
//!             _ => Err(Decline::Pass),
//!         }
//!     }
//!
//!     fn wrmsr(&mut self, _index: u32, _value: u64) -> Result<(), Decline> {
//!         Err(Decline::Fault) // read-only, as on hardware
//!     }
//! }
//!
//! export_plugin!(CoreCount);
//! ```
//!
//! Each vCPU runs its own instance, so `&mut self` is per vCPU and starts
//! fresh after a hot reload; use [`state`] for values shared by all vCPUs
//! or kept across reloads.

#![no_std]

/// The ABI version this crate implements.
pub const ABI_VERSION: i32 = 1;

/// Status codes of `rdmsr`/`wrmsr` (ABI v1).
pub mod status {
    pub const HANDLED: i32 = 0;
    pub const FAULT: i32 = 1;
    pub const PASS: i32 = 2;
}

/// Why a plugin does not complete an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decline {
    /// The guest gets #GP(0), as hardware does for a bad MSR access.
    Fault,
    /// Not this plugin's business: the next plugin in the chain is asked,
    /// then KVM (for filtered MSRs it knows) or the VM's `unhandled` policy.
    Pass,
}

/// Why KVM deflected the access (`msr.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An invalid access to an MSR KVM knows (e.g. reserved bits).
    Inval,
    /// An MSR KVM does not know.
    Unknown,
    /// An MSR a plugin claimed through the MSR filter.
    Filter,
    /// A value this SDK does not know.
    Other(i32),
}

/// A plugin: one value per vCPU, created with `Default` and then `init`.
pub trait Plugin: Default {
    /// The default claim list (inclusive ranges). A manifest `msrs` entry
    /// overrides it. Empty means: asked for every deflected access, but no
    /// MSR is put into the KVM filter.
    const CLAIMS: &'static [(u32, u32)] = &[];

    /// Runs once per instance before any access; `Err(code)` refuses the
    /// load and the host reports `code`.
    fn init(&mut self) -> Result<(), i32> {
        Ok(())
    }

    /// RDMSR `index`: the value, or a [`Decline`].
    fn rdmsr(&mut self, index: u32) -> Result<u64, Decline> {
        let _ = index;
        Err(Decline::Pass)
    }

    /// WRMSR `index` with `value` (EDX:EAX).
    fn wrmsr(&mut self, index: u32, value: u64) -> Result<(), Decline> {
        let _ = (index, value);
        Err(Decline::Pass)
    }
}

#[cfg(target_arch = "wasm32")]
mod sys {
    #[link(wasm_import_module = "msr")]
    unsafe extern "C" {
        pub fn reply(value: i64);
        pub fn vcpu() -> i32;
        pub fn reason() -> i32;
        pub fn now_ns() -> i64;
        pub fn state_get(key: i32) -> i64;
        pub fn state_set(key: i32, value: i64);
        pub fn state_add(key: i32, delta: i64) -> i64;
        pub fn config(name_ptr: i32, name_len: i32, default: i64) -> i64;
        pub fn log(level: i32, ptr: i32, len: i32);
    }
}

/// Host stand-ins so that plugin logic can be unit-tested natively with
/// `cargo test`: `vcpu` is 0, `reason` UNKNOWN, `now_ns` 0, `config` the
/// default, `state` a no-op store reading 0, `log` discarded.
#[cfg(not(target_arch = "wasm32"))]
mod sys {
    pub unsafe fn reply(_: i64) {}
    pub unsafe fn vcpu() -> i32 {
        0
    }
    pub unsafe fn reason() -> i32 {
        2
    }
    pub unsafe fn now_ns() -> i64 {
        0
    }
    pub unsafe fn state_get(_: i32) -> i64 {
        0
    }
    pub unsafe fn state_set(_: i32, _: i64) {}
    pub unsafe fn state_add(_: i32, delta: i64) -> i64 {
        delta
    }
    pub unsafe fn config(_: i32, _: i32, default: i64) -> i64 {
        default
    }
    pub unsafe fn log(_: i32, _: i32, _: i32) {}
}

/// Index (0-based) of the vCPU making the access.
pub fn vcpu() -> u32 {
    // SAFETY: a host import without arguments; always defined by the host.
    unsafe { sys::vcpu() as u32 }
}

/// Why KVM deflected the current access.
pub fn reason() -> Reason {
    // SAFETY: a host import without arguments.
    match unsafe { sys::reason() } {
        1 => Reason::Inval,
        2 => Reason::Unknown,
        4 => Reason::Filter,
        other => Reason::Other(other),
    }
}

/// Host monotonic clock, nanoseconds.
pub fn now_ns() -> u64 {
    // SAFETY: a host import without arguments.
    unsafe { sys::now_ns() as u64 }
}

/// Integer parameter `name` from the manifest's `[plugin.config]`, or `default`.
pub fn config(name: &str, default: i64) -> i64 {
    // SAFETY: pointer and length describe `name`, which lives in this
    // module's linear memory for the duration of the call.
    unsafe { sys::config(name.as_ptr() as i32, name.len() as i32, default) }
}

/// Log levels of [`log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

/// Logs `message` through the host (rate-limited there).
pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length describe `message` in linear memory.
    unsafe { sys::log(level as i32, message.as_ptr() as i32, message.len() as i32) }
}

/// The VM-wide integer store of this plugin: shared by all vCPUs, kept
/// across hot reloads, keyed by the plugin's name in the manifest.
pub mod state {
    /// The value of `key` (0 if never set).
    pub fn get(key: i32) -> i64 {
        // SAFETY: a host import taking plain integers.
        unsafe { super::sys::state_get(key) }
    }

    pub fn set(key: i32, value: i64) {
        // SAFETY: a host import taking plain integers.
        unsafe { super::sys::state_set(key, value) }
    }

    /// Atomically adds `delta`; returns the new value.
    pub fn add(key: i32, delta: i64) -> i64 {
        // SAFETY: a host import taking plain integers.
        unsafe { super::sys::state_add(key, delta) }
    }
}

/// Holds the plugin value of this instance.
#[doc(hidden)]
pub struct Slot<T>(core::cell::UnsafeCell<Option<T>>);

// SAFETY: a wasm instance is single-threaded (the host enables no wasm
// threads), so the slot is never accessed concurrently.
unsafe impl<T> Sync for Slot<T> {}

impl<T: Plugin> Slot<T> {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self(core::cell::UnsafeCell::new(None))
    }

    /// Runs `f` on the plugin value, creating it on first use.
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: single-threaded (see the Sync impl), the exports never
        // re-enter one another, and the reference does not outlive `f`, so
        // it is the only live reference.
        let slot = unsafe { &mut *self.0.get() };
        f(slot.get_or_insert_with(T::default))
    }

    pub fn init(&self) -> i32 {
        match self.with(T::init) {
            Ok(()) => 0,
            Err(code) => code,
        }
    }

    pub fn rdmsr(&self, index: i32) -> i32 {
        match self.with(|p| p.rdmsr(index as u32)) {
            Ok(value) => {
                // SAFETY: a host import taking a plain integer.
                unsafe { sys::reply(value as i64) };
                status::HANDLED
            }
            Err(decline) => decline_status(decline),
        }
    }

    pub fn wrmsr(&self, index: i32, value: i64) -> i32 {
        match self.with(|p| p.wrmsr(index as u32, value as u64)) {
            Ok(()) => status::HANDLED,
            Err(decline) => decline_status(decline),
        }
    }
}

fn decline_status(decline: Decline) -> i32 {
    match decline {
        Decline::Fault => status::FAULT,
        Decline::Pass => status::PASS,
    }
}

/// The `claim` export: entry `n` of `claims`, packed, or -1 past the end.
#[doc(hidden)]
pub fn claim_entry(claims: &[(u32, u32)], n: i32) -> i64 {
    match usize::try_from(n).ok().and_then(|n| claims.get(n)) {
        Some(&(first, last)) => ((u64::from(first) << 32) | u64::from(last)) as i64,
        None => -1,
    }
}

/// Embeds plugin metadata (the `msrwasm.meta` custom section, TOML) that
/// `msrwasm check` prints, from a byte string literal:
///
/// ```ignore
/// msrwasm_sdk::plugin_meta!(b"name = 'rapl'\nversion = '1.0.0'\nauthor = 'platform team'\n");
/// ```
#[macro_export]
macro_rules! plugin_meta {
    ($toml:literal) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(link_section = "msrwasm.meta")]
        #[used]
        static __MSRWASM_META: [u8; $toml.len()] = *$toml;
    };
}

/// Exports a [`Plugin`] type as an msrwasm ABI v1 plugin.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        static __MSRWASM_PLUGIN: $crate::Slot<$plugin> = $crate::Slot::new();

        #[unsafe(no_mangle)]
        pub extern "C" fn msrwasm_abi_version() -> i32 {
            $crate::ABI_VERSION
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn init() -> i32 {
            __MSRWASM_PLUGIN.init()
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn claim(n: i32) -> i64 {
            $crate::claim_entry(<$plugin as $crate::Plugin>::CLAIMS, n)
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn rdmsr(index: i32) -> i32 {
            __MSRWASM_PLUGIN.rdmsr(index)
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn wrmsr(index: i32, value: i64) -> i32 {
            __MSRWASM_PLUGIN.wrmsr(index, value)
        }

        #[cfg(all(target_arch = "wasm32", not(test)))]
        #[panic_handler]
        fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
            // A trap: the host counts a plugin error and applies on_error.
            core::arch::wasm32::unreachable()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_pack_first_and_last() {
        let claims = [(0x606, 0x611), (0xc000_0080, 0xc000_0080)];
        assert_eq!(claim_entry(&claims, 0), 0x0000_0606_0000_0611);
        assert_eq!(claim_entry(&claims, 1) as u64, 0xc000_0080_c000_0080);
        assert_eq!(claim_entry(&claims, 2), -1);
        assert_eq!(claim_entry(&claims, -1), -1);
    }

    #[derive(Default)]
    struct Echo(u32);
    impl Plugin for Echo {
        fn init(&mut self) -> Result<(), i32> {
            self.0 = config("base", 7) as u32;
            Ok(())
        }
        fn rdmsr(&mut self, index: u32) -> Result<u64, Decline> {
            if index == 0 {
                Err(Decline::Fault)
            } else {
                Ok(u64::from(index + self.0))
            }
        }
    }

    #[test]
    fn slots_map_results_to_status_codes() {
        let slot: Slot<Echo> = Slot::new();
        assert_eq!(slot.init(), 0);
        assert_eq!(slot.rdmsr(1), status::HANDLED);
        assert_eq!(slot.rdmsr(0), status::FAULT);
        assert_eq!(slot.wrmsr(1, 5), status::PASS);
        assert_eq!(slot.with(|p| p.0), 7);
    }
}
