//! Connect latencies the hook could not measure, for p2c-ewma. A blocking connect is timed by
//! the hook itself; a non-blocking one returns EINPROGRESS before the handshake is over, so the
//! hook reports the socket's local port instead and the daemon watches for the connection in the
//! kernel's socket table (netlink sock_diag, with tcp_info):
//!
//! - established (or already closing, with tcp_info): the sample is the kernel's RTT for the
//!   connection, or how long it was seen still connecting if that is longer (a SYN that had to be
//!   retransmitted, because the backend's accept queue overflowed, is slow even when the RTT of
//!   the retransmission is not);
//! - in time-wait (set up and closed again between two looks): how long it was seen connecting,
//!   if it was;
//! - still connecting after [`GIVE_UP`]: the sample is that long;
//! - gone after being seen connecting for at least [`LONG_CONNECT`]: how long it was seen
//!   connecting. The caller's connect timeout gave up on it, or it was refused after a long round
//!   trip; either way that backend is that slow to answer.
//! - gone sooner: no sample. A refusal from a nearby backend looks exactly like a connection set
//!   up and closed again between two looks, and a refusing backend must never look fast.
//!
//! A connect gone without being seen established, or still connecting at [`GIVE_UP`], also
//! settles as failed: passive health's hint, which the daemon confirms with a connect of its own
//! before it acts (see `reports`). Every watched connect settles, so the hook's count of it in
//! flight always ends.
//!
//! One thread does this, dumping the table when reports arrive and then every [`TICK`] while any
//! connection is still being watched, never more often than once a [`TICK`], and asking the
//! kernel only for sockets to the ports being watched. The hook server hands it work with `try_send`: when the
//! queue is full a sample is lost, never a connect delayed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tracing::debug;

use crate::connect::conn_count::{self, SockRow, StateFlags, state};
use crate::service::ServiceName;

/// How often the socket table is read while connects are being watched.
pub const TICK: Duration = Duration::from_millis(5);
/// A connect still under way after this long is reported as taking this long.
pub const GIVE_UP: Duration = Duration::from_secs(3);
/// A connect seen connecting at least this long and then gone is sampled (see the module docs).
pub const LONG_CONNECT: Duration = Duration::from_millis(10);
/// Reports queued for the thread at most; beyond it they are refused (see [`Watcher::watch`]).
pub const MAX_WATCHED: usize = 4096;

/// A connect the hook reported as under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    pub service: ServiceName,
    /// The backend's default address (the balancer's key).
    pub backend: SocketAddr,
    /// Where the socket connects (the backend's address with the port for the client's port).
    pub remote: SocketAddr,
    pub local_port: u16,
    pub since: Instant,
    /// The backend's slot in the shared table (`NO_SLOT` for connects picked over the socket).
    pub slot: u32,
    /// The hook counted the connect in flight: it is uncounted when it settles.
    pub counted: bool,
    /// The service balances by connect latency (p2c-ewma): its samples are wanted.
    pub sampled: bool,
}

/// How a watched connect ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub watch: Watch,
    /// The connect latency, when it can be told (see the module docs).
    pub latency: Option<Duration>,
    /// It never got established: gone from the table without being seen connected (refused,
    /// or given up by the caller), or still connecting at [`GIVE_UP`]. A hint, not a verdict:
    /// a connection set up and aborted between two looks ends the same way.
    pub failed: bool,
}

struct Watched {
    watch: Watch,
    /// How long after the report the connection was last seen still connecting.
    connecting_for: Option<Duration>,
}

/// The handle the hook server sends watches to; dropping every clone ends the thread.
#[derive(Clone, Debug)]
pub struct Watcher(SyncSender<Watch>);

impl Watcher {
    /// Starts the watching thread; `apply` receives each batch of settled connects.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn(apply: impl FnMut(Vec<Settled>) + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(MAX_WATCHED);
        std::thread::Builder::new()
            .name("latency-watch".into())
            .spawn(move || run(&rx, apply))?;
        Ok(Self(tx))
    }

    /// Queues `watch` without waiting; a full queue drops it (one sample lost).
    pub fn watch(&self, watch: Watch) {
        match self.0.try_send(watch) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => debug!("latency watch queue full; one sample lost"),
            Err(TrySendError::Disconnected(_)) => debug!("latency watcher gone"),
        }
    }
}

fn run(rx: &Receiver<Watch>, mut apply: impl FnMut(Vec<Settled>)) {
    let mut watched: Vec<Watched> = Vec::new();
    let mut last_error: Option<String> = None;
    // At most one dump per TICK however fast connects arrive: arrivals in between wait for it.
    let mut next_dump = Instant::now();
    loop {
        if watched.is_empty() {
            match rx.recv() {
                Ok(w) => add(&mut watched, w),
                Err(_) => return,
            }
        }
        // Sleep rather than wait on the channel: new watches then wake nobody, and a busy
        // host costs one wake-up per tick, not one per connect.
        std::thread::sleep(next_dump.saturating_duration_since(Instant::now()));
        loop {
            match rx.try_recv() {
                Ok(w) => add(&mut watched, w),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        next_dump = Instant::now() + TICK;
        // Only the watched connections are kept from the dump: the table may be large.
        let wanted: HashSet<(SocketAddr, u16)> = watched
            .iter()
            .map(|w| (w.watch.remote, w.watch.local_port))
            .collect();
        let mut table: HashMap<(SocketAddr, u16), SockRow> = HashMap::new();
        // Listening sockets cannot be ours, and only sockets to the ports watched are asked
        // for: the rest of the table (time-wait sockets by the thousand on a busy host) stays
        // in the kernel.
        let states = StateFlags::all() - StateFlags::LISTEN;
        let mut ports: Vec<u16> = watched.iter().map(|w| w.watch.remote.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        if let Err(e) = conn_count::dump_to(states, true, &ports, |row| {
            let key = (row.remote, row.local_port);
            // A reused port: the live socket wins over a time-wait one.
            if wanted.contains(&key) && (row.state != state::TIME_WAIT || !table.contains_key(&key))
            {
                table.insert(key, row);
            }
        }) {
            let e = e.to_string();
            if last_error.as_ref() != Some(&e) {
                debug!(error = %e, "cannot read the socket table; non-blocking connects go unmeasured");
                last_error = Some(e);
            }
            // Nothing can be told: settle them all, so counts in flight do not stay up.
            let settled = watched
                .drain(..)
                .map(|w| Settled {
                    watch: w.watch,
                    latency: None,
                    failed: false,
                })
                .collect();
            apply(settled);
            continue;
        }
        last_error = None;
        let samples = settle(&mut watched, &table, Instant::now());
        if !samples.is_empty() {
            apply(samples);
        }
    }
}

fn add(watched: &mut Vec<Watched>, watch: Watch) {
    // The channel holds at most MAX_WATCHED, and everything watched settles within GIVE_UP, so
    // this stays bounded by the connect rate times GIVE_UP.
    watched.push(Watched {
        watch,
        connecting_for: None,
    });
}

/// Resolves what `table` (keyed by remote address and local port) settles and keeps the rest.
fn settle(
    watched: &mut Vec<Watched>,
    table: &HashMap<(SocketAddr, u16), SockRow>,
    now: Instant,
) -> Vec<Settled> {
    let mut settled = Vec::new();
    watched.retain_mut(|w| {
        let age = now.saturating_duration_since(w.watch.since);
        let mut end = |latency: Option<Duration>, failed: bool| {
            settled.push(Settled {
                watch: w.watch.clone(),
                latency: latency.map(|l| l.max(Duration::from_micros(1))),
                failed,
            });
        };
        let Some(row) = table.get(&(w.watch.remote, w.watch.local_port)) else {
            // Gone: see the module docs for why only a long wait counts.
            end(w.connecting_for.filter(|&d| d >= LONG_CONNECT), true);
            return false;
        };
        match (row.state, row.rtt_us) {
            (state::SYN_SENT, _) => {
                if age >= GIVE_UP {
                    end(Some(age), true);
                    return false;
                }
                w.connecting_for = Some(age);
                true
            }
            (state::TIME_WAIT | state::CLOSE, _) | (_, None) => {
                end(w.connecting_for, false);
                false
            }
            (_, Some(rtt)) => {
                let rtt = Duration::from_micros(u64::from(rtt));
                end(Some(rtt.max(w.connecting_for.unwrap_or_default())), false);
                false
            }
        }
    });
    settled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn watch(port: u16, since: Instant) -> Watched {
        Watched {
            watch: Watch {
                service: "web".parse().unwrap(),
                backend: a("127.0.0.2:80"),
                remote: a("127.0.0.2:8080"),
                local_port: port,
                since,
                slot: 0,
                counted: false,
                sampled: true,
            },
            connecting_for: None,
        }
    }

    fn row(port: u16, state: u8, rtt_us: Option<u32>) -> ((SocketAddr, u16), SockRow) {
        let remote = a("127.0.0.2:8080");
        (
            (remote, port),
            SockRow {
                remote,
                local_port: port,
                state,
                rtt_us,
            },
        )
    }

    #[test]
    fn established_connects_give_their_rtt_and_slow_ones_how_long_they_connected() {
        let t0 = Instant::now();
        let mut w = vec![
            watch(1, t0),
            watch(2, t0),
            watch(3, t0),
            watch(4, t0),
            watch(5, t0),
        ];
        let table: HashMap<_, _> = [
            row(1, state::ESTABLISHED, Some(120)),
            row(2, state::SYN_SENT, None),
            row(3, state::TIME_WAIT, None),
            // 4 is gone: a refused connect.
            row(5, state::SYN_SENT, None),
        ]
        .into();
        let s = settle(&mut w, &table, t0 + Duration::from_millis(2));
        // 1 is measured; 3 (set up and closed within a tick) and 4 (refused) tell nothing of
        // latency, and 4 is a failure hint.
        assert_eq!(s.len(), 3);
        let s = sampled(s);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].latency, Some(Duration::from_micros(120)));
        assert_eq!(w.len(), 2, "the connecting ones stay watched");

        // A second later 2 is established (its SYN was retransmitted; the RTT is small), and the
        // caller of 5 gave up waiting and closed it: both took a second.
        let table: HashMap<_, _> =
            [row(2, state::SYN_SENT, None), row(5, state::SYN_SENT, None)].into();
        assert!(settle(&mut w, &table, t0 + Duration::from_millis(1000)).is_empty());
        let table: HashMap<_, _> = [row(2, state::ESTABLISHED, Some(90))].into();
        let s = settle(&mut w, &table, t0 + Duration::from_millis(1010));
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.iter()
                .map(|s| (s.watch.local_port, s.failed))
                .collect::<Vec<_>>(),
            [(2, false), (5, true)],
            "the one given up on is a failure hint"
        );
        assert!(
            s.iter()
                .all(|s| s.latency == Some(Duration::from_millis(1000))),
            "both seen connecting for 1 s: {s:?}"
        );
        assert!(w.is_empty());

        // Seen connecting only briefly and then gone: refused nearby, or set up and closed between
        // two looks. Never a sample: a refusing backend must not look fast.
        let mut w = vec![watch(7, t0)];
        let table: HashMap<_, _> = [row(7, state::SYN_SENT, None)].into();
        assert!(settle(&mut w, &table, t0 + Duration::from_micros(300)).is_empty());
        let s = settle(&mut w, &HashMap::new(), t0 + Duration::from_millis(2));
        assert_eq!((s.len(), s[0].latency, s[0].failed), (1, None, true));
        assert!(w.is_empty());

        // One that never finishes is reported at the give-up time.
        let mut w = vec![watch(6, t0)];
        let table: HashMap<_, _> = [row(6, state::SYN_SENT, None)].into();
        let s = settle(&mut w, &table, t0 + GIVE_UP);
        assert_eq!((s[0].latency, s[0].failed), (Some(GIVE_UP), true));
        assert!(w.is_empty());
    }

    fn nonblocking_connect(to: SocketAddr) -> (socket2::Socket, u16) {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&to.into()); // EINPROGRESS, or refused at once on loopback
        let port = s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map_or(0, |a| a.port());
        (s, port)
    }

    fn sampled(s: Vec<Settled>) -> Vec<Settled> {
        s.into_iter().filter(|s| s.latency.is_some()).collect()
    }

    fn watcher() -> (Watcher, std::sync::mpsc::Receiver<Settled>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let watcher = Watcher::spawn(move |samples| {
            for s in samples {
                let _ = tx.send(s);
            }
        })
        .unwrap();
        (watcher, rx)
    }

    fn watch_of(remote: SocketAddr, local_port: u16, since: Instant) -> Watch {
        Watch {
            service: "web".parse().unwrap(),
            backend: remote,
            remote,
            local_port,
            since,
            slot: 0,
            counted: false,
            sampled: true,
        }
    }

    #[test]
    fn the_live_kernel_table_times_a_connect_stuck_behind_a_full_accept_queue() {
        // A listener that never accepts, its queue filled: the kernel drops further SYNs.
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        listener.listen(0).unwrap();
        let remote = listener.local_addr().unwrap().as_socket().unwrap();
        let _fill: Vec<_> = (0..4).map(|_| nonblocking_connect(remote)).collect();
        std::thread::sleep(Duration::from_millis(50));
        let (stuck, port) = nonblocking_connect(remote);
        let (watcher, rx) = watcher();
        // Reported as if it had been connecting for the give-up time already.
        let since = Instant::now().checked_sub(GIVE_UP).unwrap();
        watcher.watch(watch_of(remote, port, since));
        let s = rx.recv_timeout(Duration::from_secs(5)).expect("a sample");
        assert!(s.latency >= Some(GIVE_UP) && s.failed, "{s:?}");
        drop(stuck);
    }

    #[test]
    fn the_live_kernel_table_gives_no_sample_for_a_refused_connect() {
        // A port nothing listens on (bound, then closed).
        let remote = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (refused, port) = nonblocking_connect(remote);
        let (watcher, rx) = watcher();
        watcher.watch(watch_of(remote, port, Instant::now()));
        let s = rx.recv_timeout(Duration::from_secs(2)).expect("settled");
        assert_eq!(
            (s.latency, s.failed),
            (None, true),
            "a refused connect must not be sampled as fast, and is a failure hint"
        );
        drop(refused);
    }

    #[test]
    fn the_live_kernel_table_measures_a_real_non_blocking_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let remote = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let watcher = Watcher::spawn(move |samples| {
            for s in samples {
                let _ = tx.send(s);
            }
        })
        .unwrap();
        let held = std::net::TcpStream::connect(remote).unwrap();
        watcher.watch(Watch {
            service: "web".parse().unwrap(),
            backend: remote,
            remote,
            local_port: held.local_addr().unwrap().port(),
            since: Instant::now(),
            slot: 0,
            counted: false,
            sampled: true,
        });
        let s = rx.recv_timeout(Duration::from_secs(5)).expect("a sample");
        assert_eq!((s.watch.backend, s.failed), (remote, false));
        let latency = s.latency.unwrap();
        assert!(
            latency > Duration::ZERO && latency < Duration::from_secs(1),
            "{s:?}"
        );
    }
}
