//! `--trace FILE`: one JSON line per deflected MSR access, written by a
//! thread of its own so that vCPUs never wait on the file.

use std::fs::File;
use std::io::{BufWriter, Write};
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
            .spawn(move || write_all(BufWriter::new(file), rx))
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

fn write_all(mut out: BufWriter<File>, rx: Receiver<TraceRecord>) -> std::io::Result<u64> {
    let mut n = 0;
    for record in rx {
        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}
