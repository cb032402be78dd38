//! The connect hook with the real daemon, through `discotech run`, as a user would run it: the
//! daemon is the namespace's system resolver, backends are real TCP servers that say who they
//! are, and clients are curl, python (blocking, urllib, asyncio) and small C programs covering
//! every connect shape the hook must keep intact.

use std::process::Output;
use std::time::Duration;

use crate::harness::{DISCOTECH, Daemon, Netns, c_program, eventually};
use crate::harness::{backend, ensure_hook_library};

fn greeter(ns: &Netns, name: &str, ip: &str, port: u16) {
    let bin = c_program("greeter");
    ns.spawn(
        bin.to_str().expect("utf-8"),
        &[name, ip, &port.to_string(), "300"],
        &ns.path(&format!("greeter-{name}.log")),
    );
    let up = eventually(Duration::from_secs(5), || {
        let out = ns.run(
            c_program("hookclient").to_str().expect("utf-8"),
            &["block", ip, &port.to_string()],
        );
        String::from_utf8_lossy(&out.stdout)
            .starts_with("OK ")
            .then_some(())
    });
    assert!(up.is_some(), "greeter {name} on {ip}:{port} did not start");
}

/// `[services.web]`: HTTP on each backend's default port 8080, raw greeters on the named port
/// `raw` (7001), reached from client port 7000.
const WEB: &str = "[services.web]\nlb = \"round-robin\"\nports = { 7000 = \"raw\" }\nbackends = [{ addr = \"127.0.0.2:8080\", ports = { raw = 7001 } }, { addr = \"127.0.0.3:8080\", ports = { raw = 7001 } }]\n";

fn setup(ns: &Netns) -> Daemon<'_> {
    ensure_hook_library();
    backend(ns, "127.0.0.2", 8080, "a");
    backend(ns, "127.0.0.3", 8080, "b");
    greeter(ns, "a", "127.0.0.2", 7001);
    greeter(ns, "b", "127.0.0.3", 7001);
    // The hook alone: with the catch path off, a connect that bypasses the hook is refused, so
    // every answer here came through the hook (catch.rs tests the catch path).
    let mut d = Daemon::configure(
        ns,
        "127.0.0.53:53",
        "upstreams = []\n[metrics]\nlisten = [\"127.0.0.1:9253\"]\n[catch]\nmode = \"off\"",
    );
    d.zone("web.toml", WEB);
    d.zone(
        "more.toml",
        "[services.weighted]\nports = { 7000 = \"raw\" }\nbackends = [{ addr = \"127.0.0.2:8080\", weight = 1, ports = { raw = 7001 } }, { addr = \"127.0.0.3:8080\", weight = 3, ports = { raw = 7001 } }]\n\
         [services.flaky]\nlb = \"round-robin\"\nports = { 7000 = \"raw\" }\nbackends = [\"127.0.0.9:7001\", { addr = \"127.0.0.2:8080\", ports = { raw = 7001 } }, { addr = \"127.0.0.3:8080\", ports = { raw = 7001 } }]\n\
         [services.refusing]\nbackends = [\"127.0.0.9:7001\"]\n\
         [services.unreachable]\nbackends = [\"198.51.100.1:7001\"]\n",
    );
    d.start();
    ns.resolv_conf("127.0.0.53");
    d
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn magic(d: &Daemon, service: &str) -> String {
    d.short(&format!("{service}.disco"), "A").remove(0)
}

fn hookclient() -> String {
    c_program("hookclient").to_str().expect("utf-8").to_string()
}

#[test]
fn curl_and_python_reach_the_backends_by_name_on_any_port() {
    let ns = Netns::new();
    let d = setup(&ns);
    let who = out(&d.hooked(&["curl", "-s", "--max-time", "3", "http://web.disco/who"]));
    assert!(
        who == "a" || who == "b",
        "port 80 goes to a backend's default port: {who:?}"
    );
    let other = out(&d.hooked(&["curl", "-s", "--max-time", "3", "http://web.disco:8080/who"]));
    assert!(other == "a" || other == "b", "{other:?}");
    // Without the hook a magic address is refused at once, not left hanging.
    let bare = ns.run(
        "curl",
        &[
            "-s",
            "--max-time",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{exitcode}",
            "http://web.disco/who",
        ],
    );
    assert_eq!(out(&bare), "7", "curl exit 7: connection refused");

    let script = r#"
import asyncio, socket, urllib.request
s = socket.create_connection(("web.disco", 7000), timeout=3)
blocking = s.recv(64).decode().strip()
s.close()
page = urllib.request.urlopen("http://web.disco/who", timeout=3).read().decode()
async def nonblocking():
    reader, writer = await asyncio.wait_for(asyncio.open_connection("web.disco", 7000), 3)
    line = (await reader.readline()).decode().strip()
    writer.close()
    return line
print(blocking, page, asyncio.run(nonblocking()))
"#;
    let py = out(&d.hooked(&["python3", "-c", script]));
    let words: Vec<&str> = py.split_whitespace().collect();
    assert_eq!(words.len(), 3, "{py:?}");
    assert!(
        words.iter().all(|w| *w == "a" || *w == "b"),
        "blocking, urllib and asyncio all reach a backend: {py:?}"
    );
}

#[test]
fn every_connect_shape_works_through_the_hook() {
    let ns = Netns::new();
    let d = setup(&ns);
    let m = magic(&d, "web");
    let client = hookclient();
    for (mode, extra) in [
        ("nonblock", None),
        ("v6mapped", None),
        ("forkthreads", Some("5")),
        ("signal", Some("20")),
    ] {
        let mut args = vec![client.as_str(), mode, m.as_str(), "7000"];
        args.extend(extra);
        let o = d.hooked(&args);
        let text = out(&o);
        assert!(
            o.status.success() && text.starts_with("OK ") && !text.contains("ERR"),
            "{mode}: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // UDP connects pass through untouched: the kernel keeps the magic address as the peer.
    let udp = out(&d.hooked(&[&client, "udp", &m, "7000"]));
    assert!(udp.contains(&m), "UDP is not redirected: {udp}");
}

#[test]
fn errno_matches_an_unhooked_connect_for_refused_and_unreachable_backends() {
    let ns = Netns::new();
    let d = setup(&ns);
    let client = hookclient();
    let refused = out(&d.hooked(&[&client, "block", &magic(&d, "refusing"), "7000"]));
    let plain = out(&ns.run(&client, &["block", "127.0.0.9", "7001"]));
    assert_eq!(refused, plain);
    assert_eq!(refused.trim(), "ERR ECONNREFUSED");
    // This namespace has no route beyond loopback: the kernel fails the connect without sending.
    let unreachable = out(&d.hooked(&[&client, "block", &magic(&d, "unreachable"), "7000"]));
    let plain = out(&ns.run(&client, &["block", "198.51.100.1", "7001"]));
    assert_eq!(unreachable, plain);
    assert!(unreachable.trim() == "ERR ENETUNREACH", "{unreachable}");
}

#[test]
fn round_robin_is_even_weights_hold_and_a_refusing_backend_is_skipped() {
    let ns = Netns::new();
    let d = setup(&ns);
    let client = hookclient();
    let count = |text: &str, who: &str| {
        text.lines()
            .filter(|l| l.trim() == format!("OK {who}"))
            .count()
    };

    let rr = out(&d.hooked(&[&client, "many", &magic(&d, "web"), "7000", "30"]));
    assert_eq!(
        (count(&rr, "a"), count(&rr, "b")),
        (15, 15),
        "round robin within one process is exact: {rr}"
    );

    let w = out(&d.hooked(&[&client, "many", &magic(&d, "weighted"), "7000", "40"]));
    let (a, b) = (count(&w, "a"), count(&w, "b"));
    assert_eq!(a + b, 40, "{w}");
    // Weights 1:3 hold exactly in every cycle of four, and forty connects are ten cycles.
    assert!(
        (a, b) == (10, 30),
        "weights 1:3 over 40 connects: a={a} b={b}"
    );

    let flaky = out(&d.hooked(&[&client, "many", &magic(&d, "flaky"), "7000", "30"]));
    assert_eq!(
        count(&flaky, "a") + count(&flaky, "b"),
        30,
        "a refused backend is retried elsewhere, never surfaced: {flaky}"
    );
    assert!(!flaky.contains("ERR"), "{flaky}");

    let metrics = ns.ok(
        "curl",
        &["-sf", "--max-time", "5", "http://127.0.0.1:9253/metrics"],
    );
    // Picks are made in the hooks, on the shared table; what reaches the daemon is the
    // refusal, reported as a hint that its own connect then confirmed.
    for result in ["failure_hint", "hint_confirmed"] {
        assert!(
            metrics.contains(&format!(
                r#"discotech_hook_requests_total{{service="flaky",result="{result}"}}"#
            )),
            "{result}: {metrics}"
        );
    }
    assert!(
        !metrics.contains(r#"discotech_hook_requests_total{service="web""#),
        "no socket round trips for a service the table routes: {metrics}"
    );
}

#[test]
fn killing_the_daemon_mid_run_keeps_clients_on_the_backends_they_know() {
    let ns = Netns::new();
    let d = setup(&ns);
    let m = magic(&d, "web");
    let client = hookclient();
    let log = ns.path("slowmany.log");
    let config = d.config.to_str().expect("utf-8").to_string();
    let pid = ns.spawn(
        DISCOTECH,
        &[
            "run", "--config", &config, "--", &client, "slowmany", &m, "7000", "40",
        ],
        &log,
    );
    let started = eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.lines().count() >= 5)
            .map(|_| ())
    });
    assert!(started.is_some(), "client running");
    ns.kill(d.pid);
    let done = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.lines().count() >= 40)
    });
    let text = done.unwrap_or_else(|| std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(
        text.lines().filter(|l| l.starts_with("OK ")).count(),
        40,
        "every connect succeeded with the daemon gone: {text}"
    );
    ns.stop(pid);
    // A program started after the daemon died routes from the fallback file.
    let fresh = out(&d.hooked(&[&client, "block", &m, "7000"]));
    assert!(fresh.starts_with("OK "), "{fresh}");
    // Knowing nothing (no daemon, no fallback file), a connect fails fast instead of hanging.
    let nothing = ns.path("nothing");
    std::fs::create_dir_all(&nothing).expect("dir");
    let socket = nothing.join("hook.sock");
    let started = std::time::Instant::now();
    let o = ns.run(
        DISCOTECH,
        &[
            "run",
            "--socket",
            socket.to_str().expect("utf-8"),
            "--",
            &client,
            "block",
            &m,
            "7000",
        ],
    );
    assert_eq!(out(&o).trim(), "ERR ECONNREFUSED");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fails fast: {:?}",
        started.elapsed()
    );
}
