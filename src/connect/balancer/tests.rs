//! Property-style tests of the balancing policies: exact shares where the algorithm promises
//! them, stated tolerances where it is random.

use std::collections::HashMap;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::service::{Backend, PortName};

fn spec(lb: LbPolicy, backends: &[(&str, u16)]) -> ServiceSpec {
    let mut s = ServiceSpec::new("web".parse().unwrap());
    s.lb = lb;
    for (addr, weight) in backends {
        let mut b = Backend::new(addr.parse().unwrap());
        b.weight = *weight;
        s.backends.push(b);
    }
    s
}

fn counts(b: &mut Balancer, s: &ServiceSpec, n: usize, seed: u64) -> HashMap<SocketAddr, usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = Instant::now();
    let mut c = HashMap::new();
    for _ in 0..n {
        let p = b.pick(s, 80, true, now, &mut rng).expect("a backend");
        *c.entry(p.backend).or_insert(0) += 1;
    }
    c
}

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn round_robin_spreads_exactly_evenly_ignoring_weights() {
    let s = spec(
        LbPolicy::RoundRobin,
        &[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 5),
            ("127.0.0.4:80", 1),
        ],
    );
    let c = counts(&mut Balancer::default(), &s, 300, 1);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![100; 3],
        "{c:?}"
    );
}

#[test]
fn smooth_weighted_round_robin_matches_nginx_sequence() {
    let s = spec(
        LbPolicy::WeightedRoundRobin,
        &[
            ("127.0.0.2:80", 5),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 1),
        ],
    );
    let mut b = Balancer::default();
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    let seq: Vec<usize> = (0..14)
        .map(|_| b.pick(&s, 80, true, now, &mut rng).unwrap().index)
        .collect();
    // nginx's documented order for weights {5,1,1}: a a b a c a a, repeating.
    assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn smooth_weighted_holds_weights_exactly_in_every_cycle() {
    for weights in [[1u16, 2, 3], [7, 1, 1], [10, 10, 1]] {
        let backends: Vec<(String, u16)> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (format!("127.0.0.{}:80", i + 2), w))
            .collect();
        let refs: Vec<(&str, u16)> = backends.iter().map(|(s, w)| (s.as_str(), *w)).collect();
        let s = spec(LbPolicy::WeightedRoundRobin, &refs);
        let mut b = Balancer::default();
        let total: usize = weights.iter().map(|&w| usize::from(w)).sum();
        for cycle in 0..5 {
            let c = counts(&mut b, &s, total, cycle);
            for (addr, w) in &refs {
                assert_eq!(
                    c.get(&a(addr)).copied().unwrap_or(0),
                    usize::from(*w),
                    "weights {weights:?} cycle {cycle}"
                );
            }
        }
    }
}

#[test]
fn weighted_random_holds_weights_within_two_percent() {
    let s = spec(
        LbPolicy::Random,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 3)],
    );
    for seed in 0..5 {
        let n = 40_000;
        let c = counts(&mut Balancer::default(), &s, n, seed);
        let share = c[&a("127.0.0.3:80")] as f64 / n as f64;
        // sd = sqrt(.75*.25/40000) = 0.0022, so 0.02 is about 9 sd.
        assert!((share - 0.75).abs() < 0.02, "seed {seed}: share {share}");
    }
}

#[test]
fn p2c_keeps_outstanding_level_and_favours_backends_that_finish() {
    let s = spec(
        LbPolicy::P2c,
        &[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 1),
        ],
    );
    let mut b = Balancer::default();
    let c = counts(&mut b, &s, 300, 3);
    // Nothing finishes: p2c keeps the outstanding counts level (within 2 with 3 backends).
    let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
    assert!(max - min <= 2, "{c:?}");
    for addr in ["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"] {
        assert_eq!(b.outstanding(&s.name, a(addr)) as usize, c[&a(addr)]);
    }

    // Now .2 finishes every connect at once while the others stay stuck.
    let mut rng = StdRng::seed_from_u64(4);
    let now = Instant::now();
    let mut fast = 0;
    for _ in 0..300 {
        let p = b.pick(&s, 80, true, now, &mut rng).unwrap();
        if p.backend == a("127.0.0.2:80") {
            fast += 1;
            b.done(&s.name, p.backend);
        }
    }
    // It wins every pair it is drawn into: 2/3 of picks with three backends (sd about 8 of 300),
    // against 1/3 for a policy blind to load.
    assert!(
        (175..=225).contains(&fast),
        "fast backend got {fast} of 300"
    );
}

#[test]
fn a_reported_backend_is_held_then_returns_and_never_empties_the_set() {
    let s = spec(
        LbPolicy::RoundRobin,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)],
    );
    let mut b = Balancer::new(Duration::from_secs(2));
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    b.pick(&s, 80, true, t0, &mut rng).unwrap();
    b.report_failure(&s, a("127.0.0.2:80"), t0);
    for _ in 0..10 {
        assert_eq!(
            b.pick(&s, 80, true, t0 + Duration::from_secs(1), &mut rng)
                .unwrap()
                .backend,
            a("127.0.0.3:80")
        );
    }
    let later: Vec<SocketAddr> = (0..4)
        .map(|_| {
            b.pick(&s, 80, true, t0 + Duration::from_secs(3), &mut rng)
                .unwrap()
                .backend
        })
        .collect();
    assert!(
        later.contains(&a("127.0.0.2:80")),
        "hold expired: {later:?}"
    );

    // Both held: picks still happen (a hold never turns a non-empty set into an empty one).
    b.report_failure(&s, a("127.0.0.2:80"), t0 + Duration::from_secs(3));
    b.report_failure(&s, a("127.0.0.3:80"), t0 + Duration::from_secs(3));
    assert!(
        b.pick(&s, 80, true, t0 + Duration::from_secs(4), &mut rng)
            .is_some()
    );
}

#[test]
fn only_the_best_priority_is_used() {
    let mut s = spec(
        LbPolicy::RoundRobin,
        &[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 1),
        ],
    );
    s.backends[0].priority = 1;
    let c = counts(&mut Balancer::default(), &s, 10, 1);
    assert_eq!(c.get(&a("127.0.0.2:80")), None);
    // A held best tier falls back to the next tier.
    let mut b = Balancer::default();
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    b.pick(&s, 80, true, now, &mut rng);
    b.report_failure(&s, a("127.0.0.3:80"), now);
    b.report_failure(&s, a("127.0.0.4:80"), now);
    assert_eq!(
        b.pick(&s, 80, true, now, &mut rng).unwrap().backend,
        a("127.0.0.2:80")
    );
}

#[test]
fn v4_sockets_only_get_v4_backends() {
    let s = spec(
        LbPolicy::RoundRobin,
        &[("[fd00::2]:80", 1), ("127.0.0.3:80", 1)],
    );
    let mut b = Balancer::default();
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    for _ in 0..4 {
        assert_eq!(
            b.pick(&s, 80, false, now, &mut rng).unwrap().backend,
            a("127.0.0.3:80")
        );
    }
    let v6_only = spec(LbPolicy::RoundRobin, &[("[fd00::2]:80", 1)]);
    assert_eq!(b.pick(&v6_only, 80, false, now, &mut rng), None);
    assert!(b.pick(&v6_only, 80, true, now, &mut rng).is_some());
}

#[test]
fn named_ports_map_client_ports_to_backend_ports() {
    let mut s = spec(
        LbPolicy::RoundRobin,
        &[("127.0.0.2:8080", 1), ("127.0.0.3:8081", 1)],
    );
    let grpc: PortName = "grpc".parse().unwrap();
    s.client_ports.insert(9000, grpc.clone());
    s.backends[0].set_port(grpc.clone(), 9090);
    let mut b = Balancer::default();
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    assert_eq!(
        b.pick(&s, 9000, true, now, &mut rng).unwrap().addr,
        a("127.0.0.2:9090")
    );
    // .3 has no grpc port of its own: its default port.
    assert_eq!(
        b.pick(&s, 9000, true, now, &mut rng).unwrap().addr,
        a("127.0.0.3:8081")
    );
    // An unmapped client port goes to the default port.
    assert_eq!(
        b.pick(&s, 443, true, now, &mut rng).unwrap().addr,
        a("127.0.0.2:8080")
    );
}

#[test]
fn state_survives_backend_changes_for_backends_that_stay() {
    let s1 = spec(LbPolicy::P2c, &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)]);
    let mut b = Balancer::default();
    counts(&mut b, &s1, 10, 1);
    let before = b.outstanding(&s1.name, a("127.0.0.3:80"));
    assert!(before > 0);
    let s2 = spec(LbPolicy::P2c, &[("127.0.0.3:80", 1), ("127.0.0.4:80", 1)]);
    let mut rng = StdRng::seed_from_u64(1);
    let p = b.pick(&s2, 80, true, Instant::now(), &mut rng).unwrap();
    // The new backend has no outstanding connects, so p2c must pick it.
    assert_eq!(p.backend, a("127.0.0.4:80"));
    assert_eq!(b.outstanding(&s2.name, a("127.0.0.3:80")), before);
    assert_eq!(
        b.outstanding(&s2.name, a("127.0.0.2:80")),
        0,
        "removed backend forgotten"
    );
    b.retain(|_| false);
    assert_eq!(b.outstanding(&s2.name, a("127.0.0.3:80")), 0);
}

#[test]
fn empty_service_picks_nothing() {
    let s = spec(LbPolicy::WeightedRoundRobin, &[]);
    let mut rng = StdRng::seed_from_u64(1);
    assert_eq!(
        Balancer::default().pick(&s, 80, true, Instant::now(), &mut rng),
        None
    );
    let zero = spec(
        LbPolicy::WeightedRoundRobin,
        &[("127.0.0.2:80", 0), ("127.0.0.3:80", 0)],
    );
    let c = counts(&mut Balancer::default(), &zero, 10, 1);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![5, 5],
        "all-zero weights mean equal"
    );
}

/// Four equal backends on 127.0.0.2-5, ejected after one failure for 30 s, at most half at once.
fn four_ejectable(lb: LbPolicy) -> ServiceSpec {
    let mut s = spec(
        lb,
        &[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 1),
            ("127.0.0.5:80", 1),
        ],
    );
    s.outlier = Some(Box::new(outlier(1, 30, 50)));
    s
}

fn outlier(n: u32, base_s: u64, max_pct: u8) -> crate::service::Outlier {
    crate::service::Outlier {
        consecutive_failures: n,
        base_ejection: Duration::from_secs(base_s),
        max_ejection: Duration::from_secs(base_s * 10),
        max_ejected_percent: max_pct,
    }
}

#[test]
fn consecutive_failures_eject_for_growing_times_capped() {
    let mut s = spec(
        LbPolicy::RoundRobin,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)],
    );
    s.outlier = Some(Box::new(outlier(3, 30, 50)));
    let mut b = Balancer::new(Duration::from_secs(2));
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    let x = a("127.0.0.2:80");
    b.pick(&s, 80, true, t0, &mut rng).unwrap();
    assert_eq!(
        b.report_failure(&s, x, t0),
        FailureOutcome::Held { consecutive: 1 }
    );
    assert_eq!(
        b.report_failure(&s, x, t0),
        FailureOutcome::Held { consecutive: 2 }
    );
    assert_eq!(
        b.report_failure(&s, x, t0),
        FailureOutcome::Ejected {
            for_: Duration::from_secs(30),
            times: 1
        }
    );
    // Long after the 2 s hold, still ejected: only the other backend is picked.
    for _ in 0..10 {
        assert_eq!(
            b.pick(&s, 80, true, t0 + Duration::from_secs(29), &mut rng)
                .unwrap()
                .backend,
            a("127.0.0.3:80")
        );
    }
    assert!(
        b.ejected_until(&s.name, x, t0 + Duration::from_secs(29))
            .is_some()
    );
    let back: Vec<_> = (0..4)
        .map(|_| {
            b.pick(&s, 80, true, t0 + Duration::from_secs(31), &mut rng)
                .unwrap()
                .backend
        })
        .collect();
    assert!(
        back.contains(&x),
        "returns after the ejection time: {back:?}"
    );
    // Second ejection lasts twice as long.
    let t1 = t0 + Duration::from_secs(31);
    for _ in 0..2 {
        b.report_failure(&s, x, t1);
    }
    assert_eq!(
        b.report_failure(&s, x, t1),
        FailureOutcome::Ejected {
            for_: Duration::from_secs(60),
            times: 2
        }
    );
    assert!(
        b.ejected_until(&s.name, x, t1 + Duration::from_secs(59))
            .is_some()
    );
    assert!(
        b.ejected_until(&s.name, x, t1 + Duration::from_secs(61))
            .is_none()
    );
    // Growth is capped at max_ejection (300 s here).
    let mut t = t1 + Duration::from_secs(61);
    let mut last = Duration::ZERO;
    for _ in 0..20 {
        for _ in 0..3 {
            if let FailureOutcome::Ejected { for_, .. } = b.report_failure(&s, x, t) {
                last = for_;
                t += for_ + Duration::from_secs(1);
            }
        }
    }
    assert_eq!(last, Duration::from_secs(300));
}

#[test]
fn successes_between_failures_reset_the_count() {
    let mut s = spec(
        LbPolicy::RoundRobin,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)],
    );
    s.outlier = Some(Box::new(outlier(3, 30, 50)));
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    let x = a("127.0.0.2:80");
    // Fail, then many picks of x that nobody reported failed: the count starts over each time.
    for _ in 0..10 {
        b.report_failure(&s, x, t0);
        b.report_failure(&s, x, t0);
        for _ in 0..(2 * (PICK_SLACK + 1)) {
            b.pick(&s, 80, true, t0, &mut rng);
        }
    }
    assert!(b.ejected_until(&s.name, x, t0).is_none());
    // A p2c done (success) resets too.
    b.report_failure(&s, x, t0);
    b.report_failure(&s, x, t0);
    b.report_success(&s.name, x);
    assert_eq!(
        b.report_failure(&s, x, t0),
        FailureOutcome::Held { consecutive: 1 }
    );
    // A few picks (within the prefetch slack) do not count as successes.
    b.report_failure(&s, x, t0);
    b.pick(&s, 80, true, t0, &mut rng);
    b.pick(&s, 80, true, t0, &mut rng);
    assert!(matches!(
        b.report_failure(&s, x, t0),
        FailureOutcome::Ejected { .. }
    ));
}

#[test]
fn never_more_than_the_max_share_is_ejected() {
    let s = four_ejectable(LbPolicy::RoundRobin);
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    b.pick(&s, 80, true, t0, &mut rng);
    let outcomes: Vec<_> = s
        .backends
        .iter()
        .map(|be| b.report_failure(&s, be.addr, t0))
        .collect();
    let ejected = outcomes
        .iter()
        .filter(|o| matches!(o, FailureOutcome::Ejected { .. }))
        .count();
    assert_eq!(ejected, 2, "{outcomes:?}");
    assert!(matches!(outcomes[3], FailureOutcome::CapReached { .. }));
    let c: std::collections::HashSet<_> = (0..8)
        .map(|_| b.pick(&s, 80, true, t0, &mut rng).unwrap().backend)
        .collect();
    assert_eq!(c.len(), 2);
    // A lone backend is never ejected.
    let mut one = spec(LbPolicy::RoundRobin, &[("127.0.0.2:80", 1)]);
    one.name = "one".parse().unwrap();
    one.outlier = Some(Box::new(outlier(1, 30, 100)));
    b.pick(&one, 80, true, t0, &mut rng);
    assert!(matches!(
        b.report_failure(&one, a("127.0.0.2:80"), t0),
        FailureOutcome::CapReached { .. }
    ));
    assert!(b.ejected_until(&one.name, a("127.0.0.2:80"), t0).is_none());
}

#[test]
fn slow_start_ramps_a_new_backend_from_the_floor() {
    let mut s = spec(LbPolicy::WeightedRoundRobin, &[("127.0.0.2:80", 1)]);
    s.slow_start = Some(Box::new(crate::service::SlowStart {
        window: Duration::from_secs(30),
        floor_percent: 10,
    }));
    let mut b = Balancer::default();
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    b.pick(&s, 80, true, t0, &mut rng);
    s.backends.push(Backend::new(a("127.0.0.3:80")));
    let share = |b: &mut Balancer, rng: &mut StdRng, at: Duration| {
        let n = 1000;
        let hits = (0..n)
            .filter(|_| b.pick(&s, 80, true, t0 + at, rng).unwrap().backend == a("127.0.0.3:80"))
            .count();
        hits as f64 / n as f64
    };
    // Weight w(t) = floor + (1 - floor) t / window against 1: share w / (1 + w).
    for (secs, want) in [(0u64, 0.1 / 1.1), (15, 0.55 / 1.55), (30, 0.5), (60, 0.5)] {
        let got = share(&mut b, &mut rng, Duration::from_secs(secs));
        assert!((got - want).abs() < 0.01, "at {secs}s: {got} want {want}");
    }
    // Random follows the same ramp, within sampling tolerance.
    let mut r = s.clone();
    r.lb = LbPolicy::Random;
    r.name = "rnd".parse().unwrap();
    r.backends.truncate(1);
    let mut b = Balancer::default();
    b.pick(&r, 80, true, t0, &mut rng);
    r.backends.push(Backend::new(a("127.0.0.3:80")));
    let hits = (0..4000)
        .filter(|_| b.pick(&r, 80, true, t0, &mut rng).unwrap().backend == a("127.0.0.3:80"))
        .count();
    assert!(
        (300..=440).contains(&hits),
        "{hits} of 4000, want about 364"
    );
}

#[test]
fn backends_present_at_start_do_not_ramp_but_an_ejected_one_does_on_return() {
    let mut s = spec(
        LbPolicy::WeightedRoundRobin,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)],
    );
    s.slow_start = Some(Box::new(crate::service::SlowStart {
        window: Duration::from_secs(30),
        floor_percent: 10,
    }));
    s.outlier = Some(Box::new(outlier(1, 10, 50)));
    let c = counts(&mut Balancer::default(), &s, 100, 1);
    assert_eq!(c.values().copied().collect::<Vec<_>>(), vec![50, 50]);
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    b.pick(&s, 80, true, t0, &mut rng);
    assert!(matches!(
        b.report_failure(&s, a("127.0.0.2:80"), t0),
        FailureOutcome::Ejected { .. }
    ));
    let back = t0 + Duration::from_secs(10);
    let hits = (0..1100)
        .filter(|_| b.pick(&s, 80, true, back, &mut rng).unwrap().backend == a("127.0.0.2:80"))
        .count();
    assert!(
        (95..=105).contains(&hits),
        "at the floor just after the ejection: {hits}"
    );
}

#[test]
fn slow_start_share_is_linear_from_the_floor() {
    let w = Duration::from_secs(30);
    assert_eq!(slow_start_per_mille(w, 100, Duration::ZERO), 100);
    assert_eq!(slow_start_per_mille(w, 100, Duration::from_secs(15)), 550);
    assert_eq!(slow_start_per_mille(w, 100, Duration::from_secs(30)), 1000);
    assert_eq!(
        slow_start_per_mille(Duration::ZERO, 100, Duration::ZERO),
        1000
    );
}

#[test]
fn least_conn_follows_the_counts_ties_by_weight_then_in_turn() {
    let s = spec(
        LbPolicy::LeastConn,
        &[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 2),
        ],
    );
    let mut b = Balancer::default();
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    assert!(b.connections_stale(t0, Duration::from_millis(100)));
    let table = |pairs: &[(&str, u32)]| {
        pairs
            .iter()
            .map(|(k, v)| (a(k), *v))
            .collect::<HashMap<_, _>>()
    };
    b.set_connections(
        table(&[
            ("127.0.0.2:80", 5),
            ("127.0.0.3:80", 0),
            ("127.0.0.4:80", 4),
        ]),
        t0,
    );
    assert!(!b.connections_stale(t0 + Duration::from_millis(50), Duration::from_millis(100)));
    // .3 has none; each pick counts as pending until the next table: .3 gets 0,1 then .4 (4/2 = 2) ties with .3 at 2...
    let picks: Vec<SocketAddr> = (0..6)
        .map(|_| b.pick(&s, 80, true, t0, &mut rng).unwrap().backend)
        .collect();
    assert_eq!(
        &picks[..2],
        &[a("127.0.0.3:80"), a("127.0.0.3:80")],
        "{picks:?}"
    );
    assert!(
        !picks.contains(&a("127.0.0.2:80")),
        "the most loaded gets nothing: {picks:?}"
    );
    // Per unit of weight: .4 with 4 over weight 2 beats .2 with 3 over weight 1.
    b.set_connections(
        table(&[
            ("127.0.0.2:80", 3),
            ("127.0.0.3:80", 3),
            ("127.0.0.4:80", 4),
        ]),
        t0,
    );
    assert_eq!(
        b.pick(&s, 80, true, t0, &mut rng).unwrap().backend,
        a("127.0.0.4:80")
    );
    // All equal per weight: the larger weight wins the tie.
    b.set_connections(
        table(&[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 2),
        ]),
        t0,
    );
    assert_eq!(
        b.pick(&s, 80, true, t0, &mut rng).unwrap().backend,
        a("127.0.0.4:80")
    );
    // Equal weights and counts: in turn.
    let even = spec(
        LbPolicy::LeastConn,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)],
    );
    let mut b = Balancer::default();
    b.set_connections(HashMap::new(), t0);
    let c = counts(&mut b, &even, 100, 1);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![50, 50],
        "{c:?}"
    );
}

#[test]
fn least_conn_over_a_large_set_uses_two_choices_and_avoids_the_loaded() {
    let addrs: Vec<String> = (2..42).map(|i| format!("127.0.0.{i}:80")).collect();
    let pairs: Vec<(&str, u16)> = addrs.iter().map(|s| (s.as_str(), 1)).collect();
    let s = spec(LbPolicy::LeastConn, &pairs);
    let mut b = Balancer::default();
    let t0 = Instant::now();
    // Half the backends carry 100 connections each.
    let table: HashMap<SocketAddr, u32> = addrs.iter().take(20).map(|x| (a(x), 100)).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let mut loaded = 0;
    for _ in 0..1000 {
        b.set_connections(table.clone(), t0);
        let p = b.pick(&s, 80, true, t0, &mut rng).unwrap();
        if table.contains_key(&p.backend) {
            loaded += 1;
        }
    }
    // p2c picks a loaded one only when both draws are loaded: about (20/40)(19/39) = 24%.
    assert!(
        (180..=310).contains(&loaded),
        "{loaded} of 1000 went to loaded backends"
    );
}

fn maglev_owner(table: &[u32], names: &[SocketAddr], key: u64) -> SocketAddr {
    names[table[(mix(key) % table.len() as u64) as usize] as usize]
}

#[test]
fn maglev_spreads_keys_evenly_and_moves_few_when_backends_change() {
    let five: Vec<SocketAddr> = (2..7).map(|i| a(&format!("127.0.0.{i}:80"))).collect();
    let t5 = maglev_table(&five, &[], MAGLEV_SIZE);
    let mut per: HashMap<SocketAddr, usize> = HashMap::new();
    for k in 0..20_000u64 {
        *per.entry(maglev_owner(&t5, &five, k)).or_insert(0) += 1;
    }
    // 4000 each expected; binomial sd about 57, plus Maglev's slot imbalance (under 1%).
    assert!(per.values().all(|&n| (3700..=4300).contains(&n)), "{per:?}");

    // Remove one: keys it did not own keep their backend (Maglev moves a few percent at most).
    let four: Vec<SocketAddr> = five.iter().copied().filter(|x| *x != five[2]).collect();
    let t4 = maglev_table(&four, &[], MAGLEV_SIZE);
    let (mut kept, mut others) = (0, 0);
    for k in 0..20_000u64 {
        let before = maglev_owner(&t5, &five, k);
        if before != five[2] {
            others += 1;
            kept += usize::from(maglev_owner(&t4, &four, k) == before);
        }
    }
    assert!(
        kept * 100 >= others * 97,
        "{kept} of {others} kept their backend"
    );

    // Add one: about 1/6 of the keys move (to the new backend), not more.
    let mut six = five.clone();
    six.push(a("127.0.0.7:80"));
    let t6 = maglev_table(&six, &[], MAGLEV_SIZE);
    let moved = (0..20_000u64)
        .filter(|&k| maglev_owner(&t6, &six, k) != maglev_owner(&t5, &five, k))
        .count();
    assert!(moved <= 20_000 / 6 + 600, "{moved} of 20000 moved");
    assert!(maglev_table(&[], &[], 7).is_empty());
    assert_eq!(
        maglev_table(&five, &[], 3).len(),
        3,
        "more backends than slots still terminates"
    );
}

#[test]
fn maglev_picks_follow_the_key_and_survive_an_ejection_elsewhere() {
    let s = four_ejectable(LbPolicy::Maglev);
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    let owners: Vec<SocketAddr> = (0..200u64)
        .map(|k| b.pick_keyed(&s, 80, true, t0, &mut rng, k).unwrap().backend)
        .collect();
    for (k, o) in owners.iter().enumerate() {
        assert_eq!(
            b.pick_keyed(&s, 80, true, t0, &mut rng, k as u64)
                .unwrap()
                .backend,
            *o,
            "same key, same backend"
        );
    }
    let distinct: std::collections::HashSet<_> = owners.iter().collect();
    assert_eq!(distinct.len(), 4);
    // Eject one: only its keys move.
    let gone = a("127.0.0.3:80");
    assert!(matches!(
        b.report_failure(&s, gone, t0),
        FailureOutcome::Ejected { .. }
    ));
    let mut moved_others = 0;
    for (k, o) in owners.iter().enumerate() {
        let now = b
            .pick_keyed(&s, 80, true, t0, &mut rng, k as u64)
            .unwrap()
            .backend;
        assert_ne!(now, gone);
        if *o != gone && now != *o {
            moved_others += 1;
        }
    }
    assert!(
        moved_others <= 10,
        "{moved_others} keys of surviving backends moved"
    );
}

#[test]
fn the_local_zone_is_preferred_while_it_holds_enough_capacity_then_spills_over() {
    let mut s = spec(
        LbPolicy::RoundRobin,
        &[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 1),
            ("127.0.0.5:80", 1),
        ],
    );
    for (b, z) in s.backends.iter_mut().zip(["a", "a", "b", "b"]) {
        b.set_zone(Some(z.into()));
    }
    s.outlier = Some(Box::new(outlier(1, 30, 50)));
    let mut b = Balancer::new(Duration::ZERO).with_zone(Some("a".into()), 0.3);
    let c = counts(&mut b, &s, 40, 1);
    assert_eq!(
        (
            c.get(&a("127.0.0.2:80")),
            c.get(&a("127.0.0.3:80")),
            c.len()
        ),
        (Some(&20), Some(&20), 2),
        "{c:?}"
    );
    // One of two local backends ejected: 1 of 3 eligible (33%) is still >= 30%: local only.
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    assert!(matches!(
        b.report_failure(&s, a("127.0.0.2:80"), t0),
        FailureOutcome::Ejected { .. }
    ));
    let now: std::collections::HashSet<_> = (0..10)
        .map(|_| b.pick(&s, 80, true, t0, &mut rng).unwrap().backend)
        .collect();
    assert_eq!(now.into_iter().collect::<Vec<_>>(), vec![a("127.0.0.3:80")]);
    // With a 40% threshold the same state spills over to every eligible backend.
    let mut b = Balancer::new(Duration::ZERO).with_zone(Some("a".into()), 0.4);
    b.pick(&s, 80, true, t0, &mut rng);
    b.report_failure(&s, a("127.0.0.2:80"), t0);
    let spill: std::collections::HashSet<_> = (0..12)
        .map(|_| b.pick(&s, 80, true, t0, &mut rng).unwrap().backend)
        .collect();
    assert_eq!(spill.len(), 3, "{spill:?}");
    // A zone with no backends at all: everyone.
    let c = counts(
        &mut Balancer::default().with_zone(Some("c".into()), 0.3),
        &s,
        40,
        1,
    );
    assert_eq!(c.len(), 4);
}

#[test]
fn explain_names_the_next_pick_without_taking_it() {
    let s = spec(
        LbPolicy::RoundRobin,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)],
    );
    let mut b = Balancer::default();
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    let first = b.pick(&s, 80, true, t0, &mut rng).unwrap().addr;
    for _ in 0..3 {
        let (next, why) = b.explain(&s, 80, true, t0, 0).unwrap();
        assert_ne!(next, first);
        assert_eq!(why, "round robin: next in turn");
    }
    let (next, _) = b.explain(&s, 80, true, t0, 0).unwrap();
    assert_eq!(
        b.pick(&s, 80, true, t0, &mut rng).unwrap().addr,
        next,
        "the explained pick is the next one"
    );
    let lc = spec(
        LbPolicy::LeastConn,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)],
    );
    b.set_connections(
        [(a("127.0.0.2:80"), 2), (a("127.0.0.3:80"), 5)]
            .into_iter()
            .collect(),
        t0,
    );
    assert_eq!(
        b.explain(&lc, 80, true, t0, 0),
        Some((
            a("127.0.0.2:80"),
            "least-conn: 2 connections, the fewest".into()
        ))
    );
}

#[test]
fn weighted_maglev_owns_keys_in_proportion_to_weight_and_stays_minimal_on_change() {
    let names: Vec<SocketAddr> = (2..5).map(|i| a(&format!("127.0.0.{i}:80"))).collect();
    let t = maglev_table(&names, &[1, 2, 5], MAGLEV_SIZE);
    let mut slots = [0usize; 3];
    for &e in &t {
        slots[e as usize] += 1;
    }
    // Shares of the table: 1/8, 2/8, 5/8, to within half a percent of the table.
    let want = [MAGLEV_SIZE / 8, MAGLEV_SIZE * 2 / 8, MAGLEV_SIZE * 5 / 8];
    for (got, want) in slots.iter().zip(want) {
        assert!(
            got.abs_diff(want) <= MAGLEV_SIZE / 200,
            "{slots:?} vs {want}"
        );
    }
    // Weight 0 owns nothing; all zero means all equal.
    let t0 = maglev_table(&names, &[0, 1, 1], MAGLEV_SIZE);
    assert!(!t0.contains(&0));
    let all0 = maglev_table(&names, &[0, 0, 0], MAGLEV_SIZE);
    assert!((0..3u32).all(|i| all0.iter().filter(|&&e| e == i).count() > MAGLEV_SIZE / 4));
    // Raising one weight moves keys only toward that backend.
    let t2 = maglev_table(&names, &[1, 2, 6], MAGLEV_SIZE);
    let wrong = t
        .iter()
        .zip(&t2)
        .filter(|(before, after)| before != after && **after != 2)
        .count();
    assert!(wrong * 100 <= MAGLEV_SIZE, "{wrong} slots moved elsewhere");
}

#[test]
fn weighted_maglev_picks_follow_weights() {
    let s = spec(
        LbPolicy::Maglev,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 3)],
    );
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    let heavy = (0..4000u64)
        .filter(|&k| {
            b.pick_keyed(&s, 80, true, now, &mut rng, k)
                .unwrap()
                .backend
                == a("127.0.0.3:80")
        })
        .count();
    // 3000 expected; binomial sd about 27.
    assert!((2850..=3150).contains(&heavy), "{heavy} of 4000");
}

fn ewma_spec() -> ServiceSpec {
    spec(
        LbPolicy::P2cEwma,
        &[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 1),
        ],
    )
}

#[test]
fn p2c_ewma_avoids_a_slow_backend_and_tries_it_again_once_the_estimate_decays() {
    let s = ewma_spec();
    let slow = a("127.0.0.4:80");
    let mut b = Balancer::new(Duration::ZERO).with_ewma_decay(Duration::from_secs(10));
    let mut rng = StdRng::seed_from_u64(7);
    let t0 = Instant::now();
    // Every pick is reported done with its latency: 200 µs, or 1 s for the slow one.
    let mut run = |b: &mut Balancer, at: Instant, n: usize| {
        let mut slow_picks = 0;
        for _ in 0..n {
            let p = b.pick(&s, 80, true, at, &mut rng).unwrap();
            b.done(&s.name, p.backend);
            let took = if p.backend == slow {
                slow_picks += 1;
                Duration::from_secs(1)
            } else {
                Duration::from_micros(200)
            };
            b.observe_latency(&s.name, p.backend, took, at);
        }
        slow_picks
    };
    let first = run(&mut b, t0, 300);
    // The slow backend is tried (it had no estimate) and then loses every comparison: p2c can
    // only choose it when both draws are it, which distinct draws never are.
    assert!((1..=3).contains(&first), "slow picked {first} times");
    assert!(b.latency_estimate(&s.name, slow, t0).unwrap() >= Duration::from_millis(999));
    // A minute later (six decay times) its estimate is under 2.5 ms x 1: still above 200 µs,
    // so it stays out while the others are measured...
    let later = t0 + Duration::from_secs(60);
    assert_eq!(run(&mut b, later, 100), 0);
    // ...but the others' estimates decay too, and with no samples all estimates reach zero:
    // after two minutes of silence the slow one is explored again, once, and then avoided.
    let much_later = t0 + Duration::from_secs(600);
    let again = run(&mut b, much_later, 100);
    assert!((1..=3).contains(&again), "slow picked {again} times");
}

#[test]
fn p2c_ewma_spreads_over_equal_backends_and_weighs_outstanding_connects() {
    let s = ewma_spec();
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(3);
    let now = Instant::now();
    for addr in ["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"] {
        b.pick(&s, 80, true, now, &mut rng).unwrap();
        b.observe_latency(&s.name, a(addr), Duration::from_millis(1), now);
    }
    // Nothing finishes: cost = 1 ms x (outstanding + 1) keeps the outstanding counts level.
    for _ in 0..300 {
        b.pick(&s, 80, true, now, &mut rng).unwrap();
    }
    let out: Vec<u32> = s
        .backends
        .iter()
        .map(|x| b.outstanding(&s.name, x.addr))
        .collect();
    let (lo, hi) = (out.iter().min().unwrap(), out.iter().max().unwrap());
    assert!(hi - lo <= 2, "{out:?}");
    // A peak sample lifts the estimate at once; a lower one moves it by the elapsed share.
    let x = a("127.0.0.2:80");
    b.observe_latency(&s.name, x, Duration::from_millis(50), now);
    assert_eq!(
        b.latency_estimate(&s.name, x, now),
        Some(Duration::from_millis(50))
    );
    let t1 = now + Duration::from_secs(10); // one decay time: the old estimate keeps 1/e
    b.observe_latency(&s.name, x, Duration::from_millis(1), t1);
    let est = b.latency_estimate(&s.name, x, t1).unwrap().as_secs_f64() * 1e3;
    let want = 50.0 / std::f64::consts::E + 1.0 * (1.0 - 1.0 / std::f64::consts::E);
    assert!((est - want).abs() < 0.01, "{est} ms vs {want} ms");
    let why = b.explain(&s, 80, true, t1, 0).unwrap().1;
    assert!(why.starts_with("p2c-ewma: "), "{why}");
}

#[test]
fn a_backend_that_leaves_and_returns_keeps_its_ejection_history_and_ramps_again() {
    let mut s = spec(
        LbPolicy::RoundRobin,
        &[
            ("127.0.0.2:80", 1),
            ("127.0.0.3:80", 1),
            ("127.0.0.4:80", 1),
        ],
    );
    s.outlier = Some(Box::new(outlier(1, 10, 50)));
    s.slow_start = Some(Box::new(crate::service::SlowStart {
        window: Duration::from_secs(30),
        floor_percent: 10,
    }));
    let gone = a("127.0.0.3:80");
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    b.pick(&s, 80, true, t0, &mut rng).unwrap();
    assert!(matches!(
        b.report_failure(&s, gone, t0),
        FailureOutcome::Ejected { times: 1, .. }
    ));
    // The ejection takes it out of the published list; it comes back when the ejection ends.
    let mut without = s.clone();
    without.backends.retain(|x| x.addr != gone);
    b.pick(&without, 80, true, t0, &mut rng).unwrap();
    let t1 = t0 + Duration::from_secs(11);
    b.pick(&s, 80, true, t1, &mut rng).unwrap();
    // Its second ejection is twice as long: the count survived the absence.
    assert!(matches!(
        b.report_failure(&s, gone, t1),
        FailureOutcome::Ejected { times: 2, .. }
    ));
    // And a returning backend ramps: right after its return its share is the floor.
    let t2 = t1 + Duration::from_secs(21);
    b.pick(&without, 80, true, t2, &mut rng).unwrap();
    let t3 = t2 + Duration::from_millis(10);
    let mut weighted = s.clone();
    weighted.lb = LbPolicy::WeightedRoundRobin;
    let c = (0..210)
        .filter(|_| b.pick(&weighted, 80, true, t3, &mut rng).unwrap().backend == gone)
        .count();
    // Weights 1000 : 100 (the 10% floor) : 1000 over 210 picks: 10 for the returning one.
    assert!((9..=11).contains(&c), "{c} of 210");
    assert!(b.ejected_until(&s.name, gone, t3).is_none());
}

#[test]
fn the_ejection_cap_counts_backends_that_left_the_list_while_ejected() {
    let mut s = four_ejectable(LbPolicy::RoundRobin);
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    b.pick(&s, 80, true, now, &mut rng).unwrap();
    // Each ejection takes the backend out of the published list, as the registry does.
    for gone in ["127.0.0.2:80", "127.0.0.3:80"] {
        assert!(matches!(
            b.report_failure(&s, a(gone), now),
            FailureOutcome::Ejected { .. }
        ));
        s.backends.retain(|x| x.addr != a(gone));
        b.pick(&s, 80, true, now, &mut rng).unwrap();
    }
    // Two of four are out: a third would break the 50% cap.
    assert!(matches!(
        b.report_failure(&s, a("127.0.0.4:80"), now),
        FailureOutcome::CapReached { .. }
    ));
}

#[test]
fn a_weight_change_rebuilds_the_maglev_table() {
    let mut s = spec(
        LbPolicy::Maglev,
        &[("127.0.0.2:80", 1), ("127.0.0.3:80", 1)],
    );
    let mut b = Balancer::new(Duration::ZERO);
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    let heavy = |b: &mut Balancer, s: &ServiceSpec, rng: &mut StdRng| {
        (0..1000u64)
            .filter(|&k| {
                b.pick_keyed(s, 80, true, now, rng, k).unwrap().backend == a("127.0.0.3:80")
            })
            .count()
    };
    let even = heavy(&mut b, &s, &mut rng);
    assert!((430..=570).contains(&even), "{even}");
    s.backends[1].weight = 9;
    let skewed = heavy(&mut b, &s, &mut rng);
    assert!((850..=950).contains(&skewed), "{skewed}");
}

#[test]
fn a_when_holds_instants_before_and_after_its_origin_exactly() {
    let now = Instant::now();
    let earlier = now.checked_sub(Duration::from_secs(5)).unwrap_or(now);
    for t in [now, now + Duration::from_secs(86_400 * 400), earlier] {
        assert_eq!(When::at(t).get(), Some(t));
    }
    assert_eq!(When::default().get(), None);
    assert_eq!(When::from(None).get(), None);
    assert_eq!(When::from(Some(now)).get(), Some(now));
}
