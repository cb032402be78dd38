//! Active health checks (`health = { kind = ... }` in zone files, `check` in registrations).

use super::*;
pub use crate::discovery::health::{CheckKind, HealthCheck};

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

/// `"200-399"` or `"204"`.
pub(super) fn parse_status_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a status range; write e.g. \"200-399\" or \"204\"");
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if !(100..=599).contains(&lo) || hi < lo || hi > 599 {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// `ip:port`, `[v6]:port`, or a bare address with `default_port`.
/// An HTTP request target for a health check: an absolute path of visible ASCII (no spaces,
/// CR or LF, which would let the config write a request of its own).
pub(super) fn check_http_path(p: &str) -> Result<String, String> {
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

impl Validator<'_> {
    pub(super) fn health_check(&mut self, c: &S<RawCheck>) -> Option<HealthCheck> {
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
}
