//! What hooks report, and what the daemon does with it. Hooks append reports to the ring in the
//! live region (a failed blocking connect, a non-blocking connect under way, a measured
//! connect); one thread reads them, waking on a futex when the ring was empty:
//!
//! - a connect under way is followed in the kernel's socket table (`latency`): when it settles
//!   its count in flight ends, its latency feeds p2c-ewma, and if it never got established it
//!   becomes a failure hint;
//! - a failed connect is a failure hint;
//! - a measured connect feeds p2c-ewma.
//!
//! Reports are hints, not verdicts: the ring is writable by every hooked process. A failure hint
//! makes the daemon connect to that backend itself ([`Prober`], at most once a second per
//! backend); only a failure of its own connect counts against the backend, and ejects it from
//! picks and SRV answers. A false report costs one probe, never a backend.
//!
//! The same thread keeps the table's stats current: least-conn's established connections
//! (every [`conn_count::REFRESH`] while a least-conn service exists), p2c-ewma estimates as they
//! decay, and rebuilds of generations that change with time (slow start, ejection ends).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use discotech_wire::live::{self, Entry, Report, Take};
use discotech_wire::pick::uncount;
use discotech_wire::table::NO_SLOT;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connect::conn_count;
use crate::connect::latency::{Settled, Watch, Watcher};
use crate::connect::table::RoutingTable;
use crate::discovery::registry::Command;
use crate::discovery::snapshot::SharedSnapshot;
use crate::metrics::METRICS;
use crate::service::{LbPolicy, ServiceName};

/// A backend a hook saw fail, to be confirmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    pub service: ServiceName,
    /// The backend's default address (the balancer's key).
    pub backend: SocketAddr,
    /// Where the failed connect went.
    pub addr: SocketAddr,
}

/// How long the daemon's own connect to a suspect backend may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// At most one probe per backend address this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Hints queued for the prober at most; more are dropped (the next failure hints again).
const HINT_QUEUE: usize = 1024;

/// Sends hints to the prober without ever waiting.
#[derive(Clone, Debug)]
pub struct Hints(mpsc::Sender<Hint>);

impl Hints {
    pub fn send(&self, hint: Hint) {
        METRICS.count_hook_request(hint.service.as_str(), "failure_hint");
        if self.0.try_send(hint).is_err() {
            debug!("failure hint queue full; dropped");
        }
    }
}

/// Confirms failure hints with connects of its own.
pub struct Prober {
    table: Arc<RoutingTable>,
    snapshot: SharedSnapshot,
    ejections: Option<mpsc::Sender<Command>>,
}

impl Prober {
    /// Starts the prober on the current runtime; returns where to send hints.
    pub fn spawn(
        table: Arc<RoutingTable>,
        snapshot: SharedSnapshot,
        ejections: Option<mpsc::Sender<Command>>,
        shutdown: CancellationToken,
    ) -> Hints {
        let (tx, rx) = mpsc::channel(HINT_QUEUE);
        let me = Arc::new(Self {
            table,
            snapshot,
            ejections,
        });
        tokio::spawn(me.run(rx, shutdown));
        Hints(tx)
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Hint>, shutdown: CancellationToken) {
        let mut last: HashMap<SocketAddr, Instant> = HashMap::new();
        loop {
            let hint = tokio::select! {
                () = shutdown.cancelled() => return,
                h = rx.recv() => match h { Some(h) => h, None => return },
            };
            let now = Instant::now();
            if last
                .get(&hint.addr)
                .is_some_and(|&t| now.saturating_duration_since(t) < PROBE_EVERY)
            {
                continue;
            }
            last.insert(hint.addr, now);
            if last.len() > 4096 {
                last.retain(|_, t| now.saturating_duration_since(*t) < PROBE_EVERY);
            }
            let me = self.clone();
            tokio::spawn(async move { me.probe(hint).await });
        }
    }

    /// Publishes what the probe found (p2c and least-conn avoid a failing backend at once,
    /// before any ejection).
    fn mark_failing(&self, hint: &Hint, failing: bool) {
        if let Some(slot) = self.table.slot_of(&hint.service, hint.backend) {
            self.table.set_failing(slot, failing);
        }
    }

    async fn probe(&self, hint: Hint) {
        let result =
            tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(hint.addr)).await;
        let error = match result {
            Ok(Ok(_)) => {
                debug!(service = %hint.service, addr = %hint.addr, "failure hint not confirmed: the backend accepts");
                METRICS.count_hook_request(hint.service.as_str(), "hint_refuted");
                self.mark_failing(&hint, false);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
        };
        METRICS.count_hook_request(hint.service.as_str(), "hint_confirmed");
        self.mark_failing(&hint, true);
        let snap = self.snapshot.load();
        let Some(service) = snap.service(hint.service.as_str()) else {
            return;
        };
        let spec = &service.spec;
        let now = Instant::now();
        let outcome = {
            let mut balancer = self
                .table
                .balancer()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            balancer.confirm_failure(spec, hint.backend, now)
        };
        use crate::connect::balancer::FailureOutcome;
        match outcome {
            FailureOutcome::Ejected { for_, times } => {
                info!(service = %spec.name, backend = %hint.backend, %error, ejection = ?for_, times, "backend ejected: a hook saw it fail and the daemon's own connect failed too");
                METRICS.count_hook_request(spec.name.as_str(), "backend_ejected");
                self.table.invalidate(&spec.name);
                let eject = Command::Eject {
                    service: spec.name.clone(),
                    addr: hint.backend,
                    until: now.checked_add(for_).unwrap_or(now),
                    reason: format!(
                        "ejected: a connect failed ({error}), confirmed by the daemon, for {}",
                        crate::duration::format(for_)
                    ),
                };
                match &self.ejections {
                    Some(tx) => {
                        if tx.send(eject).await.is_err() {
                            debug!("registry gone; ejection not published");
                        }
                    }
                    None => self.table.refresh_now(),
                }
            }
            FailureOutcome::CapReached { consecutive } => {
                debug!(service = %spec.name, backend = %hint.backend, consecutive, "not ejected: the service has its maximum share ejected");
            }
            FailureOutcome::Held { consecutive } => {
                debug!(service = %spec.name, backend = %hint.backend, consecutive, %error, "confirmed failure; outlier ejection is off");
            }
            FailureOutcome::Unknown => {}
        }
    }
}

/// The thread that reads the ring and keeps the stats (see the module docs). Stops when
/// dropped.
pub struct ReportReader {
    stop: Arc<AtomicBool>,
    table: Arc<RoutingTable>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ReportReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportReader").finish_non_exhaustive()
    }
}

impl Drop for ReportReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(head) = self.table.live().and_then(|l| l.head_word()) {
            discotech_shm::futex_wake(head);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A writer that claimed a ring entry and has not written it this long is taken for dead.
const STUCK: Duration = Duration::from_millis(50);
/// Entries handled before the stats get a turn.
const BATCH: usize = 1024;
/// How often decaying p2c-ewma estimates are republished.
const DECAY_EVERY: Duration = Duration::from_secs(1);
/// While reports keep coming the reader polls the ring every [`POLL`] instead of sleeping on
/// the futex, so a busy host pays no wake-up per connect (hooks wake only a sleeping reader);
/// after [`BUSY_FOR`] without a report it sleeps until woken.
const POLL: Duration = Duration::from_millis(1);
const BUSY_FOR: Duration = Duration::from_millis(100);

impl ReportReader {
    /// Starts the thread. Its latency watcher is started with it (without one, connects under
    /// way are uncounted at once and go unmeasured).
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn(table: Arc<RoutingTable>, hints: Hints) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (table.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("hook-reports".into())
            .spawn(move || Reader::new(t, hints).run(&s))?;
        Ok(Self {
            stop,
            table,
            thread: Some(thread),
        })
    }
}

struct Reader {
    table: Arc<RoutingTable>,
    hints: Hints,
    watcher: Option<Watcher>,
    next_counts: Instant,
    next_decay: Instant,
}

/// A latency watcher whose settled connects end their counts in flight, feed p2c-ewma and
/// hint failures.
pub fn watcher(table: Arc<RoutingTable>, hints: Hints) -> Option<Watcher> {
    let mut hinted = HashMap::new();
    match Watcher::spawn(move |settled| on_settled(&table, &hints, &mut hinted, settled)) {
        Ok(w) => Some(w),
        Err(error) => {
            warn!(%error, "cannot start the connect watcher; non-blocking connects go unmeasured and unchecked");
            None
        }
    }
}

impl Reader {
    fn new(table: Arc<RoutingTable>, hints: Hints) -> Self {
        let watcher = watcher(table.clone(), hints.clone());
        let now = Instant::now();
        Self {
            table,
            hints,
            watcher,
            next_counts: now,
            next_decay: now + DECAY_EVERY,
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut tail = self
            .table
            .live()
            .and_then(|l| l.head_word())
            .map_or(0, |h| h.load(Ordering::SeqCst));
        let mut stuck_since: Option<(u32, Instant)> = None;
        let mut last_report = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let table = self.table.clone();
            let Some(live) = table.live() else {
                self.upkeep(Instant::now());
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let mut last = Take::Empty;
            for _ in 0..BATCH {
                last = live.take(tail);
                match last {
                    Take::Entry(e) => {
                        last_report = Instant::now();
                        tail = tail.wrapping_add(1);
                        stuck_since = None;
                        if let Some(e) = e {
                            self.handle(&e);
                        }
                    }
                    Take::Lapped(t) => {
                        debug!(
                            skipped = t.wrapping_sub(tail),
                            "hook report ring overran; reports lost"
                        );
                        tail = t;
                    }
                    Take::NotYet => {
                        let now = Instant::now();
                        match stuck_since {
                            Some((t, since))
                                if t == tail && now.saturating_duration_since(since) >= STUCK =>
                            {
                                tail = tail.wrapping_add(1);
                                stuck_since = None;
                                continue;
                            }
                            Some((t, _)) if t == tail => {}
                            _ => stuck_since = Some((tail, now)),
                        }
                        break;
                    }
                    Take::Empty => break,
                }
            }
            let now = Instant::now();
            self.upkeep(now);
            match last {
                Take::NotYet => std::thread::sleep(POLL),
                Take::Empty if now.saturating_duration_since(last_report) < BUSY_FOR => {
                    std::thread::sleep(POLL.min(self.next_wake(now)));
                }
                Take::Empty => {
                    let wait = self.next_wake(now);
                    if let (Some(head), Some(waiting)) = (live.head_word(), live.waiting_word()) {
                        waiting.store(1, Ordering::SeqCst);
                        if matches!(live.take(tail), Take::Empty) && !stop.load(Ordering::SeqCst) {
                            let ms = u32::try_from(wait.as_millis()).unwrap_or(1000).max(1);
                            discotech_shm::futex_wait(head, tail, ms);
                        }
                        waiting.store(0, Ordering::SeqCst);
                    }
                }
                _ => {}
            }
        }
    }

    /// How long the thread may sleep when the ring is empty.
    fn next_wake(&self, now: Instant) -> Duration {
        let mut at = self.next_decay;
        if self.table.has_slots_of(LbPolicy::LeastConn) {
            at = at.min(self.next_counts);
        }
        if let Some(t) = self.table.rebuild_at() {
            at = at.min(t);
        }
        at.saturating_duration_since(now)
            .min(Duration::from_millis(u64::from(live::SAMPLE_WAIT_MS)))
    }

    fn handle(&self, e: &Entry) {
        let Some(info) = self.table.slot(e.slot) else {
            return;
        };
        let uncount_it = || {
            if e.counted
                && let Some(live) = self.table.live()
            {
                uncount(&live, e.slot);
            }
        };
        if !info.ports.contains(&e.remote_port) {
            // Not a port of this backend: a confused or hostile report.
            uncount_it();
            return;
        }
        let addr = SocketAddr::new(info.backend.ip(), e.remote_port);
        match e.report {
            Report::Failed { errno } => {
                debug!(service = %info.service, %addr, errno, "hook reports a failed connect");
                uncount_it();
                self.hints.send(Hint {
                    service: info.service,
                    backend: info.backend,
                    addr,
                });
            }
            Report::Pending { local_port } => {
                let watch = Watch {
                    service: info.service,
                    backend: info.backend,
                    remote: addr,
                    local_port,
                    since: Instant::now(),
                    slot: e.slot,
                    counted: e.counted,
                    sampled: info.policy == LbPolicy::P2cEwma,
                };
                match &self.watcher {
                    Some(w) => w.watch(watch),
                    None => uncount_it(),
                }
            }
            Report::Connected { latency_us } => {
                uncount_it();
                self.table.set_failing(e.slot, false);
                if info.policy == LbPolicy::P2cEwma && latency_us > 0 {
                    let took = Duration::from_micros(u64::from(latency_us));
                    observe(&self.table, &info.service, info.backend, e.slot, took);
                }
            }
        }
    }

    fn upkeep(&mut self, now: Instant) {
        if now >= self.next_counts {
            self.next_counts = now + conn_count::REFRESH;
            let slots = self.table.slots_of(LbPolicy::LeastConn);
            if !slots.is_empty() {
                publish_connections(&self.table, &slots);
            }
        }
        if now >= self.next_decay {
            self.next_decay = now + DECAY_EVERY;
            let balancer = self
                .table
                .balancer()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (slot, info) in self.table.slots_of(LbPolicy::P2cEwma) {
                let estimate = balancer.latency_estimate(&info.service, info.backend, now);
                self.table.set_latency(slot, estimate);
            }
        }
        self.table.refresh(now);
    }
}

/// Established connections per least-conn backend (over all its ports), from the kernel; the
/// connects counted in flight before the count are then taken off, as the count shows them.
fn publish_connections(table: &RoutingTable, slots: &[(u32, crate::connect::table::SlotInfo)]) {
    let live = table.live();
    let before: Vec<u32> = slots
        .iter()
        .map(|(s, _)| live.map_or(0, |l| l.in_flight_count(*s)))
        .collect();
    let (counts, error) = conn_count::read();
    if let Some(error) = error {
        debug!(%error, "cannot read the socket table; least-conn sees no connections");
    }
    for ((slot, info), seen) in slots.iter().zip(before) {
        let n: u32 = info
            .ports
            .iter()
            .map(|&p| {
                counts
                    .get(&SocketAddr::new(info.backend.ip(), p))
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        table.set_stat(*slot, 0, n);
        if let Some(c) = live.and_then(|l| l.in_flight(*slot)) {
            let was = u32::from_le(c.fetch_sub(seen.to_le(), Ordering::Relaxed));
            // A failed connect uncounted by its hook after this count took it off: the counter
            // went below zero; bring it back rather than undercount from now on.
            let now = was.wrapping_sub(seen);
            if (now as i32) < 0 {
                let _ = c.compare_exchange(now.to_le(), 0, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }
}

/// Feeds one connect latency to p2c-ewma and publishes the backend's new estimate.
pub fn observe(
    table: &RoutingTable,
    service: &ServiceName,
    backend: SocketAddr,
    slot: u32,
    took: Duration,
) {
    let now = Instant::now();
    let estimate = {
        let mut balancer = table
            .balancer()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        balancer.observe_latency(service, backend, took, now);
        balancer.latency_estimate(service, backend, now)
    };
    if slot != NO_SLOT {
        table.set_latency(slot, estimate);
    }
}

/// What the latency watcher settled: counts in flight end, latencies feed p2c-ewma, failures
/// become hints.
fn on_settled(
    table: &RoutingTable,
    hints: &Hints,
    hinted: &mut HashMap<SocketAddr, Instant>,
    settled: Vec<Settled>,
) {
    let live = table.live();
    let now = Instant::now();
    for s in settled {
        let w = &s.watch;
        if w.counted
            && let Some(live) = live
        {
            uncount(&live, w.slot);
        }
        if let Some(latency) = s.latency
            && w.sampled
        {
            observe(table, &w.service, w.backend, w.slot, latency);
        }
        // A connect seen established clears the mark; one seen failing (it was seen
        // connecting, so this is no quick connection missed between two looks) sets it.
        if w.slot != NO_SLOT && (!s.failed || s.latency.is_some()) {
            table.set_failing(w.slot, s.failed);
        }
        // The prober looks at a backend at most once a PROBE_EVERY: hints in between would
        // only be dropped there, after costing a metric and a queue slot each.
        if s.failed
            && hinted
                .get(&w.remote)
                .is_none_or(|&t| now.saturating_duration_since(t) >= PROBE_EVERY)
        {
            hinted.insert(w.remote, now);
            if hinted.len() > 4096 {
                hinted.retain(|_, t| now.saturating_duration_since(*t) < PROBE_EVERY);
            }
            hints.send(Hint {
                service: w.service.clone(),
                backend: w.backend,
                addr: w.remote,
            });
        }
    }
}
