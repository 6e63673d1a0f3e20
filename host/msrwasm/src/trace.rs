//! `--trace FILE`: one JSON line per deflected MSR access, written by a
//! thread of its own so that vCPUs never wait on the file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

/// One MSR access, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TraceRecord {
    /// Nanoseconds since the VM started.
    pub t_ns: u64,
    pub vcpu: u32,
    /// `rdmsr` or `wrmsr`.
    pub op: String,
    /// MSR index, hex.
    pub index: String,
    /// The value read (when the read completed) or written, hex.
    pub value: Option<String>,
    /// Why KVM exited: `inval`, `unknown` or `filter`.
    pub reason: String,
    /// `plugin`, `kvm` (fallback to KVM's own MSR), `unhandled`, or `native` (benchmark baseline).
    pub by: String,
    /// The answering plugin's name, when `by` is `plugin`.
    pub plugin: Option<String>,
    /// The answering plugin's version: the first 16 hex digits of its sha256.
    pub version: Option<String>,
    /// `handled`, `fault` (#GP from the plugin), `error` (plugin error, decided
    /// by on_error), `kvm`, or the unhandled policy: `gp`, `ignore`, `log`.
    pub status: String,
    /// `ok` or `gp`: what the guest saw.
    pub outcome: String,
}

/// Why a trace file cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("trace file {}: {source}", path.display())]
pub struct TraceError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The writing end of a trace, cloned into every vCPU.
pub type TraceSender = Sender<TraceRecord>;

/// The trace writer thread.
pub struct TraceWriter {
    path: PathBuf,
    thread: JoinHandle<std::io::Result<u64>>,
}

impl TraceWriter {
    /// Creates `path` and starts writing whatever the returned sender gets.
    pub fn create(path: &Path) -> Result<(Self, TraceSender), TraceError> {
        let file = File::create(path).map_err(|source| TraceError {
            path: path.to_owned(),
            source,
        })?;
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("msrwasm-trace".into())
            .spawn(move || write_all(file, rx))
            .map_err(|source| TraceError {
                path: path.to_owned(),
                source,
            })?;
        Ok((
            Self {
                path: path.to_owned(),
                thread,
            },
            tx,
        ))
    }

    /// Waits until every sender is gone and all records are on disk;
    /// returns how many were written.
    pub fn finish(self) -> Result<u64, TraceError> {
        let path = self.path;
        match self.thread.join() {
            Ok(result) => result.map_err(|source| TraceError { path, source }),
            Err(_) => Err(TraceError {
                path,
                source: std::io::Error::other("trace writer thread panicked"),
            }),
        }
    }
}

/// Writes whole lines only, in batches: the file always ends with a
/// complete record, so `tail` on a running trace never shows half a line.
fn write_all(mut out: File, rx: Receiver<TraceRecord>) -> std::io::Result<u64> {
    const BATCH: usize = 64 * 1024;
    let mut n = 0;
    let mut batch = Vec::with_capacity(2 * BATCH);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(record) = next {
            serde_json::to_writer(&mut batch, &record)?;
            batch.push(b'\n');
            n += 1;
            if batch.len() >= BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        // The queue ran dry or the batch is full.
        out.write_all(&batch)?;
        batch.clear();
    }
    Ok(n)
}
