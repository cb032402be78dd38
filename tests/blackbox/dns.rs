//! `discotech serve` as a DNS server: answers, forwarding, split DNS, serve-stale, stability of
//! magic addresses across restarts, live reload, and rejection of broken zone files.

use std::time::Duration;

use crate::harness::{Daemon, Netns, dnsmasq, dnsmasq_args, eventually};

const WEB: &str =
    "[services.web]\nbackends = [\"127.0.0.2:8080\", { addr = \"127.0.0.3:8081\", weight = 2 }]\n";
const API: &str = "[services.api]\nports = { 9090 = \"grpc\" }\nbackends = [{ addr = \"127.0.0.4:8000\", ports = { grpc = 9000 } }]\n";

fn daemon<'a>(ns: &'a Netns, extra: &str) -> Daemon<'a> {
    let d = Daemon::configure(ns, "127.0.0.53:53", extra);
    d.zone("web.toml", WEB);
    d.zone("api.toml", API);
    d
}

#[test]
fn answers_a_aaaa_srv_ptr_soa_and_nxdomain_like_a_real_server() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "magic_v6 = \"fd64:d15c::/64\"\nupstreams = []");
    d.start();

    let full = d.dig(&["web.disco", "A"]);
    assert!(full.contains("status: NOERROR"), "{full}");
    assert!(full.contains("flags: qr aa rd ra"), "authoritative: {full}");
    for name in ["web.disco", "WeB.DiScO"] {
        // 12 header + 15 question + 16 answer: the owner is a pointer to the question.
        let stats = d.dig(&[name, "A", "+noedns", "+noall", "+stats"]);
        assert!(stats.contains("MSG SIZE  rcvd: 43"), "{stats}");
    }
    let a = d.short("web.disco", "A");
    assert_eq!(a.len(), 1);
    assert!(a[0].starts_with("127.77."), "{a:?}");
    let aaaa = d.short("WEB.disco", "AAAA");
    assert!(
        aaaa.len() == 1 && aaaa[0].starts_with("fd64:d15c::"),
        "{aaaa:?}"
    );

    let srv = d.short("web.disco", "SRV");
    assert_eq!(
        srv,
        [
            "0 1 8080 127-0-0-2.web.disco.",
            "0 2 8081 127-0-0-3.web.disco."
        ]
    );
    let additional = d.dig(&["web.disco", "SRV", "+noall", "+additional"]);
    assert!(
        additional.contains("127-0-0-2.web.disco.\t5\tIN\tA\t127.0.0.2"),
        "glue: {additional}"
    );
    assert_eq!(
        d.short("127-0-0-3.web.disco", "A"),
        ["127.0.0.3"],
        "SRV targets resolve"
    );
    assert_eq!(
        d.short("_grpc._tcp.api.disco", "SRV"),
        ["0 1 9000 127-0-0-4.api.disco."]
    );

    assert_eq!(
        d.short(&a[0], "PTR"),
        Vec::<String>::new(),
        "a bare address is not a PTR name"
    );
    assert_eq!(d.dig(&["-x", &a[0], "+short"]).trim(), "web.disco.");

    let soa = d.short("disco", "SOA");
    assert!(
        soa[0].starts_with("localhost. hostmaster.disco. "),
        "{soa:?}"
    );
    let nx = d.dig(&["nope.disco", "A"]);
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("flags: qr aa"),
        "{nx}"
    );
    assert!(
        nx.contains("disco.\t\t\t5\tIN\tSOA\tlocalhost."),
        "negative answers carry the SOA with the negative TTL: {nx}"
    );
    let nodata = d.dig(&["web.disco", "TXT"]);
    assert!(
        nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"),
        "{nodata}"
    );
}

#[test]
fn tcp_works_and_large_udp_answers_are_truncated_then_complete_over_tcp() {
    let ns = Netns::new();
    let d = daemon(&ns, "upstreams = []");
    let backends: Vec<String> = (1..=60).map(|i| format!("\"127.0.1.{i}:8080\"")).collect();
    d.zone(
        "big.toml",
        &format!("[services.big]\nbackends = [{}]\n", backends.join(", ")),
    );
    let mut d = d;
    d.start();

    assert_eq!(
        d.dig(&["web.disco", "A", "+tcp", "+short"]).lines().count(),
        1
    );
    let udp = d.dig(&["big.disco", "SRV", "+noedns", "+ignore"]);
    assert!(
        udp.contains(" tc"),
        "512-byte UDP answer must set TC: {udp}"
    );
    assert!(
        !udp.contains("extra bytes"),
        "the record that did not fit is not sent in part: {udp}"
    );
    let small = d.dig(&["big.disco", "SRV", "+bufsize=1232", "+ignore"]);
    assert!(
        small.contains(" tc"),
        "60 SRV records exceed 1232 bytes too: {small}"
    );
    let tcp = d.dig(&["big.disco", "SRV", "+tcp", "+short"]);
    assert_eq!(tcp.lines().count(), 60, "complete over TCP");
    let retried = d.dig(&["big.disco", "SRV", "+noedns", "+short"]);
    assert_eq!(retried.lines().count(), 60, "dig retries over TCP on TC");
}

#[test]
fn glibc_and_python_resolve_services_through_the_system_resolver() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []");
    d.start();
    ns.resolv_conf("127.0.0.53");
    let magic = d.short("web.disco", "A").remove(0);

    let getent = ns.ok("getent", &["ahosts", "web.disco"]);
    assert!(
        getent.lines().any(|l| l.starts_with(&format!("{magic} "))),
        "getent: {getent}"
    );
    let py = ns.ok("python3", &["-c", "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('web.disco', 80, socket.AF_INET)}))"]);
    assert_eq!(py.trim(), format!("['{magic}']"));
    let missing = ns.run("getent", &["hosts", "nope.disco"]);
    assert_eq!(missing.status.code(), Some(2), "unknown service: not found");
}

#[test]
fn other_names_are_forwarded_with_split_dns_and_served_stale_when_upstream_dies() {
    let ns = Netns::new();
    let default_up = dnsmasq(
        &ns,
        "127.0.0.1",
        5300,
        &[
            ("www.example.test", "192.0.2.80"),
            ("short.example.test", "192.0.2.81"),
        ],
        1,
    );
    dnsmasq(
        &ns,
        "127.0.0.1",
        5301,
        &[("app.corp.example", "198.51.100.7")],
        60,
    );
    let mut d = daemon(
        &ns,
        "upstreams = [\"127.0.0.1:5300\"]\n[[dns.forward]]\nzone = \"corp.example\"\nupstreams = [\"127.0.0.1:5301\"]",
    );
    d.start();
    ns.resolv_conf("127.0.0.53");

    assert_eq!(d.short("www.example.test", "A"), ["192.0.2.80"]);
    let forwarded = d.dig(&["www.example.test", "A"]);
    assert!(
        forwarded.contains("flags: qr rd ra;"),
        "forwarded answers are not authoritative: {forwarded}"
    );
    assert_eq!(
        d.short("app.corp.example", "A"),
        ["198.51.100.7"],
        "split DNS: corp.example goes to its own upstream"
    );
    let getent = ns.ok("getent", &["hosts", "app.corp.example"]);
    assert!(getent.starts_with("198.51.100.7 "), "{getent}");

    // Cache short.example.test (TTL 1), kill the upstream, and let the entry expire: it must be
    // served stale (TTL 30, RFC 8767) rather than fail.
    assert_eq!(d.short("short.example.test", "A"), ["192.0.2.81"]);
    ns.kill(default_up);
    let stale = eventually(Duration::from_secs(10), || {
        let out = d.dig(&["short.example.test", "A", "+noall", "+answer"]);
        out.contains("\t30\tIN\tA\t192.0.2.81").then_some(out)
    });
    assert!(
        stale.is_some(),
        "stale answer with TTL 30 expected; log:\n{}",
        d.log_text()
    );

    // A name never seen: SERVFAIL, and within the 2 s bound.
    let started = std::time::Instant::now();
    let fail = d.dig(&["never-seen.example.test", "A"]);
    assert!(fail.contains("status: SERVFAIL"), "{fail}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "SERVFAIL took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_forwarding_loop_through_another_resolver_is_refused_not_amplified() {
    let ns = Netns::new();
    // dnsmasq forwards everything to us, and we forward everything to dnsmasq.
    let log = ns.path("loop-dnsmasq.log");
    let args = dnsmasq_args(&["127.0.0.1"], 5300, &["--server=127.0.0.53".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ns.spawn("dnsmasq", &refs, &log);
    // Nobody answers through dnsmasq before we run, so wait for its socket, not an answer.
    let listening = eventually(Duration::from_secs(10), || {
        let o = ns.run("ss", &["-Hlun", "sport = :5300"]);
        (!o.stdout.is_empty()).then_some(())
    });
    assert!(listening.is_some(), "dnsmasq did not start");
    let mut d = daemon(&ns, "upstreams = [\"127.0.0.1:5300\"]");
    d.start();
    let out = d.dig(&["loop.example.test", "A"]);
    assert!(
        out.contains("status: SERVFAIL") || out.contains("status: REFUSED"),
        "{out}"
    );
    let warned = eventually(Duration::from_secs(5), || {
        d.log_text().contains("forwarding loop").then_some(())
    });
    assert!(
        warned.is_some(),
        "the loop is logged; log:\n{}",
        d.log_text()
    );
}

#[test]
fn only_allowed_clients_get_answers() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []\nallow = [\"127.0.0.1/32\"]");
    d.start();
    assert_eq!(
        d.dig(&["web.disco", "+short", "-b", "127.0.0.1"])
            .lines()
            .count(),
        1
    );
    let refused = d.dig(&["web.disco", "-b", "127.0.0.9"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
}

#[test]
fn magic_addresses_survive_restarts_and_reordering() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []");
    d.start();
    let web = d.short("web.disco", "A");
    let api = d.short("api.disco", "A");
    assert_eq!(d.stop(), Some(0), "SIGTERM is a clean exit");

    // New services arrive before the old ones in every order we can think of; old addresses stay.
    d.zone("a-first.toml", "[services.zeta]\nbackends = [\"127.0.0.9:1\"]\n[services.alpha]\nbackends = [\"127.0.0.9:2\"]\n");
    d.start();
    assert_eq!(d.short("web.disco", "A"), web);
    assert_eq!(d.short("api.disco", "A"), api);
    assert_ne!(d.short("zeta.disco", "A"), web);
    let persisted = std::fs::read_to_string(d.state.join("magic.json")).expect("magic.json");
    assert!(persisted.contains(&web[0]), "{persisted}");
}

#[test]
fn a_removed_service_keeps_its_address_quarantined() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []\n[guard]\nhold_down = \"500ms\"");
    d.start();
    let api = d.short("api.disco", "A");
    std::fs::remove_file(d.zones.join("api.toml")).expect("rm");
    let gone = eventually(Duration::from_secs(5), || {
        d.dig(&["api.disco", "A"])
            .contains("NXDOMAIN")
            .then_some(())
    });
    assert!(gone.is_some(), "removed after the guard's hold-down");
    let persisted = std::fs::read_to_string(d.state.join("magic.json")).expect("magic.json");
    assert!(
        persisted.contains("\"quarantine\"") && persisted.contains(&api[0]),
        "{persisted}"
    );
    d.zone("api.toml", API);
    let back = eventually(Duration::from_secs(3), || {
        (d.short("api.disco", "A") == api).then_some(())
    });
    assert!(
        back.is_some(),
        "a returning service gets its old address back"
    );
}

#[test]
fn zone_files_reload_live_and_a_broken_edit_keeps_the_old_content() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []\n[guard]\nhold_down = \"2s\"");
    d.start();

    let started = std::time::Instant::now();
    d.zone(
        "db.toml",
        "[services.db]\nbackends = [\"127.0.0.7:5432\"]\n",
    );
    let seen = eventually(Duration::from_secs(3), || {
        (d.short("db.disco", "SRV") == ["0 1 5432 127-0-0-7.db.disco."]).then_some(())
    });
    assert!(seen.is_some(), "new zone file served");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "within a second, took {:?}",
        started.elapsed()
    );

    // Replacing every backend is a sharp drop: the new backend serves at once, the old one is
    // kept for the guard's hold-down, then goes.
    d.zone(
        "db.toml",
        "[services.db]\nbackends = [\"127.0.0.8:5432\"]\n",
    );
    let both = eventually(Duration::from_secs(3), || {
        (d.short("db.disco", "SRV").len() == 2).then_some(())
    });
    assert!(
        both.is_some(),
        "addition applied at once, removal held: {:?}",
        d.short("db.disco", "SRV")
    );
    assert!(d.log_text().contains("removal held"), "the hold is logged");
    let edited = eventually(Duration::from_secs(5), || {
        (d.short("db.disco", "SRV") == ["0 1 5432 127-0-0-8.db.disco."]).then_some(())
    });
    assert!(edited.is_some(), "edit served after the hold-down");

    d.zone("db.toml", "[services.db]\nbackends = [\"127.0.0.9\"]\n");
    let logged = eventually(Duration::from_secs(3), || {
        d.log_text()
            .contains("db.toml:2:13: services.db.backends[0].addr")
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "error with path:line:column in the log:\n{}",
        d.log_text()
    );
    assert_eq!(
        d.short("db.disco", "SRV"),
        ["0 1 5432 127-0-0-8.db.disco."],
        "previous good content keeps serving"
    );

    let check = ns.run(
        crate::harness::DISCOTECH,
        &["check", "--config", d.config.to_str().expect("utf-8")],
    );
    assert_eq!(check.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains("db.toml:2:13: services.db.backends[0].addr: \"127.0.0.9\" needs a port"),
        "{stderr}"
    );
}

#[test]
fn a_restart_with_the_zone_files_unreadable_serves_the_last_known_good_state() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []");
    d.start();
    let web = d.short("web.disco", "SRV");
    assert_eq!(web.len(), 2);
    d.stop();
    // The zone directory disappears (an unmounted volume); the state file is all we have.
    std::fs::rename(&d.zones, ns.path("zones-away")).expect("move zones away");
    d.start();
    assert_eq!(
        d.short("web.disco", "SRV"),
        web,
        "served from backends.json"
    );
    assert!(
        d.log_text().contains("restored last-known-good state"),
        "{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("cannot list zone files"),
        "the failure is reported: {}",
        d.log_text()
    );
}

#[test]
fn a_corrupt_state_file_is_set_aside_not_fatal() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []");
    std::fs::create_dir_all(&d.state).expect("state dir");
    std::fs::write(
        d.state.join("backends.json"),
        b"{\"version\": 1, \"sources\": [",
    )
    .expect("write");
    std::fs::write(d.state.join("magic.json"), b"garbage").expect("write");
    d.start();
    assert_eq!(
        d.short("web.disco", "SRV").len(),
        2,
        "serving from the sources"
    );
    assert!(
        d.state.join("backends.json.corrupt").exists()
            && d.state.join("magic.json.corrupt").exists()
    );
    assert!(d.log_text().contains("corrupt"), "{}", d.log_text());
}

#[test]
fn cached_answers_echo_each_clients_spelling_and_follow_changes() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []");
    d.start();
    for name in ["web.disco", "WeB.DiScO", "web.disco"] {
        let out = d.dig(&[name, "A", "+noall", "+question", "+answer"]);
        assert!(
            out.contains(&format!(";{name}.\t")) && out.contains(&format!("\n{name}.\t")),
            "{out}"
        );
    }
    d.zone(
        "web.toml",
        "[services.web]\nbackends = [\"127.0.0.2:8080\", \"127.0.0.3:8081\", \"127.0.0.4:8082\"]\n",
    );
    let grown = eventually(Duration::from_secs(3), || {
        (d.short("web.disco", "SRV").len() == 3).then_some(())
    });
    assert!(
        grown.is_some(),
        "a cached answer does not outlive its snapshot"
    );
}

#[test]
fn garbage_packets_get_formerr_or_silence_and_the_server_keeps_answering() {
    let ns = Netns::new();
    let mut d = daemon(&ns, "upstreams = []");
    d.start();
    let script = r#"
import os, random, socket
random.seed(7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.01)
formerr = silent = 0
for i in range(600):
    n = random.choice([0, 1, 5, 12, 13, 40, 300, 1500])
    pkt = bytearray(os.urandom(n))
    if n >= 12 and i % 2:
        pkt[2] &= 0x7f   # mostly queries, so that some get an answer
    s.sendto(bytes(pkt), ("127.0.0.53", 53))
    try:
        r = s.recv(4096)
        formerr += r[3] & 0x0f == 1
    except socket.timeout:
        silent += 1
print(formerr, silent)
"#;
    let out = ns.ok("python3", &["-c", script]);
    let counts: Vec<u32> = out
        .split_whitespace()
        .map(|n| n.parse().expect("count"))
        .collect();
    assert!(counts[0] > 20, "malformed queries get FORMERR: {out}");
    assert!(
        counts[1] > 100,
        "packets too short or marked as responses get nothing: {out}"
    );
    assert_eq!(
        d.short("web.disco", "SRV").len(),
        2,
        "still answering; log:\n{}",
        d.log_text()
    );
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
}
