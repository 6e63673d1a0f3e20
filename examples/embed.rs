//! Embedding msrwasm: run a guest from your own Rust program, with plugins
//! composed in code instead of a manifest file, and read the report.
//!
//! Run it (needs /dev/kvm):
//!
//! ```sh
//! cargo run -p msrwasm --example embed
//! ```

use std::path::Path;

use anyhow::Result;
use msrwasm::policy::{PolicySpec, Unhandled};
use msrwasm::vm::{self, VmConfig};

fn main() -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The same policy a manifest would describe: plugins in chain order,
    // each with its settings, and what happens to unanswered accesses.
    let mut policy = PolicySpec::from_paths(
        &[repo.join("plugins/topology.wat"), repo.join("plugins/rapl.wat")],
        Unhandled::Log,
    );
    policy.plugins[0].config.insert("cores".into(), 8);
    policy.plugins[0].config.insert("threads".into(), 16);
    policy.plugins[1].config.insert("tdp_watts".into(), 125);

    // Any raw guest image works; this one is msrwasm's demo guest.
    let dir = tempfile::tempdir()?;
    let guest = dir.path().join("demo.elf");
    std::fs::write(&guest, msrwasm::demo::GUEST)?;

    let report = vm::run(VmConfig {
        vcpus: 2,
        mem_mib: 64,
        guest,
        policy,
        trace: None,
        serial: Box::new(std::io::stdout()),
        watch: false,
    })?;
    eprint!("{}", report.summary());
    for (plugin, counters) in &report.plugins {
        println!("{plugin}: {counters:?}");
    }
    std::process::exit(report.exit_status());
}
