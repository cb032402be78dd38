//! Connection prefetching with a real round trip: the backends live in a second network namespace
//! behind a delay line (`tests/clients/delayline.c`, two TUN devices, 2.5 ms each way, since this
//! kernel has no netem qdisc), so a plain connect costs 5 ms and a handed-over one none. Real
//! clients run through `discotech run`: C, curl, nginx (proxy_pass), Node, Java's HttpClient and
//! Python asyncio.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::{DISCOTECH, Daemon, Netns, c_program, eventually, succeeded};

/// One way; the round trip is twice this.
const DELAY_US: &str = "2500";
const RTT_US: u64 = 5_000;

/// A backend HTTP server: GET /id answers its name, GET /blob 10 MiB of a fixed pattern, POST
/// /sum the SHA-256 of the body. With IDLE > 0 it closes a connection that sends nothing for that
/// many seconds (as nginx's client_header_timeout does).
const SERVER: &str = r#"
import hashlib, http.server, socketserver, sys
ip, port, name, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
BLOB = bytes(range(256)) * (10 * 1024 * 1024 // 256)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = idle if idle > 0 else None
    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(BLOB if self.path == "/blob" else name.encode())
    def do_POST(self):
        left, h = int(self.headers["Content-Length"]), hashlib.sha256()
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        self.reply(h.hexdigest().encode())
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
S((ip, port), H).serve_forever()
"#;

/// The namespace of the far side (its pid) with backends `a` on 10.9.1.2:8080 and `b` on
/// 10.9.1.3:8080, reached from the test's namespace (source 10.9.0.1) through the delay line.
fn far_backends(ns: &Netns, idle_s: &str) -> u32 {
    let peer = ns.spawn(
        "unshare",
        &["--net", "sh", "-c", "ip link set lo up && exec sleep 600"],
        &ns.path("peer.log"),
    );
    let own = ns.ok("readlink", &["/proc/self/ns/net"]);
    let separate = eventually(Duration::from_secs(5), || {
        let theirs = ns.run("readlink", &[&format!("/proc/{peer}/ns/net")]);
        (theirs.status.success() && String::from_utf8_lossy(&theirs.stdout) != own).then_some(())
    });
    assert!(separate.is_some(), "the far namespace did not come up");
    let line = c_program("delayline");
    let log = ns.path("delayline.log");
    ns.spawn(
        line.to_str().expect("utf-8"),
        &[DELAY_US, &peer.to_string(), "600"],
        &log,
    );
    let ready = eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("ready"))
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "delay line: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    ns.ok(
        "sh",
        &["-c", "ip addr add 10.9.0.1/32 dev dla && ip link set dla up && ip route add 10.9.1.0/24 dev dla src 10.9.0.1"],
    );
    let peer_s = peer.to_string();
    ns.ok(
        "nsenter",
        &["-t", &peer_s, "-n", "sh", "-c", "ip addr add 10.9.1.2/32 dev dlb && ip addr add 10.9.1.3/32 dev dlb && ip link set dlb up && ip route add 10.9.0.0/24 dev dlb"],
    );
    for (name, ip) in [("a", "10.9.1.2"), ("b", "10.9.1.3")] {
        ns.spawn(
            "nsenter",
            &[
                "-t", &peer_s, "-n", "python3", "-c", SERVER, ip, "8080", name, idle_s,
            ],
            &ns.path(&format!("backend-{name}.log")),
        );
        let url = format!("http://{ip}:8080/id");
        let up = eventually(Duration::from_secs(10), || {
            let out = ns.run("curl", &["-sf", "--max-time", "2", &url]);
            (out.stdout == name.as_bytes()).then_some(())
        });
        assert!(up.is_some(), "backend {name} did not start");
    }
    peer
}

/// A daemon serving `web` over the far backends with `prefetch`, metrics on :9253, as the
/// namespace's resolver.
fn daemon<'a>(ns: &'a Netns, prefetch: &str) -> Daemon<'a> {
    let mut d = Daemon::configure(
        ns,
        "127.0.0.53:53",
        "upstreams = []\n[metrics]\nlisten = [\"127.0.0.1:9253\"]",
    );
    d.zone(
        "web.toml",
        &format!("[services.web]\nlb = \"round-robin\"\nbackends = [\"10.9.1.2:8080\", \"10.9.1.3:8080\"]\nprefetch = {prefetch}\n"),
    );
    d.start();
    ns.resolv_conf("127.0.0.53");
    d
}

/// The daemon's prefetch metrics for `web`: "handed_over", "empty", "pooled", "closed", ...
fn counts(ns: &Netns) -> BTreeMap<String, u64> {
    let text = ns.ok(
        "curl",
        &["-sf", "--max-time", "5", "http://127.0.0.1:9253/metrics"],
    );
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("discotech_prefetch_"))
    {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let result = key
            .split("result=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or(if key.contains("pooled") {
                "pooled"
            } else {
                "?"
            });
        *out.entry(result.to_string()).or_default() += value.parse::<u64>().unwrap_or(0);
    }
    out
}

fn count(ns: &Netns, what: &str) -> u64 {
    counts(ns).get(what).copied().unwrap_or(0)
}

/// Waits until the daemon holds `n` connections ready.
fn pooled(ns: &Netns, n: u64) {
    let full = eventually(Duration::from_secs(10), || {
        (count(ns, "pooled") >= n).then_some(())
    });
    assert!(full.is_some(), "pools did not fill: {:?}", counts(ns));
}

fn magic(d: &Daemon<'_>) -> String {
    d.short("web.disco", "A")
        .first()
        .cloned()
        .expect("web has a magic address")
}

/// `prefetchclient time`: (connect µs, body) per connect.
fn timed(out: &std::process::Output) -> Vec<(u64, String)> {
    succeeded(out)
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, ' ');
            let us = f.next().and_then(|u| u.parse().ok()).expect("connect µs");
            let _last_byte = f.next().expect("µs to the last byte");
            (us, f.next().unwrap_or_default().to_string())
        })
        .collect()
}

fn options(out: &std::process::Output) -> BTreeMap<String, String> {
    succeeded(out)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_prefetched_connect_skips_the_round_trip_and_keeps_the_programs_socket_options() {
    let ns = Netns::new();
    let peer = far_backends(&ns, "0");
    let d = daemon(&ns, "{ pool = 4, max_idle = \"5s\" }");
    let m = magic(&d);
    let client = c_program("prefetchclient");
    let client = client.to_str().expect("utf-8");

    // Without the hook each connect waits for the handshake's round trip.
    let plain = timed(&ns.run(client, &["time", "10.9.1.2", "8080", "5"]));
    assert!(
        plain.iter().all(|(us, body)| *us >= RTT_US && body == "a"),
        "{plain:?}"
    );

    pooled(&ns, 2);
    let hooked = timed(&d.hooked(&[client, "time", &m, "8080", "10"]));
    let mut us: Vec<u64> = hooked.iter().map(|h| h.0).collect();
    us.sort_unstable();
    assert!(
        us[us.len() / 2] < 1_000,
        "median connect under 1 ms: {hooked:?}"
    );
    assert!(
        us.iter().all(|&t| t < RTT_US),
        "no connect waited for a handshake: {hooked:?}"
    );
    let bodies: Vec<&str> = hooked.iter().map(|h| h.1.as_str()).collect();
    assert_eq!(
        bodies,
        ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b"],
        "round robin"
    );
    assert_eq!(
        (count(&ns, "handed_over"), count(&ns, "empty")),
        (10, 0),
        "{:?}",
        counts(&ns)
    );

    // The program's options and flags, set before connect(), are on the socket it gets; the
    // same run without the hook (a socket of its own) reads back exactly the same.
    let direct = options(&ns.run(client, &["opts", "10.9.1.2", "8080"]));
    let handed = options(&d.hooked(&[client, "opts", &m, "8080"]));
    assert_eq!(count(&ns, "handed_over"), 11, "{:?}", counts(&ns));
    for (k, want) in [
        ("connect", "EINPROGRESS"),
        ("so_error", "0"),
        // After a non-blocking connect completed, the kernel answers the next connect() 0.
        ("again", "0"),
        ("nonblock", "1"),
        ("cloexec", "1"),
        ("SO_KEEPALIVE", "1"),
        ("TCP_NODELAY", "1"),
        ("SO_RCVBUF", "131072"),
        ("SO_SNDBUF", "65536"),
        ("SO_LINGER", "1,7"),
        ("IP_TOS", "16"),
        ("SO_PRIORITY", "3"),
        ("SO_MARK", "42"),
        ("TCP_USER_TIMEOUT", "12345"),
        ("TCP_KEEPIDLE", "33"),
        ("TCP_KEEPINTVL", "7"),
        ("TCP_KEEPCNT", "4"),
    ] {
        assert_eq!(
            handed.get(k).map(String::as_str),
            Some(want),
            "{k}: {handed:?}"
        );
        assert_eq!(
            direct.get(k).map(String::as_str),
            Some(want),
            "{k} (direct): {direct:?}"
        );
    }
    for (k, v) in &direct {
        if !["connect_us", "id"].contains(&k.as_str()) {
            assert_eq!(
                handed.get(k),
                Some(v),
                "{k}: hooked {handed:?}, direct {direct:?}"
            );
        }
    }
    assert!(["a", "b"].contains(&handed["id"].as_str()), "{handed:?}");
    let took: u64 = handed["connect_us"].parse().expect("µs");
    assert!(took < RTT_US, "handed over without a handshake: {handed:?}");

    // A program in another network namespace (here the backends' own) is not handed the
    // daemon's connection, which would reach what the daemon reaches: it connects by itself.
    let config = d.config.to_str().expect("utf-8");
    let out = ns.run(
        "nsenter",
        &[
            "-t",
            &peer.to_string(),
            "-n",
            DISCOTECH,
            "run",
            "--config",
            config,
            "--",
            client,
            "time",
            &m,
            "8080",
            "1",
        ],
    );
    let there = timed(&out);
    assert!(
        there.len() == 1 && ["a", "b"].contains(&there[0].1.as_str()),
        "{there:?}"
    );
    assert_eq!(
        (count(&ns, "other_netns"), count(&ns, "handed_over")),
        (1, 11),
        "{:?}",
        counts(&ns)
    );
}

#[test]
fn ten_megabytes_each_way_arrive_byte_exact_over_a_prefetched_connection() {
    let ns = Netns::new();
    far_backends(&ns, "0");
    let d = daemon(&ns, "{ pool = 2, max_idle = \"5s\" }");
    pooled(&ns, 2);
    let sha = |path: &str| {
        ns.ok("sha256sum", &[path])
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_string()
    };

    let direct = ns.path("direct.bin");
    ns.ok(
        "curl",
        &[
            "-sf",
            "-o",
            direct.to_str().expect("utf-8"),
            "http://10.9.1.2:8080/blob",
        ],
    );
    let fetched = ns.path("fetched.bin");
    let out = d.hooked(&[
        "curl",
        "-sf",
        "-o",
        fetched.to_str().expect("utf-8"),
        "http://web.disco:8080/blob",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&fetched).map(|m| m.len()).ok(),
        Some(10 * 1024 * 1024)
    );
    assert_eq!(
        sha(fetched.to_str().expect("utf-8")),
        sha(direct.to_str().expect("utf-8"))
    );

    let upload = ns.path("upload.bin");
    ns.ok(
        "sh",
        &[
            "-c",
            &format!("head -c 10485760 /dev/urandom > {}", upload.display()),
        ],
    );
    let out = d.hooked(&[
        "curl",
        "-sf",
        "--data-binary",
        &format!("@{}", upload.display()),
        "http://web.disco:8080/sum",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        sha(upload.to_str().expect("utf-8"))
    );
    assert_eq!(
        count(&ns, "handed_over"),
        2,
        "both went over pooled connections: {:?}",
        counts(&ns)
    );
}

#[test]
fn curl_nginx_node_java_and_python_asyncio_take_prefetched_connections() {
    let ns = Netns::new();
    far_backends(&ns, "0");
    let d = daemon(&ns, "{ pool = 4, max_idle = \"5s\" }");
    let config = d.config.to_str().expect("utf-8").to_string();
    pooled(&ns, 2);
    // Each client's connects: all but the first of a new socket family (Java's AF_INET6 sockets
    // are pooled once asked for) are handed over.
    let check = |who: &str, out: std::process::Output, n: u64, before: u64| {
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{who}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(names.len() as u64, n, "{who}: {text}");
        assert!(
            names.iter().all(|b| ["a", "b"].contains(b)),
            "{who}: {text}"
        );
        let got = count(&ns, "handed_over") - before;
        assert!(
            got + 1 >= n,
            "{who}: {got} of {n} connects handed over: {:?}",
            counts(&ns)
        );
    };

    let before = count(&ns, "handed_over");
    let curl = d.hooked(&[
        "sh",
        "-c",
        "for i in 1 2 3 4; do curl -sf http://web.disco:8080/id; echo; sleep 0.1; done",
    ]);
    check("curl", curl, 4, before);

    let before = count(&ns, "handed_over");
    let node = d.hooked(&[
        "node",
        "-e",
        "const http = require('http'); let n = 0;
         const next = () => http.get({host: 'web.disco', port: 8080, path: '/id', agent: false}, r => {
           let b = ''; r.on('data', d => b += d); r.on('end', () => { console.log(b); if (++n < 4) setTimeout(next, 100); });
         }).on('error', e => { console.error(e); process.exit(1); });
         next();",
    ]);
    check("node", node, 4, before);

    let before = count(&ns, "handed_over");
    let py = d.hooked(&[
        "python3",
        "-c",
        "import asyncio
async def get():
    r, w = await asyncio.open_connection('web.disco', 8080)
    w.write(b'GET /id HTTP/1.0\\r\\n\\r\\n'); await w.drain()
    body = (await r.read()).split(b'\\r\\n\\r\\n', 1)[1]
    w.close(); print(body.decode())
async def main():
    for _ in range(4):
        await get(); await asyncio.sleep(0.1)
asyncio.run(main())",
    ]);
    check("python asyncio", py, 4, before);

    let java = ns.path("Get.java");
    std::fs::write(
        &java,
        "import java.net.URI; import java.net.http.*;
public class Get { public static void main(String[] a) throws Exception {
  for (int i = 0; i < 4; i++) {
    HttpClient c = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).build();
    HttpResponse<String> r = c.send(HttpRequest.newBuilder(URI.create(\"http://web.disco:8080/id\")).build(), HttpResponse.BodyHandlers.ofString());
    System.out.println(r.body()); Thread.sleep(100);
  } } }",
    )
    .expect("java source");
    let before = count(&ns, "handed_over");
    let java = d.hooked(&[
        "java",
        "-Djava.net.preferIPv4Stack=false",
        java.to_str().expect("utf-8"),
    ]);
    check("java", java, 4, before);

    let conf = ns.path("nginx.conf");
    let dir = ns.dir.path().display().to_string();
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; pid {dir}/nginx.pid; error_log {dir}/nginx-error.log;
events {{}}
http {{ access_log off; client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{ listen 127.0.0.1:8090; location / {{ proxy_pass http://web.disco:8080; }} }} }}
"
        ),
    )
    .expect("nginx conf");
    ns.spawn(
        DISCOTECH,
        &[
            "run",
            "--config",
            &config,
            "--",
            "nginx",
            "-c",
            conf.to_str().expect("utf-8"),
        ],
        &ns.path("nginx.log"),
    );
    let up = eventually(Duration::from_secs(10), || {
        ns.run(
            "curl",
            &["-sf", "--max-time", "2", "http://127.0.0.1:8090/id"],
        )
        .status
        .success()
        .then_some(())
    });
    assert!(
        up.is_some(),
        "nginx did not start: {}{}",
        std::fs::read_to_string(ns.path("nginx.log")).unwrap_or_default(),
        std::fs::read_to_string(ns.path("nginx-error.log")).unwrap_or_default()
    );
    let before = count(&ns, "handed_over");
    let nginx = ns.run(
        "sh",
        &[
            "-c",
            "for i in 1 2 3 4; do curl -sf http://127.0.0.1:8090/id; echo; sleep 0.1; done",
        ],
    );
    check("nginx proxy_pass", nginx, 4, before);
}

#[test]
fn a_backend_that_closes_idle_connections_never_fails_a_client() {
    let ns = Netns::new();
    // The backends close a connection that is silent for 1 s; the pool would keep one for 5 s.
    far_backends(&ns, "1");
    let d = daemon(&ns, "{ pool = 2, max_idle = \"5s\" }");
    pooled(&ns, 2);
    for i in 0..6 {
        // Every pooled connection is older than the backends' idle timeout by now.
        std::thread::sleep(Duration::from_millis(1_500));
        let out = d.hooked(&["curl", "-sf", "--max-time", "5", "http://web.disco:8080/id"]);
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && ["a", "b"].contains(&&*body),
            "request {i}: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let c = counts(&ns);
    assert!(
        c.get("closed").copied().unwrap_or(0) >= 1,
        "closed ones were seen and dropped: {c:?}"
    );
}

#[test]
fn draining_closes_a_backends_pool_at_once_and_a_dead_daemon_leaves_ordinary_connects() {
    let ns = Netns::new();
    far_backends(&ns, "0");
    let mut d = daemon(&ns, "{ pool = 4, max_idle = \"30s\" }");
    let m = magic(&d);
    pooled(&ns, 2);
    let to_a = || -> usize {
        ns.ok("ss", &["-Htn", "state", "established", "dst", "10.9.1.2"])
            .lines()
            .count()
    };
    assert!(to_a() >= 1, "connections to a are pooled");
    let config = d.config.to_str().expect("utf-8").to_string();
    let started = Instant::now();
    ns.ok(
        DISCOTECH,
        &["drain", "--config", &config, "web", "10.9.1.2:8080"],
    );
    let closed = eventually(Duration::from_secs(5), || {
        (to_a() == 0).then(|| started.elapsed())
    });
    let took = closed.expect("the drained backend's pool closes");
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    let listing = ns.ok(DISCOTECH, &["backends", "--config", &config, "web"]);
    assert!(listing.contains("POOLED"), "{listing}");

    // Without the daemon, connects to the service are made by the hook, as without prefetching.
    let pid = d.pid.to_string();
    ns.ok("kill", &["-KILL", &pid]);
    d.stop();
    let client = c_program("prefetchclient");
    let out = d.hooked(&[client.to_str().expect("utf-8"), "time", &m, "8080", "6"]);
    let runs = timed(&out);
    assert_eq!(runs.len(), 6);
    assert!(
        runs.iter().all(|(us, body)| *us >= RTT_US && body == "b"),
        "ordinary connects to the undrained backend: {runs:?}"
    );
}
