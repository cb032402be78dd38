//! The hook server over a real unix socket with a hand-built snapshot and a real routing table
//! in a temp dir, and its pure helpers.

use std::net::{IpAddr, Ipv4Addr};

use discotech_wire::live::Live;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::discovery::snapshot::{Snapshot, shared};
use crate::service::{Backend, LbPolicy, PortName};

const WEB: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 9);

fn web(lb: LbPolicy, backends: &[SocketAddr]) -> Service {
    let mut spec = ServiceSpec::new("web".parse().unwrap());
    spec.lb = lb;
    for b in backends {
        spec.backends.push(Backend::new(*b));
    }
    let grpc: PortName = "grpc".parse().unwrap();
    spec.client_ports.insert(9000, grpc.clone());
    if let Some(b) = spec.backends.get_mut(1) {
        b.set_port(grpc, 9090);
    }
    Service {
        spec,
        magic_v4: WEB,
        magic_v6: Some("fd64:d15c::9".parse().unwrap()),
    }
}

fn two() -> [SocketAddr; 2] {
    [
        "127.0.0.2:8080".parse().unwrap(),
        "127.0.0.3:8080".parse().unwrap(),
    ]
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    table: Arc<RoutingTable>,
    prefetch: Arc<Prefetcher>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// A hook server whose table (in a temp dir) has `services` published before it accepts.
fn start(services: Vec<Service>, mut cfg: HookServerConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hook.sock");
    cfg.socket = path.clone();
    cfg.fallback_file = Some(fallback_path_for(&path));
    cfg.magic_v6 = Some("fd64:d15c::/64".parse().unwrap());
    let handle = BalanceHandle::new(&cfg);
    let snap = shared(Snapshot::new(3, services));
    handle.table().publish(&snap.load_full());
    let table = handle.table().clone();
    let prefetch = handle.prefetch().clone();
    cfg.balance = Some(handle);
    let listener = UnixListener::bind(&path).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, snap, cfg, shutdown.clone()));
    Server {
        _dir: dir,
        path,
        table,
        prefetch,
        shutdown,
        task,
    }
}

async fn ask(conn: &mut UnixStream, req: Request) -> Reply {
    conn.write_all(&req.encode()).await.unwrap();
    let mut buf = [0u8; MSG_LEN];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = Reply::decode(&buf).unwrap();
    assert_eq!(reply.id, req.id);
    reply
}

fn pick(id: u32, magic: IpAddr, port: u16) -> Request {
    Request::pick(id, magic, port, 0, 1)
}

fn failed(id: u32, backend: SocketAddr) -> Request {
    let mut r = pick(id, WEB.into(), 80);
    r.kind = Kind::Failed;
    r.attempt = 1;
    r.backend = discotech_wire::to_mapped(backend.ip());
    r.backend_port = backend.port();
    r.errno = 111;
    r
}

/// Polls `f` every 20 ms for up to 5 s.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..250 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn picks_round_robin_over_a_real_socket_and_maps_named_ports() {
    let server = start(
        vec![web(LbPolicy::RoundRobin, &two())],
        HookServerConfig::default(),
    );
    let mut conn = UnixStream::connect(&server.path).await.unwrap();
    let mut seen = Vec::new();
    for id in 0..4 {
        let r = ask(&mut conn, pick(id, WEB.into(), 80)).await;
        assert_eq!(r.status, Status::Ok);
        assert_eq!(
            r.flags & FLAG_REPORT_DONE,
            0,
            "round robin wants no done reports"
        );
        seen.push(r.backend_addr());
    }
    let [a, b] = two();
    assert!(seen == [a, b, a, b] || seen == [b, a, b, a], "{seen:?}");

    // Client port 9000 is "grpc": .3 serves it on 9090, .2 on its default port.
    let r1 = ask(&mut conn, pick(10, WEB.into(), 9000))
        .await
        .backend_addr();
    let r2 = ask(&mut conn, pick(11, WEB.into(), 9000))
        .await
        .backend_addr();
    let mut got = [r1, r2];
    got.sort();
    assert_eq!(got, [a, "127.0.0.3:9090".parse().unwrap()]);

    // The v4-mapped form and the v6 magic address name the same service.
    let mapped = IpAddr::V6(WEB.to_ipv6_mapped());
    assert_eq!(
        ask(&mut conn, pick(12, mapped, 80)).await.status,
        Status::Ok
    );
    let mut v6 = pick(13, "fd64:d15c::9".parse().unwrap(), 80);
    v6.flags = FLAG_INET6;
    assert_eq!(ask(&mut conn, v6).await.status, Status::Ok);

    // An address in the range that no service holds.
    let r = ask(
        &mut conn,
        pick(14, Ipv4Addr::new(127, 77, 0, 10).into(), 80),
    )
    .await;
    assert_eq!(r.status, Status::UnknownService);

    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn socket_picks_and_table_picks_share_one_rotation() {
    let server = start(
        vec![web(LbPolicy::RoundRobin, &two())],
        HookServerConfig::default(),
    );
    let mut conn = UnixStream::connect(&server.path).await.unwrap();
    let dest = SocketAddr::new(WEB.into(), 80);
    let ask_table = || Ask {
        dest,
        v6_ok: false,
        key: 0,
        rand: 0,
        local_turn: 0,
        exclude: &[],
    };
    let mut seen = Vec::new();
    for id in 0..3 {
        seen.push(
            ask(&mut conn, pick(id, WEB.into(), 80))
                .await
                .backend_addr(),
        );
        seen.push(server.table.pick(&ask_table(), true).unwrap().addr);
    }
    let [a, b] = two();
    assert!(
        seen == [a, b, a, b, a, b] || seen == [b, a, b, a, b, a],
        "{seen:?}"
    );
}

/// A listening backend (kept open while the listener lives) and an address nothing listens on.
fn good_and_dead() -> (std::net::TcpListener, SocketAddr, SocketAddr) {
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let good = up.local_addr().unwrap();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    (up, good, dead)
}

#[tokio::test]
async fn a_failure_report_is_a_hint_the_daemon_confirms_before_ejecting() {
    // One backend accepts (a real listener), the other has nothing listening.
    let (up, good, dead) = good_and_dead();
    let (tx, mut rx) = mpsc::channel(4);
    let cfg = HookServerConfig {
        ejections: Some(tx),
        ..Default::default()
    };
    let server = start(vec![web(LbPolicy::RoundRobin, &[good, dead])], cfg);
    let mut conn = UnixStream::connect(&server.path).await.unwrap();

    // A false report about the good backend: the repick avoids it for this connect, but the
    // daemon's probe finds it accepting and nothing is ejected.
    let repick = ask(&mut conn, failed(1, good)).await;
    assert_eq!((repick.status, repick.backend_addr()), (Status::Ok, dead));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "a refuted hint ejects nothing");
    let mut seen = Vec::new();
    for id in 2..6 {
        seen.push(
            ask(&mut conn, pick(id, WEB.into(), 80))
                .await
                .backend_addr(),
        );
    }
    assert!(seen.contains(&good), "{seen:?}");

    // A true report: the probe is refused too, so the backend is ejected and the registry told.
    let _ = ask(&mut conn, failed(7, dead)).await;
    let eject = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let Command::Eject {
        service,
        addr,
        reason,
        ..
    } = eject
    else {
        panic!("not an ejection: {eject:?}");
    };
    assert_eq!((service.as_str(), addr), ("web", dead));
    assert!(reason.contains("confirmed by the daemon"), "{reason}");
    drop(up);
}

#[tokio::test]
async fn without_a_registry_a_confirmed_failure_leaves_the_table_at_once() {
    let (_up, good, dead) = good_and_dead();
    let server = start(
        vec![web(LbPolicy::RoundRobin, &[good, dead])],
        HookServerConfig::default(),
    );
    let mut conn = UnixStream::connect(&server.path).await.unwrap();
    let _ = ask(&mut conn, failed(1, dead)).await;
    let dest = SocketAddr::new(WEB.into(), 80);
    let only_good = eventually(|| {
        (0..4).all(|_| {
            let a = Ask {
                dest,
                v6_ok: false,
                key: 0,
                rand: 0,
                local_turn: 0,
                exclude: &[],
            };
            server.table.pick(&a, true).map(|p| p.addr) == Ok(good)
        })
    })
    .await;
    assert!(only_good, "the ejected backend left the table");
}

#[tokio::test]
async fn other_versions_get_a_reason_and_garbage_gets_disconnected() {
    let server = start(
        vec![web(LbPolicy::RoundRobin, &two())],
        HookServerConfig::default(),
    );
    let mut conn = UnixStream::connect(&server.path).await.unwrap();
    let mut bytes = pick(5, WEB.into(), 80).encode();
    bytes[2] = 9;
    conn.write_all(&bytes).await.unwrap();
    let mut buf = [0u8; MSG_LEN];
    conn.read_exact(&mut buf).await.unwrap();
    let r = Reply::decode(&buf).unwrap();
    assert_eq!((r.id, r.status), (5, Status::UnsupportedVersion));

    conn.write_all(&[b'G'; MSG_LEN]).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "a peer that is not a hook is dropped");
}

#[tokio::test]
async fn idle_peers_are_dropped_and_the_peer_cap_holds() {
    let cfg = HookServerConfig {
        idle_timeout: Duration::from_millis(100),
        max_peers: 1,
        ..Default::default()
    };
    let server = start(vec![web(LbPolicy::RoundRobin, &two())], cfg);
    let mut first = UnixStream::connect(&server.path).await.unwrap();
    assert_eq!(
        ask(&mut first, pick(1, WEB.into(), 80)).await.status,
        Status::Ok
    );
    // A second peer over the cap is closed without an answer.
    let mut second = UnixStream::connect(&server.path).await.unwrap();
    let _ = second.write_all(&pick(2, WEB.into(), 80).encode()).await;
    let mut buf = [0u8; MSG_LEN];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    // The first goes idle and is dropped.
    let n = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn p2c_socket_picks_count_in_flight_until_done_or_the_peer_leaves() {
    let server = start(
        vec![web(LbPolicy::P2c, &two())],
        HookServerConfig::default(),
    );
    let in_flight = |table: &RoutingTable| {
        let live = table.live().unwrap();
        (0..live.backend_slots() as u32)
            .map(|s| live.in_flight_count(s))
            .sum::<u32>()
    };
    let mut conn = UnixStream::connect(&server.path).await.unwrap();
    let req = pick(1, WEB.into(), 80);
    let r = ask(&mut conn, req).await;
    assert_eq!(r.flags & FLAG_REPORT_DONE, FLAG_REPORT_DONE);
    assert_eq!(in_flight(&server.table), 1);
    let mut done = req;
    done.kind = Kind::Done;
    done.backend = r.backend;
    done.backend_port = r.backend_port;
    conn.write_all(&done.encode()).await.unwrap();
    assert!(
        eventually(|| in_flight(&server.table) == 0).await,
        "done uncounts"
    );
    // A second done for the same pick does not go negative.
    conn.write_all(&done.encode()).await.unwrap();
    let _ = ask(&mut conn, pick(2, WEB.into(), 80)).await;
    let _ = ask(&mut conn, pick(3, WEB.into(), 80)).await;
    assert_eq!(in_flight(&server.table), 2);
    // A peer killed mid-connect does not pin the counts.
    drop(conn);
    assert!(eventually(|| in_flight(&server.table) == 0).await);
}

#[tokio::test]
async fn v4_socket_with_only_v6_backends_gets_no_backend() {
    let server = start(
        vec![web(
            LbPolicy::RoundRobin,
            &["[fd00::2]:80".parse().unwrap()],
        )],
        HookServerConfig::default(),
    );
    let mut conn = UnixStream::connect(&server.path).await.unwrap();
    assert_eq!(
        ask(&mut conn, pick(1, WEB.into(), 80)).await.status,
        Status::NoBackend
    );
}

#[tokio::test]
async fn the_live_region_is_handed_over_sealed_with_its_epoch() {
    let server = start(
        vec![web(LbPolicy::RoundRobin, &two())],
        HookServerConfig::default(),
    );
    let conn = std::os::unix::net::UnixStream::connect(&server.path).unwrap();
    let mut req = pick(9, Ipv4Addr::UNSPECIFIED.into(), 0);
    req.kind = Kind::MapLive;
    std::io::Write::write_all(&mut &conn, &req.encode()).unwrap();
    let mut buf = [0u8; MSG_LEN];
    let mut got = None;
    for _ in 0..250 {
        match discotech_shm::recv_with_owned_fd(conn.as_fd(), &mut buf) {
            Ok(r) => {
                got = Some(r);
                break;
            }
            Err(libc::EAGAIN) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("recvmsg: errno {e}"),
        }
    }
    let (n, fd) = got.expect("an answer within 5 s");
    assert_eq!(n, MSG_LEN);
    let reply = Reply::decode(&buf).unwrap();
    assert_eq!((reply.id, reply.status), (9, Status::Ok));
    let fd = fd.expect("a descriptor with the answer");
    let seals = discotech_shm::seals(fd.as_fd());
    assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
    assert_ne!(seals & libc::F_SEAL_GROW, 0);
    let words = discotech_shm::file_size(fd.as_fd()).unwrap() as usize / 4;
    let m = discotech_shm::Mapping::map(fd.as_fd(), words, true).unwrap();
    let live = Live::new(m.words()).unwrap();
    assert_eq!(live.epoch(), reply.generation);
    assert_eq!(live.epoch(), server.table.live().unwrap().epoch());
    // The same memory: a count made through the mapping is the daemon's count.
    live.in_flight(0)
        .unwrap()
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(server.table.live().unwrap().in_flight_count(0), 1);
}

#[test]
fn preload_env_merges_without_duplicates() {
    let hook = Path::new("/usr/lib/discotech/libdiscotech_hook.so");
    assert_eq!(preload_env(hook, None), hook.as_os_str());
    assert_eq!(preload_env(hook, Some(OsStr::new(""))), hook.as_os_str());
    assert_eq!(
        preload_env(hook, Some(OsStr::new("/lib/libfoo.so"))),
        OsStr::new("/usr/lib/discotech/libdiscotech_hook.so:/lib/libfoo.so")
    );
    let both = OsStr::new("/lib/libfoo.so /usr/lib/discotech/libdiscotech_hook.so");
    assert_eq!(preload_env(hook, Some(both)), both);
    assert_eq!(
        fallback_path_for(Path::new("/run/discotech/hook.sock")),
        Path::new("/run/discotech/hook.snapshot")
    );
}

#[test]
fn hook_library_is_found_beside_the_exe_or_its_parent_then_installed() {
    let dir = tempfile::tempdir().unwrap();
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).unwrap();
    let installed = dir.path().join("installed.so");
    let exe = deps.join("discotech-test");
    assert_eq!(find_hook_library_from(None, Some(&exe), &installed), None);
    std::fs::write(&installed, b"").unwrap();
    assert_eq!(
        find_hook_library_from(None, Some(&exe), &installed),
        Some(installed.clone())
    );
    let parent_lib = dir.path().join(HOOK_LIBRARY_NAME);
    std::fs::write(&parent_lib, b"").unwrap();
    assert_eq!(
        find_hook_library_from(None, Some(&exe), &installed),
        Some(parent_lib.clone())
    );
    let beside = deps.join(HOOK_LIBRARY_NAME);
    std::fs::write(&beside, b"").unwrap();
    assert_eq!(
        find_hook_library_from(None, Some(&exe), &installed),
        Some(beside)
    );
    assert_eq!(
        find_hook_library_from(Some(installed.clone()), Some(&exe), &installed),
        Some(installed)
    );
    let missing = dir.path().join("nope.so");
    assert_eq!(
        find_hook_library_from(Some(missing), None, &parent_lib),
        Some(parent_lib)
    );
}

#[tokio::test]
async fn a_prefetch_request_gets_a_pooled_connection_and_pools_follow_the_table() {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let listeners: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut svc = web(LbPolicy::RoundRobin, &addrs);
    svc.spec.client_ports.clear();
    svc.spec.prefetch = Some(crate::service::Prefetch {
        pool: 2,
        max_idle: Duration::from_secs(30),
    });
    let plain = Service {
        spec: ServiceSpec::new("api".parse().unwrap()),
        magic_v4: Ipv4Addr::new(127, 77, 0, 10),
        magic_v6: None,
    };
    let server = start(vec![svc.clone(), plain], HookServerConfig::default());
    let name = svc.spec.name.clone();
    let ready = |n: usize| {
        let pools = server.prefetch.pools_of(&name);
        pools.len() == n && pools.iter().all(|p| p.idle >= 1)
    };
    assert!(
        eventually(|| ready(2)).await,
        "{:?}",
        server.prefetch.pools_of(&name)
    );

    let conn = UnixStream::connect(&server.path).await.unwrap();
    let mut req = pick(7, WEB.into(), 80);
    req.kind = Kind::Prefetch;
    conn.writable().await.unwrap();
    conn.try_write(&req.encode()).unwrap();
    let mut buf = [0u8; MSG_LEN];
    let (reply, fd) = loop {
        conn.readable().await.unwrap();
        match discotech_shm::recv_with_owned_fd(conn.as_fd(), &mut buf) {
            Ok((n, fd)) => {
                assert_eq!(n, MSG_LEN);
                break (Reply::decode(&buf).unwrap(), fd);
            }
            Err(libc::EAGAIN) => continue,
            Err(e) => panic!("recvmsg: {e}"),
        }
    };
    assert_eq!((reply.id, reply.status), (7, Status::Ok));
    assert_eq!(reply.flags & FLAG_HANDED_OVER, FLAG_HANDED_OVER);
    assert!(reply.rcvbuf > 0 && reply.sndbuf > 0, "{reply:?}");
    let mut handed = std::net::TcpStream::from(fd.expect("a connection is attached"));
    let backend = handed.peer_addr().unwrap();
    assert_eq!(backend, reply.backend_addr());
    // It is an established connection to that backend: what we write arrives there.
    let at = addrs.iter().position(|a| *a == backend).unwrap();
    handed.set_nonblocking(false).unwrap();
    handed.write_all(b"ping").unwrap();
    let ours = handed.local_addr().unwrap();
    let mut accepted = (0..4)
        .map(|_| listeners[at].accept().unwrap())
        .find(|(_, from)| *from == ours)
        .expect("the backend accepted the handed connection")
        .0;
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");

    // A service without prefetch: no connection, and the hook connects itself.
    let mut req = pick(8, Ipv4Addr::new(127, 77, 0, 10).into(), 80);
    req.kind = Kind::Prefetch;
    let mut plain_conn = UnixStream::connect(&server.path).await.unwrap();
    assert_eq!(ask(&mut plain_conn, req).await.status, Status::NoBackend);

    // The second backend leaves the service: its pool goes with the next look.
    svc.spec.backends.truncate(1);
    server.table.publish(&Arc::new(Snapshot::new(4, vec![svc])));
    assert!(
        eventually(|| {
            let pools = server.prefetch.pools_of(&name);
            pools.len() == 1 && pools[0].backend == addrs[0]
        })
        .await,
        "{:?}",
        server.prefetch.pools_of(&name)
    );
    server.shutdown.cancel();
}
