//! WASI for plugins, deny-by-default: `wasi_snapshot_preview1` for core
//! modules, WASI 0.2 for components, both from wasmtime-wasi with a context
//! that grants nothing.
//!
//! | WASI | what a plugin gets |
//! |---|---|
//! | stdout, stderr | lines go to the plugin's rate-limited log (stdout info, stderr warn) |
//! | stdin | empty |
//! | clocks | the host's monotonic and wall clocks |
//! | random | the host's CSPRNG: at most [`MAX_RANDOM_BYTES`] per call, each call charged to the plugin's budget |
//! | args, environment | empty |
//! | file system | no preopened directory: every path operation fails (`EBADF`/`ENOTCAPABLE`) |
//! | sockets, name lookup | denied (error results) |
//! | `wasi:http` | not linked: a component importing it is refused at load, naming it |
//! | `proc_exit` / `wasi:cli/exit` | a plugin error |
//! | `poll_oneoff`, `wasi:io/poll`, `pollable.block`, `sched_yield` | return at once: nothing sleeps on a vCPU thread |
//! | handles (streams, pollables, ...) of a component | at most [`MAX_HANDLES`] per instance |

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::{Caller, Extern, Linker};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::imports::{InstanceLog, PluginCtx};

/// Import module of WASI for core modules.
pub const P1_MODULE: &str = "wasi_snapshot_preview1";

/// The deny-by-default WASI context of one instance: stdout and stderr into
/// the plugin's log, nothing else granted.
pub(super) fn context(log: &Arc<Mutex<InstanceLog>>) -> WasiCtxBuilder {
    let mut b = WasiCtxBuilder::new();
    b.stdout(LogOutput {
        log: log.clone(),
        level: 2,
    })
    .stderr(LogOutput {
        log: log.clone(),
        level: 1,
    })
    .allow_tcp(false)
    .allow_udp(false)
    .allow_ip_name_lookup(false);
    b
}

/// WASI 0.2 state of a component instance.
pub struct WasiState {
    pub(super) ctx: WasiCtx,
    pub(super) table: ResourceTable,
}

/// WASI resources (streams, pollables, ...) one component instance may hold
/// at once; past it, creating one more is a plugin error. Each costs host
/// memory outside `memory_max_kib` (about 100 bytes).
pub const MAX_HANDLES: usize = 4096;

/// Random bytes one call may ask for (`random_get`, `get-random-bytes`,
/// `get-insecure-random-bytes`); more is a plugin error.
pub const MAX_RANDOM_BYTES: u64 = 65_536;

/// What a random call is charged, nanoseconds: a fixed part plus one per
/// byte (drawn from the plugin's host-call budget, like `msr.*` calls).
fn random_cost_ns(len: u64) -> u64 {
    super::imports::STRING_NS + len
}

/// The table of a component's WASI handles, bounded.
pub(super) fn table() -> ResourceTable {
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_HANDLES);
    table
}

/// Admits a call for `len` random bytes: bounded, and charged to the
/// plugin's budget.
fn admit_random(ctx: &mut PluginCtx, len: u64) -> wasmtime::Result<()> {
    if len > MAX_RANDOM_BYTES {
        return Err(wasmtime::Error::msg(format!(
            "asked for {len} random bytes in one call, over the {MAX_RANDOM_BYTES}-byte limit"
        )));
    }
    super::imports::charge(ctx, random_cost_ns(len))
}

/// Fills `target` from the host's CSPRNG.
fn fill_random(target: &mut [u8]) -> wasmtime::Result<()> {
    getrandom::fill(target).map_err(|e| wasmtime::Error::msg(format!("the host's random source failed: {e}")))
}

/// `len` random bytes, admitted by [`admit_random`] (WASI 0.2).
fn random_bytes(ctx: &mut PluginCtx, len: u64) -> wasmtime::Result<Vec<u8>> {
    admit_random(ctx, len)?;
    let mut bytes = vec![0u8; len as usize];
    fill_random(&mut bytes)?;
    Ok(bytes)
}

impl WasiView for PluginCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        // Components always get a WASI context (see `Plugin::instantiate`):
        // core modules never reach a WASI 0.2 function.
        let state = self.wasi.get_or_insert_with(|| WasiState {
            ctx: WasiCtxBuilder::new().build(),
            table: table(),
        });
        WasiCtxView {
            ctx: &mut state.ctx,
            table: &mut state.table,
        }
    }
}

/// stdout or stderr of a plugin: whole lines to its log.
#[derive(Clone)]
struct LogOutput {
    log: Arc<Mutex<InstanceLog>>,
    level: i32,
}

impl LogOutput {
    fn take(&self, bytes: &[u8]) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(self.level, bytes);
    }
}

impl IsTerminal for LogOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

/// Bytes one write may carry (WASI's usual permit).
const PERMIT: usize = 4096;

#[wasmtime_wasi::async_trait]
impl OutputStream for LogOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.take(&bytes[..bytes.len().min(PERMIT)]);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = buf.len().min(PERMIT);
        self.take(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// WASI errno values used here.
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: u16 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;

/// Adds `wasi_snapshot_preview1` to a core linker, with `poll_oneoff`
/// replaced by one that never sleeps.
pub(super) fn add_p1(linker: &mut Linker<PluginCtx>) -> wasmtime::Result<()> {
    wasmtime_wasi::p1::add_to_linker_sync(linker, |ctx: &mut PluginCtx| {
        ctx.wasi_p1
            .get_or_insert_with(|| Box::new(WasiCtxBuilder::new().build_p1()))
            .as_mut()
    })?;
    linker.allow_shadowing(true);
    linker.func_wrap(P1_MODULE, "poll_oneoff", poll_oneoff)?;
    linker.func_wrap(P1_MODULE, "random_get", random_get)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `random_get` bounded in size and charged (see [`random_bytes`]).
fn random_get(mut c: Caller<'_, PluginCtx>, buf: i32, len: i32) -> wasmtime::Result<i32> {
    let (buf, len) = (buf as u32 as usize, len as u32 as u64);
    admit_random(c.data_mut(), len)?;
    let Some(Extern::Memory(memory)) = c.get_export("memory") else {
        return Ok(ERRNO_FAULT);
    };
    // Straight into linear memory: no host buffer.
    match memory.data_mut(&mut c).get_mut(buf..buf + len as usize) {
        Some(target) => fill_random(target).map(|()| ERRNO_SUCCESS),
        None => Ok(ERRNO_FAULT),
    }
}

/// `poll_oneoff` that reports every subscription as done at once: clock
/// subscriptions as expired, file descriptors as `EBADF` (there are none).
fn poll_oneoff(
    mut c: Caller<'_, PluginCtx>,
    subs: i32,
    events: i32,
    nsubs: i32,
    nevents: i32,
) -> wasmtime::Result<i32> {
    super::imports::charge(c.data_mut(), super::imports::STRING_NS)?;
    let Some(Extern::Memory(memory)) = c.get_export("memory") else {
        return Ok(ERRNO_FAULT);
    };
    let n = nsubs as u32 as usize;
    if n == 0 {
        return Ok(ERRNO_INVAL);
    }
    let (subs, events, nevents) = (subs as u32 as usize, events as u32 as usize, nevents as u32 as usize);
    let data = memory.data_mut(&mut c);
    let fits = |at: usize, len: usize| at.checked_add(len).is_some_and(|end| end <= data.len());
    if n > 4096 || !fits(subs, n * 48) || !fits(events, n * 32) || !fits(nevents, 4) {
        return Ok(ERRNO_FAULT);
    }
    for i in 0..n {
        let sub = subs + i * 48;
        let mut userdata = [0u8; 8];
        userdata.copy_from_slice(&data[sub..sub + 8]);
        let tag = data[sub + 8];
        let event = events + i * 32;
        data[event..event + 32].fill(0);
        data[event..event + 8].copy_from_slice(&userdata);
        let error: u16 = if tag == 0 { 0 } else { ERRNO_BADF };
        data[event + 8..event + 10].copy_from_slice(&error.to_le_bytes());
        data[event + 10] = tag;
    }
    data[nevents..nevents + 4].copy_from_slice(&(n as u32).to_le_bytes());
    Ok(ERRNO_SUCCESS)
}

/// Adds WASI 0.2 to a component linker, with polling replaced by calls
/// that never sleep.
pub(super) fn add_p2(linker: &mut wasmtime::component::Linker<PluginCtx>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    let mut poll = linker.instance("wasi:io/poll@0.2.12")?;
    poll.func_wrap(
        "poll",
        |_store, (list,): (Vec<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>>,)| {
            // Everything is ready at once: nothing sleeps on a vCPU thread.
            Ok(((0..list.len() as u32).collect::<Vec<u32>>(),))
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |_store, (_p,): (wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>,)| Ok(()),
    )?;
    linker
        .instance("wasi:random/random@0.2.12")?
        .func_wrap("get-random-bytes", |mut store, (len,): (u64,)| {
            Ok((random_bytes(store.data_mut(), len)?,))
        })?;
    linker
        .instance("wasi:random/insecure@0.2.12")?
        .func_wrap("get-insecure-random-bytes", |mut store, (len,): (u64,)| {
            Ok((random_bytes(store.data_mut(), len)?,))
        })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The WASI 0.2 interfaces a component may import (all of them served
/// deny-by-default); anything else from the `wasi:` namespace is refused.
pub const P2_INTERFACES: &[&str] = &[
    "wasi:io/poll",
    "wasi:io/error",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/ip-name-lookup",
];

/// Whether a component import (`wasi:io/poll@0.2.9`) is served.
pub fn p2_supported(import: &str) -> bool {
    let base = import.split('@').next().unwrap_or(import);
    import.starts_with("wasi:") && import.contains("@0.2.") && P2_INTERFACES.contains(&base)
}
