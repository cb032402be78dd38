//! The `discotech` command: parse the command line, start logging, load the config, bind, and
//! hand over to the library; or talk to a running daemon over its admin socket.
//!
//! Exit codes: 0 ok; 1 runtime failure, or `status` found the daemon degraded (a source failing,
//! an update held); 2 the daemon refused the request (unknown service, bad reload); 64 bad config
//! or usage (EX_USAGE); 69 the daemon cannot be reached (EX_UNAVAILABLE); 71 cannot bind or
//! create state (EX_OSERR).

#![forbid(unsafe_code)]

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use discotech::config::Config;
use discotech::connect::hook_server;
use discotech::daemon::{self, Control, Listeners};
use discotech::discovery::source::config::SourceConfig;
use discotech::discovery::source::file::FileSource;
use discotech::ops::admin::Request;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

const EX_USAGE: u8 = 64;
const EX_OSERR: u8 = 71;

#[derive(Parser)]
#[command(
    name = "discotech",
    version,
    about = "Host-local service discovery: a stub DNS resolver with stable magic addresses, and connect-time load balancing"
)]
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
    /// Show the daemon's sources, held updates and drains (exit 1 when degraded).
    Status(cli::AdminArgs),
    /// List services with their magic addresses.
    Services(cli::AdminArgs),
    /// List a service's backends.
    Backends {
        service: String,
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// What a connect to a service (or magic address) would reach, and why.
    Resolve {
        name: String,
        /// The port the client connects to (selects a named port).
        #[arg(long, short)]
        port: Option<u16>,
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// Take a backend out of SRV answers and connect picks.
    Drain {
        service: String,
        addr: std::net::SocketAddr,
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// Put a drained backend back.
    Undrain {
        service: String,
        addr: std::net::SocketAddr,
        #[command(flatten)]
        admin: cli::AdminArgs,
    },
    /// Reload the daemon's config (as SIGHUP does); a bad config is refused and the running one kept.
    Reload(cli::AdminArgs),
    /// Run a program with the connect hook preloaded, so its connects to magic addresses reach
    /// real backends (like proxychains4 or torsocks).
    Run {
        /// The daemon's hook socket (default: from --config, else /run/discotech/hook.sock).
        #[arg(long, short)]
        socket: Option<PathBuf>,
        /// Read the hook socket and magic ranges from this config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config } => check(config),
        Command::Run {
            socket,
            config,
            command,
        } => run(socket, config, &command),
        Command::Status(a) => cli::admin(&a, &Request::Status),
        Command::Services(a) => cli::admin(&a, &Request::Services),
        Command::Backends { service, admin } => cli::admin(&admin, &Request::Backends { service }),
        Command::Resolve { name, port, admin } => {
            cli::admin(&admin, &Request::Resolve { name, port })
        }
        Command::Drain {
            service,
            addr,
            admin,
        } => cli::admin(&admin, &Request::Drain { service, addr }),
        Command::Undrain {
            service,
            addr,
            admin,
        } => cli::admin(&admin, &Request::Undrain { service, addr }),
        Command::Reload(a) => cli::admin(&a, &Request::Reload),
    }
}

fn run(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    command: &[std::ffi::OsString],
) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let Some(lib) = hook_server::find_hook_library() else {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.display().to_string()))
            .unwrap_or_else(|| "this executable's directory".into());
        eprintln!(
            "discotech: cannot find the connect hook {lib} (looked in ${env}, in {beside} and at {installed}).\n\
             Build it beside this binary with `cargo build --release --workspace` (or `cargo build -p discotech-hook` \
             for a debug build), install the Debian package, or set {env} to its path.",
            lib = hook_server::HOOK_LIBRARY_NAME,
            env = hook_server::HOOK_LIBRARY_ENV,
            installed = hook_server::INSTALLED_HOOK_LIBRARY,
        );
        return ExitCode::from(EX_USAGE);
    };
    let Some((program, args)) = command.split_first() else {
        eprintln!("discotech: run needs a command");
        return ExitCode::from(EX_USAGE);
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env(
        "LD_PRELOAD",
        hook_server::preload_env(&lib, std::env::var_os("LD_PRELOAD").as_deref()),
    );
    if let Some(path) = &config {
        let config = match load(Some(path.clone())) {
            Ok(c) => c,
            Err(code) => return code,
        };
        cmd.env("DISCOTECH_SOCKET", &config.hook.socket)
            .env("DISCOTECH_MAGIC_V4", config.dns.magic_v4.to_string());
        if let Some(v6) = config.dns.magic_v6 {
            cmd.env("DISCOTECH_MAGIC_V6", v6.to_string());
        }
    }
    if let Some(socket) = socket {
        cmd.env("DISCOTECH_SOCKET", socket);
    }
    // exec only returns on failure.
    let error = cmd.exec();
    eprintln!(
        "discotech: cannot run {}: {error}",
        program.to_string_lossy()
    );
    ExitCode::from(if error.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.as_deref()).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!(
            "discotech: the configuration has {} problem(s)",
            errors.0.len()
        );
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
    println!(
        "ok: {} source(s), {services} service(s)",
        config.sources.len()
    );
    ExitCode::SUCCESS
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DISCOTECH_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn,hickory_proto=warn,hickory_net=warn,zookeeper_async=off")),
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let control = Control::default();
        tokio::spawn(on_signal(control.shutdown.clone(), control.reloader()));
        match daemon::run(config, listeners, control).await {
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

/// Cancels `shutdown` on SIGTERM or SIGINT; asks for a reload on SIGHUP.
async fn on_signal(
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::Sender<discotech::ops::admin::ReloadRequest>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // The daemon logs the outcome; nobody waits for the reply here.
                let (tx, _rx) = tokio::sync::oneshot::channel();
                let _ = reload.send(tx).await;
            }
        }
    }
    shutdown.cancel();
}
