//! `--trace FILE`: one JSON line per decided MSR access, as an [`Events`]
//! implementation.
//!
//! vCPUs never wait on the file: each hands its records to a bounded queue
//! and a writer thread writes whole lines in batches. When the queue is full
//! (a slow disk, a pipe whose reader stopped) or the file cannot be written
//! (a full disk), records are counted as dropped instead: every record is
//! either written or counted, and the file always ends with a complete line.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::events::{Events, VcpuEvents};
use crate::msr::{Access, AnsweredBy, Op, Outcome, Reply};

/// Records the queue holds before new ones are dropped.
pub const QUEUE_RECORDS: usize = 65_536;

/// One MSR access, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TraceRecord {
    /// Nanoseconds since the trace started.
    pub t_ns: u64,
    /// The vCPU.
    pub vcpu: u32,
    /// `rdmsr` or `wrmsr`.
    pub op: String,
    /// MSR index, hex.
    pub index: String,
    /// The value read (when the read completed) or written, hex.
    pub value: Option<String>,
    /// Why KVM exited: `inval`, `unknown` or `filter`.
    pub reason: String,
    /// `plugin`, `kvm` (KVM's own handling of a claimed MSR), `unhandled`, or
    /// `firewall` (nobody answered an access the default-deny firewall denied).
    pub by: String,
    /// The answering plugin's name, when `by` is `plugin`.
    pub plugin: Option<String>,
    /// The answering plugin's version: the first 16 hex digits of its sha256.
    pub version: Option<String>,
    /// `handled`, `fault` (#GP from the plugin), `error` (plugin error,
    /// decided by on_error), `kvm`, or the unhandled policy: `gp`,
    /// `ignore`, `log`.
    pub status: String,
    /// `ok` or `gp`: what the guest saw.
    pub outcome: String,
    /// The policy generation that decided.
    pub generation: u64,
}

impl TraceRecord {
    /// The record of `access` decided as `outcome` on `vcpu`.
    pub fn new(t_ns: u64, vcpu: u32, access: &Access, outcome: &Outcome<'_>) -> Self {
        let (by, plugin, version, status) = match outcome.by {
            AnsweredBy::Plugin { plugin, error, .. } => {
                let status = match (error, outcome.reply) {
                    (true, _) => "error",
                    (false, Reply::Gp) => "fault",
                    (false, _) => "handled",
                };
                (
                    "plugin",
                    Some(plugin.name.clone()),
                    Some(plugin.short_version().to_owned()),
                    status.to_owned(),
                )
            }
            AnsweredBy::Kvm => ("kvm", None, None, "kvm".to_owned()),
            AnsweredBy::Template => ("template", None, None, "template".to_owned()),
            AnsweredBy::Unhandled(policy) => ("unhandled", None, None, policy.name().to_owned()),
            AnsweredBy::Firewall(policy) => ("firewall", None, None, policy.name().to_owned()),
        };
        let value = match (access.op, outcome.reply) {
            (Op::Write(v), _) => Some(v),
            (Op::Read, Reply::Read(v)) => Some(v),
            _ => None,
        };
        Self {
            t_ns,
            vcpu,
            op: if access.is_write() { "wrmsr" } else { "rdmsr" }.into(),
            index: format!("{:#x}", access.index),
            value: value.map(|v| format!("{v:#x}")),
            reason: access.reason.name().into(),
            by: by.into(),
            plugin,
            version,
            status,
            outcome: if outcome.reply == Reply::Gp { "gp" } else { "ok" }.into(),
            generation: outcome.generation,
        }
    }
}

/// Why a trace file cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("trace file {}", path.display())]
pub struct TraceError {
    /// The file.
    pub path: PathBuf,
    /// What the OS said.
    #[source]
    pub source: std::io::Error,
}

/// How a trace ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TraceReport {
    /// Records on disk.
    pub written: u64,
    /// Records not written: the queue was full or the file failed.
    pub dropped: u64,
    /// The write error that stopped the writer, if one did.
    pub error: Option<String>,
    /// Whether the file was deleted while the trace ran.
    pub deleted: bool,
}

/// What the writer thread returns: records written, the error that stopped
/// it, the file.
type Written = (u64, Option<String>, File);

struct Shared {
    epoch: Instant,
    /// Records handed to the queue.
    sent: AtomicU64,
    /// Records dropped because the queue was full or the file failed.
    dropped: AtomicU64,
}

/// The trace of one engine: add it with [`crate::EngineBuilder::events`].
pub struct Trace {
    path: PathBuf,
    shared: Arc<Shared>,
    tx: Mutex<Option<SyncSender<TraceRecord>>>,
    thread: Mutex<Option<JoinHandle<Written>>>,
}

impl Trace {
    /// Creates (truncates) `path` and starts the writer thread. `path` may
    /// be a FIFO or a pipe with a reader; a FIFO without one is an error,
    /// not a wait.
    pub fn create(path: &Path) -> Result<Self, TraceError> {
        let err = |source| TraceError {
            path: path.to_owned(),
            source,
        };
        let file = open_for_writing(path).map_err(err)?;
        let (tx, rx) = sync_channel(QUEUE_RECORDS);
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let writer_shared = shared.clone();
        let shown = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("msrwasm-trace".into())
            .spawn(move || write_all(file, rx, &writer_shared, &shown))
            .map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            shared,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The instant `t_ns` counts from.
    pub fn epoch(&self) -> Instant {
        self.shared.epoch
    }

    /// Stops taking records, waits (at most `grace`) until the queue is
    /// written, and says how it went: a reader that stopped reading is
    /// abandoned, and what it did not take is counted as dropped.
    /// Dispatchers still holding a sink keep the writer alive: drop them
    /// first.
    pub fn finish(&self, grace: std::time::Duration) -> TraceReport {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        let joined = thread.and_then(|t| crate::util::join_within(t, grace));
        let sent = self.shared.sent.load(Ordering::Relaxed);
        let (written, error, file) = match joined {
            Some(Ok(r)) => r,
            _ => {
                return TraceReport {
                    written: 0,
                    dropped: sent,
                    error: Some(format!(
                        "the trace could not be finished within {grace:?} (a reader that stopped reading?): {sent} records not known to be written"
                    )),
                    deleted: false,
                };
            }
        };
        let deleted = file.metadata().map(|m| m.nlink() == 0).unwrap_or(false);
        TraceReport {
            written,
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            error,
            deleted,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Events for Trace {
    fn vcpu(&self, vcpu: u32) -> Option<Box<dyn VcpuEvents>> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(Box::new(TraceSink {
            vcpu,
            tx,
            shared: self.shared.clone(),
        }))
    }
}

struct TraceSink {
    vcpu: u32,
    tx: SyncSender<TraceRecord>,
    shared: Arc<Shared>,
}

impl VcpuEvents for TraceSink {
    fn access(&mut self, access: &Access, outcome: &Outcome<'_>) {
        let t_ns = self.shared.epoch.elapsed().as_nanos() as u64;
        let record = TraceRecord::new(t_ns, self.vcpu, access, outcome);
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Opens a trace file without blocking (a FIFO without a reader is
/// `ENXIO`, not a wait), then makes writes blocking again (the writer
/// thread may wait; vCPUs never do).
fn open_for_writing(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => std::io::Error::other("a FIFO with no reader"),
            _ => e,
        })?;
    let meta = file.metadata()?;
    if meta.is_file() {
        file.set_len(0)?;
    } else if meta.is_dir() {
        return Err(std::io::Error::other("it is a directory"));
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    crate::sys::set_blocking(fd)?;
    Ok(file)
}

/// Writes whole lines only, in batches; after a write error, cuts the file
/// back to its last complete line and counts the rest as dropped.
fn write_all(mut out: File, rx: Receiver<TraceRecord>, shared: &Shared, path: &str) -> Written {
    const BATCH: usize = 64 * 1024;
    let mut written = 0;
    let mut good_len = 0u64;
    let mut failed: Option<String> = None;
    let mut batch = Vec::with_capacity(2 * BATCH);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut in_batch = 0u64;
        while let Some(record) = next {
            if failed.is_some() {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            } else if serde_json::to_writer(&mut batch, &record).is_ok() {
                batch.push(b'\n');
                in_batch += 1;
            }
            if batch.len() >= BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if batch.is_empty() {
            continue;
        }
        match out.write_all(&batch) {
            Ok(()) => {
                written += in_batch;
                good_len += batch.len() as u64;
            }
            Err(e) => {
                // Keep the file whole: no half record at its end.
                let _ = out.set_len(good_len);
                shared.dropped.fetch_add(in_batch, Ordering::Relaxed);
                tracing::error!(
                    "trace file {path}: {e}; the trace stops here and further records are counted as dropped"
                );
                failed = Some(e.to_string());
            }
        }
        batch.clear();
    }
    if failed.is_none()
        && let Err(e) = out.flush()
    {
        failed = Some(e.to_string());
    }
    (written, failed, out)
}
