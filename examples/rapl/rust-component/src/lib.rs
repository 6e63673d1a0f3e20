//! The synthetic RAPL demo plugin as a WebAssembly component (WIT world
//! `msrwasm:plugin/plugin`): the same answers as plugins/synthetic_rapl.wat.

use msrwasm_component_sdk::{self as msr, MsrRange, Plugin, ReadResult, WriteResult, export_plugin};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

msr::plugin_meta!(
    b"name = 'rapl'\nversion = '1.0.0'\ndescription = 'RAPL package power telemetry (Rust component)'\nauthor = 'msrwasm'\n"
);

/// Set by init from config; every vCPU has its own instance.
static WATTS: AtomicI64 = AtomicI64::new(65);

pub struct Rapl;

/// Energy units (2^-14 J) since the host started, low 32 bits.
fn energy(watts: i64) -> u64 {
    let us = msr::now_ns() / 1000;
    (us.wrapping_mul(watts as u64).wrapping_mul(16384) / 1_000_000) & 0xffff_ffff
}

impl Plugin for Rapl {
    fn init() -> Result<(), String> {
        let watts = msr::config("tdp_watts", 65);
        WATTS.store(watts, Relaxed);
        if watts > 0 {
            Ok(())
        } else {
            Err(format!("tdp_watts must be positive, not {watts}"))
        }
    }

    fn claims() -> Option<Vec<MsrRange>> {
        msr::claims(&[(0x606, 0x606), (0x610, 0x614)])
    }

    fn rdmsr(index: u32) -> ReadResult {
        let watts = WATTS.load(Relaxed);
        match index {
            0x606 => ReadResult::Value(0x000a_0e03),
            0x610 => ReadResult::Value(((watts * 8) | 0x8000) as u64),
            0x611 => ReadResult::Value(energy(watts)),
            0x613 => ReadResult::Value(0),
            0x614 => ReadResult::Value(((watts * 8) & 0x7fff) as u64),
            _ => ReadResult::Pass,
        }
    }

    fn wrmsr(_index: u32, _value: u64) -> WriteResult {
        WriteResult::Fault // RAPL is read-only here
    }
}

export_plugin!(Rapl);

#[cfg(test)]
mod tests {
    use super::*;

    // Natively the SDK stands in for the host: config gives the default
    // (65 W) and the clock reads 0.
    #[test]
    fn answers_from_config_and_refuses_writes() {
        Rapl::init().unwrap();
        assert_eq!(Rapl::rdmsr(0x610), ReadResult::Value((65 * 8) | 0x8000));
        assert_eq!(Rapl::rdmsr(0x611), ReadResult::Value(0));
        assert_eq!(Rapl::rdmsr(0x612), ReadResult::Pass);
        assert_eq!(Rapl::wrmsr(0x610, 1), WriteResult::Fault);
        assert_eq!(Rapl::claims().unwrap().len(), 2);
    }
}
