//! The HTTP listener: `/metrics` (Prometheus text format), `/` (the status page: services,
//! backends, sources, held updates and recent events at a glance) and `/status.json`.
//! HTTP/1.1 from hyper (request parsing and validation, keep-alive, HEAD); GET and HEAD only, and
//! only for `Host` values this host answers to (no DNS rebinding).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::discovery::registry::{RegistryHandle, RegistryStatus};
use crate::discovery::snapshot::SharedSnapshot;
use crate::metrics::METRICS;

/// Largest request head read (hyper's smallest buffer).
const MAX_REQUEST: usize = 8192;
/// A client that has not sent a whole request head within this is disconnected.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct HttpContext {
    pub snapshot: SharedSnapshot,
    pub registry: RegistryHandle,
    pub started: std::time::Instant,
}

/// Serves HTTP on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, cx: HttpContext, shutdown: CancellationToken) {
    crate::ops::listen::serve(listener, "http", shutdown, move |stream| {
        let cx = cx.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let cx = cx.clone();
                async move { Ok::<_, Infallible>(answer(&cx, &req).await) }
            });
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST)
                .serve_connection(TokioIo::new(stream), service)
                .await
                .map_err(std::io::Error::other)
        }
    })
    .await;
}

async fn answer(cx: &HttpContext, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(host) = host
        && !host_allowed(host, local_hostname())
    {
        return respond(
            StatusCode::MISDIRECTED_REQUEST,
            "text/plain",
            "this server answers to its addresses, localhost and its host name only\n".into(),
        );
    }
    let path = req.uri().path();
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            METRICS.encode(),
        ),
        "/" | "/status.json" => {
            let Some(status) = cx.registry.status().await else {
                return respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "the registry is not answering\n".into(),
                );
            };
            if path == "/" {
                respond(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    page(cx, &status),
                )
            } else {
                let body = serde_json::to_string_pretty(&status).unwrap_or_default();
                respond(StatusCode::OK, "application/json", body)
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /metrics or /status.json\n".into(),
        ),
    }
}

fn respond(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A `Host` the status page and metrics may be read under: an address literal, `localhost`
/// (and names under it) or this host's own name (and names under it). A web page elsewhere
/// that points a name of its own at this host (DNS rebinding) gets 421, not the page.
fn host_allowed(host: &str, hostname: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let under =
        |base: &str| !base.is_empty() && (name == base || name.ends_with(&format!(".{base}")));
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || under("localhost")
        || under(&hostname.trim_end_matches('.').to_ascii_lowercase())
        || hostname
            .to_ascii_lowercase()
            .split_once('.')
            .is_some_and(|(short, _)| name == short)
}

/// This host's name, read once.
fn local_hostname() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ago(now: u64, t: Option<u64>) -> String {
    t.map_or("never".into(), |t| {
        format!("{}s ago", now.saturating_sub(t))
    })
}

/// The status page: plain HTML that refreshes itself, readable without JavaScript.
fn page(cx: &HttpContext, st: &RegistryStatus) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let snap = cx.snapshot.load();
    let degraded = !st.held.is_empty() || st.sources.iter().any(|s| s.state == "failed");
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        r#"<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5"><title>discotech</title><style>
body{{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}} h1{{font-size:20px;margin:0 0 .2em}} h2{{font-size:16px;margin:1.4em 0 .4em}}
table{{border-collapse:collapse;margin-bottom:.5em}} th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}} th{{background:#eef}}
.ok{{background:#dfd}} .bad{{background:#fdd}} .warn{{background:#ffd}} .muted{{color:#777}} code{{font-size:13px}}
</style></head><body><h1>discotech {version}</h1><div class="muted">up {up}s &middot; generation {gen} &middot; {services} services &middot; <span class="{cls}">{state}</span> &middot; <a href="/metrics">metrics</a> &middot; <a href="/status.json">json</a></div>"#,
        version = env!("CARGO_PKG_VERSION"),
        up = cx.started.elapsed().as_secs(),
        gen = st.generation,
        services = st.services,
        cls = if degraded { "warn" } else { "ok" },
        state = if degraded { "degraded" } else { "healthy" },
    );
    h += "<h2>Sources</h2><table><tr><th>source</th><th>state</th><th>services</th><th>last update</th><th>last failure</th><th>error</th></tr>";
    for s in &st.sources {
        let cls = match s.state.as_str() {
            "ok" => "ok",
            "failed" => "bad",
            _ => "warn",
        };
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td class="{cls}">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&s.name),
            esc(&s.state),
            s.services,
            ago(now, s.last_update),
            ago(now, s.last_failure),
            esc(s.error.as_deref().unwrap_or("")),
        );
    }
    h += "</table>";
    if !st.held.is_empty() {
        h += "<h2>Held updates</h2><table><tr><th>service</th><th>why</th><th>held for</th><th>applies in</th><th>kept backends</th></tr>";
        for x in &st.held {
            let kept: Vec<String> = x.kept.iter().map(ToString::to_string).collect();
            let _ = write!(
                h,
                r#"<tr class="warn"><td>{}</td><td>{}</td><td>{}s</td><td>{}</td><td><code>{}</code></td></tr>"#,
                x.service,
                esc(&x.reason),
                x.age,
                x.applies_in.map_or("never".into(), |s| format!("{s}s")),
                kept.join(" ")
            );
        }
        h += "</table>";
    }
    h += "<h2>Services</h2><table><tr><th>service</th><th>magic address</th><th>lb</th><th>backends</th></tr>";
    for s in snap.services() {
        let drained = st.drained.get(s.name());
        let sick = st.unhealthy.get(s.name());
        let mut rows = String::new();
        if st.panicking.contains(s.name()) {
            rows += r#"<div class="bad">panic mode: too few healthy, balancing over all</div>"#;
        }
        for b in &s.spec.backends {
            let bad = sick.and_then(|m| m.get(&b.addr));
            let _ = write!(
                rows,
                r#"<div class="{}"><code>{}</code> w{} p{}{}</div>"#,
                if bad.is_some() { "bad" } else { "ok" },
                b.addr,
                b.weight,
                b.priority,
                bad.map_or(String::new(), |w| format!(" unhealthy: {}", esc(w)))
            );
        }
        for (a, why) in sick
            .into_iter()
            .flatten()
            .filter(|(a, _)| !s.spec.backends.iter().any(|b| b.addr == **a))
        {
            let _ = write!(
                rows,
                r#"<div class="bad"><code>{a}</code> unhealthy: {}</div>"#,
                esc(why)
            );
        }
        for a in drained.into_iter().flatten() {
            let _ = write!(rows, r#"<div class="muted"><code>{a}</code> drained</div>"#);
        }
        if rows.is_empty() {
            rows = r#"<span class="bad">no backends</span>"#.into();
        }
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>",
            s.name(),
            s.magic_v4,
            s.magic_v6
                .map_or(String::new(), |v6| format!("<br><code>{v6}</code>")),
            s.spec.lb.as_str(),
            rows
        );
    }
    h += "</table><h2>Recent events</h2><table><tr><th>when</th><th>what</th></tr>";
    for e in st.events.iter().rev() {
        let _ = write!(
            h,
            "<tr><td>{}s ago</td><td>{}</td></tr>",
            now.saturating_sub(e.at),
            esc(&e.message)
        );
    }
    h += "</table></body></html>\n";
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_addresses_localhost_or_this_hosts_name() {
        for ok in [
            "127.0.0.1:9253",
            "10.0.0.5",
            "[::1]:9253",
            "localhost:9253",
            "LOCALHOST",
            "node7",
            "node7.example.com:9253",
            "node7.example.com.",
        ] {
            assert!(host_allowed(ok, "node7.example.com"), "{ok}");
        }
        for bad in [
            "evil.example:9253",
            "attacker.test",
            "node7.example.com.evil.test",
            "notlocalhost",
            "[evil]:80",
        ] {
            assert!(!host_allowed(bad, "node7.example.com"), "{bad}");
        }
    }
}
