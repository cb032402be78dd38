//! The DNS SRV source against a real authoritative server (dnsmasq) whose records the test changes.

use std::time::Duration;

use crate::harness::{Daemon, Netns, dnsmasq_args, eventually};

/// dnsmasq on 127.0.0.1:5302 serving `_http._tcp.web.prod.example` SRV with the given targets.
fn srv_server(ns: &Netns, targets: &[(&str, &str, u16)]) -> u32 {
    let mut args = dnsmasq_args(&["127.0.0.1"], 5302, &["--local-ttl=1".into()]);
    for (host, ip, port) in targets {
        args.push(format!("--host-record={host},{ip}"));
        args.push(format!(
            "--srv-host=_http._tcp.web.prod.example,{host},{port},0,5"
        ));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let pid = ns.spawn("dnsmasq", &refs, &ns.path("srv-dnsmasq.log"));
    let up = eventually(Duration::from_secs(10), || {
        let out = ns.run(
            "dig",
            &[
                "@127.0.0.1",
                "-p",
                "5302",
                "_http._tcp.web.prod.example",
                "SRV",
                "+short",
                "+time=1",
                "+tries=1",
            ],
        );
        (out.status.success() && !out.stdout.is_empty()).then_some(())
    });
    assert!(up.is_some(), "dnsmasq SRV server did not start");
    pid
}

#[test]
fn dns_srv_services_follow_upstream_changes_and_survive_its_outage() {
    let ns = Netns::new();
    let upstream = srv_server(
        &ns,
        &[
            ("h1.prod.example", "127.0.0.2", 8080),
            ("h2.prod.example", "127.0.0.3", 8081),
        ],
    );
    let mut d = Daemon::configure(
        &ns,
        "127.0.0.53:53",
        "upstreams = []\n[[source]]\nkind = \"dns-srv\"\nresolvers = [\"127.0.0.1:5302\"]\nmin_ttl = \"1s\"\nmax_ttl = \"2s\"\nservices = { remote = \"_http._tcp.web.prod.example\" }",
    );
    d.start();
    let first = eventually(Duration::from_secs(5), || {
        let mut srv = d.short("remote.disco", "SRV");
        srv.sort();
        (srv.len() == 2).then_some(srv)
    });
    assert_eq!(
        first.as_deref(),
        Some(
            &[
                "0 5 8080 127-0-0-2.remote.disco.".to_string(),
                "0 5 8081 127-0-0-3.remote.disco.".to_string()
            ][..]
        ),
        "log:\n{}",
        d.log_text()
    );
    assert_eq!(
        d.short("remote.disco", "A").len(),
        1,
        "a magic address like any service"
    );

    ns.kill(upstream);
    let failed = eventually(Duration::from_secs(5), || {
        d.log_text().contains("SRV lookup failed").then_some(())
    });
    assert!(failed.is_some(), "the outage is noticed");
    assert_eq!(
        d.short("remote.disco", "SRV").len(),
        2,
        "the last good set keeps serving"
    );

    srv_server(
        &ns,
        &[
            ("h1.prod.example", "127.0.0.2", 8080),
            ("h2.prod.example", "127.0.0.3", 8081),
            ("h3.prod.example", "127.0.0.4", 8082),
        ],
    );
    let grown = eventually(Duration::from_secs(10), || {
        (d.short("remote.disco", "SRV").len() == 3).then_some(())
    });
    assert!(
        grown.is_some(),
        "an added target arrives after the upstream is back: {:?}",
        d.short("remote.disco", "SRV")
    );
}
