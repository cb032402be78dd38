//! The admin CLI against a running daemon: status, services, backends, resolve, drain and
//! undrain, and reloads (good, bad, and by SIGHUP), with their exit codes.

use std::process::Output;
use std::time::Duration;

use crate::harness::{DISCOTECH, Daemon, Netns, eventually};

const WEB: &str =
    "[services.web]\nbackends = [\"127.0.0.2:8080\", { addr = \"127.0.0.3:8081\", weight = 2 }]\n";
const API: &str = "[services.api]\nports = { 9090 = \"grpc\" }\nbackends = [{ addr = \"127.0.0.4:8000\", ports = { grpc = 9000 } }, { addr = \"127.0.0.5:8000\", priority = 1 }]\n";

fn start<'a>(ns: &'a Netns, extra: &str) -> Daemon<'a> {
    let mut d = Daemon::configure(ns, "127.0.0.53:53", extra);
    d.zone("web.toml", WEB);
    d.zone("api.toml", API);
    d.start();
    d
}

fn cli(ns: &Netns, args: &[&str]) -> Output {
    let sock = ns.path("admin.sock");
    let mut all = args.to_vec();
    all.extend(["--socket", sock.to_str().expect("utf-8")]);
    ns.run(DISCOTECH, &all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn status_services_backends_and_resolve_read_like_tables() {
    let ns = Netns::new();
    let d = start(&ns, "upstreams = []");

    let status = cli(&ns, &["status"]);
    assert_eq!(
        status.status.code(),
        Some(0),
        "healthy: {}",
        stdout(&status)
    );
    let text = stdout(&status);
    assert!(text.contains("services: 2"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("file:") && l.contains(" ok ")),
        "{text}"
    );

    let services = stdout(&cli(&ns, &["services"]));
    let web_a = d.short("web.disco", "A").remove(0);
    assert!(
        services
            .lines()
            .any(|l| l.starts_with("web ") && l.contains(&web_a)),
        "the magic address as DNS gives it: {services}"
    );

    let backends = stdout(&cli(&ns, &["backends", "web.disco"]));
    assert!(backends.contains("127.0.0.3:8081  2 "), "{backends}");

    let resolve = stdout(&cli(&ns, &["resolve", "api", "--port", "9090"]));
    assert!(
        resolve.contains("client port 9090 maps to named port grpc"),
        "{resolve}"
    );
    assert!(
        resolve.contains("127.0.0.4:9000"),
        "grpc port of the primary: {resolve}"
    );
    assert!(
        resolve.contains("127.0.0.5:8000") && resolve.contains("backup tier"),
        "the backup tier and why: {resolve}"
    );
    let by_addr = stdout(&cli(&ns, &["resolve", &web_a]));
    assert!(
        by_addr.starts_with("service web "),
        "a magic address resolves to its service: {by_addr}"
    );

    let json = cli(&ns, &["services", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("--json is JSON");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));

    let missing = cli(&ns, &["backends", "nope"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no service nope"));
    let unreachable = ns.run(
        DISCOTECH,
        &["status", "--socket", "/nonexistent/admin.sock"],
    );
    assert_eq!(unreachable.status.code(), Some(69));
}

#[test]
fn drain_takes_a_backend_out_of_srv_and_survives_a_restart() {
    let ns = Netns::new();
    let mut d = start(&ns, "upstreams = []");
    assert_eq!(
        cli(&ns, &["drain", "web", "127.0.0.3:8081"]).status.code(),
        Some(0)
    );
    assert_eq!(
        d.short("web.disco", "SRV"),
        ["0 1 8080 127-0-0-2.web.disco."]
    );
    assert!(
        stdout(&cli(&ns, &["backends", "web"]))
            .contains("127.0.0.3:8081  1       0         -      drained")
    );
    let bad = cli(&ns, &["drain", "web", "127.0.0.9:1"]);
    assert_eq!(bad.status.code(), Some(2), "not a backend");

    d.stop();
    d.start();
    assert_eq!(d.short("web.disco", "SRV").len(), 1, "the drain persists");
    assert_eq!(
        cli(&ns, &["undrain", "web", "127.0.0.3:8081"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(d.short("web.disco", "SRV").len(), 2);
}

#[test]
fn a_bad_reload_is_refused_with_every_problem_and_a_good_one_applies() {
    let ns = Netns::new();
    let d = start(&ns, "upstreams = []");
    let good = std::fs::read_to_string(&d.config).expect("config");

    std::fs::write(
        &d.config,
        good.replace("upstreams = []", "upstreams = [\"nonsense\"]\nttl = -5"),
    )
    .expect("write");
    let refused = cli(&ns, &["reload"]);
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("discotech.toml:3:14: dns.upstreams")
            && err.contains("discotech.toml:4:7: dns.ttl"),
        "every problem with its line: {err}"
    );
    assert!(
        d.dig(&["web.disco", "+noall", "+answer"])
            .contains("\t60\tIN\tA\t"),
        "the running config keeps serving"
    );

    std::fs::write(
        &d.config,
        good.replace("upstreams = []", "upstreams = []\nttl = 300"),
    )
    .expect("write");
    let applied = cli(&ns, &["reload"]);
    assert_eq!(
        applied.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert!(stdout(&applied).contains("applied: dns"));
    assert!(
        d.dig(&["web.disco", "+noall", "+answer"])
            .contains("\t300\tIN\tA\t"),
        "new TTL served at once"
    );

    // SIGHUP does the same; a listen change is reported as needing a restart.
    std::fs::write(
        &d.config,
        good.replace("upstreams = []", "upstreams = []\nttl = 7")
            .replace("127.0.0.53:53", "127.0.0.54:53"),
    )
    .expect("write");
    ns.ok("kill", &["-HUP", &d.pid.to_string()]);
    let hup = eventually(Duration::from_secs(5), || {
        d.dig(&["web.disco", "+noall", "+answer"])
            .contains("\t7\tIN\tA\t")
            .then_some(())
    });
    assert!(hup.is_some(), "SIGHUP reloads; log:\n{}", d.log_text());
    assert!(
        d.log_text().contains("takes effect at the next restart"),
        "{}",
        d.log_text()
    );
}

#[test]
fn a_reload_can_add_a_source_and_status_reports_held_updates_as_degraded() {
    let ns = Netns::new();
    let d = start(&ns, "upstreams = []");
    let extra = ns.path("more");
    std::fs::create_dir_all(&extra).expect("dir");
    std::fs::write(
        extra.join("db.toml"),
        "[services.db]\nbackends = [\"127.0.0.7:5432\"]\n",
    )
    .expect("zone");
    let config = std::fs::read_to_string(&d.config).expect("config");
    std::fs::write(
        &d.config,
        format!(
            "{config}[[source]]\nkind = \"file\"\nname = \"more\"\npath = \"{}\"\n",
            extra.display()
        ),
    )
    .expect("write");
    assert_eq!(cli(&ns, &["reload"]).status.code(), Some(0));
    let db = eventually(Duration::from_secs(3), || {
        (d.short("db.disco", "SRV").len() == 1).then_some(())
    });
    assert!(db.is_some(), "the new source serves after reload");
    assert!(
        d.short("web.disco", "A").len() == 1,
        "the old source kept its services"
    );

    // Emptying web is never applied: status shows the hold and exits 1. (The write truncates
    // the file first: a scan that catches it empty holds web as gone from every source, which
    // the full file then turns into the hold asserted here.)
    d.zone("web.toml", "[services.web]\nbackends = []\n");
    let held = eventually(Duration::from_secs(3), || {
        let s = cli(&ns, &["status"]);
        let text = stdout(&s);
        (s.status.code() == Some(1) && text.contains("update would leave no backends"))
            .then_some(text)
    });
    let text = held.expect("status reports degraded");
    assert!(
        text.contains("HELD UPDATES")
            && text.contains("update would leave no backends")
            && text.contains("never"),
        "{text}"
    );
    assert_eq!(d.short("web.disco", "SRV").len(), 2);
}
