//! What the registry tells the admin socket and the status page, and its event log.

use super::*;

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
pub(super) const EVENTS_KEPT: usize = 100;

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

impl Registry {
    pub(super) fn event(&mut self, at: u64, message: String) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event { at, message });
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
                .zip(&self.source_states)
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
}
