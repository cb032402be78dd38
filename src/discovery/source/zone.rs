//! Zone files: the TOML files of the file source, parsed into service specs. Every problem is
//! reported with path:line:column and the field, and a file with any problem is rejected whole
//! (the caller keeps serving its previous good content).
//!
//! ```toml
//! [services.web]
//! lb = "round-robin"                         # optional, default weighted-round-robin
//! ports = { 80 = "http", 9090 = "grpc" }     # client port -> named port; others go to the default port
//! backends = ["127.0.0.2:8080", { addr = "127.0.0.3:8081", weight = 2, ports = { grpc = 9091 } }]
//! health = { kind = "http", path = "/healthz", interval = "2s", fall = 3 }   # optional active check
//! outlier = { consecutive_failures = 3, base_ejection = "30s", max_ejection = "300s", max_ejected = 0.5 }
//! slow_start = "30s"                         # or { window = "30s", floor = 0.1 }
//! prefetch = { pool = 4, max_idle = "5s" }   # or true for these defaults; off by default
//! on_remove = "reset"                        # reset this host's connections to a backend that leaves
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;
use toml::{Spanned, Value};

use crate::addr::parse_addr;
use crate::diagnostic::Diagnostic;
use crate::discovery::health::config::{RawCheck, health_check};
use crate::service::{
    Backend, LbPolicy, Outlier, PortName, Prefetch, ServiceName, ServiceSpec, SlowStart,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    #[serde(default)]
    services: BTreeMap<Spanned<String>, Spanned<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    lb: Option<Spanned<String>>,
    #[serde(default)]
    ports: BTreeMap<Spanned<String>, Spanned<String>>,
    backends: Vec<Spanned<Value>>,
    health: Option<Spanned<RawCheck>>,
    outlier: Option<Spanned<RawOutlier>>,
    slow_start: Option<Spanned<Value>>,
    prefetch: Option<Spanned<Value>>,
    on_remove: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<Spanned<i64>>,
    base_ejection: Option<Spanned<String>>,
    max_ejection: Option<Spanned<String>>,
    max_ejected: Option<Spanned<Value>>,
}

/// Parses one zone file's text.
///
/// # Errors
/// Every problem found, each naming path, line, column and field.
pub fn parse(path: &Path, source: &str) -> Result<Vec<ServiceSpec>, Vec<Diagnostic>> {
    let raw: RawZone =
        toml::from_str(source).map_err(|e| vec![Diagnostic::from_toml(path, source, &e)])?;
    let mut problems = Vec::new();
    let mut problem = |span: std::ops::Range<usize>, field: String, message: String| {
        problems.push(Diagnostic::at(path, source, Some(span), field, message));
    };
    let mut services = Vec::new();
    let mut problems_from_config = Vec::new();
    // The first spelling of each name, ignoring case (one pass: a zone may hold thousands).
    let mut first: HashMap<String, &Spanned<String>> = HashMap::new();
    for name in raw.services.keys() {
        first
            .entry(name.get_ref().to_ascii_lowercase())
            .and_modify(|f| {
                if name.span().start < f.span().start {
                    *f = name;
                }
            })
            .or_insert(name);
    }
    for (name, svc) in &raw.services {
        let field = format!("services.{}", name.get_ref());
        let Ok(svc_name) = name.get_ref().parse::<ServiceName>().map_err(|e| {
            problem(
                name.span(),
                field.clone(),
                format!("invalid service name {:?}: {e}", name.get_ref()),
            );
        }) else {
            continue;
        };
        if let Some(prev) = first.get(&name.get_ref().to_ascii_lowercase())
            && prev.span().start < name.span().start
        {
            problem(
                name.span(),
                field.clone(),
                format!(
                    "service names are case-insensitive and {:?} is already defined",
                    prev.get_ref()
                ),
            );
            continue;
        }
        let svc = svc.get_ref();
        let mut spec = ServiceSpec::new(svc_name);
        if let Some(lb) = &svc.lb {
            match lb.get_ref().parse::<LbPolicy>() {
                Ok(lb) => spec.lb = lb,
                Err(e) => problem(lb.span(), format!("{field}.lb"), e),
            }
        }
        for (port, port_name) in &svc.ports {
            let at = format!("{field}.ports.{}", port.get_ref());
            let number = port.get_ref().parse::<u16>().ok().filter(|p| *p != 0);
            let pname = port_name.get_ref().parse::<PortName>();
            match (number, pname) {
                (Some(n), Ok(pn)) => {
                    spec.client_ports.insert(n, pn);
                }
                (None, _) => problem(
                    port.span(),
                    at,
                    format!("{:?} is not a port number (1-65535)", port.get_ref()),
                ),
                (_, Err(e)) => problem(
                    port_name.span(),
                    at,
                    format!("invalid port name {:?}: {e}", port_name.get_ref()),
                ),
            }
        }
        if let Some(h) = &svc.health {
            match health_check(path, source, h) {
                Ok(check) => spec.health = Some(check),
                Err(errs) => {
                    for mut e in errs {
                        e.field =
                            format!("{field}.health.{}", e.field.trim_start_matches("check."));
                        problems_from_config.push(e);
                    }
                }
            }
        }
        if let Some(o) = &svc.outlier {
            spec.outlier = outlier(o.get_ref(), &field, &mut problem).map(Box::new);
        }
        if let Some(v) = &svc.slow_start {
            match slow_start(v.get_ref()) {
                Ok(s) => spec.slow_start = Some(Box::new(s)),
                Err(e) => problem(v.span(), format!("{field}.slow_start"), e),
            }
        }
        if let Some(v) = &svc.on_remove {
            match v.get_ref().as_str() {
                "reset" => spec.reset_on_remove = true,
                "keep" => {}
                other => problem(
                    v.span(),
                    format!("{field}.on_remove"),
                    format!("unknown value {other:?}, expected \"keep\" or \"reset\""),
                ),
            }
        }
        if let Some(v) = &svc.prefetch {
            match prefetch(v.get_ref()) {
                Ok(p) => spec.prefetch = p,
                Err(e) => problem(v.span(), format!("{field}.prefetch"), e),
            }
        }
        for (i, b) in svc.backends.iter().enumerate() {
            let at = format!("{field}.backends[{i}]");
            match backend(b.get_ref()) {
                Ok(backend) => {
                    if spec.backends.iter().any(|o| o.addr == backend.addr) {
                        problem(
                            b.span(),
                            at,
                            format!("backend {} is listed twice", backend.addr),
                        );
                    } else {
                        spec.backends.push(backend);
                    }
                }
                Err((key, e)) => problem(
                    b.span(),
                    if key.is_empty() {
                        at
                    } else {
                        format!("{at}.{key}")
                    },
                    e,
                ),
            }
        }
        services.push(spec);
    }
    problems.append(&mut problems_from_config);
    problems.sort_by_key(|d| (d.line, d.column));
    if problems.is_empty() {
        Ok(services)
    } else {
        Err(problems)
    }
}

/// `outlier = { consecutive_failures, base_ejection, max_ejection, max_ejected }`; missing keys
/// keep [`Outlier::default`]. `None` after reporting a problem.
fn outlier(
    raw: &RawOutlier,
    field: &str,
    problem: &mut impl FnMut(std::ops::Range<usize>, String, String),
) -> Option<Outlier> {
    let mut o = Outlier::default();
    let before = o;
    let mut ok = true;
    if let Some(n) = &raw.consecutive_failures {
        match u32::try_from(*n.get_ref()).ok().filter(|n| *n <= 1000) {
            Some(n) => o.consecutive_failures = n,
            None => {
                ok = false;
                problem(
                    n.span(),
                    format!("{field}.outlier.consecutive_failures"),
                    "must be a whole number from 0 (off) to 1000".into(),
                );
            }
        }
    }
    for (key, raw, slot) in [
        ("base_ejection", &raw.base_ejection, &mut o.base_ejection),
        ("max_ejection", &raw.max_ejection, &mut o.max_ejection),
    ] {
        if let Some(d) = raw {
            match crate::duration::parse(d.get_ref()) {
                Ok(v) if !v.is_zero() => *slot = v,
                Ok(_) => {
                    ok = false;
                    problem(
                        d.span(),
                        format!("{field}.outlier.{key}"),
                        "must be longer than 0s".into(),
                    );
                }
                Err(e) => {
                    ok = false;
                    problem(d.span(), format!("{field}.outlier.{key}"), e);
                }
            }
        }
    }
    if let Some(m) = &raw.max_ejected {
        match m
            .get_ref()
            .as_float()
            .or_else(|| m.get_ref().as_integer().map(|i| i as f64))
            .filter(|f| (0.0..=1.0).contains(f))
        {
            Some(f) => o.max_ejected_percent = (f * 100.0).round() as u8,
            None => {
                ok = false;
                problem(
                    m.span(),
                    format!("{field}.outlier.max_ejected"),
                    "must be a share from 0.0 to 1.0, e.g. 0.5".into(),
                );
            }
        }
    }
    if o.max_ejection < o.base_ejection && ok {
        ok = false;
        problem(
            raw.max_ejection.as_ref().map_or(0..0, Spanned::span),
            format!("{field}.outlier.max_ejection"),
            "must not be shorter than base_ejection".into(),
        );
    }
    // An explicit table equal to the defaults is stored as "defaults" so specs compare equal.
    (ok && o != before).then_some(o)
}

/// `slow_start = "30s"` or `{ window = "30s", floor = 0.1 }`.
fn slow_start(v: &Value) -> Result<SlowStart, String> {
    let window = |s: &str| -> Result<std::time::Duration, String> {
        let d = crate::duration::parse(s)?;
        if d.is_zero() {
            Err("the window must be longer than 0s".into())
        } else {
            Ok(d)
        }
    };
    match v {
        Value::String(s) => Ok(SlowStart {
            window: window(s)?,
            ..SlowStart::default()
        }),
        Value::Table(t) => {
            let mut out = SlowStart::default();
            for (key, value) in t {
                match key.as_str() {
                    "window" => {
                        out.window = window(
                            value
                                .as_str()
                                .ok_or("window must be a duration such as \"30s\"")?,
                        )?
                    }
                    "floor" => {
                        let f = value
                            .as_float()
                            .filter(|f| (0.0..=1.0).contains(f))
                            .ok_or("floor must be a share from 0.0 to 1.0, e.g. 0.1")?;
                        out.floor_percent = (f * 100.0).round() as u8;
                    }
                    _ => return Err(format!("unknown key {key:?}, expected window or floor")),
                }
            }
            Ok(out)
        }
        _ => Err(
            "slow_start is a duration such as \"30s\" or { window = \"30s\", floor = 0.1 }".into(),
        ),
    }
}

/// `prefetch = true`, `false`, or `{ pool = 4, max_idle = "5s" }`.
fn prefetch(v: &Value) -> Result<Option<Prefetch>, String> {
    let t = match v {
        Value::Boolean(on) => return Ok(on.then(Prefetch::default)),
        Value::Table(t) => t,
        _ => return Err("prefetch is true, false or { pool = 4, max_idle = \"5s\" }".into()),
    };
    let mut out = Prefetch::default();
    for (key, value) in t {
        match key.as_str() {
            "pool" => {
                out.pool = value
                    .as_integer()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| (1..=Prefetch::MAX_POOL).contains(n))
                    .ok_or(format!(
                        "pool must be a number of connections from 1 to {}",
                        Prefetch::MAX_POOL
                    ))?;
            }
            "max_idle" => {
                let d = value
                    .as_str()
                    .ok_or_else(|| "max_idle must be a duration such as \"5s\"".to_string())
                    .and_then(crate::duration::parse)?;
                if !(Prefetch::MIN_IDLE..=Prefetch::MAX_IDLE).contains(&d) {
                    return Err("max_idle must be from 100ms to 60s".into());
                }
                out.max_idle = d;
            }
            _ => return Err(format!("unknown key {key:?}, expected pool or max_idle")),
        }
    }
    Ok(Some(out))
}

/// One backend: `"ip:port"` or `{ addr, weight, priority, ports }`. Errors name the offending key.
fn backend(v: &Value) -> Result<Backend, (&'static str, String)> {
    let addr = |s: &str| {
        let a = parse_addr(s, 0).map_err(|e| ("addr", e))?;
        if a.port() == 0 {
            return Err((
                "addr",
                format!("{s:?} needs a port, e.g. \"{}:8080\"", a.ip()),
            ));
        }
        Ok(a)
    };
    match v {
        Value::String(s) => Ok(Backend::new(addr(s)?)),
        Value::Table(t) => {
            let mut b = Backend::new(addr(t.get("addr").and_then(Value::as_str).ok_or((
                "addr",
                "a backend table needs addr = \"ip:port\"".to_string(),
            ))?)?);
            for (key, value) in t {
                match key.as_str() {
                    "addr" => {}
                    "weight" => {
                        b.weight = int(value, 1, 10_000)
                            .ok_or(("weight", "must be a whole number from 1 to 10000".into()))?
                    }
                    "zone" => {
                        let z = value
                            .as_str()
                            .ok_or(("zone", "must be a string such as \"a\"".to_string()))?;
                        z.parse::<PortName>()
                            .map_err(|e| ("zone", format!("invalid zone {z:?}: {e}")))?;
                        b.set_zone(Some(z.to_ascii_lowercase()));
                    }
                    "priority" => {
                        b.priority = int(value, 0, 65_535)
                            .ok_or(("priority", "must be a whole number from 0 to 65535".into()))?
                    }
                    "ports" => {
                        let Some(ports) = value.as_table() else {
                            return Err(("ports", "must be a table of name = port".into()));
                        };
                        for (name, port) in ports {
                            let name = name.parse::<PortName>().map_err(|e| {
                                ("ports", format!("invalid port name {name:?}: {e}"))
                            })?;
                            let port = int(port, 1, 65_535).ok_or((
                                "ports",
                                format!("{name} must be a port number (1-65535)"),
                            ))?;
                            b.set_port(name, port);
                        }
                    }
                    _ => {
                        return Err((
                            "",
                            format!(
                                "unknown key {key:?}, expected addr, weight, priority, ports or zone"
                            ),
                        ));
                    }
                }
            }
            Ok(b)
        }
        _ => Err((
            "",
            "a backend is \"ip:port\" or { addr = \"ip:port\", weight = N }".into(),
        )),
    }
}

fn int(v: &Value, min: i64, max: i64) -> Option<u16> {
    v.as_integer()
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| u16::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(src: &str) -> Vec<ServiceSpec> {
        parse(Path::new("zones/a.toml"), src).unwrap()
    }

    fn errs(src: &str) -> Vec<String> {
        parse(Path::new("zones/a.toml"), src)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_documented_example_parses() {
        let s = ok(r#"
[services.Web]
lb = "round-robin"
ports = { 80 = "http", 9090 = "grpc" }
backends = ["127.0.0.2:8080", { addr = "127.0.0.3:8081", weight = 2, ports = { grpc = 9091 } }]
[services.api]
backends = ["[::1]:9000"]
"#);
        assert_eq!(s.len(), 2);
        let web = s.iter().find(|s| s.name.as_str() == "web").unwrap();
        assert_eq!(web.lb, LbPolicy::RoundRobin);
        assert_eq!(web.backends.len(), 2);
        assert_eq!(web.backends[1].weight, 2);
        let grpc: PortName = "grpc".parse().unwrap();
        assert_eq!(web.backends[1].port_for(web.port_name_for(9090)), 9091);
        assert_eq!(web.backends[0].port_for(web.port_name_for(9090)), 8080);
        assert_eq!(web.port_name_for(9090), Some(&grpc));
        assert_eq!(web.backends[0].port_for(web.port_name_for(22)), 8080);
    }

    #[test]
    fn problems_name_line_column_and_field() {
        let e = errs(
            "[services.web]\nbackends = [\"127.0.0.2:8080\", \"127.0.0.3\", { addr = \"127.0.0.4:1\", wieght = 2 }]\n[services.bad_name]\nbackends = []\n",
        );
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(
            e.iter().any(|e| e.starts_with(
                "zones/a.toml:2:31: services.web.backends[1].addr: \"127.0.0.3\" needs a port"
            )),
            "{e:#?}"
        );
        assert!(
            e.iter().any(|e| e.starts_with(
                "zones/a.toml:2:44: services.web.backends[2]: unknown key \"wieght\""
            )),
            "{e:#?}"
        );
        assert!(
            e.iter().any(
                |e| e.starts_with("zones/a.toml:3:11: services.bad_name: invalid service name")
            ),
            "{e:#?}"
        );
    }

    #[test]
    fn syntax_errors_and_unknown_keys_are_located() {
        let e = errs("[services.web]\nbackends = [\"127.0.0.2:80\"\n");
        assert!(e[0].starts_with("zones/a.toml:2:"), "{e:?}");
        let e = errs("[services.web]\nbackends = []\nbalance = \"x\"\n");
        assert!(
            e[0].starts_with("zones/a.toml:3:1: unknown field `balance`"),
            "{e:?}"
        );
        let e = errs("[services.web]\nlb = \"fastest\"\nbackends = []\n");
        assert!(
            e[0].starts_with("zones/a.toml:2:6: services.web.lb: unknown lb \"fastest\""),
            "{e:?}"
        );
    }

    #[test]
    fn prefetch_parses_with_defaults_and_bad_values_are_located() {
        let s = ok(
            "[services.web]\nbackends = []\nprefetch = { pool = 16, max_idle = \"2s\" }\n[services.api]\nbackends = []\nprefetch = true\n[services.db]\nbackends = []\nprefetch = false\n",
        );
        let by = |n: &str| s.iter().find(|s| s.name.as_str() == n).unwrap().prefetch;
        assert_eq!(
            by("web"),
            Some(Prefetch {
                pool: 16,
                max_idle: std::time::Duration::from_secs(2)
            })
        );
        assert_eq!(by("api"), Some(Prefetch::default()));
        assert_eq!(by("db"), None);
        for (bad, why) in [
            (
                "{ pool = 0 }",
                "pool must be a number of connections from 1 to 256",
            ),
            ("{ pool = 1000 }", "pool must be"),
            (
                "{ max_idle = \"10m\" }",
                "max_idle must be from 100ms to 60s",
            ),
            ("{ max_idle = 5 }", "max_idle must be a duration"),
            ("{ size = 4 }", "unknown key \"size\""),
            ("\"yes\"", "prefetch is true, false or"),
        ] {
            let e = errs(&format!(
                "[services.web]\nbackends = []\nprefetch = {bad}\n"
            ));
            assert!(
                e[0].starts_with("zones/a.toml:3:12: services.web.prefetch: ")
                    && e[0].contains(why),
                "{bad}: {e:#?}"
            );
        }
    }

    #[test]
    fn outlier_and_slow_start_parse_and_bad_values_are_located() {
        let s = ok(
            "[services.web]\nbackends = [\"127.0.0.2:80\"]\noutlier = { consecutive_failures = 2, base_ejection = \"1s\", max_ejected = 1 }\nslow_start = { window = \"10s\", floor = 0.25 }\n",
        );
        let o = *s[0].outlier.clone().unwrap();
        assert_eq!(
            (
                o.consecutive_failures,
                o.base_ejection,
                o.max_ejection,
                o.max_ejected_percent
            ),
            (
                2,
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(300),
                100
            )
        );
        assert_eq!(
            s[0].slow_start.as_deref(),
            Some(&SlowStart {
                window: std::time::Duration::from_secs(10),
                floor_percent: 25
            })
        );
        let s = ok(
            "[services.web]\nbackends = []\nslow_start = \"30s\"\noutlier = { consecutive_failures = 3 }\n",
        );
        assert_eq!(s[0].slow_start.as_deref(), Some(&SlowStart::default()));
        assert_eq!(s[0].outlier, None, "an explicit default is the default");
        let e = errs(
            "[services.web]\nbackends = []\noutlier = { consecutive_failures = -1, base_ejection = \"soon\", max_ejected = 2.0 }\nslow_start = 5\n",
        );
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(
            e[0].starts_with(
                "zones/a.toml:3:36: services.web.outlier.consecutive_failures: must be"
            ),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|e| e.contains("services.web.outlier.base_ejection:")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|e| e.contains("services.web.outlier.max_ejected: must be a share")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("zones/a.toml:4:14: services.web.slow_start:")),
            "{e:#?}"
        );
        let s = ok("[services.web]\nbackends = [{ addr = \"127.0.0.2:80\", zone = \"EU-1\" }]\n");
        assert_eq!(s[0].backends[0].zone(), Some("eu-1"));
        let e = errs("[services.web]\nbackends = [{ addr = \"127.0.0.2:80\", zone = \"a b\" }]\n");
        assert!(
            e[0].starts_with("zones/a.toml:2:13: services.web.backends[0].zone: invalid zone"),
            "{e:?}"
        );
        let e = errs("[services.web]\nbackends = []\noutlier = { consecutive = 3 }\n");
        assert!(e[0].starts_with("zones/a.toml:3:"), "{e:?}");
    }

    #[test]
    fn duplicates_are_rejected() {
        let e = errs(
            "[services.web]\nbackends = [\"127.0.0.2:80\", \"127.0.0.2:80\"]\n[services.WEB]\nbackends = []\n",
        );
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(e.iter().any(|e| e.contains("listed twice")));
        assert!(e.iter().any(|e| e.contains("case-insensitive")));
    }
}
