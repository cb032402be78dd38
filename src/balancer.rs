//! Choosing a backend for one connect: per-service balancing state (round robin, smooth weighted
//! round robin, weighted random, power of two choices on outstanding connects) plus a short
//! hold on backends the hook reported as refusing. Pure: no I/O, the clock and the RNG are passed
//! in. The hook server owns one [`Balancer`] and feeds it the current snapshot's specs.
//!
//! Eligibility, in order: backends the caller's socket family can reach (a v6 backend needs an
//! AF_INET6 socket); of those, the ones not held after a reported failure (unless that would
//! leave none: a hold never empties a non-empty set); of those, the best (lowest) priority.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::service::{LbPolicy, ServiceName, ServiceSpec};

/// How long a backend reported as refusing is skipped by picks for its service.
pub const DEFAULT_FAIL_HOLD: Duration = Duration::from_secs(2);

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

/// Balancing state for every service, keyed by name. Survives snapshot swaps: state is kept per
/// backend address, so a backend that stays keeps its counters.
#[derive(Debug)]
pub struct Balancer {
    services: HashMap<ServiceName, ServiceState>,
    fail_hold: Duration,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(DEFAULT_FAIL_HOLD)
    }
}

#[derive(Debug, Default)]
struct ServiceState {
    /// The backend list this state was built for: (default address, weight, priority).
    shape: Vec<(SocketAddr, u16, u16)>,
    rr_next: usize,
    /// Smooth weighted round robin: current weight per backend.
    current: Vec<i64>,
    /// Picks not yet reported done (p2c).
    outstanding: Vec<u32>,
    held_until: Vec<Option<Instant>>,
}

impl ServiceState {
    /// Rebuilds the per-backend vectors when the backend list changed, keeping the counters of
    /// backends that are still there.
    fn sync(&mut self, spec: &ServiceSpec) {
        let same = self.shape.len() == spec.backends.len()
            && self
                .shape
                .iter()
                .zip(&spec.backends)
                .all(|(s, b)| *s == (b.addr, b.weight, b.priority));
        if same {
            return;
        }
        let old: HashMap<SocketAddr, (i64, u32, Option<Instant>)> = self
            .shape
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let cur = self.current.get(i).copied().unwrap_or(0);
                let out = self.outstanding.get(i).copied().unwrap_or(0);
                let held = self.held_until.get(i).copied().flatten();
                (s.0, (cur, out, held))
            })
            .collect();
        self.shape = spec
            .backends
            .iter()
            .map(|b| (b.addr, b.weight, b.priority))
            .collect();
        let kept: Vec<(i64, u32, Option<Instant>)> = self
            .shape
            .iter()
            .map(|s| old.get(&s.0).copied().unwrap_or((0, 0, None)))
            .collect();
        self.current = kept.iter().map(|k| k.0).collect();
        self.outstanding = kept.iter().map(|k| k.1).collect();
        self.held_until = kept.iter().map(|k| k.2).collect();
    }

    fn index_of(&self, backend: SocketAddr) -> Option<usize> {
        self.shape.iter().position(|s| s.0 == backend)
    }
}

impl Balancer {
    pub fn new(fail_hold: Duration) -> Self {
        Self {
            services: HashMap::new(),
            fail_hold,
        }
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
        let state = self.services.entry(spec.name.clone()).or_default();
        state.sync(spec);
        let candidates = eligible(spec, state, v6_ok, now);
        if candidates.is_empty() {
            return None;
        }
        let weights: Vec<u64> = {
            let raw: Vec<u64> = candidates
                .iter()
                .map(|&i| spec.backends.get(i).map_or(0, |b| u64::from(b.weight)))
                .collect();
            // All-zero weights mean "no preference", not "never".
            if raw.iter().all(|&w| w == 0) {
                vec![1; raw.len()]
            } else {
                raw
            }
        };
        let chosen = match spec.lb {
            LbPolicy::RoundRobin => {
                let i = state.rr_next % candidates.len();
                state.rr_next = state.rr_next.wrapping_add(1);
                candidates.get(i).copied()
            }
            LbPolicy::WeightedRoundRobin => smooth_weighted(state, &candidates, &weights),
            LbPolicy::Random => weighted_random(&candidates, &weights, rng),
            LbPolicy::P2c => {
                let i = p2c(state, &candidates, &weights, rng);
                if let Some(out) = i.and_then(|i| state.outstanding.get_mut(i)) {
                    *out = out.saturating_add(1);
                }
                i
            }
        }?;
        let backend = spec.backends.get(chosen)?;
        let port = backend.port_for(spec.port_name_for(client_port));
        Some(Pick {
            index: chosen,
            addr: SocketAddr::new(backend.addr.ip(), port),
            backend: backend.addr,
        })
    }

    /// Holds `backend` (its default address) of `service` out of picks for the fail hold.
    pub fn report_failure(&mut self, service: &ServiceName, backend: SocketAddr, now: Instant) {
        if let Some(state) = self.services.get_mut(service)
            && let Some(i) = state.index_of(backend)
            && let Some(h) = state.held_until.get_mut(i)
        {
            *h = Some(now + self.fail_hold);
        }
    }

    /// A connect picked for `backend` returned: one fewer outstanding (p2c).
    pub fn done(&mut self, service: &ServiceName, backend: SocketAddr) {
        if let Some(state) = self.services.get_mut(service)
            && let Some(i) = state.index_of(backend)
            && let Some(out) = state.outstanding.get_mut(i)
        {
            *out = out.saturating_sub(1);
        }
    }

    /// Outstanding picks for a backend (what p2c compares).
    pub fn outstanding(&self, service: &ServiceName, backend: SocketAddr) -> u32 {
        self.services
            .get(service)
            .and_then(|s| {
                s.index_of(backend)
                    .and_then(|i| s.outstanding.get(i).copied())
            })
            .unwrap_or(0)
    }

    /// Forgets services `keep` rejects (call after a snapshot swap so removed services do not
    /// accumulate).
    pub fn retain(&mut self, mut keep: impl FnMut(&ServiceName) -> bool) {
        self.services.retain(|name, _| keep(name));
    }
}

fn eligible(spec: &ServiceSpec, state: &ServiceState, v6_ok: bool, now: Instant) -> Vec<usize> {
    let reachable: Vec<usize> = spec
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| v6_ok || b.addr.is_ipv4())
        .map(|(i, _)| i)
        .collect();
    let not_held: Vec<usize> = reachable
        .iter()
        .copied()
        .filter(|&i| {
            state
                .held_until
                .get(i)
                .copied()
                .flatten()
                .is_none_or(|until| until <= now)
        })
        .collect();
    let pool = if not_held.is_empty() {
        reachable
    } else {
        not_held
    };
    let Some(best) = pool
        .iter()
        .filter_map(|&i| spec.backends.get(i).map(|b| b.priority))
        .min()
    else {
        return Vec::new();
    };
    pool.into_iter()
        .filter(|&i| spec.backends.get(i).is_some_and(|b| b.priority == best))
        .collect()
}

/// nginx's smooth weighted round robin: each candidate gains its weight, the largest wins and
/// pays back the total. Over any window of `sum(weights)` picks each gets exactly its weight.
fn smooth_weighted(
    state: &mut ServiceState,
    candidates: &[usize],
    weights: &[u64],
) -> Option<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut best: Option<(usize, i64)> = None;
    for (&i, &w) in candidates.iter().zip(weights) {
        let cur = state.current.get_mut(i)?;
        *cur += w as i64;
        if best.is_none_or(|(_, b)| *cur > b) {
            best = Some((i, *cur));
        }
    }
    let (i, _) = best?;
    if let Some(cur) = state.current.get_mut(i) {
        *cur -= total;
    }
    Some(i)
}

fn weighted_random<R: Rng + ?Sized>(
    candidates: &[usize],
    weights: &[u64],
    rng: &mut R,
) -> Option<usize> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    for (&i, &w) in candidates.iter().zip(weights) {
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    None
}

/// Two distinct weighted-random candidates; the one with fewer outstanding connects per unit
/// of weight wins.
fn p2c<R: Rng + ?Sized>(
    state: &ServiceState,
    candidates: &[usize],
    weights: &[u64],
    rng: &mut R,
) -> Option<usize> {
    let a = weighted_random(candidates, weights, rng)?;
    if candidates.len() == 1 {
        return Some(a);
    }
    let rest: Vec<(usize, u64)> = candidates
        .iter()
        .copied()
        .zip(weights.iter().copied())
        .filter(|&(i, _)| i != a)
        .collect();
    let (rest_c, rest_w): (Vec<usize>, Vec<u64>) = rest.into_iter().unzip();
    let b = weighted_random(&rest_c, &rest_w, rng).or_else(|| rest_c.first().copied())?;
    let load = |i: usize| {
        let pos = candidates.iter().position(|&c| c == i).unwrap_or(0);
        let w = weights.get(pos).copied().unwrap_or(1).max(1);
        // Compare out_a/w_a with out_b/w_b without division.
        (u64::from(state.outstanding.get(i).copied().unwrap_or(0)), w)
    };
    let ((oa, wa), (ob, wb)) = (load(a), load(b));
    Some(if oa * wb <= ob * wa { a } else { b })
}

#[cfg(test)]
mod tests;
