//! Connection prefetching: for services with `prefetch`, the daemon keeps a few established TCP
//! connections to each backend a hooked connect may be sent to, and hands one to the hook (over
//! its socket, SCM_RIGHTS) in place of a connect, so the caller skips the handshake's round trip.
//!
//! Pools follow the routing table. A keeper looks every [`TICK`] (and at once after a hand-over)
//! and keeps pools only for the candidates of the table's pick sets, so the pooled connections
//! of a backend that is drained, unhealthy, ejected or removed are closed within a tick. No
//! pooled connection is older than the service's `max_idle`, and each is checked alive
//! (`MSG_PEEK`: no FIN, no error) before it is handed over; one the backend closed is dropped.
//!
//! Which pools: a pool is one backend address (with the port the client's port maps to) for one
//! socket family, because a hooked program's AF_INET6 socket must receive an AF_INET6 socket
//! (with a v4-mapped peer for an IPv4 backend). The default port in each backend's own family is
//! pooled from the start; other client ports and families once a hook asked for them, until
//! nobody did for [`SHAPE_TTL`]. A pool's size follows its use: one connection plus one for each
//! hand-over in the last `max_idle`, up to the service's `pool`, so a quiet service holds one
//! connection per backend and a busy one its whole pool.
//!
//! Which connection a hook gets: the routing table's own pick (the same turn, the same counters
//! as a hook's pick); when that backend's pool is empty, any other candidate's (except under
//! maglev, whose picks are an affinity). With none, the hook connects as it would without
//! prefetching.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use discotech_wire::pick::{Ask, uncount};
use discotech_wire::table::Policy;
use tokio::net::TcpSocket;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::connect::table::RoutingTable;
use crate::discovery::snapshot::Snapshot;
use crate::metrics::{METRICS, PrefetchLabels};
use crate::service::{Prefetch, ServiceName};

/// How often the keeper looks at the pools without being woken.
pub const TICK: Duration = Duration::from_millis(100);
/// A client port and family nobody asked for this long is no longer pooled.
pub const SHAPE_TTL: Duration = Duration::from_secs(60);
/// A connect of the keeper's own that takes longer is given up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed connect, a pool waits this long before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One pool: connections to `backend` for sockets of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub backend: SocketAddr,
    /// For AF_INET6 sockets (an IPv4 backend is then reached as v4-mapped).
    pub inet6: bool,
}

struct Pooled {
    stream: TcpStream,
    since: Instant,
}

struct Pool {
    service: ServiceName,
    /// `prefetch_connects{service, result="handed_over"}`, looked up once.
    handed_over: prometheus_client::metrics::counter::Counter,
    cfg: Prefetch,
    idle: VecDeque<Pooled>,
    connecting: usize,
    retry_at: Option<Instant>,
    /// When the last hand-overs were, newest last, at most `cfg.pool` of them (pool sizing).
    handed: VecDeque<Instant>,
}

impl Pool {
    fn target(&self, now: Instant) -> usize {
        let recent = self
            .handed
            .iter()
            .filter(|&&t| now.duration_since(t) < self.cfg.max_idle)
            .count();
        (1 + recent).min(usize::from(self.cfg.pool))
    }

    /// Takes the oldest connection still fit to hand over, dropping the ones that are not.
    fn take(&mut self, now: Instant) -> Option<TcpStream> {
        while let Some(p) = self.idle.pop_front() {
            match unfit(&p, self.cfg.max_idle, now) {
                Some(reason) => self.dropped(reason),
                None => return Some(p.stream),
            }
        }
        None
    }

    /// Drops connections past `max_idle` or closed by the backend.
    fn sweep(&mut self, now: Instant) {
        let max_idle = self.cfg.max_idle;
        let mut reasons = Vec::new();
        self.idle.retain(|p| match unfit(p, max_idle, now) {
            Some(reason) => {
                reasons.push(reason);
                false
            }
            None => true,
        });
        for reason in reasons {
            self.dropped(reason);
        }
    }

    fn dropped(&self, reason: &'static str) {
        METRICS
            .prefetch_dropped
            .get_or_create(&PrefetchLabels {
                service: self.service.to_string(),
                result: reason,
            })
            .inc();
    }
}

/// Why a pooled connection may not be handed over (`expired`, `closed`), if it may not.
fn unfit(p: &Pooled, max_idle: Duration, now: Instant) -> Option<&'static str> {
    if now.duration_since(p.since) >= max_idle {
        Some("expired")
    } else if !alive(&p.stream) {
        Some("closed")
    } else {
        None
    }
}

/// Alive: no FIN or error waiting (data the server sent first, a greeting, is fine).
fn alive(stream: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match stream.peek(&mut b) {
        Ok(n) => n > 0,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    }
}

/// A pool as `discotech backends` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolStatus {
    pub backend: SocketAddr,
    pub inet6: bool,
    pub idle: usize,
    pub connecting: usize,
    pub target: usize,
}

#[derive(Default)]
struct State {
    pools: HashMap<Key, Pool>,
    /// Per prefetch service: the (client port, inet6) shapes hooks asked for, and when last.
    shapes: HashMap<ServiceName, HashMap<(u16, bool), Instant>>,
}

impl State {
    /// A connection from the pool `key`, noted as handed over, and whether the pool is down to
    /// half its size (the keeper is then woken rather than left to its next tick).
    fn take(&mut self, key: Key, now: Instant) -> Option<(SocketAddr, TcpStream, bool)> {
        let pool = self.pools.get_mut(&key)?;
        let stream = pool.take(now)?;
        if pool.handed.len() >= usize::from(pool.cfg.pool) {
            pool.handed.pop_front();
        }
        pool.handed.push_back(now);
        pool.handed_over.inc();
        let low = 2 * (pool.idle.len() + pool.connecting) <= pool.target(now);
        Some((key.backend, stream, low))
    }
}

/// The daemon's pools of established connections.
pub struct Prefetcher {
    table: Arc<RoutingTable>,
    state: Mutex<State>,
    wake: Notify,
    /// `SO_RCVBUF` and `SO_SNDBUF` of a new TCP socket, for hooks to tell set sizes from defaults.
    defaults: (u32, u32),
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher").finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Pools are plain data; a panic elsewhere while holding the lock leaves them usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `SO_RCVBUF` and `SO_SNDBUF` as getsockopt reads them on a new TCP socket.
fn buffer_defaults() -> (u32, u32) {
    let Ok(s) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
        return (0, 0);
    };
    let get = |r: std::io::Result<usize>| r.ok().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    (get(s.recv_buffer_size()), get(s.send_buffer_size()))
}

impl Prefetcher {
    pub fn new(table: Arc<RoutingTable>) -> Self {
        Self {
            table,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            defaults: buffer_defaults(),
        }
    }

    /// `SO_RCVBUF` and `SO_SNDBUF` of a new TCP socket here.
    pub fn buffer_defaults(&self) -> (u32, u32) {
        self.defaults
    }

    /// An established connection for a hooked connect to `dest` from a socket of the given
    /// family, with the backend it reaches; None when the service does not prefetch or no pooled
    /// connection is ready (the hook then connects by itself).
    pub fn take(
        &self,
        dest: SocketAddr,
        inet6: bool,
        key: u64,
        rand: u64,
    ) -> Option<(SocketAddr, TcpStream)> {
        let now = Instant::now();
        let snapshot = self.table.last_snapshot()?;
        let service = snapshot.by_addr(dest.ip())?;
        service.spec.prefetch?;
        let name = service.name();
        let Some((backend, stream, low)) = self.take_from_pools(name, dest, inet6, key, rand, now)
        else {
            METRICS
                .prefetch_connects
                .get_or_create(&PrefetchLabels {
                    service: name.to_string(),
                    result: "empty",
                })
                .inc();
            self.wake.notify_one();
            return None;
        };
        if low {
            self.wake.notify_one();
        }
        Some((backend, stream))
    }

    fn take_from_pools(
        &self,
        name: &ServiceName,
        dest: SocketAddr,
        inet6: bool,
        key: u64,
        rand: u64,
        now: Instant,
    ) -> Option<(SocketAddr, TcpStream, bool)> {
        let ask = Ask {
            dest,
            v6_ok: inet6,
            key,
            rand,
            local_turn: 0,
            exclude: &[],
        };
        let picked = self.table.pick(&ask, true).ok()?;
        // The connection exists already: it is not a connect in flight.
        if picked.counted
            && let Some(live) = self.table.live()
        {
            uncount(&live, picked.slot);
        }
        {
            let mut st = lock(&self.state);
            match st.shapes.get_mut(name) {
                Some(shapes) => {
                    shapes.insert((dest.port(), inet6), now);
                }
                None => {
                    st.shapes
                        .insert(name.clone(), HashMap::from([((dest.port(), inet6), now)]));
                }
            }
            if let Some(got) = st.take(
                Key {
                    backend: picked.addr,
                    inet6,
                },
                now,
            ) {
                return Some(got);
            }
        }
        if picked.policy == Policy::Maglev {
            return None;
        }
        let others = self.table.candidates(dest, inet6);
        let mut st = lock(&self.state);
        others
            .into_iter()
            .find_map(|backend| st.take(Key { backend, inet6 }, now))
    }

    /// The pools of `service`, for status output.
    pub fn pools_of(&self, service: &ServiceName) -> Vec<PoolStatus> {
        let now = Instant::now();
        let st = lock(&self.state);
        let mut out: Vec<PoolStatus> = st
            .pools
            .iter()
            .filter(|(_, p)| &p.service == service)
            .map(|(k, p)| PoolStatus {
                backend: k.backend,
                inet6: k.inet6,
                idle: p.idle.len(),
                connecting: p.connecting,
                target: p.target(now),
            })
            .collect();
        out.sort_by_key(|p| (p.backend, p.inet6));
        out
    }

    /// Keeps the pools until `shutdown`; closes them all then.
    pub async fn keep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut next_look = Instant::now();
        loop {
            let now = Instant::now();
            // A full look (which pools, and every pooled connection checked) each tick; woken
            // by a hand-over in between, only the pools that gave one are topped up.
            let full = now >= next_look;
            if full {
                next_look = now + TICK;
            }
            for key in self.plan(now, full) {
                tokio::spawn(self.clone().open(key));
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(next_look.into()) => {}
            }
        }
        lock(&self.state).pools.clear();
    }

    /// One look: with `full`, pools for exactly the current candidates of the prefetch
    /// services, swept; then the connects to open to bring each pool to its size.
    fn plan(&self, now: Instant, full: bool) -> Vec<Key> {
        if !full {
            let mut st = lock(&self.state);
            let mut opens = Vec::new();
            for (key, pool) in &mut st.pools {
                top_up(*key, pool, now, &mut opens);
            }
            return opens;
        }
        let wanted = match self.table.last_snapshot() {
            Some(snapshot) => self.wanted(&snapshot, now),
            None => HashMap::new(),
        };
        let mut st = lock(&self.state);
        let before = st.pools.len();
        st.pools.retain(|key, pool| {
            let keep = wanted
                .get(key)
                .is_some_and(|(service, _)| service == &pool.service);
            for _ in 0..if keep { 0 } else { pool.idle.len() } {
                pool.dropped("ineligible");
            }
            keep
        });
        if st.pools.len() != before {
            debug!(closed = before - st.pools.len(), "prefetch pools closed");
        }
        let mut opens = Vec::new();
        for (key, (service, cfg)) in wanted {
            let pool = st.pools.entry(key).or_insert_with(|| Pool {
                handed_over: METRICS
                    .prefetch_connects
                    .get_or_create(&PrefetchLabels {
                        service: service.to_string(),
                        result: "handed_over",
                    })
                    .clone(),
                service: service.clone(),
                cfg,
                idle: VecDeque::new(),
                connecting: 0,
                retry_at: None,
                handed: VecDeque::new(),
            });
            pool.cfg = cfg;
            pool.sweep(now);
            top_up(key, pool, now, &mut opens);
        }
        let mut pooled: HashMap<&ServiceName, i64> = HashMap::new();
        for pool in st.pools.values() {
            *pooled.entry(&pool.service).or_default() += pool.idle.len() as i64;
        }
        for (service, n) in pooled {
            METRICS
                .prefetch_pooled
                .get_or_create(&crate::metrics::ServiceLabels {
                    service: service.to_string(),
                })
                .set(n);
        }
        opens
    }

    /// The pools there should be now: key -> (service, its prefetch settings). Also forgets
    /// shapes nobody asked for in [`SHAPE_TTL`].
    fn wanted(&self, snapshot: &Snapshot, now: Instant) -> HashMap<Key, (ServiceName, Prefetch)> {
        let shapes = {
            let mut st = lock(&self.state);
            st.shapes.retain(|name, shapes| {
                shapes.retain(|_, at| now.duration_since(*at) < SHAPE_TTL);
                !shapes.is_empty() && snapshot.service(name.as_str()).is_some()
            });
            st.shapes.clone()
        };
        let mut wanted = HashMap::new();
        for service in snapshot.services() {
            let Some(cfg) = service.spec.prefetch else {
                continue;
            };
            let asked = shapes.get(service.name());
            let magic = std::net::IpAddr::V4(service.magic_v4);
            // From the start: the default port, for each backend in its own family.
            let mut shapes: Vec<(u16, bool)> = vec![(0, false), (0, true)];
            shapes.extend(asked.into_iter().flat_map(|s| s.keys().copied()));
            for (port, inet6) in shapes {
                for backend in self.table.candidates(SocketAddr::new(magic, port), inet6) {
                    let asked_for = asked.is_some_and(|s| s.contains_key(&(port, inet6)));
                    if asked_for || inet6 == backend.is_ipv6() {
                        wanted.insert(Key { backend, inet6 }, (service.name().clone(), cfg));
                    }
                }
            }
        }
        wanted
    }

    /// Opens one connection for the pool `key` and files it there (if the pool still exists).
    async fn open(self: Arc<Self>, key: Key) {
        let result = tokio::time::timeout(CONNECT_TIMEOUT, connect(key)).await;
        let mut st = lock(&self.state);
        let Some(pool) = st.pools.get_mut(&key) else {
            return; // closed meanwhile: the new connection is dropped (closed) here.
        };
        pool.connecting = pool.connecting.saturating_sub(1);
        match result {
            Ok(Ok(stream)) => pool.idle.push_back(Pooled {
                stream,
                since: Instant::now(),
            }),
            Ok(Err(error)) => {
                debug!(backend = %key.backend, %error, "prefetch connect failed");
                pool.retry_at = Some(Instant::now() + RETRY_AFTER);
            }
            Err(_) => {
                debug!(backend = %key.backend, "prefetch connect timed out");
                pool.retry_at = Some(Instant::now() + RETRY_AFTER);
            }
        }
    }
}

/// Notes in `opens` the connects that bring `pool` to its size (none while it waits to retry).
fn top_up(key: Key, pool: &mut Pool, now: Instant, opens: &mut Vec<Key>) {
    if pool.retry_at.is_some_and(|t| now < t) {
        return;
    }
    let have = pool.idle.len() + pool.connecting;
    for _ in have..pool.target(now) {
        pool.connecting += 1;
        opens.push(key);
    }
}

/// A connection to `key.backend` in `key`'s family: an IPv4 backend from an AF_INET6 socket is
/// reached at its v4-mapped address, as the hook connects such sockets.
async fn connect(key: Key) -> std::io::Result<TcpStream> {
    let (socket, to) = match (key.inet6, key.backend) {
        (false, SocketAddr::V4(_)) => (TcpSocket::new_v4()?, key.backend),
        (true, SocketAddr::V4(v4)) => (
            TcpSocket::new_v6()?,
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        ),
        (_, SocketAddr::V6(_)) => (TcpSocket::new_v6()?, key.backend),
    };
    socket.connect(to).await?.into_std()
}
