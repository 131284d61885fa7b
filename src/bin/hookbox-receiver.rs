fn main() -> std::process::ExitCode {
    hookbox::receiver::main()
}
