//! The validated configuration. `RawConfig` (serde, spans) becomes `Config` here, with every
//! problem reported at once as path:line:column: field: message. Defaults live here and are
//! documented in docs/configuration.md.

pub mod raw;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::duration;
use raw::{RawConfig, RawSource, S};

pub const DEFAULT_LISTEN: &str = "127.0.0.53:53";
pub const DEFAULT_DOMAIN: &str = "disco";
pub const DEFAULT_MAGIC_V4: &str = "127.77.0.0/16";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/discotech";
pub const DEFAULT_HOOK_SOCKET: &str = "/run/discotech/hook.sock";
pub const DEFAULT_ZONES_DIR: &str = "zones";
const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from; `None` for built-in defaults.
    pub path: Option<PathBuf>,
    pub dns: DnsConfig,
    pub state: StateConfig,
    pub hook: HookConfig,
    pub sources: Vec<SourceConfig>,
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
pub enum SourceConfig {
    /// A directory of `*.toml` zone files, or one file.
    File { name: String, path: PathBuf },
}

impl SourceConfig {
    pub fn name(&self) -> &str {
        match self {
            Self::File { name, .. } => name,
        }
    }
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
                let source = std::fs::read_to_string(path)
                    .map_err(|e| Diagnostics(vec![Diagnostic::file(path, format!("cannot read config: {e}"))]))?;
                Self::parse(path, &source, &system_nameservers())
            }
            None => {
                let mut config = Self::parse(Path::new("(defaults)"), "", &system_nameservers())?;
                let zones = Path::new(DEFAULT_ZONES_DIR);
                if zones.exists() {
                    config.sources.push(SourceConfig::File { name: "file:zones".into(), path: zones.to_path_buf() });
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
        let raw: RawConfig = toml::from_str(source).map_err(|e| Diagnostics(vec![Diagnostic::from_toml(path, source, &e)]))?;
        let mut v = Validator { path, source, problems: Vec::new() };
        let base = path.parent().unwrap_or(Path::new("."));
        let config = v.config(raw, base, nameservers);
        if v.problems.is_empty() { Ok(config) } else { Err(Diagnostics(v.problems)) }
    }
}

struct Validator<'a> {
    path: &'a Path,
    source: &'a str,
    problems: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn problem<T>(&mut self, at: &S<T>, field: &str, message: impl Into<String>) {
        self.problems.push(Diagnostic::at(self.path, self.source, Some(at.span()), field, message));
    }

    fn check<T, U, E: std::fmt::Display>(&mut self, v: &S<T>, field: &str, f: impl FnOnce(&T) -> Result<U, E>) -> Option<U> {
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
                let addrs: Vec<_> = list.iter().filter_map(|a| self.check(a, "dns.listen", |s| parse_addr(s, 53))).collect();
                if list.is_empty() {
                    self.problems.push(Diagnostic::file(self.path, "dns.listen: at least one address is needed"));
                }
                addrs
            }
            None => vec![DEFAULT_LISTEN.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 53], 53)))],
        };
        let domains = match &d.domains {
            Some(list) => {
                let names: Vec<Name> = list.iter().filter_map(|n| self.check(n, "dns.domains", |s| parse_zone(s))).collect();
                if list.is_empty() {
                    self.problems.push(Diagnostic::file(self.path, "dns.domains: at least one domain is needed"));
                }
                for (i, n) in names.iter().enumerate() {
                    if let Some(other) = names.iter().take(i).find(|o| o.zone_of(n) || n.zone_of(o)) {
                        let at = &list[i];
                        self.problem(at, "dns.domains", format!("{n} overlaps {other}; service domains must be disjoint"));
                    }
                }
                names
            }
            None => vec![parse_zone(DEFAULT_DOMAIN).unwrap_or_else(|_| Name::root())],
        };
        let magic_v4 = match &d.magic_v4 {
            Some(r) => self.check(r, "dns.magic_v4", |s| parse_magic_v4(s)).unwrap_or_else(default_magic_v4),
            None => default_magic_v4(),
        };
        let magic_v6 = d.magic_v6.as_ref().and_then(|r| self.check(r, "dns.magic_v6", |s| parse_magic_v6(s)));

        let upstreams: Vec<SocketAddr> = match &d.upstreams {
            Some(list) => list.iter().filter_map(|a| self.check(a, "dns.upstreams", |s| parse_addr(s, 53))).collect(),
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
            let Some(zone) = self.check(&f.get_ref().zone, "dns.forward.zone", |s| parse_zone(s)) else { continue };
            if let Some(ours) = domains.iter().find(|dom| dom.zone_of(&zone) || zone.zone_of(dom)) {
                self.problem(&f.get_ref().zone, "dns.forward.zone", format!("{zone} overlaps the service domain {ours}"));
            }
            let ups: Vec<SocketAddr> = f.get_ref().upstreams.iter().filter_map(|a| self.check(a, "dns.forward.upstreams", |s| parse_addr(s, 53))).collect();
            for (a, raw) in ups.iter().zip(&f.get_ref().upstreams) {
                if is_ours(a, &listen) {
                    self.problem(raw, "dns.forward.upstreams", format!("{a} is one of our own listen addresses: that would be a forwarding loop"));
                }
            }
            if f.get_ref().upstreams.is_empty() {
                self.problem(f, "dns.forward.upstreams", "a forward zone needs at least one upstream");
            }
            forward.push(ForwardZone { zone, upstreams: ups });
        }
        let allow = match &d.allow {
            Some(list) => list.iter().filter_map(|n| self.check(n, "dns.allow", |s| parse_net(s))).collect(),
            None => vec![IpNet::from(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)), IpNet::from(Ipv6Net::new_assert(std::net::Ipv6Addr::LOCALHOST, 128))],
        };
        let ttl = self.ttl(&d.ttl, "dns.ttl", 60);
        let srv_ttl = self.ttl(&d.srv_ttl, "dns.srv_ttl", 5);
        let negative_ttl = self.ttl(&d.negative_ttl, "dns.negative_ttl", 5);
        let timeout = self.duration(&d.timeout, "dns.timeout", Duration::from_secs(2));
        if timeout.is_zero() || timeout > Duration::from_secs(30) {
            if let Some(t) = &d.timeout {
                self.problem(t, "dns.timeout", "must be between 1ms and 30s");
            }
        }
        let cache_size = match &d.cache_size {
            Some(n) => self.check(n, "dns.cache_size", |n| usize::try_from(*n).map_err(|_| "must be 0 or more")).unwrap_or(10_000),
            None => 10_000,
        };
        let stale_max = self.duration(&d.stale_max, "dns.stale_max", Duration::from_secs(86_400));

        let state = StateConfig {
            dir: raw.state.dir.as_ref().map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |p| base.join(p.get_ref())),
            quarantine: self.duration(&raw.state.quarantine, "state.quarantine", Duration::from_secs(86_400)),
        };
        let hook = HookConfig {
            socket: raw.hook.socket.as_ref().map_or_else(|| PathBuf::from(DEFAULT_HOOK_SOCKET), |p| base.join(p.get_ref())),
        };
        let mut sources = Vec::new();
        for (i, s) in raw.sources.iter().enumerate() {
            if let Some(source) = self.source(s, i, base) {
                if sources.iter().any(|o: &SourceConfig| o.name() == source.name()) {
                    self.problem(s, "source.name", format!("two sources are named {:?}", source.name()));
                }
                sources.push(source);
            }
        }
        Config {
            path: Some(self.path.to_path_buf()),
            dns: DnsConfig { listen, domains, magic_v4, magic_v6, upstreams, forward, allow, ttl, srv_ttl, negative_ttl, timeout, cache_size, stale_max },
            state,
            hook,
            sources,
        }
    }

    fn source(&mut self, s: &S<RawSource>, index: usize, base: &Path) -> Option<SourceConfig> {
        let raw = s.get_ref();
        match raw.kind.get_ref().as_str() {
            "file" => {
                let Some(path) = &raw.path else {
                    self.problem(s, "source.path", "a file source needs `path` (a directory of *.toml zone files, or one file)");
                    return None;
                };
                let name = raw.name.as_ref().map_or_else(|| format!("file:{}", path.get_ref()), |n| n.get_ref().clone());
                Some(SourceConfig::File { name, path: base.join(path.get_ref()) })
            }
            other => {
                self.problem(&raw.kind, "source.kind", format!("unknown source kind {other:?}, expected \"file\""));
                let _ = index;
                None
            }
        }
    }

    fn ttl(&mut self, v: &Option<S<i64>>, field: &str, default: u32) -> u32 {
        match v {
            Some(n) => self
                .check(n, field, |n| u32::try_from(*n).ok().filter(|n| *n <= 604_800).ok_or("must be between 0 and 604800 seconds"))
                .unwrap_or(default),
            None => default,
        }
    }

    fn duration(&mut self, v: &Option<S<String>>, field: &str, default: Duration) -> Duration {
        match v {
            Some(s) => self.check(s, field, |s| duration::parse(s)).unwrap_or(default),
            None => default,
        }
    }
}

fn default_magic_v4() -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(127, 77, 0, 0), 16)
}

/// `ip:port`, `[v6]:port`, or a bare address with `default_port`.
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
    let mut name = Name::from_ascii(trimmed).map_err(|e| format!("{s:?} is not a domain name: {e}"))?;
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
    let net: Ipv4Net = s.parse().map_err(|_| format!("{s:?} is not an IPv4 network; write e.g. \"127.77.0.0/16\""))?;
    if net.prefix_len() > 28 {
        return Err(format!("{s:?} is too small: use at most /28 so there is room for services"));
    }
    Ok(net.trunc())
}

fn parse_magic_v6(s: &str) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = s.parse().map_err(|_| format!("{s:?} is not an IPv6 network; write e.g. \"fd64:d15c::/64\""))?;
    if net.prefix_len() > 120 {
        return Err(format!("{s:?} is too small: use at most /120"));
    }
    Ok(net.trunc())
}

/// True when queries sent to `a` would reach one of our own listeners.
fn is_ours(a: &SocketAddr, listen: &[SocketAddr]) -> bool {
    listen.iter().any(|l| {
        l.port() == a.port() && (l.ip() == a.ip() || (l.ip().is_unspecified() && (a.ip().is_loopback() || a.ip().is_unspecified())))
    })
}

/// The `nameserver` lines of /etc/resolv.conf.
fn system_nameservers() -> Vec<IpAddr> {
    std::fs::read_to_string(RESOLV_CONF).map(|s| parse_resolv_conf(&s)).unwrap_or_default()
}

pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        .filter_map(|w| w.split('%').next().and_then(|a| a.parse().ok()))
        .collect()
}

#[cfg(test)]
mod tests;
