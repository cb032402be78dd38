//! The config file exactly as written: serde shapes with spans, unknown keys rejected.
//! Validation into [`super::Config`] happens in `mod.rs`; nothing here has defaults or meaning.
//! The tables of a `[[source]]` and a `[[register]]` are written beside what they configure.

use serde::Deserialize;
use toml::Spanned;

use crate::discovery::register::config::RawRegister;
use crate::discovery::source::raw::RawSource;

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
