// Assembles raw guests (`*.S`, GNU as syntax) with the system C compiler
// driver at build time, so that no prebuilt guest binary is committed.
// `include!`d by the build scripts of `host` and `tests`.

/// Assembles `dir/NAME.S` for each name into `$OUT_DIR/NAME.elf`
/// (long-mode ELF) or, for names ending in `.flat`, `$OUT_DIR/NAME.bin`
/// (flat real-mode binary), or, for names ending in `.pvh`,
/// `$OUT_DIR/NAME.elf` (a PVH guest, linked with `pvh.ld`, which keeps the
/// PVH entry note), with `guest.inc`, `pvh.inc` and the linker scripts
/// from `ld_dir` (`host/cli/guests`).
fn assemble_guests(dir: &std::path::Path, ld_dir: &std::path::Path, names: &[&str]) {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cc = std::env::var("MSRWASM_GUEST_CC").unwrap_or_else(|_| "cc".into());
    for name in names {
        let src = dir.join(format!("{name}.S"));
        let (script, target) = if let Some(stem) = name.strip_suffix(".flat") {
            (ld_dir.join("flat.ld"), out.join(format!("{stem}.bin")))
        } else if let Some(stem) = name.strip_suffix(".pvh") {
            (ld_dir.join("pvh.ld"), out.join(format!("{stem}.elf")))
        } else {
            (ld_dir.join("elf.ld"), out.join(format!("{name}.elf")))
        };
        println!("cargo::rerun-if-changed={}", src.display());
        println!("cargo::rerun-if-changed={}", script.display());
        let status = std::process::Command::new(&cc)
            .args(["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments"])
            .arg("-I")
            .arg(ld_dir)
            .arg("-T")
            .arg(&script)
            .arg("-o")
            .arg(&target)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run `{cc}` to assemble {}: {e} (install gcc or set MSRWASM_GUEST_CC)", src.display()));
        assert!(status.success(), "`{cc}` failed to assemble {}", src.display());
    }
    println!("cargo::rerun-if-changed={}", ld_dir.join("guest.inc").display());
    println!("cargo::rerun-if-changed={}", ld_dir.join("pvh.inc").display());
}
