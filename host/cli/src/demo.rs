//! `msrwasm demo`: the built-in guest and plugins, runnable with no wasm
//! toolchain. Everything is written to a temporary directory and run from
//! there exactly as `msrwasm run --manifest` would.

use std::path::{Path, PathBuf};

use crate::policy::PolicySpec;
use crate::vm::{SerialOut, VmConfig};

/// The demo guest (assembled from `host/guests/demo.S` at build time).
pub const GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));
/// The built-in plugins, as WAT text (compiled by the host at load).
pub const RAPL_WAT: &str = include_str!("../../plugins/rapl.wat");
pub const TOPOLOGY_WAT: &str = include_str!("../../plugins/topology.wat");
/// The topology version swapped in midway: SMT hidden.
pub const TOPOLOGY_NOSMT_WAT: &str = include_str!("demo_topology_nosmt.wat");

/// Serial lines the guest prints before the demo swaps the plugin: two
/// rounds of both vCPUs, leaving most rounds to show the new version.
pub const SWAP_AFTER_LINES: usize = 2 * VCPUS as usize;

/// vCPUs of the demo VM.
pub const VCPUS: u32 = 2;

const MANIFEST: &str = r#"# The demo VM's MSR policy (see shared/spec/manifest.md).
# MSRs no plugin answers read as 0 and are logged once, instead of #GP.
unhandled = "log"

[[plugin]]
name = "topology"
path = "topology.wat"
[plugin.config]
cores = 2
threads = 4

[[plugin]]
name = "rapl"
path = "rapl.wat"
[plugin.config]
tdp_watts = 95
"#;

/// Why the demo could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write the demo files to {}: {source}", dir.display())]
    Write { dir: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Manifest(#[from] crate::policy::ManifestError),
}

/// The demo's files, in a temporary directory that lives as long as this.
pub struct Demo {
    dir: tempfile::TempDir,
}

impl Demo {
    /// Writes the guest, the plugins and the manifest.
    pub fn prepare() -> Result<Self, DemoError> {
        let dir = tempfile::Builder::new()
            .prefix("msrwasm-demo-")
            .tempdir()
            .map_err(|source| DemoError::Write {
                dir: std::env::temp_dir(),
                source,
            })?;
        let files: [(&str, &[u8]); 4] = [
            ("demo.elf", GUEST),
            ("rapl.wat", RAPL_WAT.as_bytes()),
            ("topology.wat", TOPOLOGY_WAT.as_bytes()),
            ("demo.toml", MANIFEST.as_bytes()),
        ];
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).map_err(|source| DemoError::Write {
                dir: dir.path().to_owned(),
                source,
            })?;
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn manifest(&self) -> PathBuf {
        self.dir().join("demo.toml")
    }

    /// What the demo is about to show, for standard error.
    pub fn describe(&self) -> String {
        format!(
            "msrwasm demo: {VCPUS} vCPUs read MSRs that KVM does not model; the built-in plugins answer them.\n\
             msrwasm demo: after {SWAP_AFTER_LINES} lines of output the demo replaces topology.wat with a version that hides SMT;\n\
             msrwasm demo: watch MSR_CORE_THREAD_COUNT change while the VM keeps running.\n\
             msrwasm demo: manifest, plugins and guest are in {}",
            self.dir().display()
        )
    }

    /// Replaces topology.wat the way an editor saves: write a temporary
    /// file beside it, then rename it over the original.
    pub fn swap_topology(dir: &Path) -> std::io::Result<()> {
        let temp = dir.join(".topology.wat.new");
        std::fs::write(&temp, TOPOLOGY_NOSMT_WAT)?;
        std::fs::rename(&temp, dir.join("topology.wat"))
    }

    /// The VM to run; `serial` gets the guest's output, and the hot swap
    /// happens once the guest has printed [`SWAP_AFTER_LINES`] lines.
    pub fn config(&self, trace: Option<PathBuf>, serial: SerialOut) -> Result<VmConfig, DemoError> {
        let serial = Box::new(SwapAfterLines {
            inner: serial,
            lines: 0,
            dir: self.dir().to_owned(),
        });
        Ok(VmConfig {
            vcpus: VCPUS,
            mem_mib: 64,
            guest: self.dir().join("demo.elf"),
            policy: PolicySpec::from_manifest(&self.manifest())?,
            trace,
            serial,
            watch: true,
        })
    }
}

/// Passes the guest's output through and triggers the hot swap once
/// enough lines went by, so the swap lands mid-run whatever the speed.
struct SwapAfterLines {
    inner: SerialOut,
    lines: usize,
    dir: PathBuf,
}

impl std::io::Write for SwapAfterLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let before = self.lines;
        self.lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
        if before < SWAP_AFTER_LINES && self.lines >= SWAP_AFTER_LINES {
            self.inner.flush()?;
            // Off the vCPU thread: this thread must go back to its guest.
            let dir = self.dir.clone();
            std::thread::spawn(move || {
                eprintln!("msrwasm demo: hot-swapping topology.wat (SMT hidden) on the running VM");
                if let Err(e) = Demo::swap_topology(&dir) {
                    eprintln!("msrwasm demo: could not swap topology.wat: {e}");
                }
            });
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
