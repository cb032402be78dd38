//! Choosing a backend for one connect: per-service balancing state (round robin, smooth weighted
//! round robin, weighted random, power of two choices on outstanding connects or on peak-EWMA
//! connect latency, least connections over counts the caller reads from the kernel, weighted
//! maglev over the caller's key),
//! passive health
//! (a short hold after each reported failure, ejection after consecutive failures) and slow
//! start. Pure: no I/O, the clock and the RNG are passed in. The hook server owns one
//! [`Balancer`] and feeds it the current snapshot's specs.
//!
//! Eligibility, in order: backends the caller's socket family can reach (a v6 backend needs an
//! AF_INET6 socket); of those, the ones neither held nor ejected (unless that would leave none:
//! passive health never empties a non-empty set); of those, the best (lowest) priority.
//!
//! Passive health, per backend: every failure the hook reports holds it out for the fail hold
//! (so the hook's immediate retry goes elsewhere) and adds one to its consecutive failures.
//! A success resets the count: a p2c `done` without failure, or more than [`PICK_SLACK`] picks of
//! the backend since its last failure (the hook prefetches picks, so a failure can arrive after
//! a few later picks of the same backend; beyond that many, some connect must have worked).
//! At `consecutive_failures` the backend is ejected for `base_ejection` x times ejected (capped
//! at `max_ejection`) unless that would put more than `max_ejected_percent` of the service's
//! backends out at once. The ejection count is forgotten once a backend has stayed in for
//! `max_ejection`.
//!
//! A backend that leaves the list (an active check or an ejection took it out of the published
//! set, or its source dropped it) keeps its state for [`DEPARTED_KEEP`]: when it comes back its
//! ejection count, ejection end and latency estimate are as they were, and its slow start begins.
//!
//! p2c-ewma (Finagle's and Linkerd's "peak EWMA"): each backend's cost is a latency estimate
//! that jumps to any sample above it, otherwise moves toward the sample with weight
//! `1 - exp(-dt / decay)`, and decays toward zero while no samples come, so a backend that was
//! slow is tried again after a few decay times. A pick compares two weighted-random candidates by
//! cost x (outstanding + 1) per unit of weight; a backend never measured with connects under way
//! costs more than any estimate, so an unmeasured one is explored one connect at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::service::{Backend, Backends, LbPolicy, Outlier, ServiceName, ServiceSpec};

/// How long a backend reported as refusing is skipped by picks for its service.
pub const DEFAULT_FAIL_HOLD: Duration = Duration::from_secs(2);

/// Picks of a backend since its last reported failure beyond which the next failure starts a new
/// run of consecutive failures: the hook's prefetch depth per lane (docs/hook.md).
pub const PICK_SLACK: u32 = 4;

/// Weights are scaled by this before slow start multiplies them, so a ramp has fine steps.
const WEIGHT_SCALE: u64 = 1000;

/// How fast a p2c-ewma latency estimate forgets (Finagle's default decay time).
pub const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(10);

/// How long the state of a backend that left its service's list is kept for its return: longer
/// than the longest default ejection.
pub const DEPARTED_KEEP: Duration = Duration::from_secs(600);

/// The choice for one connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    /// Index into `spec.backends`.
    pub index: usize,
    /// Where to connect: the backend's address with the port for the client's port.
    pub addr: SocketAddr,
    /// The backend's default address: the key for [`Balancer::report_failure`] and [`Balancer::done`].
    pub backend: SocketAddr,
}

/// One socket family's candidates for the shared table (see [`Balancer::pick_sets`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PickSet {
    /// (index into `spec.backends`, effective weight).
    pub candidates: Vec<(usize, u64)>,
    /// Maglev: the candidate position owning each slot (empty for other policies).
    pub maglev: Vec<u32>,
}

/// What the shared table needs of one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PickSets {
    pub v4: PickSet,
    /// For IPv6 sockets; `None` when the service has no IPv6 backend (the same as `v4`).
    pub v6: Option<PickSet>,
    /// A backend is in its slow-start ramp: the weights change with time.
    pub ramping: bool,
    /// The earliest end of an ejection in force: the candidates change then.
    pub ejection_ends: Option<Instant>,
    /// Per backend (by index): ejected or held out after failures.
    pub out: Vec<bool>,
}

/// What [`Balancer::report_failure`] did with a report, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Not a backend this balancer knows (stale report).
    Unknown,
    /// Held out briefly; `consecutive` failures so far.
    Held { consecutive: u32 },
    /// Ejected until `for_` from now (the `times`th ejection).
    Ejected { for_: Duration, times: u32 },
    /// Would have been ejected, but the service already has its maximum share out.
    CapReached { consecutive: u32 },
}

/// Balancing state for every service, keyed by name. Survives snapshot swaps: state is kept per
/// backend address, so a backend that stays keeps its counters.
#[derive(Debug)]
pub struct Balancer {
    services: HashMap<ServiceName, ServiceState>,
    fail_hold: Duration,
    /// Established connections per remote address (least-conn), and when they were counted.
    connections: HashMap<SocketAddr, u32>,
    connections_at: Option<Instant>,
    /// This host's zone, and the share (per mille) of capacity it must hold to be preferred.
    zone: Option<(String, u64)>,
    /// p2c-ewma: how fast latency estimates forget.
    ewma_decay: Duration,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(DEFAULT_FAIL_HOLD)
    }
}

/// An optional instant in 8 bytes (an `Option<Instant>` takes 16): nanoseconds from a
/// process-wide origin, `i64::MIN` for none. Per-backend state holds four, for every backend of
/// every service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct When(i64);

impl When {
    const NONE: Self = Self(i64::MIN);

    fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    fn at(t: Instant) -> Self {
        let origin = Self::origin();
        let ns = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Self(if t >= origin {
            ns(t - origin)
        } else {
            -ns(origin - t)
        })
    }

    fn get(self) -> Option<Instant> {
        if self == Self::NONE {
            return None;
        }
        let origin = Self::origin();
        let d = Duration::from_nanos(self.0.unsigned_abs());
        if self.0 >= 0 {
            origin.checked_add(d)
        } else {
            origin.checked_sub(d)
        }
    }
}

impl Default for When {
    fn default() -> Self {
        Self::NONE
    }
}

impl From<Option<Instant>> for When {
    fn from(t: Option<Instant>) -> Self {
        t.map_or(Self::NONE, Self::at)
    }
}

/// Per-backend state, kept across snapshot swaps while the backend stays in the list.
#[derive(Debug, Clone, Copy, Default)]
struct BackendState {
    /// Smooth weighted round robin: current weight.
    current: i64,
    /// Picks not yet reported done (p2c).
    outstanding: u32,
    /// Least-conn picks since the connection counts were last read: they are connects the
    /// socket table may not show yet, so a burst between two reads does not all go to one backend.
    pending: u32,
    held_until: When,
    consecutive_failures: u32,
    picks_since_failure: u32,
    times_ejected: u32,
    ejected_until: When,
    /// When this backend (re)entered the pick set: first seen in the list, or its ejection ended.
    /// `None` for backends present when the service's state was created (no ramp at start-up).
    ramp_from: When,
    /// p2c-ewma: the peak-EWMA connect latency in µs and when it was last updated (`None`: never
    /// measured).
    ewma_us: f64,
    ewma_at: When,
}

// Held for every backend of every service.
const _: () = assert!(std::mem::size_of::<BackendState>() <= 72);

impl BackendState {
    fn out_at(&self, now: Instant) -> bool {
        self.held_until.get().is_some_and(|t| t > now) || self.ejected(now)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.get().is_some_and(|t| t > now)
    }

    /// The latency estimate at `now`: the last one, decayed toward zero since it was updated.
    fn ewma_at(&self, now: Instant, decay: Duration) -> f64 {
        match self.ewma_at.get() {
            Some(at) if self.ewma_us > 0.0 => {
                self.ewma_us * decay_weight(now.saturating_duration_since(at), decay)
            }
            _ => 0.0,
        }
    }

    /// Folds one latency sample (µs) into the peak EWMA.
    fn observe(&mut self, sample_us: f64, now: Instant, decay: Duration) {
        self.ewma_us = match self.ewma_at.get() {
            // A time-weighted average: the old estimate keeps the share decay left it since it
            // was updated (which is also how far it has decayed), the sample gets the rest.
            Some(at) if sample_us <= self.ewma_at(now, decay) => {
                let kept = decay_weight(now.saturating_duration_since(at), decay);
                self.ewma_us * kept + sample_us * (1.0 - kept)
            }
            // The first sample, or a peak: taken as it is.
            _ => sample_us,
        };
        self.ewma_at = When::at(now);
    }

    /// When slow start counts from: the later of first appearance and the end of the last ejection.
    fn ramp_start(&self, now: Instant) -> Option<Instant> {
        let ejection_end = self.ejected_until.get().filter(|&t| t <= now);
        match (self.ramp_from.get(), ejection_end) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct ServiceState {
    /// The backend list this state was built for (shared with the spec it came from); only
    /// addresses, weights and priorities count as a change.
    shape: Backends,
    rr_next: usize,
    backends: Vec<BackendState>,
    /// False until the first sync: backends of the first list do not ramp.
    initialised: bool,
    /// Maglev lookup table (indices into `spec.backends`) and the candidates it was built for.
    maglev: Option<(Vec<usize>, Vec<u32>)>,
    /// State of backends that left the list, and when they left (see [`DEPARTED_KEEP`]).
    departed: HashMap<SocketAddr, (BackendState, Instant)>,
}

impl ServiceState {
    /// Rebuilds the per-backend state when the backend list changed, keeping the state of
    /// backends that are still there. Backends new to the list start their slow-start ramp now.
    fn sync(&mut self, spec: &ServiceSpec, now: Instant) {
        let key = |b: &Backend| (b.addr, b.weight, b.priority);
        let same = self.shape.iter().map(key).eq(spec.backends.iter().map(key));
        if same && self.initialised {
            return;
        }
        let mut old: HashMap<SocketAddr, BackendState> = self
            .shape
            .iter()
            .zip(&self.backends)
            .map(|(s, b)| (s.addr, *b))
            .collect();
        let fresh = BackendState {
            ramp_from: When::from(self.initialised.then_some(now)),
            ..BackendState::default()
        };
        self.shape = spec.backends.clone();
        let departed = &mut self.departed;
        departed.retain(|_, (_, left)| now.saturating_duration_since(*left) < DEPARTED_KEEP);
        self.backends = self
            .shape
            .iter()
            .map(|s| match old.remove(&s.addr) {
                Some(b) => b,
                // Back from a health or ejection exit: its history returns, its ramp starts now.
                None => departed
                    .remove(&s.addr)
                    .map_or(fresh, |(b, _)| BackendState {
                        ramp_from: When::at(now),
                        outstanding: 0,
                        pending: 0,
                        current: 0,
                        ..b
                    }),
            })
            .collect();
        // What is left of the old list has departed.
        departed.extend(old.into_iter().map(|(addr, b)| (addr, (b, now))));
        // Weights may have changed with the same candidates: the table is rebuilt on next use.
        self.maglev = None;
        self.initialised = true;
    }

    fn index_of(&self, backend: SocketAddr) -> Option<usize> {
        self.shape.iter().position(|s| s.addr == backend)
    }
}

impl Balancer {
    pub fn new(fail_hold: Duration) -> Self {
        Self {
            services: HashMap::new(),
            fail_hold,
            connections: HashMap::new(),
            connections_at: None,
            zone: None,
            ewma_decay: DEFAULT_EWMA_DECAY,
        }
    }

    /// How fast p2c-ewma latency estimates forget (see the module docs).
    #[must_use]
    pub fn with_ewma_decay(mut self, decay: Duration) -> Self {
        self.ewma_decay = decay;
        self
    }

    /// Prefers backends in `zone` while they hold at least `min_share` of the eligible capacity
    /// (see [`prefer_zone`]).
    #[must_use]
    pub fn with_zone(mut self, zone: Option<String>, min_share: f64) -> Self {
        self.zone = zone.map(|z| (z, (min_share.clamp(0.0, 1.0) * 1000.0).round() as u64));
        self
    }

    /// Chooses a backend of `spec` for a connect on `client_port`. `v6_ok` says whether the
    /// caller's socket can reach an IPv6 backend. `None` when no backend is usable.
    pub fn pick<R: Rng + ?Sized>(
        &mut self,
        spec: &ServiceSpec,
        client_port: u16,
        v6_ok: bool,
        now: Instant,
        rng: &mut R,
    ) -> Option<Pick> {
        self.pick_keyed(spec, client_port, v6_ok, now, rng, 0)
    }

    /// [`Balancer::pick`] with the caller's affinity `key` (used by maglev services).
    pub fn pick_keyed<R: Rng + ?Sized>(
        &mut self,
        spec: &ServiceSpec,
        client_port: u16,
        v6_ok: bool,
        now: Instant,
        rng: &mut R,
        key: u64,
    ) -> Option<Pick> {
        let state = self.services.entry(spec.name.clone()).or_default();
        state.sync(spec, now);
        let mut candidates = eligible(spec, state, v6_ok, now);
        if candidates.is_empty() {
            return None;
        }
        if let Some((zone, share)) = &self.zone {
            candidates = prefer_zone(spec, candidates, zone, *share);
        }
        let weights = effective_weights(spec, state, &candidates, now);
        let chosen = match spec.lb {
            LbPolicy::RoundRobin => {
                let i = state.rr_next % candidates.len();
                state.rr_next = state.rr_next.wrapping_add(1);
                candidates.get(i).copied()
            }
            LbPolicy::WeightedRoundRobin => smooth_weighted(state, &candidates, &weights),
            LbPolicy::Random => weighted_random(&candidates, &weights, rng),
            LbPolicy::Maglev => {
                // Rebuilt when the candidates change, or after `sync` dropped it for a new list or
                // new weights; built from configured weights, as slow start would rebuild it on
                // every pick.
                if state.maglev.as_ref().is_none_or(|(c, _)| *c != candidates) {
                    let (names, maglev_weights): (Vec<SocketAddr>, Vec<u16>) = candidates
                        .iter()
                        .filter_map(|&i| spec.backends.get(i).map(|b| (b.addr, b.weight)))
                        .unzip();
                    let table = maglev_table(&names, &maglev_weights, MAGLEV_SIZE);
                    state.maglev = Some((candidates.clone(), table));
                }
                let (c, table) = state.maglev.as_ref()?;
                let slot = (mix(key) % table.len() as u64) as usize;
                table.get(slot).and_then(|&j| c.get(j as usize)).copied()
            }
            LbPolicy::LeastConn => {
                let conns: Vec<u64> = candidates
                    .iter()
                    .map(|&i| {
                        let table = spec.backends.get(i).map_or(0, |b| {
                            let to = SocketAddr::new(
                                b.addr.ip(),
                                b.port_for(spec.port_name_for(client_port)),
                            );
                            self.connections.get(&to).copied().unwrap_or(0)
                        });
                        u64::from(table) + u64::from(state.backends.get(i).map_or(0, |b| b.pending))
                    })
                    .collect();
                let i = least_conn(state, &candidates, &weights, &conns, rng);
                if let Some(b) = i.and_then(|i| state.backends.get_mut(i)) {
                    b.pending = b.pending.saturating_add(1);
                }
                i
            }
            LbPolicy::P2c | LbPolicy::P2cEwma => {
                let (decay, ewma) = (self.ewma_decay, spec.lb == LbPolicy::P2cEwma);
                let i = p2c(&candidates, &weights, rng, |i| {
                    let b = state.backends.get(i).copied().unwrap_or_default();
                    let outstanding = f64::from(b.outstanding);
                    if !ewma {
                        return outstanding;
                    }
                    if b.ewma_at.get().is_none() && b.outstanding > 0 {
                        // Never measured and already trying: explore it one connect at a time.
                        return f64::INFINITY;
                    }
                    b.ewma_at(now, decay) * (outstanding + 1.0)
                });
                if let Some(b) = i.and_then(|i| state.backends.get_mut(i)) {
                    b.outstanding = b.outstanding.saturating_add(1);
                }
                i
            }
        }?;
        if let Some(b) = state.backends.get_mut(chosen) {
            b.picks_since_failure = b.picks_since_failure.saturating_add(1);
            if b.picks_since_failure > PICK_SLACK {
                b.consecutive_failures = 0;
            }
        }
        let backend = spec.backends.get(chosen)?;
        let port = backend.port_for(spec.port_name_for(client_port));
        Some(Pick {
            index: chosen,
            addr: SocketAddr::new(backend.addr.ip(), port),
            backend: backend.addr,
        })
    }

    /// The candidates for the shared table: per socket family, the backends a pick may choose
    /// (reachable, not held or ejected, best tier, zone preference) with their effective
    /// weights (slow start applied at `now`), and the maglev lookup table for maglev services.
    /// Nothing advances; the service's state is synced to `spec`.
    pub fn pick_sets(&mut self, spec: &ServiceSpec, now: Instant) -> PickSets {
        let zone = self.zone.clone();
        let state = self.services.entry(spec.name.clone()).or_default();
        state.sync(spec, now);
        let family = |v6_ok: bool| {
            let mut candidates = eligible(spec, state, v6_ok, now);
            if let Some((zone, share)) = &zone
                && !candidates.is_empty()
            {
                candidates = prefer_zone(spec, candidates, zone, *share);
            }
            let weights = effective_weights(spec, state, &candidates, now);
            let maglev = (spec.lb == LbPolicy::Maglev && !candidates.is_empty()).then(|| {
                let (names, w): (Vec<SocketAddr>, Vec<u16>) = candidates
                    .iter()
                    .filter_map(|&i| spec.backends.get(i).map(|b| (b.addr, b.weight)))
                    .unzip();
                maglev_table(&names, &w, MAGLEV_SIZE)
            });
            PickSet {
                candidates: candidates.into_iter().zip(weights).collect(),
                maglev: maglev.unwrap_or_default(),
            }
        };
        let v4 = family(false);
        let v6 = spec
            .backends
            .iter()
            .any(|b| b.addr.is_ipv6())
            .then(|| family(true));
        let ramping = spec.slow_start.as_deref().is_some_and(|slow| {
            state.backends.iter().any(|b| {
                b.ramp_start(now)
                    .is_some_and(|since| now.saturating_duration_since(since) < slow.window)
            })
        });
        let ejection_ends = state
            .backends
            .iter()
            .filter_map(|b| b.ejected_until.get())
            .filter(|&t| t > now)
            .min();
        let out = (0..spec.backends.len())
            .map(|i| state.backends.get(i).is_some_and(|b| b.out_at(now)))
            .collect();
        PickSets {
            v4,
            v6,
            ramping,
            ejection_ends,
            out,
        }
    }

    fn backend_mut(
        &mut self,
        service: &ServiceName,
        backend: SocketAddr,
    ) -> Option<&mut BackendState> {
        let state = self.services.get_mut(service)?;
        let i = state.index_of(backend)?;
        state.backends.get_mut(i)
    }

    fn backend(&self, service: &ServiceName, backend: SocketAddr) -> Option<&BackendState> {
        let state = self.services.get(service)?;
        state.backends.get(state.index_of(backend)?)
    }

    /// Whether the connection counts are older than `max_age` (or were never read).
    pub fn connections_stale(&self, now: Instant, max_age: Duration) -> bool {
        self.connections_at
            .is_none_or(|at| now.saturating_duration_since(at) >= max_age)
    }

    /// New established-connection counts per remote address (see `conn_count`). Picks made since
    /// the last counts are forgotten: the new table shows those that connected.
    pub fn set_connections(&mut self, counts: HashMap<SocketAddr, u32>, now: Instant) {
        self.connections = counts;
        self.connections_at = Some(now);
        for state in self.services.values_mut() {
            for b in &mut state.backends {
                b.pending = 0;
            }
        }
    }

    /// What the next pick for `spec` would be and why, without advancing any state: the pick runs
    /// on a copy of this service's state. For `random` and `p2c` it is one possible draw. `key`
    /// stands for the caller (maglev).
    pub fn explain(
        &self,
        spec: &ServiceSpec,
        client_port: u16,
        v6_ok: bool,
        now: Instant,
        key: u64,
    ) -> Option<(SocketAddr, String)> {
        let mut scratch = Balancer {
            services: HashMap::new(),
            fail_hold: self.fail_hold,
            connections: self.connections.clone(),
            connections_at: self.connections_at,
            zone: self.zone.clone(),
            ewma_decay: self.ewma_decay,
        };
        if let Some(state) = self.services.get(&spec.name) {
            scratch.services.insert(spec.name.clone(), state.clone());
        }
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(key);
        let pick = scratch.pick_keyed(spec, client_port, v6_ok, now, &mut rng, key)?;
        let b = spec.backends.get(pick.index)?;
        let why = match spec.lb {
            LbPolicy::RoundRobin => "round robin: next in turn".to_string(),
            LbPolicy::WeightedRoundRobin => format!(
                "smooth weighted round robin: highest current weight (weight {})",
                b.weight
            ),
            LbPolicy::Random => format!("weighted random: one draw (weight {})", b.weight),
            LbPolicy::P2c => format!(
                "p2c: {} outstanding, the fewer of two random candidates",
                self.outstanding(&spec.name, pick.backend)
            ),
            LbPolicy::LeastConn => format!(
                "least-conn: {} connections, the fewest",
                self.connections.get(&pick.addr).copied().unwrap_or(0)
            ),
            LbPolicy::P2cEwma => {
                let outstanding = self.outstanding(&spec.name, pick.backend);
                match self.latency_estimate(&spec.name, pick.backend, now) {
                    Some(l) => format!(
                        "p2c-ewma: connect latency {:.3} ms x ({outstanding} outstanding + 1), the lower cost of two random candidates",
                        l.as_secs_f64() * 1e3
                    ),
                    None => format!(
                        "p2c-ewma: no latency measured yet, {outstanding} outstanding; the lower cost of two random candidates"
                    ),
                }
            }
            LbPolicy::Maglev => format!("maglev: owner of key {key} (weight {})", b.weight),
        };
        Some((pick.addr, why))
    }

    /// Outstanding picks for a backend (what p2c compares).
    pub fn outstanding(&self, service: &ServiceName, backend: SocketAddr) -> u32 {
        self.backend(service, backend).map_or(0, |b| b.outstanding)
    }

    /// Forgets services `keep` rejects (call after a snapshot swap so removed services do not
    /// accumulate).
    pub fn retain(&mut self, mut keep: impl FnMut(&ServiceName) -> bool) {
        self.services.retain(|name, _| keep(name));
    }
}

/// `now + d`, for durations from configuration: a duration too large for the clock is cut to a
/// year rather than panic (a poisoned balancer would refuse every pick).
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

mod maglev;
mod passive;
mod policies;
mod weights;

pub use maglev::maglev_table;
use maglev::{MAGLEV_SIZE, mix};
use policies::{decay_weight, least_conn, p2c, smooth_weighted, weighted_random};
pub use weights::slow_start_per_mille;
use weights::{effective_weights, eligible, may_eject, prefer_zone};

#[cfg(test)]
mod tests;
