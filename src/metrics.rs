//! Prometheus metrics, in one process-wide registry (prometheus-client), exposed by `http.rs`.
//! Label values come from small fixed sets (record types, response codes, configured sources and
//! services), never from what clients send, so cardinality stays bounded.

use std::sync::LazyLock;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub qtype: &'static str,
    pub rcode: &'static str,
    /// `local` (service domains), `forwarded`, or `refused`/`error` before either.
    pub answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit`, `miss`, `stale`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub service: String,
    /// `picked`, `fallback`, `no_backend`, `unknown`, `failed_report`, ...
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefetchLabels {
    pub service: String,
    /// Connects: `handed_over`, `empty`, `other_netns`. Drops: `closed` (by the backend),
    /// `expired` (`max_idle`), `ineligible` (drained, unhealthy, ejected or removed).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub backend: String,
}

pub struct Metrics {
    registry: Registry,
    pub dns_queries: Family<DnsLabels, Counter>,
    pub dns_duration: Histogram,
    pub forward_cache: Family<CacheLabels, Counter>,
    pub forward_failures: Counter,
    pub hook_requests: Family<HookLabels, Counter>,
    pub hook_duration: Histogram,
    pub prefetch_connects: Family<PrefetchLabels, Counter>,
    pub prefetch_pooled: Family<ServiceLabels, Gauge>,
    pub prefetch_dropped: Family<PrefetchLabels, Counter>,
    pub caught_connects: Family<ServiceLabels, Counter>,
    pub backend_healthy: Family<BackendLabels, Gauge>,
    pub guard_held: Gauge,
    pub guard_holds: Counter,
    pub source_up: Family<SourceLabels, Gauge>,
    pub source_last_update: Family<SourceLabels, Gauge>,
    pub zookeeper_connected: Family<SourceLabels, Gauge>,
    pub publish_duration: Histogram,
    pub services: Gauge,
    pub generation: Gauge,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    /// Counts one hook request by service (bounded: services in the table, or "-") and result.
    pub fn count_hook_request(&self, service: &str, result: &'static str) {
        self.hook_requests
            .get_or_create(&HookLabels {
                service: service.to_string(),
                result,
            })
            .inc();
    }

    fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("discotech"),
            dns_queries: Family::default(),
            // 10 us to ~2.6 s.
            dns_duration: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            forward_cache: Family::default(),
            forward_failures: Counter::default(),
            hook_requests: Family::default(),
            hook_duration: Histogram::new(exponential_buckets(0.000_005, 4.0, 9)),
            prefetch_connects: Family::default(),
            prefetch_pooled: Family::default(),
            prefetch_dropped: Family::default(),
            caught_connects: Family::default(),
            backend_healthy: Family::default(),
            guard_held: Gauge::default(),
            guard_holds: Counter::default(),
            source_up: Family::default(),
            source_last_update: Family::default(),
            zookeeper_connected: Family::default(),
            publish_duration: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            services: Gauge::default(),
            generation: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "dns_queries",
            "DNS queries answered, by type, response code and how they were answered",
            m.dns_queries.clone(),
        );
        r.register("dns_query_duration_seconds", "Time to answer a DNS query (answers served from the UDP answer cache are sampled 1 in 64)", m.dns_duration.clone());
        r.register(
            "forward_cache",
            "Forwarded questions by cache outcome",
            m.forward_cache.clone(),
        );
        r.register(
            "forward_upstream_failures",
            "Forwarded questions that no upstream answered",
            m.forward_failures.clone(),
        );
        r.register(
            "hook_requests",
            "Hook traffic to the daemon by service and result: picks asked over the socket (hooks without the shared table), failure reports and what the daemon's own probe made of them",
            m.hook_requests.clone(),
        );
        r.register(
            "prefetch_connects",
            "Hooked connects to prefetch services that asked the daemon, by result: handed_over (an established connection was passed), empty (none was pooled: the hook connected by itself), other_netns (the caller is in another network namespace)",
            m.prefetch_connects.clone(),
        );
        r.register(
            "prefetch_pooled_connections",
            "Established connections the daemon holds ready to hand over, by service",
            m.prefetch_pooled.clone(),
        );
        r.register(
            "prefetch_dropped",
            "Pooled connections closed unused, by reason: closed (the backend closed it), expired (max_idle), ineligible (its backend left the pick set)",
            m.prefetch_dropped.clone(),
        );
        r.register(
            "caught_connects",
            "Connects to a service's magic address from programs that bypassed the hook, sent to a backend by the kernel (the catch path)",
            m.caught_connects.clone(),
        );
        r.register(
            "hook_request_duration_seconds",
            "Time the daemon took to answer a hook request",
            m.hook_duration.clone(),
        );
        r.register(
            "backend_healthy",
            "1 when a backend is in the pick set, 0 when out (unhealthy or ejected)",
            m.backend_healthy.clone(),
        );
        r.register(
            "guard_held_updates",
            "Updates the guard is holding now",
            m.guard_held.clone(),
        );
        r.register(
            "guard_holds",
            "Updates the guard has held",
            m.guard_holds.clone(),
        );
        r.register(
            "source_up",
            "1 when a source's last word was a good update, 0 when it is failing or has not spoken",
            m.source_up.clone(),
        );
        r.register(
            "source_last_update_timestamp_seconds",
            "Unix time of a source's last good update",
            m.source_last_update.clone(),
        );
        r.register(
            "zookeeper_connected",
            "1 while a ZooKeeper source has a live session",
            m.zookeeper_connected.clone(),
        );
        r.register(
            "publish_duration_seconds",
            "Time to merge, guard and publish one change",
            m.publish_duration.clone(),
        );
        r.register("services", "Services published", m.services.clone());
        r.register(
            "snapshot_generation",
            "Generation of the published snapshot",
            m.generation.clone(),
        );
        m
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn dns_counter(
        &self,
        qtype: RecordType,
        rcode: ResponseCode,
        answer: &'static str,
    ) -> Counter {
        self.dns_queries.get_or_create_owned(&DnsLabels {
            qtype: qtype_label(qtype),
            rcode: rcode_label(rcode),
            answer,
        })
    }
}

pub fn qtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::PTR => "PTR",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::TXT => "TXT",
        RecordType::CNAME => "CNAME",
        RecordType::MX => "MX",
        RecordType::ANY => "ANY",
        RecordType::HTTPS => "HTTPS",
        _ => "other",
    }
}

pub fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_families() {
        METRICS
            .dns_counter(RecordType::A, ResponseCode::NoError, "local")
            .inc();
        METRICS
            .source_up
            .get_or_create(&SourceLabels {
                source: "file:zones".into(),
            })
            .set(1);
        let text = METRICS.encode();
        for family in [
            "discotech_dns_queries_total",
            "discotech_dns_query_duration_seconds_bucket",
            "discotech_source_up",
            "discotech_guard_held_updates",
        ] {
            assert!(text.contains(family), "{family} missing from:\n{text}");
        }
        assert!(
            text.contains(
                r#"discotech_dns_queries_total{qtype="A",rcode="NOERROR",answer="local"}"#
            ),
            "{text}"
        );
    }
}
