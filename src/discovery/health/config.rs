//! `[health]` and the health-check tables (`check` in a `[[register]]`, `health` in a zone file):
//! the tables as written, checked into a [`HealthCheck`]. Running the checks is `check.rs`'s job.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::diagnostic::{Checker, Diagnostic};
use crate::service::{CheckKind, HealthCheck};

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

/// A health-check table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    pub kind: Spanned<String>,
    pub path: Option<Spanned<String>>,
    pub expect: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub jitter: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
}

/// Validates a health check table of the file `path` holding `source` (a zone file's `health`).
///
/// # Errors
/// Every problem, located in `source`, with fields named `check.*`.
pub fn health_check(
    path: &Path,
    source: &str,
    raw: &Spanned<RawCheck>,
) -> Result<HealthCheck, Vec<Diagnostic>> {
    let mut c = Checker::new(path, source);
    let check = from_raw(&mut c, raw);
    c.finish(check)
}

/// Checks a health check table, reporting each problem into `c` with fields named `check.*`.
pub(crate) fn from_raw(c: &mut Checker, raw: &Spanned<RawCheck>) -> Option<HealthCheck> {
    let r = raw.get_ref();
    let kind = match r.kind.get_ref().as_str() {
        "tcp" => CheckKind::Tcp,
        "http" => {
            let path = match &r.path {
                Some(p) => c.check(p, "check.path", |p| check_http_path(p))?,
                None => "/".to_string(),
            };
            let expect = match &r.expect {
                Some(e) => c.check(e, "check.expect", |e| parse_status_range(e))?,
                None => (200, 399),
            };
            CheckKind::Http { path, expect }
        }
        other => {
            c.problem(
                &r.kind,
                "check.kind",
                format!("unknown check kind {other:?}, expected \"tcp\" or \"http\""),
            );
            return None;
        }
    };
    let count = |v: &Option<Spanned<i64>>, field: &str, c: &mut Checker| match v {
        Some(n) => c.check(n, field, |n| {
            u32::try_from(*n)
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or("must be from 1 to 100")
        }),
        None => Some(2),
    };
    let rise = count(&r.rise, "check.rise", c)?;
    let fall = count(&r.fall, "check.fall", c)?;
    let interval = c.duration(&r.interval, "check.interval", Duration::from_secs(2));
    let timeout = c.duration(&r.timeout, "check.timeout", Duration::from_secs(1));
    if interval.is_zero()
        && let Some(i) = &r.interval
    {
        c.problem(i, "check.interval", "must be above zero");
    }
    Some(HealthCheck {
        kind,
        interval,
        timeout,
        jitter: c.duration(&r.jitter, "check.jitter", interval / 10),
        rise,
        fall,
    })
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
