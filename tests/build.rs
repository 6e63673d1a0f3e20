include!("../host/cli/guests/assemble.rs");

fn main() {
    // Every test guest in guests/ (names ending in .flat become flat binaries).
    let mut names: Vec<String> = std::fs::read_dir("guests")
        .expect("tests/guests")
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".S")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    println!("cargo::rerun-if-changed=guests");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ld_dir = std::path::Path::new("../host/cli/guests");
    assemble_guests(std::path::Path::new("guests"), ld_dir, &names);
    assemble_guests(ld_dir, ld_dir, &["msr_loop", "msr_forever"]);
    // The guest profiles' replay guests.
    for os in ["windows", "macos", "linux"] {
        let dir = std::path::PathBuf::from(format!("../plugins/profiles/{os}"));
        assemble_guests(&dir, ld_dir, &[&format!("{os}_replay")]);
    }
    println!(
        "cargo::rustc-env=MSRWASM_TEST_GUESTS={}",
        std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")
    );
}
