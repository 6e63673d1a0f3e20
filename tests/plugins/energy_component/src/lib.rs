//! Answers 0x4d530000 with the host's package energy (µJ), 0x4d530001 with
//! the VM's CPU time (ns, or PASS while no vCPU was sampled) and 0x4d530002
//! with the domain mask, through the WIT `energy` interface.

wit_bindgen::generate!({
    path: "../../../guest-sdk/wit",
    world: "plugin-energy",
});

use exports::msrwasm::plugin::handler::{Guest, MsrRange, ReadResult, WriteResult};
use msrwasm::plugin::energy::{self, Domain, Who};

struct Energy;

impl Guest for Energy {
    fn init() -> Result<(), String> {
        Ok(())
    }

    fn claims() -> Option<Vec<MsrRange>> {
        Some(vec![MsrRange {
            first: 0x4d53_0000,
            last: 0x4d53_0002,
        }])
    }

    fn rdmsr(index: u32) -> ReadResult {
        let answer = match index {
            0x4d53_0000 => energy::energy_uj(Domain::Package, Who::Host),
            0x4d53_0001 => energy::cpu_ns(Who::Vm),
            0x4d53_0002 => Some(u64::from(energy::domains())),
            _ => None,
        };
        answer.map_or(ReadResult::Pass, ReadResult::Value)
    }

    fn wrmsr(_index: u32, _value: u64) -> WriteResult {
        WriteResult::Fault
    }
}

export!(Energy);
