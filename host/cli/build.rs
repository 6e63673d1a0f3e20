include!("guests/assemble.rs");

fn main() {
    let guests = std::path::Path::new("guests");
    assemble_guests(
        guests,
        guests,
        &[
            "demo",
            "msr_loop",
            "msr_forever",
            "example",
            "pvh.pvh",
            "pvh_reload.pvh",
        ],
    );
}
