fn main() -> std::process::ExitCode {
    hookbox::cli::main()
}
