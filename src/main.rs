fn main() -> std::process::ExitCode {
    kproxy::run::main_entry()
}
