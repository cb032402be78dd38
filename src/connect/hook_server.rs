//! The daemon side of the connect hook's unix socket. Hooks pick from the shared routing table
//! (`table`) on their own; they come here once to receive the live region (passed with
//! SCM_RIGHTS), and to ask for a pick when they cannot map the table (an older hook, or no
//! table file yet). Such picks are made by the same function over the same shared state, so
//! both kinds of hooks share one round-robin turn and one count of connects in flight.
//!
//! Each peer is one hooked process (or one lookup of one). Messages are fixed-size so nothing
//! unbounded is read, idle peers are dropped and the number of peers is capped. A failed report
//! is a hint (`reports`): it makes the daemon probe the backend, never eject it by itself.
//! Connects a peer was counted in flight for and has not reported done are uncounted when it
//! goes away, so a killed client cannot pin a backend's count.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use discotech_wire::pick::{Ask, Miss, uncount};
use discotech_wire::table::{NO_SLOT, Policy};
use discotech_wire::{
    DecodeError, FLAG_HANDED_OVER, FLAG_HASH_KEY, FLAG_INET6, FLAG_PENDING, FLAG_REPORT_DONE, Kind,
    MSG_LEN, Reply, Request, Status,
};
use ipnet::{Ipv4Net, Ipv6Net};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::connect::balancer::{Balancer, DEFAULT_FAIL_HOLD};
use crate::connect::latency::{Watch, Watcher};
use crate::connect::prefetch::Prefetcher;
use crate::connect::reports::{Hint, Hints, Prober};
use crate::connect::table::RoutingTable;
use crate::discovery::registry::Command;
use crate::discovery::snapshot::{Service, SharedSnapshot};
use crate::metrics::{METRICS, PrefetchLabels};
use crate::service::ServiceSpec;

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
    /// The routing table file, `hook.snapshot` beside the socket (see [`fallback_path_for`]).
    pub fallback_file: Option<PathBuf>,
    /// A peer that sends nothing for this long is disconnected.
    pub idle_timeout: Duration,
    /// At most this many peers at once; further connections are closed at once (the hook then
    /// falls back as if the daemon were down). Never more than the descriptor limit leaves
    /// after [`FD_RESERVE`].
    pub max_peers: usize,
    /// At most this many peers of one uid at once, so one user cannot take them all.
    pub max_peers_per_uid: usize,
    /// How long a backend whose failure the daemon confirmed is skipped.
    pub fail_hold: Duration,
    /// This host's zone and the capacity share it must keep to be preferred (`[balance]`).
    pub zone: Option<String>,
    pub local_min_share: f64,
    /// The magic ranges, written into the table for hooks to learn.
    pub magic_v4: Ipv4Net,
    pub magic_v6: Option<Ipv6Net>,
    /// The routing table (shared with the registry, which publishes into it, and the admin
    /// server); `None`: a new one at `fallback_file`, kept current from the snapshot by this
    /// server.
    pub balance: Option<BalanceHandle>,
    /// The registry, told of each confirmed ejection so the backend also leaves SRV answers;
    /// `None`: ejections only leave the table.
    pub ejections: Option<mpsc::Sender<Command>>,
}

impl Default for HookServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/discotech/hook.sock"),
            fallback_file: Some(PathBuf::from("/run/discotech/hook.snapshot")),
            idle_timeout: Duration::from_secs(60),
            max_peers: 4096,
            max_peers_per_uid: 256,
            fail_hold: DEFAULT_FAIL_HOLD,
            zone: None,
            local_min_share: 0.3,
            magic_v4: "127.77.0.0/16".parse().unwrap_or_default(),
            magic_v6: None,
            balance: None,
            ejections: None,
        }
    }
}

/// Descriptors kept out of the hook server's reach, whatever its peers do: DNS over TCP, the
/// admin socket, HTTP, sources, state files and upstream queries live on these.
pub const FD_RESERVE: usize = 512;

/// Peers per uid, for [`HookServerConfig::max_peers_per_uid`].
#[derive(Default)]
struct PerUid(std::sync::Mutex<HashMap<u32, usize>>);

/// A peer's place in its uid's count, given back when the peer goes.
struct UidSlot<'a> {
    of: &'a PerUid,
    uid: u32,
}

impl PerUid {
    fn take(&self, uid: u32, cap: usize) -> Option<UidSlot<'_>> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(uid).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(UidSlot { of: self, uid })
    }
}

impl Drop for UidSlot<'_> {
    fn drop(&mut self) {
        let mut m = self
            .of
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// Connects one peer was counted in flight for and has not reported done, at most.
const MAX_OUTSTANDING_PER_PEER: usize = 1024;

struct Shared {
    table: Arc<RoutingTable>,
    prefetch: Arc<Prefetcher>,
    hints: Hints,
    rng: Mutex<SmallRng>,
    /// Follows connects that socket-path hooks report as still under way.
    watcher: Option<Watcher>,
}

/// The routing table, shared by the hook server, the registry (which publishes into it) and
/// the admin server (which explains picks from it).
#[derive(Clone, Debug)]
pub struct BalanceHandle(Arc<RoutingTable>, Arc<Prefetcher>);

impl BalanceHandle {
    /// A routing table at `cfg.fallback_file` with a balancer configured from `cfg` (fail
    /// hold, zone).
    pub fn new(cfg: &HookServerConfig) -> Self {
        let balancer =
            Balancer::new(cfg.fail_hold).with_zone(cfg.zone.clone(), cfg.local_min_share);
        let path = cfg
            .fallback_file
            .clone()
            .unwrap_or_else(|| fallback_path_for(&cfg.socket));
        crate::connect::table::supersede_left_over(&path);
        let table = Arc::new(RoutingTable::new(
            &path,
            cfg.magic_v4,
            cfg.magic_v6,
            Arc::new(Mutex::new(balancer)),
        ));
        let prefetch = Arc::new(Prefetcher::new(table.clone()));
        Self(table, prefetch)
    }

    pub fn table(&self) -> &Arc<RoutingTable> {
        &self.0
    }

    /// The pools of established connections (prefetch services).
    pub fn prefetch(&self) -> &Arc<Prefetcher> {
        &self.1
    }

    /// A backend's balancing state: connects in flight (shared by every hook) and the p2c-ewma
    /// latency estimate.
    pub fn backend_state(
        &self,
        spec: &ServiceSpec,
        backend: SocketAddr,
        now: Instant,
    ) -> (u32, Option<Duration>) {
        let in_flight = self
            .0
            .slot_of(&spec.name, backend)
            .zip(self.0.live())
            .map_or(0, |(slot, live)| live.in_flight_count(slot));
        let latency = self
            .0
            .balancer()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .latency_estimate(&spec.name, backend, now);
        (in_flight, latency)
    }

    /// The backend the next hooked connect to `service` on `client_port` would reach, and why:
    /// the hook's own pick, as a dry run over the same shared state. `key` stands for the
    /// caller (maglev). `None` when no backend is usable.
    pub fn explain(
        &self,
        service: &Service,
        client_port: u16,
        key: u64,
    ) -> Option<(SocketAddr, String)> {
        let ask = Ask {
            dest: SocketAddr::new(service.magic_v4.into(), client_port),
            v6_ok: false,
            key,
            rand: key,
            local_turn: 0,
            exclude: &[],
        };
        let p = self.0.pick(&ask, false).ok()?;
        let weight = service
            .spec
            .backends
            .get(p.backend as usize)
            .map_or(0, |b| b.weight);
        let c = p.cost;
        let turn = p.turn.unwrap_or(0);
        let why = match p.policy {
            Policy::RoundRobin => format!("round robin: turn {turn} of the host's shared counter"),
            Policy::WeightedRoundRobin => format!(
                "smooth weighted round robin: turn {turn} of the schedule (weight {weight})"
            ),
            Policy::Random => format!("weighted random: one draw (weight {weight})"),
            Policy::P2c => format!(
                "p2c: {} connects in flight, the fewer of two random candidates",
                c.in_flight
            ),
            Policy::P2cEwma if c.measured => format!(
                "p2c-ewma: connect latency {:.3} ms x ({} in flight + 1), the lower cost of two random candidates",
                f64::from(c.latency_us) / 1e3,
                c.in_flight
            ),
            Policy::P2cEwma => format!(
                "p2c-ewma: no latency measured yet, {} in flight; the lower cost of two random candidates",
                c.in_flight
            ),
            Policy::LeastConn => format!(
                "least-conn: {} connections + {} picked since they were counted, the fewest",
                c.connections, c.in_flight
            ),
            Policy::Maglev => format!("maglev: owner of key {key} (weight {weight})"),
        };
        Some((p.addr, why))
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
    let tracker = TaskTracker::new();
    let handle = match cfg.balance.clone() {
        Some(h) => h,
        None => {
            // Nobody publishes into this table: follow the snapshot ourselves.
            let h = BalanceHandle::new(&cfg);
            tracker.spawn(follow(h.0.clone(), snapshot.clone(), shutdown.clone()));
            h
        }
    };
    let table = handle.0.clone();
    tracker.spawn(handle.1.clone().keep(shutdown.clone()));
    let hints = Prober::spawn(
        table.clone(),
        snapshot.clone(),
        cfg.ejections.clone(),
        shutdown.clone(),
    );
    let reader = match crate::connect::reports::ReportReader::spawn(table.clone(), hints.clone()) {
        Ok(r) => Some(r),
        Err(error) => {
            warn!(%error, "cannot start the hook report reader; passive health sees only socket reports");
            None
        }
    };
    let watcher = crate::connect::reports::watcher(table.clone(), hints.clone());
    let shared = Arc::new(Shared {
        table,
        prefetch: handle.1.clone(),
        hints,
        rng: Mutex::new(SmallRng::from_os_rng()),
        watcher,
    });
    let fd_room = usize::try_from(discotech_shm::nofile_limit())
        .unwrap_or(usize::MAX)
        .saturating_sub(FD_RESERVE);
    let max_peers = cfg.max_peers.min(fd_room).max(1);
    if max_peers < cfg.max_peers {
        warn!(
            max_peers,
            configured = cfg.max_peers,
            "the descriptor limit leaves room for fewer hook peers (raise LimitNOFILE)"
        );
    }
    let peers = Arc::new(Semaphore::new(max_peers));
    let per_uid = Arc::new(PerUid::default());
    debug!(socket = %cfg.socket.display(), max_peers, "hook server listening");
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
            warn!(max = max_peers, "too many hook peers; closing a new one");
            continue;
        };
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let (shared, shutdown, idle) = (shared.clone(), shutdown.clone(), cfg.idle_timeout);
        let (per_uid, cap) = (per_uid.clone(), cfg.max_peers_per_uid.max(1));
        tracker.spawn(async move {
            let _permit = permit;
            let Some(_slot) = per_uid.take(uid, cap) else {
                debug!(
                    uid,
                    cap, "too many hook peers of one uid; closing a new one"
                );
                return;
            };
            serve_peer(stream, &shared, idle, &shutdown).await;
        });
    }
    tracker.close();
    tracker.wait().await;
    drop(reader);
    handle.0.retire();
    Ok(())
}

/// Publishes every new generation of `snapshot` into `table` (for a hook server that owns its
/// table: tests and stand-alone uses; the daemon's registry publishes directly).
async fn follow(table: Arc<RoutingTable>, snapshot: SharedSnapshot, shutdown: CancellationToken) {
    let mut seen = None;
    loop {
        let snap = snapshot.load_full();
        if seen != Some(snap.generation) {
            seen = Some(snap.generation);
            let t = table.clone();
            let _ = tokio::task::spawn_blocking(move || t.publish(&snap)).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
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
    let mut outstanding: Vec<u32> = Vec::new();
    // Whether the peer shares the daemon's network namespace, once a prefetch asks.
    let mut same_netns: Option<bool> = None;
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
        if let Ok(req) = Request::decode(&buf)
            && req.kind == Kind::MapLive
        {
            if send_live(&stream, shared, req.id).await.is_err() {
                break;
            }
            continue;
        }
        if let Ok(req) = Request::decode(&buf)
            && req.kind == Kind::Prefetch
        {
            let same = *same_netns.get_or_insert_with(|| pid.is_some_and(shares_netns));
            let key = if req.flags & FLAG_HASH_KEY != 0 {
                req.hash_key
            } else {
                uid.map_or(0, u64::from)
            };
            if send_pooled(&stream, shared, &req, key, same).await.is_err() {
                break;
            }
            continue;
        }
        let key = uid.map_or(0, u64::from);
        let Some(reply) = handle(shared, &buf, &mut outstanding, key) else {
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
    if let Some(live) = shared.table.live() {
        for slot in outstanding {
            uncount(&live, slot);
        }
    }
}

/// Answers a map request: the live region's descriptor with a reply carrying its epoch (status
/// `NoBackend` and no descriptor when there is none).
async fn send_live(stream: &UnixStream, shared: &Shared, id: u32) -> std::io::Result<()> {
    let Some((fd, epoch)) = shared.table.live_fd() else {
        let reply = Reply::refuse(id, Status::NoBackend, 0).encode();
        return write_now(stream, &reply).await;
    };
    let reply = Reply::refuse(id, Status::Ok, epoch).encode();
    loop {
        stream.writable().await?;
        match discotech_shm::send_with_fd(stream.as_fd(), &reply, fd) {
            Ok(n) if n == reply.len() => return Ok(()),
            Ok(_) => return Err(std::io::ErrorKind::WriteZero.into()),
            Err(libc::EAGAIN) => continue,
            Err(e) => return Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

/// Whether process `pid` is in the daemon's network namespace (a pooled connection belongs to
/// the daemon's: handed to a process in another, it would reach what the daemon reaches).
fn shares_netns(pid: i32) -> bool {
    let id = |path: &str| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let theirs = id(&format!("/proc/{pid}/ns/net"));
    theirs.is_some() && theirs == id("/proc/self/ns/net")
}

/// Answers a prefetch request: a pooled connection attached to an ok reply naming its backend,
/// or status `NoBackend` (none pooled, or none for this caller) so the hook connects itself.
async fn send_pooled(
    stream: &UnixStream,
    shared: &Shared,
    req: &Request,
    key: u64,
    same_netns: bool,
) -> std::io::Result<()> {
    let dest = SocketAddr::new(req.magic_ip(), req.port);
    let inet6 = req.flags & FLAG_INET6 != 0;
    let pooled = if same_netns {
        let rand = shared
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .random();
        shared.prefetch.take(dest, inet6, key, rand)
    } else {
        if let Some(s) = shared
            .table
            .last_snapshot()
            .and_then(|s| s.by_addr(dest.ip()).cloned())
        {
            METRICS
                .prefetch_connects
                .get_or_create(&PrefetchLabels {
                    service: s.name().to_string(),
                    result: "other_netns",
                })
                .inc();
        }
        None
    };
    let generation = shared.table.last_snapshot().map_or(0, |s| s.generation);
    let Some((backend, conn)) = pooled else {
        let reply = Reply::refuse(req.id, Status::NoBackend, generation).encode();
        return write_now(stream, &reply).await;
    };
    let mut reply = Reply::ok(req.id, backend, FLAG_HANDED_OVER, generation);
    (reply.rcvbuf, reply.sndbuf) = shared.prefetch.buffer_defaults();
    let reply = reply.encode();
    loop {
        stream.writable().await?;
        match discotech_shm::send_with_fd(stream.as_fd(), &reply, conn.as_fd()) {
            // Our copy of the connection closes here; the caller's is now the only one.
            Ok(n) if n == reply.len() => return Ok(()),
            Ok(_) => return Err(std::io::ErrorKind::WriteZero.into()),
            Err(libc::EAGAIN) => continue,
            Err(e) => return Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

async fn write_now(stream: &UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        stream.writable().await?;
        match stream.try_write(bytes.get(done..).unwrap_or_default()) {
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What one message asks for. `None`: no reply (done). `Some(Err(()))`: not our protocol, drop
/// the peer. `Some(Ok(bytes))`: the reply.
fn handle(
    shared: &Shared,
    buf: &[u8; MSG_LEN],
    outstanding: &mut Vec<u32>,
    key: u64,
) -> Option<Result<[u8; MSG_LEN], ()>> {
    let started = Instant::now();
    let req = match Request::decode(buf) {
        Ok(req) => req,
        Err(DecodeError::BadMagic) => return Some(Err(())),
        Err(DecodeError::Version(v)) => {
            debug!(version = v, "hook speaks another protocol version");
            let id = request_id(buf);
            return Some(Ok(Reply::refuse(id, Status::UnsupportedVersion, 0).encode()));
        }
        Err(_) => {
            let id = request_id(buf);
            return Some(Ok(Reply::refuse(id, Status::BadRequest, 0).encode()));
        }
    };
    let rand = shared
        .rng
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .random::<u64>();
    let reply = answer(shared, &req, outstanding, key, rand)?.encode();
    METRICS
        .hook_duration
        .observe(started.elapsed().as_secs_f64());
    Some(Ok(reply))
}

/// The id of a message that did not decode, so the refusal still matches its request.
fn request_id(buf: &[u8; MSG_LEN]) -> u32 {
    u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]])
}

/// The answer to one decoded request. `key` is the caller's affinity key for maglev services
/// (its uid); `rand` random bits for random and p2c picks.
fn answer(
    shared: &Shared,
    req: &Request,
    outstanding: &mut Vec<u32>,
    key: u64,
    rand: u64,
) -> Option<Reply> {
    let table = &shared.table;
    let live = table.live();
    let reported = matches!(req.kind, Kind::Failed | Kind::Done).then(|| {
        let addr = req.backend_addr();
        report_target(table, req, addr)
    });
    if let Some(Some((service, backend, slot))) = &reported {
        let addr = req.backend_addr();
        if let Some(i) = outstanding.iter().position(|s| s == slot) {
            outstanding.swap_remove(i);
            if let Some(live) = live {
                uncount(&live, *slot);
            }
        }
        match req.kind {
            Kind::Failed => {
                debug!(%service, %addr, errno = req.errno, "hook reports a failed backend");
                METRICS.count_hook_request(service.as_str(), "backend_failed");
                shared.hints.send(Hint {
                    service: service.clone(),
                    backend: *backend,
                    addr,
                });
            }
            _ if req.flags & FLAG_PENDING != 0 => {
                if let Some(w) = &shared.watcher {
                    w.watch(Watch {
                        service: service.clone(),
                        backend: *backend,
                        remote: addr,
                        local_port: req.errno,
                        since: Instant::now(),
                        slot: *slot,
                        counted: false,
                        sampled: true,
                    });
                }
            }
            _ if req.latency_us > 0 => {
                let took = Duration::from_micros(u64::from(req.latency_us));
                crate::connect::reports::observe(table, service, *backend, *slot, took);
            }
            _ => {}
        }
    }
    if req.kind == Kind::Done {
        return None;
    }
    let excluded = [(req.kind == Kind::Failed).then(|| req.backend_addr())];
    let ask = Ask {
        dest: SocketAddr::new(req.magic_ip(), req.port),
        v6_ok: req.flags & FLAG_INET6 != 0,
        // A key the caller set (DISCOTECH_HASH_KEY) wins over its uid.
        key: if req.flags & FLAG_HASH_KEY != 0 {
            req.hash_key
        } else {
            key
        },
        rand,
        local_turn: 0,
        exclude: &excluded,
    };
    let picked = table.pick(&ask, true);
    let generation = picked.map_or(0, |p| p.generation);
    match picked {
        Ok(p) => {
            let name = reported
                .as_ref()
                .and_then(|r| r.as_ref().map(|r| r.0.to_string()));
            METRICS.count_hook_request(name.as_deref().unwrap_or("-"), "picked");
            let mut flags = 0;
            if p.counted {
                if outstanding.len() >= MAX_OUTSTANDING_PER_PEER {
                    let old = outstanding.swap_remove(0);
                    if let Some(live) = live {
                        uncount(&live, old);
                    }
                }
                outstanding.push(p.slot);
                flags |= FLAG_REPORT_DONE;
            } else if p.policy == Policy::P2cEwma {
                flags |= FLAG_REPORT_DONE;
            }
            Some(Reply::ok(req.id, p.addr, flags, p.generation))
        }
        Err(Miss::UnknownService) => {
            METRICS.count_hook_request("-", "unknown_service");
            Some(Reply::refuse(req.id, Status::UnknownService, generation))
        }
        Err(Miss::NoBackend) => {
            METRICS.count_hook_request("-", "no_backend");
            Some(Reply::refuse(req.id, Status::NoBackend, generation))
        }
        // No table (it could not be written): the hook falls back as if the daemon were down.
        Err(Miss::Unreadable) => Some(Reply::refuse(req.id, Status::BadRequest, generation)),
    }
}

/// The service, backend (default address) and slot a failed or done report names.
fn report_target(
    table: &RoutingTable,
    req: &Request,
    addr: SocketAddr,
) -> Option<(crate::service::ServiceName, SocketAddr, u32)> {
    let snap = table.last_snapshot()?;
    let service = snap.by_addr(req.magic_ip())?;
    let backend = backend_for(&service.spec, req.port, addr)?;
    let slot = table.slot_of(service.name(), backend).unwrap_or(NO_SLOT);
    Some((service.name().clone(), backend, slot))
}

/// The backend (by its default address) that a connect on `client_port` reached at `addr`.
fn backend_for(spec: &ServiceSpec, client_port: u16, addr: SocketAddr) -> Option<SocketAddr> {
    let name = spec.port_name_for(client_port);
    spec.backends
        .iter()
        .find(|b| b.addr.ip() == addr.ip() && b.port_for(name) == addr.port())
        .map(|b| b.addr)
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
