//! The `msrwasm` command line; the work happens in the library.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
