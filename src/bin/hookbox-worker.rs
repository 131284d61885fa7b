fn main() -> std::process::ExitCode {
    hookbox::worker::main()
}
