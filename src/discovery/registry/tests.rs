//! The registry on hand-built source events, with a temp dir for its files.

use super::*;
use crate::discovery::snapshot;
use crate::service::Backend;

fn spec(name: &str, backends: &[&str]) -> ServiceSpec {
    let mut s = ServiceSpec::new(name.parse().unwrap());
    s.backends = backends
        .iter()
        .map(|b| Backend::new(b.parse().unwrap()))
        .collect();
    s
}

fn registry(sources: usize, dir: Option<&std::path::Path>) -> Registry {
    let magic = MagicMap::new(
        "127.77.0.0/16".parse().unwrap(),
        None,
        Duration::from_secs(86_400),
    );
    let paths = StatePaths {
        magic: dir.map(|d| d.join("magic.json")),
        backends: dir.map(|d| d.join("backends.json")),
    };
    let names = (0..sources).map(|i| format!("s{i}")).collect();
    Registry::new(
        names,
        Guard::new(GuardConfig::default()),
        magic,
        paths,
        snapshot::shared(Snapshot::default()),
    )
}

/// Source `source` says `services` is its whole set, at `now`.
fn reset(r: &mut Registry, source: usize, services: Vec<ServiceSpec>, now: u64) {
    r.apply(SourceEvent::Reset { source, services }, now);
}

#[test]
fn sources_merge_by_service_and_backend() {
    let mut r = registry(2, None);
    reset(&mut r, 0, vec![spec("web", &["127.0.0.2:80"])], 0);
    reset(
        &mut r,
        1,
        vec![
            spec("web", &["127.0.0.2:80", "127.0.0.3:80"]),
            spec("api", &[]),
        ],
        0,
    );
    let snap = r.snapshot().load_full();
    assert_eq!(snap.generation, 2);
    assert_eq!(snap.service("web").unwrap().spec.backends.len(), 2);
    assert!(snap.service("api").is_some());
}

#[test]
fn updates_replace_one_service_of_a_source() {
    let mut r = registry(1, None);
    reset(
        &mut r,
        0,
        vec![
            spec("web", &["127.0.0.2:80"]),
            spec("api", &["127.0.0.5:80"]),
        ],
        0,
    );
    r.apply(
        SourceEvent::Update {
            source: 0,
            service: spec("web", &["127.0.0.2:80", "127.0.0.3:80"]),
        },
        0,
    );
    r.apply(
        SourceEvent::Update {
            source: 0,
            service: spec("db", &["127.0.0.4:80"]),
        },
        0,
    );
    let snap = r.snapshot().load_full();
    assert_eq!(snap.service("web").unwrap().spec.backends.len(), 2);
    assert!(snap.service("api").is_some() && snap.service("db").is_some());
}

#[test]
fn drained_backends_leave_the_snapshot_and_status_tells_about_sources_and_holds() {
    let mut r = registry(2, None);
    reset(
        &mut r,
        0,
        vec![spec("web", &["127.0.0.2:80", "127.0.0.3:80"])],
        5,
    );
    r.apply(
        SourceEvent::Failed {
            source: 1,
            error: "connection refused".into(),
        },
        6,
    );
    let web: ServiceName = "web".parse().unwrap();
    r.drain(&web, "127.0.0.3:80".parse().unwrap(), true, 7)
        .unwrap();
    assert_eq!(published(&r, "web").len(), 1);
    assert!(
        r.drain(&web, "127.0.0.9:80".parse().unwrap(), true, 7)
            .unwrap_err()
            .contains("not a backend")
    );
    reset(&mut r, 0, vec![spec("web", &[])], 8);
    let st = r.status();
    assert_eq!(st.sources[0].state, "ok");
    assert_eq!(st.sources[0].last_update, Some(8));
    assert_eq!(
        (st.sources[1].state.as_str(), st.sources[1].error.as_deref()),
        ("waiting", Some("connection refused"))
    );
    assert_eq!(st.held.len(), 1);
    assert_eq!(
        st.held[0].applies_in, None,
        "an emptying update never applies"
    );
    assert_eq!(st.drained[&web].len(), 1);
    r.drain(&web, "127.0.0.3:80".parse().unwrap(), false, 10)
        .unwrap();
    assert_eq!(published(&r, "web").len(), 2);
}

#[test]
fn reconfiguring_keeps_sets_by_source_name() {
    let mut r = registry(2, None);
    reset(&mut r, 0, vec![spec("web", &["127.0.0.2:80"])], 0);
    reset(&mut r, 1, vec![spec("api", &["127.0.0.3:80"])], 0);
    // s1 moves to the front, s0 is removed, s9 is new.
    r.reconfigure(
        vec!["s1".into(), "s9".into()],
        GuardConfig {
            max_drop: 0.5,
            hold_down: Duration::ZERO,
        },
        1,
    );
    let snap = r.snapshot().load_full();
    assert!(snap.service("api").is_some());
    assert!(
        snap.service("web").is_none(),
        "a removed source's services go after the (zero) hold-down"
    );
    reset(
        &mut r,
        0,
        vec![spec("api", &["127.0.0.3:80", "127.0.0.4:80"])],
        2,
    );
    assert_eq!(published(&r, "api").len(), 2, "index 0 is now s1");
}

#[test]
fn a_failing_source_keeps_its_services() {
    let mut r = registry(1, None);
    reset(&mut r, 0, vec![spec("web", &["127.0.0.2:80"])], 0);
    r.apply(
        SourceEvent::Failed {
            source: 0,
            error: "unreadable".into(),
        },
        1,
    );
    assert!(r.snapshot().load().service("web").is_some());
    assert_eq!(
        r.snapshot().load().generation,
        1,
        "a failure publishes nothing"
    );
}

#[test]
fn the_guard_sits_between_sources_and_the_snapshot() {
    let mut r = registry(1, None);
    reset(
        &mut r,
        0,
        vec![spec("web", &["127.0.0.2:80", "127.0.0.3:80"])],
        0,
    );
    reset(&mut r, 0, vec![spec("web", &[])], 1);
    assert_eq!(published(&r, "web").len(), 2, "never emptied");
    assert_eq!(r.held().count(), 1);
}

#[test]
fn last_known_good_state_restores_sources_and_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = registry(2, Some(dir.path()));
    reset(&mut r, 0, vec![spec("web", &["127.0.0.2:80"])], 0);
    reset(
        &mut r,
        1,
        vec![spec("api", &["127.0.0.3:80", "127.0.0.4:80"])],
        0,
    );
    reset(&mut r, 1, vec![spec("api", &[])], 0);
    r.persist();
    let web = r.snapshot().load().service("web").unwrap().magic_v4;

    let mut restarted = registry(2, Some(dir.path()));
    let bytes = std::fs::read(dir.path().join("backends.json")).unwrap();
    assert_eq!(restarted.restore(&bytes, 10).unwrap(), 2);
    let snap = restarted.snapshot().load_full();
    assert_eq!(
        snap.service("api").unwrap().spec.backends.len(),
        2,
        "the held state is what was published"
    );
    // Source 0 comes back; source 1 is still down and keeps what it said before.
    reset(&mut restarted, 0, vec![spec("web", &["127.0.0.2:80"])], 11);
    let snap = restarted.snapshot().load_full();
    assert!(snap.service("api").is_some());
    assert_eq!(snap.service("web").unwrap().magic_v4, web);
}

#[test]
fn identical_updates_publish_nothing_and_addresses_persist() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = registry(1, Some(dir.path()));
    let set = vec![spec("web", &["127.0.0.2:80"])];
    reset(&mut r, 0, set.clone(), 0);
    reset(&mut r, 0, set, 0);
    assert_eq!(r.snapshot().load().generation, 1);
    let web = r.snapshot().load().service("web").unwrap().magic_v4;
    let mut restored = MagicMap::new(
        "127.77.0.0/16".parse().unwrap(),
        None,
        Duration::from_secs(86_400),
    );
    restored
        .restore(&std::fs::read(dir.path().join("magic.json")).unwrap())
        .unwrap();
    assert_eq!(restored.get(&"web".parse().unwrap()).unwrap().v4, web);
}

fn published(r: &Registry, name: &str) -> Vec<String> {
    r.snapshot()
        .load()
        .service(name)
        .unwrap()
        .spec
        .backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect()
}

fn web_with(backends: &[&str]) -> Registry {
    let mut r = registry(1, None);
    reset(&mut r, 0, vec![spec("web", backends)], 0);
    r
}

const REASON: &str = "ejected after 3 consecutive connect failures, for 30s";

#[test]
fn an_ejected_backend_leaves_the_snapshot_until_its_ejection_ends() {
    let mut r = web_with(&["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"]);
    let web: ServiceName = "web".parse().unwrap();
    let t0 = Instant::now();
    let b = "127.0.0.3:80".parse().unwrap();
    r.eject(&web, b, t0 + Duration::from_secs(30), REASON, 1, t0);
    assert_eq!(published(&r, "web"), ["127.0.0.2:80", "127.0.0.4:80"]);
    assert_eq!(r.wake_at, Some(t0 + Duration::from_secs(30)));
    let st = r.status();
    assert!(
        st.unhealthy[&web][&b].starts_with(REASON),
        "{:?}",
        st.unhealthy
    );
    assert!(
        st.events
            .last()
            .unwrap()
            .message
            .contains("127.0.0.3:80 of web ejected after 3")
    );

    // A second ejection before the end moves the end.
    r.eject(&web, b, t0 + Duration::from_secs(60), REASON, 2, t0);
    r.wake(3, t0 + Duration::from_secs(31));
    assert_eq!(published(&r, "web").len(), 2, "extended");

    r.wake(4, t0 + Duration::from_secs(60));
    assert_eq!(
        published(&r, "web"),
        ["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"]
    );
    assert_eq!(r.wake_at, None);
    assert!(r.status().unhealthy.is_empty());
    assert!(
        r.status()
            .events
            .last()
            .unwrap()
            .message
            .contains("back from ejection")
    );
}

#[test]
fn active_and_passive_health_do_not_readmit_each_others_backends() {
    let mut r = web_with(&[
        "127.0.0.2:80",
        "127.0.0.3:80",
        "127.0.0.4:80",
        "127.0.0.5:80",
    ]);
    let web: ServiceName = "web".parse().unwrap();
    let t0 = Instant::now();
    let (b, c) = (
        "127.0.0.3:80".parse().unwrap(),
        "127.0.0.4:80".parse().unwrap(),
    );
    r.eject(&web, b, t0 + Duration::from_secs(30), REASON, 1, t0);
    r.set_health_of(&web, b, true, "checks pass", 2);
    assert_eq!(
        published(&r, "web"),
        ["127.0.0.2:80", "127.0.0.4:80", "127.0.0.5:80"],
        "a passing check does not end an ejection"
    );

    r.set_health_of(&web, c, false, "connection refused", 3);
    r.eject(&web, c, t0 + Duration::from_secs(10), REASON, 4, t0);
    r.set_health_of(&web, b, false, "connection refused", 4);
    let st = r.status();
    assert_eq!(
        st.unhealthy[&web][&c],
        format!("connection refused; {REASON}, 10s left")
    );
    r.wake(5, t0 + Duration::from_secs(30));
    assert_eq!(
        published(&r, "web"),
        ["127.0.0.2:80", "127.0.0.5:80"],
        "the end of an ejection does not readmit a backend failing its checks"
    );
    assert!(r.ejected.is_empty());
    r.set_health_of(&web, b, true, "checks pass", 6);
    r.set_health_of(&web, c, true, "checks pass", 6);
    assert_eq!(published(&r, "web").len(), 4);
}

#[test]
fn ejections_keep_panic_mode_and_never_empty_the_answers() {
    let mut r = web_with(&[
        "127.0.0.2:80",
        "127.0.0.3:80",
        "127.0.0.4:80",
        "127.0.0.5:80",
    ]);
    let web: ServiceName = "web".parse().unwrap();
    let t0 = Instant::now();
    for (i, addr) in ["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"]
        .iter()
        .enumerate()
    {
        let until = t0 + Duration::from_secs(10 + i as u64);
        r.eject(&web, addr.parse().unwrap(), until, REASON, 1, t0);
    }
    assert_eq!(
        published(&r, "web").len(),
        4,
        "1 of 4 in is below the panic threshold: balance over all"
    );
    assert!(r.status().panicking.contains(&web));
    r.eject(
        &web,
        "127.0.0.5:80".parse().unwrap(),
        t0 + Duration::from_secs(20),
        REASON,
        1,
        t0,
    );
    assert_eq!(published(&r, "web").len(), 4, "never empty");

    r.wake(2, t0 + Duration::from_secs(11));
    assert_eq!(
        published(&r, "web"),
        ["127.0.0.2:80", "127.0.0.3:80"],
        "2 of 4 is enough"
    );
    assert!(r.status().panicking.is_empty());
    r.wake(3, t0 + Duration::from_secs(20));
    assert_eq!(published(&r, "web").len(), 4);
}

#[test]
fn ejections_of_unknown_or_departed_backends_are_dropped() {
    let mut r = web_with(&["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"]);
    let web: ServiceName = "web".parse().unwrap();
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(30);
    r.eject(&web, "127.0.0.9:80".parse().unwrap(), until, REASON, 1, t0);
    r.eject(
        &"api".parse().unwrap(),
        "127.0.0.2:80".parse().unwrap(),
        until,
        REASON,
        1,
        t0,
    );
    r.eject(&web, "127.0.0.2:80".parse().unwrap(), t0, REASON, 1, t0);
    assert!(r.ejected.is_empty() && r.wake_at.is_none());
    assert_eq!(r.snapshot().load().generation, 1, "nothing republished");

    r.eject(&web, "127.0.0.4:80".parse().unwrap(), until, REASON, 1, t0);
    reset(
        &mut r,
        0,
        vec![spec("web", &["127.0.0.2:80", "127.0.0.3:80"])],
        2,
    );
    assert!(r.ejected.is_empty(), "the backend left its service");
    assert_eq!(r.wake_at, None);
    reset(
        &mut r,
        0,
        vec![spec(
            "web",
            &["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"],
        )],
        3,
    );
    assert_eq!(
        published(&r, "web").len(),
        3,
        "a returning backend is not ejected"
    );
}
