//! Replays the committed fuzz seed corpora (`fuzz/seeds/<target>/`) through the same checks the
//! libFuzzer targets run (`fuzz/oracles.rs`), on the stable toolchain, so every input a fuzzing
//! run kept stays a regression test in CI.

#[path = "../../fuzz/oracles.rs"]
mod oracles;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target}: {} fails", path.display());
        n += 1;
    }
    assert!(n >= 10, "{target}: only {n} seeds in {}", dir.display());
}

#[test]
fn path_seeds_pass() {
    replay("path", oracles::path);
}

#[test]
fn carrier_seeds_pass() {
    replay("carrier", oracles::carrier);
}

#[test]
fn credentials_seeds_pass() {
    replay("credentials", oracles::credentials);
}

#[test]
fn front_door_seeds_pass() {
    replay("front_door", oracles::front_door);
}

#[test]
fn config_seeds_pass() {
    replay("config", oracles::config);
}

#[test]
fn cookie_header_seeds_pass() {
    replay("cookie_header", oracles::cookie_header);
}

#[test]
fn plex_carrier_seeds_pass() {
    replay("plex_carrier", oracles::plex_carrier);
}
