//! The `discotech` command: parse the command line, start logging, load the config, bind, and
//! hand over to the library. Exit codes: 0 ok, 1 runtime failure, 64 bad config or usage (EX_USAGE),
//! 71 cannot bind or create state (EX_OSERR).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use discotech::config::{Config, SourceConfig};
use discotech::daemon::{self, Listeners};
use discotech::source::file::FileSource;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

const EX_USAGE: u8 = 64;
const EX_OSERR: u8 = 71;

#[derive(Parser)]
#[command(name = "discotech", version, about = "Host-local service discovery: a stub DNS resolver with stable magic addresses, and connect-time load balancing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: DNS for the service domains, forwarding for everything else.
    Serve {
        /// Config file (TOML). Without it, built-in defaults apply and ./zones is served if present.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the config and every zone file without binding anything.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config } => check(config),
    }
}

fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.as_deref()).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!("discotech: the configuration has {} problem(s)", errors.0.len());
        ExitCode::from(EX_USAGE)
    })
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut problems = 0;
    let mut services = 0;
    for source in &config.sources {
        match source {
            SourceConfig::File { path, .. } => {
                let scan = FileSource::new(path).scan();
                for p in &scan.problems {
                    eprintln!("{p}");
                }
                problems += scan.problems.len();
                services += scan.services.len();
            }
            // Remote sources are checked by their config alone; reaching them is the daemon's job.
            SourceConfig::Zookeeper(_) | SourceConfig::DnsSrv(_) => {}
        }
    }
    if problems > 0 {
        eprintln!("discotech: {problems} problem(s) in zone files");
        return ExitCode::from(EX_USAGE);
    }
    println!("ok: {} source(s), {services} service(s)", config.sources.len());
    ExitCode::SUCCESS
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DISCOTECH_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn,hickory_proto=warn,hickory_net=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let listeners = match Listeners::bind(&config) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        match daemon::run(config, listeners, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ daemon::DaemonError::StateDir { .. }) => {
                tracing::error!("{e}");
                ExitCode::from(EX_OSERR)
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}
