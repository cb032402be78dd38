//! The validated configuration. `RawConfig` (serde, spans) becomes `Config` here, with every
//! problem reported at once as path:line:column: field: message. Defaults live here and are
//! documented in docs/configuration.md.

pub mod raw;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::duration;
use crate::service::{PortName, ServiceName};
use raw::{RawCheck, RawConfig, RawRegister, RawSource, S};

pub const DEFAULT_LISTEN: &str = "127.0.0.53:53";
pub const DEFAULT_DOMAIN: &str = "disco";
pub const DEFAULT_MAGIC_V4: &str = "127.77.0.0/16";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/discotech";
pub const DEFAULT_HOOK_SOCKET: &str = "/run/discotech/hook.sock";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/discotech/admin.sock";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9253";
pub const DEFAULT_ZONES_DIR: &str = "zones";
const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from; `None` for built-in defaults.
    pub path: Option<PathBuf>,
    pub dns: DnsConfig,
    pub state: StateConfig,
    pub hook: HookConfig,
    pub admin: AdminConfig,
    /// Where `/metrics` and the status page are served; empty: nowhere.
    pub metrics_listen: Vec<SocketAddr>,
    pub sources: Vec<SourceConfig>,
    pub guard: GuardConfig,
    pub health: HealthConfig,
    pub balance: BalanceConfig,
    pub catch: CatchConfig,
    pub registrations: Vec<Registration>,
}

/// `[catch]`: connects that bypass the hook, caught in the kernel (see `catch.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CatchConfig {
    /// Off: programs the hook cannot enter get nothing for magic addresses.
    pub off: bool,
    /// The cgroup the programs attach to; `None`: the cgroup2 root.
    pub cgroup: Option<PathBuf>,
}

/// `[balance]`: what the balancer knows about this host.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceConfig {
    /// This host's zone: backends with the same `zone` are preferred (see the balancer).
    pub zone: Option<String>,
    /// The local zone is preferred while its eligible backends hold at least this share of the
    /// eligible capacity (weight).
    pub local_min_share: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            zone: None,
            local_min_share: 0.3,
        }
    }
}

/// `[health]`: what active and passive health may do to a service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// Below this share of healthy backends, a service balances over all of them (panic mode)
    /// instead of crushing the few left.
    pub panic_threshold: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            panic_threshold: 0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    pub listen: Vec<SocketAddr>,
    /// Lowercase, fully qualified.
    pub domains: Vec<Name>,
    pub magic_v4: Ipv4Net,
    pub magic_v6: Option<Ipv6Net>,
    pub upstreams: Vec<SocketAddr>,
    pub forward: Vec<ForwardZone>,
    /// Clients allowed to query; everyone else gets REFUSED.
    pub allow: Vec<IpNet>,
    pub ttl: u32,
    pub srv_ttl: u32,
    pub negative_ttl: u32,
    pub timeout: Duration,
    pub cache_size: usize,
    pub stale_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardZone {
    pub zone: Name,
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    pub dir: PathBuf,
    pub quarantine: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    pub socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// The admin socket: mode 0660, for root and the socket's group.
    pub socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of `*.toml` zone files, or one file.
    File {
        name: String,
        path: PathBuf,
    },
    Zookeeper(ZookeeperSource),
    DnsSrv(DnsSrvSource),
}

impl SourceConfig {
    pub fn name(&self) -> &str {
        match self {
            Self::File { name, .. } => name,
            Self::Zookeeper(z) => &z.name,
            Self::DnsSrv(d) => &d.name,
        }
    }
}

/// How service instances are written in ZooKeeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZkFormat {
    /// Recognise each node by its content: JSON of any known layout, else a `host:port` node name.
    #[default]
    Auto,
    /// Finagle/Aurora serverset JSON: serviceEndpoint, additionalEndpoints, status.
    Serverset,
    /// Curator x-discovery ServiceInstance JSON.
    Curator,
    /// SmartStack Nerve JSON: host, port, name, weight.
    Nerve,
    /// The node name is `host:port`; data is ignored.
    HostPort,
}

impl ZkFormat {
    pub const NAMES: &'static [&'static str] =
        &["auto", "serverset", "curator", "nerve", "host-port"];

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "serverset" => Ok(Self::Serverset),
            "curator" => Ok(Self::Curator),
            "nerve" => Ok(Self::Nerve),
            "host-port" => Ok(Self::HostPort),
            other => Err(format!(
                "unknown format {other:?}, expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// `[[source]] kind = "zookeeper"`: each child of `root` is a service, each of its children an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZookeeperSource {
    pub name: String,
    /// `host:port` of each ensemble member.
    pub hosts: Vec<String>,
    /// Absolute path, no trailing slash (except `/` itself).
    pub root: String,
    pub session_timeout: Duration,
    /// Digest auth as `user:password`.
    pub auth: Option<String>,
    pub format: ZkFormat,
}

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

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Each wait between checks is `interval` plus a random share of this, so that many hosts
    /// checking one backend drift apart instead of probing in step.
    #[serde(default)]
    pub jitter: Duration,
    /// Consecutive passes before healthy.
    pub rise: u32,
    /// Consecutive failures before unhealthy.
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CheckKind {
    Tcp,
    /// HTTP GET of `path`; healthy when the status is within `expect`.
    Http {
        path: String,
        expect: (u16, u16),
    },
}

/// Why a config could not be loaded: every problem found.
pub type ConfigError = Diagnostics;

impl Config {
    /// Loads and validates `path`, or the built-in defaults (serving `./zones` if it exists) for `None`.
    ///
    /// # Errors
    /// Every problem found in the file, each with path:line:column.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => {
                let source = std::fs::read_to_string(path).map_err(|e| {
                    Diagnostics(vec![Diagnostic::file(
                        path,
                        format!("cannot read config: {e}"),
                    )])
                })?;
                Self::parse(path, &source, &system_nameservers())
            }
            None => {
                let mut config = Self::parse(Path::new("(defaults)"), "", &system_nameservers())?;
                let zones = Path::new(DEFAULT_ZONES_DIR);
                if zones.exists() {
                    config.sources.push(SourceConfig::File {
                        name: "file:zones".into(),
                        path: zones.to_path_buf(),
                    });
                }
                config.path = None;
                Ok(config)
            }
        }
    }

    /// Validates config text. `nameservers` are the system resolvers, used as upstreams when none are set.
    ///
    /// # Errors
    /// Every problem found, each with path:line:column.
    pub fn parse(path: &Path, source: &str, nameservers: &[IpAddr]) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(source)
            .map_err(|e| Diagnostics(vec![Diagnostic::from_toml(path, source, &e)]))?;
        let mut v = Validator {
            path,
            source,
            problems: Vec::new(),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let config = v.config(raw, base, nameservers);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(Diagnostics(v.problems))
        }
    }
}

struct Validator<'a> {
    path: &'a Path,
    source: &'a str,
    problems: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn problem<T>(&mut self, at: &S<T>, field: &str, message: impl Into<String>) {
        self.problems.push(Diagnostic::at(
            self.path,
            self.source,
            Some(at.span()),
            field,
            message,
        ));
    }

    fn check<T, U, E: std::fmt::Display>(
        &mut self,
        v: &S<T>,
        field: &str,
        f: impl FnOnce(&T) -> Result<U, E>,
    ) -> Option<U> {
        match f(v.get_ref()) {
            Ok(u) => Some(u),
            Err(e) => {
                self.problem(v, field, e.to_string());
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig, base: &Path, nameservers: &[IpAddr]) -> Config {
        let d = raw.dns;
        let listen = match &d.listen {
            Some(list) => {
                let addrs: Vec<_> = list
                    .iter()
                    .filter_map(|a| {
                        self.check(a, "dns.listen", |s| {
                            parse_addr(s, 53).and_then(|addr| {
                                if addr.ip().is_unspecified() {
                                    Err(format!("{addr} is a wildcard: a UDP reply would leave from whichever address the kernel picks, not the one the client asked, and clients drop it; list each address to answer on (e.g. \"127.0.0.53:53\", \"10.0.0.5:53\")"))
                                } else {
                                    Ok(addr)
                                }
                            })
                        })
                    })
                    .collect();
                if list.is_empty() {
                    self.problems.push(Diagnostic::file(
                        self.path,
                        "dns.listen: at least one address is needed",
                    ));
                }
                addrs
            }
            None => vec![
                DEFAULT_LISTEN
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 53], 53))),
            ],
        };
        let domains = match &d.domains {
            Some(list) => {
                let names: Vec<Name> = list
                    .iter()
                    .filter_map(|n| self.check(n, "dns.domains", |s| parse_zone(s)))
                    .collect();
                if list.is_empty() {
                    self.problems.push(Diagnostic::file(
                        self.path,
                        "dns.domains: at least one domain is needed",
                    ));
                }
                for (i, n) in names.iter().enumerate() {
                    if let Some(other) = names.iter().take(i).find(|o| o.zone_of(n) || n.zone_of(o))
                    {
                        let at = &list[i];
                        self.problem(
                            at,
                            "dns.domains",
                            format!("{n} overlaps {other}; service domains must be disjoint"),
                        );
                    }
                }
                names
            }
            None => vec![parse_zone(DEFAULT_DOMAIN).unwrap_or_else(|_| Name::root())],
        };
        let magic_v4 = match &d.magic_v4 {
            Some(r) => self
                .check(r, "dns.magic_v4", |s| parse_magic_v4(s))
                .unwrap_or_else(default_magic_v4),
            None => default_magic_v4(),
        };
        let magic_v6 = d
            .magic_v6
            .as_ref()
            .and_then(|r| self.check(r, "dns.magic_v6", |s| parse_magic_v6(s)));

        let upstreams: Vec<SocketAddr> = match &d.upstreams {
            Some(list) => list
                .iter()
                .filter_map(|a| self.check(a, "dns.upstreams", |s| parse_addr(s, 53)))
                .collect(),
            None => nameservers
                .iter()
                .map(|ip| SocketAddr::new(*ip, 53))
                .filter(|a| !is_ours(a, &listen))
                .collect(),
        };
        if let Some(list) = &d.upstreams {
            for (a, raw) in upstreams.iter().zip(list) {
                if is_ours(a, &listen) {
                    self.problem(raw, "dns.upstreams", format!("{a} is one of our own listen addresses: that would be a forwarding loop"));
                }
            }
        }
        let mut forward = Vec::new();
        for f in &d.forward {
            let Some(zone) = self.check(&f.get_ref().zone, "dns.forward.zone", |s| parse_zone(s))
            else {
                continue;
            };
            if let Some(ours) = domains
                .iter()
                .find(|dom| dom.zone_of(&zone) || zone.zone_of(dom))
            {
                self.problem(
                    &f.get_ref().zone,
                    "dns.forward.zone",
                    format!("{zone} overlaps the service domain {ours}"),
                );
            }
            let ups: Vec<SocketAddr> = f
                .get_ref()
                .upstreams
                .iter()
                .filter_map(|a| self.check(a, "dns.forward.upstreams", |s| parse_addr(s, 53)))
                .collect();
            for (a, raw) in ups.iter().zip(&f.get_ref().upstreams) {
                if is_ours(a, &listen) {
                    self.problem(raw, "dns.forward.upstreams", format!("{a} is one of our own listen addresses: that would be a forwarding loop"));
                }
            }
            if f.get_ref().upstreams.is_empty() {
                self.problem(
                    f,
                    "dns.forward.upstreams",
                    "a forward zone needs at least one upstream",
                );
            }
            forward.push(ForwardZone {
                zone,
                upstreams: ups,
            });
        }
        let allow = match &d.allow {
            Some(list) => list
                .iter()
                .filter_map(|n| self.check(n, "dns.allow", |s| parse_net(s)))
                .collect(),
            None => vec![
                IpNet::from(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
                IpNet::from(Ipv6Net::new_assert(std::net::Ipv6Addr::LOCALHOST, 128)),
            ],
        };
        let ttl = self.ttl(&d.ttl, "dns.ttl", 60);
        let srv_ttl = self.ttl(&d.srv_ttl, "dns.srv_ttl", 5);
        let negative_ttl = self.ttl(&d.negative_ttl, "dns.negative_ttl", 5);
        let timeout = self.duration(&d.timeout, "dns.timeout", Duration::from_secs(2));
        if (timeout.is_zero() || timeout > Duration::from_secs(30))
            && let Some(t) = &d.timeout
        {
            self.problem(t, "dns.timeout", "must be between 1ms and 30s");
        }
        let cache_size = match &d.cache_size {
            Some(n) => self
                .check(n, "dns.cache_size", |n| {
                    usize::try_from(*n).map_err(|_| "must be 0 or more")
                })
                .unwrap_or(10_000),
            None => 10_000,
        };
        let stale_max = self.duration(&d.stale_max, "dns.stale_max", Duration::from_secs(86_400));

        let state = StateConfig {
            dir: raw.state.dir.as_ref().map_or_else(
                || PathBuf::from(DEFAULT_STATE_DIR),
                |p| base.join(p.get_ref()),
            ),
            quarantine: self.duration(
                &raw.state.quarantine,
                "state.quarantine",
                Duration::from_secs(86_400),
            ),
        };
        let hook = HookConfig {
            socket: raw.hook.socket.as_ref().map_or_else(
                || PathBuf::from(DEFAULT_HOOK_SOCKET),
                |p| base.join(p.get_ref()),
            ),
        };
        let admin = AdminConfig {
            socket: raw.admin.socket.as_ref().map_or_else(
                || PathBuf::from(DEFAULT_ADMIN_SOCKET),
                |p| base.join(p.get_ref()),
            ),
        };
        let metrics_listen = match &raw.metrics.listen {
            Some(list) => list
                .iter()
                .filter_map(|a| self.check(a, "metrics.listen", |s| parse_addr(s, 9253)))
                .collect(),
            None => vec![SocketAddr::from(([127, 0, 0, 1], 9253))],
        };
        let mut sources = Vec::new();
        for s in &raw.sources {
            if let Some(source) = self.source(s, base, &upstreams) {
                if sources
                    .iter()
                    .any(|o: &SourceConfig| o.name() == source.name())
                {
                    self.problem(
                        s,
                        "source.name",
                        format!("two sources are named {:?}", source.name()),
                    );
                }
                sources.push(source);
            }
        }
        let guard = GuardConfig {
            max_drop: self.share(&raw.guard.max_drop, "guard.max_drop", 0.5),
            hold_down: self.duration(
                &raw.guard.hold_down,
                "guard.hold_down",
                Duration::from_secs(60),
            ),
        };
        let registrations = raw
            .registrations
            .iter()
            .filter_map(|r| self.registration(r))
            .collect();
        let health = HealthConfig {
            panic_threshold: self.share(&raw.health.panic_threshold, "health.panic_threshold", 0.5),
        };
        let balance = BalanceConfig {
            zone: raw.balance.zone.as_ref().and_then(|z| {
                self.check(z, "balance.zone", |s: &String| {
                    s.parse::<crate::service::PortName>()
                        .map(|_| s.to_ascii_lowercase())
                        .map_err(|e| format!("invalid zone {s:?}: {e}"))
                })
            }),
            local_min_share: self.share(
                &raw.balance.local_min_share,
                "balance.local_min_share",
                0.3,
            ),
        };
        let catch = CatchConfig {
            off: raw.catch.mode.as_ref().is_some_and(|m| {
                self.check(m, "catch.mode", |s: &String| match s.as_str() {
                    "bpf" => Ok(false),
                    "off" => Ok(true),
                    other => Err(format!(
                        "unknown mode {other:?}, expected \"bpf\" or \"off\""
                    )),
                })
                .unwrap_or(false)
            }),
            cgroup: raw.catch.cgroup.as_ref().map(|c| base.join(c.get_ref())),
        };
        Config {
            path: Some(self.path.to_path_buf()),
            dns: DnsConfig {
                listen,
                domains,
                magic_v4,
                magic_v6,
                upstreams,
                forward,
                allow,
                ttl,
                srv_ttl,
                negative_ttl,
                timeout,
                cache_size,
                stale_max,
            },
            state,
            hook,
            admin,
            metrics_listen,
            sources,
            guard,
            health,
            balance,
            catch,
            registrations,
        }
    }

    fn source(
        &mut self,
        s: &S<RawSource>,
        base: &Path,
        upstreams: &[SocketAddr],
    ) -> Option<SourceConfig> {
        let raw = s.get_ref();
        let kind = raw.kind.get_ref().as_str();
        // Each kind accepts only its own keys.
        let allowed: &[&str] = match kind {
            "file" => &["path"],
            "zookeeper" => &["hosts", "root", "session_timeout", "auth", "format"],
            "dns-srv" => &["resolvers", "services", "min_ttl", "max_ttl"],
            other => {
                self.problem(&raw.kind, "source.kind", format!("unknown source kind {other:?}, expected \"file\", \"zookeeper\" or \"dns-srv\""));
                return None;
            }
        };
        let present = [
            ("path", raw.path.is_some()),
            ("hosts", raw.hosts.is_some()),
            ("root", raw.root.is_some()),
            ("session_timeout", raw.session_timeout.is_some()),
            ("auth", raw.auth.is_some()),
            ("format", raw.format.is_some()),
            ("resolvers", raw.resolvers.is_some()),
            ("services", raw.services.is_some()),
            ("min_ttl", raw.min_ttl.is_some()),
            ("max_ttl", raw.max_ttl.is_some()),
        ];
        for (key, _) in present.iter().filter(|(k, p)| *p && !allowed.contains(k)) {
            self.problem(
                s,
                &format!("source.{key}"),
                format!("`{key}` does not apply to a {kind} source"),
            );
        }
        let name = |default: String| raw.name.as_ref().map_or(default, |n| n.get_ref().clone());
        match kind {
            "file" => {
                let Some(path) = &raw.path else {
                    self.problem(s, "source.path", "a file source needs `path` (a directory of *.toml zone files, or one file)");
                    return None;
                };
                Some(SourceConfig::File {
                    name: name(format!("file:{}", path.get_ref())),
                    path: base.join(path.get_ref()),
                })
            }
            "zookeeper" => {
                let hosts = self.zk_hosts(s, raw.hosts.as_deref(), "source.hosts")?;
                let Some(root) = &raw.root else {
                    self.problem(
                        s,
                        "source.root",
                        "a zookeeper source needs `root`, the path whose children are services",
                    );
                    return None;
                };
                let root_path = self.check(root, "source.root", |p| zk_path(p))?;
                let format = match &raw.format {
                    Some(f) => self.check(f, "source.format", |f| ZkFormat::parse(f))?,
                    None => ZkFormat::Auto,
                };
                Some(SourceConfig::Zookeeper(ZookeeperSource {
                    name: name(format!("zookeeper:{root_path}")),
                    hosts,
                    root: root_path,
                    session_timeout: self.duration(
                        &raw.session_timeout,
                        "source.session_timeout",
                        Duration::from_secs(10),
                    ),
                    auth: self.zk_auth(raw.auth.as_ref()),
                    format,
                }))
            }
            _ => {
                let resolvers = match &raw.resolvers {
                    Some(list) => list
                        .iter()
                        .filter_map(|a| self.check(a, "source.resolvers", |s| parse_addr(s, 53)))
                        .collect(),
                    None => upstreams.to_vec(),
                };
                if resolvers.is_empty() {
                    self.problem(
                        s,
                        "source.resolvers",
                        "a dns-srv source needs resolvers (or dns.upstreams)",
                    );
                }
                let mut services = BTreeMap::new();
                for (svc, srv) in raw.services.iter().flatten() {
                    let field = format!("source.services.{svc}");
                    let Some(svc_name) = self.check(srv, &field, |_| {
                        svc.parse::<ServiceName>()
                            .map_err(|e| format!("invalid service name {svc:?}: {e}"))
                    }) else {
                        continue;
                    };
                    if let Some(srv_name) = self.check(srv, &field, |n| parse_zone(n)) {
                        services.insert(svc_name, srv_name);
                    }
                }
                if services.is_empty() {
                    self.problem(s, "source.services", "a dns-srv source needs services = { name = \"_http._tcp.web.example.com\" }");
                }
                let min_ttl = self.duration(&raw.min_ttl, "source.min_ttl", Duration::from_secs(5));
                let max_ttl =
                    self.duration(&raw.max_ttl, "source.max_ttl", Duration::from_secs(300));
                if min_ttl > max_ttl || min_ttl.is_zero() {
                    self.problem(
                        s,
                        "source.min_ttl",
                        "min_ttl must be above zero and at most max_ttl",
                    );
                }
                Some(SourceConfig::DnsSrv(DnsSrvSource {
                    name: name("dns-srv".into()),
                    resolvers,
                    services,
                    min_ttl,
                    max_ttl,
                }))
            }
        }
    }

    fn zk_hosts(
        &mut self,
        at: &S<impl Sized>,
        hosts: Option<&[S<String>]>,
        field: &str,
    ) -> Option<Vec<String>> {
        let Some(hosts) = hosts.filter(|h| !h.is_empty()) else {
            self.problem(
                at,
                field,
                "needs at least one ZooKeeper host, e.g. hosts = [\"127.0.0.1:2181\"]",
            );
            return None;
        };
        let ok: Vec<String> = hosts
            .iter()
            .filter_map(|h| {
                self.check(h, field, |h| match h.rsplit_once(':') {
                    Some((host, port))
                        if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) =>
                    {
                        Ok(h.clone())
                    }
                    _ => Err(format!("{h:?} is not host:port")),
                })
            })
            .collect();
        (ok.len() == hosts.len()).then_some(ok)
    }

    fn zk_auth(&mut self, auth: Option<&S<String>>) -> Option<String> {
        let auth = auth?;
        self.check(auth, "auth", |a| {
            if a.contains(':') {
                Ok(a.clone())
            } else {
                Err("digest auth is \"user:password\"")
            }
        })
    }

    fn registration(&mut self, r: &S<RawRegister>) -> Option<Registration> {
        let raw = r.get_ref();
        let service = self.check(&raw.service, "register.service", |s| {
            s.parse::<ServiceName>()
                .map_err(|e| format!("invalid service name {s:?}: {e}"))
        });
        let addr = self.check(&raw.addr, "register.addr", |s| {
            parse_addr(s, 0).and_then(|a| {
                if a.port() == 0 {
                    Err(format!("{s:?} needs a port"))
                } else {
                    Ok(a)
                }
            })
        });
        let hosts = self.zk_hosts(r, Some(&raw.hosts), "register.hosts");
        let path = self.check(&raw.path, "register.path", |p| zk_path(p));
        let format = match &raw.format {
            Some(f) => self.check(f, "register.format", |f| match ZkFormat::parse(f)? {
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
            let pname = self.check(port, &field, |_| {
                name.parse::<PortName>().map_err(|e| e.to_string())
            });
            let number = self.check(port, &field, |p| {
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
            Some(c) => self.health_check(c)?,
            None => HealthCheck {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                jitter: Duration::from_millis(200),
                rise: 2,
                fall: 2,
            },
        };
        let session_timeout = self.duration(
            &raw.session_timeout,
            "register.session_timeout",
            Duration::from_secs(10),
        );
        let auth = self.zk_auth(raw.auth.as_ref());
        Some(Registration {
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

    fn health_check(&mut self, c: &S<RawCheck>) -> Option<HealthCheck> {
        let raw = c.get_ref();
        let kind = match raw.kind.get_ref().as_str() {
            "tcp" => CheckKind::Tcp,
            "http" => {
                let path = match &raw.path {
                    Some(p) => self.check(p, "check.path", |p| check_http_path(p))?,
                    None => "/".to_string(),
                };
                let expect = match &raw.expect {
                    Some(e) => self.check(e, "check.expect", |e| parse_status_range(e))?,
                    None => (200, 399),
                };
                CheckKind::Http { path, expect }
            }
            other => {
                self.problem(
                    &raw.kind,
                    "check.kind",
                    format!("unknown check kind {other:?}, expected \"tcp\" or \"http\""),
                );
                return None;
            }
        };
        let count = |v: &Option<S<i64>>, field: &str, this: &mut Self| match v {
            Some(n) => this.check(n, field, |n| {
                u32::try_from(*n)
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or("must be from 1 to 100")
            }),
            None => Some(2),
        };
        let rise = count(&raw.rise, "check.rise", self)?;
        let fall = count(&raw.fall, "check.fall", self)?;
        let interval = self.duration(&raw.interval, "check.interval", Duration::from_secs(2));
        let timeout = self.duration(&raw.timeout, "check.timeout", Duration::from_secs(1));
        if interval.is_zero()
            && let Some(i) = &raw.interval
        {
            self.problem(i, "check.interval", "must be above zero");
        }
        Some(HealthCheck {
            kind,
            interval,
            timeout,
            jitter: self.duration(&raw.jitter, "check.jitter", interval / 10),
            rise,
            fall,
        })
    }

    fn ttl(&mut self, v: &Option<S<i64>>, field: &str, default: u32) -> u32 {
        match v {
            Some(n) => self
                .check(n, field, |n| {
                    u32::try_from(*n)
                        .ok()
                        .filter(|n| *n <= 604_800)
                        .ok_or("must be between 0 and 604800 seconds")
                })
                .unwrap_or(default),
            None => default,
        }
    }

    /// A share between 0.0 and 1.0.
    fn share(&mut self, v: &Option<S<f64>>, field: &str, default: f64) -> f64 {
        match v {
            Some(v) => self
                .check(v, field, |f| {
                    if (0.0..=1.0).contains(f) {
                        Ok(*f)
                    } else {
                        Err("must be a share between 0.0 and 1.0")
                    }
                })
                .unwrap_or(default),
            None => default,
        }
    }

    fn duration(&mut self, v: &Option<S<String>>, field: &str, default: Duration) -> Duration {
        match v {
            Some(s) => self
                .check(s, field, |s| duration::parse(s))
                .unwrap_or(default),
            None => default,
        }
    }
}

/// Validates a health check table (`[[register]] check` and a zone file's `health`).
///
/// # Errors
/// Every problem, located in `source`.
pub fn health_check(
    path: &Path,
    source: &str,
    raw: &S<RawCheck>,
) -> Result<HealthCheck, Vec<Diagnostic>> {
    let mut v = Validator {
        path,
        source,
        problems: Vec::new(),
    };
    match v.health_check(raw) {
        Some(c) if v.problems.is_empty() => Ok(c),
        _ => Err(v.problems),
    }
}

/// A ZooKeeper path: absolute, no empty segments, no trailing slash.
fn zk_path(p: &str) -> Result<String, String> {
    if p == "/" {
        return Ok(p.to_string());
    }
    if !p.starts_with('/') || p.ends_with('/') || p.contains("//") {
        return Err(format!(
            "{p:?} is not a ZooKeeper path; write e.g. \"/discovery\""
        ));
    }
    Ok(p.to_string())
}

/// `"200-399"` or `"204"`.
fn parse_status_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a status range; write e.g. \"200-399\" or \"204\"");
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if !(100..=599).contains(&lo) || hi < lo || hi > 599 {
        return Err(bad());
    }
    Ok((lo, hi))
}

fn default_magic_v4() -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(127, 77, 0, 0), 16)
}

/// `ip:port`, `[v6]:port`, or a bare address with `default_port`.
/// An HTTP request target for a health check: an absolute path of visible ASCII (no spaces,
/// CR or LF, which would let the config write a request of its own).
fn check_http_path(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with \"/\""));
    }
    if p.len() > 1024 {
        return Err("longer than 1024 bytes".into());
    }
    if let Some(c) = p.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "{p:?} holds {c:?}: only visible ASCII, percent-encode anything else (e.g. %20)"
        ));
    }
    Ok(p.to_string())
}

pub fn parse_addr(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("{s:?} is not an address; write e.g. \"127.0.0.1:53\", \"[::1]:53\" or \"127.0.0.1\""))
}

/// A DNS zone name, lowercased and fully qualified.
pub fn parse_zone(s: &str) -> Result<Name, String> {
    let trimmed = s.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("the root zone cannot be a service domain or forward zone".into());
    }
    let mut name =
        Name::from_ascii(trimmed).map_err(|e| format!("{s:?} is not a domain name: {e}"))?;
    name.set_fqdn(true);
    if name.iter().any(|l| l.is_empty() || l.len() > 63) {
        return Err(format!("{s:?} is not a domain name"));
    }
    Ok(name.to_lowercase())
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a network; write e.g. \"10.0.0.0/8\" or \"127.0.0.1\""))
}

fn parse_magic_v4(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 network; write e.g. \"127.77.0.0/16\""))?;
    if net.prefix_len() > 28 {
        return Err(format!(
            "{s:?} is too small: use at most /28 so there is room for services"
        ));
    }
    Ok(net.trunc())
}

fn parse_magic_v6(s: &str) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv6 network; write e.g. \"fd64:d15c::/64\""))?;
    if net.prefix_len() > 120 {
        return Err(format!("{s:?} is too small: use at most /120"));
    }
    Ok(net.trunc())
}

/// True when queries sent to `a` would reach one of our own listeners.
fn is_ours(a: &SocketAddr, listen: &[SocketAddr]) -> bool {
    listen.iter().any(|l| {
        l.port() == a.port()
            && (l.ip() == a.ip()
                || (l.ip().is_unspecified() && (a.ip().is_loopback() || a.ip().is_unspecified())))
    })
}

/// The `nameserver` lines of /etc/resolv.conf.
fn system_nameservers() -> Vec<IpAddr> {
    std::fs::read_to_string(RESOLV_CONF)
        .map(|s| parse_resolv_conf(&s))
        .unwrap_or_default()
}

pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|w| w.split('%').next().and_then(|a| a.parse().ok()))
        .collect()
}

#[cfg(test)]
mod tests;
