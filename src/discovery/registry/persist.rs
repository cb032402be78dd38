//! The last-known-good state on disk (`backends.json`, the magic map): restored at start,
//! written in the background at most every `PERSIST_EVERY`.

use super::*;

/// How often, at most, the last-known-good file (and the hook's fallback file) is rewritten: a
/// burst of changes costs one write.
pub(super) const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Both files hold every service, so with many services a write is not free: after a write that
/// took `t`, the next waits at least `PERSIST_SHARE * t`, keeping their cost near 1/20 of a core
/// however many services change how often.
pub(super) const PERSIST_SHARE: u32 = 20;

/// The persisted last-known-good state (`backends.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct LastKnownGood {
    version: u32,
    /// What each source (by name) last said.
    sources: BTreeMap<String, Vec<ServiceSpec>>,
    /// What was published, guard holds included (drained backends too: draining is applied on top).
    published: Vec<ServiceSpec>,
    /// Backends an operator drained, per service.
    #[serde(default)]
    drained: BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
}

/// [`LastKnownGood`] as a save writes it: borrowed from the registry's maps and encoded
/// straight into the file, so a save holds no second copy of the state.
#[derive(Serialize)]
struct LastKnownGoodRef<'a> {
    version: u32,
    sources: BTreeMap<&'a str, Specs<'a>>,
    published: Specs<'a>,
    drained: &'a BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
}

/// The specs of a map, written as a list.
struct Specs<'a>(&'a OrdMap<ServiceName, ServiceSpec>);

impl Serialize for Specs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.values())
    }
}

impl Registry {
    /// What one save needs, copied cheaply (the maps are persistent) so that encoding and
    /// writing, which grow with the number of services, happen off the registry task.
    pub(super) fn save_job(&mut self) -> Option<SaveJob> {
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
                if let Some(h) = self.source_states.get_mut(i) {
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

    pub(super) fn persist_magic(&self) {
        let Some(path) = &self.magic_path else { return };
        if let Err(e) = state::write_atomic(path, &self.magic.to_json()) {
            error!(path = %path.display(), error = %e, "cannot persist the magic address map; addresses stay in memory");
        }
    }

    /// Like `persist`, on a blocking thread; skipped while the previous save is still running
    /// (what it would have written is written by the next one).
    pub(super) fn persist_in_background(&mut self) {
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
}

/// One save: the `on_publish` hooks for a snapshot and the last-known-good file.
pub(super) struct SaveJob {
    announce: Option<(Arc<Snapshot>, Vec<OnPublish>)>,
    state: Option<StateCopy>,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

/// What `backends.json` is made of, copied in O(1) from the registry's persistent maps.
pub(super) struct StateCopy {
    path: PathBuf,
    names: Vec<String>,
    sources: Vec<Option<OrdMap<ServiceName, ServiceSpec>>>,
    published: OrdMap<ServiceName, ServiceSpec>,
    drained: BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
}

impl SaveJob {
    pub(super) fn run(self) {
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
            let lkg = LastKnownGoodRef {
                version: 1,
                sources: names
                    .iter()
                    .zip(&sources)
                    .filter_map(|(n, s)| Some((n.as_str(), Specs(s.as_ref()?))))
                    .collect(),
                published: Specs(&published),
                drained: &drained,
            };
            let written = state::write_atomic_with(&path, |w| {
                serde_json::to_writer(w, &lkg).map_err(std::io::Error::other)
            });
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

pub(super) fn last_save() -> Duration {
    Duration::from_nanos(LAST_SAVE_NANOS.load(std::sync::atomic::Ordering::Relaxed))
}
