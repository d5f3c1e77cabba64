//! The `portcullis` binary: parse the command line, run the command, exit with its code.

fn main() {
    let code = portcullis::cli::main();
    std::process::exit(code);
}
