include!("guests/assemble.rs");

fn main() {
    assemble_guests(std::path::Path::new("guests"), &["demo", "msr_loop", "msr_forever"]);
}
