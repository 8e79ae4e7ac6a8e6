//! `certyo-relay`: delivers the changes the MySQL/MariaDB and SQL Server companions capture
//! (`sql/mysql/`, `sql/sqlserver/`) to Certyo, writes the hash back and verifies anchoring,
//! with the same rules as certyo_cdc's worker (the shared `certyo` crate). Run next to the
//! database like any sidecar:
//!
//! ```sh
//! certyo-relay --config relay.toml check    # the config, each source, Certyo
//! certyo-relay --config relay.toml run      # deliver until SIGTERM
//! certyo-relay --config relay.toml run --metrics-addr 127.0.0.1:9187   # and serve /metrics
//! certyo-relay --config relay.toml status   # pending, delivered, dead letters, last error
//! ```

mod config;
mod metrics;
mod pump;
mod source;

use clap::{Parser, Subcommand};
use source::Source;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    version,
    about = "Delivers MySQL/MariaDB and SQL Server change queues to Certyo"
)]
struct Cli {
    /// The configuration file (TOML): [certyo] settings and one [[source]] per database.
    #[arg(
        long,
        short,
        default_value = "certyo-relay.toml",
        env = "CERTYO_RELAY_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration, connect to each source and to Certyo; exit 1 on any problem.
    Check,
    /// Deliver until SIGTERM or SIGINT (the batch in flight is finished and recorded first).
    Run {
        /// Serve Prometheus metrics (OpenMetrics text) on http://ADDR/metrics, e.g. 127.0.0.1:9187.
        #[arg(long, value_name = "ADDR", env = "CERTYO_RELAY_METRICS_ADDR")]
        metrics_addr: Option<String>,
    },
    /// Per source: pending, delivered, anchored, dead letters, last error.
    Status {
        /// One JSON object per source instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CERTYO_RELAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let key = std::env::var(config::API_KEY_VARIABLE).ok();
    let config = match config::load(&cli.config, key) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("certyo-relay: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Check => check(&config),
        Command::Run { metrics_addr } => run(config, metrics_addr.as_deref()),
        Command::Status { json } => status(&config, json),
    }
}

fn open(
    source: &config::Source,
    settings: &config::Certyo,
) -> Result<Box<dyn Source>, source::SourceError> {
    match source.kind {
        config::Kind::MySql => Ok(Box::new(source::mysql::MySqlQueue::new(
            &source.url,
            source.database.clone(),
            settings.write_back_lock_wait,
            settings.max_retry_interval,
        )?)),
        config::Kind::SqlServer => Ok(Box::new(source::sqlserver::SqlServer::connect(
            &source.url,
            source.mode,
            source.database.clone(),
        )?)),
    }
}

fn client(settings: &config::Certyo) -> Result<certyo::Client, String> {
    certyo::Client::new(certyo::ClientConfig {
        base_url: settings.base_url.clone(),
        api_key: settings.api_key.clone(),
        timeout: settings.request_timeout,
        max_rate_limit_retries: settings.max_rate_limit_retries,
        user_agent: concat!("certyo-relay/", env!("CARGO_PKG_VERSION")).into(),
    })
}

fn check(config: &config::Config) -> ExitCode {
    let mut ok = true;
    for s in &config.sources {
        match open(s, &config.certyo)
            .and_then(|mut source| source.check().map(|()| source.describe()))
        {
            Ok(at) => println!("ok   source {}: {at}", s.name),
            Err(e) => {
                ok = false;
                println!("FAIL source {}: {e}", s.name);
            }
        }
    }
    match client(&config.certyo).map(|c| probe_certyo(&c, &config.certyo.tenant_id)) {
        Ok(Ok(())) => println!("ok   Certyo at {}", config.certyo.base_url),
        Ok(Err(e)) | Err(e) => {
            ok = false;
            println!("FAIL Certyo at {}: {e}", config.certyo.base_url);
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Ask Certyo about a record that does not exist: any real answer proves the URL and the key;
/// 401/403/404 or no answer names the problem.
fn probe_certyo(client: &certyo::Client, tenant: &str) -> Result<(), String> {
    let request = certyo::VerifyRequest {
        tenant_id: tenant.to_string(),
        database: "certyo-relay".into(),
        collection: "check".into(),
        record_id: "check".into(),
        record_hash: "check".into(),
    };
    match client.verify(&request, &mut |_| false) {
        certyo::Verification::Failed(certyo::Outcome::Refused { status, body }) => Err(format!(
            "HTTP {status} ({body}): check the API key and base_url"
        )),
        certyo::Verification::Failed(certyo::Outcome::Transient(e)) => {
            Err(format!("no answer ({e})"))
        }
        _ => Ok(()),
    }
}

fn run(config: config::Config, metrics_addr: Option<&str>) -> ExitCode {
    let metrics = Arc::new(metrics::Metrics::new());
    if let Some(addr) = metrics_addr {
        // Bound before anything is delivered: an address in use is a configuration error.
        let served = std::net::TcpListener::bind(addr).and_then(|l| metrics.serve(l));
        if let Err(e) = served {
            eprintln!("certyo-relay: cannot serve metrics on {addr}: {e}");
            return ExitCode::from(2);
        }
        tracing::info!(addr, "serving metrics at /metrics");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            eprintln!("certyo-relay: cannot handle signal {signal}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut threads = Vec::new();
    for s in &config.sources {
        let source = match open(s, &config.certyo) {
            Ok(source) => source,
            Err(e) => {
                eprintln!("certyo-relay: source {}: {e}", s.name);
                return ExitCode::from(2);
            }
        };
        let client = match client(&config.certyo) {
            Ok(client) => client,
            Err(e) => {
                eprintln!("certyo-relay: {e}");
                return ExitCode::FAILURE;
            }
        };
        let pump = pump::Pump::new(
            s.name.clone(),
            source,
            config.certyo.clone(),
            client,
            stop.clone(),
            metrics.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("source {}", s.name))
            .spawn(move || pump.run());
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                eprintln!("certyo-relay: cannot start source {}: {e}", s.name);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    let mut failed = false;
    for thread in threads {
        failed |= thread.join().is_err();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn status(config: &config::Config, json: bool) -> ExitCode {
    let mut ok = true;
    for s in &config.sources {
        let found = open(s, &config.certyo).and_then(|mut source| source.status());
        match (found, json) {
            (Ok(st), true) => println!(
                "{}",
                serde_json::json!({
                    "source": s.name, "pending": st.pending, "delivered": st.delivered,
                    "anchored": st.anchored, "dead": st.dead, "last_error": st.last_error,
                    "not_written_back": st.not_written_back, "write_back_error": st.write_back_error,
                    "progress": st.progress, "lease": st.lease,
                })
            ),
            (Ok(st), false) => println!(
                "{}: pending {}, delivered {}, anchored {}, dead letters {}, not written back {}{}{}{}{}",
                s.name,
                st.pending,
                st.delivered,
                st.anchored,
                st.dead,
                st.not_written_back,
                st.write_back_error
                    .map(|e| format!(" (last write-back error: {e})"))
                    .unwrap_or_default(),
                st.progress
                    .map(|p| format!(", progress {p}"))
                    .unwrap_or_default(),
                st.lease.map(|l| format!(", lease {l}")).unwrap_or_default(),
                st.last_error
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            ),
            (Err(e), true) => {
                ok = false;
                println!(
                    "{}",
                    serde_json::json!({"source": s.name, "error": e.to_string()})
                )
            }
            (Err(e), false) => {
                ok = false;
                println!("{}: unavailable: {e}", s.name)
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
