#![no_main]

// Each target uses one of the shared checks.
#[allow(dead_code)]
#[path = "../oracles.rs"]
mod oracles;

libfuzzer_sys::fuzz_target!(|data: &[u8]| oracles::plex_carrier(data));
