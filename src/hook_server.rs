//! The daemon side of the connect hook: answers pick / failed / done messages on the hook's unix
//! socket from the current snapshot and the [`Balancer`], and writes the fallback file the hook
//! routes with when the daemon is down. Binding the socket and publishing snapshots are left to
//! the daemon; the byte format lives in `discotech-wire`.
//!
//! Each peer is one hooked process (or one lookup of one). The caller is learned from
//! SO_PEERCRED, messages are fixed-size so nothing unbounded is read, idle peers are dropped and
//! the number of peers is capped. Picks a p2c peer has not reported done are released when the
//! peer goes away, so a killed client cannot pin a backend's outstanding count.

use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use discotech_wire::fallback::{self, Header, Record};
use discotech_wire::{
    DecodeError, FLAG_HASH_KEY, FLAG_INET6, FLAG_PENDING, FLAG_REPORT_DONE, Kind, MSG_LEN, Reply,
    Request, Status, to_mapped,
};
use ipnet::{Ipv4Net, Ipv6Net};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::balancer::{Balancer, DEFAULT_FAIL_HOLD, FailureOutcome};
use crate::conn_count;
use crate::latency::{Sample, Watch, Watcher};
use crate::metrics::{HookLabels, METRICS};
use crate::registry::Command;
use crate::service::{LbPolicy, ServiceName, ServiceSpec};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// The hook library's file name, as cargo builds it and as packages install it.
pub const HOOK_LIBRARY_NAME: &str = "libdiscotech_hook.so";
/// Where packages install the hook library.
pub const INSTALLED_HOOK_LIBRARY: &str = "/usr/lib/discotech/libdiscotech_hook.so";
/// Environment variable naming the hook library explicitly (checked first).
pub const HOOK_LIBRARY_ENV: &str = "DISCOTECH_HOOK_LIBRARY";

/// How the hook server behaves.
#[derive(Clone, Debug)]
pub struct HookServerConfig {
    /// The socket path the listener is bound to (for logs; the daemon binds it).
    pub socket: PathBuf,
    /// The fallback file the daemon keeps with [`write_fallback`]; for logs.
    pub fallback_file: Option<PathBuf>,
    /// A peer that sends nothing for this long is disconnected.
    pub idle_timeout: Duration,
    /// At most this many peers at once; further connections are closed at once (the hook then
    /// falls back as if the daemon were down).
    pub max_peers: usize,
    /// How long a backend reported as refusing is skipped.
    pub fail_hold: Duration,
    /// This host's zone and the capacity share it must keep to be preferred (`[balance]`).
    pub zone: Option<String>,
    pub local_min_share: f64,
    /// The balancer to use (shared with the admin server); `None`: a new one from this config.
    pub balance: Option<BalanceHandle>,
    /// The registry, told of each ejection so the backend also leaves SRV answers and the
    /// fallback file for the ejection time; `None`: ejections only skip connect picks.
    pub ejections: Option<mpsc::Sender<Command>>,
}

impl Default for HookServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/discotech/hook.sock"),
            fallback_file: Some(PathBuf::from("/run/discotech/hook.snapshot")),
            idle_timeout: Duration::from_secs(60),
            max_peers: 4096,
            fail_hold: DEFAULT_FAIL_HOLD,
            zone: None,
            local_min_share: 0.3,
            balance: None,
            ejections: None,
        }
    }
}

/// Picks not yet reported done by one peer, bounded so a misbehaving peer cannot grow it.
const MAX_OUTSTANDING_PER_PEER: usize = 1024;

/// The balancer, its RNG, and the snapshot generation it last pruned removed services at.
type BalanceState = Mutex<(Balancer, SmallRng, u64)>;

struct Shared {
    snapshot: SharedSnapshot,
    balance: Arc<BalanceState>,
    ejections: Option<mpsc::Sender<Command>>,
    /// Times the connects hooks report as still under way (p2c-ewma); `None` if it could not start.
    latency: Option<Watcher>,
}

/// A shared handle on the hook server's balancer, for the admin server's dry-run explanations.
#[derive(Clone, Debug)]
pub struct BalanceHandle(Arc<BalanceState>);

impl BalanceHandle {
    /// A balancer configured from `cfg` (fail hold, zone), to pass to [`serve`] in
    /// [`HookServerConfig::balance`] and to the admin server.
    pub fn new(cfg: &HookServerConfig) -> Self {
        Self(Arc::new(Mutex::new((
            Balancer::new(cfg.fail_hold).with_zone(cfg.zone.clone(), cfg.local_min_share),
            SmallRng::from_os_rng(),
            0,
        ))))
    }

    /// A backend's balancing state: picks outstanding and the p2c-ewma latency estimate.
    pub fn backend_state(
        &self,
        spec: &ServiceSpec,
        backend: SocketAddr,
        now: Instant,
    ) -> (u32, Option<Duration>) {
        let Ok(guard) = self.0.lock() else {
            return (0, None);
        };
        (
            guard.0.outstanding(&spec.name, backend),
            guard.0.latency_estimate(&spec.name, backend, now),
        )
    }

    /// The backend the next pick for `spec` would reach and why; nothing advances. `None` when
    /// no backend is usable or the balancer's lock is poisoned.
    pub fn explain(
        &self,
        spec: &ServiceSpec,
        client_port: u16,
        key: u64,
    ) -> Option<(SocketAddr, String)> {
        let guard = self.0.lock().ok()?;
        guard
            .0
            .explain(spec, client_port, true, Instant::now(), key)
    }
}

/// Serve hook requests on an already-bound listener until `shutdown` is cancelled.
///
/// # Errors
/// None today: accept errors are logged and retried after a pause. The `Result` leaves room for
/// fatal listener errors.
pub async fn serve(
    listener: UnixListener,
    snapshot: SharedSnapshot,
    cfg: HookServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let balance = cfg
        .balance
        .clone()
        .unwrap_or_else(|| BalanceHandle::new(&cfg))
        .0;
    let shared = Arc::new(Shared {
        snapshot,
        latency: start_latency_watcher(&balance),
        balance,
        ejections: cfg.ejections.clone(),
    });
    let peers = Arc::new(Semaphore::new(cfg.max_peers.max(1)));
    let tracker = TaskTracker::new();
    debug!(socket = %cfg.socket.display(), "hook server listening");
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and friends: pause rather than spin.
                warn!(%error, "hook socket accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(permit) = peers.clone().try_acquire_owned() else {
            warn!(
                max = cfg.max_peers,
                "too many hook peers; closing a new one"
            );
            continue;
        };
        let (shared, shutdown, idle) = (shared.clone(), shutdown.clone(), cfg.idle_timeout);
        tracker.spawn(async move {
            let _permit = permit;
            serve_peer(stream, &shared, idle, &shutdown).await;
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn serve_peer(
    mut stream: UnixStream,
    shared: &Shared,
    idle: Duration,
    shutdown: &CancellationToken,
) {
    let cred = stream.peer_cred().ok();
    let (uid, pid) = (cred.map(|c| c.uid()), cred.and_then(|c| c.pid()));
    debug!(?uid, ?pid, "hook peer connected");
    let mut outstanding: Vec<(ServiceName, SocketAddr)> = Vec::new();
    let mut buf = [0u8; MSG_LEN];
    loop {
        let read = tokio::select! {
            () = shutdown.cancelled() => break,
            r = tokio::time::timeout(idle, stream.read_exact(&mut buf)) => r,
        };
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break, // EOF or error: the peer went away.
            Err(_) => {
                debug!(?uid, ?pid, "idle hook peer dropped");
                break;
            }
        }
        let key = uid.map_or(0, u64::from);
        let Some(reply) = handle(shared, &buf, &mut outstanding, Instant::now(), key) else {
            continue;
        };
        let Ok(reply) = reply else {
            debug!(?uid, ?pid, "hook peer does not speak the protocol; dropped");
            break;
        };
        if stream.write_all(&reply).await.is_err() {
            break;
        }
    }
    if !outstanding.is_empty()
        && let Ok(mut guard) = shared.balance.lock()
    {
        for (service, backend) in outstanding.drain(..) {
            guard.0.done(&service, backend);
        }
    }
}

/// What one message asks for. `None`: no reply (done). `Some(Err(()))`: not our protocol, drop
/// the peer. `Some(Ok(bytes))`: the reply.
fn handle(
    shared: &Shared,
    buf: &[u8; MSG_LEN],
    outstanding: &mut Vec<(ServiceName, SocketAddr)>,
    now: Instant,
    key: u64,
) -> Option<Result<[u8; MSG_LEN], ()>> {
    let started = Instant::now();
    let snap = shared.snapshot.load();
    let req = match Request::decode(buf) {
        Ok(req) => req,
        Err(DecodeError::BadMagic) => return Some(Err(())),
        Err(DecodeError::Version(v)) => {
            debug!(version = v, "hook speaks another protocol version");
            let id = request_id(buf);
            return Some(Ok(Reply::refuse(
                id,
                Status::UnsupportedVersion,
                snap.generation,
            )
            .encode()));
        }
        Err(_) => {
            let id = request_id(buf);
            return Some(Ok(
                Reply::refuse(id, Status::BadRequest, snap.generation).encode()
            ));
        }
    };
    let Ok(mut guard) = shared.balance.lock() else {
        return Some(Ok(Reply::refuse(
            req.id,
            Status::NoBackend,
            snap.generation,
        )
        .encode()));
    };
    let (balancer, rng, pruned_at) = &mut *guard;
    if *pruned_at != snap.generation {
        // Services gone from the snapshot take their balancing state with them.
        balancer.retain(|name| snap.service(name.as_str()).is_some());
        *pruned_at = snap.generation;
    }
    if let (Some(watcher), Some(watch)) = (&shared.latency, watch_for(&snap, &req, now)) {
        watcher.watch(watch);
    }
    let ejections = shared.ejections.as_ref();
    let reply = answer(balancer, rng, &snap, &req, outstanding, now, key, ejections)?.encode();
    METRICS
        .hook_duration
        .observe(started.elapsed().as_secs_f64());
    Some(Ok(reply))
}

/// Starts the thread that times non-blocking connects from the kernel's socket table, feeding
/// its samples to the balancer.
fn start_latency_watcher(balance: &Arc<BalanceState>) -> Option<Watcher> {
    let balance = Arc::downgrade(balance);
    let apply = move |samples: Vec<Sample>| {
        let Some(balance) = balance.upgrade() else {
            return;
        };
        let Ok(mut guard) = balance.lock() else {
            return;
        };
        let now = Instant::now();
        for s in samples {
            guard
                .0
                .observe_latency(&s.service, s.backend, s.latency, now);
        }
    };
    match Watcher::spawn(apply) {
        Ok(w) => Some(w),
        Err(error) => {
            warn!(%error, "cannot start the connect latency watcher; p2c-ewma sees only blocking connects");
            None
        }
    }
}

/// What to watch for a done report of a connect still under way (p2c-ewma services only). The
/// done report itself ends the connect's outstanding count, as for p2c: a connect that was set
/// up and closed again before the watcher looks must not keep counting.
fn watch_for(snap: &Snapshot, req: &Request, now: Instant) -> Option<Watch> {
    if req.kind != Kind::Done || req.flags & FLAG_PENDING == 0 {
        return None;
    }
    let spec = &snap.by_addr(req.magic_ip())?.spec;
    if spec.lb != LbPolicy::P2cEwma {
        return None;
    }
    let remote = req.backend_addr();
    Some(Watch {
        service: spec.name.clone(),
        backend: backend_for(spec, req.port, remote)?,
        remote,
        local_port: req.errno,
        since: now,
    })
}

/// Counts one hook request by service (bounded: services in the snapshot, or "-") and result.
fn count(service: &str, result: &'static str) {
    METRICS
        .hook_requests
        .get_or_create(&HookLabels {
            service: service.to_string(),
            result,
        })
        .inc();
}

/// The id of a message that did not decode, so the refusal still matches its request.
fn request_id(buf: &[u8; MSG_LEN]) -> u32 {
    u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]])
}

/// The balancing decision for one decoded request, separated from the socket for tests. `key` is
/// the caller's affinity key for maglev services (its uid). Ejections are sent to `ejections`.
#[allow(clippy::too_many_arguments)]
fn answer(
    balancer: &mut Balancer,
    rng: &mut SmallRng,
    snap: &Snapshot,
    req: &Request,
    outstanding: &mut Vec<(ServiceName, SocketAddr)>,
    now: Instant,
    key: u64,
    ejections: Option<&mpsc::Sender<Command>>,
) -> Option<Reply> {
    let generation = snap.generation;
    let Some(service) = snap.by_addr(req.magic_ip()) else {
        if req.kind != Kind::Done {
            count("-", "unknown_service");
        }
        return (req.kind != Kind::Done)
            .then(|| Reply::refuse(req.id, Status::UnknownService, generation));
    };
    let spec = &service.spec;
    if matches!(req.kind, Kind::Failed | Kind::Done) {
        if let Some(backend) = backend_for(spec, req.port, req.backend_addr()) {
            if req.kind == Kind::Failed {
                debug!(service = %spec.name, %backend, errno = req.errno, "hook reports a failed backend");
                count(spec.name.as_str(), "backend_failed");
                match balancer.report_failure(spec, backend, now) {
                    FailureOutcome::Ejected { for_, times } => {
                        // Rare (at most once per backend per ejection time), so worth info.
                        info!(service = %spec.name, %backend, ejection = ?for_, times, "backend ejected after consecutive failures");
                        count(spec.name.as_str(), "backend_ejected");
                        // Out of SRV answers too; never wait for the registry on the hook path.
                        let failures = spec
                            .outlier
                            .as_deref()
                            .copied()
                            .unwrap_or_default()
                            .consecutive_failures;
                        let eject = Command::Eject {
                            service: spec.name.clone(),
                            addr: backend,
                            until: now + for_,
                            reason: format!(
                                "ejected after {failures} consecutive connect failures, for {}",
                                crate::duration::format(for_)
                            ),
                        };
                        if let Some(Err(error)) = ejections.map(|tx| tx.try_send(eject)) {
                            debug!(service = %spec.name, %backend, %error, "registry not told of the ejection: the backend stays in SRV answers");
                        }
                    }
                    FailureOutcome::CapReached { consecutive } => {
                        debug!(service = %spec.name, %backend, consecutive, "not ejected: the service has its maximum share ejected");
                    }
                    FailureOutcome::Held { .. } | FailureOutcome::Unknown => {}
                }
            } else {
                // A connect still under way (EINPROGRESS) has not worked yet.
                if req.flags & FLAG_PENDING == 0 {
                    balancer.report_success(&spec.name, backend);
                }
                if req.latency_us > 0 {
                    let took = Duration::from_micros(u64::from(req.latency_us));
                    balancer.observe_latency(&spec.name, backend, took, now);
                }
            }
            if let Some(i) = outstanding
                .iter()
                .position(|(s, b)| *s == spec.name && *b == backend)
            {
                outstanding.swap_remove(i);
                balancer.done(&spec.name, backend);
            }
        }
        if req.kind == Kind::Done {
            return None;
        }
    }
    let v6_ok = req.flags & FLAG_INET6 != 0;
    // A key the caller set (DISCOTECH_HASH_KEY) wins over its uid.
    let key = if req.flags & FLAG_HASH_KEY != 0 {
        req.hash_key
    } else {
        key
    };
    if spec.lb == LbPolicy::LeastConn && balancer.connections_stale(now, conn_count::REFRESH) {
        let (counts, error) = conn_count::read();
        if let Some(error) = error {
            debug!(%error, "cannot read the socket table; least-conn sees no connections");
        }
        balancer.set_connections(counts, now);
    }
    let Some(pick) = balancer.pick_keyed(spec, req.port, v6_ok, now, rng, key) else {
        count(spec.name.as_str(), "no_backend");
        return Some(Reply::refuse(req.id, Status::NoBackend, generation));
    };
    count(spec.name.as_str(), "picked");
    let mut flags = 0;
    if spec.lb.reports_done() {
        if outstanding.len() >= MAX_OUTSTANDING_PER_PEER {
            let (s, b) = outstanding.swap_remove(0);
            balancer.done(&s, b);
        }
        outstanding.push((spec.name.clone(), pick.backend));
        flags |= FLAG_REPORT_DONE;
    }
    Some(Reply::ok(req.id, pick.addr, flags, generation))
}

/// The backend (by its default address) that a connect on `client_port` reached at `addr`.
fn backend_for(spec: &ServiceSpec, client_port: u16, addr: SocketAddr) -> Option<SocketAddr> {
    let name = spec.port_name_for(client_port);
    spec.backends
        .iter()
        .find(|b| b.addr.ip() == addr.ip() && b.port_for(name) == addr.port())
        .map(|b| b.addr)
}

/// The fallback file's bytes for `snapshot`: see `discotech_wire::fallback` for the layout.
pub fn fallback_bytes(
    snapshot: &Snapshot,
    magic_v4: Ipv4Net,
    magic_v6: Option<Ipv6Net>,
) -> Vec<u8> {
    let mut records = Vec::new();
    for service in snapshot.services() {
        let spec = &service.spec;
        let magics =
            std::iter::once(IpAddr::V4(service.magic_v4)).chain(service.magic_v6.map(IpAddr::V6));
        for magic in magics {
            for b in &spec.backends {
                let ports = std::iter::once((0u16, b.addr.port())).chain(
                    spec.client_ports
                        .iter()
                        .map(|(&cp, name)| (cp, b.port_for(Some(name)))),
                );
                for (client_port, backend_port) in ports {
                    records.push(Record {
                        magic: to_mapped(magic),
                        client_port,
                        backend_port,
                        backend: to_mapped(b.addr.ip()),
                        weight: b.weight,
                        priority: b.priority,
                    });
                }
            }
        }
    }
    records.truncate(fallback::MAX_RECORDS as usize);
    let header = Header {
        magic_v4: (magic_v4.network(), magic_v4.prefix_len()),
        magic_v6: magic_v6.map(|n| (n.network(), n.prefix_len())),
        generation: snapshot.generation,
        records: u32::try_from(records.len()).unwrap_or(fallback::MAX_RECORDS),
    };
    let mut bytes = Vec::with_capacity(fallback::HEADER_LEN + records.len() * fallback::RECORD_LEN);
    bytes.extend_from_slice(&header.encode());
    for r in &records {
        bytes.extend_from_slice(&r.encode());
    }
    bytes
}

/// Keep the fallback file current: call after each snapshot publish (atomic write).
///
/// # Errors
/// Any I/O error from [`crate::state::write_atomic`]; the old file stays in place.
pub fn write_fallback(
    path: &Path,
    snapshot: &Snapshot,
    magic_v4: Ipv4Net,
    magic_v6: Option<Ipv6Net>,
) -> std::io::Result<()> {
    crate::state::write_atomic(path, &fallback_bytes(snapshot, magic_v4, magic_v6))
}

/// The fallback file that belongs to a hook socket: `hook.snapshot` beside it. The hook derives
/// the same path from the socket path, so the two agree without configuration.
pub fn fallback_path_for(socket: &Path) -> PathBuf {
    socket.with_file_name("hook.snapshot")
}

/// `LD_PRELOAD` with the hook added in front of whatever was there (space- or colon-separated),
/// and not added twice.
pub fn preload_env(hook_lib: &Path, existing: Option<&OsStr>) -> OsString {
    let hook = hook_lib.as_os_str();
    let Some(existing) = existing.filter(|e| !e.is_empty()) else {
        return hook.to_os_string();
    };
    let bytes = existing.as_encoded_bytes();
    let already = bytes
        .split(|&c| c == b':' || c == b' ')
        .any(|entry| entry == hook.as_encoded_bytes());
    if already {
        return existing.to_os_string();
    }
    let mut out = hook.to_os_string();
    out.push(":");
    out.push(existing);
    out
}

/// Where the hook library is: `$DISCOTECH_HOOK_LIBRARY`, else next to the running executable
/// (or its parent, for test binaries in `target/*/deps`), else the installed path.
pub fn find_hook_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    find_hook_library_from(
        std::env::var_os(HOOK_LIBRARY_ENV).map(PathBuf::from),
        exe.as_deref(),
        Path::new(INSTALLED_HOOK_LIBRARY),
    )
}

fn find_hook_library_from(
    explicit: Option<PathBuf>,
    exe: Option<&Path>,
    installed: &Path,
) -> Option<PathBuf> {
    if let Some(p) = explicit.filter(|p| p.is_file()) {
        return Some(p);
    }
    let dir = exe.and_then(Path::parent);
    let beside = dir
        .into_iter()
        .chain(dir.and_then(Path::parent))
        .map(|d| d.join(HOOK_LIBRARY_NAME));
    beside
        .chain(std::iter::once(installed.to_path_buf()))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests;
