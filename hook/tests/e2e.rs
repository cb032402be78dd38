//! End to end on loopback: the real hook library preloaded into the C clients in
//! `tests/clients/`, talking to `discotech::connect::hook_server::serve` running in this process with a
//! hand-built snapshot, and backends that say who they are on 127.0.0.2, .3, ...
//! Needs a C compiler (`cc`); everything binds loopback only and every wait is bounded.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use discotech::connect::hook_server::{self, HookServerConfig};
use discotech::discovery::snapshot::{Service, Snapshot, shared};
use discotech::service::{Backend, LbPolicy, ServiceSpec};
use tokio_util::sync::CancellationToken;

const WEB: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 9);

fn target_dir() -> PathBuf {
    // target/<profile>/deps/e2e-HASH -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// The cdylib. `cargo test` builds only the rlib for tests, so build the cdylib here (a no-op
/// when it is current; cargo releases its build lock before running tests).
fn hook_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = target_dir();
        // target/<dir>: "debug" is the dev profile, any other directory is named after its profile.
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new(cargo);
        c.args([
            "build",
            "-p",
            "discotech-hook",
            "--lib",
            "--profile",
            &profile,
        ])
        .env("CARGO_TARGET_DIR", dir.parent().unwrap());
        let st = c.current_dir(env!("CARGO_MANIFEST_DIR")).status().unwrap();
        assert!(st.success(), "building the hook library failed");
        let lib = dir.join("libdiscotech_hook.so");
        assert!(lib.is_file(), "{} missing", lib.display());
        lib
    })
    .clone()
}

/// The C clients, compiled once per test run.
fn client() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/hookclient.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hookclient");
        let st = Command::new("cc")
            .args(["-O2", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success(), "cc failed");
        out
    })
}

/// A backend on `ip` that writes its name to every connection, until the test ends.
struct Greeter {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Greeter {
    fn start(ip: &str, name: &str) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, line) = (stop.clone(), format!("{name}\n"));
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(line.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An address on which nothing listens (a port bound and released).
fn dead(ip: &str) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// A second service beside `web` (names are unique in a snapshot, as in any registry).
fn other_service(lb: LbPolicy, backends: &[SocketAddr]) -> Service {
    let mut s = service(lb, backends);
    s.spec.name = "other".parse().unwrap();
    s
}

fn service(lb: LbPolicy, backends: &[SocketAddr]) -> Service {
    let mut spec = ServiceSpec::new("web".parse().unwrap());
    spec.lb = lb;
    spec.backends = backends.iter().map(|&a| Backend::new(a)).collect();
    Service {
        spec,
        magic_v4: WEB,
        magic_v6: None,
    }
}

/// `hook_server::serve` on a socket in a temp dir, on its own runtime thread.
struct Daemon {
    dir: std::sync::Arc<tempfile::TempDir>,
    shutdown: CancellationToken,
    done: mpsc::Receiver<()>,
}

impl Daemon {
    fn start(services: Vec<Service>) -> Self {
        Self::start_in(std::sync::Arc::new(tempfile::tempdir().unwrap()), services)
    }

    /// A daemon on the socket path of an earlier one (a restart).
    fn start_in(dir: std::sync::Arc<tempfile::TempDir>, services: Vec<Service>) -> Self {
        let sock = dir.path().join("hook.sock");
        let snap = shared(Snapshot::new(1, services));
        let cfg = HookServerConfig {
            socket: sock.clone(),
            fallback_file: Some(dir.path().join("hook.snapshot")),
            ..Default::default()
        };
        // The table is in place before any client starts (as the daemon writes it before it
        // binds its socket).
        let balance = hook_server::BalanceHandle::new(&cfg);
        balance.table().publish(&snap.load_full());
        let cfg = HookServerConfig {
            balance: Some(balance),
            ..cfg
        };
        let shutdown = CancellationToken::new();
        let (tx, done) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let token = shutdown.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&sock).unwrap();
                ready_tx.send(()).unwrap();
                hook_server::serve(listener, snap, cfg, token)
                    .await
                    .unwrap();
            });
            let _ = tx.send(());
        });
        ready.recv_timeout(Duration::from_secs(5)).unwrap();
        Self {
            dir,
            shutdown,
            done,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("hook.sock")
    }

    /// Stops serving and removes the socket; the table file stays unless `keep_file` is false.
    fn kill(&self, keep_file: bool) {
        self.shutdown.cancel();
        self.done.recv_timeout(Duration::from_secs(5)).unwrap();
        std::fs::remove_file(self.socket()).unwrap();
        if !keep_file {
            std::fs::remove_file(self.dir.path().join("hook.snapshot")).unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn run(socket: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("30").arg(client()).args(args);
    if let Some(socket) = socket {
        c.env("LD_PRELOAD", hook_lib())
            .env("DISCOTECH_SOCKET", socket);
    }
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn counts(out: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        *m.entry(line.to_string()).or_insert(0) += 1;
    }
    m
}

#[test]
fn round_robin_spreads_blocking_connects_evenly_over_real_backends() {
    let (a, b, c) = (
        Greeter::start("127.0.0.2", "a"),
        Greeter::start("127.0.0.3", "b"),
        Greeter::start("127.0.0.4", "c"),
    );
    let d = Daemon::start(vec![service(
        LbPolicy::RoundRobin,
        &[a.addr, b.addr, c.addr],
    )]);
    let out = run(Some(&d.socket()), &["many", "127.77.0.9", "80", "30"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let got = counts(&stdout(&out));
    assert_eq!(
        got,
        BTreeMap::from([
            ("OK a".into(), 10),
            ("OK b".into(), 10),
            ("OK c".into(), 10)
        ])
    );
}

#[test]
fn weights_hold_over_a_cycle() {
    let (a, b) = (
        Greeter::start("127.0.0.2", "a"),
        Greeter::start("127.0.0.3", "b"),
    );
    let mut svc = service(LbPolicy::WeightedRoundRobin, &[a.addr, b.addr]);
    svc.spec.backends[1].weight = 3;
    let d = Daemon::start(vec![svc]);
    let out = run(Some(&d.socket()), &["many", "127.77.0.9", "80", "40"]);
    assert_eq!(
        counts(&stdout(&out)),
        BTreeMap::from([("OK a".into(), 10), ("OK b".into(), 30)])
    );
}

#[test]
fn every_client_shape_works_through_the_hook() {
    let a = Greeter::start("127.0.0.2", "a");
    let d = Daemon::start(vec![service(LbPolicy::RoundRobin, &[a.addr])]);
    let s = d.socket();

    let out = stdout(&run(Some(&s), &["nonblock", "127.77.0.9", "80"]));
    assert!(out.starts_with("OK a first=EINPROGRESS"), "{out}");
    assert!(
        out.contains("third=EISCONN") && out.contains("nonblock=1"),
        "{out}"
    );
    assert!(
        out.contains("second=EALREADY")
            || out.contains("second=EISCONN")
            || out.contains("second=0"),
        "{out}"
    );

    assert_eq!(
        stdout(&run(Some(&s), &["v6mapped", "127.77.0.9", "80"])),
        "OK a\n"
    );
    // UDP connects are not touched: the kernel holds the magic address itself as the peer.
    assert_eq!(
        stdout(&run(Some(&s), &["udp", "127.77.0.9", "5353"])),
        "OK peer=127.77.0.9:5353\n"
    );
    // Non-magic destinations pass straight through.
    let direct = a.addr.to_string();
    let (ip, port) = direct.split_once(':').unwrap();
    assert_eq!(stdout(&run(Some(&s), &["block", ip, port])), "OK a\n");

    let out = run(Some(&s), &["forkthreads", "127.77.0.9", "80", "25"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let out = run(Some(&s), &["signal", "127.77.0.9", "80", "300"]);
    assert!(out.status.success(), "{}", stdout(&out));
}

#[test]
fn refused_backends_are_skipped_and_errno_matches_an_unhooked_connect() {
    let a = Greeter::start("127.0.0.2", "a");
    let down = dead("127.0.0.3");
    let d = Daemon::start(vec![
        service(LbPolicy::RoundRobin, &[down, a.addr]),
        Service {
            magic_v4: Ipv4Addr::new(127, 77, 0, 10),
            ..other_service(LbPolicy::RoundRobin, &[dead("127.0.0.5")])
        },
    ]);
    let out = run(Some(&d.socket()), &["many", "127.77.0.9", "80", "10"]);
    assert_eq!(counts(&stdout(&out)), BTreeMap::from([("OK a".into(), 10)]));

    // The only backend refuses: the same errno a plain connect to it gives.
    let hooked = stdout(&run(Some(&d.socket()), &["block", "127.77.0.10", "80"]));
    let ds = down.to_string();
    let (ip, port) = ds.split_once(':').unwrap();
    let plain = stdout(&run(None, &["block", ip, port]));
    assert_eq!(hooked, "ERR ECONNREFUSED\n");
    assert_eq!(hooked, plain);
}

#[test]
fn daemon_down_clients_route_from_the_table_file_and_fail_fast_with_nothing_known() {
    let (a, b) = (
        Greeter::start("127.0.0.2", "a"),
        Greeter::start("127.0.0.3", "b"),
    );
    let d = Daemon::start(vec![service(LbPolicy::RoundRobin, &[a.addr, b.addr])]);
    d.kill(true);
    let out = run(Some(&d.socket()), &["many", "127.77.0.9", "80", "10"]);
    assert_eq!(
        counts(&stdout(&out)),
        BTreeMap::from([("OK a".into(), 5), ("OK b".into(), 5)])
    );

    let d = Daemon::start(vec![service(LbPolicy::RoundRobin, &[a.addr])]);
    d.kill(false);
    let t = Instant::now();
    let out = run(Some(&d.socket()), &["block", "127.77.0.9", "80"]);
    assert_eq!(stdout(&out), "ERR ECONNREFUSED\n");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "must fail fast, took {:?}",
        t.elapsed()
    );
}

/// A squatter on the socket path, running as nobody: it answers a pick with its own backend.
/// Returns what it printed ("accepted", then "asked" if a request came).
fn squat(sock: &Path, evil: SocketAddr, client_env: &[(&str, &str)]) -> (String, String) {
    let script = format!(
        r#"
import socket, os, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind({sock:?}); os.chmod({sock:?}, 0o777); s.listen(8); s.settimeout(20)
print("listening", flush=True)
c, _ = s.accept(); print("accepted", flush=True)
req = c.recv(64)
if len(req) == 64:
    print("asked", flush=True)
    ip = bytes(10) + b"\xff\xff" + socket.inet_aton({ip:?})
    c.sendall(b"DT\x01\x81" + req[4:8] + b"\x00\x00" + struct.pack(">H", {port}) + ip + bytes(36))
    c.recv(64)
"#,
        sock = sock.to_str().unwrap(),
        ip = evil.ip().to_string(),
        port = evil.port()
    );
    let _ = std::fs::remove_file(sock);
    let mut squatter = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(squatter.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    let mut c = Command::new("timeout");
    c.arg("30")
        .arg(client())
        .args(["block", "127.77.0.9", "80"]);
    c.env("LD_PRELOAD", hook_lib())
        .env("DISCOTECH_SOCKET", sock);
    for (k, v) in client_env {
        c.env(k, v);
    }
    let out = stdout(&c.output().unwrap());
    // The squatter ends by itself once the client hangs up; give it a bounded while.
    let deadline = Instant::now() + Duration::from_secs(10);
    while squatter.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = squatter.kill();
    let _ = squatter.wait();
    let said: Vec<String> = lines.map_while(Result::ok).collect();
    (said.join(" "), out)
}

#[test]
fn named_ports_and_p2c_work_through_the_hook() {
    let (http, grpc) = (
        Greeter::start("127.0.0.2", "http"),
        Greeter::start("127.0.0.2", "grpc"),
    );
    let other = Greeter::start("127.0.0.3", "other-http");
    let mut svc = service(LbPolicy::P2c, &[http.addr]);
    let name: discotech::service::PortName = "grpc".parse().unwrap();
    svc.spec.client_ports.insert(9000, name.clone());
    svc.spec.backends[0].set_port(name, grpc.addr.port());
    let d = Daemon::start(vec![
        svc,
        Service {
            magic_v4: Ipv4Addr::new(127, 77, 0, 10),
            ..other_service(LbPolicy::P2c, &[other.addr, http.addr])
        },
    ]);
    assert_eq!(
        stdout(&run(Some(&d.socket()), &["block", "127.77.0.9", "9000"])),
        "OK grpc\n"
    );
    assert_eq!(
        stdout(&run(Some(&d.socket()), &["block", "127.77.0.9", "443"])),
        "OK http\n"
    );
    // p2c: every connect reports done, so outstanding counts stay level and both backends serve.
    let out = run(Some(&d.socket()), &["many", "127.77.0.10", "80", "40"]);
    let got = counts(&stdout(&out));
    assert_eq!(got.values().sum::<usize>(), 40, "{got:?}");
    assert!(got.get("OK other-http").is_some_and(|&n| n >= 8), "{got:?}");
    assert!(got.get("OK http").is_some_and(|&n| n >= 8), "{got:?}");
}

#[test]
fn killing_the_daemon_mid_run_keeps_a_client_on_the_backends_it_learned() {
    let (a, b) = (
        Greeter::start("127.0.0.2", "a"),
        Greeter::start("127.0.0.3", "b"),
    );
    let d = Daemon::start(vec![service(LbPolicy::RoundRobin, &[a.addr, b.addr])]);
    let mut child = Command::new("timeout")
        .arg("30")
        .arg(client())
        .args(["slowmany", "127.77.0.9", "80", "20"])
        .env("LD_PRELOAD", hook_lib())
        .env("DISCOTECH_SOCKET", d.socket())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let first: Vec<String> = lines.by_ref().take(4).map(Result::unwrap).collect();
    assert_eq!(first, ["OK a", "OK b", "OK a", "OK b"]);
    // Daemon gone, socket and table file too: the table the process mapped is left.
    d.kill(false);
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    assert_eq!(rest.len(), 16);
    let to_a = rest.iter().filter(|l| *l == "OK a").count();
    let to_b = rest.iter().filter(|l| *l == "OK b").count();
    assert_eq!(to_a + to_b, 16, "{rest:?}");
    assert!(
        to_a >= 6 && to_b >= 6,
        "keeps spreading over both: {rest:?}"
    );
}

#[test]
fn a_restarted_daemon_is_found_again_by_a_running_client() {
    let (a, b) = (
        Greeter::start("127.0.0.2", "a"),
        Greeter::start("127.0.0.3", "b"),
    );
    let d = Daemon::start(vec![service(LbPolicy::RoundRobin, &[a.addr])]);
    let mut child = Command::new("timeout")
        .arg("30")
        .arg(client())
        .args(["slowmany", "127.77.0.9", "80", "30"])
        .env("LD_PRELOAD", hook_lib())
        .env("DISCOTECH_SOCKET", d.socket())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let first: Vec<String> = lines.by_ref().take(3).map(Result::unwrap).collect();
    assert_eq!(first, ["OK a"; 3]);
    // The daemon restarts with a new backend set on the same socket.
    d.kill(false);
    let _d2 = Daemon::start_in(
        d.dir.clone(),
        vec![service(LbPolicy::RoundRobin, &[b.addr])],
    );
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    assert_eq!(rest.len(), 27);
    // The stopped daemon marked its table superseded: the client looks at the path again every
    // 200 ms until the new one is there, then follows it (50 ms between connects).
    let first_b = rest
        .iter()
        .position(|l| l == "OK b")
        .expect("follows the new daemon");
    assert!(first_b <= 10, "{rest:?}");
    assert!(rest[first_b..].iter().all(|l| l == "OK b"), "{rest:?}");
}

#[test]
fn a_daemon_socket_owned_by_another_user_is_not_trusted() {
    let evil = Greeter::start("127.0.0.6", "evil");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let sock = dir.path().join("hook.sock");
    let (said, out) = squat(&sock, evil.addr, &[]);
    assert_eq!(said, "accepted", "the hook must hang up before asking");
    assert_eq!(
        out, "ERR ECONNREFUSED\n",
        "the hook followed a daemon it must not trust"
    );
    // Control: naming that uid as the daemon's makes the same squatter trusted.
    let (said, out) = squat(&sock, evil.addr, &[("DISCOTECH_DAEMON_UID", "65534")]);
    assert_eq!(said, "accepted asked");
    assert_eq!(out, "OK evil\n");
}

#[test]
fn a_table_file_others_could_have_written_is_not_believed() {
    use std::os::unix::fs::PermissionsExt;
    let (a, b) = (
        Greeter::start("127.0.0.2", "a"),
        Greeter::start("127.0.0.3", "b"),
    );
    let d = Daemon::start(vec![service(LbPolicy::RoundRobin, &[a.addr, b.addr])]);
    d.kill(true);
    let table = d.dir.path().join("hook.snapshot");
    // As the daemon left it (root, 0644): believed.
    let out = run(Some(&d.socket()), &["block", "127.77.0.9", "80"]);
    assert!(stdout(&out).starts_with("OK "), "{}", stdout(&out));

    // Writable by others: anyone could have put any routes there.
    std::fs::set_permissions(&table, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run(Some(&d.socket()), &["block", "127.77.0.9", "80"]);
    assert_eq!(
        stdout(&out),
        "ERR ECONNREFUSED\n",
        "a world-writable table was used"
    );

    // Owned by another user (nobody), even with a safe mode.
    std::fs::set_permissions(&table, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&table, Some(65534), Some(65534)).unwrap();
    let out = run(Some(&d.socket()), &["block", "127.77.0.9", "80"]);
    assert_eq!(
        stdout(&out),
        "ERR ECONNREFUSED\n",
        "another user's table was used"
    );
}
