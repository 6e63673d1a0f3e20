fn main() {
    // A 64 KiB shadow stack instead of rustc's 1 MiB keeps the component's
    // memory inside the host's default memory_max_kib (1024).
    println!("cargo::rustc-link-arg-cdylib=-zstack-size=65536");
}
