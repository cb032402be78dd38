//! Registration, the other half of a registry (as SmartStack's Nerve does): a `[[register]]`
//! entry announces a local service into ZooKeeper as an ephemeral node while its local health
//! check passes, and withdraws the node when the check fails or the daemon stops. Reading
//! registrations back is the ZooKeeper source's job; the node layouts live in its `formats`.
//! The `[[register]]` table is checked in `register/config.rs`.

pub mod config;

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_async::{Acl, CreateMode, Permission, ZkError, ZkState};

use self::config::Registration;
use crate::discovery::health::{HealthCheck, Streak, check};
use crate::discovery::source::zookeeper::formats::{self, NodeName};
use crate::discovery::source::zookeeper::session::{
    BACKOFF_MAX, BACKOFF_MIN, Session, SessionError, jitter,
};

/// How long shutdown waits for the registration node's delete.
const SHUTDOWN_DELETE: Duration = Duration::from_secs(2);

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
    let mut health = Streak::new(*rise, *fall);
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
            |_| {},
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
    fn instance_ids_look_like_uuids() {
        let id = instance_id();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(id, instance_id());
    }
}
