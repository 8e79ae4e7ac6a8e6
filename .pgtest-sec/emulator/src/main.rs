//! `certyo-emulator [--port N | --bind HOST:PORT] [--api-key K] [--anchor-delay SECONDS]`: serve
//! the Certyo API (on 127.0.0.1 unless --bind says otherwise) until killed. Prints the base URL
//! on its first line.
use certyo_emulator::{Config, Emulator};
use std::time::Duration;

fn main() {
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--port" => config.bind = format!("127.0.0.1:{value}"),
            "--bind" => config.bind = value,
            "--api-key" => config.api_key = value,
            "--anchor-delay" => {
                let seconds: f64 = value
                    .parse()
                    .unwrap_or_else(|_| usage("--anchor-delay takes seconds"));
                config.anchor_delay = Duration::from_secs_f64(seconds);
            }
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    let emulator =
        Emulator::start(config).unwrap_or_else(|e| usage(&format!("cannot listen: {e}")));
    println!("{}", emulator.url());
    emulator.wait();
}

fn usage(problem: &str) -> ! {
    eprintln!("certyo-emulator: {problem}\nusage: certyo-emulator [--port N | --bind HOST:PORT] [--api-key K] [--anchor-delay SECONDS]");
    std::process::exit(2)
}
