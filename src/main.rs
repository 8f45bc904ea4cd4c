fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("trace") => kproxy::trace_cmd::main(args),
        Some("explain") => kproxy::explain::main(args),
        _ => kproxy::run::main_entry(),
    }
}
