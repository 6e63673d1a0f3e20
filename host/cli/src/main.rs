//! The `msrwasm` command line; the work happens in `msrwasm_cli` and the
//! `msrwasm` engine library.

fn main() {
    std::process::exit(msrwasm_cli::cli::main());
}
