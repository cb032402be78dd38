//! One `[[source]]` table exactly as written: serde shapes with spans, unknown keys rejected.
//! Every kind's keys live here, so that `config.rs` can say which ones a kind does not take;
//! what they mean is read by each kind's own `config.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// One `[[source]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub kind: Spanned<String>,
    pub name: Option<Spanned<String>>,
    /// file
    pub path: Option<Spanned<String>>,
    /// zookeeper
    pub hosts: Option<Vec<Spanned<String>>>,
    pub root: Option<Spanned<String>>,
    pub session_timeout: Option<Spanned<String>>,
    pub auth: Option<Spanned<String>>,
    pub format: Option<Spanned<String>>,
    /// dns-srv
    pub resolvers: Option<Vec<Spanned<String>>>,
    pub services: Option<BTreeMap<String, Spanned<String>>>,
    pub min_ttl: Option<Spanned<String>>,
    pub max_ttl: Option<Spanned<String>>,
}
