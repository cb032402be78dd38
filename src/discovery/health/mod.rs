//! Active health checks: one probe task per backend of every service that asks for checks, each
//! starting at a random point of its interval and waiting `interval + random(jitter)` between
//! probes, so that many hosts checking one backend do not probe in step. A probe reports only
//! changes of state (after `rise` passes or `fall` failures in a row), as [`Change`]s; the daemon
//! hands them to the registry, which leaves unhealthy backends out of the snapshot (see
//! `registry/overlay.rs` for panic mode and tiers).
//! The probe and the rise/fall counting are in `check.rs`, shared with registrations; `[health]`
//! and the check tables are read in `config.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::service::ServiceName;

mod check;
pub mod config;

pub use crate::service::{CheckKind, HealthCheck};
pub use check::{CheckError, Streak, check};

/// A backend's checks changed its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub service: ServiceName,
    pub addr: SocketAddr,
    pub healthy: bool,
    /// Why: the last check's error, or "checks pass".
    pub reason: String,
}

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
    changes: mpsc::Sender<Change>,
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
                    changes.clone(),
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
    changes: mpsc::Sender<Change>,
    stop: CancellationToken,
) {
    let first = random_up_to(hc.interval);
    if sleep_or_stop(first, &stop).await {
        return;
    }
    let mut health = if healthy {
        Streak::starting_healthy(hc.rise, hc.fall)
    } else {
        Streak::new(hc.rise, hc.fall)
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
            if changes
                .send(Change {
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
