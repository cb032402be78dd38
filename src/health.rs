//! Active health checks: one probe task per backend of every service that asks for checks, each
//! starting at a random point of its interval and waiting `interval + random(jitter)` between
//! probes, so that many hosts checking one backend do not probe in step. A probe reports only
//! changes of state (after `rise` passes or `fall` failures in a row) to the registry, which
//! leaves unhealthy backends out of the snapshot (see `registry.rs` for panic mode and tiers).
//! The probes themselves are `register::check`, shared with registrations.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::config::HealthCheck;
use crate::register::{Health, check};
use crate::registry::Command;
use crate::service::ServiceName;

/// What to probe, per service: each checked backend, its check, and whether the registry holds it
/// healthy now (a restarted probe starts from there). Persistent, so the registry updates one
/// service without copying the rest.
pub type Targets = imbl::OrdMap<ServiceName, Vec<(SocketAddr, HealthCheck, bool)>>;
pub type SharedTargets = Arc<ArcSwap<Targets>>;

/// How often the set of probes is matched against the targets.
const RESYNC: Duration = Duration::from_millis(200);

/// Runs probes for the current targets until `shutdown`.
pub async fn run(
    targets: SharedTargets,
    registry: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let mut running: HashMap<(ServiceName, SocketAddr), (HealthCheck, CancellationToken)> =
        HashMap::new();
    let mut tick = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let want = targets.load();
        running.retain(|(service, addr), (check, token)| {
            let keep = want
                .get(service)
                .is_some_and(|list| list.iter().any(|(a, c, _)| a == addr && c == check));
            if !keep {
                token.cancel();
            }
            keep
        });
        for (service, list) in want.iter() {
            for (addr, check, healthy) in list {
                let key = (service.clone(), *addr);
                if running.contains_key(&key) {
                    continue;
                }
                let token = shutdown.child_token();
                tracker.spawn(probe(
                    service.clone(),
                    *addr,
                    check.clone(),
                    *healthy,
                    registry.clone(),
                    token.clone(),
                ));
                running.insert(key, (check.clone(), token));
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

async fn probe(
    service: ServiceName,
    addr: SocketAddr,
    hc: HealthCheck,
    healthy: bool,
    registry: mpsc::Sender<Command>,
    stop: CancellationToken,
) {
    let first = random_up_to(hc.interval);
    if sleep_or_stop(first, &stop).await {
        return;
    }
    let mut health = if healthy {
        Health::starting_healthy(hc.rise, hc.fall)
    } else {
        Health::new(hc.rise, hc.fall)
    };
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = check(&hc.kind, addr, hc.timeout) => r,
        };
        if let Err(e) = &result {
            debug!(%service, %addr, error = %e, "health check failed");
        }
        if let Some(now) = health.observe(result.is_ok()) {
            let reason = result
                .err()
                .map_or_else(|| "checks pass".to_string(), |e| e.to_string());
            if registry
                .send(Command::Health {
                    service: service.clone(),
                    addr,
                    healthy: now,
                    reason,
                })
                .await
                .is_err()
            {
                return;
            }
        }
        if sleep_or_stop(hc.interval + random_up_to(hc.jitter), &stop).await {
            return;
        }
    }
}

fn random_up_to(d: Duration) -> Duration {
    if d.is_zero() {
        d
    } else {
        d.mul_f64(rand::rng().random::<f64>())
    }
}

/// True when stopped.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// What a service offers given its backends' health, for the snapshot (and so for SRV answers and
/// connect picks alike):
/// - unhealthy backends leave;
/// - while the best priority tier keeps at least `panic_threshold` of its size healthy, it serves
///   alone (lower tiers stay as published backups);
/// - when it falls below, healthy backends of the next tiers join it at its priority until that
///   share is reached again, so the few survivors are not crushed and traffic returns to the
///   best tier as soon as it recovers;
/// - when even every tier together cannot reach the share, the service is in panic mode and
///   balances over all its backends, healthy or not: answers never go empty.
///
/// Returns the spec to publish and whether the service is in panic mode.
pub fn effective(
    spec: &crate::service::ServiceSpec,
    unhealthy: Option<&BTreeMap<SocketAddr, String>>,
    panic_threshold: f64,
) -> (crate::service::ServiceSpec, bool) {
    let Some(unhealthy) = unhealthy.filter(|u| !u.is_empty()) else {
        return (spec.clone(), false);
    };
    let Some(best) = spec.backends.iter().map(|b| b.priority).min() else {
        return (spec.clone(), false);
    };
    let best_size = spec.backends.iter().filter(|b| b.priority == best).count();
    let needed = (panic_threshold * best_size as f64).ceil() as usize;
    let mut tiers: Vec<u16> = spec.backends.iter().map(|b| b.priority).collect();
    tiers.sort_unstable();
    tiers.dedup();
    let healthy = |b: &&crate::service::Backend| !unhealthy.contains_key(&b.addr);

    let mut out = spec.clone();
    out.backends.clear();
    let mut active = 0;
    let mut joined = Vec::new();
    for tier in &tiers {
        if active >= needed.max(1) {
            break;
        }
        for b in spec
            .backends
            .iter()
            .filter(|b| b.priority == *tier)
            .filter(healthy)
        {
            let mut b = b.clone();
            b.priority = best;
            out.backends.push(b);
            active += 1;
        }
        joined.push(*tier);
    }
    if active == 0 || active < needed {
        return (spec.clone(), true);
    }
    // Tiers that did not have to join stay behind as backups, healthy members only.
    out.backends.extend(
        spec.backends
            .iter()
            .filter(|b| !joined.contains(&b.priority))
            .filter(healthy)
            .cloned(),
    );
    (out, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Backend, ServiceSpec};

    fn spec(tiers: &[(u16, u8)]) -> ServiceSpec {
        let mut s = ServiceSpec::new("web".parse().unwrap());
        let mut n = 1;
        for (prio, count) in tiers {
            for _ in 0..*count {
                let mut b = Backend::new(SocketAddr::from(([127, 0, 1, n], 80)));
                b.priority = *prio;
                s.backends.push(b);
                n += 1;
            }
        }
        s
    }

    fn down(last_octets: &[u8]) -> BTreeMap<SocketAddr, String> {
        last_octets
            .iter()
            .map(|n| {
                (
                    SocketAddr::from(([127, 0, 1, *n], 80)),
                    "refused".to_string(),
                )
            })
            .collect()
    }

    fn shape(s: &ServiceSpec) -> Vec<(u8, u16)> {
        s.backends
            .iter()
            .map(|b| match b.addr.ip() {
                std::net::IpAddr::V4(v4) => (v4.octets()[3], b.priority),
                std::net::IpAddr::V6(_) => (0, b.priority),
            })
            .collect()
    }

    #[test]
    fn unhealthy_backends_leave_while_enough_remain() {
        let (s, panic) = effective(&spec(&[(0, 4)]), Some(&down(&[2])), 0.5);
        assert_eq!(shape(&s), [(1, 0), (3, 0), (4, 0)]);
        assert!(!panic);
    }

    #[test]
    fn below_the_threshold_the_next_tier_joins_at_the_best_priority() {
        // 1 of 4 primaries healthy: the two backups join so that the survivor is not crushed.
        let (s, panic) = effective(&spec(&[(0, 4), (1, 2)]), Some(&down(&[1, 2, 3])), 0.5);
        assert_eq!(shape(&s), [(4, 0), (5, 0), (6, 0)]);
        assert!(!panic);
        // All primaries down: failover to the backup tier.
        let (s, _) = effective(&spec(&[(0, 2), (1, 2)]), Some(&down(&[1, 2])), 0.5);
        assert_eq!(shape(&s), [(3, 0), (4, 0)]);
    }

    #[test]
    fn healthy_primaries_keep_backups_behind() {
        let (s, _) = effective(&spec(&[(0, 2), (1, 2)]), Some(&down(&[4])), 0.5);
        assert_eq!(
            shape(&s),
            [(1, 0), (2, 0), (3, 1)],
            "the unhealthy backup leaves, the healthy one waits"
        );
    }

    #[test]
    fn panic_mode_balances_over_everything() {
        let all = spec(&[(0, 4)]);
        let (s, panic) = effective(&all, Some(&down(&[1, 2, 3])), 0.5);
        assert!(panic, "1 of 4 is below half and there is nowhere to spill");
        assert_eq!(s, all);
        let (s, panic) = effective(&all, Some(&down(&[1, 2, 3, 4])), 0.5);
        assert!(panic && s.backends.len() == 4, "never empty");
        let (_, panic) = effective(&all, Some(&down(&[1, 2, 3])), 0.0);
        assert!(!panic, "threshold 0 disables panic mode");
    }
}
