//! The HTTP listener: `/metrics` (Prometheus text format), `/` (the status page: services,
//! backends, sources, held updates and recent events at a glance) and `/status.json`.
//! A deliberately small HTTP/1.1 server: GET only, one request per connection, bounded reads.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::discovery::registry::{RegistryHandle, RegistryStatus};
use crate::discovery::snapshot::SharedSnapshot;
use crate::ops::metrics::METRICS;

const MAX_REQUEST: usize = 8192;
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
        async move { handle(stream, &cx).await }
    })
    .await;
}

async fn handle(mut stream: TcpStream, cx: &HttpContext) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read until the end of the headers, within bounds.
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Ok(Some(()));
            }
            if buf.len() > MAX_REQUEST {
                return Ok(None);
            }
        }
    })
    .await;
    let Ok(Ok(Some(()))) = head else {
        return respond(&mut stream, 400, "text/plain", "bad request\n").await;
    };
    let line = String::from_utf8_lossy(&buf);
    let mut words = line.split_whitespace();
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    if let Some(host) = header(&line, "host")
        && !host_allowed(host, local_hostname())
    {
        return respond(
            &mut stream,
            421,
            "text/plain",
            "this server answers to its addresses, localhost and its host name only\n",
        )
        .await;
    }
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => {
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &METRICS.encode(),
            )
            .await
        }
        "/" | "/status.json" => {
            let Some(status) = cx.registry.status().await else {
                return respond(
                    &mut stream,
                    503,
                    "text/plain",
                    "the registry is not answering\n",
                )
                .await;
            };
            if path == "/" {
                respond(
                    &mut stream,
                    200,
                    "text/html; charset=utf-8",
                    &page(cx, &status),
                )
                .await
            } else {
                let body = serde_json::to_string_pretty(&status).unwrap_or_default();
                respond(&mut stream, 200, "application/json", &body).await
            }
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /, /metrics or /status.json\n",
            )
            .await
        }
    }
}

/// The value of the first header `name` (case-insensitive) in a request head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
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

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        421 => "Misdirected Request",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
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

    #[test]
    fn the_host_header_is_found_in_any_case() {
        let head = "GET / HTTP/1.1\r\nUser-Agent: x\r\nhOsT: a.b:1\r\n\r\n";
        assert_eq!(header(head, "host"), Some("a.b:1"));
        assert_eq!(header("GET / HTTP/1.0\r\n\r\n", "host"), None);
    }
}
