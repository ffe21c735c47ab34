fn main() {
    bhyve::logging::init();
    std::process::exit(bhyve::cli::main());
}
