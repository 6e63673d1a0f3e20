//! Command-line parsing and the glue from arguments to library calls.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use msrwasm::policy::{PolicySpec, Unhandled};
use msrwasm::vm::{self, VmConfig};

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
    /// result); `debug` also prints every MSR access with the plugin and
    /// plugin version that answered it.
    #[arg(long, global = true, default_value = "warn", env = "MSRWASM_LOG")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a raw guest image (ELF64 or flat binary) on KVM.
    ///
    /// Serial output (COM1) goes to standard output; msrwasm's own messages
    /// and the closing summary go to standard error. Exit status: the value
    /// the guest wrote to port 0xf4, 0 when every vCPU halted, 1 when a vCPU
    /// crashed (triple fault, KVM error), 2 for bad arguments or a refused
    /// plugin/manifest, 130/143 on SIGINT/SIGTERM.
    Run(RunArgs),
    /// Boot the built-in demo guest on 2 vCPUs, answered by built-in plugins.
    Demo(DemoArgs),
    /// Measure what plugins cost: wasm vs a native handler on the same
    /// guest loop, the dispatcher alone, 1 vs 2 vCPUs, and hot-reload
    /// latency on a running VM.
    ///
    /// Build with --release for meaningful figures. Prints a table, or
    /// JSON with --json.
    Bench(BenchArgs),
    /// Validate plugins without a VM: ABI version, export signatures,
    /// imports, claims, whether init succeeds, metadata. Exits non-zero if
    /// any plugin would be refused. For plugin authors' CI.
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
    /// vCPU, then HLT), msr_forever.elf (RDMSR 0x4d530020 until stopped).
    Guests(GuestsArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// Plugin files (.wasm or .wat).
    #[arg(required = true)]
    plugins: Vec<PathBuf>,
    /// A `[plugin.config]` value for init, as NAME=VALUE; repeatable.
    #[arg(long, value_parser = parse_config)]
    config: Vec<(String, i64)>,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TestArgs {
    /// The plugin file (.wasm or .wat).
    plugin: PathBuf,
    /// The script of accesses and expected answers.
    #[arg(long = "case", required = true)]
    cases: Vec<PathBuf>,
    /// A `[plugin.config]` value, as NAME=VALUE; repeatable (script
    /// `config` lines override it).
    #[arg(long, value_parser = parse_config)]
    config: Vec<(String, i64)>,
}

fn parse_config(s: &str) -> Result<(String, i64), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    let value = value
        .parse::<i64>()
        .ok()
        .or_else(|| msrwasm::manifest_number(value).map(|v| v as i64))
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
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1000..))]
    dispatches: u64,
    /// Plugin versions swapped into a running VM for the reload latency.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    swaps: u64,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Number of vCPUs, each on its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(vm::MAX_VCPUS)))]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = vm::DEFAULT_MEM_MIB, value_parser = clap::value_parser!(u64).range(vm::MIN_MEM_MIB..=vm::MAX_MEM_MIB))]
    mem: u64,
    /// VM manifest (TOML) composing the plugins; see shared/spec/manifest.md.
    #[arg(long, conflicts_with_all = ["plugin", "unhandled"])]
    manifest: Option<PathBuf>,
    /// A plugin (.wasm or .wat) to add to the chain; repeat for more, asked
    /// in the order given.
    #[arg(long)]
    plugin: Vec<PathBuf>,
    /// What happens to an MSR access no plugin answers: gp injects #GP (as
    /// KVM does), ignore reads 0 and drops writes, log is ignore plus one log
    /// line per distinct MSR.
    #[arg(long, value_enum)]
    unhandled: Option<Unhandled>,
    /// Write one JSON line per MSR access to this file.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Do not watch the manifest and plugin files. By default a changed
    /// file is validated and, if good, takes over on the running VM at each
    /// vCPU's next MSR exit; a bad one is refused and the running version
    /// stays.
    #[arg(long)]
    no_watch: bool,
    /// The guest image.
    guest: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
    /// Write the demo's trace (one JSON line per MSR access) to this file.
    #[arg(long)]
    trace: Option<PathBuf>,
}

/// Exit status for bad input: arguments, files, manifests, plugins.
const STATUS_USAGE: i32 = 2;

pub fn main() -> i32 {
    let cli = Cli::parse();
    // A bare level is msrwasm's; dependencies (cranelift is chatty) stay at warn.
    let directives = match cli.log.as_str() {
        level @ ("error" | "warn" | "info" | "debug" | "trace") => format!("warn,msrwasm={level}"),
        other => other.to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
        Command::Bench(args) => bench(args),
        Command::Guests(args) => guests(args),
        Command::Check(args) => check(args),
        Command::Meta(args) => meta(args),
        Command::Test(args) => test(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("msrwasm: error: {e:#}");
        STATUS_USAGE
    })
}

fn run(args: RunArgs) -> Result<i32> {
    let policy = match &args.manifest {
        Some(path) => PolicySpec::from_manifest(path)?,
        None => PolicySpec::from_paths(&args.plugin, args.unhandled.unwrap_or_default()),
    };
    let config = VmConfig {
        vcpus: args.vcpus,
        mem_mib: args.mem,
        guest: args.guest,
        policy,
        trace: args.trace,
        serial: Box::new(std::io::stdout()),
        watch: !args.no_watch,
    };
    run_vm(config)
}

fn run_vm(config: VmConfig) -> Result<i32> {
    vm::install_termination_handlers();
    let report = vm::run(config)?;
    if let vm::VmEnd::Crash(crash) = &report.end {
        eprintln!("msrwasm: {crash}");
    }
    eprint!("{}", report.summary());
    Ok(report.exit_status())
}

fn demo(args: DemoArgs) -> Result<i32> {
    let demo = msrwasm::demo::Demo::prepare().context("preparing the demo")?;
    eprintln!("{}", demo.describe());
    let config = demo.config(args.trace, Box::new(std::io::stdout()))?;
    run_vm(config)
}

fn bench(args: BenchArgs) -> Result<i32> {
    let options = msrwasm::bench::BenchOptions {
        rounds: args.rounds as usize,
        dispatches: args.dispatches,
        swaps: args.swaps as usize,
    };
    let report = msrwasm::bench::run(options, |what| eprintln!("msrwasm bench: {what}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(0)
}

fn guests(args: GuestsArgs) -> Result<i32> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    for (name, bytes) in [
        ("demo.elf", msrwasm::demo::GUEST),
        ("msr_loop.elf", msrwasm::bench::LOOP_GUEST),
        ("msr_forever.elf", msrwasm::bench::FOREVER_GUEST),
    ] {
        let path = args.dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(0)
}

fn check(args: CheckArgs) -> Result<i32> {
    let config = args.config.into_iter().collect();
    let reports: Vec<_> = args.plugins.iter().map(|p| msrwasm::check::check(p, &config)).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print!("{}", r.text());
        }
    }
    Ok(if reports.iter().all(|r| r.ok) { 0 } else { 1 })
}

fn test(args: TestArgs) -> Result<i32> {
    let config: std::collections::BTreeMap<_, _> = args.config.into_iter().collect();
    let (mut passed, mut failed) = (0, 0);
    for case in &args.cases {
        let report = msrwasm::script::run(&args.plugin, case, config.clone())?;
        for failure in &report.failures {
            println!("FAIL {failure}");
        }
        passed += report.passed;
        failed += report.failures.len();
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { 0 } else { 1 })
}

fn meta(args: MetaArgs) -> Result<i32> {
    use msrwasm::plugin::meta;
    let bytes = msrwasm::plugin::read_plugin_file(&args.plugin)?;
    let mut fields = meta::read(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.plugin.display()))?
        .unwrap_or_default();
    if args.set.is_empty() {
        if fields.is_empty() {
            println!("{}: no msrwasm.meta section", args.plugin.display());
        }
        for (k, v) in &fields {
            println!("{k} = {v}");
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
    let target = args.output.as_ref().unwrap_or(&args.plugin);
    std::fs::write(target, out).with_context(|| format!("writing {}", target.display()))?;
    Ok(0)
}
