//! The guard against false deconfiguration. A registry, a network partition or a bad deploy can
//! say "no backends"; believing it takes a service down. So, per service:
//! - additions apply at once;
//! - an update that would leave a service that has backends with none is never applied;
//! - removals are judged over a window, not one update at a time: when the backends removed
//!   within the last `hold_down` exceed `max_drop` of every backend the service had in that
//!   window, the removal is held for `hold_down` (every backend removed in the window serves
//!   again, beside any new ones), then applied if the sources still say so. A registry whose
//!   instances expire one by one (ZooKeeper ephemeral nodes) drops sharply in small steps;
//! - a service that vanishes from every source is a 100% removal: held, then removed.
//!
//! Pure: the caller passes the clock in and publishes what comes out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::service::{ServiceName, ServiceSpec};

/// `[guard]`: protection against false deconfiguration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// An update removing more than this share of a service's backends at once is held.
    pub max_drop: f64,
    /// How long a held removal waits before it applies (if the source still says so).
    pub hold_down: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            max_drop: 0.5,
            hold_down: Duration::from_secs(60),
        }
    }
}

/// Why an update is being held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// The update would leave the service with no backends: never applied.
    WouldEmpty,
    /// The update removes `removed` of `of` backends at once: applied after the hold-down.
    SharpDrop { removed: usize, of: usize },
    /// The service is gone from every source: removed after the hold-down.
    Vanished,
}

/// A held update, for logs and the status command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub service: ServiceName,
    pub reason: HoldReason,
    pub since: Instant,
    /// Backends kept although the sources no longer list them.
    pub kept: Vec<SocketAddr>,
}

#[derive(Debug)]
pub struct Guard {
    cfg: GuardConfig,
    held: BTreeMap<ServiceName, Held>,
    windows: BTreeMap<ServiceName, Window>,
}

/// Every backend a service had published since `since`: the base that removals are measured
/// against. It shares the published list until that list gains a backend.
#[derive(Debug)]
struct Window {
    since: Instant,
    backends: crate::service::Backends,
}

/// What the guard decided for one service.
#[derive(Debug, Default)]
pub struct Step {
    /// What to publish; `None` removes the service.
    pub publish: Option<ServiceSpec>,
    /// A hold that started now (to log once).
    pub new_hold: Option<Held>,
    /// A hold ended by applying its update after the hold-down.
    pub matured: bool,
}

/// What the guard decided for one round.
#[derive(Debug, Default)]
pub struct Decision {
    /// What to publish.
    pub services: BTreeMap<ServiceName, ServiceSpec>,
    /// Holds that started this round (to log once).
    pub new_holds: Vec<Held>,
    /// Holds that ended this round because their update was applied after the hold-down.
    pub matured: Vec<ServiceName>,
    /// When the earliest running hold matures: call `apply` again then.
    pub wake_at: Option<Instant>,
}

impl Guard {
    pub fn new(cfg: GuardConfig) -> Self {
        Self {
            cfg,
            held: BTreeMap::new(),
            windows: BTreeMap::new(),
        }
    }

    /// A reload may change the thresholds; running holds keep their start time.
    pub fn set_config(&mut self, cfg: GuardConfig) {
        self.cfg = cfg;
    }

    pub fn held(&self) -> impl Iterator<Item = &Held> {
        self.held.values()
    }

    /// Decides what to publish given what is published now and what the sources propose, for
    /// every service at once (a full refresh, and the tests' view).
    pub fn apply(
        &mut self,
        published: &BTreeMap<ServiceName, ServiceSpec>,
        mut proposed: BTreeMap<ServiceName, ServiceSpec>,
        now: Instant,
    ) -> Decision {
        let mut d = Decision::default();
        self.held.retain(|n, _| published.contains_key(n));
        self.windows.retain(|n, _| published.contains_key(n));
        let names: Vec<ServiceName> = published
            .keys()
            .chain(proposed.keys())
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for name in names {
            let next = proposed.remove(&name);
            let step = self.step(&name, published.get(&name), next, now);
            d.new_holds.extend(step.new_hold);
            if step.matured {
                d.matured.push(name.clone());
            }
            if let Some(spec) = step.publish {
                d.services.insert(name, spec);
            }
        }
        d.wake_at = self.next_wake();
        d
    }

    /// Decides what to publish for one service: `current` is what is published, `next` what the
    /// sources say now (`None`: no source names it).
    pub fn step(
        &mut self,
        name: &ServiceName,
        current: Option<&ServiceSpec>,
        next: Option<ServiceSpec>,
        now: Instant,
    ) -> Step {
        let Some(current) = current else {
            // New to the published set: apply at once.
            self.held.remove(name);
            self.windows.remove(name);
            return Step {
                publish: next,
                ..Step::default()
            };
        };
        let max_drop = self.cfg.max_drop;
        let window = self.window(name, current, now);
        let (reason, kept) = match &next {
            None if current.backends.is_empty() => (None, Vec::new()),
            None => (Some(HoldReason::Vanished), current.backends.to_vec()),
            Some(_) if current.backends.is_empty() => (None, Vec::new()),
            Some(next) if next.backends.is_empty() => {
                (Some(HoldReason::WouldEmpty), current.backends.to_vec())
            }
            Some(next) => {
                let removed: Vec<crate::service::Backend> = window
                    .backends
                    .iter()
                    .filter(|b| !next.backends.iter().any(|n| n.addr == b.addr))
                    .cloned()
                    .collect();
                let share = removed.len() as f64 / window.backends.len().max(1) as f64;
                if share > max_drop {
                    (
                        Some(HoldReason::SharpDrop {
                            removed: removed.len(),
                            of: window.backends.len(),
                        }),
                        removed,
                    )
                } else {
                    (None, Vec::new())
                }
            }
        };
        let Some(reason) = reason else {
            self.held.remove(name);
            if next.is_none() {
                self.windows.remove(name);
            }
            return Step {
                publish: next,
                ..Step::default()
            };
        };
        let kept_addrs: Vec<SocketAddr> = kept.iter().map(|b| b.addr).collect();
        let mut step = Step::default();
        // A hold keeps its start while the sources keep proposing a drop, so a flapping
        // source cannot postpone it forever, and a recovered source ends it at once.
        let since = match self.held.remove(name) {
            Some(h) if same_kind(&h.reason, &reason) => h.since,
            _ => {
                step.new_hold = Some(Held {
                    service: name.clone(),
                    reason: reason.clone(),
                    since: now,
                    kept: kept_addrs.clone(),
                });
                now
            }
        };
        let matures = since.checked_add(self.cfg.hold_down).unwrap_or(since);
        if reason != HoldReason::WouldEmpty && now >= matures {
            // The applied set starts a new window: the next drop is measured from here.
            self.windows.remove(name);
            step.matured = true;
            step.publish = next;
            return step;
        }
        step.publish = Some(kept_spec(current, next, &kept));
        self.held.insert(
            name.clone(),
            Held {
                service: name.clone(),
                reason,
                since,
                kept: kept_addrs,
            },
        );
        step
    }

    /// When the earliest running hold matures.
    pub fn next_wake(&self) -> Option<Instant> {
        self.held
            .values()
            .filter(|h| h.reason != HoldReason::WouldEmpty)
            .map(|h| h.since.checked_add(self.cfg.hold_down).unwrap_or(h.since))
            .min()
    }

    /// Services whose hold has run its course by `now`.
    pub fn due(&self, now: Instant) -> Vec<ServiceName> {
        self.held
            .values()
            .filter(|h| {
                h.reason != HoldReason::WouldEmpty
                    && now >= h.since.checked_add(self.cfg.hold_down).unwrap_or(h.since)
            })
            .map(|h| h.service.clone())
            .collect()
    }

    pub fn hold_down(&self) -> Duration {
        self.cfg.hold_down
    }

    /// The service's window, started afresh once `hold_down` has passed with nothing held, and
    /// grown by every backend published meanwhile (so a rolling replacement counts its new
    /// backends too).
    fn window(&mut self, name: &ServiceName, current: &ServiceSpec, now: Instant) -> &Window {
        let hold_down = self.cfg.hold_down;
        let held = self.held.contains_key(name);
        let w = self.windows.entry(name.clone()).or_insert_with(|| Window {
            since: now,
            backends: current.backends.clone(),
        });
        if !held && now.saturating_duration_since(w.since) >= hold_down {
            *w = Window {
                since: now,
                backends: current.backends.clone(),
            };
        }
        for b in &current.backends {
            if !w.backends.iter().any(|o| o.addr == b.addr) {
                w.backends.push(b.clone());
            }
        }
        w
    }
}

fn same_kind(a: &HoldReason, b: &HoldReason) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// The proposed spec (or the current one if the service vanished) plus the kept backends.
fn kept_spec(
    current: &ServiceSpec,
    next: Option<ServiceSpec>,
    kept: &[crate::service::Backend],
) -> ServiceSpec {
    let Some(mut spec) = next else {
        return current.clone();
    };
    for b in kept {
        if !spec.backends.iter().any(|n| n.addr == b.addr) {
            spec.backends.push(b.clone());
        }
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Backend;

    const HOLD: Duration = Duration::from_secs(60);

    fn spec(name: &str, n: u8) -> ServiceSpec {
        spec_from(name, 1..=n)
    }

    fn spec_from(name: &str, range: impl Iterator<Item = u8>) -> ServiceSpec {
        let mut s = ServiceSpec::new(name.parse().unwrap());
        s.backends = range
            .map(|i| Backend::new(SocketAddr::from(([127, 0, 1, i], 80))))
            .collect();
        s
    }

    fn map(specs: impl IntoIterator<Item = ServiceSpec>) -> BTreeMap<ServiceName, ServiceSpec> {
        specs.into_iter().map(|s| (s.name.clone(), s)).collect()
    }

    fn count(d: &Decision, name: &str) -> Option<usize> {
        d.services.get(name).map(|s| s.backends.len())
    }

    fn guard() -> Guard {
        Guard::new(GuardConfig {
            max_drop: 0.5,
            hold_down: HOLD,
        })
    }

    #[test]
    fn additions_and_small_removals_apply_at_once() {
        let mut g = guard();
        let t = Instant::now();
        let published = map([spec("web", 4)]);
        let d = g.apply(&published, map([spec("web", 6), spec("api", 1)]), t);
        assert_eq!((count(&d, "web"), count(&d, "api")), (Some(6), Some(1)));
        let d = g.apply(&map([spec("web", 4)]), map([spec("web", 2)]), t);
        assert_eq!(count(&d, "web"), Some(2), "50% is not more than max_drop");
        assert!(d.new_holds.is_empty() && d.wake_at.is_none());
    }

    #[test]
    fn a_sharp_drop_is_held_for_the_hold_down_then_applied() {
        let mut g = guard();
        let t = Instant::now();
        let published = map([spec("web", 10)]);
        let d = g.apply(&published, map([spec("web", 1)]), t);
        assert_eq!(count(&d, "web"), Some(10), "90% drop held");
        assert_eq!(
            d.new_holds[0].reason,
            HoldReason::SharpDrop { removed: 9, of: 10 }
        );
        assert_eq!(d.wake_at, Some(t + HOLD));
        let d = g.apply(&d.services, map([spec("web", 1)]), t + HOLD / 2);
        assert_eq!(count(&d, "web"), Some(10));
        assert!(d.new_holds.is_empty(), "logged once");
        let d = g.apply(&d.services, map([spec("web", 1)]), t + HOLD);
        assert_eq!(count(&d, "web"), Some(1));
        assert_eq!(d.matured, ["web".parse::<ServiceName>().unwrap()]);
        assert_eq!(g.held().count(), 0);
    }

    #[test]
    fn during_a_hold_new_backends_serve_beside_the_kept_ones() {
        let mut g = guard();
        let t = Instant::now();
        let d = g.apply(&map([spec("web", 4)]), map([spec_from("web", 10..=11)]), t);
        let addrs: Vec<u8> = d.services["web"]
            .backends
            .iter()
            .map(|b| match b.addr.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect();
        assert_eq!(addrs, [10, 11, 1, 2, 3, 4]);
    }

    #[test]
    fn a_sharp_drop_made_in_small_steps_is_held_and_restores_every_removed_backend() {
        let mut g = guard();
        let t = Instant::now();
        let mut published = map([spec("web", 10)]);
        // Ten instances expire one by one, a second apart: each step alone removes little.
        for (step, left) in (1..=9u8).rev().enumerate() {
            let d = g.apply(
                &published,
                map([spec("web", left)]),
                t + Duration::from_secs(step as u64),
            );
            published = d.services;
        }
        assert_eq!(
            published["web"].backends.len(),
            10,
            "once past max_drop of the window, all ten serve again"
        );
        assert!(matches!(
            g.held().next().unwrap().reason,
            HoldReason::SharpDrop { removed: 9, of: 10 }
        ));
        // The hold runs its course; then the drop applies.
        let d = g.apply(
            &published,
            map([spec("web", 1)]),
            t + Duration::from_secs(8) + HOLD,
        );
        assert_eq!(d.services["web"].backends.len(), 1);
    }

    #[test]
    fn a_slow_drain_over_several_windows_applies() {
        let mut g = guard();
        let t = Instant::now();
        let mut published = map([spec("web", 10)]);
        for (step, left) in (1..=9u8).rev().enumerate() {
            // One removal per hold-down: never more than max_drop within a window.
            let d = g.apply(
                &published,
                map([spec("web", left)]),
                t + HOLD * (step as u32 + 1),
            );
            published = d.services;
        }
        assert_eq!(published["web"].backends.len(), 1);
        assert_eq!(g.held().count(), 0);
    }

    #[test]
    fn a_rolling_replacement_within_a_window_is_not_a_drop() {
        let mut g = guard();
        let t = Instant::now();
        let old = map([spec_from("web", 1..=4)]);
        let both = g.apply(&old, map([spec_from("web", 1..=8)]), t).services;
        let d = g.apply(
            &both,
            map([spec_from("web", 5..=8)]),
            t + Duration::from_secs(1),
        );
        assert_eq!(
            d.services["web"].backends.len(),
            4,
            "4 of 8 seen in the window is not more than half"
        );
        assert!(d.new_holds.is_empty());
    }

    #[test]
    fn a_drop_to_zero_is_never_applied() {
        let mut g = guard();
        let t = Instant::now();
        let mut published = map([spec("web", 3)]);
        for hours in [0, 1, 24, 24 * 30] {
            let d = g.apply(
                &published,
                map([spec("web", 0)]),
                t + Duration::from_secs(3600 * hours),
            );
            assert_eq!(count(&d, "web"), Some(3), "after {hours} h");
            assert_eq!(d.wake_at, None);
            published = d.services;
        }
        assert_eq!(g.held().next().unwrap().reason, HoldReason::WouldEmpty);
    }

    #[test]
    fn a_recovered_source_ends_the_hold_and_a_new_drop_starts_a_new_one() {
        let mut g = guard();
        let t = Instant::now();
        let published = map([spec("web", 10)]);
        g.apply(&published, map([spec("web", 1)]), t);
        let d = g.apply(&published, map([spec("web", 10)]), t + HOLD / 2);
        assert_eq!(count(&d, "web"), Some(10));
        assert_eq!(g.held().count(), 0);
        let d = g.apply(&published, map([spec("web", 1)]), t + HOLD);
        assert_eq!(count(&d, "web"), Some(10), "the clock restarted");
        assert_eq!(d.wake_at, Some(t + HOLD + HOLD));
    }

    #[test]
    fn a_vanished_service_is_held_then_removed_and_an_empty_one_goes_at_once() {
        let mut g = guard();
        let t = Instant::now();
        let published = map([spec("web", 2), spec("idle", 0)]);
        let d = g.apply(&published, BTreeMap::new(), t);
        assert_eq!((count(&d, "web"), count(&d, "idle")), (Some(2), None));
        assert_eq!(d.new_holds[0].reason, HoldReason::Vanished);
        let d = g.apply(&d.services, BTreeMap::new(), t + HOLD);
        assert_eq!(count(&d, "web"), None);
    }
}
