//! The `bhyve` command: argv becomes a configuration tree ([`bhyve::cli`]), the tree a running
//! machine ([`bhyve::machine::run`]), and the machine's end bhyve's exit status.

use bhyve::cli::{parse_bhyve_args, Invocation};

fn main() {
    bhyve::logging::init();
    std::process::exit(run());
}

fn run() -> i32 {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match parse_bhyve_args(&args) {
        Err(e) => {
            eprint!("{}", e.text());
            e.status
        }
        Ok(Invocation::Exit {
            stdout,
            stderr,
            status,
        }) => {
            use std::io::Write;
            print!("{stdout}");
            eprint!("{stderr}");
            let _ = std::io::stdout().flush();
            status
        }
        Ok(Invocation::Run {
            config, restore, ..
        }) => bhyve::machine::run(&config, restore.as_deref()),
    }
}
