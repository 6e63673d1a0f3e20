include!("../host/guests/assemble.rs");

fn main() {
    assemble_guests(
        std::path::Path::new("guests"),
        &[
            "selftest_allow",
            "selftest_deny",
            "selftest_bitmap",
            "gp_idt",
            "multi_vcpu",
            "triple_fault",
            "realmode.flat",
            "thermal",
        ],
    );
    assemble_guests(std::path::Path::new("../host/guests"), &["msr_loop"]);
    println!(
        "cargo::rustc-env=MSRWASM_TEST_GUESTS={}",
        std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")
    );
}
