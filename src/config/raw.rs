//! The config file exactly as written: serde shapes with spans, unknown keys rejected.
//! Validation into [`super::Config`] happens in `mod.rs`; nothing here has defaults or meaning.

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub dns: RawDns,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub hook: RawHook,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default, rename = "source")]
    pub sources: Vec<S<RawSource>>,
    #[serde(default)]
    pub guard: RawGuard,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub balance: RawBalance,
    #[serde(default)]
    pub catch: RawCatch,
    #[serde(default, rename = "register")]
    pub registrations: Vec<S<RawRegister>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub panic_threshold: Option<S<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCatch {
    pub mode: Option<S<String>>,
    pub cgroup: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBalance {
    pub zone: Option<S<String>>,
    pub local_min_share: Option<S<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuard {
    pub max_drop: Option<S<f64>>,
    pub hold_down: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegister {
    pub service: S<String>,
    pub addr: S<String>,
    pub hosts: Vec<S<String>>,
    pub path: S<String>,
    pub format: Option<S<String>>,
    pub session_timeout: Option<S<String>>,
    pub auth: Option<S<String>>,
    pub ports: Option<std::collections::BTreeMap<String, S<i64>>>,
    pub check: Option<S<RawCheck>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    pub kind: S<String>,
    pub path: Option<S<String>>,
    pub expect: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub jitter: Option<S<String>>,
    pub rise: Option<S<i64>>,
    pub fall: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub listen: Option<Vec<S<String>>>,
    pub domains: Option<Vec<S<String>>>,
    pub magic_v4: Option<S<String>>,
    pub magic_v6: Option<S<String>>,
    pub upstreams: Option<Vec<S<String>>>,
    #[serde(default)]
    pub forward: Vec<S<RawForward>>,
    pub allow: Option<Vec<S<String>>>,
    pub ttl: Option<S<i64>>,
    pub srv_ttl: Option<S<i64>>,
    pub negative_ttl: Option<S<i64>>,
    pub timeout: Option<S<String>>,
    pub cache_size: Option<S<i64>>,
    pub stale_max: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForward {
    pub zone: S<String>,
    pub upstreams: Vec<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<S<String>>,
    pub quarantine: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<Vec<S<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub socket: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHook {
    pub socket: Option<S<String>>,
}

/// One `[[source]]`. Every kind's keys live here; `mod.rs` checks that each kind gets only its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub kind: S<String>,
    pub name: Option<S<String>>,
    /// file
    pub path: Option<S<String>>,
    /// zookeeper
    pub hosts: Option<Vec<S<String>>>,
    pub root: Option<S<String>>,
    pub session_timeout: Option<S<String>>,
    pub auth: Option<S<String>>,
    pub format: Option<S<String>>,
    /// dns-srv
    pub resolvers: Option<Vec<S<String>>>,
    pub services: Option<std::collections::BTreeMap<String, S<String>>>,
    pub min_ttl: Option<S<String>>,
    pub max_ttl: Option<S<String>>,
}
