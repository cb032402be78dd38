//! Registration, the other half of a registry (as SmartStack's Nerve does): a `[[register]]`
//! entry announces a local service into ZooKeeper as an ephemeral node while its local health
//! check passes, and withdraws the node when the check fails or the daemon stops. Reading
//! registrations back is the ZooKeeper source's job; the node layouts live in its `formats`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_async::{Acl, CreateMode, Permission, ZkError, ZkState};

use crate::config::{CheckKind, HealthCheck, Registration};
use crate::source::zookeeper::formats::{self, NodeName};
use crate::source::zookeeper::session::{BACKOFF_MAX, BACKOFF_MIN, Session, SessionError, jitter};

/// The longest status line an HTTP check reads before giving up on the answer.
const MAX_STATUS_LINE: usize = 1024;
/// How long shutdown waits for the registration node's delete.
const SHUTDOWN_DELETE: Duration = Duration::from_secs(2);

/// Why one health check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no answer within {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("HTTP request: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an HTTP answer: {0:?}")]
    NotHttp(String),
    #[error("HTTP status {status} is outside {lo}-{hi}")]
    Status { status: u16, lo: u16, hi: u16 },
}

/// Rise/fall hysteresis: a service becomes healthy after `rise` passes in a row and unhealthy
/// after `fall` failures in a row; it starts unhealthy, so nothing is announced before it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    rise: u32,
    fall: u32,
    healthy: bool,
    streak: u32,
}

impl Health {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            healthy: false,
            streak: 0,
        }
    }

    /// Hysteresis that starts healthy: a newly discovered backend gets traffic at once and
    /// leaves the pick set only after `fall` failures.
    pub fn starting_healthy(rise: u32, fall: u32) -> Self {
        Self {
            healthy: true,
            ..Self::new(rise, fall)
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check result; returns the new state when it changes.
    pub fn observe(&mut self, pass: bool) -> Option<bool> {
        if pass == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.healthy = pass;
        self.streak = 0;
        Some(pass)
    }
}

/// Where a check connects: the registered address, with an unspecified IP meaning this host.
fn check_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Runs one check against `addr`, bounded by `timeout`.
///
/// # Errors
/// Why the check failed: connect, timeout, not HTTP, or a status outside the expected range.
pub async fn check(
    kind: &CheckKind,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), CheckError> {
    let target = check_target(addr);
    let work = async {
        let mut stream =
            TcpStream::connect(target)
                .await
                .map_err(|source| CheckError::Connect {
                    addr: target,
                    source,
                })?;
        let CheckKind::Http {
            path,
            expect: (lo, hi),
        } = kind
        else {
            return Ok(());
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: discotech-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < MAX_STATUS_LINE {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let status = parse_status(&buf)?;
        if (*lo..=*hi).contains(&status) {
            Ok(())
        } else {
            Err(CheckError::Status {
                status,
                lo: *lo,
                hi: *hi,
            })
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| CheckError::Timeout(timeout))?
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status(buf: &[u8]) -> Result<u16, CheckError> {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") && (100..=599).contains(&code) => Ok(code),
        _ => Err(CheckError::NotHttp(
            text.trim_end().chars().take(80).collect(),
        )),
    }
}

/// Checks `reg` every interval (with jitter) and announces it in ZooKeeper while healthy, until
/// `shutdown`; then withdraws it.
pub async fn run(reg: Registration, shutdown: CancellationToken) {
    for port in formats::unsupported_ports(reg.format, &reg.ports) {
        warn!(service = %reg.service, port = %port, "the chosen format cannot carry this named port; it is not announced");
    }
    if reg.addr.ip().is_unspecified() {
        warn!(service = %reg.service, addr = %reg.addr, "announcing an unspecified address: readers on other hosts cannot connect to it; set register.addr to this host's address");
    }
    let (healthy_tx, healthy_rx) = watch::channel(false);
    tokio::join!(
        check_loop(&reg, healthy_tx, shutdown.clone()),
        announce(&reg, healthy_rx, shutdown.clone())
    );
}

async fn check_loop(reg: &Registration, healthy: watch::Sender<bool>, shutdown: CancellationToken) {
    let HealthCheck {
        kind,
        interval,
        timeout,
        rise,
        fall,
        ..
    } = &reg.check;
    let mut health = Health::new(*rise, *fall);
    let mut last_error = String::new();
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = check(kind, reg.addr, *timeout) => r,
        };
        match &result {
            Ok(()) => last_error.clear(),
            Err(e) => {
                debug!(service = %reg.service, addr = %reg.addr, error = %e, "health check failed");
                last_error = e.to_string();
            }
        }
        if let Some(now) = health.observe(result.is_ok()) {
            if now {
                info!(service = %reg.service, addr = %reg.addr, "local service is healthy; announcing it");
            } else {
                warn!(service = %reg.service, addr = %reg.addr, error = %last_error, "local service is unhealthy; withdrawing it");
            }
            healthy.send_replace(now);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(spread(*interval)) => {}
        }
    }
}

/// `d` give or take 10%, so the checks of many hosts do not line up.
fn spread(d: Duration) -> Duration {
    jitter(d.mul_f64(0.9))
}

/// The ZooKeeper side: keeps exactly one ephemeral node while `healthy` says so.
#[allow(deprecated)] // ZkState::NotConnected is how the client library reports an expired session.
async fn announce(
    reg: &Registration,
    mut healthy: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let what = format!("register:{}", reg.service);
    let id = instance_id();
    'session: loop {
        let Ok(mut s) = Session::connect(
            &reg.hosts,
            reg.session_timeout,
            reg.auth.clone(),
            &what,
            &shutdown,
        )
        .await
        else {
            return;
        };
        let mut node: Option<String> = None;
        let mut verify = false;
        let mut disconnected = false;
        let mut backoff = BACKOFF_MIN;
        let mut last_error = String::new();
        loop {
            let want = *healthy.borrow_and_update();
            let mut retry = false;
            if !disconnected {
                match reconcile(&s, reg, &id, want, &mut node, verify).await {
                    Ok(()) => {
                        verify = false;
                        backoff = BACKOFF_MIN;
                        last_error.clear();
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if msg != last_error {
                            warn!(service = %reg.service, error = %msg, "cannot update the registration; retrying");
                            last_error = msg;
                        }
                        retry = true;
                    }
                }
            }
            // While registered, look now and then whether the node is still there (a session
            // that expired unnoticed, an operator's delete).
            let pause = if retry {
                jitter(backoff)
            } else {
                spread(reg.check.interval.max(Duration::from_secs(1)))
            };
            if retry {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    if let Some(path) = node.take() {
                        // Bounded well inside the daemon's shutdown grace: with ZooKeeper gone the
                        // session's expiry removes the node anyway.
                        match tokio::time::timeout(SHUTDOWN_DELETE, s.zk.delete(&path, None)).await {
                            Ok(Ok(())) => info!(service = %reg.service, path, "withdrawn at shutdown"),
                            _ => debug!(service = %reg.service, path, "delete at shutdown failed; the session's end removes the node"),
                        }
                    }
                    s.close().await;
                    return;
                }
                changed = healthy.changed() => {
                    if changed.is_err() {
                        // The checker stopped: only at shutdown, handled above next time round.
                        shutdown.cancelled().await;
                    }
                }
                state = s.states.recv() => match state {
                    Some(ZkState::NotConnected) => {
                        warn!(service = %reg.service, "ZooKeeper session expired; the registration will be recreated");
                        node = None;
                        disconnected = true;
                    }
                    Some(ZkState::Connecting) => disconnected = true,
                    Some(ZkState::Connected | ZkState::ConnectedReadOnly) => {
                        if disconnected {
                            disconnected = false;
                            verify = true;
                            if let Err(e) = s.authenticate().await {
                                warn!(service = %reg.service, error = %e, "re-authenticating failed");
                            }
                        }
                    }
                    Some(ZkState::AuthFailed | ZkState::Closed) | None => {
                        warn!(service = %reg.service, state = ?state, "ZooKeeper client gave up; starting a new one");
                        s.close().await;
                        continue 'session;
                    }
                    Some(ZkState::Associating) => {}
                },
                () = tokio::time::sleep(pause) => verify = true,
            }
        }
    }
}

/// Makes ZooKeeper match `want`: creates the node (and missing parents) or deletes it. With
/// `verify`, first checks that a node we believe we hold still exists.
async fn reconcile(
    s: &Session,
    reg: &Registration,
    id: &str,
    want: bool,
    node: &mut Option<String>,
    verify: bool,
) -> Result<(), SessionError> {
    if let (true, Some(path)) = (verify && want, node.as_ref())
        && s.op("exists", path, s.zk.exists(path, false))
            .await?
            .is_none()
    {
        info!(service = %reg.service, path, "the registration node is gone; recreating it");
        *node = None;
    }
    match (want, node.as_ref()) {
        (true, None) => {
            let path = create(s, reg, id).await?;
            info!(service = %reg.service, path, "registered");
            *node = Some(path);
        }
        (false, Some(path)) => {
            match s.op("delete", path, s.zk.delete(path, None)).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(ZkError::NoNode) => {}
                Err(e) => return Err(e),
            }
            info!(service = %reg.service, path, "withdrawn");
            *node = None;
        }
        _ => {}
    }
    Ok(())
}

/// Readers may not hold our credentials: with auth, nodes are world-readable and writable by us.
fn acl(reg: &Registration) -> Vec<Acl> {
    if reg.auth.is_some() {
        vec![
            Acl::new(Permission::READ, "world", "anyone"),
            Acl::new(Permission::ALL, "auth", ""),
        ]
    } else {
        Acl::open_unsafe().clone()
    }
}

/// Creates the instance node, and the service path's missing parents as persistent nodes.
/// A fixed-name node that already exists (our previous session's, not yet expired) is adopted:
/// it goes away with that session, and the periodic check then recreates it.
async fn create(s: &Session, reg: &Registration, id: &str) -> Result<String, SessionError> {
    let mut prefix = String::new();
    for part in reg.path.split('/').filter(|p| !p.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        match s
            .op(
                "create",
                &prefix,
                s.zk.create(&prefix, Vec::new(), acl(reg), CreateMode::Persistent),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some(ZkError::NodeExists) => {}
            Err(e) => return Err(e),
        }
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (NodeName { name, sequential }, data) =
        formats::encode(reg.format, &reg.service, reg.addr, &reg.ports, id, now_ms);
    let base = if reg.path == "/" {
        String::new()
    } else {
        reg.path.clone()
    };
    let path = format!("{base}/{name}");
    let mode = if sequential {
        CreateMode::EphemeralSequential
    } else {
        CreateMode::Ephemeral
    };
    match s
        .op("create", &path, s.zk.create(&path, data, acl(reg), mode))
        .await
    {
        Ok(created) => Ok(created),
        Err(e) if e.code() == Some(ZkError::NodeExists) && !sequential => Ok(path),
        Err(e) => Err(e),
    }
}

/// A random UUID-shaped id, as Curator names its instances.
fn instance_id() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut h = Health::new(2, 3);
        assert!(!h.healthy(), "starts unhealthy");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None, "a failure resets the rise streak");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true));
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None, "a pass resets the fall streak");
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false));
        assert!(!h.healthy());
    }

    #[test]
    fn rise_and_fall_of_one_switch_at_once() {
        let mut h = Health::new(1, 1);
        assert_eq!(h.observe(true), Some(true));
        assert_eq!(h.observe(false), Some(false));
        let mut zero = Health::new(0, 0);
        assert_eq!(zero.observe(true), Some(true), "0 is treated as 1");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n").unwrap(), 204);
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n").unwrap(),
            503
        );
        assert!(matches!(
            parse_status(b"SSH-2.0-OpenSSH\r\n"),
            Err(CheckError::NotHttp(_))
        ));
        assert!(matches!(parse_status(b""), Err(CheckError::NotHttp(_))));
    }

    #[test]
    fn instance_ids_look_like_uuids() {
        let id = instance_id();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(id, instance_id());
    }

    #[tokio::test]
    async fn tcp_and_http_checks_against_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "500 Internal Server Error"] {
                let (mut c, _) = listener.accept().await.unwrap();
                let mut req = [0u8; 512];
                let _ = c.read(&mut req).await.unwrap();
                c.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let http = CheckKind::Http {
            path: "/health".into(),
            expect: (200, 399),
        };
        check(&http, addr, Duration::from_secs(2)).await.unwrap();
        let err = check(&http, addr, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CheckError::Status { status: 500, .. }),
            "{err}"
        );
        server.await.unwrap();
        let closed = check(&CheckKind::Tcp, addr, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(closed, CheckError::Connect { .. }), "{closed}");
    }
}
