//! The synthetic RAPL demo plugin in Rust: the same answers as
//! plugins/synthetic_rapl.wat, checked by tests/conformance.rs.
#![cfg_attr(target_arch = "wasm32", no_std)]

use msrwasm_sdk::{Decline, Plugin, config, export_plugin, now_ns, plugin_meta};

plugin_meta!(
    name = "rapl",
    version = "1.0.0",
    description = "RAPL package power telemetry (Rust)",
    author = "msrwasm",
);

#[derive(Default)]
pub struct Rapl {
    watts: i64,
}

impl Rapl {
    /// Energy units (2^-14 J) since the host started, low 32 bits.
    fn energy(&self) -> u64 {
        let us = now_ns() / 1000;
        (us.wrapping_mul(self.watts as u64).wrapping_mul(16384) / 1_000_000) & 0xffff_ffff
    }
}

impl Plugin for Rapl {
    const CLAIMS: &'static [(u32, u32)] = &[(0x606, 0x606), (0x610, 0x614)];

    fn init(&mut self) -> Result<(), i32> {
        self.watts = config("tdp_watts", 65);
        if self.watts > 0 { Ok(()) } else { Err(1) }
    }

    fn rdmsr(&mut self, index: u32) -> Result<u64, Decline> {
        match index {
            0x606 => Ok(0x000a_0e03),
            0x610 => Ok(((self.watts * 8) | 0x8000) as u64),
            0x611 => Ok(self.energy()),
            0x613 => Ok(0),
            0x614 => Ok(((self.watts * 8) & 0x7fff) as u64),
            _ => Err(Decline::Pass),
        }
    }

    fn wrmsr(&mut self, _index: u32, _value: u64) -> Result<(), Decline> {
        Err(Decline::Fault) // RAPL is read-only here
    }
}

export_plugin!(Rapl);

#[cfg(test)]
mod tests {
    use super::*;
    use msrwasm_sdk::testing;

    // Natively the SDK stands in for the host: config gives the default
    // (65 W) unless a test sets it, and the clock reads what the test sets.
    #[test]
    fn answers_from_config_and_refuses_writes() {
        let mut rapl = Rapl::default();
        rapl.init().unwrap();
        assert_eq!(rapl.rdmsr(0x610), Ok((65 * 8) | 0x8000));
        assert_eq!(rapl.rdmsr(0x611), Ok(0));
        assert_eq!(rapl.rdmsr(0x612), Err(Decline::Pass));
        assert_eq!(rapl.wrmsr(0x610, 1), Err(Decline::Fault));
    }

    #[test]
    fn energy_advances_with_the_clock() {
        // As in tests/conformance/rapl.case: 95 W for 1 s.
        testing::set_config("tdp_watts", 95);
        let mut rapl = Rapl::default();
        rapl.init().unwrap();
        testing::set_now_ns(1_000_000_000);
        assert_eq!(rapl.rdmsr(0x611), Ok(0x17c000));
    }
}
