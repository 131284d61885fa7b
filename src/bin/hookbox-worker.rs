fn main() -> std::process::ExitCode {
    hookbox::cli::worker::main()
}
