#![doc = include_str!("../README.md")]
// no_std in the plugin; std natively, where the host stand-ins for unit
// tests (`testing`) keep their state.
#![cfg_attr(target_arch = "wasm32", no_std)]
// The README is the crate documentation and shows whole files (a build.rs
// with its `main`, a plugin with its unit tests).
#![allow(clippy::needless_doctest_main, clippy::test_attr_in_doctest)]

/// The plugin ABI version this crate implements (`msrwasm_abi_version`).
pub const ABI_VERSION: i32 = 1;

/// Status codes of the `rdmsr`/`wrmsr` exports (ABI v1). [`export_plugin!`]
/// produces them from your `Result`s; they are here for reference.
pub mod status {
    /// The access completes: a read returns the replied value, a write is accepted.
    pub const HANDLED: i32 = 0;
    /// The guest gets #GP(0).
    pub const FAULT: i32 = 1;
    /// Not this plugin's: the next plugin is asked, then KVM or the
    /// VM's `unhandled` policy.
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

/// Why KVM deflected the access ([`reason`]).
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

impl Reason {
    fn from_raw(raw: i32) -> Self {
        match raw {
            1 => Reason::Inval,
            2 => Reason::Unknown,
            4 => Reason::Filter,
            other => Reason::Other(other),
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn raw(self) -> i32 {
        match self {
            Reason::Inval => 1,
            Reason::Unknown => 2,
            Reason::Filter => 4,
            Reason::Other(other) => other,
        }
    }
}

/// Log levels of [`log()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Level 0.
    Error = 0,
    /// Level 1.
    Warn = 1,
    /// Level 2.
    Info = 2,
    /// Level 3.
    Debug = 3,
}

impl Level {
    #[cfg(not(target_arch = "wasm32"))]
    fn from_raw(raw: i32) -> Self {
        match raw {
            0 => Level::Error,
            1 => Level::Warn,
            2 => Level::Info,
            _ => Level::Debug,
        }
    }
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

/// The longest string the host accepts from `config` and `log`.
const MAX_STR: usize = 4096;

/// `s` cut to at most [`MAX_STR`] bytes, on a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_STR {
        return s;
    }
    let mut end = MAX_STR;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The host: the `msr.*` imports in the plugin.
#[cfg(target_arch = "wasm32")]
mod imp {
    #[link(wasm_import_module = "msr")]
    unsafe extern "C" {
        fn reply(value: i64);
        fn vcpu() -> i32;
        fn reason() -> i32;
        fn now_ns() -> i64;
        fn state_get(key: i32) -> i64;
        fn state_set(key: i32, value: i64);
        fn state_add(key: i32, delta: i64) -> i64;
        fn config(name_ptr: i32, name_len: i32, default: i64) -> i64;
        fn log(level: i32, ptr: i32, len: i32);
    }

    pub fn set_reply(value: i64) {
        // SAFETY: a host import taking a plain integer.
        unsafe { reply(value) }
    }
    pub fn get_vcpu() -> i32 {
        // SAFETY: a host import without arguments.
        unsafe { vcpu() }
    }
    pub fn get_reason() -> i32 {
        // SAFETY: a host import without arguments.
        unsafe { reason() }
    }
    pub fn get_now_ns() -> i64 {
        // SAFETY: a host import without arguments.
        unsafe { now_ns() }
    }
    pub fn get_state(key: i32) -> i64 {
        // SAFETY: a host import taking plain integers.
        unsafe { state_get(key) }
    }
    pub fn put_state(key: i32, value: i64) {
        // SAFETY: a host import taking plain integers.
        unsafe { state_set(key, value) }
    }
    pub fn add_state(key: i32, delta: i64) -> i64 {
        // SAFETY: a host import taking plain integers.
        unsafe { state_add(key, delta) }
    }
    pub fn get_config(name: &str, default: i64) -> i64 {
        // SAFETY: pointer and length describe `name`, which lives in this
        // module's linear memory for the duration of the call (at most
        // 4096 bytes: the caller clips it).
        unsafe { config(name.as_ptr() as i32, name.len() as i32, default) }
    }
    pub fn put_log(level: i32, message: &str) {
        // SAFETY: as in `get_config`.
        unsafe { log(level, message.as_ptr() as i32, message.len() as i32) }
    }

    #[link(wasm_import_module = "msr_energy_v1")]
    unsafe extern "C" {
        fn domains() -> i32;
        fn energy_uj(domain: i32, who: i32) -> i64;
        fn cpu_ns(who: i32) -> i64;
        fn sampled_ns() -> i64;
    }

    pub fn get_domains() -> i32 {
        // SAFETY: a host import without arguments.
        unsafe { domains() }
    }
    pub fn get_energy_uj(domain: i32, who: i32) -> i64 {
        // SAFETY: a host import taking plain integers.
        unsafe { energy_uj(domain, who) }
    }
    pub fn get_cpu_ns(who: i32) -> i64 {
        // SAFETY: a host import taking a plain integer.
        unsafe { cpu_ns(who) }
    }
    pub fn get_sampled_ns() -> i64 {
        // SAFETY: a host import without arguments.
        unsafe { sampled_ns() }
    }
}

/// Host stand-ins for unit tests run natively (`cargo test`), one per
/// thread; see [`testing`].
#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::string::String;
    use std::vec::Vec;

    pub struct Host {
        pub vcpu: i32,
        pub reason: i32,
        pub now_ns: i64,
        pub config: HashMap<String, i64>,
        pub state: HashMap<i32, i64>,
        pub logs: Vec<(i32, String)>,
        /// (domain, who) -> µJ; (-1, who) -> CPU ns.
        pub energy: HashMap<(i32, i32), i64>,
        pub sampled_ns: i64,
    }

    impl Host {
        pub fn new() -> Self {
            Host {
                vcpu: 0,
                reason: 2, // UNKNOWN
                now_ns: 0,
                config: HashMap::new(),
                state: HashMap::new(),
                logs: Vec::new(),
                energy: HashMap::new(),
                sampled_ns: 0,
            }
        }
    }

    std::thread_local! {
        pub static HOST: RefCell<Host> = RefCell::new(Host::new());
    }

    pub fn with<R>(f: impl FnOnce(&mut Host) -> R) -> R {
        HOST.with(|host| f(&mut host.borrow_mut()))
    }

    pub fn set_reply(_: i64) {}
    pub fn get_vcpu() -> i32 {
        with(|h| h.vcpu)
    }
    pub fn get_reason() -> i32 {
        with(|h| h.reason)
    }
    pub fn get_now_ns() -> i64 {
        with(|h| h.now_ns)
    }
    pub fn get_state(key: i32) -> i64 {
        with(|h| h.state.get(&key).copied().unwrap_or(0))
    }
    pub fn put_state(key: i32, value: i64) {
        with(|h| h.state.insert(key, value));
    }
    pub fn add_state(key: i32, delta: i64) -> i64 {
        with(|h| {
            let value = h.state.entry(key).or_insert(0);
            *value = value.wrapping_add(delta);
            *value
        })
    }
    pub fn get_config(name: &str, default: i64) -> i64 {
        with(|h| h.config.get(name).copied().unwrap_or(default))
    }
    pub fn put_log(level: i32, message: &str) {
        std::eprintln!("[plugin log, level {level}] {message}");
        with(|h| h.logs.push((level, message.into())));
    }
    pub fn get_domains() -> i32 {
        with(|h| {
            (0..4)
                .filter(|d| h.energy.contains_key(&(*d, -1)))
                .fold(0, |m, d| m | 1 << d)
        })
    }
    pub fn get_energy_uj(domain: i32, who: i32) -> i64 {
        with(|h| h.energy.get(&(domain, who)).copied().unwrap_or(-1))
    }
    pub fn get_cpu_ns(who: i32) -> i64 {
        with(|h| h.energy.get(&(-1, who)).copied().unwrap_or(-1))
    }
    pub fn get_sampled_ns() -> i64 {
        with(|h| h.sampled_ns)
    }
}

/// Index (0-based) of the vCPU making the access.
pub fn vcpu() -> u32 {
    imp::get_vcpu() as u32
}

/// Why KVM deflected the current access.
pub fn reason() -> Reason {
    Reason::from_raw(imp::get_reason())
}

/// Host monotonic clock, nanoseconds (since the host process started).
pub fn now_ns() -> u64 {
    imp::get_now_ns() as u64
}

/// Integer parameter `name` from the manifest's `[plugin.config]`, or
/// `default`.
pub fn config(name: &str, default: i64) -> i64 {
    imp::get_config(clip(name), default)
}

/// Logs `message` through the host (at most 20 messages per second per
/// instance reach the host's log; longer than 4096 bytes is cut). The
/// shorthands are in the [`log`](mod@log) module: `log::warn("...")`.
pub fn log(level: Level, message: &str) {
    imp::put_log(level as i32, clip(message));
}

/// Shorthands for [`log()`](fn@log) at each level: `log::warn("...")`.
pub mod log {
    use super::Level;

    /// Logs `message` at level error.
    pub fn error(message: &str) {
        super::log(Level::Error, message)
    }
    /// Logs `message` at level warn.
    pub fn warn(message: &str) {
        super::log(Level::Warn, message)
    }
    /// Logs `message` at level info.
    pub fn info(message: &str) {
        super::log(Level::Info, message)
    }
    /// Logs `message` at level debug.
    pub fn debug(message: &str) {
        super::log(Level::Debug, message)
    }
}

/// The VM-wide integer store of this plugin: shared by all vCPUs, kept
/// across hot reloads, keyed by the plugin's name in the manifest. Keys
/// are yours to choose; a key never set reads 0.
pub mod state {
    /// The value of `key` (0 if never set).
    pub fn get(key: i32) -> i64 {
        super::imp::get_state(key)
    }

    /// Sets `key` to `value`.
    pub fn set(key: i32, value: i64) {
        super::imp::put_state(key, value)
    }

    /// Atomically adds `delta` (wrapping); returns the new value.
    pub fn add(key: i32, delta: i64) -> i64 {
        super::imp::add_state(key, delta)
    }
}

/// Host energy (import module `msr_energy_v1`), for plugins the manifest
/// grants it (`grants = ["energy"]`; without the grant the plugin is
/// refused at load). Every value comes from one sample the host takes on
/// its own schedule (every 100 ms by default), and one call reads one
/// sample. Energy is in microjoules since the host started sampling, never
/// decreasing; a VM's or vCPU's share is attributed by its share of the
/// host's busy CPU time in each sampling period.
pub mod energy {
    /// A RAPL domain, summed over the host's sockets.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Domain {
        /// The whole socket.
        Package = 0,
        /// The cores (Intel PP0; AMD core energy).
        Core = 1,
        /// Uncore/graphics (Intel PP1).
        Uncore = 2,
        /// Memory.
        Dram = 3,
    }

    /// Whose energy or CPU time.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Who {
        /// The whole host.
        Host,
        /// This VM: its vCPUs together.
        Vm,
        /// One vCPU, by index.
        Vcpu(u32),
    }

    impl Who {
        pub(crate) fn raw(self) -> i32 {
            match self {
                Who::Host => -1,
                Who::Vm => -2,
                Who::Vcpu(n) => n.min(i32::MAX as u32) as i32,
            }
        }
    }

    /// Whether the host has `domain`.
    pub fn has(domain: Domain) -> bool {
        super::imp::get_domains() & (1 << domain as i32) != 0
    }

    /// Energy of `domain` for `who`, µJ; `None` for a domain the host lacks
    /// or a vCPU whose thread the host has not seen yet.
    pub fn energy_uj(domain: Domain, who: Who) -> Option<u64> {
        let v = super::imp::get_energy_uj(domain as i32, who.raw());
        (v >= 0).then_some(v as u64)
    }

    /// CPU time of `who`, ns (the host: its busy time over all CPUs).
    pub fn cpu_ns(who: Who) -> Option<u64> {
        let v = super::imp::get_cpu_ns(who.raw());
        (v >= 0).then_some(v as u64)
    }

    /// When the sample was taken, on the clock of [`now_ns`](crate::now_ns).
    pub fn sampled_ns() -> u64 {
        super::imp::get_sampled_ns() as u64
    }
}

/// The host, as seen by plugin code built natively for unit tests
/// (`cargo test`; not in the wasm build): set what the `msr.*` imports
/// return and read what the plugin logged.
///
/// Each thread has its own host, and `cargo test` runs every test on its
/// own thread, so every test starts from: vCPU 0, reason UNKNOWN, clock 0,
/// no config (every [`config`] returns its default), an empty
/// [`state`], no logs.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    use super::{Level, Reason, imp};
    use std::string::String;
    use std::vec::Vec;

    /// What [`energy::energy_uj`](crate::energy::energy_uj) returns for
    /// `domain` and `who` (setting the host's also makes the domain present).
    pub fn set_energy_uj(domain: crate::energy::Domain, who: crate::energy::Who, uj: u64) {
        imp::with(|h| h.energy.insert((domain as i32, who.raw()), uj as i64));
    }

    /// What [`energy::cpu_ns`](crate::energy::cpu_ns) returns for `who`.
    pub fn set_cpu_ns(who: crate::energy::Who, ns: u64) {
        imp::with(|h| h.energy.insert((-1, who.raw()), ns as i64));
    }

    /// What [`energy::sampled_ns`](crate::energy::sampled_ns) returns.
    pub fn set_sampled_ns(ns: u64) {
        imp::with(|h| h.sampled_ns = ns as i64);
    }

    /// What [`vcpu`](crate::vcpu) returns.
    pub fn set_vcpu(vcpu: u32) {
        imp::with(|h| h.vcpu = vcpu as i32);
    }

    /// What [`reason`](crate::reason) returns.
    pub fn set_reason(reason: Reason) {
        imp::with(|h| h.reason = reason.raw());
    }

    /// What [`now_ns`](crate::now_ns) returns.
    pub fn set_now_ns(now_ns: u64) {
        imp::with(|h| h.now_ns = now_ns as i64);
    }

    /// A `[plugin.config]` value for [`config`](crate::config).
    pub fn set_config(name: &str, value: i64) {
        imp::with(|h| h.config.insert(name.into(), value));
    }

    /// Everything logged so far on this thread, oldest first.
    pub fn logs() -> Vec<(Level, String)> {
        imp::with(|h| {
            h.logs
                .iter()
                .map(|(level, m)| (Level::from_raw(*level), m.clone()))
                .collect()
        })
    }

    /// Back to the initial host: vCPU 0, reason UNKNOWN, clock 0, no
    /// config, empty state, no logs.
    pub fn reset() {
        imp::with(|h| *h = imp::Host::new());
    }
}

/// Holds the plugin value of this instance.
#[doc(hidden)]
pub struct Slot<T>(core::cell::UnsafeCell<Option<T>>);

// SAFETY: a wasm instance is single-threaded (the host enables no wasm
// threads), so the slot is never accessed concurrently. (Natively, where
// unit tests may run threads, plugin values are created directly, not
// through a slot.)
unsafe impl<T> Sync for Slot<T> {}

impl<T: Plugin> Slot<T> {
    #[allow(clippy::new_without_default)]
    #[doc(hidden)]
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

    #[doc(hidden)]
    pub fn init(&self) -> i32 {
        match self.with(T::init) {
            Ok(()) => 0,
            Err(code) => code,
        }
    }

    #[doc(hidden)]
    pub fn rdmsr(&self, index: i32) -> i32 {
        match self.with(|p| p.rdmsr(index as u32)) {
            Ok(value) => {
                imp::set_reply(value as i64);
                status::HANDLED
            }
            Err(decline) => decline_status(decline),
        }
    }

    #[doc(hidden)]
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

/// The `claim` export: entry `n` of `claims`, packed as `(first << 32) |
/// last`, or -1 past the end.
#[doc(hidden)]
pub fn claim_entry(claims: &[(u32, u32)], n: i32) -> i64 {
    match usize::try_from(n).ok().and_then(|n| claims.get(n)) {
        Some(&(first, last)) => ((u64::from(first) << 32) | u64::from(last)) as i64,
        None => -1,
    }
}

/// The bytes of `text` as an array, for [`plugin_meta!`].
#[doc(hidden)]
pub const fn meta_bytes<const N: usize>(text: &str) -> [u8; N] {
    let bytes = text.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// Embeds plugin metadata, the `msrwasm.meta` custom section that
/// `msrwasm check` prints. Use it once, with string literals:
///
/// ```
/// msrwasm_sdk::plugin_meta!(
///     name = "rapl",
///     version = "1.0.0",
///     description = "RAPL package power telemetry",
///     author = "platform team",
/// );
/// ```
///
/// Each `key = "value"` becomes a TOML line (the value is written as you
/// spelled it, so use plain `"..."` literals: `\"`, `\\`, `\n` and `\t`
/// are fine, `\0`, `\x..` and `\u{..}` are not TOML). A byte string of TOML
/// works too: `plugin_meta!(b"name = 'rapl'\nversion = '1.0.0'\n")`.
///
/// The section exists only in the wasm build; natively the macro expands
/// to nothing.
#[macro_export]
macro_rules! plugin_meta {
    ($toml:literal) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(link_section = "msrwasm.meta")]
        #[used]
        static __MSRWASM_META: [u8; $toml.len()] = *$toml;
    };
    ($($key:ident = $value:literal),+ $(,)?) => {
        #[cfg(target_arch = "wasm32")]
        #[unsafe(link_section = "msrwasm.meta")]
        #[used]
        static __MSRWASM_META: [u8; concat!($(stringify!($key), " = ", stringify!($value), "\n"),+).len()] =
            $crate::meta_bytes(concat!($(stringify!($key), " = ", stringify!($value), "\n"),+));
    };
}

/// Exports a [`Plugin`] type as an msrwasm ABI v1 plugin: writes the
/// `msrwasm_abi_version`, `init`, `claim`, `rdmsr` and `wrmsr` exports and,
/// in the wasm build, a panic handler that traps (the host counts a plugin
/// error and applies the plugin's `on_error`). Use it once, at the crate
/// root.
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

    #[test]
    fn the_native_host_is_settable_per_thread() {
        assert_eq!((vcpu(), reason(), now_ns()), (0, Reason::Unknown, 0));
        assert_eq!(config("tdp_watts", 65), 65);
        testing::set_vcpu(3);
        testing::set_reason(Reason::Filter);
        testing::set_now_ns(1_000);
        testing::set_config("tdp_watts", 95);
        assert_eq!((vcpu(), reason(), now_ns()), (3, Reason::Filter, 1_000));
        assert_eq!(config("tdp_watts", 65), 95);

        assert_eq!(state::get(7), 0);
        assert_eq!(state::add(7, 2), 2);
        assert_eq!(state::add(7, -1), 1);
        state::set(8, i64::MAX);
        assert_eq!(state::add(8, 1), i64::MIN, "wraps");

        log::warn("careful");
        log(Level::Debug, "details");
        assert_eq!(
            testing::logs(),
            [(Level::Warn, "careful".into()), (Level::Debug, "details".into())]
        );

        testing::reset();
        assert_eq!((vcpu(), state::get(7), testing::logs().len()), (0, 0, 0));
    }

    #[test]
    fn long_strings_are_cut_on_a_character_boundary() {
        let long = "é".repeat(3000); // 6000 bytes
        assert_eq!(clip(&long).len(), 4096);
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn meta_bytes_copy_the_text() {
        const TEXT: &str = concat!(stringify!(name), " = ", stringify!("x \"y\""), "\n");
        let bytes: [u8; TEXT.len()] = meta_bytes(TEXT);
        assert_eq!(&bytes, b"name = \"x \\\"y\\\"\"\n");
    }
}
