fn main() {
    eprintln!("bhyvectl: not implemented yet");
    std::process::exit(1);
}
