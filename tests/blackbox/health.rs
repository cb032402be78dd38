//! Active health checks with real backends (python http.server) that the tests stop and start:
//! a killed backend leaves the SRV answer (and with it the pick set) within fall x interval,
//! comes back after rise passes, panic mode keeps every backend when too few are healthy, and a
//! backup tier takes over while the primaries are down and hands back when they recover.
//! Passive health: a backend the hook ejected after refused connects leaves the SRV answer too,
//! for the ejection time.

use std::time::{Duration, Instant};

use crate::harness::ensure_hook_library;
use crate::harness::{DISCOTECH, Daemon, Netns, eventually, greeter};

const CHECK: &str = "health = { kind = \"http\", path = \"/healthz\", interval = \"200ms\", timeout = \"200ms\", jitter = \"50ms\", rise = 2, fall = 2 }";

/// A backend on `ip:8080` answering `/healthz` (named by its address).
fn backend(ns: &Netns, ip: &str) -> u32 {
    crate::harness::backend(ns, ip, 8080, ip)
}

fn srv(d: &Daemon<'_>, name: &str) -> Vec<String> {
    let mut v = d.short(name, "SRV");
    v.sort();
    v
}

#[test]
fn a_killed_backend_leaves_within_fall_intervals_and_panic_mode_keeps_everyone() {
    let ns = Netns::new();
    let mut pids: Vec<u32> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| backend(&ns, ip))
        .collect();
    let mut d = Daemon::configure(&ns, "127.0.0.53:53", "upstreams = []");
    d.zone("web.toml", &format!("[services.web]\nbackends = [\"127.0.0.2:8080\", \"127.0.0.3:8080\", \"127.0.0.4:8080\"]\n{CHECK}\n"));
    d.start();
    assert_eq!(srv(&d, "web.disco").len(), 3);

    ns.kill(pids.remove(1));
    let killed = Instant::now();
    let gone = eventually(Duration::from_secs(5), || {
        (srv(&d, "web.disco").len() == 2).then_some(killed.elapsed())
    });
    let took = gone.expect("the dead backend leaves the answer");
    // fall (2) x (interval 200 ms + jitter up to 50 ms) + one probe timeout, with room for a busy machine.
    assert!(took < Duration::from_millis(2000), "left after {took:?}");
    assert!(!srv(&d, "web.disco").iter().any(|r| r.contains("127-0-0-3")));
    let backends = String::from_utf8_lossy(
        &ns.run(
            DISCOTECH,
            &[
                "backends",
                "web",
                "--socket",
                ns.path("admin.sock").to_str().expect("utf-8"),
            ],
        )
        .stdout,
    )
    .into_owned();
    assert!(
        backends.contains("127.0.0.3:8080")
            && backends.contains("unhealthy (connect to 127.0.0.3:8080"),
        "{backends}"
    );

    pids.insert(1, backend(&ns, "127.0.0.3"));
    let back = eventually(Duration::from_secs(5), || {
        (srv(&d, "web.disco").len() == 3).then_some(())
    });
    assert!(
        back.is_some(),
        "a recovered backend returns after rise passes"
    );

    // Two of three down: 1/3 healthy is below the 50% panic threshold: balance over all three.
    ns.kill(pids[0]);
    ns.kill(pids[2]);
    let panic = eventually(Duration::from_secs(5), || {
        d.log_text()
            .contains("panic mode, balancing over all")
            .then_some(())
    });
    assert!(panic.is_some(), "log:\n{}", d.log_text());
    assert_eq!(
        srv(&d, "web.disco").len(),
        3,
        "SRV answers never go empty or crush the survivor"
    );
    let resolve = String::from_utf8_lossy(
        &ns.run(
            DISCOTECH,
            &[
                "resolve",
                "web",
                "--socket",
                ns.path("admin.sock").to_str().expect("utf-8"),
            ],
        )
        .stdout,
    )
    .into_owned();
    assert!(resolve.contains("panic mode"), "{resolve}");
}

#[test]
fn a_backup_tier_takes_over_while_the_primaries_are_down_and_hands_back() {
    let ns = Netns::new();
    let primary = backend(&ns, "127.0.0.5");
    backend(&ns, "127.0.0.6");
    let mut d = Daemon::configure(&ns, "127.0.0.53:53", "upstreams = []");
    d.zone(
        "tiered.toml",
        &format!("[services.tiered]\nbackends = [\"127.0.0.5:8080\", {{ addr = \"127.0.0.6:8080\", priority = 1 }}]\n{CHECK}\n"),
    );
    d.start();
    assert_eq!(
        srv(&d, "tiered.disco"),
        [
            "0 1 8080 127-0-0-5.tiered.disco.",
            "1 1 8080 127-0-0-6.tiered.disco."
        ]
    );

    ns.kill(primary);
    let failover = eventually(Duration::from_secs(5), || {
        (srv(&d, "tiered.disco") == ["0 1 8080 127-0-0-6.tiered.disco."]).then_some(())
    });
    assert!(
        failover.is_some(),
        "the backup serves at the best priority: {:?}",
        srv(&d, "tiered.disco")
    );

    backend(&ns, "127.0.0.5");
    let handback = eventually(Duration::from_secs(5), || {
        (srv(&d, "tiered.disco")
            == [
                "0 1 8080 127-0-0-5.tiered.disco.",
                "1 1 8080 127-0-0-6.tiered.disco.",
            ])
        .then_some(())
    });
    assert!(
        handback.is_some(),
        "traffic returns to the primary: {:?}",
        srv(&d, "tiered.disco")
    );
}

/// `n` blocking connects in one hooked process to `magic:7001`; who answered each.
fn hooked_connects(d: &Daemon<'_>, magic: &str, n: usize) -> Vec<String> {
    let hookclient = crate::harness::c_program("hookclient");
    let hookclient = hookclient.to_str().expect("utf-8");
    let out = d.hooked(&[hookclient, "many", magic, "7001", &n.to_string()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().strip_prefix("OK ").unwrap_or(l).to_owned())
        .collect()
}

#[test]
fn a_backend_ejected_for_refusing_connects_leaves_srv_answers_until_the_ejection_ends() {
    ensure_hook_library();
    let ns = Netns::new();
    greeter(&ns, "a", "127.0.0.2");
    greeter(&ns, "b", "127.0.0.3");
    // Nothing listens on 127.0.0.4:7001: every connect to it is refused.
    let mut d = Daemon::configure(&ns, "127.0.0.53:53", "upstreams = []");
    d.zone(
        "web.toml",
        "[services.web]\nlb = \"round-robin\"\noutlier = { base_ejection = \"3s\" }\n\
         backends = [\"127.0.0.2:7001\", \"127.0.0.3:7001\", \"127.0.0.4:7001\"]\n",
    );
    d.start();
    let all = [
        "0 1 7001 127-0-0-2.web.disco.",
        "0 1 7001 127-0-0-3.web.disco.",
        "0 1 7001 127-0-0-4.web.disco.",
    ];
    assert_eq!(srv(&d, "web.disco"), all);
    let magic = d.short("web.disco", "A").remove(0);

    // The hook retries a refused connect on another backend, so the client never sees the
    // refusals. A refusal is a hint: the daemon connects itself, and a refusal it sees too
    // ejects the backend at once.
    let ejected = eventually(Duration::from_secs(30), || {
        let got = hooked_connects(&d, &magic, 6);
        assert!(
            got.len() == 6 && got.iter().all(|g| g == "a" || g == "b"),
            "refusals are never surfaced: {got:?}"
        );
        (srv(&d, "web.disco") == all[..2]).then(Instant::now)
    });
    let ejected = ejected.unwrap_or_else(|| {
        panic!(
            "the refusing backend never left the SRV answer: {:?}; log:\n{}",
            srv(&d, "web.disco"),
            d.log_text()
        )
    });
    let backends = ns.ok(
        DISCOTECH,
        &[
            "backends",
            "web",
            "--socket",
            ns.path("admin.sock").to_str().expect("utf-8"),
        ],
    );
    assert!(
        backends.contains("127.0.0.4:7001")
            && backends.contains("ejected: a connect failed (Connection refused (os error 111)), confirmed by the daemon, for 3s"),
        "{backends}"
    );

    let back = eventually(Duration::from_secs(10), || {
        (srv(&d, "web.disco") == all).then(|| ejected.elapsed())
    });
    let back = back.expect("the backend returns to the SRV answer when its ejection ends");
    assert!(
        back > Duration::from_millis(1000),
        "returned after {back:?}, long before the 3 s ejection ended"
    );
    assert!(
        d.log_text()
            .contains("ejection over: backend back in SRV answers"),
        "{}",
        d.log_text()
    );
}
