//! The validated configuration. `RawConfig` (serde, spans) becomes `Config` here, with every
//! problem reported at once as path:line:column: field: message. The top-level sections and
//! their defaults live here; each `[[source]]`, `[[register]]` and health check is checked beside
//! what it configures (`SourceConfig::from_raw`, `Registration::from_raw`,
//! `discovery::health::config`), reporting into the same [`Checker`]. Defaults are documented in
//! docs/configuration.md.

pub mod raw;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::addr::{parse_addr, parse_zone};
use crate::diagnostic::{Checker, Diagnostic, Diagnostics};
use crate::discovery::guard::GuardConfig;
use crate::discovery::health::config::HealthConfig;
use crate::discovery::register::config::Registration;
use crate::discovery::source::config::SourceConfig;
use crate::dns::answer::Zones;
use crate::service::PortName;
use raw::{RawConfig, S};

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

impl DnsConfig {
    /// What the authoritative answers need of this section.
    pub fn zones(&self) -> Zones {
        Zones::new(
            self.domains.clone(),
            self.magic_v4,
            self.magic_v6,
            self.ttl,
            self.srv_ttl,
            self.negative_ttl,
        )
    }
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
            file: Checker::new(path, source),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let config = v.config(raw, base, nameservers);
        v.file.finish(Some(config)).map_err(Diagnostics)
    }
}

/// Walks a parsed file into a `Config`: every check reports into `file` and goes on, so all of
/// the file's problems come out together.
struct Validator<'a> {
    file: Checker<'a>,
}

impl Validator<'_> {
    fn config(&mut self, raw: RawConfig, base: &Path, nameservers: &[IpAddr]) -> Config {
        let d = raw.dns;
        let listen = match &d.listen {
            Some(list) => {
                let addrs: Vec<_> = list
                    .iter()
                    .filter_map(|a| {
                        self.file.check(a, "dns.listen", |s| {
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
                    self.file
                        .problem_in_file("dns.listen: at least one address is needed");
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
                    .filter_map(|n| self.file.check(n, "dns.domains", |s| parse_zone(s)))
                    .collect();
                if list.is_empty() {
                    self.file
                        .problem_in_file("dns.domains: at least one domain is needed");
                }
                for (i, n) in names.iter().enumerate() {
                    if let Some(other) = names.iter().take(i).find(|o| o.zone_of(n) || n.zone_of(o))
                    {
                        let at = &list[i];
                        self.file.problem(
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
                .file
                .check(r, "dns.magic_v4", |s| parse_magic_v4(s))
                .unwrap_or_else(default_magic_v4),
            None => default_magic_v4(),
        };
        let magic_v6 = d
            .magic_v6
            .as_ref()
            .and_then(|r| self.file.check(r, "dns.magic_v6", |s| parse_magic_v6(s)));

        let upstreams: Vec<SocketAddr> = match &d.upstreams {
            Some(list) => list
                .iter()
                .filter_map(|a| self.file.check(a, "dns.upstreams", |s| parse_addr(s, 53)))
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
                    self.file.problem(raw, "dns.upstreams", format!("{a} is one of our own listen addresses: that would be a forwarding loop"));
                }
            }
        }
        let mut forward = Vec::new();
        for f in &d.forward {
            let Some(zone) = self
                .file
                .check(&f.get_ref().zone, "dns.forward.zone", |s| parse_zone(s))
            else {
                continue;
            };
            if let Some(ours) = domains
                .iter()
                .find(|dom| dom.zone_of(&zone) || zone.zone_of(dom))
            {
                self.file.problem(
                    &f.get_ref().zone,
                    "dns.forward.zone",
                    format!("{zone} overlaps the service domain {ours}"),
                );
            }
            let ups: Vec<SocketAddr> = f
                .get_ref()
                .upstreams
                .iter()
                .filter_map(|a| {
                    self.file
                        .check(a, "dns.forward.upstreams", |s| parse_addr(s, 53))
                })
                .collect();
            for (a, raw) in ups.iter().zip(&f.get_ref().upstreams) {
                if is_ours(a, &listen) {
                    self.file.problem(raw, "dns.forward.upstreams", format!("{a} is one of our own listen addresses: that would be a forwarding loop"));
                }
            }
            if f.get_ref().upstreams.is_empty() {
                self.file.problem(
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
                .filter_map(|n| self.file.check(n, "dns.allow", |s| parse_net(s)))
                .collect(),
            None => vec![
                IpNet::from(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
                IpNet::from(Ipv6Net::new_assert(std::net::Ipv6Addr::LOCALHOST, 128)),
            ],
        };
        let ttl = self.ttl(&d.ttl, "dns.ttl", 60);
        let srv_ttl = self.ttl(&d.srv_ttl, "dns.srv_ttl", 5);
        let negative_ttl = self.ttl(&d.negative_ttl, "dns.negative_ttl", 5);
        let timeout = self
            .file
            .duration(&d.timeout, "dns.timeout", Duration::from_secs(2));
        if (timeout.is_zero() || timeout > Duration::from_secs(30))
            && let Some(t) = &d.timeout
        {
            self.file
                .problem(t, "dns.timeout", "must be between 1ms and 30s");
        }
        let cache_size = match &d.cache_size {
            Some(n) => self
                .file
                .check(n, "dns.cache_size", |n| {
                    usize::try_from(*n).map_err(|_| "must be 0 or more")
                })
                .unwrap_or(10_000),
            None => 10_000,
        };
        let stale_max =
            self.file
                .duration(&d.stale_max, "dns.stale_max", Duration::from_secs(86_400));

        let state = StateConfig {
            dir: raw.state.dir.as_ref().map_or_else(
                || PathBuf::from(DEFAULT_STATE_DIR),
                |p| base.join(p.get_ref()),
            ),
            quarantine: self.file.duration(
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
                .filter_map(|a| {
                    self.file
                        .check(a, "metrics.listen", |s| parse_addr(s, 9253))
                })
                .collect(),
            None => vec![SocketAddr::from(([127, 0, 0, 1], 9253))],
        };
        let mut sources = Vec::new();
        for s in &raw.sources {
            if let Some(source) = SourceConfig::from_raw(&mut self.file, s, base, &upstreams) {
                if sources
                    .iter()
                    .any(|o: &SourceConfig| o.name() == source.name())
                {
                    self.file.problem(
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
            hold_down: self.file.duration(
                &raw.guard.hold_down,
                "guard.hold_down",
                Duration::from_secs(60),
            ),
        };
        let registrations = raw
            .registrations
            .iter()
            .filter_map(|r| Registration::from_raw(&mut self.file, r))
            .collect();
        let health = HealthConfig {
            panic_threshold: self.share(&raw.health.panic_threshold, "health.panic_threshold", 0.5),
        };
        let balance = BalanceConfig {
            zone: raw.balance.zone.as_ref().and_then(|z| {
                self.file.check(z, "balance.zone", |s: &String| {
                    s.parse::<PortName>()
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
                self.file
                    .check(m, "catch.mode", |s: &String| match s.as_str() {
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
            path: Some(self.file.path().to_path_buf()),
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

    fn ttl(&mut self, v: &Option<S<i64>>, field: &str, default: u32) -> u32 {
        match v {
            Some(n) => self
                .file
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
                .file
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
}

mod addrs;

pub use addrs::parse_resolv_conf;
use addrs::{
    default_magic_v4, is_ours, parse_magic_v4, parse_magic_v6, parse_net, system_nameservers,
};

#[cfg(test)]
mod tests;
