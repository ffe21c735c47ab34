fn main() {
    std::process::exit(bhyve::cli::main());
}
