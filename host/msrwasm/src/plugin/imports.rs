//! The `msr.*` host functions of ABI v1 and the per-`Store` data they use.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::{Caller, Engine, Extern, Linker, ResourceLimiter};

use super::clock::Clock;
use super::runtime::Budget;
use super::state::StateScope;

/// Messages one plugin instance may log per window; the rest are dropped
/// (and the drop is reported once per window).
pub const LOG_BURST: u32 = 20;
/// Messages all plugins of a runtime together may log per window.
pub const LOG_GLOBAL_BURST: u32 = 200;
/// The rate-limit window.
pub const LOG_WINDOW: Duration = Duration::from_secs(1);
/// Longest string a plugin may hand to `log` or `config`.
pub const MAX_STRING: usize = 4096;

/// The log budget all plugin instances of a runtime share, so that many
/// instances (64 vCPUs x many plugins) cannot flood the host's log.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window: Mutex<(Instant, u32, u64)>,
}

impl LogLimiter {
    pub(crate) fn new() -> Self {
        Self {
            window: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Whether one more line may go out now.
    fn admit(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(w.0) >= LOG_WINDOW {
            if w.2 > 0 {
                tracing::warn!(
                    dropped = w.2,
                    "plugin log lines dropped by the host-wide rate limit ({LOG_GLOBAL_BURST} per second)"
                );
            }
            *w = (now, 0, 0);
        }
        if w.1 < LOG_GLOBAL_BURST {
            w.1 += 1;
            true
        } else {
            w.2 += 1;
            false
        }
    }
}

/// One instance's log: the per-instance rate limit, the host-wide one,
/// and the partial lines of its WASI stdout/stderr.
pub(crate) struct InstanceLog {
    name: Arc<str>,
    /// The plugin version's short content hash.
    version: Arc<str>,
    vcpu: u32,
    window: Instant,
    count: u32,
    limiter: Arc<LogLimiter>,
    /// Unfinished stdout (info) and stderr (warn) lines.
    partial: [Vec<u8>; 2],
}

impl InstanceLog {
    pub(super) fn new(name: Arc<str>, version: Arc<str>, vcpu: u32, limiter: Arc<LogLimiter>) -> Self {
        Self {
            name,
            version,
            vcpu,
            window: Instant::now(),
            count: 0,
            limiter,
            partial: [Vec::new(), Vec::new()],
        }
    }

    /// Logs `message` at `level` if both rate limits allow, with control
    /// characters escaped so that a plugin cannot forge host log lines.
    pub(super) fn emit(&mut self, level: i32, message: &str) {
        let now = Instant::now();
        if now.duration_since(self.window) >= LOG_WINDOW {
            if self.count > LOG_BURST {
                tracing::warn!(
                    event = "plugin_log_dropped", plugin = %self.name, version = %self.version, vcpu = self.vcpu, dropped = self.count - LOG_BURST,
                    "plugin log messages dropped by the per-instance rate limit ({LOG_BURST} per second)"
                );
            }
            self.window = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        if self.count > LOG_BURST || !self.limiter.admit() {
            return;
        }
        let msg = sanitize(message);
        let (plugin, version, vcpu) = (&*self.name, &*self.version, self.vcpu);
        let event = "plugin_log";
        match level {
            0 => tracing::error!(event, plugin, version, vcpu, "plugin says: {msg}"),
            1 => tracing::warn!(event, plugin, version, vcpu, "plugin says: {msg}"),
            2 => tracing::info!(event, plugin, version, vcpu, "plugin says: {msg}"),
            _ => tracing::debug!(event, plugin, version, vcpu, "plugin says: {msg}"),
        }
    }

    /// Bytes written to WASI stdout (`level` 2) or stderr (1): each whole
    /// line, or each [`MAX_STRING`] bytes without a newline, is one message.
    pub(super) fn write(&mut self, level: i32, bytes: &[u8]) {
        let slot = usize::from(level != 2);
        for &b in bytes {
            if b == b'\n' || self.partial[slot].len() >= MAX_STRING {
                let line = std::mem::take(&mut self.partial[slot]);
                self.emit(level, &String::from_utf8_lossy(&line));
                if b == b'\n' {
                    continue;
                }
            }
            self.partial[slot].push(b);
        }
    }
}

/// Data of one plugin `Store` (one plugin on one vCPU).
pub struct PluginCtx {
    vcpu: u32,
    reason: u32,
    in_rdmsr: bool,
    reply: Option<u64>,
    state: Arc<StateScope>,
    config: Arc<BTreeMap<String, i64>>,
    clock: Arc<dyn Clock>,
    pub(super) log: Arc<Mutex<InstanceLog>>,
    /// The running call's budget.
    pub(super) budget: Budget,
    /// Thread CPU time when the running call was first interrupted.
    pub(super) cpu_mark: Option<u64>,
    /// Host-call time the running call may still use (see [`charge`]).
    pub(super) host_budget_ns: u64,
    pub(super) limits: Limits,
    /// WASI 0.2 (components).
    pub(super) wasi: Option<super::wasi::WasiState>,
    /// `wasi_snapshot_preview1` (core modules importing it).
    pub(super) wasi_p1: Option<Box<wasmtime_wasi::p1::WasiP1Ctx>>,
    /// The energy sampler, for a plugin granted it.
    pub(super) energy: Option<Arc<crate::energy::EnergyHub>>,
    /// The sample the running call reads (taken at its first energy call,
    /// so that one call sees one consistent sample).
    sample: Option<Arc<crate::energy::Snapshot>>,
}

impl PluginCtx {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        name: Arc<str>,
        version: Arc<str>,
        vcpu: u32,
        state: Arc<StateScope>,
        config: Arc<BTreeMap<String, i64>>,
        clock: Arc<dyn Clock>,
        limiter: Arc<LogLimiter>,
        limits: Limits,
        budget: Budget,
    ) -> Self {
        Self {
            vcpu,
            reason: 0,
            in_rdmsr: false,
            reply: None,
            state,
            config,
            clock,
            log: Arc::new(Mutex::new(InstanceLog::new(name, version, vcpu, limiter))),
            budget,
            cpu_mark: None,
            host_budget_ns: 0,
            limits,
            wasi: None,
            wasi_p1: None,
            energy: None,
            sample: None,
        }
    }

    pub(super) fn begin(&mut self, reason: u32, rdmsr: bool) {
        self.reason = reason;
        self.in_rdmsr = rdmsr;
        self.reply = None;
        self.sample = None;
    }

    /// Ends a call; returns what `msr.reply` left.
    pub(super) fn end(&mut self) -> Option<u64> {
        self.in_rdmsr = false;
        self.reply.take()
    }

    pub(super) fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    pub(super) fn config(&self, name: &str) -> Option<i64> {
        self.config.get(name).copied()
    }

    /// Logs `message` at `level` (rate-limited, escaped).
    pub(super) fn log(&mut self, level: i32, message: &str) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).emit(level, message);
    }

    pub(super) fn vcpu(&self) -> u32 {
        self.vcpu
    }

    pub(super) fn reason(&self) -> u32 {
        self.reason
    }

    pub(super) fn state(&self) -> &StateScope {
        &self.state
    }

    /// The energy sample of the running call; an error if the plugin was
    /// not granted energy (the load check makes that unreachable).
    pub(super) fn energy(&mut self) -> wasmtime::Result<&crate::energy::Snapshot> {
        charge(self, CHEAP_NS)?;
        let Some(hub) = &self.energy else {
            return Err(wasmtime::Error::msg("host energy is not granted to this plugin"));
        };
        Ok(self.sample.get_or_insert_with(|| hub.snapshot()))
    }
}

/// A count as the ABI's non-negative i64 (saturating, never -1).
fn clamp_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The core module of the host energy capability.
pub(super) const ENERGY_MODULE: &str = "msr_energy_v1";

/// What one store may hold: linear memory in total (all memories of a
/// component together), table elements, and how many memories, tables and
/// instances.
#[derive(Debug)]
pub(super) struct Limits {
    pub memory_cap: usize,
    pub memory_used: usize,
    pub table_elements: usize,
    pub memories: usize,
    pub tables: usize,
    pub instances: usize,
}

impl ResourceLimiter for Limits {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        if self.memory_used.saturating_add(more) > self.memory_cap {
            return Ok(false);
        }
        self.memory_used += more;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.tables
    }

    fn memories(&self) -> usize {
        self.memories
    }
}

/// Escapes control characters (newlines, ESC, ...) and bidirectional
/// overrides, so a string from a plugin stays one inert line.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads a UTF-8 string from the caller's exported memory; a bad pointer or
/// length is the plugin's error, so it traps.
fn read_string(caller: &mut Caller<'_, PluginCtx>, ptr: i32, len: i32, what: &str) -> wasmtime::Result<String> {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return Err(wasmtime::Error::msg(format!(
            "msr.{what}: the plugin exports no memory"
        )));
    };
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    if len > MAX_STRING {
        return Err(wasmtime::Error::msg(format!(
            "msr.{what}: length {len} exceeds {MAX_STRING} bytes"
        )));
    }
    let bytes = memory
        .data(&*caller)
        .get(ptr..ptr.saturating_add(len))
        .ok_or_else(|| wasmtime::Error::msg(format!("msr.{what}: pointer {ptr:#x}+{len} is outside linear memory")))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| wasmtime::Error::msg(format!("msr.{what}: string is not UTF-8")))
}

/// What host imports cost in CPU time, charged to a budget of their own
/// (as large as the call's) because fuel counts only wasm instructions: a
/// loop of host calls ends within the budget without waiting for the
/// CPU-time check at the next epoch tick.
pub(super) const CHEAP_NS: u64 = 20;
pub(super) const STATE_NS: u64 = 100;
pub(super) const STRING_NS: u64 = 1000;

/// Takes `ns` from the running call's host-call budget; running out is the
/// same trap as running out of fuel.
pub(super) fn charge(ctx: &mut PluginCtx, ns: u64) -> wasmtime::Result<()> {
    match ctx.host_budget_ns.checked_sub(ns) {
        Some(left) => {
            ctx.host_budget_ns = left;
            Ok(())
        }
        None => Err(wasmtime::Trap::OutOfFuel.into()),
    }
}

/// A refused `state_set`/`state_add` (the plugin's store is full) traps.
pub(super) fn state_refused() -> wasmtime::Error {
    wasmtime::Error::msg(format!(
        "the plugin's state store is full ({} keys): state_set/state_add of a new key refused",
        super::state::MAX_KEYS
    ))
}

/// The linker for core-module plugins: the `msr` functions and
/// deny-by-default `wasi_snapshot_preview1`.
pub(super) fn core_linker(engine: &Engine) -> wasmtime::Result<Linker<PluginCtx>> {
    let mut l = Linker::new(engine);
    super::wasi::add_p1(&mut l)?;
    l.func_wrap("msr", "reply", |mut c: Caller<'_, PluginCtx>, value: i64| {
        let ctx = c.data_mut();
        charge(ctx, CHEAP_NS)?;
        if !ctx.in_rdmsr {
            return Err(wasmtime::Error::msg("msr.reply called outside rdmsr"));
        }
        ctx.reply = Some(value as u64);
        Ok(())
    })?;
    l.func_wrap("msr", "vcpu", |mut c: Caller<'_, PluginCtx>| {
        charge(c.data_mut(), CHEAP_NS)?;
        Ok(c.data().vcpu as i32)
    })?;
    l.func_wrap("msr", "reason", |mut c: Caller<'_, PluginCtx>| {
        charge(c.data_mut(), CHEAP_NS)?;
        Ok(c.data().reason as i32)
    })?;
    l.func_wrap("msr", "now_ns", |mut c: Caller<'_, PluginCtx>| {
        charge(c.data_mut(), CHEAP_NS)?;
        Ok(c.data().now_ns() as i64)
    })?;
    l.func_wrap("msr", "state_get", |mut c: Caller<'_, PluginCtx>, key: i32| {
        charge(c.data_mut(), STATE_NS)?;
        Ok(c.data().state.get(key))
    })?;
    l.func_wrap("msr", "state_set", |mut c: Caller<'_, PluginCtx>, key: i32, v: i64| {
        let ctx = c.data_mut();
        charge(ctx, STATE_NS)?;
        ctx.state.set(key, v).map_err(|_| state_refused())
    })?;
    l.func_wrap("msr", "state_add", |mut c: Caller<'_, PluginCtx>, key: i32, d: i64| {
        let ctx = c.data_mut();
        charge(ctx, STATE_NS)?;
        ctx.state.add(key, d).map_err(|_| state_refused())
    })?;
    l.func_wrap(
        "msr",
        "config",
        |mut c: Caller<'_, PluginCtx>, ptr: i32, len: i32, default: i64| {
            charge(c.data_mut(), STRING_NS)?;
            let name = read_string(&mut c, ptr, len, "config")?;
            Ok(c.data().config(&name).unwrap_or(default))
        },
    )?;
    l.func_wrap(ENERGY_MODULE, "domains", |mut c: Caller<'_, PluginCtx>| {
        Ok(c.data_mut().energy()?.domains())
    })?;
    l.func_wrap(
        ENERGY_MODULE,
        "energy_uj",
        |mut c: Caller<'_, PluginCtx>, domain: i32, who: i32| {
            Ok(c.data_mut().energy()?.energy_uj(domain, who).map_or(-1, clamp_i64))
        },
    )?;
    l.func_wrap(ENERGY_MODULE, "cpu_ns", |mut c: Caller<'_, PluginCtx>, who: i32| {
        Ok(c.data_mut().energy()?.cpu_ns(who).map_or(-1, clamp_i64))
    })?;
    l.func_wrap(ENERGY_MODULE, "sampled_ns", |mut c: Caller<'_, PluginCtx>| {
        Ok(clamp_i64(c.data_mut().energy()?.at_ns))
    })?;
    l.func_wrap(
        "msr",
        "log",
        |mut c: Caller<'_, PluginCtx>, level: i32, ptr: i32, len: i32| {
            charge(c.data_mut(), STRING_NS)?;
            let msg = read_string(&mut c, ptr, len, "log")?;
            c.data_mut().log(level, &msg);
            Ok(())
        },
    )?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_instances_share_one_host_wide_log_budget() {
        // 64 vCPUs x 4 plugins, each logging its own 20 lines in a burst:
        // 5120 lines asked for, the host-wide window admits 200.
        let limiter = Arc::new(LogLimiter::new());
        let mut admitted = 0;
        for vcpu in 0..64 {
            for plugin in 0..4 {
                let mut log = InstanceLog::new(format!("p{plugin}").into(), "0".into(), vcpu, limiter.clone());
                for _ in 0..LOG_BURST {
                    log.count += 1;
                    if log.count <= LOG_BURST && log.limiter.admit() {
                        admitted += 1;
                    }
                }
            }
        }
        assert_eq!(admitted, LOG_GLOBAL_BURST);
        assert_eq!(
            limiter.window.lock().unwrap().2,
            64 * 4 * u64::from(LOG_BURST) - u64::from(LOG_GLOBAL_BURST)
        );
    }

    #[test]
    fn sanitize_keeps_one_inert_line() {
        assert_eq!(sanitize("ok"), "ok");
        assert_eq!(
            sanitize("x\nmsrwasm: reload applied\x1b[2J\u{202e}"),
            "x\\nmsrwasm: reload applied\\u{1b}[2J\\u{202e}"
        );
    }
}
