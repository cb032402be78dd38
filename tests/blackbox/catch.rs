//! Programs the hook cannot enter, with no hook at all: a Go `net/http` client built here with
//! Debian's golang-go, static `busybox wget`, and a python started with `env -i`. Their connects to
//! magic addresses are sent to backends by the daemon's BPF programs inside connect().

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::{DISCOTECH, Daemon, Netns, backend, eventually, succeeded};

const GO_CLIENT: &str = r#"package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
)

// GET URL N times without keep-alive; one line per answer.
func main() {
	n, _ := strconv.Atoi(os.Args[2])
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for i := 0; i < n; i++ {
		r, err := c.Get(os.Args[1])
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		b, _ := io.ReadAll(r.Body)
		r.Body.Close()
		fmt.Println(string(b))
	}
}
"#;

/// The Go client, built once per test run (Go's own resolver and connect: no libc, no hook).
fn go_client() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("goclient");
            std::fs::create_dir_all(&dir).expect("go dir");
            std::fs::write(dir.join("main.go"), GO_CLIENT).expect("main.go");
            let out = dir.join("goget");
            let status = std::process::Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg("main.go")
                .current_dir(&dir)
                .env("GOCACHE", dir.join("cache"))
                .env("GOPATH", dir.join("gopath"))
                .env("HOME", &dir)
                .env("CGO_ENABLED", "0")
                .status()
                .expect("go (golang-go) must be installed");
            assert!(status.success(), "go build failed");
            out
        })
        .clone()
}

fn daemon<'a>(ns: &'a Netns, backends: &str) -> Daemon<'a> {
    let mut d = Daemon::configure(ns, "127.0.0.53:53", "upstreams = []");
    d.zone(
        "web.toml",
        &format!("[services.web]\nlb = \"round-robin\"\nbackends = [{backends}]\n"),
    );
    d.start();
    ns.resolv_conf("127.0.0.53");
    d
}

fn caught(ns: &Netns) -> u64 {
    let text = ns.ok(
        "curl",
        &["-sf", "--max-time", "5", "http://127.0.0.1:9253/metrics"],
    );
    text.lines()
        .find(|l| l.starts_with("discotech_caught_connects_total{service=\"web\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn lines(out: &std::process::Output) -> Vec<String> {
    succeeded(out).lines().map(str::to_owned).collect()
}

#[test]
fn go_static_busybox_and_a_clean_environment_reach_services_without_the_hook() {
    let ns = Netns::new();
    backend(&ns, "127.0.0.2", 8080, "a");
    backend(&ns, "127.0.0.3", 8080, "b");
    let d = daemon(&ns, "\"127.0.0.2:8080\", \"127.0.0.3:8080\"");
    let config = d.config.to_str().expect("utf-8").to_string();
    let status = ns.ok(DISCOTECH, &["status", "--config", &config]);
    assert!(status.contains("catch: on"), "{status}");

    let go = go_client();
    let got = lines(&ns.run(
        go.to_str().expect("utf-8"),
        &["http://web.disco:8080/who", "10"],
    ));
    assert_eq!(
        got,
        ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b"],
        "Go: both backends in turn"
    );

    let mut wget = Vec::new();
    for _ in 0..6 {
        wget.extend(lines(&ns.run(
            "busybox",
            &["wget", "-q", "-O", "-", "http://web.disco:8080/who"],
        )));
    }
    assert!(wget.iter().all(|b| b == "a" || b == "b"), "{wget:?}");
    assert!(
        wget.contains(&"a".into()) && wget.contains(&"b".into()),
        "{wget:?}"
    );

    let py = lines(&ns.run(
        "env",
        &[
            "-i",
            "/usr/bin/python3",
            "-c",
            "import urllib.request\nfor _ in range(2): print(urllib.request.urlopen('http://web.disco:8080/who').read().decode().strip())",
        ],
    ));
    assert_eq!(py.len(), 2);
    assert!(py.iter().all(|b| b == "a" || b == "b"), "{py:?}");

    let counted = eventually(Duration::from_secs(3), || (caught(&ns) == 18).then_some(()));
    assert!(
        counted.is_some(),
        "10 + 6 + 2 connects caught, counted {}",
        caught(&ns)
    );
    let named = eventually(Duration::from_secs(3), || {
        let log = d.log_text();
        ["comm=goget", "comm=busybox", "comm=python3"]
            .iter()
            .all(|c| log.contains(c))
            .then_some(())
    });
    assert!(
        named.is_some(),
        "each program named once:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert_eq!(
        log.matches("comm=busybox").count(),
        1,
        "once per program, not per process:\n{log}"
    );

    // A drained backend leaves the kernel's routes as it leaves the hooks' picks.
    ns.ok(
        DISCOTECH,
        &["drain", "--config", &config, "web", "127.0.0.3:8080"],
    );
    let only_a = eventually(Duration::from_secs(3), || {
        let got = lines(&ns.run(
            go.to_str().expect("utf-8"),
            &["http://web.disco:8080/who", "4"],
        ));
        (got == ["a", "a", "a", "a"]).then_some(())
    });
    assert!(
        only_a.is_some(),
        "after the drain every caught connect reaches a"
    );
}

#[test]
fn wildcard_listeners_start_beside_the_daemon_and_never_receive_a_caught_connect() {
    let ns = Netns::new();
    // The backends listen on 9000; programs connect to web.disco on 8080 and 8081.
    backend(&ns, "127.0.0.2", 9000, "a");
    backend(&ns, "127.0.0.3", 9000, "b");
    backend(&ns, "0.0.0.0", 8080, "wildcard-before");
    let d = daemon(&ns, "\"127.0.0.2:9000\", \"127.0.0.3:9000\"");
    backend(&ns, "0.0.0.0", 8081, "wildcard-after");
    let go = go_client();
    for port in ["8080", "8081"] {
        let url = format!("http://web.disco:{port}/who");
        let got = lines(&ns.run(go.to_str().expect("utf-8"), &[&url, "6"]));
        // One rotation for every port: each connect goes to the other backend.
        assert!(
            got.len() == 6
                && got.iter().all(|b| b == "a" || b == "b")
                && got.windows(2).all(|w| w[0] != w[1]),
            "port {port}: {got:?}"
        );
        let wget = lines(&ns.run("busybox", &["wget", "-q", "-O", "-", &url]));
        assert!(wget == ["a"] || wget == ["b"], "port {port}: {wget:?}");
    }
    // The wildcard listeners still serve their own clients.
    for (port, name) in [("8080", "wildcard-before"), ("8081", "wildcard-after")] {
        let out = ns.ok("curl", &["-sf", &format!("http://127.0.0.1:{port}/who")]);
        assert_eq!(out.trim(), name);
    }
    drop(d);
}

/// A TCP server on ip:7000 that greets each client with its name and holds the connection.
const HOLDER: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen(64)
held = []
while True:
    c, _ = s.accept(); c.sendall(sys.argv[2].encode() + b"\n"); held.append(c)
"#;

/// Connects to HOST:7000, prints the greeting, then waits for the connection to end and prints
/// "gone <unix time>" (a reset or an end of stream), or "held" after 5 s.
const CLIENT: &str = r#"
import socket, sys, time
c = socket.create_connection((sys.argv[1], 7000), timeout=5)
print(c.recv(64).decode().strip(), flush=True)
c.settimeout(float(sys.argv[2]))
try:
    data = c.recv(64)
    print("gone", time.time(), flush=True)
except socket.timeout:
    print("held", flush=True)
except OSError:  # reset, or aborted (a destroyed socket reports ECONNABORTED)
    print("gone", time.time(), flush=True)
"#;

#[test]
fn a_held_connection_is_reset_when_its_backend_leaves_only_with_on_remove_reset() {
    let ns = Netns::new();
    for (name, ip) in [
        ("a", "127.0.0.2"),
        ("b", "127.0.0.3"),
        ("c", "127.0.0.4"),
        ("d", "127.0.0.5"),
    ] {
        ns.spawn(
            "python3",
            &["-c", HOLDER, ip, name],
            &ns.path(&format!("{name}.log")),
        );
    }
    let mut d = Daemon::configure(&ns, "127.0.0.53:53", "upstreams = []");
    d.zone(
        "z.toml",
        "[services.web]\non_remove = \"reset\"\nbackends = [\"127.0.0.2:7000\", \"127.0.0.3:7000\"]\n\
         [services.api]\nbackends = [\"127.0.0.4:7000\", \"127.0.0.5:7000\"]\n",
    );
    d.start();
    ns.resolv_conf("127.0.0.53");
    let up = eventually(Duration::from_secs(10), || {
        ns.run("python3", &["-c", CLIENT, "web.disco", "0.01"])
            .status
            .success()
            .then_some(())
    });
    assert!(up.is_some(), "backends did not start");

    // Hold one connection to each service (made without the hook, through the catch path).
    let web = ns.path("web-client.log");
    let api = ns.path("api-client.log");
    ns.spawn("python3", &["-c", CLIENT, "web.disco", "8"], &web);
    ns.spawn("python3", &["-c", CLIENT, "api.disco", "4"], &api);
    let first = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .next()
            .map(str::to_owned)
    };
    let greeted = eventually(Duration::from_secs(5), || {
        Some((first(&web)?, first(&api)?))
    });
    let (w, a) = greeted.expect("both clients connected");
    let addr = |name: &str| match name {
        "a" => "127.0.0.2:7000",
        "b" => "127.0.0.3:7000",
        "c" => "127.0.0.4:7000",
        _ => "127.0.0.5:7000",
    };

    // In each service, the backend that holds the connection is drained.
    let config = d.config.to_str().expect("utf-8").to_string();
    let removed = std::time::SystemTime::now();
    ns.ok(DISCOTECH, &["drain", "--config", &config, "web", addr(&w)]);
    ns.ok(DISCOTECH, &["drain", "--config", &config, "api", addr(&a)]);
    let gone = eventually(Duration::from_secs(5), || {
        let w = std::fs::read_to_string(&web).unwrap_or_default();
        w.lines()
            .find_map(|l| l.strip_prefix("gone "))
            .and_then(|t| t.parse::<f64>().ok())
    });
    let at = gone.unwrap_or_else(|| {
        panic!(
            "web's held connection was not reset: {:?}\n{}",
            std::fs::read_to_string(&web),
            d.log_text()
        )
    });
    let since = at
        - removed
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
    assert!(
        since < 1.0,
        "reset {since:.3} s after the backend was drained"
    );
    let held = eventually(Duration::from_secs(8), || {
        std::fs::read_to_string(&api)
            .unwrap_or_default()
            .contains("held")
            .then_some(())
    });
    assert!(
        held.is_some(),
        "api (on_remove off) keeps its connection: {:?}",
        std::fs::read_to_string(&api)
    );
    assert!(
        d.log_text()
            .contains("its connections from this host were reset"),
        "{}",
        d.log_text()
    );
}

#[test]
fn without_cap_bpf_and_cap_net_admin_the_daemon_serves_and_says_it_does_not_catch() {
    let ns = Netns::new();
    backend(&ns, "127.0.0.2", 8080, "a");
    let mut d = Daemon::configure(&ns, "127.0.0.53:53", "upstreams = []");
    d.zone(
        "web.toml",
        "[services.web]\nbackends = [\"127.0.0.2:8080\"]\n",
    );
    d.start_under(&[
        "setpriv",
        // CAP_SYS_ADMIN would stand in for both.
        "--bounding-set=-bpf,-net_admin,-sys_admin",
        "--inh-caps=-bpf,-net_admin,-sys_admin",
        "--",
    ]);
    ns.resolv_conf("127.0.0.53");
    let config = d.config.to_str().expect("utf-8").to_string();
    let status = ns.ok(DISCOTECH, &["status", "--config", &config]);
    assert!(
        status.contains(
            "catch: off (loading and attaching BPF programs needs CAP_BPF and CAP_NET_ADMIN"
        ),
        "{status}"
    );
    assert!(
        d.log_text()
            .contains("not catching connects that bypass the hook"),
        "{}",
        d.log_text()
    );
    // DNS and hooked connects are as ever; an unhooked program gets nothing at the magic address.
    let hooked = d.hooked(&[
        "curl",
        "-sf",
        "--max-time",
        "3",
        "http://web.disco:8080/who",
    ]);
    assert_eq!(String::from_utf8_lossy(&hooked.stdout).trim(), "a");
    let bare = ns.run(
        "busybox",
        &["wget", "-q", "-O", "-", "http://web.disco:8080/who"],
    );
    assert!(
        !bare.status.success()
            && String::from_utf8_lossy(&bare.stderr).contains("Connection refused"),
        "{bare:?}"
    );
}

#[test]
fn the_programs_go_with_the_daemon_even_when_it_is_killed() {
    let ns = Netns::new();
    backend(&ns, "127.0.0.2", 8080, "a");
    let mut d = daemon(&ns, "\"127.0.0.2:8080\"");
    let magic = d.short("web.disco", "A")[0].clone();
    let url = format!("http://{magic}:8080/who");
    let caught = ns.run("busybox", &["wget", "-q", "-O", "-", &url]);
    assert_eq!(lines(&caught), ["a"]);
    ns.ok("kill", &["-KILL", &d.pid.to_string()]);
    d.stop();
    // The BPF links closed with the process: the magic address is a plain loopback address again.
    let gone = eventually(Duration::from_secs(3), || {
        let out = ns.run("busybox", &["wget", "-q", "-O", "-", &url]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (!out.status.success() && err.contains("Connection refused")).then_some(())
    });
    assert!(
        gone.is_some(),
        "a connect to {magic} after the daemon died was still caught"
    );
}
