//! The ZooKeeper source and registrations against a real ZooKeeper server: every instance layout,
//! live additions and removals, ZooKeeper killed or paused, a daemon restarted while ZooKeeper is
//! down, session expiry, and registrations following a local health check.

use std::time::{Duration, Instant};

use crate::harness;
use crate::harness::{Netns, eventually};
use crate::zk::{self, ZkServer, srv_until};

const ZK_PORT: u16 = 2181;

fn serverset(host: &str, port: u16, status: &str) -> String {
    format!(
        r#"{{"serviceEndpoint":{{"host":"{host}","port":{port}}},"additionalEndpoints":{{"admin":{{"host":"{host}","port":9990}}}},"status":"{status}"}}"#
    )
}

#[test]
fn every_zookeeper_layout_reaches_srv_answers_and_malformed_nodes_are_skipped() {
    let ns = Netns::new();
    let zk = ZkServer::start(&ns, ZK_PORT);
    let curator = r#"{"name":"api","id":"5a1b","address":"127.0.0.3","port":8000,"sslPort":8443,"payload":null,"registrationTimeUTC":1,"serviceType":"DYNAMIC","uriSpec":null}"#;
    zk.ctl(
        &ns,
        &[
            &format!("create /disco/web/member_0000000001 {}", serverset("127.0.0.2", 8080, "ALIVE")),
            &format!("create /disco/web/member_0000000002 {}", serverset("127.0.0.9", 8080, "DEAD")),
            "create /disco/web/member_0000000003 {not json",
            &format!("create /disco/api/5a1b {curator}"),
            r#"create /disco/cache/i-1_cache {"host":"127.0.0.4","port":6379,"name":"i-1","weight":3}"#,
            "create /disco/db/127.0.0.5:5432",
            "create /disco/Bad_Name/127.0.0.6:1",
        ],
    );
    let mut d = zk::daemon(&ns, &zk::source(&zk, "/disco", "5s"));
    d.start();

    let wait = Duration::from_secs(5);
    srv_until(&d, "web.disco", wait, |a| {
        a == ["0 1 8080 127-0-0-2.web.disco."]
    });
    assert_eq!(
        d.short("_admin._tcp.web.disco", "SRV"),
        ["0 1 9990 127-0-0-2.web.disco."],
        "additionalEndpoints are named ports"
    );
    srv_until(&d, "api.disco", wait, |a| {
        a == ["0 1 8000 127-0-0-3.api.disco."]
    });
    assert_eq!(
        d.short("_https._tcp.api.disco", "SRV"),
        ["0 1 8443 127-0-0-3.api.disco."],
        "Curator sslPort is https"
    );
    srv_until(&d, "cache.disco", wait, |a| {
        a == ["0 3 6379 127-0-0-4.cache.disco."]
    });
    srv_until(&d, "db.disco", wait, |a| {
        a == ["0 1 5432 127-0-0-5.db.disco."]
    });
    assert!(
        d.short("web.disco", "A")[0].starts_with("127.77."),
        "a magic address"
    );

    let log = d.log_text();
    assert!(
        log.contains("malformed") && log.contains("member_0000000003"),
        "the malformed node is logged: {log}"
    );
    assert!(
        log.contains("Bad_Name"),
        "the invalid service node is logged: {log}"
    );
    assert_eq!(
        log.matches("member_0000000003").count(),
        1,
        "logged once: {log}"
    );
}

#[test]
fn zookeeper_additions_removals_and_data_changes_reach_srv_answers_within_milliseconds() {
    let ns = Netns::new();
    let zk = ZkServer::start(&ns, ZK_PORT);
    zk.ctl(
        &ns,
        &[
            "create /disco/web/127.0.0.2:80",
            "create /disco/web/127.0.0.3:80",
            "create /disco/web/127.0.0.4:80",
        ],
    );
    let members: Vec<String> = (7..=9)
        .map(|i| {
            format!(
                "create /disco/api/member_{i} {}",
                serverset(&format!("127.0.0.{i}"), 8000, "ALIVE")
            )
        })
        .collect();
    zk.ctl(&ns, &members.iter().map(String::as_str).collect::<Vec<_>>());
    let mut d = zk::daemon(&ns, &zk::source(&zk, "/disco", "5s"));
    d.start();
    srv_until(&d, "web.disco", Duration::from_secs(5), |a| a.len() == 3);

    let t0 = Instant::now();
    zk.ctl(&ns, &["create /disco/web/127.0.0.5:80"]);
    srv_until(&d, "web.disco", Duration::from_secs(2), |a| {
        a.len() == 4 && a.iter().any(|r| r.contains("127-0-0-5"))
    });
    let added = t0.elapsed();

    let t0 = Instant::now();
    zk.ctl(&ns, &["delete /disco/web/127.0.0.3:80"]);
    srv_until(&d, "web.disco", Duration::from_secs(2), |a| {
        a.len() == 3 && !a.iter().any(|r| r.contains("127-0-0-3"))
    });
    let removed = t0.elapsed();

    zk.ctl(
        &ns,
        &[&format!(
            "set /disco/api/member_7 {}",
            serverset("127.0.0.7", 8001, "ALIVE")
        )],
    );
    // A new port replaces a backend: one of three removed, within the guard's threshold.
    srv_until(&d, "api.disco", Duration::from_secs(2), |a| {
        a.len() == 3 && a.iter().any(|r| r == "0 1 8001 127-0-0-7.api.disco.")
    });

    zk.ctl(&ns, &["create /disco/new/127.0.0.9:99"]);
    srv_until(&d, "new.disco", Duration::from_secs(2), |a| {
        a == ["0 1 99 127-0-0-9.new.disco."]
    });
    // Both timings include a zkctl start and dig polling every 20 ms, so they bound the real delay.
    eprintln!("addition seen after {added:?}, removal after {removed:?}");
}

#[test]
fn zookeeper_down_keeps_answers_and_a_restarted_daemon_serves_the_persisted_state() {
    let ns = Netns::new();
    let mut zk = ZkServer::start(&ns, ZK_PORT);
    zk.ctl(
        &ns,
        &[
            "create /disco/web/127.0.0.2:80",
            "create /disco/web/127.0.0.3:80",
        ],
    );
    let mut d = zk::daemon(&ns, &zk::source(&zk, "/disco", "2s"));
    d.start();
    let both = srv_until(&d, "web.disco", Duration::from_secs(5), |a| a.len() == 2);
    let magic = d.short("web.disco", "A");
    let gauge = |ns: &Netns, series: &str| {
        let text = ns.ok(
            "curl",
            &["-sf", "--max-time", "5", "http://127.0.0.1:9253/metrics"],
        );
        text.lines()
            .find(|l| l.starts_with(series))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
    };
    assert_eq!(
        gauge(&ns, "discotech_zookeeper_connected{").as_deref(),
        Some("1")
    );

    zk.kill(&ns);
    let failed = eventually(Duration::from_secs(10), || {
        d.log_text()
            .contains("last good services keep serving")
            .then_some(())
    });
    assert!(
        failed.is_some(),
        "the source reports the failure: {}",
        d.log_text()
    );
    let down = eventually(Duration::from_secs(10), || {
        (gauge(&ns, "discotech_zookeeper_connected{").as_deref() == Some("0")).then_some(())
    });
    assert!(down.is_some(), "metrics tell the session is gone");
    for _ in 0..3 {
        assert_eq!(
            srv_until(&d, "web.disco", Duration::from_secs(1), |a| a.len() == 2),
            both,
            "still served with ZooKeeper down"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Let the last-known-good file be written (at most once a second) before the restart.
    std::thread::sleep(Duration::from_millis(1200));
    d.stop();

    let t0 = Instant::now();
    d.start();
    let restored = srv_until(&d, "web.disco", Duration::from_secs(1), |a| a.len() == 2);
    assert_eq!(
        restored, both,
        "a daemon started with ZooKeeper down serves the persisted backends"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "served within {:?} of start",
        t0.elapsed()
    );
    assert_eq!(
        d.short("web.disco", "A"),
        magic,
        "same magic address after the restart"
    );

    zk.restart(&ns);
    zk.ctl(&ns, &["create /disco/web/127.0.0.4:80"]);
    srv_until(&d, "web.disco", Duration::from_secs(15), |a| a.len() == 3);
}

#[test]
fn zookeeper_session_expiry_gets_a_new_session_and_later_changes_apply() {
    let ns = Netns::new();
    let zk = ZkServer::start(&ns, ZK_PORT);
    zk.ctl(&ns, &["create /disco/web/127.0.0.2:80"]);
    let http = ns.spawn(
        "python3",
        &[
            "-m",
            "http.server",
            "18080",
            "--bind",
            "127.0.0.1",
            "--directory",
            ns.dir.path().to_str().expect("utf-8"),
        ],
        &ns.path("http.log"),
    );
    let register = format!(
        "[[register]]\nservice = \"self\"\naddr = \"127.0.0.1:18080\"\nhosts = [\"{}\"]\npath = \"/registry/self\"\nformat = \"host-port\"\nsession_timeout = \"2s\"\n\
         check = {{ kind = \"tcp\", interval = \"200ms\", timeout = \"500ms\", rise = 1, fall = 1 }}\n",
        zk.hosts
    );
    let mut d = zk::daemon(
        &ns,
        &format!("{}\n{register}", zk::source(&zk, "/disco", "2s")),
    );
    d.start();
    srv_until(&d, "web.disco", Duration::from_secs(5), |a| a.len() == 1);
    let registered = eventually(Duration::from_secs(10), || {
        (zk.ls(&ns, "/registry/self") == ["127.0.0.1:18080"]).then_some(())
    });
    assert!(registered.is_some(), "registered: {}", d.log_text());

    // ZooKeeper unresponsive for longer than the session timeout: answers keep coming.
    zk.pause();
    let paused = Instant::now();
    while paused.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            d.short("web.disco", "SRV"),
            ["0 1 80 127-0-0-2.web.disco."],
            "served while ZooKeeper is paused"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    zk.resume();
    zk.ctl(&ns, &["create /disco/web/127.0.0.3:80"]);
    srv_until(&d, "web.disco", Duration::from_secs(15), |a| a.len() == 2);

    // The daemon unresponsive beyond the session timeout: the server expires its sessions for certain
    // (a paused server may instead revalidate a session whose client reconnects first).
    zk::signal(d.pid, "STOP");
    std::thread::sleep(Duration::from_secs(5));
    zk::signal(d.pid, "CONT");
    let expired = eventually(Duration::from_secs(10), || {
        d.log_text().contains("session expired").then_some(())
    });
    assert!(expired.is_some(), "the session expired: {}", d.log_text());
    zk.ctl(&ns, &["create /disco/web/127.0.0.4:80"]);
    srv_until(&d, "web.disco", Duration::from_secs(10), |a| a.len() == 3);
    let again = eventually(Duration::from_secs(10), || {
        (zk.ls(&ns, "/registry/self") == ["127.0.0.1:18080"]).then_some(())
    });
    assert!(
        again.is_some(),
        "the registration is recreated in the new session: {}",
        d.log_text()
    );
    ns.kill(http);
}

#[test]
fn registration_appears_and_disappears_with_the_local_health_check() {
    let ns = Netns::new();
    let zk = ZkServer::start(&ns, ZK_PORT);
    let dir = ns.dir.path().to_str().expect("utf-8").to_owned();
    let http_args = [
        "-m",
        "http.server",
        "18080",
        "--bind",
        "127.0.0.1",
        "--directory",
        dir.as_str(),
    ];
    let http = ns.spawn("python3", &http_args, &ns.path("http.log"));
    let register = format!(
        "[[register]]\nservice = \"local\"\naddr = \"127.0.0.1:18080\"\nhosts = [\"{}\"]\npath = \"/disco/local\"\nformat = \"serverset\"\nsession_timeout = \"10s\"\n\
         ports = {{ admin = 18081 }}\ncheck = {{ kind = \"http\", path = \"/\", expect = \"200-299\", interval = \"200ms\", timeout = \"500ms\", rise = 2, fall = 2 }}\n",
        zk.hosts
    );
    let mut d = zk::daemon(
        &ns,
        &format!("{}\n{register}", zk::source(&zk, "/disco", "5s")),
    );
    d.start();

    let up = |want: usize| {
        eventually(Duration::from_secs(10), || {
            (zk.ls(&ns, "/disco/local").len() == want).then_some(())
        })
    };
    assert!(up(1).is_some(), "announced once healthy: {}", d.log_text());
    assert!(
        zk.ls(&ns, "/disco/local")[0].starts_with("member_"),
        "serverset members are sequential"
    );
    srv_until(&d, "local.disco", Duration::from_secs(5), |a| {
        a == ["0 1 18080 127-0-0-1.local.disco."]
    });
    assert_eq!(
        d.short("_admin._tcp.local.disco", "SRV"),
        ["0 1 18081 127-0-0-1.local.disco."]
    );

    ns.kill(http);
    assert!(
        up(0).is_some(),
        "withdrawn when the check fails: {}",
        d.log_text()
    );
    assert!(d.log_text().contains("unhealthy"), "{}", d.log_text());

    let http = ns.spawn("python3", &http_args, &ns.path("http2.log"));
    assert!(
        up(1).is_some(),
        "announced again when healthy: {}",
        d.log_text()
    );

    let t0 = Instant::now();
    d.stop();
    assert!(up(0).is_some(), "withdrawn at shutdown");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "deleted at shutdown, not left to the 10 s session expiry: {:?}",
        t0.elapsed()
    );
    ns.kill(http);
}

#[test]
fn zookeeper_guard_holds_a_90_percent_drop_and_never_applies_a_drop_to_zero() {
    let ns = Netns::new();
    let zk = ZkServer::start(&ns, ZK_PORT);
    let create: Vec<String> = (10..20)
        .map(|i| format!("create /disco/web/127.0.0.{i}:80"))
        .collect();
    zk.ctl(&ns, &create.iter().map(String::as_str).collect::<Vec<_>>());
    let guard = "[guard]\nmax_drop = 0.5\nhold_down = \"3s\"\n";
    let mut d = zk::daemon(
        &ns,
        &format!("{}\n{guard}", zk::source(&zk, "/disco", "10s")),
    );
    d.start();
    srv_until(&d, "web.disco", Duration::from_secs(5), |a| a.len() == 10);

    // The daemon paused (well within the session timeout) while 9 of 10 instances go, so the source
    // sees the drop as one change; see the ignored test below for the same drop in quick steps.
    zk::signal(d.pid, "STOP");
    let delete: Vec<String> = (11..20)
        .map(|i| format!("delete /disco/web/127.0.0.{i}:80"))
        .collect();
    zk.ctl(&ns, &delete.iter().map(String::as_str).collect::<Vec<_>>());
    zk::signal(d.pid, "CONT");
    let t0 = Instant::now();
    let held = eventually(Duration::from_secs(2), || {
        d.log_text().contains("removal held").then_some(())
    });
    assert!(
        held.is_some(),
        "the 90% drop is held and logged: {}",
        d.log_text()
    );
    while t0.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            d.short("web.disco", "SRV").len(),
            10,
            "held for the hold-down"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    srv_until(&d, "web.disco", Duration::from_secs(10), |a| {
        a == ["0 1 80 127-0-0-10.web.disco."]
    });

    zk.ctl(&ns, &["delete /disco/web/127.0.0.10:80"]);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            d.short("web.disco", "SRV"),
            ["0 1 80 127-0-0-10.web.disco."],
            "a drop to zero is never applied"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A deploy tool deleting 9 of 10 instances one after another: the source applies each change
/// within milliseconds, so the guard sees nine small removals, none above `max_drop` alone; it
/// judges them over its window and holds the drop.
#[test]
fn zookeeper_guard_holds_a_90_percent_drop_made_in_quick_steps() {
    let ns = Netns::new();
    let zk = ZkServer::start(&ns, ZK_PORT);
    let create: Vec<String> = (10..20)
        .map(|i| format!("create /disco/web/127.0.0.{i}:80"))
        .collect();
    zk.ctl(&ns, &create.iter().map(String::as_str).collect::<Vec<_>>());
    let guard = "[guard]\nmax_drop = 0.5\nhold_down = \"30s\"\n";
    let mut d = zk::daemon(
        &ns,
        &format!("{}\n{guard}", zk::source(&zk, "/disco", "10s")),
    );
    d.start();
    srv_until(&d, "web.disco", Duration::from_secs(5), |a| a.len() == 10);
    let delete: Vec<String> = (11..20)
        .map(|i| format!("delete /disco/web/127.0.0.{i}:80"))
        .collect();
    zk.ctl(&ns, &delete.iter().map(String::as_str).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.short("web.disco", "SRV").len(),
        10,
        "held: {}",
        d.log_text()
    );
}

#[test]
fn zookeeper_digest_auth_reads_protected_nodes_and_survives_a_server_restart() {
    let ns = Netns::new();
    let mut zk = ZkServer::start(&ns, ZK_PORT);
    let auth = "disco:s3cret";
    let hosts = zk.hosts.clone();
    let as_user = |cmds: &[&str]| {
        let mut args = vec!["--auth", auth, hosts.as_str()];
        args.extend_from_slice(cmds);
        ns.ok(&zk::zkctl(), &args)
    };
    as_user(&["create /secure/web/127.0.0.2:80"]);
    let anonymous = ns.run(&zk::zkctl(), &[&zk.hosts, "ls /secure"]);
    assert!(!anonymous.status.success(), "the nodes are protected");

    let source = format!("{}auth = \"{auth}\"\n", zk::source(&zk, "/secure", "2s"));
    let mut d = zk::daemon(&ns, &source);
    d.start();
    srv_until(&d, "web.disco", Duration::from_secs(5), |a| {
        a == ["0 1 80 127-0-0-2.web.disco."]
    });

    // Credentials are per connection: after the server comes back they must be sent again.
    zk.kill(&ns);
    zk.restart(&ns);
    as_user(&["create /secure/web/127.0.0.3:80"]);
    srv_until(&d, "web.disco", Duration::from_secs(15), |a| a.len() == 2);
}

#[test]
fn zookeeper_additions_and_removals_reach_hooked_connects() {
    harness::ensure_hook_library();
    let ns = Netns::new();
    let zk = ZkServer::start(&ns, ZK_PORT);
    harness::backend(&ns, "127.0.0.2", 8080, "b2");
    harness::backend(&ns, "127.0.0.3", 8080, "b3");
    zk.ctl(&ns, &["create /disco/web/127.0.0.2:8080"]);
    let mut d = zk::daemon(&ns, &zk::source(&zk, "/disco", "5s"));
    d.start();
    ns.resolv_conf("127.0.0.53");
    srv_until(&d, "web.disco", Duration::from_secs(5), |a| a.len() == 1);
    assert_eq!(harness::hooked_who(&d, "web.disco", 8080, 2), ["b2", "b2"]);

    zk.ctl(&ns, &["create /disco/web/127.0.0.3:8080"]);
    let mut last = Vec::new();
    let both = eventually(Duration::from_secs(5), || {
        last = harness::hooked_who(&d, "web.disco", 8080, 4);
        (last.iter().filter(|w| *w == "b2").count() == 2
            && last.iter().filter(|w| *w == "b3").count() == 2)
            .then_some(())
    });
    assert!(
        both.is_some(),
        "the new backend takes its share of connects: {last:?}\n{}",
        d.log_text()
    );

    zk.ctl(&ns, &["delete /disco/web/127.0.0.2:8080"]);
    let only = eventually(Duration::from_secs(5), || {
        last = harness::hooked_who(&d, "web.disco", 8080, 4);
        (last == ["b3"; 4]).then_some(())
    });
    assert!(
        only.is_some(),
        "the removed backend gets no more connects: {last:?}\n{}",
        d.log_text()
    );
}

#[test]
fn a_missing_zookeeper_root_is_a_failure_and_its_creation_is_picked_up() {
    let ns = Netns::new();
    let zk = ZkServer::start(&ns, ZK_PORT);
    let mut d = zk::daemon(&ns, &zk::source(&zk, "/later", "5s"));
    d.start();
    let failed = eventually(Duration::from_secs(5), || {
        d.log_text().contains("NoNode").then_some(())
    });
    assert!(
        failed.is_some(),
        "a missing root is reported as a failure: {}",
        d.log_text()
    );
    let t0 = Instant::now();
    zk.ctl(&ns, &["create /later/web/127.0.0.2:80"]);
    srv_until(&d, "web.disco", Duration::from_secs(3), |a| {
        a == ["0 1 80 127-0-0-2.web.disco."]
    });
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "picked up through the watch on the root, not a slow retry"
    );
}
