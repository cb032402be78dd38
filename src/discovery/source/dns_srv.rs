//! The DNS SRV source: each configured service follows one SRV name upstream (for example
//! `_http._tcp.web.prod.example.com`). Each service polls on its own, honouring the SRV TTL
//! clamped to [min_ttl, max_ttl], resolves targets to addresses (from the additional section,
//! else with A/AAAA lookups), and reports the service alone. A failed lookup reports nothing
//! new: the service keeps its last good backends.

pub mod config;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::config::DnsSrvSource;
use super::SourceEvent;
use crate::service::{Backend, ServiceName, ServiceSpec};
use crate::upstream::forward::{ForwardConfig, Forwarded, Forwarder};

/// Runs every service's poll loop until `shutdown`.
pub async fn run(
    cfg: DnsSrvSource,
    index: usize,
    tx: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) {
    // No cache: the TTL decides when to ask again, and every poll must see the upstream's truth.
    let fwd = Arc::new(Forwarder::new(ForwardConfig {
        default_upstreams: cfg.resolvers.clone(),
        cache_size: 0,
        ..ForwardConfig::default()
    }));
    let mut tasks = JoinSet::new();
    for (service, srv) in &cfg.services {
        tasks.spawn(poll(
            service.clone(),
            srv.clone(),
            cfg.clone(),
            fwd.clone(),
            index,
            tx.clone(),
            shutdown.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

async fn poll(
    service: ServiceName,
    srv: Name,
    cfg: DnsSrvSource,
    fwd: Arc<Forwarder>,
    index: usize,
    tx: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) {
    let mut retry = cfg.min_ttl;
    loop {
        let wait = match lookup(&fwd, &service, &srv).await {
            Ok((spec, ttl)) => {
                retry = cfg.min_ttl;
                if tx
                    .send(SourceEvent::Update {
                        source: index,
                        service: spec,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                Duration::from_secs(u64::from(ttl)).clamp(cfg.min_ttl, cfg.max_ttl)
            }
            Err(error) => {
                warn!(%service, srv = %srv, %error, "SRV lookup failed; the service keeps its last good backends");
                let _ = tx
                    .send(SourceEvent::Failed {
                        source: index,
                        error: format!("{service}: {error}"),
                    })
                    .await;
                // Back off up to max_ttl so a dead upstream is not hammered.
                let wait = retry;
                retry = (retry * 2).min(cfg.max_ttl);
                wait
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Looks up `srv` and its targets: the service's backends and the TTL to poll again after.
async fn lookup(
    fwd: &Forwarder,
    service: &ServiceName,
    srv: &Name,
) -> Result<(ServiceSpec, u32), String> {
    let answer = fwd
        .resolve(&Query::query(srv.clone(), RecordType::SRV))
        .await
        .map_err(|e| e.to_string())?;
    if answer.response_code != ResponseCode::NoError
        && answer.response_code != ResponseCode::NXDomain
    {
        return Err(format!("upstream answered {}", answer.response_code));
    }
    let mut targets = srv_targets(&answer);
    let mut ttl = targets.iter().map(|t| t.ttl).min().unwrap_or(0);
    for t in &mut targets {
        if t.addrs.is_empty() {
            for rtype in [RecordType::A, RecordType::AAAA] {
                match fwd.resolve(&Query::query(t.name.clone(), rtype)).await {
                    Ok(a) => {
                        ttl = ttl.min(a.answers.iter().map(|r| r.ttl).min().unwrap_or(ttl));
                        t.addrs.extend(addresses(&a.answers, &t.name));
                    }
                    Err(e) => debug!(target = %t.name, %e, "target lookup failed"),
                }
            }
        }
    }
    let mut spec = ServiceSpec::new(service.clone());
    for t in targets {
        for ip in t.addrs {
            let addr = SocketAddr::new(ip, t.port);
            if spec.backends.iter().any(|b| b.addr == addr) {
                continue;
            }
            let mut b = Backend::new(addr);
            // SRV weight 0 means "rarely, when nothing else is there"; keep it in the set at the least weight.
            b.weight = t.weight.max(1);
            b.priority = t.priority;
            spec.backends.push(b);
        }
    }
    Ok((spec, ttl))
}

#[derive(Debug, PartialEq)]
struct Target {
    name: Name,
    port: u16,
    weight: u16,
    priority: u16,
    ttl: u32,
    addrs: Vec<IpAddr>,
}

/// The SRV records of an answer with their addresses from the additional section.
fn srv_targets(answer: &Forwarded) -> Vec<Target> {
    answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            // RFC 2782: a target of "." means the service is decidedly not available here.
            RData::SRV(srv) if !srv.target.is_root() => Some(Target {
                name: srv.target.clone(),
                port: srv.port,
                weight: srv.weight,
                priority: srv.priority,
                ttl: r.ttl,
                addrs: addresses(&answer.additionals, &srv.target),
            }),
            _ => None,
        })
        .collect()
}

fn addresses(records: &[Record], name: &Name) -> Vec<IpAddr> {
    records
        .iter()
        .filter(|r| r.name == *name)
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::forward::Origin;
    use hickory_proto::rr::rdata::{A, SRV};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn srv_records_pair_with_their_glue_and_dot_targets_are_skipped() {
        let srv = |prio, weight, port, target: &str| {
            Record::from_rdata(
                name("_http._tcp.web.example."),
                30,
                RData::SRV(SRV::new(prio, weight, port, name(target))),
            )
        };
        let answer = Forwarded {
            response_code: ResponseCode::NoError,
            answers: vec![
                srv(0, 5, 8080, "a.example."),
                srv(1, 0, 8081, "b.example."),
                srv(0, 0, 0, "."),
            ],
            authorities: vec![],
            additionals: vec![Record::from_rdata(
                name("A.example."),
                30,
                RData::A(A::new(10, 0, 0, 1)),
            )],
            from: Origin::Upstream,
        };
        let t = srv_targets(&answer);
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].port, t[0].weight, t[0].addrs.clone()),
            (8080, 5, vec!["10.0.0.1".parse::<IpAddr>().unwrap()])
        );
        assert!(t[1].addrs.is_empty(), "no glue: looked up separately");
        assert_eq!(t[1].priority, 1);
    }
}
