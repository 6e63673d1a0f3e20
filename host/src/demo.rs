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
    Write {
        dir: PathBuf,
        source: std::io::Error,
    },
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
             msrwasm demo: manifest, plugins and guest are in {}",
            self.dir().display()
        )
    }

    /// The VM to run.
    pub fn config(&self, trace: Option<PathBuf>, serial: SerialOut) -> Result<VmConfig, DemoError> {
        Ok(VmConfig {
            vcpus: VCPUS,
            mem_mib: 64,
            guest: self.dir().join("demo.elf"),
            policy: PolicySpec::from_manifest(&self.manifest())?,
            trace,
            serial,
        })
    }
}
