//! One ZooKeeper client session as the source and the registrations use it: connecting without
//! blocking the runtime, digest auth, a bounded wait on every request, and the session's state
//! changes as a channel. It papers over what zookeeper-async leaves to its user: the client
//! reconnects by itself but neither replays auth nor re-registers watches, so callers re-read
//! and re-authenticate on every `Connected` that follows a disconnect.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use zookeeper_async::{WatchedEvent, ZkError, ZkState, ZooKeeper};

/// Pause between TCP connect attempts inside the client while the ensemble is unreachable, so a
/// refused connect does not spin. (The client library logs every attempt, and its session
/// password at info: the daemon's default log filter silences it; our own state logs suffice.)
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// Backoff bounds of our own retries (initial connect, failed syncs).
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("cannot resolve ZooKeeper host {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("ZooKeeper {op} {path}: {error}")]
    Op {
        op: &'static str,
        path: String,
        error: ZkError,
    },
    #[error("ZooKeeper {op} {path}: no answer within {}ms", timeout.as_millis())]
    Timeout {
        op: &'static str,
        path: String,
        timeout: Duration,
    },
    #[error("ZooKeeper digest auth was refused: {0}")]
    Auth(ZkError),
    #[error("lost the connection to ZooKeeper; reconnecting")]
    Disconnected,
    #[error("shutting down")]
    Shutdown,
}

impl SessionError {
    /// The ZooKeeper error code, if the server (or the client library) gave one.
    pub fn code(&self) -> Option<ZkError> {
        match self {
            Self::Op { error, .. } | Self::Auth(error) => Some(*error),
            _ => None,
        }
    }
}

/// A connected client, the state changes it reports, and the bound on each request.
pub struct Session {
    pub zk: Arc<ZooKeeper>,
    pub states: mpsc::UnboundedReceiver<ZkState>,
    pub op_timeout: Duration,
    auth: Option<String>,
}

impl Session {
    /// Connects to the first reachable host, retrying with backoff until `shutdown`.
    /// Host names are resolved here, asynchronously, because the client library would resolve
    /// them with a blocking call on a runtime thread.
    ///
    /// # Errors
    /// `Shutdown` only: every other failure (resolving, connecting, authenticating) is retried
    /// with backoff and logged once per distinct error.
    ///
    /// `on_watch` receives the events of every watch the session leaves with `watch = true`
    /// (the client keeps nothing per such watch; the server holds it).
    pub async fn connect(
        hosts: &[String],
        session_timeout: Duration,
        auth: Option<String>,
        what: &str,
        on_watch: impl Fn(WatchedEvent) + Clone + Send + 'static,
        shutdown: &CancellationToken,
    ) -> Result<Self, SessionError> {
        let mut backoff = BACKOFF_MIN;
        let mut last_error = String::new();
        loop {
            let attempt = async {
                let addrs = resolve(hosts).await?;
                let connect_string = addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                // Returns once a TCP connection is up; the session handshake continues in the
                // background and requests queue behind it.
                ZooKeeper::connect_with_retry_time(
                    &connect_string,
                    session_timeout,
                    on_watch.clone(),
                    RECONNECT_PAUSE,
                )
                .await
                .map_err(|error| SessionError::Op {
                    op: "connect",
                    path: connect_string.clone(),
                    error,
                })
            };
            let result = tokio::select! {
                () = shutdown.cancelled() => return Err(SessionError::Shutdown),
                r = tokio::time::timeout(session_timeout.max(Duration::from_secs(1)), attempt) => r,
            };
            let error = match result {
                Ok(Ok(zk)) => {
                    let (tx, states) = mpsc::unbounded_channel();
                    zk.add_listener(move |s| {
                        let _ = tx.send(s);
                    });
                    let session = Self {
                        zk: Arc::new(zk),
                        states,
                        op_timeout: session_timeout.max(Duration::from_secs(1)),
                        auth: auth.clone(),
                    };
                    // A session that cannot authenticate would read nothing: drop it and retry.
                    match session.authenticate().await {
                        Ok(()) => {
                            debug!(what, hosts = ?hosts, "ZooKeeper client started");
                            return Ok(session);
                        }
                        Err(e) => {
                            session.close().await;
                            e.to_string()
                        }
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no ZooKeeper host of {hosts:?} accepted a connection"),
            };
            if error != last_error {
                warn!(what, %error, "cannot connect to ZooKeeper; retrying");
                last_error = error;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Err(SessionError::Shutdown),
                () = tokio::time::sleep(jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Sends the digest credentials. The client library does not replay them after a reconnect,
    /// so a session that reconnects must call this again.
    ///
    /// # Errors
    /// The server refused the credentials or did not answer in time.
    pub async fn authenticate(&self) -> Result<(), SessionError> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let bytes = auth.as_bytes().to_vec();
        match tokio::time::timeout(self.op_timeout, self.zk.add_auth("digest", bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionError::Auth(e)),
            Err(_) => Err(SessionError::Timeout {
                op: "add_auth",
                path: String::new(),
                timeout: self.op_timeout,
            }),
        }
    }

    /// Runs one request with the session's bound: while the ensemble is unreachable the client
    /// library queues requests instead of failing them.
    ///
    /// # Errors
    /// The server's error, or `Timeout`.
    pub async fn op<T>(
        &self,
        op: &'static str,
        path: &str,
        f: impl Future<Output = Result<T, ZkError>>,
    ) -> Result<T, SessionError> {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(error)) => Err(SessionError::Op {
                op,
                path: path.to_string(),
                error,
            }),
            Err(_) => Err(SessionError::Timeout {
                op,
                path: path.to_string(),
                timeout: self.op_timeout,
            }),
        }
    }

    /// Ends the session (its ephemeral nodes go with it), bounded: with the ensemble gone the
    /// close cannot be delivered, and the server expires the session by itself.
    pub async fn close(&self) {
        if tokio::time::timeout(Duration::from_secs(1), self.zk.close())
            .await
            .is_err()
        {
            debug!("ZooKeeper close was not acknowledged; the server will expire the session");
        }
    }
}

/// A duration with up to 20% random added, so many daemons do not retry in lockstep.
pub fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    let extra = rand::rng().random_range(0.0..0.2);
    d.mul_f64(1.0 + extra)
}

async fn resolve(hosts: &[String]) -> Result<Vec<SocketAddr>, SessionError> {
    let mut out = Vec::new();
    let mut last = None;
    for host in hosts {
        match tokio::net::lookup_host(host.as_str()).await {
            Ok(addrs) => out.extend(addrs.take(1)),
            Err(e) => {
                last = Some(SessionError::Resolve {
                    host: host.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    match (out.is_empty(), last) {
        (true, Some(e)) => Err(e),
        (true, None) => Err(SessionError::Resolve {
            host: hosts.join(","),
            reason: "no addresses".into(),
        }),
        _ => Ok(out),
    }
}
