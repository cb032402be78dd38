//! One health check and what it takes: its settings (`HealthCheck`, from a zone file's `health` or
//! a registration's `check`), the probe itself (a TCP connect, or an HTTP GET whose status must be
//! in range), and the rise/fall counting that turns results into a state (`Streak`). Shared by
//! active health checks of backends and by registrations.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::service::CheckKind;

/// The longest status line an HTTP check reads before giving up on the answer.
const MAX_STATUS_LINE: usize = 1024;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut h = Streak::new(2, 3);
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
        let mut h = Streak::new(1, 1);
        assert_eq!(h.observe(true), Some(true));
        assert_eq!(h.observe(false), Some(false));
        let mut zero = Streak::new(0, 0);
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
