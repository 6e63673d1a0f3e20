//! Plugins written with the guest SDKs, built from source with the real
//! toolchains, answering a live guest.

use msrwasm::PolicySpec;
use msrwasm::Unhandled;
use msrwasm_tests::{build_rust_plugin, guest, kvm_available, run};

#[test]
fn rust_sdk_thermal_plugin_answers_a_live_guest() {
    let wasm = build_rust_plugin("plugins/thermal", "thermal");
    if !kvm_available() {
        return;
    }
    let r = run(&guest("thermal.elf"), 1, PolicySpec::from_paths(&[wasm], Unhandled::Gp)).unwrap();
    r.expect_status(0);
    assert_eq!(r.report.stats.plugins["thermal"].handled, 4);
    assert_eq!(r.report.stats.plugins["thermal"].fault, 1);
    // the SDK's claim list put all three MSRs into the filter
    assert!(r.trace.iter().all(|t| t.reason == "filter"), "{:#?}", r.trace);
}
