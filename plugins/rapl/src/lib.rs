//! rapl: a virtual RAPL that gives the guest its share of the host's real
//! energy, for the Intel and the AMD interface, so that in-guest tools
//! (Linux's powercap drivers, turbostat, Kepler, Scaphandre) read watts.
//!
//! Needs the manifest's `grants = ["energy"]`: the host samples its powercap
//! counters on its own schedule and attributes each sampling period's energy
//! to each vCPU by that vCPU thread's share of the host's busy CPU time.
//!
//! | MSR | name | answer |
//! |---|---|---|
//! | `0x606` | `MSR_RAPL_POWER_UNIT` | `0xa0e03`: 1/8 W, 2^-14 J (61 µJ), 2^-10 s |
//! | `0x610` | `MSR_PKG_POWER_LIMIT` | PL1 = `tdp_watts`, enabled, locked |
//! | `0x611` | `MSR_PKG_ENERGY_STATUS` | the VM's package energy |
//! | `0x613` | `MSR_PKG_PERF_STATUS` | 0 (never throttled) |
//! | `0x614` | `MSR_PKG_POWER_INFO` | thermal spec power = `tdp_watts` |
//! | `0x619` | `MSR_DRAM_ENERGY_STATUS` | the VM's DRAM energy |
//! | `0x639` | `MSR_PP0_ENERGY_STATUS` | the VM's core energy (package scope, as on Intel) |
//! | `0x641` | `MSR_PP1_ENERGY_STATUS` | the VM's uncore energy |
//! | `0xc0010299` | `MSR_AMD_RAPL_POWER_UNIT` | `0xa1003`: 1/8 W, 2^-16 J (15.3 µJ), 2^-10 s |
//! | `0xc001029a` | `MSR_AMD_CORE_ENERGY_STATUS` | this vCPU's core energy (per core, as on AMD) |
//! | `0xc001029b` | `MSR_AMD_PKG_ENERGY_STATUS` | the VM's package energy |
//!
//! Energy counters are 32 bits in the unit of their power-unit MSR and
//! wrap as on hardware. A domain the host lacks (DRAM on most clients,
//! PP1 on servers) reads #GP, as an absent RAPL MSR does, so drivers skip
//! it. Every write is #GP (the limit is locked).
//!
//! Side channels (Platypus): a guest sees a counter that moves only when
//! the host samples (every 100 ms by default, never more often than every
//! 10 ms) and only in steps of `quantum_uj` (default 1000 µJ, at least 250,
//! at most 1,000,000); both are far coarser than the 20 kHz, 61 µJ readings
//! Platypus needed to tell instructions apart.
//!
//! Config: `tdp_watts` (default 65, 1..=4095), `quantum_uj` (see above),
//! `vendor`: 0 answers both interfaces (default), 1 only Intel's and 2 only
//! AMD's (the other vendor's MSRs read #GP, as on that hardware).
#![cfg_attr(target_arch = "wasm32", no_std)]

use msrwasm_sdk::energy::{self, Domain, Who};
use msrwasm_sdk::{Decline, Plugin, config, export_plugin, plugin_meta, vcpu};

plugin_meta!(
    name = "rapl",
    version = "1.0.0",
    description = "Virtual RAPL (Intel and AMD) from the host's real energy",
    author = "msrwasm",
);

pub const MSR_RAPL_POWER_UNIT: u32 = 0x606;
pub const MSR_PKG_POWER_LIMIT: u32 = 0x610;
pub const MSR_PKG_ENERGY_STATUS: u32 = 0x611;
pub const MSR_PKG_PERF_STATUS: u32 = 0x613;
pub const MSR_PKG_POWER_INFO: u32 = 0x614;
pub const MSR_DRAM_ENERGY_STATUS: u32 = 0x619;
pub const MSR_PP0_ENERGY_STATUS: u32 = 0x639;
pub const MSR_PP1_ENERGY_STATUS: u32 = 0x641;
pub const MSR_AMD_RAPL_POWER_UNIT: u32 = 0xc001_0299;
pub const MSR_AMD_CORE_ENERGY_STATUS: u32 = 0xc001_029a;
pub const MSR_AMD_PKG_ENERGY_STATUS: u32 = 0xc001_029b;

/// Power 1/2^3 W, energy 1/2^14 J, time 1/2^10 s (a common Intel value).
pub const INTEL_UNITS: u64 = 0x000a_0e03;
/// Power 1/2^3 W, energy 1/2^16 J, time 1/2^10 s (what AMD Zen reports).
pub const AMD_UNITS: u64 = 0x000a_1003;
const POWER_UNITS_PER_W: u64 = 8;

/// Default and bounds of `quantum_uj`.
pub const DEFAULT_QUANTUM_UJ: i64 = 1000;
pub const MIN_QUANTUM_UJ: i64 = 250;
pub const MAX_QUANTUM_UJ: i64 = 1_000_000;

#[derive(Default)]
pub struct Rapl {
    tdp_watts: u64,
    quantum_uj: u64,
    intel: bool,
    amd: bool,
}

impl Rapl {
    /// The energy counter of `domain` for `who` in units of 2^-`esu` J:
    /// #GP when the host lacks the domain, 0 for a vCPU not sampled yet.
    fn counter(&self, domain: Domain, who: Who, esu: u32) -> Result<u64, Decline> {
        if !energy::has(domain) {
            return Err(Decline::Fault);
        }
        let uj = energy::energy_uj(domain, who).unwrap_or(0);
        let uj = uj - uj % self.quantum_uj;
        let units = (u128::from(uj) << esu) / 1_000_000;
        Ok(units as u64 & 0xffff_ffff)
    }
}

impl Plugin for Rapl {
    const CLAIMS: &'static [(u32, u32)] = &[
        (MSR_RAPL_POWER_UNIT, MSR_RAPL_POWER_UNIT),
        (MSR_PKG_POWER_LIMIT, MSR_PKG_ENERGY_STATUS),
        (MSR_PKG_PERF_STATUS, MSR_PKG_POWER_INFO),
        (MSR_DRAM_ENERGY_STATUS, MSR_DRAM_ENERGY_STATUS),
        (MSR_PP0_ENERGY_STATUS, MSR_PP0_ENERGY_STATUS),
        (MSR_PP1_ENERGY_STATUS, MSR_PP1_ENERGY_STATUS),
        (MSR_AMD_RAPL_POWER_UNIT, MSR_AMD_PKG_ENERGY_STATUS),
    ];

    fn init(&mut self) -> Result<(), i32> {
        let tdp = config("tdp_watts", 65);
        let quantum = config("quantum_uj", DEFAULT_QUANTUM_UJ);
        if !(1..=4095).contains(&tdp) {
            return Err(1);
        }
        if !(MIN_QUANTUM_UJ..=MAX_QUANTUM_UJ).contains(&quantum) {
            return Err(2);
        }
        (self.intel, self.amd) = match config("vendor", 0) {
            0 => (true, true),
            1 => (true, false),
            2 => (false, true),
            _ => return Err(3),
        };
        self.tdp_watts = tdp as u64;
        self.quantum_uj = quantum as u64;
        Ok(())
    }

    fn rdmsr(&mut self, index: u32) -> Result<u64, Decline> {
        let tdp = self.tdp_watts * POWER_UNITS_PER_W;
        let amd_msr = index >= MSR_AMD_RAPL_POWER_UNIT;
        if (amd_msr && !self.amd) || (!amd_msr && !self.intel) {
            return match Self::CLAIMS.iter().any(|&(a, b)| (a..=b).contains(&index)) {
                true => Err(Decline::Fault),
                false => Err(Decline::Pass),
            };
        }
        match index {
            MSR_RAPL_POWER_UNIT => Ok(INTEL_UNITS),
            // PL1 = TDP, enabled (bit 15), clamped (bit 16); locked (bit 63).
            MSR_PKG_POWER_LIMIT => Ok(1 << 63 | 1 << 16 | 1 << 15 | tdp),
            MSR_PKG_ENERGY_STATUS => self.counter(Domain::Package, Who::Vm, 14),
            MSR_PKG_PERF_STATUS => Ok(0),
            MSR_PKG_POWER_INFO => Ok(tdp),
            MSR_DRAM_ENERGY_STATUS => self.counter(Domain::Dram, Who::Vm, 14),
            MSR_PP0_ENERGY_STATUS => self.counter(Domain::Core, Who::Vm, 14),
            MSR_PP1_ENERGY_STATUS => self.counter(Domain::Uncore, Who::Vm, 14),
            MSR_AMD_RAPL_POWER_UNIT => Ok(AMD_UNITS),
            MSR_AMD_CORE_ENERGY_STATUS => self.counter(Domain::Core, Who::Vcpu(vcpu()), 16),
            MSR_AMD_PKG_ENERGY_STATUS => self.counter(Domain::Package, Who::Vm, 16),
            _ => Err(Decline::Pass),
        }
    }

    fn wrmsr(&mut self, index: u32, _value: u64) -> Result<(), Decline> {
        match Self::CLAIMS.iter().any(|&(a, b)| (a..=b).contains(&index)) {
            true => Err(Decline::Fault),
            false => Err(Decline::Pass),
        }
    }
}

export_plugin!(Rapl);

#[cfg(test)]
mod tests {
    use super::*;
    use msrwasm_sdk::testing;

    fn rapl() -> Rapl {
        let mut r = Rapl::default();
        r.init().unwrap();
        r
    }

    #[test]
    fn counters_are_the_vm_share_in_units_quantised_and_32_bits_wide() {
        testing::reset();
        testing::set_energy_uj(Domain::Package, Who::Host, 900_000_000);
        testing::set_energy_uj(Domain::Package, Who::Vm, 1_234_567);
        testing::set_energy_uj(Domain::Core, Who::Host, 1);
        testing::set_energy_uj(Domain::Core, Who::Vcpu(0), 2_000_999);
        let mut r = rapl();
        // 1.234 J (quantised to 1 mJ) in 61 µJ units.
        assert_eq!(r.rdmsr(MSR_PKG_ENERGY_STATUS), Ok((1_234_000u64 << 14) / 1_000_000));
        assert_eq!(r.rdmsr(MSR_AMD_PKG_ENERGY_STATUS), Ok((1_234_000u64 << 16) / 1_000_000));
        assert_eq!(
            r.rdmsr(MSR_AMD_CORE_ENERGY_STATUS),
            Ok((2_000_000u64 << 16) / 1_000_000)
        );
        // A vCPU the host has not sampled yet reads 0; an absent domain #GP.
        testing::set_vcpu(1);
        assert_eq!(r.rdmsr(MSR_AMD_CORE_ENERGY_STATUS), Ok(0));
        assert_eq!(r.rdmsr(MSR_DRAM_ENERGY_STATUS), Err(Decline::Fault));
        assert_eq!(r.rdmsr(MSR_PP1_ENERGY_STATUS), Err(Decline::Fault));
        // 300 kJ: past 2^32 units of 61 µJ, the counter wraps.
        testing::set_energy_uj(Domain::Package, Who::Vm, 300_000_000_000);
        assert_eq!(
            r.rdmsr(MSR_PKG_ENERGY_STATUS),
            Ok(((300_000_000_000u128 << 14) / 1_000_000) as u64 & 0xffff_ffff)
        );
    }

    #[test]
    fn units_limits_and_writes_are_as_on_hardware() {
        testing::reset();
        testing::set_config("tdp_watts", 95);
        let mut r = rapl();
        assert_eq!(r.rdmsr(MSR_RAPL_POWER_UNIT), Ok(0xa0e03));
        assert_eq!(r.rdmsr(MSR_AMD_RAPL_POWER_UNIT), Ok(0xa1003));
        assert_eq!(r.rdmsr(MSR_PKG_POWER_INFO), Ok(95 * 8));
        assert_eq!(r.rdmsr(MSR_PKG_POWER_LIMIT).map(|v| v & 0x7fff), Ok(95 * 8));
        assert_eq!(r.wrmsr(MSR_PKG_POWER_LIMIT, 0), Err(Decline::Fault));
        assert_eq!(r.wrmsr(MSR_AMD_CORE_ENERGY_STATUS, 0), Err(Decline::Fault));
        assert_eq!(r.wrmsr(0x10, 0), Err(Decline::Pass));
        assert_eq!(r.rdmsr(0x10), Err(Decline::Pass));
    }

    #[test]
    fn a_vendor_answers_only_its_own_interface() {
        testing::reset();
        testing::set_energy_uj(Domain::Package, Who::Host, 1);
        testing::set_config("vendor", 1);
        let mut r = rapl();
        assert_eq!(r.rdmsr(MSR_RAPL_POWER_UNIT), Ok(INTEL_UNITS));
        assert_eq!(r.rdmsr(MSR_AMD_RAPL_POWER_UNIT), Err(Decline::Fault));
        assert_eq!(r.rdmsr(MSR_AMD_PKG_ENERGY_STATUS), Err(Decline::Fault));
        testing::set_config("vendor", 2);
        let mut r = rapl();
        assert_eq!(r.rdmsr(MSR_RAPL_POWER_UNIT), Err(Decline::Fault));
        assert_eq!(r.rdmsr(MSR_AMD_PKG_ENERGY_STATUS), Ok(0));
        assert_eq!(r.rdmsr(0x10), Err(Decline::Pass));
        testing::set_config("vendor", 3);
        assert_eq!(Rapl::default().init(), Err(3));
    }

    #[test]
    fn config_out_of_its_safe_bounds_refuses_the_load() {
        testing::reset();
        testing::set_config("quantum_uj", 1);
        assert_eq!(Rapl::default().init(), Err(2));
        testing::set_config("quantum_uj", 1000);
        testing::set_config("tdp_watts", 0);
        assert_eq!(Rapl::default().init(), Err(1));
    }
}
