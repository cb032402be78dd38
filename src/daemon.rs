//! `discotech serve`: binds the sockets, restores state, starts the sources, the registry and the
//! DNS server, and runs until the shutdown token is cancelled. `run` takes already-bound sockets so
//! tests can bind port 0 and run a whole daemon in-process.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, DnsConfig};
use crate::connect::hook_server::{self, HookServerConfig};
use crate::discovery::guard::Guard;
use crate::discovery::magic::MagicMap;
use crate::discovery::registry::{Command, Registry, RegistryHandle, StatePaths, unix_now};
use crate::discovery::snapshot::{self, Snapshot};
use crate::discovery::source::SourceEvent;
use crate::discovery::source::config::SourceConfig;
use crate::discovery::source::file::FileSource;
use crate::dns::server::{DnsHandler, DnsState};
use crate::dns::udp;
use crate::ops::admin::{self, AdminContext, ReloadRequest};
use crate::state;
use crate::upstream::forward::{ForwardConfig, Forwarder};

/// How long in-flight work gets to finish after shutdown is requested.
const GRACE: Duration = Duration::from_secs(5);
/// How long a TCP client may sit idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot bind {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("DNS server: {0}")]
    Server(String),
    #[error("cannot bind {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// hickory-server wants to own its handler; ours is shared with the UDP workers.
struct SharedHandler(Arc<DnsHandler>);

#[async_trait::async_trait]
impl hickory_server::server::RequestHandler for SharedHandler {
    async fn handle_request<
        R: hickory_server::server::ResponseHandler,
        T: hickory_server::net::runtime::Time,
    >(
        &self,
        request: &hickory_server::server::Request,
        response: R,
    ) -> hickory_server::server::ResponseInfo {
        self.0.handle_request::<R, T>(request, response).await
    }
}

/// Binds a unix socket, replacing a stale socket file but never a live daemon's socket.
/// The hook socket is 0666 (every user's hooked programs may ask; the hook checks who owns the
/// daemon end); the admin socket 0660 (root and the socket's group).
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .and_then(|()| state::check_private_dir(dir))
            .map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something that is not a socket is there: move it away or choose another path",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon is listening on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(err)?;
    Ok(listener)
}

/// The receive buffer asked for on each DNS UDP socket, like unbound's `so-rcvbuf`.
pub const DNS_UDP_RECV_BUFFER: usize = 4 << 20;

/// The daemon's sockets, bound before `run` so that tests can use port 0.
#[derive(Debug)]
pub struct Listeners {
    pub dns_udp: Vec<UdpSocket>,
    pub dns_tcp: Vec<TcpListener>,
    /// The hook socket; `None` runs without one (DNS only).
    pub hook: Option<UnixListener>,
    /// The admin socket; `None` runs without one.
    pub admin: Option<UnixListener>,
    /// `/metrics` and the status page.
    pub http: Vec<TcpListener>,
}

impl Listeners {
    /// Binds UDP and TCP on every configured DNS address.
    ///
    /// # Errors
    /// The first address that cannot be bound, with the protocol and the OS error.
    pub fn bind(config: &Config) -> Result<Self, DaemonError> {
        let mut l = Self {
            dns_udp: Vec::new(),
            dns_tcp: Vec::new(),
            hook: Some(bind_unix(&config.hook.socket, 0o666)?),
            admin: Some(bind_unix(&config.admin.socket, 0o660)?),
            http: Vec::new(),
        };
        for addr in &config.metrics_listen {
            l.http
                .push(TcpListener::bind(addr).map_err(|source| DaemonError::Bind {
                    proto: "tcp (metrics)",
                    addr: *addr,
                    source,
                })?);
        }
        for addr in &config.dns.listen {
            let udp = UdpSocket::bind(addr).map_err(|source| DaemonError::Bind {
                proto: "udp",
                addr: *addr,
                source,
            })?;
            // A queue that holds a stall of the UDP thread at high rates (the kernel default
            // holds about 10 ms at 20k queries/s); the kernel caps it at net.core.rmem_max.
            if let Err(error) =
                socket2::SockRef::from(&udp).set_recv_buffer_size(DNS_UDP_RECV_BUFFER)
            {
                warn!(%addr, %error, "cannot enlarge the DNS socket's receive buffer");
            }
            // Port 0 means "any": TCP must then share the port UDP got.
            let tcp_addr = udp.local_addr().unwrap_or(*addr);
            let tcp = TcpListener::bind(tcp_addr).map_err(|source| DaemonError::Bind {
                proto: "tcp",
                addr: tcp_addr,
                source,
            })?;
            l.dns_udp.push(udp);
            l.dns_tcp.push(tcp);
        }
        Ok(l)
    }

    pub fn dns_addrs(&self) -> Vec<SocketAddr> {
        self.dns_udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

/// How the daemon is driven from outside: shutdown, and reload requests (SIGHUP, `discotech reload`).
#[derive(Debug)]
pub struct Control {
    pub shutdown: CancellationToken,
    reload_tx: mpsc::Sender<ReloadRequest>,
    reload_rx: mpsc::Receiver<ReloadRequest>,
}

impl Default for Control {
    fn default() -> Self {
        let (reload_tx, reload_rx) = mpsc::channel(4);
        Self {
            shutdown: CancellationToken::new(),
            reload_tx,
            reload_rx,
        }
    }
}

impl Control {
    /// A handle to ask for reloads with.
    pub fn reloader(&self) -> mpsc::Sender<ReloadRequest> {
        self.reload_tx.clone()
    }
}

/// Runs the daemon until `control.shutdown` is cancelled, reloading its config when asked.
///
/// # Errors
/// The state directory cannot be created, or the DNS server fails to start.
pub async fn run(
    mut config: Config,
    listeners: Listeners,
    control: Control,
) -> Result<(), DaemonError> {
    let Control {
        shutdown,
        reload_tx,
        mut reload_rx,
    } = control;
    let started = std::time::Instant::now();
    // Hook peers, DNS over TCP and upstream queries all take descriptors: use what the hard
    // limit allows (the unit sets LimitNOFILE), and keep a reserve from hook peers.
    match discotech_shm::raise_nofile() {
        Ok(limit) => info!(limit, "open descriptor limit"),
        Err(errno) => warn!(errno, "cannot raise the open descriptor limit"),
    }
    let dir = &config.state.dir;
    std::fs::create_dir_all(dir)
        .and_then(|()| state::check_private_dir(dir))
        .map_err(|source| DaemonError::StateDir {
            path: dir.clone(),
            source,
        })?;

    let mut magic = MagicMap::new(
        config.dns.magic_v4,
        config.dns.magic_v6,
        config.state.quarantine,
    );
    let magic_path = dir.join("magic.json");
    match std::fs::read(&magic_path) {
        Ok(bytes) => match magic.restore(&bytes) {
            Ok(warnings) => warnings.iter().for_each(|w| warn!("{w}")),
            Err(e) => {
                let aside = state::set_aside(&magic_path);
                warn!(path = %magic_path.display(), error = %e, aside = ?aside.ok(), "magic address map is corrupt; set aside, addresses will be derived afresh");
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %magic_path.display(), error = %e, "cannot read the magic address map")
        }
    }

    let shared = snapshot::shared(Snapshot::default());
    let names = config
        .sources
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    let backends_path = dir.join("backends.json");
    let paths = StatePaths {
        magic: Some(magic_path),
        backends: Some(backends_path.clone()),
    };
    let mut registry = Registry::new(
        names,
        Guard::new(config.guard),
        magic,
        paths,
        shared.clone(),
    );
    registry.set_health(config.health);
    let health_targets = registry.targets();
    // The shared routing table hooks pick from: every swap is published into it at once.
    let hook_cfg = HookServerConfig {
        socket: config.hook.socket.clone(),
        fallback_file: Some(hook_server::fallback_path_for(&config.hook.socket)),
        zone: config.balance.zone.clone(),
        local_min_share: config.balance.local_min_share,
        magic_v4: config.dns.magic_v4,
        magic_v6: config.dns.magic_v6,
        ..HookServerConfig::default()
    };
    let balance = listeners
        .hook
        .is_some()
        .then(|| hook_server::BalanceHandle::new(&hook_cfg));
    if let Some(handle) = &balance {
        let table = handle.table().clone();
        registry.on_swap(Arc::new(move |snap| table.publish(snap)));
    }
    let catch = match (&balance, config.catch.off) {
        (_, true) => {
            crate::connect::catch::Catch::Off("off in the config ([catch] mode = \"off\")".into())
        }
        (None, false) => {
            crate::connect::catch::Catch::Off("no hook socket, so no routing table".into())
        }
        (Some(_), false) => {
            match crate::connect::catch::Catcher::start(
                config.dns.magic_v4,
                config.catch.cgroup.as_deref(),
            ) {
                Ok(c) => crate::connect::catch::Catch::On(Arc::new(c)),
                Err(error) => {
                    warn!(%error, "not catching connects that bypass the hook: programs the hook cannot enter (Go, static binaries) get no answer at magic addresses");
                    crate::connect::catch::Catch::Off(error.to_string())
                }
            }
        }
    };
    // Serve the last-known-good state before any source speaks: a registry that is down at
    // start-up must not mean an empty service domain.
    match std::fs::read(&backends_path) {
        Ok(bytes) => match registry.restore(&bytes, unix_now()) {
            Ok(n) => {
                info!(services = n, path = %backends_path.display(), "restored last-known-good state")
            }
            Err(e) => {
                let aside = state::set_aside(&backends_path);
                warn!(path = %backends_path.display(), error = %e, aside = ?aside.ok(), "last-known-good state is corrupt; set aside, starting from the sources alone");
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %backends_path.display(), error = %e, "cannot read the last-known-good state")
        }
    }
    // Scan file sources once before answering, so the first query already sees every service.
    for (index, source) in config.sources.iter().enumerate() {
        if let SourceConfig::File { path, .. } = source {
            let scan = FileSource::new(path).scan();
            for p in &scan.problems {
                warn!(source = %source.name(), "{p}");
            }
            if scan.readable {
                registry.apply(
                    SourceEvent::Reset {
                        source: index,
                        services: scan.services,
                    },
                    unix_now(),
                );
            }
        }
    }

    let tracker = TaskTracker::new();
    if let (crate::connect::catch::Catch::On(c), Some(handle)) = (&catch, &balance) {
        tracker.spawn(c.clone().run(handle.table().clone(), shutdown.clone()));
    }
    if let Some(handle) = &balance {
        tracker.spawn(crate::connect::on_remove::run(
            handle.table().clone(),
            shutdown.clone(),
        ));
    }
    let (events, events_rx) = mpsc::channel::<SourceEvent>(64);
    // Room for bursts of health changes and ejections: the hook server drops an ejection it
    // cannot queue at once (the backend then stays in SRV answers) rather than wait.
    let (commands, commands_rx) = mpsc::channel::<Command>(256);
    tracker.spawn(registry.run(events_rx, commands_rx, shutdown.clone()));
    // Health checks report changes of state; the registry takes backends out (or back).
    let (health_tx, mut health_rx) = mpsc::channel::<crate::discovery::health::Change>(256);
    tracker.spawn(crate::discovery::health::run(
        health_targets,
        health_tx,
        shutdown.clone(),
    ));
    let to_registry = commands.clone();
    tracker.spawn(async move {
        while let Some(c) = health_rx.recv().await {
            let command = Command::Health {
                service: c.service,
                addr: c.addr,
                healthy: c.healthy,
                reason: c.reason,
            };
            if to_registry.send(command).await.is_err() {
                return;
            }
        }
    });
    let mut sources_token = shutdown.child_token();
    start_sources(&config, &events, &sources_token, &tracker);

    let d = &config.dns;
    if d.upstreams.is_empty() {
        warn!(
            "no upstream resolvers: names outside the service domains will get SERVFAIL (set dns.upstreams)"
        );
    }
    let handler = Arc::new(DnsHandler::new(dns_state(d, None), shared.clone()));
    let mut server = Server::new(SharedHandler(handler.clone()));
    let addrs = listeners.dns_addrs();
    if let Some(hook) = listeners.hook {
        hook.set_nonblocking(true)
            .map_err(|e| DaemonError::Server(e.to_string()))?;
        let hook = tokio::net::UnixListener::from_std(hook)
            .map_err(|e| DaemonError::Server(e.to_string()))?;
        let cfg = HookServerConfig {
            ejections: Some(commands.clone()),
            balance: balance.clone(),
            ..hook_cfg
        };
        let (snapshot, stop) = (shared.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = hook_server::serve(hook, snapshot, cfg, stop).await {
                tracing::error!(error = %e, "hook server stopped");
            }
        });
    }
    if let Some(admin) = listeners.admin {
        admin
            .set_nonblocking(true)
            .map_err(|e| DaemonError::Server(e.to_string()))?;
        let admin = tokio::net::UnixListener::from_std(admin)
            .map_err(|e| DaemonError::Server(e.to_string()))?;
        let cx = AdminContext {
            snapshot: shared.clone(),
            registry: RegistryHandle::new(commands.clone()),
            reload: reload_tx.clone(),
            started,
            config: config.path.as_ref().map(|p| p.display().to_string()),
            balance: balance.clone(),
            catch: catch.clone(),
        };
        tracker.spawn(admin::serve(admin, cx, shutdown.clone()));
    }
    for http in listeners.http {
        http.set_nonblocking(true)
            .map_err(|e| DaemonError::Server(e.to_string()))?;
        let http = tokio::net::TcpListener::from_std(http)
            .map_err(|e| DaemonError::Server(e.to_string()))?;
        let cx = crate::ops::http::HttpContext {
            snapshot: shared.clone(),
            registry: RegistryHandle::new(commands.clone()),
            started,
        };
        tracker.spawn(crate::ops::http::serve(http, cx, shutdown.clone()));
    }
    let udp_threads = udp::spawn(
        listeners.dns_udp,
        handler.clone(),
        tokio::runtime::Handle::current(),
        shutdown.clone(),
    )
    .map_err(|e| DaemonError::Server(e.to_string()))?;
    for tcp in listeners.dns_tcp {
        tcp.set_nonblocking(true)
            .map_err(|e| DaemonError::Server(e.to_string()))?;
        server.register_listener(
            tokio::net::TcpListener::from_std(tcp)
                .map_err(|e| DaemonError::Server(e.to_string()))?,
            TCP_IDLE,
            64,
        );
    }
    info!(listen = ?addrs, domains = ?d.domains.iter().map(ToString::to_string).collect::<Vec<_>>(), services = shared.load().len(), "serving");

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(reply) = reload_rx.recv() => {
                let result = match Config::load(config.path.as_deref()) {
                    Err(problems) => {
                        for p in &problems.0 {
                            tracing::error!("{p}");
                        }
                        tracing::error!(problems = problems.0.len(), "reload refused: the running configuration keeps serving");
                        Err(problems.to_string())
                    }
                    Ok(new) => {
                        let mut reload = Reload { handler: &handler, events: &events, commands: &commands, tracker: &tracker, shutdown: &shutdown, sources_token: &mut sources_token };
                        let summary = reload.apply(&mut config, new).await;
                        info!(%summary, "reloaded");
                        Ok(summary)
                    }
                };
                let _ = reply.send(result);
            }
        }
    }
    info!("shutting down");
    tracker.close();
    let drained = tokio::time::timeout(GRACE, async {
        let _ = server.shutdown_gracefully().await;
        tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        warn!("some tasks did not finish within {}s", GRACE.as_secs());
    }
    for t in udp_threads {
        let _ = t.join();
    }
    Ok(())
}

/// Starts every source and registration of `config` under `token`.
fn start_sources(
    config: &Config,
    events: &mpsc::Sender<SourceEvent>,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    for (index, source) in config.sources.iter().enumerate() {
        match source {
            SourceConfig::File { path, .. } => {
                tracker.spawn(FileSource::new(path).run(index, events.clone(), token.clone()));
            }
            SourceConfig::DnsSrv(srv) => {
                tracker.spawn(crate::discovery::source::dns_srv::run(
                    srv.clone(),
                    index,
                    events.clone(),
                    token.clone(),
                ));
            }
            SourceConfig::Zookeeper(zk) => {
                tracker.spawn(crate::discovery::source::zookeeper::run(
                    zk.clone(),
                    index,
                    events.clone(),
                    token.clone(),
                ));
            }
        }
    }
    // Announce local services into ZooKeeper while their health checks pass (withdrawn at shutdown).
    for reg in &config.registrations {
        tracker.spawn(crate::discovery::register::run(reg.clone(), token.clone()));
    }
}

/// The reloadable DNS state; keeps `old`'s forwarder (and its cache) when forwarding is unchanged.
fn dns_state(d: &DnsConfig, old: Option<(&DnsConfig, Arc<Forwarder>)>) -> DnsState {
    let forwarding = |c: &DnsConfig| {
        (
            c.upstreams.clone(),
            c.forward.clone(),
            c.timeout,
            c.cache_size,
            c.stale_max,
        )
    };
    let forwarder = match old {
        Some((old, fwd)) if forwarding(old) == forwarding(d) => fwd,
        _ => Arc::new(Forwarder::new(ForwardConfig {
            default_upstreams: d.upstreams.clone(),
            zones: d
                .forward
                .iter()
                .map(|f| (f.zone.clone(), f.upstreams.clone()))
                .collect(),
            timeout: d.timeout,
            cache_size: d.cache_size,
            stale_max: d.stale_max,
            ours: d.domains.clone(),
            ..ForwardConfig::default()
        })),
    };
    DnsState {
        zones: d.zones(),
        forwarder,
        allow: d.allow.clone(),
    }
}

/// One reload: applies what can change live, and says what needs a restart.
struct Reload<'a> {
    handler: &'a DnsHandler,
    events: &'a mpsc::Sender<SourceEvent>,
    commands: &'a mpsc::Sender<Command>,
    tracker: &'a TaskTracker,
    shutdown: &'a CancellationToken,
    sources_token: &'a mut CancellationToken,
}

impl Reload<'_> {
    async fn apply(&mut self, running: &mut Config, mut new: Config) -> String {
        let mut changed = Vec::new();
        let mut restart = Vec::new();
        // What is bound or derived at start-up stays as it is until a restart.
        macro_rules! keep {
            ($($field:ident).+, $name:literal) => {
                if new.$($field).+ != running.$($field).+ {
                    restart.push($name);
                    new.$($field).+ = running.$($field).+.clone();
                }
            };
        }
        keep!(dns.listen, "dns.listen");
        keep!(dns.magic_v4, "dns.magic_v4");
        keep!(dns.magic_v6, "dns.magic_v6");
        keep!(state.dir, "state.dir");
        keep!(state.quarantine, "state.quarantine");
        keep!(hook.socket, "hook.socket");
        keep!(admin.socket, "admin.socket");
        keep!(metrics_listen, "metrics.listen");
        if new.dns != running.dns {
            self.handler.replace(dns_state(
                &new.dns,
                Some((&running.dns, self.handler.forwarder())),
            ));
            changed.push("dns");
        }
        if new.sources != running.sources
            || new.registrations != running.registrations
            || new.guard != running.guard
            || new.health != running.health
        {
            self.sources_token.cancel();
            *self.sources_token = self.shutdown.child_token();
            let (reply, done) = oneshot::channel();
            let names = new.sources.iter().map(|s| s.name().to_string()).collect();
            if self
                .commands
                .send(Command::Reconfigure {
                    names,
                    guard: new.guard,
                    health: new.health,
                    reply,
                })
                .await
                .is_ok()
                && tokio::time::timeout(Duration::from_secs(5), done)
                    .await
                    .is_err()
            {
                // Never let a reload wedge the control loop (and with it, shutdown).
                warn!("the registry took more than 5s to take the new sources; carrying on");
            }
            start_sources(&new, self.events, self.sources_token, self.tracker);
            changed.push("sources");
        }
        *running = new;
        for r in &restart {
            warn!(
                key = r,
                "changed in the config file; takes effect at the next restart"
            );
        }
        match (changed.is_empty(), restart.is_empty()) {
            (true, true) => "nothing changed".to_string(),
            (_, true) => format!("applied: {}", changed.join(", ")),
            (_, false) => format!(
                "applied: {}; needs a restart: {}",
                if changed.is_empty() {
                    "nothing".to_string()
                } else {
                    changed.join(", ")
                },
                restart.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_a_unix_socket_never_deletes_what_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook.sock");
        std::fs::write(&path, b"someone's file").unwrap();
        let e = bind_unix(&path, 0o666).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"someone's file");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_shared_directory_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("hook.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        bind_unix(&path, 0o666).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = bind_unix(&dir.path().join("admin.sock"), 0o660)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing a directory others can write"), "{e}");
    }

    #[test]
    fn dns_udp_sockets_get_a_receive_buffer_for_bursts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path().display();
        let toml = format!(
            "[dns]\nlisten = [\"127.0.0.1:0\"]\nupstreams = []\n[hook]\nsocket = \"{d}/hook.sock\"\n\
             [admin]\nsocket = \"{d}/admin.sock\"\n[metrics]\nlisten = [\"127.0.0.1:0\"]\n"
        );
        let config = Config::parse(Path::new("/t/discotech.toml"), &toml, &[]).unwrap();
        let l = Listeners::bind(&config).unwrap();
        let got = socket2::SockRef::from(&l.dns_udp[0])
            .recv_buffer_size()
            .unwrap();
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The kernel doubles what it grants (for its bookkeeping) and caps it at rmem_max.
        assert!(
            got >= DNS_UDP_RECV_BUFFER.min(max),
            "{got} (rmem_max {max})"
        );
    }
}
