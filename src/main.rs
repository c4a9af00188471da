#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    rekey::cli::main()
}
