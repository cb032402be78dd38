//! The registry merges what every source says into one snapshot: it passes the merge through
//! the guard, gives each service its magic addresses, keeps the last-known-good state on disk,
//! and swaps the new snapshot in for every reader at once.
//!
//! A source that fails keeps its last good set; a source that has not spoken yet contributes what
//! it said before the last restart (restored from `backends.json`), so a daemon started while
//! its registry is down serves the persisted state at once.
//!
//! Health takes backends out of what is published (and so out of SRV answers, connect picks and
//! the hook's fallback file) in two independent ways: active checks (`Command::Health`) and
//! passive-health ejections the hook server reports (`Command::Eject`), which end by themselves.
//! Both go through `health::effective`, so panic mode and priority tiers apply alike.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{GuardConfig, HealthConfig};
use crate::guard::{Guard, Held, HoldReason};
use crate::health::SharedTargets;
use crate::magic::MagicMap;
use crate::metrics::{METRICS, SourceLabels};
use crate::service::{ServiceName, ServiceSpec};
use crate::snapshot::{Service, SharedSnapshot, Snapshot};
use crate::source::SourceEvent;
use crate::state;

/// Called with every newly published snapshot (e.g. to refresh the hook's fallback file).
/// Runs off the registry task (on a blocking thread), so it may take its time.
pub type OnPublish = Arc<dyn Fn(&Snapshot) + Send + Sync>;
/// A reader told of each snapshot as it is swapped in (see [`Registry::on_swap`]).
pub type OnSwap = Arc<dyn Fn(&Arc<Snapshot>) + Send + Sync>;

/// How often, at most, the last-known-good file (and the hook's fallback file) is rewritten: a
/// burst of changes costs one write.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Both files hold every service, so with many services a write is not free: after a write that
/// took `t`, the next waits at least `PERSIST_SHARE * t`, keeping their cost near 1/20 of a core
/// however many services change how often.
const PERSIST_SHARE: u32 = 20;

/// The persisted last-known-good state (`backends.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct LastKnownGood {
    version: u32,
    /// What each source (by name) last said.
    sources: BTreeMap<String, Vec<ServiceSpec>>,
    /// What was published, guard holds included (drained backends too: draining is applied on top).
    published: Vec<ServiceSpec>,
    /// Backends an operator drained, per service.
    #[serde(default)]
    drained: BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
}

/// Requests from the admin socket.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<RegistryStatus>),
    /// Drain (or undrain) one backend of a service: it leaves SRV answers and connect picks.
    Drain {
        service: ServiceName,
        addr: SocketAddr,
        drain: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A reload changed the sources, the guard or the health settings. Sources keep their sets by name.
    Reconfigure {
        names: Vec<String>,
        guard: GuardConfig,
        health: HealthConfig,
        reply: oneshot::Sender<()>,
    },
    /// An active health check changed its mind about a backend.
    Health {
        service: ServiceName,
        addr: SocketAddr,
        healthy: bool,
        reason: String,
    },
    /// Passive health: the hook server ejected a backend after consecutive connect failures. It
    /// leaves the published spec (SRV answers, the fallback file) until `until`, then returns by
    /// itself; a later ejection of the same backend replaces `until`.
    Eject {
        service: ServiceName,
        addr: SocketAddr,
        until: Instant,
        reason: String,
    },
}

/// What the registry knows about its sources, holds and drains.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegistryStatus {
    pub generation: u64,
    pub services: usize,
    pub sources: Vec<SourceStatus>,
    pub held: Vec<HeldStatus>,
    pub drained: BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
    /// Backends out of the pick set and SRV answers (unless in panic mode), with the reason:
    /// failing their active health checks, or ejected by passive health after consecutive
    /// connect failures (the reason then starts with "ejected").
    #[serde(default)]
    pub unhealthy: BTreeMap<ServiceName, BTreeMap<SocketAddr, String>>,
    /// Services balancing over every backend because too few are healthy.
    #[serde(default)]
    pub panicking: BTreeSet<ServiceName>,
    /// The most recent notable events, oldest first.
    #[serde(default)]
    pub events: Vec<Event>,
}

/// Something an operator would want to see on the status page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Unix seconds.
    pub at: u64,
    pub message: String,
}

/// How many events the registry remembers.
const EVENTS_KEPT: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceStatus {
    pub name: String,
    /// `waiting` (nothing heard yet), `restored` (serving what it said before a restart), `ok` or `failed`.
    pub state: String,
    pub services: usize,
    /// Unix seconds of the last good update and of the last failure.
    pub last_update: Option<u64>,
    pub last_failure: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldStatus {
    pub service: ServiceName,
    pub reason: String,
    /// Seconds since the hold started.
    pub age: u64,
    /// Seconds until it applies; `None` for an update that is never applied.
    pub applies_in: Option<u64>,
    pub kept: Vec<SocketAddr>,
}

/// One passive-health ejection: out of the published spec until `until`.
#[derive(Debug, Clone)]
struct Ejection {
    until: Instant,
    reason: String,
}

#[derive(Debug, Clone, Default)]
struct Health {
    restored: bool,
    last_update: Option<u64>,
    last_failure: Option<u64>,
    error: Option<String>,
}

pub struct Registry {
    names: Vec<String>,
    sources: Vec<Option<OrdMap<ServiceName, ServiceSpec>>>,
    health: Vec<Health>,
    drained: BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
    unhealthy: BTreeMap<ServiceName, BTreeMap<SocketAddr, String>>,
    /// Passive-health ejections, apart from `unhealthy` so that neither kind of health readmits
    /// a backend the other holds out. Not persisted: they last seconds to minutes.
    ejected: BTreeMap<ServiceName, BTreeMap<SocketAddr, Ejection>>,
    panicking: BTreeSet<ServiceName>,
    health_cfg: HealthConfig,
    targets: SharedTargets,
    target_map: crate::health::Targets,
    /// Snapshots published since the last call of the `on_publish` hooks (they run with `persist`).
    unannounced: bool,
    /// The save running on a blocking thread, if any, and whether the last one failed.
    saving: Option<tokio::task::JoinHandle<()>>,
    save_failed: Arc<std::sync::atomic::AtomicBool>,
    events: std::collections::VecDeque<Event>,
    published: OrdMap<ServiceName, ServiceSpec>,
    guard: Guard,
    magic: MagicMap,
    magic_path: Option<PathBuf>,
    lkg_path: Option<PathBuf>,
    dirty: bool,
    wake_at: Option<Instant>,
    shared: SharedSnapshot,
    on_publish: Vec<OnPublish>,
    on_swap: Vec<OnSwap>,
}

/// Where the registry keeps its files; `None` keeps everything in memory (tests).
#[derive(Debug, Clone, Default)]
pub struct StatePaths {
    pub magic: Option<PathBuf>,
    pub backends: Option<PathBuf>,
}

impl Registry {
    /// `source_names`: one per configured source, in config order (events carry the index).
    pub fn new(
        source_names: Vec<String>,
        guard: Guard,
        magic: MagicMap,
        paths: StatePaths,
        shared: SharedSnapshot,
    ) -> Self {
        Self {
            sources: vec![None; source_names.len()],
            health: vec![Health::default(); source_names.len()],
            drained: BTreeMap::new(),
            unhealthy: BTreeMap::new(),
            ejected: BTreeMap::new(),
            panicking: BTreeSet::new(),
            health_cfg: HealthConfig::default(),
            targets: SharedTargets::default(),
            target_map: crate::health::Targets::new(),
            unannounced: false,
            saving: None,
            save_failed: Arc::default(),
            events: std::collections::VecDeque::new(),
            names: source_names,
            published: OrdMap::new(),
            guard,
            magic,
            magic_path: paths.magic,
            lkg_path: paths.backends,
            dirty: false,
            wake_at: None,
            shared,
            on_publish: Vec::new(),
            on_swap: Vec::new(),
        }
    }

    pub fn set_health(&mut self, health: HealthConfig) {
        self.health_cfg = health;
    }

    /// The backends the health checker should probe, kept current with every publish.
    pub fn targets(&self) -> SharedTargets {
        self.targets.clone()
    }

    pub fn on_publish(&mut self, f: OnPublish) {
        self.on_publish.push(f);
    }

    /// Runs `f` on every new snapshot right after it is swapped in, on the registry's task:
    /// for readers that must see a change at once and keep their work per change small (the
    /// shared routing table).
    pub fn on_swap(&mut self, f: OnSwap) {
        self.on_swap.push(f);
    }

    /// What one save needs, copied cheaply (the maps are persistent) so that encoding and
    /// writing, which grow with the number of services, happen off the registry task.
    fn save_job(&mut self) -> Option<SaveJob> {
        let announce = std::mem::take(&mut self.unannounced)
            .then(|| (self.shared.load_full(), self.on_publish.clone()));
        let state = match (std::mem::take(&mut self.dirty), &self.lkg_path) {
            (true, Some(path)) => Some(StateCopy {
                path: path.clone(),
                names: self.names.clone(),
                sources: self.sources.clone(),
                published: self.published.clone(),
                drained: self.drained.clone(),
            }),
            _ => None,
        };
        (announce.is_some() || state.is_some()).then_some(SaveJob {
            announce,
            state,
            failed: self.save_failed.clone(),
        })
    }

    pub fn snapshot(&self) -> SharedSnapshot {
        self.shared.clone()
    }

    pub fn held(&self) -> impl Iterator<Item = &Held> {
        self.guard.held()
    }

    /// Restores the last-known-good state and publishes it. Sources that no longer exist in the
    /// config are ignored.
    ///
    /// # Errors
    /// The bytes are not a valid state file (the caller sets the file aside).
    pub fn restore(&mut self, bytes: &[u8], now: u64) -> Result<usize, serde_json::Error> {
        let lkg: LastKnownGood = serde_json::from_slice(bytes)?;
        for (name, services) in lkg.sources {
            if let Some(i) = self.names.iter().position(|n| *n == name) {
                if let Some(slot) = self.sources.get_mut(i) {
                    *slot = Some(services.into_iter().map(|s| (s.name.clone(), s)).collect());
                }
                if let Some(h) = self.health.get_mut(i) {
                    h.restored = true;
                }
            }
        }
        self.drained = lkg.drained;
        self.published = lkg
            .published
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let count = self.published.len();
        self.refresh_all(now, Instant::now());
        Ok(count)
    }

    /// Applies one source event at `now` (unix seconds); publishes when anything changed.
    pub fn apply(&mut self, event: SourceEvent, now: u64) {
        let index = match &event {
            SourceEvent::Reset { source, .. }
            | SourceEvent::Update { source, .. }
            | SourceEvent::Failed { source, .. } => *source,
        };
        let name = self.names.get(index).cloned().unwrap_or_default();
        let labels = SourceLabels {
            source: name.clone(),
        };
        let mut note = None;
        if let Some(h) = self.health.get_mut(index) {
            match &event {
                SourceEvent::Failed { error, .. } => {
                    if h.error.as_ref() != Some(error) {
                        note = Some(format!("source {name} failed: {error}"));
                    }
                    h.last_failure = Some(now);
                    h.error = Some(error.clone());
                    METRICS.source_up.get_or_create(&labels).set(0);
                }
                _ => {
                    if h.error.is_some() {
                        note = Some(format!("source {name} recovered"));
                    }
                    h.restored = false;
                    h.last_update = Some(now);
                    h.error = None;
                    METRICS.source_up.get_or_create(&labels).set(1);
                    METRICS
                        .source_last_update
                        .get_or_create(&labels)
                        .set(i64::try_from(now).unwrap_or(i64::MAX));
                }
            }
        }
        if let Some(n) = note {
            self.event(now, n);
        }
        match event {
            SourceEvent::Reset { source, services } => {
                let Some(slot) = self.sources.get_mut(source) else {
                    error!(source, "event from an unknown source");
                    return;
                };
                let new: OrdMap<ServiceName, ServiceSpec> =
                    services.into_iter().map(|s| (s.name.clone(), s)).collect();
                // Only the services this source changed need a look.
                let changed: BTreeSet<ServiceName> = match slot.as_ref() {
                    None => new.keys().cloned().collect(),
                    Some(old) => old
                        .keys()
                        .chain(new.keys())
                        .filter(|n| old.get(*n) != new.get(*n))
                        .cloned()
                        .collect(),
                };
                let first = slot.is_none();
                *slot = Some(new);
                if changed.is_empty() && !first {
                    return;
                }
                self.dirty = true;
                self.refresh(changed, now, Instant::now());
            }
            SourceEvent::Update { source, service } => {
                let Some(slot) = self.sources.get_mut(source) else {
                    error!(source, "event from an unknown source");
                    return;
                };
                let set = slot.get_or_insert_with(OrdMap::new);
                if set.get(&service.name) == Some(&service) {
                    return;
                }
                let name = service.name.clone();
                set.insert(name.clone(), service);
                self.dirty = true;
                self.refresh([name], now, Instant::now());
            }
            SourceEvent::Failed { source, error } => {
                let name = self.names.get(source).map_or("?", String::as_str);
                warn!(source = name, %error, "source failed; its last good services keep serving");
            }
        }
    }

    /// Re-runs magic address bookkeeping (quarantine expiry).
    pub fn tick(&mut self, now: u64) {
        if self.magic.expire(now) {
            self.persist_magic();
        }
    }

    /// What every source says of one service, merged. Backends are merged by address; the first
    /// source that names the service decides its balancing policy and port map.
    fn merged_one(&self, name: &ServiceName) -> Option<ServiceSpec> {
        let mut out: Option<ServiceSpec> = None;
        for spec in self
            .sources
            .iter()
            .flatten()
            .filter_map(|slot| slot.get(name))
        {
            match &mut out {
                None => out = Some(spec.clone()),
                Some(existing) => {
                    for b in &spec.backends {
                        if !existing.backends.iter().any(|e| e.addr == b.addr) {
                            existing.backends.push(b.clone());
                        }
                    }
                    for (port, pname) in &spec.client_ports {
                        existing
                            .client_ports
                            .entry(*port)
                            .or_insert_with(|| pname.clone());
                    }
                }
            }
        }
        out
    }

    fn event(&mut self, at: u64, message: String) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event { at, message });
    }

    /// Re-evaluates every service (after a restore or a reconfigure).
    fn refresh_all(&mut self, now: u64, clock: Instant) {
        let mut names: BTreeSet<ServiceName> = self.published.keys().cloned().collect();
        for slot in self.sources.iter().flatten() {
            names.extend(slot.keys().cloned());
        }
        self.refresh(names, now, clock);
    }

    /// Re-evaluates the services in `dirty` (merge, guard, magic address, drains, health) and
    /// publishes a new snapshot if any of them changed. The cost follows the number of services
    /// that changed, not the number there are.
    fn refresh(&mut self, dirty: impl IntoIterator<Item = ServiceName>, now: u64, clock: Instant) {
        // Before any source has spoken or been restored, there is nothing to guard against.
        let nothing_heard = self.sources.iter().all(Option::is_none);
        let old = self.shared.load_full();
        let mut changes = Vec::new();
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let mut magic_changed = false;
        for name in dirty {
            let current = self.published.get(&name).cloned();
            let publish = if nothing_heard {
                current.clone()
            } else {
                let step = self
                    .guard
                    .step(&name, current.as_ref(), self.merged_one(&name), clock);
                if let Some(h) = &step.new_hold {
                    self.note_hold(h, now);
                }
                if step.matured {
                    info!(service = %name, "held update applied after the hold-down");
                    self.event(
                        now,
                        format!("guard: held update to {name} applied after the hold-down"),
                    );
                }
                step.publish
            };
            match (&current, &publish) {
                (None, Some(_)) => added.push(name.to_string()),
                (Some(_), None) => removed.push(name.to_string()),
                _ => {}
            }
            if publish != current {
                self.dirty = true;
            }
            let service = match publish {
                Some(spec) => {
                    self.published.insert(name.clone(), spec);
                    match self.magic.assign(&name) {
                        Ok(changed) => {
                            magic_changed |= changed;
                            self.build(&name, now)
                        }
                        Err(e) => {
                            error!("{e}");
                            None
                        }
                    }
                }
                None => {
                    self.published.remove(&name);
                    magic_changed |= self.magic.release(&name, now);
                    self.forget(&name);
                    None
                }
            };
            if old.service(name.as_str()).map(|s| s.as_ref()) != service.as_ref() {
                changes.push((name, service));
            }
        }
        self.set_wake();
        METRICS
            .guard_held
            .set(i64::try_from(self.guard.held().count()).unwrap_or(i64::MAX));
        match added.len() {
            0 => {}
            1..=20 => self.event(now, format!("services added: {}", added.join(", "))),
            n => self.event(now, format!("{n} services added")),
        }
        if !removed.is_empty() {
            self.event(now, format!("services removed: {}", removed.join(", ")));
        }
        if magic_changed {
            self.persist_magic();
        }
        self.targets.store(Arc::new(self.target_map.clone()));
        if changes.is_empty() && old.generation > 0 {
            return;
        }
        let snapshot = old.with_changes(old.generation + 1, changes);
        debug!(
            generation = snapshot.generation,
            services = snapshot.len(),
            "published"
        );
        METRICS
            .generation
            .set(i64::try_from(snapshot.generation).unwrap_or(i64::MAX));
        METRICS
            .services
            .set(i64::try_from(snapshot.len()).unwrap_or(i64::MAX));
        let snapshot = Arc::new(snapshot);
        self.shared.store(snapshot.clone());
        for f in &self.on_swap {
            f(&snapshot);
        }
        self.unannounced = true;
        METRICS
            .publish_duration
            .observe(clock.elapsed().as_secs_f64());
    }

    /// The published form of one service: drains and health applied; keeps the health checker's
    /// targets and the panic set current for it.
    fn build(&mut self, name: &ServiceName, now: u64) -> Option<Service> {
        let a = self.magic.get(name)?;
        let mut spec = self.published.get(name)?.clone();
        if let Some(d) = self.drained.get(name) {
            spec.backends.retain(|b| !d.contains(&b.addr));
        }
        // Health only knows backends that are published.
        if let Some(map) = self.unhealthy.get_mut(name) {
            map.retain(|addr, _| spec.backends.iter().any(|b| b.addr == *addr));
            if map.is_empty() {
                self.unhealthy.remove(name);
            }
        }
        if let Some(map) = self.ejected.get_mut(name) {
            map.retain(|addr, _| spec.backends.iter().any(|b| b.addr == *addr));
            if map.is_empty() {
                self.ejected.remove(name);
            }
        }
        let unhealthy = self.unhealthy.get(name);
        match &spec.health {
            Some(check) => {
                let targets = spec
                    .backends
                    .iter()
                    .map(|b| {
                        (
                            b.addr,
                            check.clone(),
                            !unhealthy.is_some_and(|u| u.contains_key(&b.addr)),
                        )
                    })
                    .collect();
                self.target_map.insert(name.clone(), targets);
            }
            None => {
                self.target_map.remove(name);
            }
        }
        // Active and passive health take backends out alike (panic mode and tiers included).
        let out = match self.ejected.get(name) {
            None => unhealthy.map(std::borrow::Cow::Borrowed),
            Some(ejected) => {
                let mut out = unhealthy.cloned().unwrap_or_default();
                for (addr, e) in ejected {
                    out.entry(*addr).or_insert_with(|| e.reason.clone());
                }
                Some(std::borrow::Cow::Owned(out))
            }
        };
        let (spec, panic) =
            crate::health::effective(&spec, out.as_deref(), self.health_cfg.panic_threshold);
        if panic && self.panicking.insert(name.clone()) {
            warn!(service = %name, "too few healthy backends: panic mode, balancing over all of them");
            self.event(
                now,
                format!("{name}: panic mode, too few healthy backends; balancing over all"),
            );
        } else if !panic && self.panicking.remove(name) {
            info!(service = %name, "enough healthy backends again: panic mode ends");
            self.event(now, format!("{name}: panic mode ends"));
        }
        Some(Service {
            spec,
            magic_v4: a.v4,
            magic_v6: a.v6,
        })
    }

    /// Drops what is kept about a service that is gone.
    fn forget(&mut self, name: &ServiceName) {
        self.unhealthy.remove(name);
        self.ejected.remove(name);
        self.target_map.remove(name);
        self.panicking.remove(name);
    }

    fn note_hold(&mut self, h: &Held, now: u64) {
        METRICS.guard_holds.inc();
        let kept: Vec<String> = h.kept.iter().map(ToString::to_string).collect();
        let what = match h.reason {
            HoldReason::WouldEmpty => "would leave no backends: not applied".to_string(),
            HoldReason::SharpDrop { removed, of } => {
                format!("removes {removed} of {of} backends: held")
            }
            HoldReason::Vanished => "service gone from every source: removal held".to_string(),
        };
        self.event(now, format!("guard: update to {} {what}", h.service));
        match h.reason {
            HoldReason::WouldEmpty => {
                warn!(service = %h.service, kept = ?kept, "update would leave no backends: not applied, the current backends keep serving")
            }
            HoldReason::SharpDrop { removed, of } => {
                warn!(service = %h.service, removed, of, hold_down = ?self.guard.hold_down(), kept = ?kept, "update removes too many backends at once: removal held")
            }
            HoldReason::Vanished => {
                warn!(service = %h.service, hold_down = ?self.guard.hold_down(), "service gone from every source: removal held")
            }
        }
    }

    fn persist_magic(&self) {
        let Some(path) = &self.magic_path else { return };
        if let Err(e) = state::write_atomic(path, &self.magic.to_json()) {
            error!(path = %path.display(), error = %e, "cannot persist the magic address map; addresses stay in memory");
        }
    }

    /// Like `persist`, on a blocking thread; skipped while the previous save is still running
    /// (what it would have written is written by the next one).
    fn persist_in_background(&mut self) {
        if self.saving.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if self
            .save_failed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            self.dirty = true;
        }
        if let Some(job) = self.save_job() {
            self.saving = Some(tokio::task::spawn_blocking(move || job.run()));
        }
    }

    /// Runs the `on_publish` hooks for the latest snapshot and writes `backends.json`, each if
    /// anything changed since the last call: a burst of changes costs one write.
    pub fn persist(&mut self) {
        if let Some(job) = self.save_job() {
            job.run();
        }
    }

    /// What the registry knows, for `discotech status`.
    pub fn status(&self) -> RegistryStatus {
        let clock = Instant::now();
        RegistryStatus {
            generation: self.shared.load().generation,
            services: self.published.len(),
            sources: self
                .names
                .iter()
                .zip(&self.sources)
                .zip(&self.health)
                .map(|((name, set), h)| SourceStatus {
                    name: name.clone(),
                    state: match (set, h) {
                        (None, _) => "waiting",
                        (Some(_), h) if h.restored => "restored",
                        (Some(_), h)
                            if h.last_failure > h.last_update
                                || (h.error.is_some() && h.last_update.is_none()) =>
                        {
                            "failed"
                        }
                        _ => "ok",
                    }
                    .to_string(),
                    services: set.as_ref().map_or(0, OrdMap::len),
                    last_update: h.last_update,
                    last_failure: h.last_failure,
                    error: h.error.clone(),
                })
                .collect(),
            held: self
                .guard
                .held()
                .map(|h| {
                    let age = clock.saturating_duration_since(h.since);
                    HeldStatus {
                        service: h.service.clone(),
                        reason: match h.reason {
                            HoldReason::WouldEmpty => "update would leave no backends".to_string(),
                            HoldReason::SharpDrop { removed, of } => {
                                format!("update removes {removed} of {of} backends")
                            }
                            HoldReason::Vanished => "gone from every source".to_string(),
                        },
                        age: age.as_secs(),
                        applies_in: (h.reason != HoldReason::WouldEmpty)
                            .then(|| self.guard.hold_down().saturating_sub(age).as_secs()),
                        kept: h.kept.clone(),
                    }
                })
                .collect(),
            drained: self.drained.clone(),
            unhealthy: self.unhealthy_status(clock),
            panicking: self.panicking.clone(),
            events: self.events.iter().cloned().collect(),
        }
    }

    /// Takes a reloaded list of sources: a source that keeps its name keeps its set and health;
    /// a removed source's services go (through the guard); a new source starts empty.
    pub fn reconfigure(&mut self, names: Vec<String>, guard: GuardConfig, now: u64) {
        let mut sources = Vec::with_capacity(names.len());
        let mut health = Vec::with_capacity(names.len());
        for name in &names {
            let old = self.names.iter().position(|n| n == name);
            sources.push(old.and_then(|i| self.sources.get_mut(i).and_then(Option::take)));
            health.push(
                old.and_then(|i| self.health.get(i).cloned())
                    .unwrap_or_default(),
            );
        }
        self.names = names;
        self.sources = sources;
        self.health = health;
        self.guard.set_config(guard);
        self.event(
            now,
            format!("sources reconfigured: {}", self.names.join(", ")),
        );
        self.dirty = true;
        self.refresh_all(now, Instant::now());
    }

    /// Records a health check's verdict on one backend and republishes.
    pub fn set_health_of(
        &mut self,
        service: &ServiceName,
        addr: SocketAddr,
        healthy: bool,
        reason: &str,
        now: u64,
    ) {
        let known = self
            .published
            .get(service)
            .is_some_and(|s| s.backends.iter().any(|b| b.addr == addr));
        if !known {
            return;
        }
        let changed = if healthy {
            self.unhealthy
                .get_mut(service)
                .and_then(|m| m.remove(&addr))
                .is_some()
        } else {
            self.unhealthy
                .entry(service.clone())
                .or_default()
                .insert(addr, reason.to_string())
                .is_none()
        };
        self.note_in_pick_set(service, addr);
        if changed {
            if healthy {
                info!(%service, %addr, "backend healthy again");
                self.event(now, format!("{addr} of {service} is healthy again"));
            } else {
                warn!(%service, %addr, %reason, "backend unhealthy: out of the pick set");
                self.event(now, format!("{addr} of {service} is unhealthy: {reason}"));
            }
            self.refresh([service.clone()], now, Instant::now());
        }
    }

    /// Records a passive-health ejection of one backend until `until` and republishes: the
    /// backend leaves the published spec (health's panic mode and tiers apply) and returns by
    /// itself when `until` passes (see [`Registry::wake`]). A backend already ejected gets the
    /// new `until`. Backends the registry does not publish are ignored.
    pub fn eject(
        &mut self,
        service: &ServiceName,
        addr: SocketAddr,
        until: Instant,
        reason: &str,
        now: u64,
        clock: Instant,
    ) {
        let known = self
            .published
            .get(service)
            .is_some_and(|s| s.backends.iter().any(|b| b.addr == addr));
        if !known || until <= clock {
            return;
        }
        let ejection = Ejection {
            until,
            reason: reason.to_string(),
        };
        let again = self
            .ejected
            .entry(service.clone())
            .or_default()
            .insert(addr, ejection)
            .is_some();
        self.set_wake();
        self.note_in_pick_set(service, addr);
        if again {
            debug!(%service, %addr, %reason, "ejection extended");
            return;
        }
        info!(%service, %addr, %reason, "backend ejected: out of SRV answers until the ejection ends");
        self.event(now, format!("{addr} of {service} {reason}"));
        self.refresh([service.clone()], now, clock);
    }

    /// What the registry does when `wake_at` comes: guard holds that matured apply, ejections
    /// that ended let their backends back in. Republishes what changed.
    pub fn wake(&mut self, now: u64, clock: Instant) {
        let mut due: BTreeSet<ServiceName> = self.guard.due(clock).into_iter().collect();
        let mut back = Vec::new();
        self.ejected.retain(|service, map| {
            map.retain(|addr, e| {
                let over = e.until <= clock;
                if over {
                    back.push((service.clone(), *addr));
                }
                !over
            });
            !map.is_empty()
        });
        for (service, addr) in back {
            info!(%service, %addr, "ejection over: backend back in SRV answers");
            self.event(now, format!("{addr} of {service} is back from ejection"));
            self.note_in_pick_set(&service, addr);
            due.insert(service);
        }
        self.refresh(due, now, clock);
    }

    /// The earliest of the guard's holds maturing and an ejection ending.
    fn set_wake(&mut self) {
        let ejection_ends = self
            .ejected
            .values()
            .flat_map(BTreeMap::values)
            .map(|e| e.until)
            .min();
        self.wake_at = match (self.guard.next_wake(), ejection_ends) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Keeps the `backend_healthy` gauge current: 1 while neither kind of health holds it out.
    fn note_in_pick_set(&self, service: &ServiceName, addr: SocketAddr) {
        let out = self
            .unhealthy
            .get(service)
            .is_some_and(|m| m.contains_key(&addr))
            || self
                .ejected
                .get(service)
                .is_some_and(|m| m.contains_key(&addr));
        let labels = crate::metrics::BackendLabels {
            service: service.to_string(),
            backend: addr.to_string(),
        };
        METRICS
            .backend_healthy
            .get_or_create(&labels)
            .set(i64::from(!out));
    }

    /// Active health's verdicts and passive-health ejections together, for the status: the
    /// reason of an ejection tells how long it has left.
    fn unhealthy_status(
        &self,
        clock: Instant,
    ) -> BTreeMap<ServiceName, BTreeMap<SocketAddr, String>> {
        let mut out = self.unhealthy.clone();
        for (service, map) in &self.ejected {
            let entry = out.entry(service.clone()).or_default();
            for (addr, e) in map {
                let left = e.until.saturating_duration_since(clock);
                // Rounded up: "0s left" would read as over.
                let left = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                let ejected = format!("{}, {left}s left", e.reason);
                entry
                    .entry(*addr)
                    .and_modify(|why| *why = format!("{why}; {ejected}"))
                    .or_insert(ejected);
            }
        }
        out
    }

    /// Drains or undrains one backend.
    ///
    /// # Errors
    /// The service or the backend is unknown.
    pub fn drain(
        &mut self,
        service: &ServiceName,
        addr: SocketAddr,
        drain: bool,
        now: u64,
    ) -> Result<(), String> {
        let spec = self
            .published
            .get(service)
            .ok_or_else(|| format!("no service {service}"))?;
        if drain && !spec.backends.iter().any(|b| b.addr == addr) {
            return Err(format!("{addr} is not a backend of {service}"));
        }
        let set = self.drained.entry(service.clone()).or_default();
        let changed = if drain {
            set.insert(addr)
        } else {
            set.remove(&addr)
        };
        if set.is_empty() {
            self.drained.remove(service);
        }
        if changed {
            info!(%service, %addr, drain, "drain changed");
            self.event(
                now,
                format!(
                    "{} {addr} of {service}",
                    if drain { "drained" } else { "undrained" }
                ),
            );
            self.dirty = true;
            self.refresh([service.clone()], now, Instant::now());
        }
        Ok(())
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Drain {
                service,
                addr,
                drain,
                reply,
            } => {
                let _ = reply.send(self.drain(&service, addr, drain, unix_now()));
            }
            Command::Reconfigure {
                names,
                guard,
                health,
                reply,
            } => {
                self.health_cfg = health;
                self.reconfigure(names, guard, unix_now());
                let _ = reply.send(());
            }
            Command::Health {
                service,
                addr,
                healthy,
                reason,
            } => self.set_health_of(&service, addr, healthy, &reason, unix_now()),
            Command::Eject {
                service,
                addr,
                until,
                reason,
            } => self.eject(&service, addr, until, &reason, unix_now(), Instant::now()),
        }
    }

    /// Applies events and commands until every source is gone or `shutdown`; persists before returning.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<SourceEvent>,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
        let mut next_persist = tokio::time::Instant::now();
        let far = Duration::from_secs(86_400);
        loop {
            let wake = self.wake_at.map_or_else(
                || tokio::time::Instant::now() + far,
                tokio::time::Instant::from_std,
            );
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = rx.recv() => match event {
                    Some(event) => self.apply(event, unix_now()),
                    None => break,
                },
                Some(command) = commands.recv() => self.command(command),
                () = tokio::time::sleep_until(wake) => self.wake(unix_now(), Instant::now()),
                _ = housekeeping.tick() => self.tick(unix_now()),
                () = tokio::time::sleep_until(next_persist) => {
                    self.persist_in_background();
                    next_persist = tokio::time::Instant::now() + PERSIST_EVERY.max(last_save() * PERSIST_SHARE);
                }
            }
        }
        // Let a save in flight finish, then write what is newer.
        if let Some(h) = self.saving.take() {
            let _ = h.await;
        }
        self.persist();
    }
}

/// One save: the `on_publish` hooks for a snapshot and the last-known-good file.
struct SaveJob {
    announce: Option<(Arc<Snapshot>, Vec<OnPublish>)>,
    state: Option<StateCopy>,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

/// What `backends.json` is made of, copied in O(1) from the registry's persistent maps.
struct StateCopy {
    path: PathBuf,
    names: Vec<String>,
    sources: Vec<Option<OrdMap<ServiceName, ServiceSpec>>>,
    published: OrdMap<ServiceName, ServiceSpec>,
    drained: BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
}

impl SaveJob {
    fn run(self) {
        let started = Instant::now();
        if let Some((snapshot, hooks)) = self.announce {
            for f in &hooks {
                f(&snapshot);
            }
        }
        if let Some(StateCopy {
            path,
            names,
            sources,
            published,
            drained,
        }) = self.state
        {
            let lkg = LastKnownGood {
                version: 1,
                sources: names
                    .iter()
                    .zip(&sources)
                    .filter_map(|(n, s)| Some((n.clone(), s.as_ref()?.values().cloned().collect())))
                    .collect(),
                published: published.values().cloned().collect(),
                drained,
            };
            let written = serde_json::to_vec(&lkg)
                .map_err(std::io::Error::other)
                .and_then(|bytes| state::write_atomic(&path, &bytes));
            if let Err(e) = written {
                error!(path = %path.display(), error = %e, "cannot persist the last-known-good state; will retry");
                self.failed
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
        LAST_SAVE_NANOS.store(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// How long the last save took, so the next one can keep its distance.
static LAST_SAVE_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn last_save() -> Duration {
    Duration::from_nanos(LAST_SAVE_NANOS.load(std::sync::atomic::Ordering::Relaxed))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Backend;
    use crate::snapshot;

    fn spec(name: &str, backends: &[&str]) -> ServiceSpec {
        let mut s = ServiceSpec::new(name.parse().unwrap());
        s.backends = backends
            .iter()
            .map(|b| Backend::new(b.parse().unwrap()))
            .collect();
        s
    }

    fn registry(sources: usize, dir: Option<&std::path::Path>) -> Registry {
        let magic = MagicMap::new(
            "127.77.0.0/16".parse().unwrap(),
            None,
            Duration::from_secs(86_400),
        );
        let paths = StatePaths {
            magic: dir.map(|d| d.join("magic.json")),
            backends: dir.map(|d| d.join("backends.json")),
        };
        let names = (0..sources).map(|i| format!("s{i}")).collect();
        Registry::new(
            names,
            Guard::new(GuardConfig::default()),
            magic,
            paths,
            snapshot::shared(Snapshot::default()),
        )
    }

    #[test]
    fn sources_merge_by_service_and_backend() {
        let mut r = registry(2, None);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &["127.0.0.2:80"])],
            },
            0,
        );
        r.apply(
            SourceEvent::Reset {
                source: 1,
                services: vec![
                    spec("web", &["127.0.0.2:80", "127.0.0.3:80"]),
                    spec("api", &[]),
                ],
            },
            0,
        );
        let snap = r.snapshot().load_full();
        assert_eq!(snap.generation, 2);
        assert_eq!(snap.service("web").unwrap().spec.backends.len(), 2);
        assert!(snap.service("api").is_some());
    }

    #[test]
    fn updates_replace_one_service_of_a_source() {
        let mut r = registry(1, None);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![
                    spec("web", &["127.0.0.2:80"]),
                    spec("api", &["127.0.0.5:80"]),
                ],
            },
            0,
        );
        r.apply(
            SourceEvent::Update {
                source: 0,
                service: spec("web", &["127.0.0.2:80", "127.0.0.3:80"]),
            },
            0,
        );
        r.apply(
            SourceEvent::Update {
                source: 0,
                service: spec("db", &["127.0.0.4:80"]),
            },
            0,
        );
        let snap = r.snapshot().load_full();
        assert_eq!(snap.service("web").unwrap().spec.backends.len(), 2);
        assert!(snap.service("api").is_some() && snap.service("db").is_some());
    }

    #[test]
    fn drained_backends_leave_the_snapshot_and_status_tells_about_sources_and_holds() {
        let mut r = registry(2, None);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &["127.0.0.2:80", "127.0.0.3:80"])],
            },
            5,
        );
        r.apply(
            SourceEvent::Failed {
                source: 1,
                error: "connection refused".into(),
            },
            6,
        );
        let web: ServiceName = "web".parse().unwrap();
        r.drain(&web, "127.0.0.3:80".parse().unwrap(), true, 7)
            .unwrap();
        assert_eq!(
            r.snapshot()
                .load()
                .service("web")
                .unwrap()
                .spec
                .backends
                .len(),
            1
        );
        assert!(
            r.drain(&web, "127.0.0.9:80".parse().unwrap(), true, 7)
                .unwrap_err()
                .contains("not a backend")
        );
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &[])],
            },
            8,
        );
        let st = r.status();
        assert_eq!(st.sources[0].state, "ok");
        assert_eq!(st.sources[0].last_update, Some(8));
        assert_eq!(
            (st.sources[1].state.as_str(), st.sources[1].error.as_deref()),
            ("waiting", Some("connection refused"))
        );
        assert_eq!(st.held.len(), 1);
        assert_eq!(
            st.held[0].applies_in, None,
            "an emptying update never applies"
        );
        assert_eq!(st.drained[&web].len(), 1);
        r.drain(&web, "127.0.0.3:80".parse().unwrap(), false, 10)
            .unwrap();
        assert_eq!(
            r.snapshot()
                .load()
                .service("web")
                .unwrap()
                .spec
                .backends
                .len(),
            2
        );
    }

    #[test]
    fn reconfiguring_keeps_sets_by_source_name() {
        let mut r = registry(2, None);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &["127.0.0.2:80"])],
            },
            0,
        );
        r.apply(
            SourceEvent::Reset {
                source: 1,
                services: vec![spec("api", &["127.0.0.3:80"])],
            },
            0,
        );
        // s1 moves to the front, s0 is removed, s9 is new.
        r.reconfigure(
            vec!["s1".into(), "s9".into()],
            GuardConfig {
                max_drop: 0.5,
                hold_down: Duration::ZERO,
            },
            1,
        );
        let snap = r.snapshot().load_full();
        assert!(snap.service("api").is_some());
        assert!(
            snap.service("web").is_none(),
            "a removed source's services go after the (zero) hold-down"
        );
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("api", &["127.0.0.3:80", "127.0.0.4:80"])],
            },
            2,
        );
        assert_eq!(
            r.snapshot()
                .load()
                .service("api")
                .unwrap()
                .spec
                .backends
                .len(),
            2,
            "index 0 is now s1"
        );
    }

    #[test]
    fn a_failing_source_keeps_its_services() {
        let mut r = registry(1, None);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &["127.0.0.2:80"])],
            },
            0,
        );
        r.apply(
            SourceEvent::Failed {
                source: 0,
                error: "unreadable".into(),
            },
            1,
        );
        assert!(r.snapshot().load().service("web").is_some());
        assert_eq!(
            r.snapshot().load().generation,
            1,
            "a failure publishes nothing"
        );
    }

    #[test]
    fn the_guard_sits_between_sources_and_the_snapshot() {
        let mut r = registry(1, None);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &["127.0.0.2:80", "127.0.0.3:80"])],
            },
            0,
        );
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &[])],
            },
            1,
        );
        assert_eq!(
            r.snapshot()
                .load()
                .service("web")
                .unwrap()
                .spec
                .backends
                .len(),
            2,
            "never emptied"
        );
        assert_eq!(r.held().count(), 1);
    }

    #[test]
    fn last_known_good_state_restores_sources_and_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = registry(2, Some(dir.path()));
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &["127.0.0.2:80"])],
            },
            0,
        );
        r.apply(
            SourceEvent::Reset {
                source: 1,
                services: vec![spec("api", &["127.0.0.3:80", "127.0.0.4:80"])],
            },
            0,
        );
        r.apply(
            SourceEvent::Reset {
                source: 1,
                services: vec![spec("api", &[])],
            },
            0,
        );
        r.persist();
        let web = r.snapshot().load().service("web").unwrap().magic_v4;

        let mut restarted = registry(2, Some(dir.path()));
        let bytes = std::fs::read(dir.path().join("backends.json")).unwrap();
        assert_eq!(restarted.restore(&bytes, 10).unwrap(), 2);
        let snap = restarted.snapshot().load_full();
        assert_eq!(
            snap.service("api").unwrap().spec.backends.len(),
            2,
            "the held state is what was published"
        );
        // Source 0 comes back; source 1 is still down and keeps what it said before.
        restarted.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &["127.0.0.2:80"])],
            },
            11,
        );
        let snap = restarted.snapshot().load_full();
        assert!(snap.service("api").is_some());
        assert_eq!(snap.service("web").unwrap().magic_v4, web);
    }

    #[test]
    fn identical_updates_publish_nothing_and_addresses_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = registry(1, Some(dir.path()));
        let set = vec![spec("web", &["127.0.0.2:80"])];
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: set.clone(),
            },
            0,
        );
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: set,
            },
            0,
        );
        assert_eq!(r.snapshot().load().generation, 1);
        let web = r.snapshot().load().service("web").unwrap().magic_v4;
        let mut restored = MagicMap::new(
            "127.77.0.0/16".parse().unwrap(),
            None,
            Duration::from_secs(86_400),
        );
        restored
            .restore(&std::fs::read(dir.path().join("magic.json")).unwrap())
            .unwrap();
        assert_eq!(restored.get(&"web".parse().unwrap()).unwrap().v4, web);
    }

    fn published(r: &Registry, name: &str) -> Vec<String> {
        r.snapshot()
            .load()
            .service(name)
            .unwrap()
            .spec
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    }

    fn web_with(backends: &[&str]) -> Registry {
        let mut r = registry(1, None);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", backends)],
            },
            0,
        );
        r
    }

    const REASON: &str = "ejected after 3 consecutive connect failures, for 30s";

    #[test]
    fn an_ejected_backend_leaves_the_snapshot_until_its_ejection_ends() {
        let mut r = web_with(&["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"]);
        let web: ServiceName = "web".parse().unwrap();
        let t0 = Instant::now();
        let b = "127.0.0.3:80".parse().unwrap();
        r.eject(&web, b, t0 + Duration::from_secs(30), REASON, 1, t0);
        assert_eq!(published(&r, "web"), ["127.0.0.2:80", "127.0.0.4:80"]);
        assert_eq!(r.wake_at, Some(t0 + Duration::from_secs(30)));
        let st = r.status();
        assert!(
            st.unhealthy[&web][&b].starts_with(REASON),
            "{:?}",
            st.unhealthy
        );
        assert!(
            st.events
                .last()
                .unwrap()
                .message
                .contains("127.0.0.3:80 of web ejected after 3")
        );

        // A second ejection before the end moves the end.
        r.eject(&web, b, t0 + Duration::from_secs(60), REASON, 2, t0);
        r.wake(3, t0 + Duration::from_secs(31));
        assert_eq!(published(&r, "web").len(), 2, "extended");

        r.wake(4, t0 + Duration::from_secs(60));
        assert_eq!(
            published(&r, "web"),
            ["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"]
        );
        assert_eq!(r.wake_at, None);
        assert!(r.status().unhealthy.is_empty());
        assert!(
            r.status()
                .events
                .last()
                .unwrap()
                .message
                .contains("back from ejection")
        );
    }

    #[test]
    fn active_and_passive_health_do_not_readmit_each_others_backends() {
        let mut r = web_with(&[
            "127.0.0.2:80",
            "127.0.0.3:80",
            "127.0.0.4:80",
            "127.0.0.5:80",
        ]);
        let web: ServiceName = "web".parse().unwrap();
        let t0 = Instant::now();
        let (b, c) = (
            "127.0.0.3:80".parse().unwrap(),
            "127.0.0.4:80".parse().unwrap(),
        );
        r.eject(&web, b, t0 + Duration::from_secs(30), REASON, 1, t0);
        r.set_health_of(&web, b, true, "checks pass", 2);
        assert_eq!(
            published(&r, "web"),
            ["127.0.0.2:80", "127.0.0.4:80", "127.0.0.5:80"],
            "a passing check does not end an ejection"
        );

        r.set_health_of(&web, c, false, "connection refused", 3);
        r.eject(&web, c, t0 + Duration::from_secs(10), REASON, 4, t0);
        r.set_health_of(&web, b, false, "connection refused", 4);
        let st = r.status();
        assert_eq!(
            st.unhealthy[&web][&c],
            format!("connection refused; {REASON}, 10s left")
        );
        r.wake(5, t0 + Duration::from_secs(30));
        assert_eq!(
            published(&r, "web"),
            ["127.0.0.2:80", "127.0.0.5:80"],
            "the end of an ejection does not readmit a backend failing its checks"
        );
        assert!(r.ejected.is_empty());
        r.set_health_of(&web, b, true, "checks pass", 6);
        r.set_health_of(&web, c, true, "checks pass", 6);
        assert_eq!(published(&r, "web").len(), 4);
    }

    #[test]
    fn ejections_keep_panic_mode_and_never_empty_the_answers() {
        let mut r = web_with(&[
            "127.0.0.2:80",
            "127.0.0.3:80",
            "127.0.0.4:80",
            "127.0.0.5:80",
        ]);
        let web: ServiceName = "web".parse().unwrap();
        let t0 = Instant::now();
        for (i, addr) in ["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"]
            .iter()
            .enumerate()
        {
            let until = t0 + Duration::from_secs(10 + i as u64);
            r.eject(&web, addr.parse().unwrap(), until, REASON, 1, t0);
        }
        assert_eq!(
            published(&r, "web").len(),
            4,
            "1 of 4 in is below the panic threshold: balance over all"
        );
        assert!(r.status().panicking.contains(&web));
        r.eject(
            &web,
            "127.0.0.5:80".parse().unwrap(),
            t0 + Duration::from_secs(20),
            REASON,
            1,
            t0,
        );
        assert_eq!(published(&r, "web").len(), 4, "never empty");

        r.wake(2, t0 + Duration::from_secs(11));
        assert_eq!(
            published(&r, "web"),
            ["127.0.0.2:80", "127.0.0.3:80"],
            "2 of 4 is enough"
        );
        assert!(r.status().panicking.is_empty());
        r.wake(3, t0 + Duration::from_secs(20));
        assert_eq!(published(&r, "web").len(), 4);
    }

    #[test]
    fn ejections_of_unknown_or_departed_backends_are_dropped() {
        let mut r = web_with(&["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"]);
        let web: ServiceName = "web".parse().unwrap();
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(30);
        r.eject(&web, "127.0.0.9:80".parse().unwrap(), until, REASON, 1, t0);
        r.eject(
            &"api".parse().unwrap(),
            "127.0.0.2:80".parse().unwrap(),
            until,
            REASON,
            1,
            t0,
        );
        r.eject(&web, "127.0.0.2:80".parse().unwrap(), t0, REASON, 1, t0);
        assert!(r.ejected.is_empty() && r.wake_at.is_none());
        assert_eq!(r.snapshot().load().generation, 1, "nothing republished");

        r.eject(&web, "127.0.0.4:80".parse().unwrap(), until, REASON, 1, t0);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec("web", &["127.0.0.2:80", "127.0.0.3:80"])],
            },
            2,
        );
        assert!(r.ejected.is_empty(), "the backend left its service");
        assert_eq!(r.wake_at, None);
        r.apply(
            SourceEvent::Reset {
                source: 0,
                services: vec![spec(
                    "web",
                    &["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"],
                )],
            },
            3,
        );
        assert_eq!(
            published(&r, "web").len(),
            3,
            "a returning backend is not ejected"
        );
    }
}
