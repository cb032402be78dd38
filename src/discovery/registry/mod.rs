//! The registry merges what every source says into one snapshot: it passes the merge through
//! the guard, gives each service its magic addresses, keeps the last-known-good state on disk,
//! and swaps the new snapshot in for every reader at once.
//!
//! A source that fails keeps its last good set; a source that has not spoken yet contributes what
//! it said before the last restart (restored from `backends.json`), so a daemon started while
//! its registry is down serves the persisted state at once.
//!
//! Health takes backends out of what is published (and so out of SRV answers, connect picks and
//! the hook's fallback file) in two independent ways: active checks (`Command::Health`, from `health::Change`) and
//! passive-health ejections the hook server reports (`Command::Eject`), which end by themselves.
//! Both go through `overlay::effective`, so panic mode and priority tiers apply alike.
//!
//! This file holds the actor (`Command`, the registry's state, applying source events and admin
//! commands); `merge.rs` the merge of sources through the guard into published services;
//! `overlay.rs` what health, ejections and drains take out; `persist.rs` the last-known-good
//! state on disk; `status.rs` the status and event log.

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

use crate::discovery::guard::{Guard, GuardConfig, Held, HoldReason};
use crate::discovery::health::SharedTargets;
use crate::discovery::health::config::HealthConfig;
use crate::discovery::magic::MagicMap;
use crate::discovery::snapshot::{Service, SharedSnapshot, Snapshot};
use crate::discovery::source::SourceEvent;
use crate::metrics::{METRICS, SourceLabels};
use crate::service::{ServiceName, ServiceSpec};
use crate::state;

/// Called with every newly published snapshot (e.g. to refresh the hook's fallback file).
/// Runs off the registry task (on a blocking thread), so it may take its time.
pub type OnPublish = Arc<dyn Fn(&Snapshot) + Send + Sync>;
/// A reader told of each snapshot as it is swapped in (see [`Registry::on_swap`]).
pub type OnSwap = Arc<dyn Fn(&Arc<Snapshot>) + Send + Sync>;

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

/// One passive-health ejection: out of the published spec until `until`.
#[derive(Debug, Clone)]
struct Ejection {
    until: Instant,
    reason: String,
}

#[derive(Debug, Clone, Default)]
struct SourceState {
    restored: bool,
    last_update: Option<u64>,
    last_failure: Option<u64>,
    error: Option<String>,
}

pub struct Registry {
    names: Vec<String>,
    sources: Vec<Option<OrdMap<ServiceName, ServiceSpec>>>,
    source_states: Vec<SourceState>,
    drained: BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
    unhealthy: BTreeMap<ServiceName, BTreeMap<SocketAddr, String>>,
    /// Passive-health ejections, apart from `unhealthy` so that neither kind of health readmits
    /// a backend the other holds out. Not persisted: they last seconds to minutes.
    ejected: BTreeMap<ServiceName, BTreeMap<SocketAddr, Ejection>>,
    panicking: BTreeSet<ServiceName>,
    health_cfg: HealthConfig,
    targets: SharedTargets,
    target_map: crate::discovery::health::Targets,
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

/// How the rest of the daemon talks to the registry task: its questions as calls.
#[derive(Clone, Debug)]
pub struct RegistryHandle(mpsc::Sender<Command>);

/// A reset that changed at least this many services is followed by giving free memory back.
const RELEASE_AFTER: usize = 1000;

/// How long a caller waits for the registry's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

impl RegistryHandle {
    pub fn new(commands: mpsc::Sender<Command>) -> Self {
        Self(commands)
    }

    /// The registry's status, or None when it does not answer within two seconds.
    pub async fn status(&self) -> Option<RegistryStatus> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Command::Status(tx)).await.ok()?;
        tokio::time::timeout(ANSWER_WITHIN, rx).await.ok()?.ok()
    }

    /// Drains (or undrains) `addr` of `service`.
    ///
    /// # Errors
    /// The registry's refusal (an unknown service), or that it did not answer.
    pub async fn drain(
        &self,
        service: ServiceName,
        addr: SocketAddr,
        drain: bool,
    ) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        let asked = Command::Drain {
            service,
            addr,
            drain,
            reply,
        };
        let not_answering = || "the registry is not answering".to_string();
        self.0.send(asked).await.map_err(|_| not_answering())?;
        tokio::time::timeout(ANSWER_WITHIN, rx)
            .await
            .map_err(|_| not_answering())?
            .map_err(|_| not_answering())?
    }
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
            source_states: vec![SourceState::default(); source_names.len()],
            drained: BTreeMap::new(),
            unhealthy: BTreeMap::new(),
            ejected: BTreeMap::new(),
            panicking: BTreeSet::new(),
            health_cfg: HealthConfig::default(),
            targets: SharedTargets::default(),
            target_map: crate::discovery::health::Targets::new(),
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

    pub fn snapshot(&self) -> SharedSnapshot {
        self.shared.clone()
    }

    pub fn held(&self) -> impl Iterator<Item = &Held> {
        self.guard.held()
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
        if let Some(h) = self.source_states.get_mut(index) {
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
                let many = changed.len();
                self.refresh(changed, now, Instant::now());
                // A whole set read and published (start-up, a new ZooKeeper session) leaves
                // transients the size of the state freed: give them back rather than keep them
                // resident until the next such read.
                if many >= RELEASE_AFTER {
                    discotech_shm::release_free_memory();
                }
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

    /// Takes a reloaded list of sources: a source that keeps its name keeps its set and health;
    /// a removed source's services go (through the guard); a new source starts empty.
    pub fn reconfigure(&mut self, names: Vec<String>, guard: GuardConfig, now: u64) {
        let mut sources = Vec::with_capacity(names.len());
        let mut health = Vec::with_capacity(names.len());
        for name in &names {
            let old = self.names.iter().position(|n| n == name);
            sources.push(old.and_then(|i| self.sources.get_mut(i).and_then(Option::take)));
            health.push(
                old.and_then(|i| self.source_states.get(i).cloned())
                    .unwrap_or_default(),
            );
        }
        self.names = names;
        self.sources = sources;
        self.source_states = health;
        self.guard.set_config(guard);
        self.event(
            now,
            format!("sources reconfigured: {}", self.names.join(", ")),
        );
        self.dirty = true;
        self.refresh_all(now, Instant::now());
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

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

mod merge;
mod overlay;
mod persist;
mod status;

use persist::{PERSIST_EVERY, PERSIST_SHARE, last_save};
pub use status::{Event, HeldStatus, RegistryStatus, SourceStatus};

#[cfg(test)]
mod tests;
