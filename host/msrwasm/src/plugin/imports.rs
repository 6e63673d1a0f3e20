//! The `msr.*` host functions of ABI v1 and the per-`Store` data they use.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::{Caller, Extern, Linker, StoreLimits};

use super::engine;
use super::state::StateScope;

/// Messages a plugin instance may log per window before the rest are
/// dropped (and the drop is reported once).
const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(1);
/// Longest string a plugin may hand to `log` or `config`.
const MAX_STRING: usize = 4096;

/// Data of one plugin `Store` (one plugin on one vCPU).
pub struct PluginCtx {
    name: Arc<str>,
    vcpu: u32,
    reason: u32,
    in_rdmsr: bool,
    reply: Option<u64>,
    state: Arc<StateScope>,
    config: Arc<BTreeMap<String, i64>>,
    log_window: Instant,
    log_count: u32,
    /// Overrides the host clock for `msr.now_ns` (scripted tests).
    clock: Option<super::ManualClock>,
    /// Host-call time the running call may still use (see [`charge`]).
    pub(super) host_budget_ns: u64,
    pub(super) limits: StoreLimits,
}

impl PluginCtx {
    pub(super) fn new(
        name: &str,
        vcpu: u32,
        state: Arc<StateScope>,
        config: Arc<BTreeMap<String, i64>>,
        limits: StoreLimits,
        clock: Option<super::ManualClock>,
    ) -> Self {
        Self {
            name: name.into(),
            vcpu,
            reason: 0,
            in_rdmsr: false,
            reply: None,
            state,
            config,
            log_window: Instant::now(),
            log_count: 0,
            host_budget_ns: 0,
            clock,
            limits,
        }
    }

    pub(super) fn begin(&mut self, reason: u32, rdmsr: bool) {
        self.reason = reason;
        self.in_rdmsr = rdmsr;
        self.reply = None;
    }

    /// Ends a call; returns what `msr.reply` left.
    pub(super) fn end(&mut self) -> Option<u64> {
        self.in_rdmsr = false;
        self.reply.take()
    }

    fn may_log(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.log_window) >= LOG_WINDOW {
            if self.log_count > LOG_BURST {
                tracing::warn!(plugin = %self.name, dropped = self.log_count - LOG_BURST, "plugin log messages dropped by the rate limit");
            }
            self.log_window = now;
            self.log_count = 0;
        }
        self.log_count += 1;
        self.log_count <= LOG_BURST
    }
}

/// Start of the `now_ns` clock: the process's first use of it.
fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
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

/// The linker every plugin is instantiated with.
pub(super) fn linker() -> &'static Linker<PluginCtx> {
    static LINKER: OnceLock<Linker<PluginCtx>> = OnceLock::new();
    LINKER.get_or_init(|| build_linker().expect("the msr import definitions are consistent"))
}

/// What host imports cost in CPU time. Fuel counts only wasm
/// instructions, so host calls draw on a budget of their own (as large as
/// the call's): a loop that spends its time in host calls cannot outlast
/// it, and a call ends within about twice `timeout_us` whatever it does.
const CHEAP_NS: u64 = 20;
const STATE_NS: u64 = 100;
const STRING_NS: u64 = 1000;

/// Takes `ns` from the running call's host-call budget; running out is the
/// same trap as running out of fuel.
fn charge(c: &mut Caller<'_, PluginCtx>, ns: u64) -> wasmtime::Result<()> {
    let ctx = c.data_mut();
    match ctx.host_budget_ns.checked_sub(ns) {
        Some(left) => {
            ctx.host_budget_ns = left;
            Ok(())
        }
        None => Err(wasmtime::Trap::OutOfFuel.into()),
    }
}

fn build_linker() -> wasmtime::Result<Linker<PluginCtx>> {
    let mut l = Linker::new(engine());
    l.func_wrap("msr", "reply", |mut c: Caller<'_, PluginCtx>, value: i64| {
        charge(&mut c, CHEAP_NS)?;
        let ctx = c.data_mut();
        if !ctx.in_rdmsr {
            return Err(wasmtime::Error::msg("msr.reply called outside rdmsr"));
        }
        ctx.reply = Some(value as u64);
        Ok(())
    })?;
    l.func_wrap("msr", "vcpu", |mut c: Caller<'_, PluginCtx>| {
        charge(&mut c, CHEAP_NS)?;
        Ok(c.data().vcpu as i32)
    })?;
    l.func_wrap("msr", "reason", |mut c: Caller<'_, PluginCtx>| {
        charge(&mut c, CHEAP_NS)?;
        Ok(c.data().reason as i32)
    })?;
    l.func_wrap("msr", "now_ns", |mut c: Caller<'_, PluginCtx>| {
        charge(&mut c, CHEAP_NS)?;
        Ok(match &c.data().clock {
            Some(clock) => clock.load(std::sync::atomic::Ordering::Relaxed) as i64,
            None => clock_origin().elapsed().as_nanos() as i64,
        })
    })?;
    l.func_wrap("msr", "state_get", |mut c: Caller<'_, PluginCtx>, key: i32| {
        charge(&mut c, STATE_NS)?;
        Ok(c.data().state.get(key))
    })?;
    l.func_wrap("msr", "state_set", |mut c: Caller<'_, PluginCtx>, key: i32, v: i64| {
        charge(&mut c, STATE_NS)?;
        c.data().state.set(key, v);
        Ok(())
    })?;
    l.func_wrap("msr", "state_add", |mut c: Caller<'_, PluginCtx>, key: i32, d: i64| {
        charge(&mut c, STATE_NS)?;
        Ok(c.data().state.add(key, d))
    })?;
    l.func_wrap(
        "msr",
        "config",
        |mut c: Caller<'_, PluginCtx>, ptr: i32, len: i32, default: i64| {
            charge(&mut c, STRING_NS)?;
            let name = read_string(&mut c, ptr, len, "config")?;
            Ok(c.data().config.get(&name).copied().unwrap_or(default))
        },
    )?;
    l.func_wrap(
        "msr",
        "log",
        |mut c: Caller<'_, PluginCtx>, level: i32, ptr: i32, len: i32| {
            charge(&mut c, STRING_NS)?;
            let msg = read_string(&mut c, ptr, len, "log")?;
            let ctx = c.data_mut();
            if !ctx.may_log() {
                return Ok(());
            }
            let (plugin, vcpu) = (&*ctx.name, ctx.vcpu);
            match level {
                0 => tracing::error!(plugin, vcpu, "{msg}"),
                1 => tracing::warn!(plugin, vcpu, "{msg}"),
                2 => tracing::info!(plugin, vcpu, "{msg}"),
                _ => tracing::debug!(plugin, vcpu, "{msg}"),
            }
            Ok(())
        },
    )?;
    Ok(l)
}
