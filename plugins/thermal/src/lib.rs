//! thermal: Intel digital thermal sensor MSRs, which KVM does not model, so
//! guests that read temperatures (coretemp, turbostat, thermald) see a sane
//! package instead of #GP.
//!
//! - `MSR_TEMPERATURE_TARGET` (0x1a2): TjMax in bits 23:16. Read-only.
//! - `IA32_THERM_STATUS` (0x19c) and `IA32_PACKAGE_THERM_STATUS` (0x1b1):
//!   reading valid (bit 31) and the digital readout (bits 22:16, degrees
//!   below TjMax). Writes clear log bits on hardware; they are accepted.
//!
//! Config: `tj_max` (default 100 °C), `temp_c` (default 45 °C), and
//! `per_vcpu_c` (default 1): each vCPU's core runs that much warmer than
//! the one before it, so per-core readings differ as on real parts.
#![cfg_attr(target_arch = "wasm32", no_std)]

use msrwasm_sdk::{Decline, Plugin, config, export_plugin, plugin_meta, vcpu};

plugin_meta!(
    name = "thermal",
    version = "1.0.0",
    description = "Intel thermal status and TjMax MSRs",
    author = "msrwasm",
);

pub const MSR_TEMPERATURE_TARGET: u32 = 0x1a2;
pub const IA32_THERM_STATUS: u32 = 0x19c;
pub const IA32_PACKAGE_THERM_STATUS: u32 = 0x1b1;

const READING_VALID: u64 = 1 << 31;

#[derive(Default)]
pub struct Thermal {
    tj_max: u64,
    core_c: u64,
    package_c: u64,
}

/// Clamps a configured temperature to what the 7-bit readout can express.
fn celsius(value: i64) -> u64 {
    value.clamp(0, 127) as u64
}

impl Thermal {
    fn status(&self, temp_c: u64) -> u64 {
        READING_VALID | (self.tj_max.saturating_sub(temp_c).min(0x7f) << 16)
    }
}

impl Plugin for Thermal {
    const CLAIMS: &'static [(u32, u32)] = &[
        (IA32_THERM_STATUS, IA32_THERM_STATUS),
        (MSR_TEMPERATURE_TARGET, MSR_TEMPERATURE_TARGET),
        (IA32_PACKAGE_THERM_STATUS, IA32_PACKAGE_THERM_STATUS),
    ];

    fn init(&mut self) -> Result<(), i32> {
        self.tj_max = celsius(config("tj_max", 100));
        let temp = celsius(config("temp_c", 45));
        if temp > self.tj_max {
            return Err(1);
        }
        let step = celsius(config("per_vcpu_c", 1));
        self.package_c = temp;
        self.core_c = (temp + step * u64::from(vcpu())).min(self.tj_max);
        Ok(())
    }

    fn rdmsr(&mut self, index: u32) -> Result<u64, Decline> {
        match index {
            MSR_TEMPERATURE_TARGET => Ok(self.tj_max << 16),
            IA32_THERM_STATUS => Ok(self.status(self.core_c)),
            IA32_PACKAGE_THERM_STATUS => Ok(self.status(self.package_c)),
            _ => Err(Decline::Pass),
        }
    }

    fn wrmsr(&mut self, index: u32, _value: u64) -> Result<(), Decline> {
        match index {
            IA32_THERM_STATUS | IA32_PACKAGE_THERM_STATUS => Ok(()),
            MSR_TEMPERATURE_TARGET => Err(Decline::Fault),
            _ => Err(Decline::Pass),
        }
    }
}

export_plugin!(Thermal);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_degrees_below_tj_max() {
        let mut t = Thermal::default();
        t.init().unwrap();
        assert_eq!(t.rdmsr(MSR_TEMPERATURE_TARGET), Ok(100 << 16));
        assert_eq!(t.rdmsr(IA32_PACKAGE_THERM_STATUS), Ok(READING_VALID | (55 << 16)));
        assert_eq!(t.wrmsr(MSR_TEMPERATURE_TARGET, 0), Err(Decline::Fault));
        assert_eq!(t.rdmsr(0x10), Err(Decline::Pass));
    }
}
