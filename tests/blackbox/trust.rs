//! What one local user can do to another through the hook's shared state, tested with real
//! uids (setpriv): false failure reports (over the socket and in the live region's ring) are
//! hints the daemon checks with its own connect, so they change no other uid's picks; junk
//! written over the live counters skews choices only among the backends the table allows.

use std::time::{Duration, Instant};

use crate::balance::{c_program, connects_as, count, daemon};
use crate::harness::ensure_hook_library;
use crate::harness::{DISCOTECH, Daemon, Netns, eventually, example, greeter};

const ZONE: &str = "[services.web]\nlb = \"round-robin\"\nbackends = [\"127.0.0.2:7001\", \"127.0.0.3:7001\"]\n\
    [services.sticky]\nlb = \"maglev\"\nbackends = [\"127.0.0.2:7001\", \"127.0.0.3:7001\"]\n";

/// Starts `hostile_hook` as uid 2000 against `service`'s magic address; returns its log path.
fn hostile(ns: &Netns, d: &Daemon, service: &str, secs: u32, extra: &[&str]) -> std::path::PathBuf {
    let magic = d.short(&format!("{service}.disco"), "A").remove(0);
    let log = ns.path(&format!("hostile-{service}.log"));
    let socket = ns.path("hook.sock");
    let tool = example("hostile_hook");
    let secs = secs.to_string();
    let mut args = vec![
        "--reuid=2000",
        "--regid=2000",
        "--clear-groups",
        tool.as_str(),
        socket.to_str().expect("utf-8"),
        magic.as_str(),
        "7001",
        secs.as_str(),
        "100",
    ];
    args.extend_from_slice(extra);
    args.extend(["127.0.0.2:7001", "127.0.0.3:7001"]);
    ns.spawn("setpriv", &args, &log);
    log
}

/// What a hostile_hook run printed once it ended: its (socket, ring) report counts.
fn hostile_done(log: &std::path::Path, within: Duration) -> (u64, u64) {
    let line = eventually(within, || {
        std::fs::read_to_string(log)
            .ok()
            .filter(|t| t.contains("socket_reports="))
    })
    .unwrap_or_else(|| {
        panic!(
            "hostile_hook did not finish: {:?}",
            std::fs::read_to_string(log)
        )
    });
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (field("socket_reports="), field("ring_reports="))
}

fn backends(ns: &Netns, service: &str) -> String {
    let admin = ns.path("admin.sock");
    ns.ok(
        DISCOTECH,
        &[
            "backends",
            service,
            "--socket",
            admin.to_str().expect("utf-8"),
        ],
    )
}

#[test]
fn false_failure_reports_from_another_uid_change_none_of_roots_picks() {
    let ns = Netns::new();
    greeter(&ns, "a", "127.0.0.2");
    greeter(&ns, "b", "127.0.0.3");
    let d = daemon(&ns, ZONE);
    let srv_before = d.short("web.disco", "SRV");
    assert_eq!(srv_before.len(), 2, "{srv_before:?}");
    let sticky = connects_as(&ns, &d, 0, "sticky", 5);
    assert!(
        sticky.len() == 5 && sticky.iter().all(|w| *w == sticky[0]),
        "maglev keeps root on one backend: {sticky:?}"
    );

    // 100 rounds a second for 60 s, on both services: a Failed message for each backend over
    // the socket and a Failed report in the ring for every slot in use.
    let logs = [
        hostile(&ns, &d, "web", 60, &[]),
        hostile(&ns, &d, "sticky", 60, &[]),
    ];
    let started = Instant::now();
    let mut web = Vec::new();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(58) {
        std::thread::sleep(Duration::from_secs(2));
        let got = connects_as(&ns, &d, 0, "web", 10);
        assert!(
            got.len() == 10 && got.iter().all(|w| w == "a" || w == "b"),
            "round {rounds}: {got:?}"
        );
        web.extend(got);
        let stuck = connects_as(&ns, &d, 0, "sticky", 5);
        assert!(
            stuck.iter().all(|w| *w == sticky[0]) && stuck.len() == 5,
            "round {rounds}: root's maglev pick moved: {stuck:?} (was {})\n{}",
            sticky[0],
            backends(&ns, "sticky")
        );
        rounds += 1;
    }
    // Round robin's turn counter is shared by every uid (a Failed message over the socket is
    // also a request for a pick), so root's picks need not alternate; both backends must get
    // their share, as they do without the noise.
    let (a, b) = (count(&web, "a"), count(&web, "b"));
    eprintln!("root's round robin picks under 60 s of false reports: a={a} b={b}");
    assert!(
        a * 10 >= web.len() * 4 && b * 10 >= web.len() * 4,
        "a={a} b={b} of {}",
        web.len()
    );
    for log in &logs {
        let (socket, ring) = hostile_done(log, Duration::from_secs(15));
        // 100 rounds a second for 60 s is 12000 socket reports and 48000 ring reports at
        // most (two backends; four slots); sleeps between rounds make it fewer.
        assert!(
            socket >= 6000 && ring >= 12000,
            "{log:?}: socket={socket} ring={ring}"
        );
    }
    for service in ["web", "sticky"] {
        let table = backends(&ns, service);
        assert_eq!(
            table
                .lines()
                .filter(|l| l.trim_end().ends_with("serving"))
                .count(),
            2,
            "{table}"
        );
    }
    assert_eq!(
        d.short("web.disco", "SRV"),
        srv_before,
        "SRV answers unchanged"
    );
    let log = d.log_text();
    assert!(!log.contains("backend ejected"), "{log}");
    let metrics = ns.ok(
        "curl",
        &["-sf", "--max-time", "5", "http://127.0.0.1:9253/metrics"],
    );
    assert!(
        metrics.contains(r#"discotech_hook_requests_total{service="web",result="hint_refuted"}"#)
            && !metrics.contains(r#"result="hint_confirmed""#),
        "the daemon checked the reports and found them false: {metrics}"
    );
}

#[test]
fn junk_in_the_live_counters_skews_picks_only_among_the_tables_backends() {
    let ns = Netns::new();
    greeter(&ns, "a", "127.0.0.2");
    greeter(&ns, "b", "127.0.0.3");
    // A backup tier that must stay idle while a and b serve, and a greeter in no service.
    greeter(&ns, "c", "127.0.0.4");
    greeter(&ns, "x", "127.0.0.9");
    let mut zone = String::new();
    for (name, lb) in [("web", "round-robin"), ("lc", "least-conn"), ("p2", "p2c")] {
        zone.push_str(&format!(
            "[services.{name}]\nlb = \"{lb}\"\nbackends = [\"127.0.0.2:7001\", \"127.0.0.3:7001\", \
             {{ addr = \"127.0.0.4:7001\", priority = 1 }}]\n"
        ));
    }
    let d = daemon(&ns, &zone);
    let log = hostile(&ns, &d, "web", 6, &["--scribble", "--slots", "64"]);
    std::thread::sleep(Duration::from_millis(500));
    let mut seen = Vec::new();
    for _ in 0..4 {
        for service in ["web", "lc", "p2"] {
            let got = connects_as(&ns, &d, 0, service, 10);
            assert_eq!(got.len(), 10, "{service}: {got:?}");
            seen.extend(got);
        }
    }
    let (socket, _) = hostile_done(&log, Duration::from_secs(20));
    assert!(socket > 0, "the hostile process ran");
    assert!(
        seen.iter().all(|w| w == "a" || w == "b"),
        "every pick stays with the serving candidates (no c, no x, no error): {seen:?}"
    );
    // Plain hooked connects as another user still work after the junk.
    let hookclient = c_program("hookclient");
    let magic = d.short("web.disco", "A").remove(0);
    let after = d.hooked(&[&hookclient, "many", &magic, "7001", "4"]);
    let text = String::from_utf8_lossy(&after.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("OK ")).count(),
        4,
        "{text}"
    );
}

/// Opens `n` connections to the hook socket at argv[1], then after a second prints how many the
/// daemon kept open, and holds them for argv[3] seconds.
const HOARDER: &str = "import socket, sys, time
path, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        held.append(s)
    except OSError:
        s.close()
time.sleep(1)
open_ = 0
for s in held:
    try:
        open_ += s.recv(1, socket.MSG_DONTWAIT) != b''
    except BlockingIOError:
        open_ += 1
    except OSError:
        pass
print('connected', len(held), 'open', open_, flush=True)
time.sleep(hold)
";

#[test]
fn one_uid_hoarding_hook_connections_starves_neither_dns_nor_admin_nor_other_uids() {
    ensure_hook_library();
    let ns = Netns::new();
    greeter(&ns, "a", "127.0.0.2");
    greeter(&ns, "b", "127.0.0.3");
    let mut d = Daemon::configure(&ns, "127.0.0.53:53", "upstreams = []");
    d.zone("web.toml", ZONE);
    // A hard limit of 1024 descriptors, as a daemon started by hand under a default ulimit has.
    d.start_under(&["prlimit", "--nofile=1024:1024"]);
    ns.resolv_conf("127.0.0.53");
    let log = ns.path("hoarder.log");
    let socket = ns.path("hook.sock");
    ns.spawn(
        "setpriv",
        &[
            "--reuid=2000",
            "--regid=2000",
            "--clear-groups",
            // Debian's, not a per-user install other uids cannot reach.
            "/usr/bin/python3",
            "-c",
            HOARDER,
            socket.to_str().expect("utf-8"),
            "1100",
            "30",
        ],
        &log,
    );
    let said = eventually(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("open"))
    })
    .unwrap_or_else(|| {
        panic!(
            "the hoarder said nothing: {:?}",
            std::fs::read_to_string(&log)
        )
    });
    let open: usize = said
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    eprintln!("uid 2000: {said}");
    assert!(open <= 256, "one uid holds {open} hook connections: {said}");

    // With uid 2000's connections held: DNS over UDP and TCP, the admin socket, metrics and
    // root's hooked connects all work.
    assert_eq!(d.short("web.disco", "SRV").len(), 2);
    assert_eq!(
        d.dig(&["+tcp", "+short", "web.disco", "SRV"])
            .lines()
            .count(),
        2
    );
    let admin = ns.path("admin.sock");
    let status = ns.ok(
        DISCOTECH,
        &["status", "--socket", admin.to_str().expect("utf-8")],
    );
    assert!(status.contains("services: 2"), "{status}");
    ns.ok(
        "curl",
        &["-sf", "--max-time", "5", "http://127.0.0.1:9253/metrics"],
    );
    let got = connects_as(&ns, &d, 0, "web", 10);
    assert_eq!(got.len(), 10, "{got:?}");
    assert!(got.iter().all(|w| w == "a" || w == "b"), "{got:?}");
    assert!(
        d.log_text().contains("open descriptor limit"),
        "{}",
        d.log_text()
    );
}
