//! The registry merges what every source says into one snapshot: it gives each service its magic
//! addresses, persists the magic map, and swaps the new snapshot in for every reader at once.
//! A source that fails keeps its last good set; a source that has not spoken yet contributes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::magic::MagicMap;
use crate::service::{ServiceName, ServiceSpec};
use crate::snapshot::{Service, SharedSnapshot, Snapshot};
use crate::source::SourceEvent;
use crate::state;

/// Called with every newly published snapshot (e.g. to refresh the hook's fallback file).
pub type OnPublish = Box<dyn FnMut(&Snapshot) + Send>;

pub struct Registry {
    sources: Vec<Option<Vec<ServiceSpec>>>,
    magic: MagicMap,
    magic_path: Option<PathBuf>,
    shared: SharedSnapshot,
    on_publish: Vec<OnPublish>,
}

impl Registry {
    /// `magic_path`: where the magic map is persisted (`None` in tests that need no disk).
    pub fn new(source_count: usize, magic: MagicMap, magic_path: Option<PathBuf>, shared: SharedSnapshot) -> Self {
        Self { sources: vec![None; source_count], magic, magic_path, shared, on_publish: Vec::new() }
    }

    pub fn on_publish(&mut self, f: OnPublish) {
        self.on_publish.push(f);
    }

    pub fn snapshot(&self) -> SharedSnapshot {
        self.shared.clone()
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
                self.publish(now);
            }
            SourceEvent::Failed { source, error } => {
                warn!(source, %error, "source failed; its last good services keep serving");
            }
        }
    }

    /// Re-runs magic address bookkeeping (quarantine expiry) and publishes if anything changed.
    pub fn tick(&mut self, now: u64) {
        let live: BTreeSet<ServiceName> = self.merged().into_keys().collect();
        if self.magic.sync(&live, now).changed {
            self.persist();
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

    fn publish(&mut self, now: u64) {
        let merged = self.merged();
        let live: BTreeSet<ServiceName> = merged.keys().cloned().collect();
        let outcome = self.magic.sync(&live, now);
        for e in &outcome.errors {
            error!("{e}");
        }
        if outcome.changed {
            self.persist();
        }
        let services = merged.into_values().filter_map(|spec| {
            let a = self.magic.get(&spec.name)?;
            Some(Service { spec, magic_v4: a.v4, magic_v6: a.v6 })
        });
        let generation = self.shared.load().generation + 1;
        let snapshot = Snapshot::new(generation, services);
        info!(generation, services = snapshot.len(), "published");
        for f in &mut self.on_publish {
            f(&snapshot);
        }
        self.shared.store(std::sync::Arc::new(snapshot));
    }

    fn persist(&self) {
        let Some(path) = &self.magic_path else { return };
        if let Err(e) = state::write_atomic(path, &self.magic.to_json()) {
            error!(path = %path.display(), error = %e, "cannot persist the magic address map; addresses stay in memory");
        }
    }

    /// Applies events until every sender is gone or `shutdown`.
    pub async fn run(mut self, mut rx: mpsc::Receiver<SourceEvent>, shutdown: CancellationToken) {
        let mut housekeeping = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = rx.recv() => match event {
                    Some(event) => self.apply(event, unix_now()),
                    None => return,
                },
                _ = housekeeping.tick() => self.tick(unix_now()),
            }
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Backend;
    use crate::snapshot;
    use std::time::Duration;

    fn spec(name: &str, backends: &[&str]) -> ServiceSpec {
        let mut s = ServiceSpec::new(name.parse().unwrap());
        s.backends = backends.iter().map(|b| Backend::new(b.parse().unwrap())).collect();
        s
    }

    fn registry(sources: usize, path: Option<PathBuf>) -> Registry {
        let magic = MagicMap::new("127.77.0.0/16".parse().unwrap(), None, Duration::from_secs(86_400));
        Registry::new(sources, magic, path, snapshot::shared(Snapshot::default()))
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
    fn a_failing_source_keeps_its_services() {
        let mut r = registry(1, None);
        r.apply(SourceEvent::Reset { source: 0, services: vec![spec("web", &["127.0.0.2:80"])] }, 0);
        r.apply(SourceEvent::Failed { source: 0, error: "unreadable".into() }, 1);
        assert!(r.snapshot().load().service("web").is_some());
        assert_eq!(r.snapshot().load().generation, 1, "a failure publishes nothing");
    }

    #[test]
    fn identical_updates_publish_nothing_and_addresses_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("magic.json");
        let mut r = registry(1, Some(path.clone()));
        let set = vec![spec("web", &["127.0.0.2:80"])];
        r.apply(SourceEvent::Reset { source: 0, services: set.clone() }, 0);
        r.apply(SourceEvent::Reset { source: 0, services: set }, 0);
        assert_eq!(r.snapshot().load().generation, 1);
        let web = r.snapshot().load().service("web").unwrap().magic_v4;
        let mut restored = MagicMap::new("127.77.0.0/16".parse().unwrap(), None, Duration::from_secs(86_400));
        restored.restore(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(restored.get(&"web".parse().unwrap()).unwrap().v4, web);
    }
}
