//! One health check and what it takes: its settings (`HealthCheck`, from a zone file's `health` or
//! a registration's `check`), the probe itself (a TCP connect, or an HTTP GET whose status must be
//! in range), and the rise/fall counting that turns results into a state (`Streak`). Shared by
//! active health checks of backends and by registrations.
//!
//! The HTTP probe is hyper's HTTP/1.1 client on one connection per check (`Connection: close`, no
//! pool): the request is built from validated `http` types, so no path can put a request line of
//! its own on the wire, and the answer's status decides as soon as its head is in; the body is
//! never read, and the connection is dropped with it.

use std::future::poll_fn;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::pin;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::header::{ACCEPT, CONNECTION, HOST, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::service::CheckKind;

/// The most an HTTP check buffers of an answer: its head must fit (hyper's smallest limit is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;
/// What a check calls itself (backends may leave it out of their access logs).
const USER_AGENT_VALUE: &str = "discotech-check";

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
    #[error("HTTP path {path:?} cannot be sent: {reason}")]
    BadPath { path: String, reason: String },
    #[error("not an HTTP answer: {}", Chain(.0))]
    NotHttp(hyper::Error),
    #[error("HTTP request: {}", Chain(.0))]
    Http(hyper::Error),
    #[error("HTTP status {status} is outside {lo}-{hi}")]
    Status { status: u16, lo: u16, hi: u16 },
}

impl From<hyper::Error> for CheckError {
    fn from(e: hyper::Error) -> Self {
        // A head hyper cannot parse is another protocol; one too large is HTTP gone wrong.
        if e.is_parse() && !e.is_parse_too_large() {
            Self::NotHttp(e)
        } else {
            Self::Http(e)
        }
    }
}

/// An error with its causes, `outer: inner: ...` (hyper says "connection error" and keeps the
/// I/O error that says which as its source).
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// Rise/fall hysteresis: a service becomes healthy after `rise` passes in a row and unhealthy
/// after `fall` failures in a row; it starts unhealthy, so nothing is announced before it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streak {
    rise: u32,
    fall: u32,
    healthy: bool,
    streak: u32,
}

impl Streak {
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
/// Why the check failed: connect, timeout, a path that is no request target, not HTTP, or a
/// status outside the expected range.
pub async fn check(
    kind: &CheckKind,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), CheckError> {
    let target = check_target(addr);
    let work = async {
        let stream = TcpStream::connect(target)
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
        let status = status(stream, request(path, target)?).await?.as_u16();
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

/// `GET path` to `host`, one request on its connection. The path must be a request target as
/// written (an absolute path, an optional query): what `Uri` refuses or would send otherwise (a
/// space, CR or LF, a fragment, a scheme) is an error, never put on the wire; so is a byte beyond
/// ASCII, which `Uri` lets through.
fn request(path: &str, host: SocketAddr) -> Result<Request<Empty<Bytes>>, CheckError> {
    let bad = |reason: String| CheckError::BadPath {
        path: path.to_string(),
        reason,
    };
    if !path.is_ascii() {
        return Err(bad("not ASCII (percent-encode it)".into()));
    }
    let uri: Uri = path
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()))?;
    let as_sent = uri.path_and_query().map(|p| p.as_str());
    if uri.scheme().is_some() || !path.starts_with('/') || as_sent != Some(path) {
        return Err(bad(
            "not an absolute path with an optional query and no fragment".into(),
        ));
    }
    Request::get(uri)
        .header(HOST, host.to_string())
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header(ACCEPT, "*/*")
        .header(CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| bad(e.to_string()))
}

/// Sends `request` on `stream` and returns the answer's status once its head is in. The
/// connection is driven here rather than in a task of its own, so it ends with the check: the
/// body, however long, is not waited for, and no more of it is read than came with the head.
async fn status(
    stream: TcpStream,
    request: Request<Empty<Bytes>>,
) -> Result<StatusCode, CheckError> {
    let (mut sender, mut conn) = http1::Builder::new()
        // `Host:`, not `host:`: some old servers match header names by case.
        .title_case_headers(true)
        // Only the status counts: a header hyper would refuse is no reason to fail a check.
        .ignore_invalid_headers_in_responses(true)
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .max_buf_size(MAX_HEAD)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await?;
    // Without hyper's write shutdown once a whole answer is in: the socket is closed with the
    // check anyway, and the shutdown cost a system call per check.
    let driven = poll_fn(|cx| conn.poll_without_shutdown(cx));
    let mut response = pin!(sender.send_request(request));
    let response = tokio::select! {
        r = &mut response => r?,
        // The connection ends first on an error, or when it is done with a whole (short) answer:
        // the request then holds the answer or the reason (hyper answers every request it took).
        ended = driven => {
            ended?;
            response.await?
        }
    };
    Ok(response.status())
}

#[cfg(test)]
mod tests;
