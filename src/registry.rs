//! The registry merges what every source says into one snapshot: it passes the merge through
//! the guard, gives each service its magic addresses, keeps the last-known-good state on disk,
//! and swaps the new snapshot in for every reader at once.
//!
//! A source that fails keeps its last good set; a source that has not spoken yet contributes what
//! it said before the last restart (restored from `backends.json`), so a daemon started while
//! its registry is down serves the persisted state at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::guard::{Guard, Held, HoldReason};
use crate::magic::MagicMap;
use crate::service::{ServiceName, ServiceSpec};
use crate::snapshot::{Service, SharedSnapshot, Snapshot};
use crate::source::SourceEvent;
use crate::state;

/// Called with every newly published snapshot (e.g. to refresh the hook's fallback file).
pub type OnPublish = Box<dyn FnMut(&Snapshot) + Send>;

/// How often, at most, the last-known-good file is rewritten: a burst of changes costs one write.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// The persisted last-known-good state (`backends.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct LastKnownGood {
    version: u32,
    /// What each source (by name) last said.
    sources: BTreeMap<String, Vec<ServiceSpec>>,
    /// What was published, guard holds included.
    published: Vec<ServiceSpec>,
}

pub struct Registry {
    names: Vec<String>,
    sources: Vec<Option<Vec<ServiceSpec>>>,
    published: BTreeMap<ServiceName, ServiceSpec>,
    guard: Guard,
    magic: MagicMap,
    magic_path: Option<PathBuf>,
    lkg_path: Option<PathBuf>,
    dirty: bool,
    wake_at: Option<Instant>,
    shared: SharedSnapshot,
    on_publish: Vec<OnPublish>,
}

/// Where the registry keeps its files; `None` keeps everything in memory (tests).
#[derive(Debug, Clone, Default)]
pub struct StatePaths {
    pub magic: Option<PathBuf>,
    pub backends: Option<PathBuf>,
}

impl Registry {
    /// `source_names`: one per configured source, in config order (events carry the index).
    pub fn new(source_names: Vec<String>, guard: Guard, magic: MagicMap, paths: StatePaths, shared: SharedSnapshot) -> Self {
        Self {
            sources: vec![None; source_names.len()],
            names: source_names,
            published: BTreeMap::new(),
            guard,
            magic,
            magic_path: paths.magic,
            lkg_path: paths.backends,
            dirty: false,
            wake_at: None,
            shared,
            on_publish: Vec::new(),
        }
    }

    pub fn on_publish(&mut self, f: OnPublish) {
        self.on_publish.push(f);
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
                    *slot = Some(services);
                }
            }
        }
        self.published = lkg.published.into_iter().map(|s| (s.name.clone(), s)).collect();
        let count = self.published.len();
        self.publish(now, Instant::now());
        Ok(count)
    }

    /// Applies one source event at `now` (unix seconds); publishes when anything changed.
    pub fn apply(&mut self, event: SourceEvent, now: u64) {
        match event {
            SourceEvent::Reset { source, services } => {
                let Some(slot) = self.sources.get_mut(source) else {
                    error!(source, "event from an unknown source");
                    return;
                };
                if slot.as_ref() == Some(&services) {
                    return;
                }
                *slot = Some(services);
                self.dirty = true;
                self.publish(now, Instant::now());
            }
            SourceEvent::Update { source, service } => {
                let Some(slot) = self.sources.get_mut(source) else {
                    error!(source, "event from an unknown source");
                    return;
                };
                let set = slot.get_or_insert_with(Vec::new);
                match set.iter_mut().find(|s| s.name == service.name) {
                    Some(existing) if *existing == service => return,
                    Some(existing) => *existing = service,
                    None => set.push(service),
                }
                self.dirty = true;
                self.publish(now, Instant::now());
            }
            SourceEvent::Failed { source, error } => {
                let name = self.names.get(source).map_or("?", String::as_str);
                warn!(source = name, %error, "source failed; its last good services keep serving");
            }
        }
    }

    /// Re-runs magic address bookkeeping (quarantine expiry).
    pub fn tick(&mut self, now: u64) {
        let live: BTreeSet<ServiceName> = self.published.keys().cloned().collect();
        if self.magic.sync(&live, now).changed {
            self.persist_magic();
        }
    }

    /// Union of every source's services. Backends are merged by address; the first source that
    /// names a service decides its balancing policy and port map.
    fn merged(&self) -> BTreeMap<ServiceName, ServiceSpec> {
        let mut out: BTreeMap<ServiceName, ServiceSpec> = BTreeMap::new();
        for spec in self.sources.iter().flatten().flatten() {
            match out.get_mut(&spec.name) {
                None => {
                    out.insert(spec.name.clone(), spec.clone());
                }
                Some(existing) => {
                    for b in &spec.backends {
                        if !existing.backends.iter().any(|e| e.addr == b.addr) {
                            existing.backends.push(b.clone());
                        }
                    }
                    for (port, name) in &spec.client_ports {
                        existing.client_ports.entry(*port).or_insert_with(|| name.clone());
                    }
                }
            }
        }
        out
    }

    fn publish(&mut self, now: u64, clock: Instant) {
        // Before any source has spoken or been restored, there is nothing to guard against.
        let decision = if self.sources.iter().all(Option::is_none) {
            crate::guard::Decision { services: self.published.clone(), ..Default::default() }
        } else {
            self.guard.apply(&self.published, self.merged(), clock)
        };
        for h in &decision.new_holds {
            let kept: Vec<String> = h.kept.iter().map(ToString::to_string).collect();
            match h.reason {
                HoldReason::WouldEmpty => warn!(service = %h.service, kept = ?kept, "update would leave no backends: not applied, the current backends keep serving"),
                HoldReason::SharpDrop { removed, of } => warn!(service = %h.service, removed, of, hold_down = ?self.guard.hold_down(), kept = ?kept, "update removes too many backends at once: removal held"),
                HoldReason::Vanished => warn!(service = %h.service, hold_down = ?self.guard.hold_down(), "service gone from every source: removal held"),
            }
        }
        for service in &decision.matured {
            info!(%service, "held update applied after the hold-down");
        }
        self.wake_at = decision.wake_at;
        if decision.services != self.published {
            self.dirty = true;
        }
        self.published = decision.services;

        let live: BTreeSet<ServiceName> = self.published.keys().cloned().collect();
        let outcome = self.magic.sync(&live, now);
        for e in &outcome.errors {
            error!("{e}");
        }
        if outcome.changed {
            self.persist_magic();
        }
        let services = self.published.values().filter_map(|spec| {
            let a = self.magic.get(&spec.name)?;
            Some(Service { spec: spec.clone(), magic_v4: a.v4, magic_v6: a.v6 })
        });
        let generation = self.shared.load().generation + 1;
        let snapshot = Snapshot::new(generation, services);
        info!(generation, services = snapshot.len(), "published");
        for f in &mut self.on_publish {
            f(&snapshot);
        }
        self.shared.store(Arc::new(snapshot));
    }

    fn persist_magic(&self) {
        let Some(path) = &self.magic_path else { return };
        if let Err(e) = state::write_atomic(path, &self.magic.to_json()) {
            error!(path = %path.display(), error = %e, "cannot persist the magic address map; addresses stay in memory");
        }
    }

    /// Writes `backends.json` if anything changed since the last write.
    pub fn persist(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let Some(path) = &self.lkg_path else { return };
        let lkg = LastKnownGood {
            version: 1,
            sources: self.names.iter().zip(&self.sources).filter_map(|(n, s)| Some((n.clone(), s.clone()?))).collect(),
            published: self.published.values().cloned().collect(),
        };
        let bytes = match serde_json::to_vec(&lkg) {
            Ok(b) => b,
            Err(e) => return error!(error = %e, "cannot encode the last-known-good state"),
        };
        if let Err(e) = state::write_atomic(path, &bytes) {
            error!(path = %path.display(), error = %e, "cannot persist the last-known-good state");
            self.dirty = true;
        }
    }

    /// Applies events until every sender is gone or `shutdown`; persists before returning.
    pub async fn run(mut self, mut rx: mpsc::Receiver<SourceEvent>, shutdown: CancellationToken) {
        let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
        let mut persist = tokio::time::interval(PERSIST_EVERY);
        let far = Duration::from_secs(86_400);
        loop {
            let wake = self.wake_at.map_or_else(|| tokio::time::Instant::now() + far, tokio::time::Instant::from_std);
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = rx.recv() => match event {
                    Some(event) => self.apply(event, unix_now()),
                    None => break,
                },
                () = tokio::time::sleep_until(wake) => self.publish(unix_now(), Instant::now()),
                _ = housekeeping.tick() => self.tick(unix_now()),
                _ = persist.tick() => self.persist(),
            }
        }
        self.persist();
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GuardConfig;
    use crate::service::Backend;
    use crate::snapshot;

    fn spec(name: &str, backends: &[&str]) -> ServiceSpec {
        let mut s = ServiceSpec::new(name.parse().unwrap());
        s.backends = backends.iter().map(|b| Backend::new(b.parse().unwrap())).collect();
        s
    }

    fn registry(sources: usize, dir: Option<&std::path::Path>) -> Registry {
        let magic = MagicMap::new("127.77.0.0/16".parse().unwrap(), None, Duration::from_secs(86_400));
        let paths = StatePaths { magic: dir.map(|d| d.join("magic.json")), backends: dir.map(|d| d.join("backends.json")) };
        let names = (0..sources).map(|i| format!("s{i}")).collect();
        Registry::new(names, Guard::new(GuardConfig::default()), magic, paths, snapshot::shared(Snapshot::default()))
    }

    #[test]
    fn sources_merge_by_service_and_backend() {
        let mut r = registry(2, None);
        r.apply(SourceEvent::Reset { source: 0, services: vec![spec("web", &["127.0.0.2:80"])] }, 0);
        r.apply(SourceEvent::Reset { source: 1, services: vec![spec("web", &["127.0.0.2:80", "127.0.0.3:80"]), spec("api", &[])] }, 0);
        let snap = r.snapshot().load_full();
        assert_eq!(snap.generation, 2);
        assert_eq!(snap.service("web").unwrap().spec.backends.len(), 2);
        assert!(snap.service("api").is_some());
    }

    #[test]
    fn updates_replace_one_service_of_a_source() {
        let mut r = registry(1, None);
        r.apply(SourceEvent::Reset { source: 0, services: vec![spec("web", &["127.0.0.2:80"]), spec("api", &["127.0.0.5:80"])] }, 0);
        r.apply(SourceEvent::Update { source: 0, service: spec("web", &["127.0.0.2:80", "127.0.0.3:80"]) }, 0);
        r.apply(SourceEvent::Update { source: 0, service: spec("db", &["127.0.0.4:80"]) }, 0);
        let snap = r.snapshot().load_full();
        assert_eq!(snap.service("web").unwrap().spec.backends.len(), 2);
        assert!(snap.service("api").is_some() && snap.service("db").is_some());
    }

    #[test]
    fn a_failing_source_keeps_its_services() {
        let mut r = registry(1, None);
        r.apply(SourceEvent::Reset { source: 0, services: vec![spec("web", &["127.0.0.2:80"])] }, 0);
        r.apply(SourceEvent::Failed { source: 0, error: "unreadable".into() }, 1);
        assert!(r.snapshot().load().service("web").is_some());
        assert_eq!(r.snapshot().load().generation, 1, "a failure publishes nothing");
    }

    #[test]
    fn the_guard_sits_between_sources_and_the_snapshot() {
        let mut r = registry(1, None);
        r.apply(SourceEvent::Reset { source: 0, services: vec![spec("web", &["127.0.0.2:80", "127.0.0.3:80"])] }, 0);
        r.apply(SourceEvent::Reset { source: 0, services: vec![spec("web", &[])] }, 1);
        assert_eq!(r.snapshot().load().service("web").unwrap().spec.backends.len(), 2, "never emptied");
        assert_eq!(r.held().count(), 1);
    }

    #[test]
    fn last_known_good_state_restores_sources_and_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = registry(2, Some(dir.path()));
        r.apply(SourceEvent::Reset { source: 0, services: vec![spec("web", &["127.0.0.2:80"])] }, 0);
        r.apply(SourceEvent::Reset { source: 1, services: vec![spec("api", &["127.0.0.3:80", "127.0.0.4:80"])] }, 0);
        r.apply(SourceEvent::Reset { source: 1, services: vec![spec("api", &[])] }, 0);
        r.persist();
        let web = r.snapshot().load().service("web").unwrap().magic_v4;

        let mut restarted = registry(2, Some(dir.path()));
        let bytes = std::fs::read(dir.path().join("backends.json")).unwrap();
        assert_eq!(restarted.restore(&bytes, 10).unwrap(), 2);
        let snap = restarted.snapshot().load_full();
        assert_eq!(snap.service("api").unwrap().spec.backends.len(), 2, "the held state is what was published");
        // Source 0 comes back; source 1 is still down and keeps what it said before.
        restarted.apply(SourceEvent::Reset { source: 0, services: vec![spec("web", &["127.0.0.2:80"])] }, 11);
        let snap = restarted.snapshot().load_full();
        assert!(snap.service("api").is_some());
        assert_eq!(snap.service("web").unwrap().magic_v4, web);
    }

    #[test]
    fn identical_updates_publish_nothing_and_addresses_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = registry(1, Some(dir.path()));
        let set = vec![spec("web", &["127.0.0.2:80"])];
        r.apply(SourceEvent::Reset { source: 0, services: set.clone() }, 0);
        r.apply(SourceEvent::Reset { source: 0, services: set }, 0);
        assert_eq!(r.snapshot().load().generation, 1);
        let web = r.snapshot().load().service("web").unwrap().magic_v4;
        let mut restored = MagicMap::new("127.77.0.0/16".parse().unwrap(), None, Duration::from_secs(86_400));
        restored.restore(&std::fs::read(dir.path().join("magic.json")).unwrap()).unwrap();
        assert_eq!(restored.get(&"web".parse().unwrap()).unwrap().v4, web);
    }
}
