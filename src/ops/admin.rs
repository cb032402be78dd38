//! The admin socket: one JSON request per line in, one JSON reply per line out. It serves
//! `discotech status`, `services`, `backends`, `resolve`, `drain`, `undrain` and `reload`.
//! The socket is mode 0660, so only root and the socket's group can drive the daemon.
//! The client half (used by the CLI) is here too, so both sides share one definition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::discovery::registry::{RegistryHandle, RegistryStatus};
use crate::discovery::snapshot::SharedSnapshot;
use crate::service::{Backend, LbPolicy, ServiceName};

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;
/// A client that says nothing for this long is dropped.
const IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Services,
    Backends { service: String },
    Resolve { name: String, port: Option<u16> },
    Drain { service: String, addr: SocketAddr },
    Undrain { service: String, addr: SocketAddr },
    Reload,
}

/// Every reply: `{"ok": true, "data": ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    fn data(v: impl Serialize) -> Self {
        match serde_json::to_value(v) {
            Ok(data) => Self {
                ok: true,
                data: Some(data),
                error: None,
            },
            Err(e) => Self::error(format!("cannot encode the reply: {e}")),
        }
    }

    fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(e.into()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub uptime: u64,
    pub config: Option<String>,
    /// Connects of programs that bypass the hook (absent from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch: Option<crate::connect::catch::CatchStatus>,
    #[serde(flatten)]
    pub registry: RegistryStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceRow {
    pub name: ServiceName,
    pub magic_v4: Ipv4Addr,
    pub magic_v6: Option<Ipv6Addr>,
    pub lb: LbPolicy,
    pub backends: usize,
    pub drained: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendRow {
    pub addr: SocketAddr,
    pub weight: u16,
    pub priority: u16,
    pub ports: BTreeMap<String, u16>,
    pub drained: bool,
    /// Why the backend is out of the pick set, when a health check says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
    /// Prefetch services: the daemon's pools of established connections to this backend's
    /// address (one per port and socket family in use).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pooled: Vec<crate::connect::prefetch::PoolStatus>,
}

/// What a connect to a service would get, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Resolution {
    pub service: ServiceName,
    pub magic_v4: Ipv4Addr,
    pub magic_v6: Option<Ipv6Addr>,
    pub lb: LbPolicy,
    pub client_port: Option<u16>,
    /// The named port the client port maps to (`None`: each backend's default port).
    pub port_name: Option<String>,
    /// The backends a connect may reach (best priority tier first), with the port it would use.
    pub candidates: Vec<Candidate>,
    /// Backends left out, with the reason.
    pub excluded: Vec<Excluded>,
    /// Too few backends are healthy: connects go to all of them.
    #[serde(default)]
    pub panic: bool,
    /// Where the next hooked connect (as root) would go and why, if the balancer was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<NextPick>,
}

/// The balancer's dry-run answer for the next connect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NextPick {
    pub target: SocketAddr,
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Candidate {
    pub target: SocketAddr,
    pub weight: u16,
    pub priority: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// This host's established connections to `target`, from the kernel's socket table.
    #[serde(default)]
    pub connections: u32,
    /// Picks not yet reported done (p2c, p2c-ewma).
    #[serde(default)]
    pub outstanding: u32,
    /// The p2c-ewma connect latency estimate, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Excluded {
    pub addr: SocketAddr,
    pub reason: String,
}

/// Asks the daemon to reload its config; the reply says what changed or every problem found.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

/// What the admin server reads and drives.
#[derive(Clone)]
pub struct AdminContext {
    pub snapshot: SharedSnapshot,
    pub registry: RegistryHandle,
    pub reload: mpsc::Sender<ReloadRequest>,
    pub started: Instant,
    pub config: Option<String>,
    /// The hook server's balancer, for "which backend next and why" (dry run).
    pub balance: Option<crate::connect::hook_server::BalanceHandle>,
    /// The catch path, for its state and count.
    pub catch: crate::connect::catch::Catch,
}

/// Serves the admin socket until `shutdown`.
pub async fn serve(listener: UnixListener, cx: AdminContext, shutdown: CancellationToken) {
    crate::ops::listen::serve(listener, "admin", shutdown, move |stream| {
        let cx = cx.clone();
        async move { session(stream, &cx).await }
    })
    .await;
}

async fn session(stream: UnixStream, cx: &AdminContext) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let limit = u64::try_from(MAX_REQUEST).unwrap_or(u64::MAX) + 1;
        let n = match tokio::time::timeout(IDLE, (&mut reader).take(limit).read_line(&mut line))
            .await
        {
            Err(_) => return Ok(()),
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(());
        }
        let too_long = n > MAX_REQUEST;
        let reply = if too_long {
            Reply::error("request too long")
        } else {
            match serde_json::from_str::<Request>(line.trim_end()) {
                Ok(req) => handle(req, cx).await,
                Err(e) => Reply::error(format!("bad request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            return Ok(());
        }
    }
}

async fn handle(req: Request, cx: &AdminContext) -> Reply {
    match req {
        Request::Status => match registry_status(cx).await {
            Some(registry) => Reply::data(Status {
                version: env!("CARGO_PKG_VERSION").into(),
                uptime: cx.started.elapsed().as_secs(),
                config: cx.config.clone(),
                catch: Some(cx.catch.status()),
                registry,
            }),
            None => Reply::error("the registry is not answering"),
        },
        Request::Services => {
            let drained = registry_status(cx)
                .await
                .map(|s| s.drained)
                .unwrap_or_default();
            let snap = cx.snapshot.load();
            let rows: Vec<ServiceRow> = snap
                .services()
                .map(|s| ServiceRow {
                    name: s.name().clone(),
                    magic_v4: s.magic_v4,
                    magic_v6: s.magic_v6,
                    lb: s.spec.lb,
                    backends: s.spec.backends.len(),
                    drained: drained.get(s.name()).map_or(0, BTreeSet::len),
                })
                .collect();
            Reply::data(rows)
        }
        Request::Backends { service } => {
            let name = service_label(&service);
            let status = registry_status(cx).await;
            let snap = cx.snapshot.load();
            let Some(s) = snap.service(&name) else {
                return Reply::error(format!("no service {service}"));
            };
            let gone = status
                .as_ref()
                .and_then(|st| st.drained.get(s.name()).cloned())
                .unwrap_or_default();
            let sick = status
                .as_ref()
                .and_then(|st| st.unhealthy.get(s.name()).cloned())
                .unwrap_or_default();
            let mut rows: Vec<BackendRow> = s
                .spec
                .backends
                .iter()
                .map(|b| row(b, false, sick.get(&b.addr).cloned()))
                .collect();
            // In panic mode unhealthy backends are in the snapshot already; otherwise list them too.
            rows.extend(
                sick.iter()
                    .filter(|(a, _)| !s.spec.backends.iter().any(|b| b.addr == **a))
                    .map(|(a, why)| row(&Backend::new(*a), false, Some(why.clone()))),
            );
            rows.extend(gone.iter().map(|a| row(&Backend::new(*a), true, None)));
            if let Some(balance) = &cx.balance {
                for pool in balance.prefetch().pools_of(s.name()) {
                    if let Some(r) = rows.iter_mut().find(|r| r.addr.ip() == pool.backend.ip()) {
                        r.pooled.push(pool);
                    }
                }
            }
            Reply::data(rows)
        }
        Request::Resolve { name, port } => {
            let status = registry_status(cx).await;
            let drained = status
                .as_ref()
                .map(|s| s.drained.clone())
                .unwrap_or_default();
            let sick = status
                .as_ref()
                .map(|s| s.unhealthy.clone())
                .unwrap_or_default();
            let panicking = status.map(|s| s.panicking).unwrap_or_default();
            // A dump of the socket table can take a while on a busy host: off the runtime.
            let connections =
                match tokio::task::spawn_blocking(crate::connect::conn_count::read).await {
                    Ok((counts, None)) => counts,
                    Ok((counts, Some(error))) => {
                        debug!(%error, "cannot read the socket table; connection counts show 0");
                        counts
                    }
                    Err(_) => HashMap::new(),
                };
            let seen = Seen {
                drained: &drained,
                sick: &sick,
                panicking: &panicking,
                connections: &connections,
            };
            match resolve(cx, &name, port, &seen) {
                Ok(r) => Reply::data(r),
                Err(e) => Reply::error(e),
            }
        }
        Request::Drain { service, addr } | Request::Undrain { service, addr }
            if service_label(&service).parse::<ServiceName>().is_err() =>
        {
            let _ = addr;
            Reply::error(format!("{service:?} is not a service name"))
        }
        Request::Drain { service, addr } => drain(cx, &service, addr, true).await,
        Request::Undrain { service, addr } => drain(cx, &service, addr, false).await,
        Request::Reload => {
            let (tx, rx) = oneshot::channel();
            if cx.reload.send(tx).await.is_err() {
                return Reply::error("the daemon is shutting down");
            }
            match rx.await {
                Ok(Ok(summary)) => Reply::data(summary),
                Ok(Err(problems)) => Reply::error(problems),
                Err(_) => Reply::error("reload was abandoned"),
            }
        }
    }
}

fn row(b: &Backend, drained: bool, unhealthy: Option<String>) -> BackendRow {
    BackendRow {
        addr: b.addr,
        weight: b.weight,
        priority: b.priority,
        ports: b.ports().iter().map(|(n, p)| (n.to_string(), *p)).collect(),
        drained,
        unhealthy,
        pooled: Vec::new(),
    }
}

async fn registry_status(cx: &AdminContext) -> Option<RegistryStatus> {
    cx.registry.status().await
}

async fn drain(cx: &AdminContext, service: &str, addr: SocketAddr, drain: bool) -> Reply {
    let Ok(service) = service_label(service).parse::<ServiceName>() else {
        return Reply::error(format!("{service:?} is not a service name"));
    };
    match cx.registry.drain(service, addr, drain).await {
        Ok(()) => Reply::data(if drain { "drained" } else { "undrained" }),
        Err(e) => Reply::error(e),
    }
}

/// `web`, `web.disco`, `web.disco.` -> `web` (the first label, lowercased).
fn service_label(name: &str) -> String {
    name.split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// What the registry and the kernel said, for [`resolve`].
struct Seen<'a> {
    drained: &'a BTreeMap<ServiceName, BTreeSet<SocketAddr>>,
    sick: &'a BTreeMap<ServiceName, BTreeMap<SocketAddr, String>>,
    panicking: &'a BTreeSet<ServiceName>,
    /// This host's established connections per remote address.
    connections: &'a HashMap<SocketAddr, u32>,
}

/// What a connect to `name` (a service name or a magic address) on `port` would reach.
fn resolve(
    cx: &AdminContext,
    name: &str,
    port: Option<u16>,
    seen: &Seen<'_>,
) -> Result<Resolution, String> {
    let Seen {
        drained,
        sick,
        panicking,
        connections,
    } = *seen;
    let snap = cx.snapshot.load();
    let service = match name.parse::<IpAddr>() {
        Ok(ip) => snap
            .by_addr(ip)
            .ok_or_else(|| format!("{ip} is not a magic address"))?,
        Err(_) => snap
            .service(&service_label(name))
            .ok_or_else(|| format!("no service {name}"))?,
    };
    let spec = &service.spec;
    let port_name = port.and_then(|p| spec.port_name_for(p));
    let mut excluded: Vec<Excluded> = drained
        .get(service.name())
        .into_iter()
        .flatten()
        .map(|a| Excluded {
            addr: *a,
            reason: "drained by an operator".into(),
        })
        .collect();
    let in_panic = panicking.contains(service.name());
    for (addr, why) in sick.get(service.name()).into_iter().flatten() {
        if !in_panic {
            excluded.push(Excluded {
                addr: *addr,
                reason: format!("unhealthy: {why}"),
            });
        }
    }
    let best = spec.backends.iter().map(|b| b.priority).min();
    let now = std::time::Instant::now();
    let mut candidates = Vec::new();
    for b in &spec.backends {
        if Some(b.priority) != best {
            excluded.push(Excluded {
                addr: b.addr,
                reason: format!(
                    "priority {} is a backup tier (best is {})",
                    b.priority,
                    best.unwrap_or(0)
                ),
            });
            continue;
        }
        let target = SocketAddr::new(b.addr.ip(), b.port_for(port_name));
        let (outstanding, latency) = cx
            .balance
            .as_ref()
            .map_or((0, None), |h| h.backend_state(spec, b.addr, now));
        candidates.push(Candidate {
            target,
            weight: b.weight,
            priority: b.priority,
            zone: b.zone().map(str::to_owned),
            connections: connections.get(&target).copied().unwrap_or(0),
            outstanding,
            latency_us: latency.map(|l| l.as_micros().try_into().unwrap_or(u64::MAX)),
        });
    }
    Ok(Resolution {
        service: service.name().clone(),
        magic_v4: service.magic_v4,
        magic_v6: service.magic_v6,
        lb: spec.lb,
        client_port: port,
        port_name: port_name.map(ToString::to_string),
        next: cx
            .balance
            .as_ref()
            .and_then(|b| b.explain(service, port.unwrap_or(0), 0))
            .map(|(target, why)| NextPick { target, why }),
        candidates,
        excluded,
        panic: in_panic,
    })
}

/// Sends one request to the daemon's admin socket and waits for the reply.
///
/// # Errors
/// The socket cannot be reached or the reply is not one.
pub async fn call(socket: &Path, req: &Request) -> std::io::Result<Reply> {
    let stream = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(socket))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut reply = String::new();
    // Reload may take a moment (it re-reads every file); everything else is instant.
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(read).read_line(&mut reply),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"drain","service":"web","addr":"127.0.0.2:80"}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Drain {
                service: "web".into(),
                addr: "127.0.0.2:80".parse().unwrap()
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
    }

    #[test]
    fn service_names_may_be_given_fully_qualified() {
        assert_eq!(service_label("Web.disco."), "web");
        assert_eq!(service_label("web"), "web");
    }
}
