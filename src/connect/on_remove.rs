//! `on_remove = "reset"`: when a backend leaves a service's candidates (removed from its source,
//! drained, failing its health checks, ejected), this host's established TCP connections to it
//! are reset (sock_diag `SOCK_DESTROY`, `CAP_NET_ADMIN`), so that clients holding pooled
//! connections (database pools, HTTP keep-alive, gRPC channels) reconnect, and so reach a
//! backend that is still in. A backend that some other service still has as a candidate is left
//! alone. The routing table is looked at every [`TICK`].

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::connect::table::RoutingTable;
use crate::discovery::snapshot::Snapshot;
use crate::service::ServiceName;

pub const TICK: Duration = Duration::from_millis(100);

/// Every candidate address of `service` (its default ports and every mapped port, both families).
fn candidates(
    table: &RoutingTable,
    service: &crate::discovery::snapshot::Service,
) -> HashSet<SocketAddr> {
    let magic = IpAddr::V4(service.magic_v4);
    std::iter::once(0)
        .chain(service.spec.client_ports.keys().copied())
        .flat_map(|port| table.candidates(SocketAddr::new(magic, port), true))
        .collect()
}

/// (candidates of the services that reset, candidates of all services)
fn look(
    table: &RoutingTable,
    snapshot: &Snapshot,
) -> (
    HashMap<ServiceName, HashSet<SocketAddr>>,
    HashSet<SocketAddr>,
) {
    let mut resetting = HashMap::new();
    let mut all = HashSet::new();
    for service in snapshot.services() {
        let c = candidates(table, service);
        all.extend(c.iter().copied());
        if service.spec.reset_on_remove {
            resetting.insert(service.name().clone(), c);
        }
    }
    (resetting, all)
}

/// Watches the table until `shutdown`, resetting connections to backends that left.
pub async fn run(table: Arc<RoutingTable>, shutdown: CancellationToken) {
    let mut seen_writes = None;
    let mut before: HashMap<ServiceName, HashSet<SocketAddr>> = HashMap::new();
    loop {
        let writes = table.writes();
        if seen_writes != Some(writes)
            && let Some(snapshot) = table.last_snapshot()
        {
            seen_writes = Some(writes);
            if before.is_empty() && !snapshot.services().any(|s| s.spec.reset_on_remove) {
                continue;
            }
            let (now, all) = look(&table, &snapshot);
            let gone: Vec<(ServiceName, SocketAddr)> = before
                .iter()
                .flat_map(|(name, was)| {
                    let still = now.get(name);
                    was.iter()
                        .filter(move |a| !still.is_some_and(|s| s.contains(a)))
                        .map(move |a| (name.clone(), *a))
                })
                .filter(|(_, a)| !all.contains(a))
                .collect();
            before = now;
            for (service, backend) in gone {
                match tokio::task::spawn_blocking(move || {
                    crate::connect::conn_count::reset_connections_to(backend)
                })
                .await
                {
                    Ok(Ok(n)) => {
                        info!(%service, %backend, reset = n, "backend left the service: its connections from this host were reset")
                    }
                    Ok(Err(error)) => {
                        warn!(%service, %backend, %error, "cannot reset the connections to a backend that left (on_remove = \"reset\" needs CAP_NET_ADMIN)")
                    }
                    Err(_) => {}
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
    }
}
