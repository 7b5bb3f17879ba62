fn main() -> std::process::ExitCode {
    zest::cli::main()
}
