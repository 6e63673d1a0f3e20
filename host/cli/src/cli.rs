//! Command-line parsing and the glue from arguments to library calls.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use msrwasm::PluginSettings;
use msrwasm::PolicySpec;
use msrwasm::Unhandled;
use msrwasm::oci::OciRef;
use msrwasm::oci::store::OciStore;
use msrwasm::oci::store::StoreOptions;

use crate::runner::{self, VmConfig};
use crate::{err, out};

/// Run KVM guests whose MSR accesses are answered by WebAssembly plugins.
///
/// KVM bounces RDMSR/WRMSR of MSRs it does not know, and of MSRs that
/// plugins claim through the KVM MSR filter, to msrwasm; msrwasm asks the
/// plugins in order and answers the guest.
#[derive(Parser)]
#[command(name = "msrwasm", version, about, long_about, propagate_version = true)]
struct Cli {
    /// Host log level (error, warn, info, debug, trace), or a tracing filter
    /// such as `msrwasm=debug`. Logs go to standard error. `info` shows every
    /// hot-reload attempt (file, old and new content hash, compile time,
    /// result).
    #[arg(long, global = true, default_value = "warn", env = "MSRWASM_LOG")]
    log: String,

    /// How log lines are written: `text` for a person, or `json` for a
    /// log collector (journald, Vector, Loki): one object per line with
    /// `time`, `level`, `vm` (the VM's --name), `event`, `plugin` and
    /// `version` where a plugin is involved, and `message`.
    #[arg(long, global = true, value_enum, default_value = "text", env = "MSRWASM_LOG_FORMAT")]
    log_format: crate::logs::LogFormat,

    /// Where compiled plugins (keyed by content hash and engine version; a
    /// corrupt entry is compiled again) and plugins pulled from OCI
    /// registries (`oci/`, by digest) are cached. Default:
    /// $XDG_CACHE_HOME/msrwasm or ~/.cache/msrwasm. The directory must be
    /// private to this user.
    #[arg(long, global = true, env = "MSRWASM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Do not cache compiled plugins on disk; plugins pulled from OCI
    /// registries go to a temporary directory removed at exit.
    #[arg(long, global = true)]
    no_cache: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a raw guest image (ELF64, started in long mode or, with a PVH
    /// note, in 32-bit protected mode at the PVH entry; or a flat binary)
    /// on KVM.
    ///
    /// Serial output (COM1) goes to standard output; msrwasm's own messages
    /// and the closing summary go to standard error. Exit status: the value
    /// the guest wrote to port 0xf4, 0 when every vCPU halted or the guest
    /// powered off (0x34, ACPI S5, to port 0x600) or asked for a reset
    /// (0xfe to port 0x64), 1 when a vCPU
    /// crashed (triple fault, KVM error), 2 for bad arguments or a refused
    /// plugin/manifest, 128+N when stopped by signal N (SIGINT 130, SIGTERM
    /// 143; every signal whose default action ends a process, but the ones a
    /// fault raises, does the same, also during start-up).
    Run(Box<RunArgs>),
    /// Boot the built-in demo guest on 2 vCPUs, answered by built-in plugins,
    /// and hot-swap one plugin while it runs.
    Demo(DemoArgs),
    /// Measure what plugins cost: wasm vs a native handler on the same
    /// guest loop, the dispatcher alone, 1 vs 2 vCPUs, and hot-reload
    /// latency on a running VM.
    ///
    /// Build with --release for meaningful figures. Prints a table, or
    /// JSON with --json.
    Bench(BenchArgs),
    /// Validate plugins without a VM: ABI version, export signatures,
    /// imports, claims (as `run` would program them), whether init succeeds,
    /// metadata. Exits non-zero if any plugin would be refused. For plugin
    /// authors' CI.
    Check(CheckArgs),
    /// Run MSR accesses from a script through a plugin on the host alone
    /// (no KVM), with msr.now_ns under the script's control, and report
    /// mismatches. Script lines: `config NAME VALUE`, `vcpu N`,
    /// `reason unknown|inval|filter`, `advance 1s|5ms|10us|7ns`,
    /// `rdmsr INDEX -> VALUE|handled|fault|pass|error|any`,
    /// `wrmsr INDEX VALUE -> handled|fault|pass|error|any`; `#` comments.
    Test(TestArgs),
    /// Show a plugin's metadata (the msrwasm.meta section), or set fields
    /// of it in a .wasm whatever language it was built from.
    Meta(MetaArgs),
    /// Write the built-in raw guests to a directory, for trying plugins by
    /// hand: demo.elf (the demo), msr_loop.elf (50000 RDMSR 0x4d53424d per
    /// vCPU, then HLT), msr_forever.elf (RDMSR 0x4d530020 until stopped);
    /// two PVH guests that cloud-hypervisor and Firecracker boot too:
    /// pvh.elf (prints MSR 0x35, answered by a plugin such as
    /// plugins/topology.wat, and MSR 0x1b, answered by KVM, then powers
    /// off), pvh_reload.elf (reads MSR 0x35 until a hot reload changes it,
    /// prints the first and the new value and the number of reads, then
    /// powers off); and what writing a guest needs: guest.inc (the
    /// helpers), elf.ld and flat.ld (linker scripts), example.S (a guest to
    /// start from; its header says how to build it), and for PVH guests
    /// pvh.inc, pvh.ld and pvh.S (the source of pvh.elf).
    Guests(GuestsArgs),
    /// Talk to a running VM's control API (`run --api-sock PATH`).
    ///
    /// Prints the JSON (or, for `metrics`, the Prometheus text) the API
    /// answers; exits 1 when the API refuses, 2 when it cannot be reached.
    Ctl(CtlArgs),
    /// Work with MSR policies: `suggest` writes a manifest skeleton from a
    /// recorded footprint (`run --footprint FILE`), `profile` compiles a
    /// guest profile, `record` turns a footprint into a working profile,
    /// `diff` compares two footprints.
    Policy(PolicyArgs),
    /// Publish a plugin to an OCI registry as a Wasm OCI artifact.
    ///
    /// The plugin is checked first (a plugin `run` would refuse is not
    /// pushed); WAT is compiled to binary; the msrwasm.meta fields name,
    /// version, description and author become the annotations
    /// org.opencontainers.image.title, .version, .description, .authors.
    /// Prints the pinned reference (REF@sha256:...). HTTPS with the system
    /// roots plus MSRWASM_REGISTRY_CA (PEM); plain HTTP only to loopback
    /// registries. Credentials: MSRWASM_REGISTRY_USER and
    /// MSRWASM_REGISTRY_PASSWORD, else the Docker config
    /// ($DOCKER_CONFIG/config.json or ~/.docker/config.json, credential
    /// helpers included). A push or pull, credentials included, gets
    /// MSRWASM_REGISTRY_TIMEOUT_S seconds (default 120).
    Push(PushArgs),
    /// Fetch a plugin from an OCI registry (verifying every digest) into
    /// the local cache and a file.
    ///
    /// Transport, credentials and MSRWASM_REGISTRY_TIMEOUT_S as for push.
    Pull(PullArgs),
}

#[derive(Args)]
struct PushArgs {
    /// The plugin (.wasm or .wat).
    file: PathBuf,
    /// Where to: oci://HOST[:PORT]/REPOSITORY[:TAG] (tag `latest` if none).
    reference: String,
}

#[derive(Args)]
struct PullArgs {
    /// What: oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST].
    reference: String,
    /// Write the plugin here (default: REPOSITORY's last component + .wasm
    /// in the current directory). Written atomically.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct CtlArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_sock: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Generation, vCPUs, uptime, unhandled policy, plugins and counters.
    Status,
    /// Replace the VM's policy with this manifest (relative plugin paths
    /// resolve against the directory of the manifest the VM started with).
    Policy { manifest: PathBuf },
    /// Re-read every plugin file and the manifest now.
    Reload,
    /// Print every plugin's state store, or with FILE replace stores from it
    /// (the same JSON shape).
    State { file: Option<PathBuf> },
    /// The MSRs the guest touched so far.
    Footprint,
    /// The Prometheus metrics.
    Metrics,
    /// A live view of the VM's MSR traffic, refreshed in place like
    /// kvm_stat or top: per-MSR access rates and who answers them, plugin
    /// counters, call times and quarantines, policy changes as they
    /// happen. Keys: r sort by rate, c by total, i by MSR index, q quit.
    /// Without a terminal (or with --once) it prints one frame and exits.
    Top {
        /// Seconds between refreshes (0.1 to 60).
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Print one frame (two samples an interval apart) and exit.
        #[arg(long)]
        once: bool,
    },
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}`: give seconds between 0.1 and 60")),
    }
}

#[derive(Args)]
struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print a manifest skeleton from a footprint: an `allow` list for a
    /// default-deny firewall and the MSRs that went unhandled, with counts.
    Suggest {
        /// The footprint (`run --footprint FILE` or `GET /v1/footprint`).
        footprint: PathBuf,
    },
    /// Compile a guest profile (profile.toml: a table of MSRs, their
    /// values and write rules) into NAME.wat (the plugin), manifest.toml
    /// (loads it: `run --manifest`) and NAME.test (`msrwasm test`
    /// script checking every row), beside the profile or in --out.
    Profile {
        /// The profile (plugins/profiles/README.md documents the format).
        profile: PathBuf,
        /// Directory to write to (default: the profile's).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Turn a recorded footprint (`run --footprint FILE`) into a working
    /// policy: a profile answering every MSR that went unhandled, compiled
    /// as `profile` does (profile.toml, NAME.wat, manifest.toml, NAME.test
    /// in --out).
    ///
    /// Actions: `zero` (reads 0 and log the first access per vCPU, writes
    /// dropped), `recorded` (reads return the value --values shows the
    /// guest read where the MSR was answered, else the last value it wrote,
    /// else 0), `value=N`, `gp` (#GP both ways).
    Record {
        /// The footprint (`run --footprint FILE` or `GET /v1/footprint`).
        footprint: PathBuf,
        /// Directory to write to (created if missing).
        #[arg(long, short)]
        out: PathBuf,
        /// The profile's (and plugin's) name: letters, digits, `_`, `-`.
        #[arg(long, default_value = "recorded", value_parser = parse_profile_name)]
        name: String,
        /// The answer for every unhandled MSR.
        #[arg(long, default_value = "zero")]
        action: crate::profile::Action,
        /// A different answer for one MSR, as INDEX=ACTION; repeatable.
        #[arg(long = "msr", value_parser = parse_msr_action)]
        msrs: Vec<(u32, crate::profile::Action)>,
        /// For `recorded`: a footprint of the same guest where these MSRs
        /// were answered (another host, another policy), whose values the
        /// profile gives.
        #[arg(long)]
        values: Option<PathBuf>,
    },
    /// Import a Firecracker custom CPU template (JSON): its `msr_modifiers`
    /// become `[[template]]` entries (the guest reads the host's value with
    /// the bitmap's 0/1 bits forced); `cpuid_modifiers` and the other
    /// sections are out of scope and reported as ignored. Prints a
    /// manifest (or, with --manifest, that manifest with the templates
    /// added) that parses as `run` parses it; whether this host's KVM can
    /// provide the bits is checked when a VM loads it.
    ImportTemplate {
        /// The template: Firecracker's custom CPU template JSON.
        template: PathBuf,
        /// Add the templates to this manifest (its plugins, unhandled,
        /// firewall); printed, the file is not changed.
        #[arg(long, conflicts_with = "plugin")]
        manifest: Option<PathBuf>,
        /// Write a plugin (WAT) carrying the templates in its metadata
        /// instead: push it to a registry and follow its tag, and moving
        /// the tag rolls a revised template out to running VMs.
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// Compare two footprints (two guest versions, or two hosts): MSRs
    /// only in one, and changes in who answered, #GP and the last value.
    /// Exits 1 when they differ.
    Diff {
        /// The first footprint (`-` lines).
        a: PathBuf,
        /// The second footprint (`+` lines).
        b: PathBuf,
    },
}

fn parse_profile_name(s: &str) -> Result<String, String> {
    match !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        true => Ok(s.to_owned()),
        false => Err(format!("`{s}`: 1 to 64 letters, digits, `_` or `-`")),
    }
}

fn parse_msr_action(s: &str) -> Result<(u32, crate::profile::Action), String> {
    let (index, action) = s.split_once('=').ok_or_else(|| format!("`{s}`: give INDEX=ACTION"))?;
    Ok((parse_msr(index)?, action.parse()?))
}

/// Limits and config that `run` takes from a manifest, for `check`/`test`.
#[derive(Args)]
struct PluginLimits {
    /// Take the plugin's settings (limits, config, claims) from this
    /// manifest: the same limits `run --manifest` applies.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// A `[plugin.config]` value, as NAME=VALUE; repeatable.
    #[arg(long, value_parser = parse_config)]
    config: Vec<(String, i64)>,
    /// Linear memory cap in KiB (manifest `memory_max_kib`; default 1024).
    #[arg(long)]
    memory_max_kib: Option<u64>,
    /// Per-call CPU budget in microseconds (manifest `timeout_us`; default 1000).
    #[arg(long)]
    timeout_us: Option<u64>,
    /// Budget of `_initialize`/`init` in microseconds (manifest
    /// `init_timeout_us`; default 100 x timeout_us).
    #[arg(long)]
    init_timeout_us: Option<u64>,
}

impl PluginLimits {
    /// Settings for the plugin at `path`: from the manifest when given
    /// (matched by path, or by name), then overridden by the flags.
    fn settings(&self, path: &std::path::Path, manifest_spec: Option<&PolicySpec>) -> Result<PluginSettings> {
        let mut settings = match manifest_spec {
            Some(spec) => {
                let wanted = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
                let found = spec.plugins.iter().find(|p| {
                    std::path::absolute(&p.path).is_ok_and(|a| a == wanted) || p.name == path.to_string_lossy()
                });
                match found {
                    Some(p) => p.clone(),
                    None => bail!(
                        "{} is not a plugin of manifest {} (give its path or its name)",
                        path.display(),
                        self.manifest
                            .as_ref()
                            .map(|m| m.display().to_string())
                            .unwrap_or_default()
                    ),
                }
            }
            None => PolicySpec::from_paths(&[path.to_owned()], Unhandled::default())
                .plugins
                .remove(0),
        };
        settings.config.extend(self.config.iter().cloned());
        if let Some(v) = self.memory_max_kib {
            settings.memory_max_kib = v.clamp(64, 4 << 20);
        }
        if let Some(v) = self.timeout_us {
            settings.timeout_us = v.clamp(1, 1_000_000);
        }
        if let Some(v) = self.init_timeout_us {
            settings.init_timeout_us = Some(v.clamp(1, 10_000_000));
        }
        Ok(settings)
    }

    fn spec(&self) -> Result<Option<PolicySpec>> {
        self.manifest
            .as_ref()
            .map(|m| PolicySpec::from_manifest(m).map_err(anyhow::Error::from))
            .transpose()
    }
}

#[derive(Args)]
struct CheckArgs {
    /// Plugin files (.wasm or .wat) or oci:// references; with --manifest
    /// and none given, every plugin of the manifest.
    plugins: Vec<PathBuf>,
    #[command(flatten)]
    limits: PluginLimits,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
    /// Compile for this execution mode: `jit` (native code) or `no-jit`
    /// (Pulley bytecode, for `run --mode no-jit` and engines built without
    /// Cranelift). With --cache-dir, the compiled code stays there for
    /// them to load.
    #[arg(long, default_value = "jit")]
    mode: msrwasm::ExecMode,
}

#[derive(Args)]
struct TestArgs {
    /// The plugin file (.wasm or .wat), an oci:// reference, or its name in
    /// --manifest.
    plugin: PathBuf,
    /// The script of accesses and expected answers; repeatable.
    #[arg(long = "case", required = true)]
    cases: Vec<PathBuf>,
    #[command(flatten)]
    limits: PluginLimits,
}

fn parse_config(s: &str) -> Result<(String, i64), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    let value = value
        .parse::<i64>()
        .ok()
        .or_else(|| msrwasm::tools::parse_number(value).map(|v| v as i64))
        .ok_or_else(|| format!("`{value}` is not an integer"))?;
    Ok((name.trim().to_owned(), value))
}

#[derive(Args)]
struct MetaArgs {
    /// The plugin (.wasm; .wat files carry metadata as (@custom ...)).
    plugin: PathBuf,
    /// Set a field, as KEY=VALUE (name, version, description, author, ...);
    /// repeatable. Without --set the metadata is printed.
    #[arg(long)]
    set: Vec<String>,
    /// Write the result here instead of over PLUGIN.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct GuestsArgs {
    /// Directory to write to (created if missing).
    dir: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// Rounds of each end-to-end configuration (medians are reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
    /// Synthetic exits per dispatcher measurement.
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1000..=1_000_000_000))]
    dispatches: u64,
    /// Plugin versions swapped into a running VM for the reload latency.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    swaps: u64,
    /// Measure these plugins instead (repeatable; any language, module or
    /// component): cold and warm load, instantiation, memory per instance,
    /// ns per RDMSR of --msr through the dispatcher, and the longest switch
    /// when new versions are swapped into a 2-vCPU VM exiting continuously.
    #[arg(long)]
    plugin: Vec<PathBuf>,
    /// The MSR read in the per-plugin dispatch measurement.
    #[arg(long, default_value = "0x606", value_parser = parse_msr)]
    msr: u32,
    /// Linear memory cap of each --plugin, KiB (manifest `memory_max_kib`).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(64..=4 << 20))]
    memory_max_kib: u64,
    /// Per-call CPU budget of each --plugin, µs (manifest `timeout_us`).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    timeout_us: u64,
    /// Versions of each --plugin swapped into a running VM (0: skip).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=100))]
    reload_swaps: u64,
    /// Grant every --plugin host energy (manifest `grants = ["energy"]`),
    /// read from --powercap and --proc-stat, so that a virtual RAPL is
    /// measured on its real path (plugins/rapl with --msr 0x611).
    #[arg(long, requires = "plugin")]
    grant_energy: bool,
    /// The powercap tree for --grant-energy.
    #[arg(long, default_value = "/sys/class/powercap", requires = "grant_energy")]
    powercap: PathBuf,
    /// The CPU statistics for --grant-energy.
    #[arg(long, default_value = "/proc/stat", requires = "grant_energy")]
    proc_stat: PathBuf,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// How plugin code runs: `jit` (native code, the fastest) or `no-jit`
    /// (Pulley bytecode: no executable memory is ever mapped; see
    /// docs/embedding.md).
    #[arg(long, default_value = "jit")]
    mode: msrwasm::ExecMode,
    /// Number of vCPUs, each on its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(runner::MAX_VCPUS)))]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = runner::DEFAULT_MEM_MIB, value_parser = clap::value_parser!(u64).range(runner::MIN_MEM_MIB..=runner::MAX_MEM_MIB))]
    mem: u64,
    /// VM manifest (TOML) composing the plugins; see docs/manifest.md.
    #[arg(long, conflicts_with_all = ["plugin", "unhandled"])]
    manifest: Option<PathBuf>,
    /// A plugin (.wasm or .wat file, or oci://HOST/REPOSITORY[:TAG][@DIGEST])
    /// to add to the chain; repeat for more, asked in the order given.
    #[arg(long)]
    plugin: Vec<PathBuf>,
    /// What happens to an MSR access no plugin answers: gp injects #GP (as
    /// KVM does), ignore reads 0 and drops writes, log is ignore plus one log
    /// line per distinct MSR. Accesses KVM found invalid stay #GP.
    #[arg(long, value_parser = parse_unhandled)]
    unhandled: Option<Unhandled>,
    /// Grant every --plugin a host capability (manifest `grants`; with
    /// --manifest, grant per plugin there): `energy`, the host's RAPL
    /// energy and CPU times (docs/energy.md).
    #[arg(long = "grant", value_parser = ["energy"], conflicts_with = "manifest")]
    grants: Vec<String>,
    /// Linear memory cap of every --plugin, KiB (manifest `memory_max_kib`;
    /// default 1024). Go, Python and JavaScript plugins need more: see
    /// `msrwasm check`, which names the size a plugin asks for.
    #[arg(long, conflicts_with = "manifest", value_parser = clap::value_parser!(u64).range(64..=4_194_304))]
    memory_max_kib: Option<u64>,
    /// Per-call CPU budget of every --plugin, µs (manifest `timeout_us`;
    /// default 1000).
    #[arg(long, conflicts_with = "manifest", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    timeout_us: Option<u64>,
    /// What the guest gets when a --plugin fails or is quarantined
    /// (manifest `on_error`): fault (#GP, the default), pass (as if it
    /// returned PASS), or value=N (reads get N, writes are dropped).
    #[arg(long, conflicts_with = "manifest")]
    on_error: Option<msrwasm::OnError>,
    /// Write one JSON line per MSR access to this file (records the disk
    /// or reader cannot keep up with are dropped and counted).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket, mode
    /// 0600: status, policy changes, reload, state, footprint, /metrics.
    /// `msrwasm ctl --api-sock PATH` is its client.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Record which MSRs the guest touches and write it (JSON) to this file
    /// at exit; `msrwasm policy suggest FILE` turns it into a manifest.
    #[arg(long)]
    footprint: Option<PathBuf>,
    /// The VM's name: the `vm` label of its metrics in Prometheus and the
    /// `vm` field of JSON log lines. 1 to 64 of A-Z a-z 0-9 . _ -.
    /// Default: the guest's file name and this process id.
    #[arg(long, value_parser = parse_name)]
    name: Option<String>,
    /// Serve the VM's metrics (`GET /metrics` only, read-only, OpenMetrics
    /// text) on this TCP address for a Prometheus server: PORT (on
    /// 127.0.0.1) or ADDRESS:PORT; port 0 picks a free one (printed at
    /// start). Bind a non-loopback address only on a network you trust.
    #[arg(long, value_parser = parse_metrics_addr)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Announce the metrics endpoint in this directory for Prometheus'
    /// file-based service discovery (`file_sd_configs`): one file per VM,
    /// `msrwasm-NAME.json`, labelled with the VM's name, removed when the
    /// VM ends. Needs --metrics-addr.
    #[arg(long, requires = "metrics_addr")]
    metrics_sd_dir: Option<PathBuf>,
    /// Do not watch the manifest and plugin files. By default a changed
    /// file is validated and, if good, takes over on the running VM at each
    /// vCPU's next MSR exit; a bad one is refused and the running version
    /// stays.
    #[arg(long)]
    no_watch: bool,
    /// The powercap tree host energy is read from, for plugins the
    /// manifest grants `energy` (docs/energy.md).
    #[arg(long, default_value = "/sys/class/powercap")]
    powercap: PathBuf,
    /// The kernel CPU statistics host busy time is read from.
    #[arg(long, default_value = "/proc/stat")]
    proc_stat: PathBuf,
    /// How often host energy is sampled, milliseconds (10 to 10000): the
    /// finest time step a guest can see in its energy counters.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    energy_period_ms: u64,
    /// The guest image.
    guest: PathBuf,
}

fn parse_unhandled(s: &str) -> Result<Unhandled, String> {
    s.parse()
}

fn parse_name(s: &str) -> Result<String, String> {
    runner::metrics::check_name(s).map(|()| s.to_owned())
}

fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    match s.parse::<u16>() {
        Ok(port) => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        Err(_) => s
            .parse()
            .map_err(|_| format!("`{s}` is neither a port nor ADDRESS:PORT (127.0.0.1:9464, [::1]:9464)")),
    }
}

#[derive(Args)]
struct DemoArgs {
    /// Write the demo's trace (one JSON line per MSR access) to this file.
    #[arg(long)]
    trace: Option<PathBuf>,
}

/// Exit status for bad input: arguments, files, manifests, plugins.
const STATUS_USAGE: i32 = 2;

/// Runs the command line; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    // A bare level is msrwasm's; dependencies (cranelift is chatty) stay at warn.
    let directives = match cli.log.as_str() {
        level @ ("error" | "warn" | "info" | "debug" | "trace") => {
            format!("warn,msrwasm={level},msrwasm_cli={level}")
        }
        other => other.to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let vm_name = match &cli.command {
        Command::Run(args) => args
            .name
            .clone()
            .unwrap_or_else(|| runner::metrics::default_name(&args.guest)),
        Command::Demo(_) => "demo".into(),
        _ => String::new(),
    };
    let logs = crate::logs::init(filter, cli.log_format, &vm_name);
    let cache = match cli.no_cache {
        true => None,
        false => cli.cache_dir.clone().or_else(msrwasm::tools::default_cache_dir),
    };
    let oci = OciHome {
        cache: cache.clone(),
        store: std::cell::OnceCell::new(),
        temp: std::cell::OnceCell::new(),
    };
    let result = match cli.command {
        Command::Run(args) => run(*args, cache, &oci),
        Command::Demo(args) => demo(args, cache),
        Command::Bench(args) => bench(args),
        Command::Guests(args) => guests(args),
        Command::Check(args) => check(args, cache, &oci),
        Command::Meta(args) => meta(args),
        Command::Test(args) => test(args, cache, &oci),
        Command::Ctl(args) => ctl(args),
        Command::Policy(args) => policy(args),
        Command::Push(args) => push(args, cache, &oci),
        Command::Pull(args) => pull(args, &oci),
    };
    let status = result.unwrap_or_else(|e| {
        err!("msrwasm: error: {e:#}");
        STATUS_USAGE
    });
    if logs.dropped() > 0 {
        err!(
            "msrwasm: {} log lines were dropped: standard error was not read fast enough (at most {} wait)",
            logs.dropped(),
            crate::logs::QUEUE_LINES
        );
        // Standard error is stuck: the writer's shutdown would wait on it
        // (and report its failure on standard output). Leave it.
        std::mem::forget(logs);
    }
    status
}

/// Where plugins pulled from registries are kept: the cache directory, or
/// with --no-cache a temporary one removed at exit. Opened on first use.
struct OciHome {
    cache: Option<PathBuf>,
    store: std::cell::OnceCell<Arc<OciStore>>,
    temp: std::cell::OnceCell<tempfile::TempDir>,
}

impl OciHome {
    fn store(&self) -> Result<Arc<OciStore>> {
        if let Some(store) = self.store.get() {
            return Ok(store.clone());
        }
        let dir = match &self.cache {
            Some(dir) => dir.clone(),
            None => {
                if self.temp.get().is_none() {
                    let temp = tempfile::Builder::new()
                        .prefix("msrwasm-oci-")
                        .tempdir()
                        .context("creating a temporary OCI cache")?;
                    let _ = self.temp.set(temp);
                }
                self.temp.get().expect("set above").path().to_owned()
            }
        };
        let options = StoreOptions::from_env()?;
        let store = Arc::new(OciStore::open(&dir, options)?);
        let _ = self.store.set(store.clone());
        Ok(store)
    }

    /// Fetches `settings` if it names an `oci://` plugin.
    fn localize(&self, settings: &mut PluginSettings) -> Result<()> {
        if settings.is_unfetched() {
            let store = self.store()?;
            msrwasm::tools::localize(Some(&*store), settings).with_context(|| format!("plugin `{}`", settings.name))?;
        }
        Ok(())
    }
}

/// Parses an `oci://` reference given on the command line.
fn reference(text: &str) -> Result<OciRef> {
    Ok(OciRef::parse(text)?)
}

fn run(args: RunArgs, cache: Option<PathBuf>, oci: &OciHome) -> Result<i32> {
    // Before any slow start-up work (compiles, fetches, init on every vCPU).
    runner::install_termination_handlers();
    runner::signals::watch_start_up();
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| runner::metrics::default_name(&args.guest));
    for plugin in &args.plugin {
        if let Some(text) = plugin.to_str().filter(|t| msrwasm::tools::is_reference(t)) {
            reference(text).context("--plugin")?;
        }
    }
    let policy = match &args.manifest {
        Some(path) => PolicySpec::from_manifest(path)?,
        None => {
            let mut spec = PolicySpec::from_paths(&args.plugin, args.unhandled.unwrap_or_default());
            let energy = args.grants.iter().any(|g| g == "energy");
            for p in &mut spec.plugins {
                p.energy = energy;
                p.memory_max_kib = args.memory_max_kib.unwrap_or(p.memory_max_kib);
                p.timeout_us = args.timeout_us.unwrap_or(p.timeout_us);
                p.on_error = args.on_error.unwrap_or(p.on_error);
            }
            spec
        }
    };
    // A manifest (now, after a reload, or through the API) may name
    // registry plugins.
    let wants_oci =
        args.manifest.is_some() || args.api_sock.is_some() || policy.plugins.iter().any(|p| p.source.is_some());
    let oci_store = match wants_oci {
        true => Some(oci.store()? as Arc<dyn msrwasm::oci::Fetch>),
        false => None,
    };
    let mut config = VmConfig::new(args.guest, policy);
    config.vcpus = args.vcpus;
    config.mem_mib = args.mem;
    config.trace = args.trace;
    config.watch = !args.no_watch;
    config.cache_dir = cache;
    config.mode = args.mode;
    config.api_sock = args.api_sock;
    config.footprint = args.footprint;
    config.oci = oci_store;
    config.name = name;
    config.metrics_addr = args.metrics_addr;
    config.metrics_sd_dir = args.metrics_sd_dir;
    config.energy = msrwasm::EnergyOptions {
        powercap: args.powercap,
        proc_stat: args.proc_stat,
        period: std::time::Duration::from_millis(args.energy_period_ms),
    };
    run_vm(runner::Vm::new(config)?, None)
}

/// Runs a set-up VM with the clean-stop signal handlers, prints its
/// summary; `after` runs once the VM ended.
fn run_vm(vm: runner::Vm, after: Option<&dyn Fn()>) -> Result<i32> {
    for note in vm.engine().policy().filter().notes() {
        err!("msrwasm: note: {note}");
    }
    let report = vm.run()?;
    if let Some(after) = after {
        after();
    }
    if let runner::VmEnd::Crash(crash) = &report.end {
        err!("msrwasm: {crash}");
    }
    err!("{}", report.summary().trim_end());
    Ok(report.exit_status())
}

fn demo(args: DemoArgs, cache: Option<PathBuf>) -> Result<i32> {
    runner::install_termination_handlers();
    runner::signals::watch_start_up();
    let demo = crate::demo::Demo::prepare().context("preparing the demo")?;
    err!("{}", demo.describe());
    let mut config = demo.config(args.trace, Box::new(std::io::stdout()))?;
    config.cache_dir = cache;
    let vm = runner::Vm::new(config)?;
    let done = Arc::new(AtomicBool::new(false));
    let conductor = demo.conduct(vm.engine().clone(), done.clone(), |line| err!("{line}"));
    let status = run_vm(vm, Some(&|| done.store(true, Ordering::Release)));
    let _ = conductor.join();
    status
}

fn parse_msr(s: &str) -> Result<u32, String> {
    msrwasm::tools::parse_number(s)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("`{s}` is not a 32-bit MSR index"))
}

fn bench(args: BenchArgs) -> Result<i32> {
    if !args.plugin.is_empty() {
        let how = crate::bench::PluginBench {
            memory_max_kib: args.memory_max_kib,
            timeout_us: args.timeout_us,
            msr: args.msr,
            dispatches: args.dispatches.min(1_000_000),
            reload_swaps: args.reload_swaps as usize,
            energy: args.grant_energy.then(|| msrwasm::EnergyOptions {
                powercap: args.powercap.clone(),
                proc_stat: args.proc_stat.clone(),
                ..msrwasm::EnergyOptions::default()
            }),
        };
        let rows = crate::bench::plugins(&args.plugin, &how, |what| err!("msrwasm bench: {what}"))?;
        if args.json {
            out!("{}\n", serde_json::to_string_pretty(&rows)?);
        } else {
            out!("{}", crate::bench::PluginFigures::table(&rows, args.msr));
        }
        return Ok(0);
    }
    let options = crate::bench::BenchOptions {
        rounds: args.rounds as usize,
        dispatches: args.dispatches,
        swaps: args.swaps as usize,
    };
    let report = crate::bench::run(options, |what| err!("msrwasm bench: {what}"))?;
    if args.json {
        out!("{}\n", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", report.table());
    }
    Ok(0)
}

fn guests(args: GuestsArgs) -> Result<i32> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    for (name, bytes) in [
        ("demo.elf", crate::demo::GUEST),
        ("msr_loop.elf", crate::bench::LOOP_GUEST),
        ("msr_forever.elf", crate::bench::FOREVER_GUEST),
        // PVH guests, which cloud-hypervisor and Firecracker boot too.
        ("pvh.elf", crate::runner::image::PVH_GUEST),
        ("pvh_reload.elf", crate::runner::image::PVH_RELOAD_GUEST),
        // What writing a guest needs: the helpers, the linker scripts, an
        // example to start from (docs/guest-conventions.md).
        ("guest.inc", include_bytes!("../guests/guest.inc")),
        ("elf.ld", include_bytes!("../guests/elf.ld")),
        ("flat.ld", include_bytes!("../guests/flat.ld")),
        ("example.S", include_bytes!("../guests/example.S")),
        ("pvh.inc", include_bytes!("../guests/pvh.inc")),
        ("pvh.ld", include_bytes!("../guests/pvh.ld")),
        ("pvh.S", include_bytes!("../guests/pvh.pvh.S")),
    ] {
        let path = args.dir.join(name);
        msrwasm::tools::write_atomic_mode(&path, bytes, 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        out!("{}\n", path.display());
    }
    Ok(0)
}

fn check(args: CheckArgs, cache: Option<PathBuf>, oci: &OciHome) -> Result<i32> {
    let runtime = msrwasm::tools::Runtime::shared_for(args.mode);
    let cache = match &cache {
        Some(dir) => msrwasm::tools::ModuleCache::with_disk(dir, &runtime),
        None => msrwasm::tools::ModuleCache::new(),
    };
    let spec = args.limits.spec()?;
    let plugins: Vec<PathBuf> = match (&spec, args.plugins.is_empty()) {
        (Some(spec), true) => spec.plugins.iter().map(|p| p.path.clone()).collect(),
        (None, true) => bail!("give plugin files to check, or --manifest"),
        (_, false) => args.plugins.clone(),
    };
    let mut reports = Vec::new();
    for path in &plugins {
        let mut settings = args.limits.settings(path, spec.as_ref())?;
        oci.localize(&mut settings)?;
        reports.push(msrwasm::tools::check_with(settings, &cache, &runtime));
    }
    // The manifest as a whole: what `run` composes (chain, firewall).
    let mut refused = None;
    if let Some(spec) = &spec {
        // The same runtime and disk cache as the checks above: nothing is
        // calibrated or compiled a second time.
        let mut builder = msrwasm::Engine::builder()
            .runtime(runtime.clone())
            .filter(msrwasm::filter::RecordingFilter::default());
        if let Some(dir) = cache.disk_dir() {
            builder = builder.cache_dir(dir);
        }
        if spec.plugins.iter().any(|p| p.source.is_some()) {
            builder = builder.oci(oci.store()?);
        }
        match builder.build(spec.clone()) {
            Ok(engine) => engine.policy().filter().notes().iter().for_each(|n| err!("note: {n}")),
            Err(e) => refused = Some(msrwasm::tools::error_chain(&e)),
        }
    }
    if args.json {
        out!("{}\n", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            out!("{}", r.text());
        }
    }
    if let Some(e) = &refused {
        err!("manifest REFUSED: {}", msrwasm::tools::sanitize(e));
    }
    Ok(if refused.is_none() && reports.iter().all(|r| r.ok) {
        0
    } else {
        1
    })
}

fn test(args: TestArgs, cache: Option<PathBuf>, oci: &OciHome) -> Result<i32> {
    let spec = args.limits.spec()?;
    let mut settings = args.limits.settings(&args.plugin, spec.as_ref())?;
    oci.localize(&mut settings)?;
    let (mut passed, mut failed) = (0, 0);
    for case in &args.cases {
        let report = msrwasm::tools::run_script_cached(settings.clone(), case, cache.as_deref())?;
        for failure in &report.failures {
            out!("FAIL {failure}\n");
        }
        passed += report.passed;
        failed += report.failures.len();
    }
    out!("{passed} passed, {failed} failed\n");
    Ok(if failed == 0 { 0 } else { 1 })
}

fn push(args: PushArgs, cache: Option<PathBuf>, oci: &OciHome) -> Result<i32> {
    let target = reference(&args.reference)?;
    let bytes = msrwasm::tools::read_plugin_file(&args.file)?;
    let binary = msrwasm::tools::to_binary(&args.file, &bytes)?;
    // What `run` would refuse is not published.
    let runtime = msrwasm::tools::Runtime::shared();
    let compiled = match &cache {
        Some(dir) => msrwasm::tools::ModuleCache::with_disk(dir, &runtime),
        None => msrwasm::tools::ModuleCache::new(),
    };
    let stem = args
        .file
        .file_stem()
        .map_or("plugin".into(), |s| s.to_string_lossy().into_owned());
    let report = msrwasm::tools::check_cached(PluginSettings::new(stem, &args.file), &compiled);
    if !report.ok {
        out!("{}", report.text());
        bail!("{}: refused by check, not pushed", args.file.display());
    }
    let meta = msrwasm::tools::meta::read(&binary)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?
        .unwrap_or_default();
    let annotations = msrwasm::tools::annotations(&meta);
    let pushed = oci.store()?.push(&binary, annotations.clone(), &target)?;
    out!(
        "pushed {}\n  {} bytes, wasm sha256 {}\n",
        OciRef {
            digest: Some(pushed.manifest_digest.clone()),
            ..target.clone()
        },
        binary.len(),
        pushed.layer_digest.trim_start_matches("sha256:")
    );
    for (k, v) in &annotations {
        out!("  {k} = {}\n", msrwasm::tools::sanitize(v));
    }
    Ok(0)
}

fn pull(args: PullArgs, oci: &OciHome) -> Result<i32> {
    let source = reference(&args.reference)?;
    let output = args
        .output
        .unwrap_or_else(|| PathBuf::from(format!("{}.wasm", source.name())));
    // Before the download: a path that cannot take the plugin is refused now.
    msrwasm::tools::check_output(&output).context("-o")?;
    let pulled = oci.store()?.pull(&source)?;
    let bytes = msrwasm::tools::read_regular(&pulled.blob, msrwasm::tools::MAX_PLUGIN_BYTES)
        .with_context(|| format!("reading the cached {}", pulled.blob.display()))?;
    if msrwasm::tools::content_hash(&bytes) != pulled.sha256() {
        bail!(
            "{}: the cached layer changed while it was read; pull again",
            pulled.blob.display()
        );
    }
    msrwasm::tools::write_atomic(&output, &bytes).with_context(|| format!("writing {}", output.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Plugins are not secrets: the mode of a file one writes.
        let _ = std::fs::set_permissions(&output, std::fs::Permissions::from_mode(0o644));
    }
    out!(
        "pulled {} -> {}\n  {} bytes, wasm sha256 {}\n",
        OciRef {
            digest: Some(pulled.manifest_digest.clone()),
            ..source.clone()
        },
        output.display(),
        bytes.len(),
        pulled.sha256()
    );
    for (k, v) in &pulled.annotations {
        out!("  {} = {}\n", msrwasm::tools::sanitize(k), msrwasm::tools::sanitize(v));
    }
    Ok(0)
}

fn meta(args: MetaArgs) -> Result<i32> {
    use msrwasm::tools::meta;
    let bytes = msrwasm::tools::read_plugin_file(&args.plugin)?;
    let mut fields: BTreeMap<String, String> = meta::read(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.plugin.display()))?
        .unwrap_or_default();
    if args.set.is_empty() {
        if fields.is_empty() {
            out!("{}: no msrwasm.meta section\n", args.plugin.display());
        }
        for (k, v) in &fields {
            out!("{} = {}\n", msrwasm::tools::sanitize(k), msrwasm::tools::sanitize(v));
        }
        return Ok(0);
    }
    for field in &args.set {
        let (k, v) = field
            .split_once('=')
            .with_context(|| format!("--set {field}: expected KEY=VALUE"))?;
        fields.insert(k.trim().to_owned(), v.to_owned());
    }
    let out = meta::write(&bytes, &fields).map_err(|e| anyhow::anyhow!("{}: {e}", args.plugin.display()))?;
    // In place through a symbolic link (`current.wasm -> v3.wasm`): the
    // file it names is rewritten, the link stays.
    let target = match &args.output {
        Some(output) => output.clone(),
        None => std::fs::canonicalize(&args.plugin).with_context(|| format!("{}", args.plugin.display()))?,
    };
    let target = &target;
    msrwasm::tools::write_atomic_mode(target, &out, 0o644).with_context(|| format!("writing {}", target.display()))?;
    out!(
        "{}: msrwasm.meta set ({}), sha256 {}\n",
        target.display(),
        fields.keys().cloned().collect::<Vec<_>>().join(", "),
        msrwasm::tools::content_hash(&out)
    );
    Ok(0)
}

fn ctl(args: CtlArgs) -> Result<i32> {
    let read = |path: &PathBuf| {
        msrwasm::tools::read_regular(path, msrwasm::api::MAX_BODY as u64)
            .with_context(|| format!("reading {}", path.display()))
    };
    let (method, path, body) = match &args.command {
        CtlCommand::Top { interval, once } => {
            crate::top::run(&args.api_sock, std::time::Duration::from_secs_f64(*interval), *once)?;
            return Ok(0);
        }
        CtlCommand::Status => ("GET", "/v1/status", None),
        CtlCommand::Policy { manifest } => ("PUT", "/v1/policy", Some(read(manifest)?)),
        CtlCommand::Reload => ("POST", "/v1/reload", None),
        CtlCommand::State { file: None } => ("GET", "/v1/state", None),
        CtlCommand::State { file: Some(f) } => ("PUT", "/v1/state", Some(read(f)?)),
        CtlCommand::Footprint => ("GET", "/v1/footprint", None),
        CtlCommand::Metrics => ("GET", "/metrics", None),
    };
    let (status, text) = msrwasm::tools::request(&args.api_sock, method, path, body)
        .with_context(|| format!("API socket {}", args.api_sock.display()))?;
    // JSON comes back pretty-printed for people; metrics as they are.
    let shown = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or(text),
        Err(_) => text,
    };
    out!("{}\n", shown.trim_end());
    Ok(if (200..300).contains(&status) { 0 } else { 1 })
}

/// Refuses a generated plugin (a profile's, or one carrying templates) that `run` would refuse.
fn check_generated(name: &str, wat: &std::path::Path) -> Result<()> {
    let report = msrwasm::tools::check(PluginSettings::new(name, wat));
    match report.ok {
        true => Ok(()),
        false => bail!(
            "{}: the generated plugin is refused: {}",
            wat.display(),
            report.error.unwrap_or_default()
        ),
    }
}

fn read_footprint(footprint: &std::path::Path) -> Result<Vec<msrwasm::FootprintEntry>> {
    let bytes = msrwasm::tools::read_regular(footprint, 256 << 20)
        .with_context(|| format!("reading {}", footprint.display()))?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: not a footprint (run --footprint FILE writes one)",
            footprint.display()
        )
    })
}

fn policy(args: PolicyArgs) -> Result<i32> {
    use crate::profile::Profile;
    match args.command {
        PolicyCommand::Suggest { footprint } => {
            let entries = read_footprint(&footprint)?;
            out!(
                "{}",
                msrwasm::tools::suggest(&entries, &footprint.display().to_string())
            );
            Ok(0)
        }
        PolicyCommand::Profile { profile, out } => {
            let parsed = Profile::load(&profile)?;
            let dir = out.unwrap_or_else(|| profile.parent().map(|p| p.to_owned()).unwrap_or_default());
            for path in parsed.write(&dir)? {
                out!("{}\n", path.display());
            }
            check_generated(&parsed.name, &dir.join(format!("{}.wat", parsed.name)))?;
            Ok(0)
        }
        PolicyCommand::Record {
            footprint,
            out,
            name,
            action,
            msrs,
            values,
        } => {
            let entries = read_footprint(&footprint)?;
            let overrides = msrs.into_iter().collect();
            let values = values.as_deref().map(read_footprint).transpose()?;
            let profile = crate::profile::record(
                &entries,
                values.as_deref(),
                &name,
                &footprint.display().to_string(),
                action,
                &overrides,
            )?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let toml = out.join("profile.toml");
            msrwasm::tools::write_atomic_mode(&toml, profile.to_toml().as_bytes(), 0o644)
                .with_context(|| format!("writing {}", toml.display()))?;
            out!("{}\n", toml.display());
            for path in profile.write(&out)? {
                out!("{}\n", path.display());
            }
            check_generated(&profile.name, &out.join(format!("{}.wat", profile.name)))?;
            err!(
                "{} MSR(s) answered; try it: msrwasm run --manifest {} GUEST",
                profile.rows.len(),
                out.join("manifest.toml").display()
            );
            Ok(0)
        }
        PolicyCommand::ImportTemplate {
            template,
            manifest,
            plugin,
        } => {
            let (templates, ignored) = crate::profile::import_firecracker(&template)?;
            for what in ignored {
                err!("{}: {what}", template.display());
            }
            if templates.is_empty() {
                err!("{}: no msr_modifiers: the policy gets no template", template.display());
            }
            let source = template
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(out) = plugin {
                let stem = out
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let name = parse_profile_name(&stem)
                    .map_err(|e| anyhow::anyhow!("--plugin {}: the file name {e}", out.display()))?;
                let wat = crate::profile::templates_plugin(&templates, &name, &source);
                msrwasm::tools::write_atomic_mode(&out, wat.as_bytes(), 0o644)
                    .with_context(|| format!("writing {}", out.display()))?;
                check_generated(&name, &out)?;
                out!("{}\n", out.display());
                err!(
                    "push it (msrwasm push {} oci://REGISTRY/REPO:TAG) and follow the tag from each VM's manifest: \
                     [[plugin]] path = \"oci://...\", pull_policy = \"always\", grants = [\"templates\"], msrs = []",
                    out.display()
                );
                return Ok(0);
            }
            let templates = crate::profile::templates_manifest(&templates, &source);
            let (text, as_file) = match &manifest {
                Some(m) => {
                    let bytes =
                        msrwasm::tools::read_regular(m, 1 << 20).with_context(|| format!("reading {}", m.display()))?;
                    let base = String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8", m.display()))?;
                    (format!("{}\n{templates}", base.trim_end()), m.clone())
                }
                None => (templates, std::path::PathBuf::from("template.toml")),
            };
            PolicySpec::parse(&as_file, &text).context("the imported template does not load")?;
            out!("{text}");
            Ok(0)
        }
        PolicyCommand::Diff { a, b } => {
            let (x, y) = (read_footprint(&a)?, read_footprint(&b)?);
            let (text, changes) = crate::profile::diff(&x, &y, &a.display().to_string(), &b.display().to_string())?;
            out!("{text}");
            Ok(i32::from(changes > 0))
        }
    }
}
