fn main() -> std::process::ExitCode {
    hookbox::cli::receiver::main()
}
