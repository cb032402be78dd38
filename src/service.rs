//! Domain types for services and backends: names, addresses, weights, named ports.
//! Pure data with validation; no I/O. Sources produce these, the registry merges them,
//! and the DNS answers and the balancer read them from a snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A service name: one DNS label, lowercase letters, digits and inner hyphens, at most 63 bytes.
/// Stored lowercase so lookups are case-insensitive. Shared, not copied: a name is a key in
/// many maps (sources, registry, snapshot, routing-table slots), and a clone is a reference count.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct ServiceName(Arc<str>);

impl TryFrom<String> for ServiceName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.0.to_string()
    }
}

impl serde::Serialize for ServiceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Why a string is not a valid service or port name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than 63 bytes")]
    TooLong,
    #[error("name may hold only letters, digits and '-', found {0:?}")]
    BadChar(char),
    #[error("name may not start or end with '-'")]
    EdgeHyphen,
}

fn check_label(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > 63 {
        return Err(NameError::TooLong);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(NameError::BadChar(c));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(NameError::EdgeHyphen);
    }
    Ok(())
}

impl ServiceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        check_label(s)?;
        Ok(Self(s.to_ascii_lowercase().into()))
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A named port ("http", "grpc"): the same label rules as a service name.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct PortName(String);

impl TryFrom<String> for PortName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<PortName> for String {
    fn from(n: PortName) -> String {
        n.0
    }
}

impl PortName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PortName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        check_label(s)?;
        Ok(Self(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a service spreads connects over its backends.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "&'static str")]
pub enum LbPolicy {
    /// Each backend in turn, ignoring weights.
    RoundRobin,
    /// Smooth weighted round robin (nginx's algorithm): weights hold exactly over every cycle.
    #[default]
    WeightedRoundRobin,
    /// Uniform random, weighted.
    Random,
    /// Power of two choices on outstanding connects.
    P2c,
    /// Power of two choices on peak-EWMA connect latency x (outstanding + 1) (Finagle's and
    /// Linkerd's cost), from latencies the hook reports.
    P2cEwma,
    /// Fewest established connections from this host (the kernel's socket table).
    LeastConn,
    /// Maglev consistent hashing of the caller's key (its uid): affinity that survives backend changes.
    Maglev,
}

impl LbPolicy {
    pub const NAMES: &'static [&'static str] = &[
        "round-robin",
        "weighted-round-robin",
        "random",
        "p2c",
        "p2c-ewma",
        "least-conn",
        "maglev",
    ];

    /// Whether picks count as outstanding until the hook reports the connect done.
    pub fn reports_done(self) -> bool {
        matches!(self, Self::P2c | Self::P2cEwma)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::WeightedRoundRobin => "weighted-round-robin",
            Self::Random => "random",
            Self::P2c => "p2c",
            Self::P2cEwma => "p2c-ewma",
            Self::LeastConn => "least-conn",
            Self::Maglev => "maglev",
        }
    }
}

impl TryFrom<String> for LbPolicy {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<LbPolicy> for &'static str {
    fn from(p: LbPolicy) -> Self {
        p.as_str()
    }
}

impl FromStr for LbPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(Self::RoundRobin),
            "weighted-round-robin" => Ok(Self::WeightedRoundRobin),
            "random" => Ok(Self::Random),
            "p2c" => Ok(Self::P2c),
            "p2c-ewma" => Ok(Self::P2cEwma),
            "least-conn" => Ok(Self::LeastConn),
            "maglev" => Ok(Self::Maglev),
            other => Err(format!(
                "unknown lb {other:?}, expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// One backend of a service. `addr` carries the default port; [`Self::ports`] gives the
/// numbers of named ports where this backend differs from (or adds to) the default.
///
/// Named ports and the zone, which most backends lack, are boxed apart: a backend without them
/// takes 48 bytes instead of 88, and a daemon may hold hundreds of thousands of backends twice
/// (its sources' view, the published lists).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(from = "BackendFields")]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u16,
    pub priority: u16,
    /// Never `Some` of an empty `Extra`, so that equal backends compare equal.
    extra: Option<Box<Extra>>,
}

// What the boxing is for.
const _: () = assert!(std::mem::size_of::<Backend>() <= 48);

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Extra {
    ports: BTreeMap<PortName, u16>,
    zone: Option<String>,
}

/// A backend as the state files and the admin socket write it.
#[derive(serde::Serialize, serde::Deserialize)]
struct BackendFields<P = BTreeMap<PortName, u16>, Z = String> {
    addr: SocketAddr,
    weight: u16,
    priority: u16,
    ports: P,
    /// The zone the backend runs in; the host's zone is preferred (`[balance] zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<Z>,
}

impl From<BackendFields> for Backend {
    fn from(f: BackendFields) -> Self {
        let mut b = Self {
            addr: f.addr,
            weight: f.weight,
            priority: f.priority,
            extra: Some(Box::new(Extra {
                ports: f.ports,
                zone: f.zone,
            })),
        };
        b.settle();
        b
    }
}

impl serde::Serialize for Backend {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        BackendFields {
            addr: self.addr,
            weight: self.weight,
            priority: self.priority,
            ports: self.ports(),
            zone: self.zone(),
        }
        .serialize(s)
    }
}

/// The named ports of a backend that has none.
static NO_PORTS: BTreeMap<PortName, u16> = BTreeMap::new();

impl Backend {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            weight: 1,
            priority: 0,
            extra: None,
        }
    }

    /// Named port -> number, where this backend differs from (or adds to) its default port.
    pub fn ports(&self) -> &BTreeMap<PortName, u16> {
        self.extra.as_ref().map_or(&NO_PORTS, |e| &e.ports)
    }

    /// The zone the backend runs in; the host's zone is preferred (`[balance] zone`).
    pub fn zone(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|e| e.zone.as_deref())
    }

    /// Serves `name` on `port`.
    pub fn set_port(&mut self, name: PortName, port: u16) {
        self.extra.get_or_insert_default().ports.insert(name, port);
    }

    pub fn set_zone(&mut self, zone: Option<String>) {
        self.extra.get_or_insert_default().zone = zone;
        self.settle();
    }

    /// Drops an empty `extra`.
    fn settle(&mut self) {
        if self
            .extra
            .as_ref()
            .is_some_and(|e| e.ports.is_empty() && e.zone.is_none())
        {
            self.extra = None;
        }
    }

    /// The port this backend serves `name` on, falling back to its default port.
    pub fn port_for(&self, name: Option<&PortName>) -> u16 {
        name.and_then(|n| self.ports().get(n).copied())
            .unwrap_or(self.addr.port())
    }
}

/// A service's backends, one list shared by the copies of its spec that the source, the
/// registry, the guard and the snapshot each keep: a clone is a reference count, and the first
/// change through a shared list copies it (copy on write, as [`Arc::make_mut`]). Reads and
/// writes look like a `Vec`'s.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Backends(Arc<Vec<Backend>>);

impl Deref for Backends {
    type Target = Vec<Backend>;
    fn deref(&self) -> &Vec<Backend> {
        &self.0
    }
}

impl DerefMut for Backends {
    /// The list to change: this spec's own, copied first if another spec shares it.
    fn deref_mut(&mut self) -> &mut Vec<Backend> {
        Arc::make_mut(&mut self.0)
    }
}

impl From<Vec<Backend>> for Backends {
    fn from(v: Vec<Backend>) -> Self {
        Self(Arc::new(v))
    }
}

impl FromIterator<Backend> for Backends {
    fn from_iter<I: IntoIterator<Item = Backend>>(iter: I) -> Self {
        Self(Arc::new(iter.into_iter().collect()))
    }
}

impl<'a> IntoIterator for &'a Backends {
    type Item = &'a Backend;
    type IntoIter = std::slice::Iter<'a, Backend>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl serde::Serialize for Backends {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Backends {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::deserialize(d).map(Self::from)
    }
}

/// What a source knows about one service: its backends and how to use them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceSpec {
    pub name: ServiceName,
    pub lb: LbPolicy,
    /// Client port -> named port. A connect to the magic address on a mapped port goes to each
    /// backend's number for that name; any other port goes to the backend's default port.
    pub client_ports: BTreeMap<u16, PortName>,
    pub backends: Backends,
    /// Active health check of each backend, if the service asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Passive health from the hook's failure reports; `None` means [`Outlier::default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Boxed, as is `slow_start`: rarely set, and the spec travels in enums (source events).
    pub outlier: Option<Box<Outlier>>,
    /// Weight ramp for new and recovered backends; `None` means no ramp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<Box<SlowStart>>,
    /// Connection prefetching: the daemon keeps established connections to the backends and
    /// hands one to a hooked connect; `None` means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<Prefetch>,
    /// `on_remove = "reset"`: this host's established connections to a backend that leaves the
    /// service's candidates (removed, drained, unhealthy, ejected) are reset.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset_on_remove: bool,
}

/// Connection prefetching for one service: up to `pool` established connections per backend
/// (and socket family asked for), none kept longer than `max_idle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Prefetch {
    pub pool: u16,
    pub max_idle: Duration,
}

impl Prefetch {
    /// Largest pool per backend: each pooled connection is a descriptor of the daemon's and a
    /// connection the backend holds open.
    pub const MAX_POOL: u16 = 256;
    /// Bounds on `max_idle`: below, connections churn for nothing; above, servers that close
    /// silent clients (nginx after 60 s, MySQL after 10 s) would close them in clients' hands.
    pub const MIN_IDLE: Duration = Duration::from_millis(100);
    pub const MAX_IDLE: Duration = Duration::from_secs(60);
}

impl Default for Prefetch {
    fn default() -> Self {
        Self {
            pool: 4,
            max_idle: Duration::from_secs(5),
        }
    }
}

/// An active health check's settings (a zone file's `health`, a registration's `check`); run by
/// `health`.
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

/// Outlier detection (Envoy's, for connects): eject a backend after `consecutive_failures`
/// failures reported by hooks with no success between, for `base_ejection` x times ejected
/// (capped at `max_ejection`), never ejecting more than `max_ejected_percent` of the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Outlier {
    /// 0 turns ejection off (a single failure still holds the backend out briefly).
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Whole percent of the service's backends that may be ejected at once.
    pub max_ejected_percent: u8,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Slow start: a new or recovered backend's weight grows linearly from `floor_percent` of its
/// weight to all of it over `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SlowStart {
    pub window: Duration,
    pub floor_percent: u8,
}

impl Default for SlowStart {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            floor_percent: 10,
        }
    }
}

impl ServiceSpec {
    pub fn new(name: ServiceName) -> Self {
        Self {
            name,
            lb: LbPolicy::default(),
            client_ports: BTreeMap::new(),
            backends: Backends::default(),
            health: None,
            outlier: None,
            slow_start: None,
            prefetch: None,
            reset_on_remove: false,
        }
    }

    /// Every port name this service knows: those mapped from client ports and those any backend declares.
    pub fn port_names(&self) -> impl Iterator<Item = &PortName> {
        let mut names: Vec<&PortName> = self
            .client_ports
            .values()
            .chain(self.backends.iter().flat_map(|b| b.ports().keys()))
            .collect();
        names.sort();
        names.dedup();
        names.into_iter()
    }

    /// The named port a client port maps to, if any.
    pub fn port_name_for(&self, client_port: u16) -> Option<&PortName> {
        self.client_ports.get(&client_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_lowercased_labels() {
        assert_eq!("Web-1".parse::<ServiceName>().unwrap().as_str(), "web-1");
        assert_eq!("".parse::<ServiceName>(), Err(NameError::Empty));
        assert_eq!("-web".parse::<ServiceName>(), Err(NameError::EdgeHyphen));
        assert_eq!("we_b".parse::<ServiceName>(), Err(NameError::BadChar('_')));
        assert_eq!("a.b".parse::<ServiceName>(), Err(NameError::BadChar('.')));
        assert_eq!(
            "x".repeat(64).parse::<ServiceName>(),
            Err(NameError::TooLong)
        );
    }

    #[test]
    fn named_ports_fall_back_to_the_default_port() {
        let mut b = Backend::new("127.0.0.2:8080".parse().unwrap());
        let grpc: PortName = "grpc".parse().unwrap();
        let admin: PortName = "admin".parse().unwrap();
        b.set_port(grpc.clone(), 9090);
        assert_eq!(b.port_for(Some(&grpc)), 9090);
        assert_eq!(b.port_for(Some(&admin)), 8080);
        assert_eq!(b.port_for(None), 8080);
    }

    #[test]
    fn lb_policy_names_round_trip() {
        for name in LbPolicy::NAMES {
            assert_eq!(name.parse::<LbPolicy>().unwrap().as_str(), *name);
        }
        assert!(
            "fastest"
                .parse::<LbPolicy>()
                .unwrap_err()
                .contains("least-conn")
        );
    }

    #[test]
    fn backends_keep_their_written_form_and_compare_by_value() {
        let mut plain = Backend::new("127.0.0.2:80".parse().unwrap());
        let json = serde_json::to_string(&plain).unwrap();
        assert_eq!(
            json,
            r#"{"addr":"127.0.0.2:80","weight":1,"priority":0,"ports":{}}"#
        );
        assert_eq!(serde_json::from_str::<Backend>(&json).unwrap(), plain);

        let mut rich = plain.clone();
        rich.set_port("grpc".parse().unwrap(), 9090);
        rich.set_zone(Some("eu-1".into()));
        let json = serde_json::to_string(&rich).unwrap();
        assert_eq!(
            json,
            r#"{"addr":"127.0.0.2:80","weight":1,"priority":0,"ports":{"grpc":9090},"zone":"eu-1"}"#
        );
        assert_eq!(serde_json::from_str::<Backend>(&json).unwrap(), rich);
        assert_ne!(rich, plain);

        // A zone set and taken away leaves the backend equal to one that never had it.
        plain.set_zone(Some("eu-1".into()));
        plain.set_zone(None);
        assert_eq!(plain, Backend::new("127.0.0.2:80".parse().unwrap()));
        assert_eq!(plain.zone(), None);
        assert!(plain.ports().is_empty());
    }
}
