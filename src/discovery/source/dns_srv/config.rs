//! `[[source]] kind = "dns-srv"`, validated: which SRV name each service follows, whom to ask,
//! and how often. Polling is the source's job.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::Name;
use toml::Spanned;

use crate::addr::{parse_addr, parse_zone};
use crate::diagnostic::Checker;
use crate::discovery::source::raw::RawSource;
use crate::service::ServiceName;

/// `[[source]] kind = "dns-srv"`: each service follows one SRV name upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSrvSource {
    pub name: String,
    /// Resolvers to ask; default: `dns.upstreams`.
    pub resolvers: Vec<SocketAddr>,
    pub services: BTreeMap<ServiceName, Name>,
    /// Polling honours the SRV TTL, clamped to [min_ttl, max_ttl].
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

impl DnsSrvSource {
    /// Checks a dns-srv `[[source]]`'s keys, reporting each problem into `c`; `name` gives the
    /// source's name from the default when the table names none, and `upstreams` are asked when
    /// it names no resolvers.
    pub(crate) fn from_raw(
        c: &mut Checker,
        s: &Spanned<RawSource>,
        name: impl FnOnce(String) -> String,
        upstreams: &[SocketAddr],
    ) -> Self {
        let raw = s.get_ref();
        let resolvers = match &raw.resolvers {
            Some(list) => list
                .iter()
                .filter_map(|a| c.check(a, "source.resolvers", |s| parse_addr(s, 53)))
                .collect(),
            None => upstreams.to_vec(),
        };
        if resolvers.is_empty() {
            c.problem(
                s,
                "source.resolvers",
                "a dns-srv source needs resolvers (or dns.upstreams)",
            );
        }
        let mut services = BTreeMap::new();
        for (svc, srv) in raw.services.iter().flatten() {
            let field = format!("source.services.{svc}");
            let Some(svc_name) = c.check(srv, &field, |_| {
                svc.parse::<ServiceName>()
                    .map_err(|e| format!("invalid service name {svc:?}: {e}"))
            }) else {
                continue;
            };
            if let Some(srv_name) = c.check(srv, &field, |n| parse_zone(n)) {
                services.insert(svc_name, srv_name);
            }
        }
        if services.is_empty() {
            c.problem(
                s,
                "source.services",
                "a dns-srv source needs services = { name = \"_http._tcp.web.example.com\" }",
            );
        }
        let min_ttl = c.duration(&raw.min_ttl, "source.min_ttl", Duration::from_secs(5));
        let max_ttl = c.duration(&raw.max_ttl, "source.max_ttl", Duration::from_secs(300));
        if min_ttl > max_ttl || min_ttl.is_zero() {
            c.problem(
                s,
                "source.min_ttl",
                "min_ttl must be above zero and at most max_ttl",
            );
        }
        Self {
            name: name("dns-srv".into()),
            resolvers,
            services,
            min_ttl,
            max_ttl,
        }
    }
}
