//! The hook server over a real unix socket with a hand-built snapshot, and its pure helpers.

use std::net::{Ipv4Addr, Ipv6Addr};

use discotech_wire::fallback::{HEADER_LEN, RECORD_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::service::{Backend, PortName};
use crate::snapshot::{Service, shared};

const WEB: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 9);

fn web(lb: LbPolicy) -> Service {
    let mut spec = ServiceSpec::new("web".parse().unwrap());
    spec.lb = lb;
    spec.backends
        .push(Backend::new("127.0.0.2:8080".parse().unwrap()));
    spec.backends
        .push(Backend::new("127.0.0.3:8080".parse().unwrap()));
    let grpc: PortName = "grpc".parse().unwrap();
    spec.client_ports.insert(9000, grpc.clone());
    spec.backends[1].ports.insert(grpc, 9090);
    Service {
        spec,
        magic_v4: WEB,
        magic_v6: Some("fd64:d15c::9".parse().unwrap()),
    }
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn start(services: Vec<Service>, cfg: HookServerConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hook.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(
        listener,
        shared(Snapshot::new(3, services)),
        cfg,
        shutdown.clone(),
    ));
    Server {
        _dir: dir,
        path,
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

/// One hook peer as `answer` sees it: the balancer, its RNG, the peer's outstanding picks and
/// where ejections go.
struct Peer {
    balancer: Balancer,
    rng: SmallRng,
    outstanding: Vec<(ServiceName, SocketAddr)>,
    ejections: Option<mpsc::Sender<Command>>,
}

impl Peer {
    fn new(ejections: Option<mpsc::Sender<Command>>) -> Self {
        Self {
            balancer: Balancer::default(),
            rng: SmallRng::seed_from_u64(1),
            outstanding: Vec::new(),
            ejections,
        }
    }

    fn answer(&mut self, snap: &Snapshot, req: &Request, now: Instant) -> Option<Reply> {
        answer(
            &mut self.balancer,
            &mut self.rng,
            snap,
            req,
            &mut self.outstanding,
            now,
            0,
            self.ejections.as_ref(),
        )
    }
}

fn pick(id: u32, magic: IpAddr, port: u16) -> Request {
    Request::pick(id, magic, port, 0, 1)
}

#[tokio::test]
async fn picks_round_robin_over_a_real_socket_and_maps_named_ports() {
    let server = start(vec![web(LbPolicy::RoundRobin)], HookServerConfig::default());
    let mut conn = UnixStream::connect(&server.path).await.unwrap();
    let mut seen = Vec::new();
    for id in 0..4 {
        let r = ask(&mut conn, pick(id, WEB.into(), 80)).await;
        assert_eq!(r.status, Status::Ok);
        assert_eq!(r.generation, 3);
        assert_eq!(
            r.flags & FLAG_REPORT_DONE,
            0,
            "round robin wants no done reports"
        );
        seen.push(r.backend_addr());
    }
    let a: SocketAddr = "127.0.0.2:8080".parse().unwrap();
    let b: SocketAddr = "127.0.0.3:8080".parse().unwrap();
    assert_eq!(seen, vec![a, b, a, b]);

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
async fn a_failed_backend_is_skipped_by_the_repick_and_by_later_picks() {
    let server = start(vec![web(LbPolicy::RoundRobin)], HookServerConfig::default());
    let mut conn = UnixStream::connect(&server.path).await.unwrap();
    let first = ask(&mut conn, pick(1, WEB.into(), 80)).await;
    let mut failed = pick(2, WEB.into(), 80);
    failed.kind = Kind::Failed;
    failed.attempt = 1;
    failed.backend = first.backend;
    failed.backend_port = first.backend_port;
    failed.errno = 111;
    let repick = ask(&mut conn, failed).await;
    assert_eq!(repick.status, Status::Ok);
    assert_ne!(repick.backend_addr(), first.backend_addr());
    for id in 3..7 {
        let r = ask(&mut conn, pick(id, WEB.into(), 80)).await;
        assert_ne!(
            r.backend_addr(),
            first.backend_addr(),
            "held backend picked again"
        );
    }
}

#[tokio::test]
async fn other_versions_get_a_reason_and_garbage_gets_disconnected() {
    let server = start(vec![web(LbPolicy::RoundRobin)], HookServerConfig::default());
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
    let server = start(vec![web(LbPolicy::RoundRobin)], cfg);
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

#[test]
fn p2c_picks_ask_for_done_and_done_releases_them() {
    let snap = Snapshot::new(1, [web(LbPolicy::P2c)]);
    let mut peer = Peer::new(None);
    let now = Instant::now();
    let req = pick(1, WEB.into(), 80);
    let r = peer.answer(&snap, &req, now).unwrap();
    assert_eq!(r.flags & FLAG_REPORT_DONE, FLAG_REPORT_DONE);
    let name: ServiceName = "web".parse().unwrap();
    assert_eq!(peer.balancer.outstanding(&name, r.backend_addr()), 1);
    assert_eq!(peer.outstanding.len(), 1);
    let mut done = req;
    done.kind = Kind::Done;
    done.backend = r.backend;
    done.backend_port = r.backend_port;
    assert_eq!(peer.answer(&snap, &done, now), None, "done has no reply");
    assert_eq!(peer.balancer.outstanding(&name, r.backend_addr()), 0);
    assert!(peer.outstanding.is_empty());
    // A second done for the same pick does not go negative or touch other picks.
    peer.answer(&snap, &done, now);
    assert_eq!(peer.balancer.outstanding(&name, r.backend_addr()), 0);
}

#[test]
fn v4_socket_with_only_v6_backends_gets_no_backend() {
    let mut svc = web(LbPolicy::RoundRobin);
    svc.spec.backends = vec![Backend::new("[fd00::2]:80".parse().unwrap())];
    let snap = Snapshot::new(1, [svc]);
    let r = Peer::new(None).answer(&snap, &pick(1, WEB.into(), 80), Instant::now());
    assert_eq!(r.unwrap().status, Status::NoBackend);
}

#[test]
fn fallback_file_round_trips_through_the_wire_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hook.snapshot");
    let snap = Snapshot::new(42, [web(LbPolicy::RoundRobin)]);
    let v4: Ipv4Net = "127.77.0.0/16".parse().unwrap();
    let v6: Ipv6Net = "fd64:d15c::/64".parse().unwrap();
    write_fallback(&path, &snap, v4, Some(v6)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header = Header::decode(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!(header.generation, 42);
    assert_eq!(header.magic_v4, (Ipv4Addr::new(127, 77, 0, 0), 16));
    assert_eq!(
        header.magic_v6,
        Some(("fd64:d15c::".parse::<Ipv6Addr>().unwrap(), 64))
    );
    // 2 magic addresses x 2 backends x (default + one mapped client port).
    assert_eq!(header.records, 8);
    assert_eq!(bytes.len() as u64, header.file_len());
    let records: Vec<Record> = bytes[HEADER_LEN..]
        .chunks(RECORD_LEN)
        .map(Record::decode)
        .collect();
    let grpc_on_3 = records
        .iter()
        .find(|r| r.client_port == 9000 && r.backend == to_mapped("127.0.0.3".parse().unwrap()))
        .unwrap();
    assert_eq!(grpc_on_3.backend_port, 9090);
    assert_eq!(grpc_on_3.magic, WEB.to_ipv6_mapped());
    assert_eq!(records.iter().filter(|r| r.client_port == 0).count(), 4);
    assert_eq!(
        fallback_path_for(Path::new("/run/discotech/hook.sock")),
        Path::new("/run/discotech/hook.snapshot")
    );
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

#[test]
fn balancing_state_of_removed_services_is_dropped_on_the_next_generation() {
    let snapshot = shared(Snapshot::new(1, [web(LbPolicy::P2c)]));
    let shared_state = Shared {
        snapshot: snapshot.clone(),
        balance: std::sync::Arc::new(Mutex::new((
            Balancer::default(),
            SmallRng::seed_from_u64(1),
            0,
        ))),
        ejections: None,
        latency: None,
    };
    let mut outstanding = Vec::new();
    let bytes = pick(1, WEB.into(), 80).encode();
    let reply = Reply::decode(
        &handle(&shared_state, &bytes, &mut outstanding, Instant::now(), 0)
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let name: ServiceName = "web".parse().unwrap();
    assert_eq!(
        shared_state
            .balance
            .lock()
            .unwrap()
            .0
            .outstanding(&name, reply.backend_addr()),
        1
    );
    snapshot.store(Arc::new(Snapshot::new(2, [])));
    let gone = Reply::decode(
        &handle(&shared_state, &bytes, &mut outstanding, Instant::now(), 0)
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(gone.status, Status::UnknownService);
    assert_eq!(
        shared_state
            .balance
            .lock()
            .unwrap()
            .0
            .outstanding(&name, reply.backend_addr()),
        0
    );
}

#[test]
fn an_ejection_is_sent_to_the_registry_without_waiting() {
    let snap = Snapshot::new(1, [web(LbPolicy::RoundRobin)]);
    let (tx, mut rx) = mpsc::channel(1);
    let mut peer = Peer::new(Some(tx));
    let now = Instant::now();
    let first = peer.answer(&snap, &pick(1, WEB.into(), 80), now).unwrap();
    let mut failed = pick(2, WEB.into(), 80);
    failed.kind = Kind::Failed;
    failed.backend = first.backend;
    failed.backend_port = first.backend_port;
    failed.errno = 111;
    for _ in 0..3 {
        assert!(
            rx.try_recv().is_err(),
            "no ejection before the third failure"
        );
        let r = peer.answer(&snap, &failed, now);
        assert_eq!(r.unwrap().status, Status::Ok);
    }
    let Ok(Command::Eject {
        service,
        addr,
        until,
        reason,
    }) = rx.try_recv()
    else {
        panic!("the third failure in a row ejects and tells the registry");
    };
    assert_eq!(
        (service.as_str(), addr, until),
        ("web", first.backend_addr(), now + Duration::from_secs(30))
    );
    assert_eq!(
        reason,
        "ejected after 3 consecutive connect failures, for 30s"
    );
}

#[test]
fn p2c_ewma_done_reports_feed_latency_and_pending_ones_are_watched_by_port() {
    let snap = Snapshot::new(1, [web(LbPolicy::P2cEwma)]);
    let mut peer = Peer::new(None);
    let now = Instant::now();
    let req = pick(1, WEB.into(), 80);
    let r = peer.answer(&snap, &req, now).unwrap();
    assert_eq!(
        r.flags & FLAG_REPORT_DONE,
        FLAG_REPORT_DONE,
        "p2c-ewma wants done reports"
    );
    let name: ServiceName = "web".parse().unwrap();
    let mut done = req;
    done.kind = Kind::Done;
    done.backend = r.backend;
    done.backend_port = r.backend_port;
    done.latency_us = 2_500;
    assert_eq!(
        watch_for(&snap, &done, now),
        None,
        "timed by the hook: nothing to watch"
    );
    peer.answer(&snap, &done, now);
    assert_eq!(
        peer.balancer.latency_estimate(&name, r.backend_addr(), now),
        Some(Duration::from_micros(2_500))
    );
    assert_eq!(peer.balancer.outstanding(&name, r.backend_addr()), 0);

    // Still connecting when connect() returned: the daemon watches the socket by its port.
    let mut pending = done;
    pending.latency_us = 0;
    pending.flags |= FLAG_PENDING;
    pending.errno = 40_000;
    let w = watch_for(&snap, &pending, now).expect("a watch");
    assert_eq!((w.remote, w.local_port), (r.backend_addr(), 40_000));
    assert_eq!(w.service, name);
    // A named port reaches the backend at another port; the balancer's key is its default one.
    let mut grpc = pending;
    grpc.port = 9000;
    grpc.backend_port = 9090;
    grpc.backend = to_mapped("127.0.0.3".parse().unwrap());
    let w = watch_for(&snap, &grpc, now).expect("a watch");
    assert_eq!(w.backend, "127.0.0.3:8080".parse().unwrap());
    assert_eq!(w.remote, "127.0.0.3:9090".parse().unwrap());
    // Plain p2c keeps no latency.
    let p2c = Snapshot::new(1, [web(LbPolicy::P2c)]);
    assert_eq!(watch_for(&p2c, &pending, now), None);
}
