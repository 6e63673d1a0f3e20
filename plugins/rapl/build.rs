fn main() {
    // A 64 KiB shadow stack instead of rustc's 1 MiB keeps the module well
    // under the host's default memory_max_kib (1024).
    println!("cargo::rustc-link-arg-cdylib=-zstack-size=65536");
}
