//! Calling a plugin without a VM: load `plugins/rapl.wat`, give it a
//! config, and ask it about MSRs the way a vCPU would. This is how to check
//! a plugin's answers on a machine without /dev/kvm.
//!
//! Run it:
//!
//! ```sh
//! cargo run -p msrwasm --example plugin_without_kvm
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use msrwasm::ExitReason;
use msrwasm::tools::StateStore;
use msrwasm::tools::Answer;
use msrwasm::tools::Plugin;
use msrwasm::PluginSettings;
use msrwasm::tools::Runtime;

const MSR_RAPL_POWER_UNIT: u32 = 0x606;
const MSR_PKG_ENERGY_STATUS: u32 = 0x611;

fn read(instance: &mut msrwasm::tools::PluginInstance, index: u32) -> Result<u64> {
    match instance.rdmsr(index, ExitReason::Filter.bits())? {
        Answer::Handled(value) => Ok(value),
        other => bail!("rdmsr {index:#x} answered {other:?}"),
    }
}

fn main() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/rapl.wat");
    let mut settings = PluginSettings::new("rapl", path);
    settings.config.insert("tdp_watts".into(), 95);

    // Compiles, validates the ABI, runs init() and claim() on a probe instance.
    let plugin = Arc::new(Plugin::load(&Runtime::shared(), settings, &StateStore::default())?);
    println!("claims: {:x?}", plugin.claims().unwrap_or_default());

    let mut vcpu0 = plugin.instantiate(0)?;
    let unit = read(&mut vcpu0, MSR_RAPL_POWER_UNIT)?;
    let joules_per_unit = 1.0 / f64::from(1u32 << ((unit >> 8) & 0x1f));
    let before = read(&mut vcpu0, MSR_PKG_ENERGY_STATUS)?;
    std::thread::sleep(Duration::from_millis(200));
    let after = read(&mut vcpu0, MSR_PKG_ENERGY_STATUS)?;
    let watts = (after.wrapping_sub(before) & 0xffff_ffff) as f64 * joules_per_unit / 0.2;
    println!("energy counter advanced {before:#x} -> {after:#x}: about {watts:.0} W");

    // Writes to RAPL MSRs fault, as the plugin documents.
    println!("wrmsr 0x610 -> {:?}", vcpu0.wrmsr(0x610, 0, ExitReason::Filter.bits())?);
    Ok(())
}
