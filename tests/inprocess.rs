//! The whole daemon in-process, on ephemeral loopback sockets: `daemon::run` on listeners bound
//! by the test. No root, no namespace, no child process; for what does not need the kernel's
//! view of a namespace (the black-box tests in `tests/blackbox/` cover that).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use discotech::config::Config;
use discotech::daemon::{Control, Listeners, run};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

struct InProcess {
    dir: tempfile::TempDir,
    dns: SocketAddr,
    http: SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    daemon: std::thread::JoinHandle<Result<(), discotech::daemon::DaemonError>>,
}

/// A daemon on 127.0.0.1 port 0 serving the zone `zone` (file source), with its hook, admin and
/// state in a temp dir and the catch path off (it would act on this host's namespace).
fn start(zone: &str) -> InProcess {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::create_dir(dir.path().join("zones")).unwrap();
    std::fs::write(dir.path().join("zones/web.toml"), zone).unwrap();
    let toml = format!(
        "[dns]\nlisten = [\"127.0.0.1:0\"]\nupstreams = []\n\
         [state]\ndir = \"{d}/state\"\n\
         [hook]\nsocket = \"{d}/hook.sock\"\n[admin]\nsocket = \"{d}/admin.sock\"\n\
         [metrics]\nlisten = [\"127.0.0.1:0\"]\n[catch]\nmode = \"off\"\n\
         [[source]]\nkind = \"file\"\npath = \"{d}/zones\"\n"
    );
    let path = dir.path().join("discotech.toml");
    std::fs::write(&path, &toml).unwrap();
    let config = Config::parse(&path, &toml, &[]).unwrap();
    let listeners = Listeners::bind(&config).unwrap();
    let dns = listeners.dns_udp[0].local_addr().unwrap();
    let http = listeners.http[0].local_addr().unwrap();
    let control = Control::default();
    let shutdown = control.shutdown.clone();
    let daemon = std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(config, listeners, control))
    });
    InProcess {
        dir,
        dns,
        http,
        shutdown,
        daemon,
    }
}

impl InProcess {
    /// One question over UDP; the reply.
    fn ask(&self, name: &str, rtype: RecordType) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut q = Message::query();
        q.metadata.id = 4242;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            socket.send_to(&q.to_vec().unwrap(), self.dns).unwrap();
            let mut buf = [0u8; 4096];
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                let reply = Message::from_vec(&buf[..n]).unwrap();
                assert_eq!(reply.metadata.id, 4242);
                assert_eq!(reply.metadata.message_type, MessageType::Response);
                assert_eq!(reply.metadata.op_code, OpCode::Query);
                return reply;
            }
            assert!(Instant::now() < deadline, "no DNS answer from {}", self.dns);
        }
    }

    /// One admin request (a JSON line); the reply's JSON.
    fn admin(&self, request: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(self.dir.path().join("admin.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(s, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn get(&self, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(self.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn stop(self) {
        self.shutdown.cancel();
        let started = Instant::now();
        let result = self.daemon.join().unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "stopped after {:?}",
            started.elapsed()
        );
    }
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_daemon_answers_dns_admin_and_metrics_in_process_and_follows_its_zone_files() {
    let d = start("[services.web]\nbackends = [\"10.0.0.5:8080\", \"10.0.0.6:8080\"]\n");

    let a = d.ask("web.disco.", RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    let magic = a_records(&a);
    assert_eq!(magic.len(), 1, "{a:?}");
    assert!(magic[0].starts_with("127.77."), "{magic:?}");
    let srv = d.ask("web.disco.", RecordType::SRV);
    assert_eq!(srv.answers.len(), 2, "{srv:?}");
    let nx = d.ask("nope.disco.", RecordType::A);
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);

    let status = d.admin(r#"{"cmd":"status"}"#);
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["data"]["services"], 1, "{status}");
    assert_eq!(status["data"]["catch"]["on"], false, "{status}");
    let backends = d.admin(r#"{"cmd":"backends","service":"web"}"#);
    assert_eq!(
        backends["data"].as_array().map(Vec::len),
        Some(2),
        "{backends}"
    );

    let metrics = d.get("/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains(
            "discotech_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",answer=\"local\"}"
        ),
        "{metrics}"
    );

    // A zone file edit is served without a restart, and the magic address does not move.
    std::fs::write(
        d.dir.path().join("zones/web.toml"),
        "[services.web]\nbackends = [\"10.0.0.5:8080\", \"10.0.0.6:8080\", \"10.0.0.7:8080\"]\n\
         [services.api]\nbackends = [\"10.0.0.9:9000\"]\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.ask("api.disco.", RecordType::A).metadata.response_code != ResponseCode::NoError {
        assert!(Instant::now() < deadline, "the new zone was not served");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.ask("web.disco.", RecordType::SRV).answers.len(), 3);
    assert_eq!(a_records(&d.ask("web.disco.", RecordType::A)), magic);
    assert!(Path::new(&d.dir.path().join("state")).is_dir());
    d.stop();
}

#[test]
fn a_broken_config_is_refused_on_reload_and_the_running_one_keeps_serving() {
    let d = start("[services.web]\nbackends = [\"10.0.0.5:8080\"]\n");
    let magic = a_records(&d.ask("web.disco.", RecordType::A));
    let path = d.dir.path().join("discotech.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("mode = \"off\"", "mode = \"sometimes\""),
    )
    .unwrap();
    let reply = d.admin(r#"{"cmd":"reload"}"#);
    assert_eq!(reply["ok"], false, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("discotech.toml:") && error.contains("catch.mode"),
        "names the file, line and field: {error}"
    );
    assert_eq!(a_records(&d.ask("web.disco.", RecordType::A)), magic);
    d.stop();
}
