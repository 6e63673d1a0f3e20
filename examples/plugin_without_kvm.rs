//! Asking a plugin about MSRs without a VM: build an engine over
//! `plugins/synthetic_rapl.wat` with a config, and hand its dispatcher synthetic
//! accesses the way a vCPU's exits would arrive. Only the stable API is
//! used (no `/dev/kvm`, no `tools` feature): this is how a VMM's own tests
//! check a policy's answers on a machine without KVM.
//!
//! Run it:
//!
//! ```sh
//! cargo run -p msrwasm --example plugin_without_kvm
//! ```

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use msrwasm::filter::RecordingFilter;
use msrwasm::{Access, AnsweredBy, Dispatcher, Engine, ExitReason, NoKvm, PolicySpec, Reply, Unhandled};

const MSR_RAPL_POWER_UNIT: u32 = 0x606;
const MSR_PKG_ENERGY_STATUS: u32 = 0x611;
const MSR_PKG_POWER_LIMIT: u32 = 0x610;

fn read(vcpu: &mut Dispatcher, index: u32) -> Result<u64> {
    // A claimed MSR arrives with reason FILTER; NoKvm: no KVM to fall back to.
    let outcome = vcpu.handle(Access::read(index, ExitReason::Filter), &mut NoKvm);
    match (outcome.reply, outcome.by) {
        (Reply::Read(value), AnsweredBy::Plugin { .. }) => Ok(value),
        other => bail!("rdmsr {index:#x}: {other:?}"),
    }
}

fn main() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/synthetic_rapl.wat");
    let mut spec = PolicySpec::from_paths(&[path], Unhandled::Gp);
    spec.plugins[0].config.insert("tdp_watts".into(), 95);

    // Compiles, validates the ABI, runs init() and claim(); the filter the
    // claims need is recorded instead of programmed into KVM.
    let filter = RecordingFilter::default();
    let engine = Engine::builder().filter(filter.clone()).build(spec)?;
    let status = engine.status();
    println!("claims: {:?}", status.plugins[0].claims);
    let plans = filter.plans();
    let Some(plan) = plans.last() else {
        bail!("no filter plan was handed over")
    };
    println!(
        "KVM MSR filter: {} range(s) deflect the claims",
        plan.ranges(&[])?.windows.len()
    );

    let mut vcpu0 = engine.dispatcher(0);
    let unit = read(&mut vcpu0, MSR_RAPL_POWER_UNIT)?;
    let joules_per_unit = 1.0 / f64::from(1u32 << ((unit >> 8) & 0x1f));
    let before = read(&mut vcpu0, MSR_PKG_ENERGY_STATUS)?;
    std::thread::sleep(Duration::from_millis(200));
    let after = read(&mut vcpu0, MSR_PKG_ENERGY_STATUS)?;
    let watts = (after.wrapping_sub(before) & 0xffff_ffff) as f64 * joules_per_unit / 0.2;
    println!("energy counter advanced {before:#x} -> {after:#x}: about {watts:.0} W");
    if !(50.0..150.0).contains(&watts) {
        bail!("expected about 95 W from tdp_watts = 95, got {watts:.0} W");
    }

    // Writes to RAPL MSRs fault, as the plugin documents.
    let write = vcpu0.handle(Access::write(MSR_PKG_POWER_LIMIT, 0, ExitReason::Filter), &mut NoKvm);
    println!(
        "wrmsr {MSR_PKG_POWER_LIMIT:#x} -> {:?} ({})",
        write.reply,
        write.by.kind()
    );
    if write.reply != Reply::Gp {
        bail!("a write to the power limit must fault");
    }
    Ok(())
}
