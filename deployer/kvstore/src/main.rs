//! `kvstore` binary: see the library documentation.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((cmd, rest)) if cmd == "ping" => kvstore::ping(rest),
        _ => kvstore::settings(&args).and_then(|(listen, data)| kvstore::run(&listen, &data)),
    };
    if let Err(e) = result {
        eprintln!("kvstore: {e}");
        std::process::exit(1);
    }
}
