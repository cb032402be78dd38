//! The shared routing table, the daemon's side: after every snapshot swap it writes the next
//! generation into `hook.snapshot` (beside the hook socket), which hooked processes map
//! read-only and pick from at connect time; it owns the live region (round-robin counters,
//! connects in flight, the report ring) that it passes to hooks over the hook socket; and it
//! keeps the per-backend stats in the table current (least-conn counts, p2c-ewma estimates).
//! The byte layout and the pick itself live in `discotech-wire` (`table`, `live`, `pick`).
//!
//! Slots: every (service, backend) gets a stat and counter slot, every service a round-robin
//! slot, kept while it stays in the table; a freed slot rests for [`SLOT_REST`] before reuse,
//! so a hook still holding an older generation never counts for a stranger.
//!
//! Records of services that did not change are copied from the last generation, so a change
//! costs one encoded service plus a copy of the rest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use discotech_shm::Mapping;
use discotech_wire::live::{self, Live};
use discotech_wire::pick::{self, Ask, Miss, Picked};
use discotech_wire::table::build::{self, AreaInfo, Record};
use discotech_wire::table::{
    self as wire_table, NO_SLOT, Policy, STAT_FAILING, STAT_MEASURED, SVC_PREFETCH, Standing, Table,
};
use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, info, warn};

use crate::connect::balancer::{Balancer, PickSet, PickSets};
use crate::discovery::snapshot::{Service, Snapshot};
use crate::service::{LbPolicy, ServiceName, ServiceSpec};

/// Backend slots in the live region and the stats (a backend past them picks without counters).
pub const BACKEND_SLOTS: u32 = 1 << 18;
/// Service (round-robin counter) slots.
pub const SERVICE_SLOTS: u32 = 1 << 16;
/// Report ring entries.
pub const RING: u32 = 4096;
/// How long a freed slot rests before it is given to another backend or service.
pub const SLOT_REST: Duration = Duration::from_secs(60);
/// Smooth weighted round-robin schedules are at most this long.
const MAX_SCHEDULE: usize = 4096;
/// The smallest area a new table file gets, in words.
const MIN_AREA_WORDS: usize = 1 << 16;

/// What a slot stands for: the reports of hooks name backends by slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub service: ServiceName,
    /// The backend's default address (the balancer's key).
    pub backend: SocketAddr,
    /// Every port the backend serves the service on (default and named).
    pub ports: Vec<u16>,
    pub policy: LbPolicy,
}

struct Cached {
    service: Arc<Service>,
    /// The slot of each of `service`'s backends, in its order (`NO_SLOT`: none left).
    slots: Vec<u32>,
    record: Placed,
    magics: Vec<IpAddr>,
    /// When it must be encoded again: its weights or candidates change with time (slow start,
    /// an ejection that ends), or its record went missing.
    rebuild_at: Option<Instant>,
}

/// Where a service's record is: encoded and not yet written, or at `at` (for `len` words) in
/// the active area of the table file, whence the next generation copies it.
enum Placed {
    New(Vec<u32>),
    At { at: u32, len: u32 },
}

struct Writer {
    file: Option<TableFile>,
    cache: HashMap<ServiceName, Cached>,
    backends: SlotPool,
    /// The service each backend slot given out belongs to (the slot's place in its `Cached`
    /// says which backend).
    owners: Vec<Option<ServiceName>>,
    services: SlotMap<ServiceName>,
    last: Option<Arc<Snapshot>>,
    rebuild_at: Option<Instant>,
    /// Services encoded anew (or gone) by the write under way.
    encoded: Vec<ServiceName>,
}

/// Writes remembered by [`RoutingTable::changed_since`].
const CHANGES_KEPT: usize = 64;

/// The daemon's routing table: see the module docs.
pub struct RoutingTable {
    path: PathBuf,
    magic_v4: Ipv4Net,
    magic_v6: Option<Ipv6Net>,
    balance: Arc<Mutex<Balancer>>,
    live: Option<LiveRegion>,
    /// The current table mapping, for readers (picks for the socket, explanations, stats).
    current: ArcSwap<Option<(Arc<Mapping>, usize)>>,
    writer: Mutex<Writer>,
    /// Backends marked failing, and when the mark lapses.
    failing: Mutex<HashMap<u32, Instant>>,
    /// Tables written so far (a generation, or the same one rebuilt): readers that mirror the
    /// table elsewhere (the catch path) look again when it moves.
    writes: std::sync::atomic::AtomicU64,
    /// The services each of the last writes changed, by write number.
    changes: Mutex<VecDeque<(u64, Vec<ServiceName>)>>,
}

/// Bound on the candidates [`RoutingTable::candidates`] lists (a pick set holds no more
/// backends than its service, which sources bound well below this).
const MAX_CANDIDATES: u32 = 65_536;

/// How long a failing mark holds without a new failure. It is a hint to p2c and least-conn,
/// not an ejection: it lapses by itself, so a backend nobody tries again is tried again.
pub const FAILING_HOLDS: Duration = Duration::from_secs(1);

impl std::fmt::Debug for RoutingTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingTable")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent enough state for picks: recover rather
    // than refuse every connect from then on.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn policy(lb: LbPolicy) -> Policy {
    match lb {
        LbPolicy::RoundRobin => Policy::RoundRobin,
        LbPolicy::WeightedRoundRobin => Policy::WeightedRoundRobin,
        LbPolicy::Random => Policy::Random,
        LbPolicy::P2c => Policy::P2c,
        LbPolicy::P2cEwma => Policy::P2cEwma,
        LbPolicy::LeastConn => Policy::LeastConn,
        LbPolicy::Maglev => Policy::Maglev,
    }
}

fn wire_set(set: &PickSet) -> build::PickSet {
    // Effective weights are scaled (x1000) and small: they fit a word.
    let candidates: Vec<(u32, u32)> = set
        .candidates
        .iter()
        .map(|&(i, w)| (i as u32, u32::try_from(w).unwrap_or(u32::MAX)))
        .collect();
    let weights: Vec<u32> = candidates.iter().map(|&(_, w)| w).collect();
    build::PickSet {
        schedule: build::smooth_schedule(&weights, MAX_SCHEDULE),
        maglev: set
            .maglev
            .iter()
            .map(|&p| u16::try_from(p).unwrap_or(0))
            .collect(),
        candidates,
    }
}

impl RoutingTable {
    /// A table to be written at `path`, with a new live region (None for it if memfds are not
    /// available: hooks then pick from the table with counters of their own).
    pub fn new(
        path: &Path,
        magic_v4: Ipv4Net,
        magic_v6: Option<Ipv6Net>,
        balance: Arc<Mutex<Balancer>>,
    ) -> Self {
        let live = match LiveRegion::create() {
            Ok(l) => Some(l),
            Err(errno) => {
                warn!(
                    error = %std::io::Error::from_raw_os_error(errno),
                    "cannot create the live region: hooked programs balance without shared counters"
                );
                None
            }
        };
        Self {
            path: path.to_path_buf(),
            magic_v4,
            magic_v6,
            balance,
            live,
            current: ArcSwap::from_pointee(None),
            writer: Mutex::new(Writer {
                file: None,
                cache: HashMap::new(),
                backends: SlotPool::new(BACKEND_SLOTS),
                owners: Vec::new(),
                services: SlotMap::new(SERVICE_SLOTS),
                last: None,
                rebuild_at: None,
                encoded: Vec::new(),
            }),
            failing: Mutex::new(HashMap::new()),
            writes: std::sync::atomic::AtomicU64::new(0),
            changes: Mutex::new(VecDeque::new()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks the table file superseded as the daemon stops: hooks keep routing by it (it
    /// stays where it is, and its mapping stays valid), and look at the path again now and then
    /// until a new daemon has replaced it.
    pub fn retire(&self) {
        if let Some(f) = &lock(&self.writer).file {
            wire_table::supersede(f.map.words());
        }
    }

    /// The balancer the table is built with (shared with the hook server).
    pub fn balancer(&self) -> &Arc<Mutex<Balancer>> {
        &self.balance
    }

    /// The live region's descriptor and epoch, to pass to a hook.
    pub fn live_fd(&self) -> Option<(BorrowedFd<'_>, u64)> {
        self.live.as_ref().map(|l| (l.fd.as_fd(), l.epoch))
    }

    /// The live region as this process maps it.
    pub fn live(&self) -> Option<Live<'_>> {
        self.live.as_ref().and_then(|l| Live::new(l.map.words()))
    }

    /// When the table must be rebuilt without a new snapshot (a slow-start ramp, an ejection
    /// that ends), if ever.
    pub fn rebuild_at(&self) -> Option<Instant> {
        lock(&self.writer).rebuild_at
    }

    /// Rebuilds the last snapshot's generation if something in it changes with time.
    pub fn refresh(&self, now: Instant) {
        let lapsed: Vec<u32> = {
            let mut marks = lock(&self.failing);
            let lapsed = marks
                .iter()
                .filter(|&(_, &until)| until <= now)
                .map(|(&s, _)| s)
                .collect();
            marks.retain(|_, until| *until > now);
            lapsed
        };
        for slot in lapsed {
            self.with_table(|_, words, area_words| {
                wire_table::update_stat(words, area_words, slot, 2, STAT_FAILING, 0);
            });
        }
        let last = {
            let w = lock(&self.writer);
            match (w.rebuild_at, &w.last) {
                (Some(at), Some(last)) if at <= now => Some(last.clone()),
                _ => None,
            }
        };
        if let Some(snap) = last {
            self.publish(&snap);
        }
    }

    /// Rebuilds the last snapshot's generation now (the balancer changed what it would say).
    pub fn refresh_now(&self) {
        let last = lock(&self.writer).last.clone();
        if let Some(snap) = last {
            self.publish(&snap);
        }
    }

    /// Forces the next publish to re-encode `service` (its balancing state changed: an
    /// ejection).
    pub fn invalidate(&self, service: &ServiceName) {
        lock(&self.writer).cache.remove(service);
    }

    /// Writes the generation for `snapshot`.
    pub fn publish(&self, snapshot: &Arc<Snapshot>) {
        self.write(snapshot);
        let encoded = std::mem::take(&mut lock(&self.writer).encoded);
        // After the write: a reader that sees the new count, or the change, reads the new table.
        let n = self
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Release)
            + 1;
        let mut changes = lock(&self.changes);
        if changes.len() >= CHANGES_KEPT {
            changes.pop_front();
        }
        changes.push_back((n, encoded));
    }

    /// The services whose records changed (or that left) in the writes after write `since`, and
    /// the last write number; None when more writes than are remembered came since (look at
    /// every service then).
    pub fn changed_since(&self, since: u64) -> Option<(u64, HashSet<ServiceName>)> {
        let changes = lock(&self.changes);
        let latest = changes.back().map_or(since, |c| c.0);
        if latest <= since {
            return Some((since, HashSet::new()));
        }
        if changes.front().is_none_or(|c| c.0 > since + 1) {
            return None;
        }
        let names = changes
            .iter()
            .filter(|c| c.0 > since)
            .flat_map(|c| c.1.iter().cloned())
            .collect();
        Some((latest, names))
    }

    /// Writes the generation; the services encoded anew or gone are left in `encoded`.
    fn write(&self, snapshot: &Arc<Snapshot>) {
        let now = Instant::now();
        let mut w = lock(&self.writer);
        let w = &mut *w;
        w.encoded.clear();
        let mut fresh = Vec::new();
        let mut rebuild_at: Option<Instant> = None;
        {
            let mut balancer = lock(&self.balance);
            for service in snapshot.services() {
                let name = service.name();
                let reuse = w.cache.get(name).is_some_and(|c| {
                    Arc::ptr_eq(&c.service, service) && c.rebuild_at.is_none_or(|t| t > now)
                });
                if !reuse {
                    // Backends it keeps keep their slots; those it no longer has give theirs back.
                    let mut had: HashMap<SocketAddr, u32> = w
                        .cache
                        .get(name)
                        .map(|old| {
                            let addrs = old.service.spec.backends.iter().map(|b| b.addr);
                            addrs.zip(old.slots.iter().copied()).collect()
                        })
                        .unwrap_or_default();
                    let sets = balancer.pick_sets(&service.spec, now);
                    let cached = encode(w, service, &sets, now, &mut fresh, &mut had);
                    for (addr, slot) in had {
                        release_backend(w, name, addr, slot, now);
                    }
                    w.encoded.push(name.clone());
                    w.cache.insert(name.clone(), cached);
                }
                if let Some(c) = w.cache.get(name)
                    && let Some(t) = c.rebuild_at
                {
                    rebuild_at = Some(rebuild_at.map_or(t, |r| r.min(t)));
                }
            }
        }
        // Services that left give back their slots and their backends' (only when some left: a
        // generation that changed one service costs that service, not all of them). Every
        // service of the snapshot is in the cache by now, so any more are services that left.
        if w.cache.len() > snapshot.len() {
            lock(&self.balance).retain(|name| snapshot.service(name.as_str()).is_some());
            let left: Vec<Arc<Service>> = w
                .cache
                .iter()
                .filter(|(n, _)| snapshot.service(n.as_str()).is_none())
                .map(|(_, c)| c.service.clone())
                .collect();
            for service in left {
                let name = service.name();
                if let Some(c) = w.cache.remove(name) {
                    for (b, &slot) in c.service.spec.backends.iter().zip(&c.slots) {
                        release_backend(w, name, b.addr, slot, now);
                    }
                }
                w.services.release(name, now);
                w.encoded.push(name.clone());
            }
        }
        // A fresh slot starts from zero counts and stats.
        if let Some(live) = self.live() {
            for &slot in &fresh {
                for c in [live.in_flight(slot), live.rr(slot)].into_iter().flatten() {
                    c.store(0, Ordering::Relaxed);
                }
            }
        }
        let info = AreaInfo {
            generation: snapshot.generation,
            magic_v4: (self.magic_v4.network(), self.magic_v4.prefix_len()),
            magic_v6: self.magic_v6.map(|n| (n.network(), n.prefix_len())),
            live_epoch: self.live.as_ref().map_or(0, |l| l.epoch),
        };
        w.last = Some(snapshot.clone());
        w.rebuild_at = rebuild_at;
        if let Some(file) = &w.file {
            for &slot in &fresh {
                for word in 0..wire_table::STAT_WORDS {
                    wire_table::set_stat(file.map.words(), file.area_words, slot, word, 0);
                }
            }
        }
        self.write_area(w, snapshot, &info);
    }

    /// Writes the area of `snapshot`'s generation: records encoded anew from the cache, the
    /// others copied from the active area. Into the file when it fits, otherwise into a new
    /// file twice as large as needed, which then replaces it.
    fn write_area(&self, w: &mut Writer, snapshot: &Snapshot, info: &AreaInfo) {
        let active = w
            .file
            .as_ref()
            .and_then(|f| wire_table::active_area(f.map.words()));
        // Each record, and apart (to be told where its record went) its service and length.
        let mut records = Vec::with_capacity(w.cache.len());
        let mut lens = Vec::with_capacity(w.cache.len());
        for service in snapshot.services() {
            let Some(c) = w.cache.get(service.name()) else {
                continue;
            };
            let record = match &c.record {
                Placed::New(words) => Record::New(words),
                Placed::At { at, len } => {
                    let (at, len) = (*at as usize, *len as usize);
                    match active.and_then(|a| a.get(at..at + len)) {
                        Some(words) => Record::Mapped(words),
                        None => {
                            // Cannot happen (a placed record is in the active area): rather than
                            // publish a partial generation, encode every service anew at once.
                            // Their slots stay theirs.
                            warn!(service = %service.name(), "a routing-table record went missing; rewriting the whole table");
                            let now = Instant::now();
                            for c in w.cache.values_mut() {
                                c.rebuild_at = Some(now);
                            }
                            w.rebuild_at = Some(now);
                            return;
                        }
                    }
                }
            };
            lens.push((service.name().clone(), record.len() as u32));
            records.push((c.magics.as_slice(), record));
        }
        let mut placed = Vec::with_capacity(records.len());
        let written = w.file.as_ref().is_some_and(|f| {
            wire_table::publish_records(f.map.words(), info, &records, &mut placed).is_ok()
        });
        if !written {
            // No file yet, or this generation outgrew it: a new file, twice as large as needed.
            // Until it is installed, the cache keeps pointing into the old one, untouched.
            let needed = build::area_len(&records);
            let mut file = match TableFile::create(&self.path, (needed * 2).max(MIN_AREA_WORDS)) {
                Ok(file) => file,
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "cannot create the routing table file; hooks ask the daemon");
                    return;
                }
            };
            placed.clear();
            if wire_table::publish_records(file.map.words(), info, &records, &mut placed).is_err() {
                warn!(needed, "a table generation does not fit a new file");
                return;
            }
            // Stats carry over: the slots are the same.
            if let Some(old) = &w.file {
                copy_stats(old, &file);
            }
            if let Err(e) = file.install(&self.path) {
                warn!(path = %self.path.display(), error = %e, "cannot install the routing table");
                return;
            }
            drop(records);
            if let Some(old) = w.file.replace(file) {
                wire_table::supersede(old.map.words());
            }
            if let Some(f) = &w.file {
                info!(path = %self.path.display(), words = f.area_words, "routing table file (re)created");
                self.current
                    .store(Arc::new(Some((f.map.clone(), f.area_words))));
            }
        }
        for ((name, len), at) in lens.into_iter().zip(placed) {
            if let Some(c) = w.cache.get_mut(&name) {
                c.record = Placed::At { at, len };
            }
        }
    }

    /// The snapshot of the current generation.
    pub fn last_snapshot(&self) -> Option<Arc<Snapshot>> {
        lock(&self.writer).last.clone()
    }

    /// What slot `slot` stands for.
    pub fn slot(&self, slot: u32) -> Option<SlotInfo> {
        let w = lock(&self.writer);
        let owner = w.owners.get(slot as usize)?.as_ref()?;
        let c = w.cache.get(owner)?;
        slot_info(c, c.slots.iter().position(|&s| s == slot)?)
    }

    /// Whether any backend of a service with `lb` has a slot ([`Self::slots_of`] is not empty).
    pub fn has_slots_of(&self, lb: LbPolicy) -> bool {
        lock(&self.writer)
            .cache
            .values()
            .any(|c| c.service.spec.lb == lb && c.slots.iter().any(|&s| s != NO_SLOT))
    }

    /// Every backend slot of services with `lb`.
    pub fn slots_of(&self, lb: LbPolicy) -> Vec<(u32, SlotInfo)> {
        let w = lock(&self.writer);
        w.cache
            .values()
            .filter(|c| c.service.spec.lb == lb)
            .flat_map(|c| {
                c.slots
                    .iter()
                    .enumerate()
                    .filter(|&(_, &s)| s != NO_SLOT)
                    .filter_map(move |(i, &s)| Some((s, slot_info(c, i)?)))
            })
            .collect()
    }

    /// The slot of a backend of a service.
    pub fn slot_of(&self, service: &ServiceName, backend: SocketAddr) -> Option<u32> {
        let w = lock(&self.writer);
        let c = w.cache.get(service)?;
        let i = c
            .service
            .spec
            .backends
            .iter()
            .position(|b| b.addr == backend)?;
        c.slots.get(i).copied().filter(|&s| s != NO_SLOT)
    }

    fn with_table<R>(
        &self,
        f: impl FnOnce(&Table<'_, [AtomicU32]>, &[AtomicU32], usize) -> R,
    ) -> Option<R> {
        let cur = self.current.load();
        let (map, area_words) = cur.as_ref().as_ref()?;
        let table = Table::new(map.words()).ok()?;
        Some(f(&table, map.words(), *area_words))
    }

    /// Sets a backend's stat word (see `discotech_wire::table` for the stats).
    pub fn set_stat(&self, slot: u32, word: usize, value: u32) {
        self.with_table(|_, words, area_words| {
            wire_table::set_stat(words, area_words, slot, word, value);
        });
    }

    /// Publishes a backend's p2c-ewma estimate.
    pub fn set_latency(&self, slot: u32, estimate: Option<Duration>) {
        let us = estimate.map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
        self.set_stat(slot, 1, us);
        self.with_table(|_, words, area_words| {
            let measured = if estimate.is_some() { STAT_MEASURED } else { 0 };
            wire_table::update_stat(words, area_words, slot, 2, STAT_MEASURED, measured);
        });
    }

    /// Publishes whether the last connect to a backend the daemon saw settle failed; the mark
    /// lapses after [`FAILING_HOLDS`] (see [`Self::refresh`]).
    pub fn set_failing(&self, slot: u32, failing: bool) {
        {
            let mut marks = lock(&self.failing);
            if failing {
                marks.insert(slot, Instant::now() + FAILING_HOLDS);
            } else if marks.remove(&slot).is_none() {
                return;
            }
        }
        self.with_table(|_, words, area_words| {
            let value = if failing { STAT_FAILING } else { 0 };
            wire_table::update_stat(words, area_words, slot, 2, STAT_FAILING, value);
        });
    }

    /// A backend's stat word.
    pub fn stat(&self, slot: u32, word: usize) -> u32 {
        self.with_table(|t, _, _| t.stat(slot, word)).unwrap_or(0)
    }

    /// The backends a connect to `dest` from a socket that can (`v6_ok`) or cannot reach IPv6
    /// may be picked from now (the pick set's candidates, each with the port `dest`'s port maps
    /// to); empty for an unknown service or before the first generation.
    pub fn candidates(&self, dest: SocketAddr, v6_ok: bool) -> Vec<SocketAddr> {
        self.weighted_candidates(dest, v6_ok)
            .into_iter()
            .map(|(addr, _)| addr)
            .collect()
    }

    /// [`Self::candidates`], each with its effective weight (after slow start, scaled).
    pub fn weighted_candidates(&self, dest: SocketAddr, v6_ok: bool) -> Vec<(SocketAddr, u32)> {
        self.with_table(|t, _, _| {
            t.read(|area| {
                let svc = area.service(dest.ip())?;
                let set = svc.set(v6_ok)?;
                let port_index = svc.port_index(dest.port());
                Some(
                    (0..set.count().min(MAX_CANDIDATES))
                        .filter_map(|pos| set.candidate(pos))
                        .filter_map(|(index, w)| Some((svc.backend(index, port_index)?.addr, w)))
                        .collect(),
                )
            })
        })
        .flatten()
        .unwrap_or_default()
    }

    /// How many times the table was written: it changes whenever what a connect may reach can.
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A pick from the shared state, exactly as a hook makes it (`advance`: take the turn and
    /// count the connect; otherwise a dry run).
    ///
    /// # Errors
    /// [`Miss`] as for the hook; `Unreadable` before the first generation.
    pub fn pick(&self, ask: &Ask<'_>, advance: bool) -> Result<Picked, Miss> {
        self.with_table(|t, _, _| pick::pick(t, self.live(), ask, advance))
            .unwrap_or(Err(Miss::Unreadable))
    }
}

/// Encodes one service and records its slots.
fn encode(
    w: &mut Writer,
    service: &Arc<Service>,
    sets: &PickSets,
    now: Instant,
    fresh: &mut Vec<u32>,
    had: &mut HashMap<SocketAddr, u32>,
) -> Cached {
    let spec: &ServiceSpec = &service.spec;
    let name = service.name();
    let client_ports: Vec<u16> = spec.client_ports.keys().copied().collect();
    let rr_slot = w.services.get(name, now, fresh);
    let mut candidate = vec![false; spec.backends.len()];
    for set in std::iter::once(&sets.v4).chain(&sets.v6) {
        for &(i, _) in &set.candidates {
            if let Some(c) = candidate.get_mut(i) {
                *c = true;
            }
        }
    }
    let in_set = |i: usize| candidate.get(i).copied().unwrap_or(false);
    let mut slots = Vec::with_capacity(spec.backends.len());
    let best_tier = spec
        .backends
        .iter()
        .enumerate()
        .filter(|&(i, _)| in_set(i))
        .map(|(_, b)| b.priority)
        .min();
    let backends = spec
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let slot = match had.remove(&b.addr) {
                Some(s) if s != NO_SLOT => s,
                _ => {
                    let s = w.backends.take(now, fresh);
                    if s != NO_SLOT {
                        let at = s as usize;
                        if w.owners.len() <= at {
                            w.owners.resize(at + 1, None);
                        }
                        w.owners[at] = Some(name.clone());
                    }
                    s
                }
            };
            slots.push(slot);
            let ports: Vec<u16> = spec
                .client_ports
                .values()
                .map(|pn| b.port_for(Some(pn)))
                .collect();
            let standing = if in_set(i) {
                Standing::Candidate
            } else if sets.out.get(i).copied().unwrap_or(false) {
                Standing::Out
            } else if best_tier.is_some_and(|t| b.priority > t) {
                Standing::LowerTier
            } else {
                Standing::OtherZone
            };
            build::Backend {
                addr: b.addr,
                weight: b.weight,
                priority: b.priority,
                slot,
                ports,
                standing,
            }
        })
        .collect();
    let record = build::service(&build::Service {
        name: name.as_str(),
        policy: policy(spec.lb),
        flags: if spec.prefetch.is_some() {
            SVC_PREFETCH
        } else {
            0
        },
        rr_slot,
        client_ports,
        backends,
        v4: wire_set(&sets.v4),
        v6: sets.v6.as_ref().map(wire_set),
    });
    let magics = std::iter::once(IpAddr::V4(service.magic_v4))
        .chain(service.magic_v6.map(IpAddr::V6))
        .collect();
    let ramp = sets.ramping.then(|| now + Duration::from_secs(1));
    let rebuild_at = match (ramp, sets.ejection_ends) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Cached {
        service: service.clone(),
        slots,
        record: Placed::New(record),
        magics,
        rebuild_at,
    }
}

mod file;
mod slots;

pub use file::supersede_left_over;
use file::{LiveRegion, TableFile, copy_stats};
use slots::{SlotMap, SlotPool, release_backend, slot_info};

#[cfg(test)]
mod tests;
