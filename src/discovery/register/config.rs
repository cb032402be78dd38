//! `[[register]]`: the table as written and the validated [`Registration`]. The ZooKeeper keys
//! are checked as a zookeeper source checks them, the `check` table as any health check.
//! Announcing is `register.rs`'s job.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::addr::parse_addr;
use crate::diagnostic::Checker;
use crate::discovery::health::config::{self as health, RawCheck};
use crate::discovery::source::zookeeper::config::{ZkFormat, zk_auth, zk_hosts, zk_path};
use crate::service::{CheckKind, HealthCheck, PortName, ServiceName};

/// `[[register]]`: announce a local service into ZooKeeper while its health check passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub service: ServiceName,
    pub addr: SocketAddr,
    pub hosts: Vec<String>,
    /// The service's node; the instance is an ephemeral child of it.
    pub path: String,
    pub format: ZkFormat,
    pub session_timeout: Duration,
    pub auth: Option<String>,
    pub ports: BTreeMap<PortName, u16>,
    pub check: HealthCheck,
}

/// One `[[register]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegister {
    pub service: Spanned<String>,
    pub addr: Spanned<String>,
    pub hosts: Vec<Spanned<String>>,
    pub path: Spanned<String>,
    pub format: Option<Spanned<String>>,
    pub session_timeout: Option<Spanned<String>>,
    pub auth: Option<Spanned<String>>,
    pub ports: Option<BTreeMap<String, Spanned<i64>>>,
    pub check: Option<Spanned<RawCheck>>,
}

impl Registration {
    /// Checks one `[[register]]`, reporting each problem into `c`.
    pub(crate) fn from_raw(c: &mut Checker, r: &Spanned<RawRegister>) -> Option<Self> {
        let raw = r.get_ref();
        let service = c.check(&raw.service, "register.service", |s| {
            s.parse::<ServiceName>()
                .map_err(|e| format!("invalid service name {s:?}: {e}"))
        });
        let addr = c.check(&raw.addr, "register.addr", |s| {
            parse_addr(s, 0).and_then(|a| {
                if a.port() == 0 {
                    Err(format!("{s:?} needs a port"))
                } else {
                    Ok(a)
                }
            })
        });
        let hosts = zk_hosts(c, r, Some(&raw.hosts), "register.hosts");
        let path = c.check(&raw.path, "register.path", |p| zk_path(p));
        let format = match &raw.format {
            Some(f) => c.check(f, "register.format", |f| match ZkFormat::parse(f)? {
                ZkFormat::Auto => Err(
                    "registration needs a concrete format: serverset, curator, nerve or host-port"
                        .to_string(),
                ),
                other => Ok(other),
            }),
            None => Some(ZkFormat::Serverset),
        };
        let mut ports = BTreeMap::new();
        for (name, port) in raw.ports.iter().flatten() {
            let field = format!("register.ports.{name}");
            let pname = c.check(port, &field, |_| {
                name.parse::<PortName>().map_err(|e| e.to_string())
            });
            let number = c.check(port, &field, |p| {
                u16::try_from(*p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or("must be a port number (1-65535)")
            });
            if let (Some(n), Some(p)) = (pname, number) {
                ports.insert(n, p);
            }
        }
        let check = match &raw.check {
            Some(check) => health::from_raw(c, check)?,
            None => HealthCheck {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                jitter: Duration::from_millis(200),
                rise: 2,
                fall: 2,
            },
        };
        let session_timeout = c.duration(
            &raw.session_timeout,
            "register.session_timeout",
            Duration::from_secs(10),
        );
        let auth = zk_auth(c, raw.auth.as_ref());
        Some(Self {
            service: service?,
            addr: addr?,
            hosts: hosts?,
            path: path?,
            format: format?,
            session_timeout,
            auth,
            ports,
            check,
        })
    }
}
