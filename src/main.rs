//! The `portcullis` binary: parse the command line, run the command, exit with its code.

// Every proxied response allocates and frees buffers; glibc's allocator handles that pattern
// poorly (measured on the 1 KiB proxy benchmark: about 17-20 µs of CPU per request saved).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    portcullis::disable_transparent_huge_pages();
    let code = portcullis::cli::main();
    std::process::exit(code);
}
