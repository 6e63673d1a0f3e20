//! `msrwasm demo`: the built-in guest and plugins, runnable with no wasm
//! toolchain. Everything is written to a temporary directory and run from
//! there exactly as `msrwasm run --manifest` would; a conductor thread on
//! the host paces the hot swap (not a delay loop in the guest), so the demo
//! shows the same thing on slow and fast machines.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use msrwasm::Engine;
use msrwasm::PolicySpec;

use crate::runner::{SerialOut, VmConfig};

/// The demo guest (assembled from `host/cli/guests/demo.S` at build time).
pub const GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));
/// The built-in plugins, as WAT text (compiled by the host at load).
pub const RAPL_WAT: &str = include_str!("../../../plugins/synthetic_rapl.wat");
/// MSR_CORE_THREAD_COUNT.
pub const TOPOLOGY_WAT: &str = include_str!("../../../plugins/topology.wat");
/// The Windows guest profile (plugins/profiles/windows/).
pub const WINDOWS_PROFILE_WAT: &str = include_str!("../../../plugins/profiles/windows/windows.wat");
/// The topology version swapped in midway: SMT hidden.
pub const TOPOLOGY_NOSMT_WAT: &str = include_str!("demo_topology_nosmt.wat");
/// The gate the guest waits at until the host opened it (state key 0), and
/// where it says it arrived (state key 1 counts vCPUs).
pub const GATE_WAT: &str = r#";; The demo's gate: RDMSR 0x4d530002 reads 0 until the host opens it.
(module
  (import "msr" "reply" (func $reply (param i64)))
  (import "msr" "state_get" (func $get (param i32) (result i64)))
  (import "msr" "state_add" (func $add (param i32 i64) (result i64)))
  (global $arrived (mut i32) (i32.const 0))
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "claim") (param $n i32) (result i64)
    (if (result i64) (i32.eqz (local.get $n))
      (then (i64.const 0x4d5300024d530002)) (else (i64.const -1))))
  (func (export "rdmsr") (param $i i32) (result i32)
    (if (i32.eqz (global.get $arrived))
      (then (drop (call $add (i32.const 1) (i64.const 1))) (global.set $arrived (i32.const 1))))
    (call $reply (call $get (i32.const 0)))
    (i32.const 0)))
"#;

/// vCPUs of the demo VM.
pub const VCPUS: u32 = 2;

const MANIFEST: &str = r#"# The demo VM's MSR policy (see docs/manifest.md).
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
path = "synthetic_rapl.wat"
[plugin.config]
tdp_watts = 95

[[plugin]]
name = "gate"
path = "gate.wat"

# The Windows guest profile (plugins/profiles/windows/): the MSRs Windows
# touches that KVM does not model, here VM_IGNNE (0xc0010115) on AMD.
[[plugin]]
name = "windows"
path = "windows.wat"
[plugin.config]
vendor = 0
"#;

/// Why the demo could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write the demo files to {}", dir.display())]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] msrwasm::ManifestError),
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
        let files: [(&str, &[u8]); 6] = [
            ("demo.elf", GUEST),
            ("synthetic_rapl.wat", RAPL_WAT.as_bytes()),
            ("topology.wat", TOPOLOGY_WAT.as_bytes()),
            ("gate.wat", GATE_WAT.as_bytes()),
            ("windows.wat", WINDOWS_PROFILE_WAT.as_bytes()),
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

    /// The demo's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the demo is about to show, for standard error.
    pub fn describe(&self) -> String {
        format!(
            "msrwasm demo: {VCPUS} vCPUs read MSRs that KVM does not model; the built-in plugins answer them.\n\
             msrwasm demo: after two rounds the vCPUs wait at a gate while the host replaces topology.wat with a\n\
             msrwasm demo: version that hides SMT; watch MSR_CORE_THREAD_COUNT change while the VM keeps running.\n\
             msrwasm demo: manifest, plugins and guest are in {}",
            self.dir().display()
        )
    }

    /// The VM to run; `serial` gets the guest's output.
    pub fn config(&self, trace: Option<PathBuf>, serial: SerialOut) -> Result<VmConfig, DemoError> {
        let mut config = VmConfig::new(
            self.dir().join("demo.elf"),
            PolicySpec::from_manifest(&self.dir().join("demo.toml"))?,
        );
        config.vcpus = VCPUS;
        config.mem_mib = 64;
        config.trace = trace;
        config.serial = serial;
        config.watch = true;
        Ok(config)
    }

    /// Paces the demo from the host: once every vCPU waits at the gate,
    /// replaces topology.wat the way an editor saves (write beside, rename
    /// over), waits until the engine has the new version in force, then
    /// opens the gate. Stops when `done` is set.
    pub fn conduct(&self, engine: Engine, done: Arc<AtomicBool>, say: fn(&str)) -> JoinHandle<()> {
        let dir = self.dir().to_owned();
        std::thread::spawn(move || {
            let gate = engine.state().scope("gate");
            let wait = |what: &dyn Fn() -> bool| {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !what() {
                    if done.load(Ordering::Acquire) || Instant::now() > deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                true
            };
            if !wait(&|| gate.get(1) >= i64::from(VCPUS)) {
                return;
            }
            say("msrwasm demo: every vCPU is at the gate; hot-swapping topology.wat (SMT hidden) on the running VM");
            let started = Instant::now();
            let temp = dir.join(".topology.wat.new");
            if let Err(e) = std::fs::write(&temp, TOPOLOGY_NOSMT_WAT)
                .and_then(|()| std::fs::rename(&temp, dir.join("topology.wat")))
            {
                say(&format!("msrwasm demo: could not swap topology.wat: {e}"));
                return;
            }
            let new = msrwasm::tools::content_hash(TOPOLOGY_NOSMT_WAT.as_bytes());
            let live = || {
                engine
                    .policy()
                    .plugins()
                    .any(|p| p.name == "topology" && p.version == new)
            };
            if !wait(&live) {
                say("msrwasm demo: the new topology.wat did not go live");
                return;
            }
            say(&format!(
                "msrwasm demo: new version in force (generation {}) {:.1} ms after the rename; opening the gate",
                engine.generation(),
                started.elapsed().as_secs_f64() * 1e3
            ));
            let _ = gate.set(0, 1);
        })
    }
}
