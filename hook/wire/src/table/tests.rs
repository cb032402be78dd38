#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use alloc::vec;
use alloc::vec::Vec;
use core::net::{IpAddr, SocketAddr};
use core::sync::atomic::{AtomicU32, Ordering};

use super::build::{self, AreaInfo, Backend, PickSet, Service};
use super::*;
use crate::live::{self, Entry, Live, Report, Take};
use crate::pick::{Ask, Miss, pick, uncount};

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn backend(addr: &str, weight: u16, slot: u32, ports: &[u16]) -> Backend {
    Backend {
        addr: a(addr),
        weight,
        priority: 0,
        slot,
        ports: ports.to_vec(),
        standing: Standing::Candidate,
    }
}

fn set(weights: &[u32]) -> PickSet {
    PickSet {
        candidates: weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (i as u32, w))
            .collect(),
        schedule: build::smooth_schedule(weights, 4096),
        maglev: Vec::new(),
    }
}

fn web(policy: Policy) -> Service<'static> {
    Service {
        name: "web",
        policy,
        flags: 0,
        rr_slot: 3,
        client_ports: vec![9000],
        backends: vec![
            backend("127.0.0.2:8080", 1, 10, &[9090]),
            backend("127.0.0.3:8080", 3, 11, &[9091]),
        ],
        v4: set(&[1, 3]),
        v6: None,
    }
}

/// A table file image with one generation of `services` published, and a live region.
fn image(services: &[Service<'_>], epoch: u64) -> (Vec<AtomicU32>, Vec<AtomicU32>) {
    let records: Vec<(Vec<IpAddr>, Vec<u32>)> = services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ip: IpAddr = alloc::format!("127.77.0.{}", 9 + i).parse().unwrap();
            (vec![ip], build::service(s))
        })
        .collect();
    let refs: Vec<(&[IpAddr], &[u32])> = records
        .iter()
        .map(|(m, r)| (m.as_slice(), r.as_slice()))
        .collect();
    let info = AreaInfo {
        generation: 7,
        magic_v4: ("127.77.0.0".parse().unwrap(), 16),
        magic_v6: None,
        live_epoch: epoch,
    };
    let area = build::area(&info, &refs);
    let words = table_words(area.len() + 64, 64);
    let mem: Vec<AtomicU32> = (0..words).map(|_| AtomicU32::new(0)).collect();
    for (w, h) in mem.iter().zip(header((area.len() + 64) as u32, 64, 1)) {
        w.store(h, Ordering::Relaxed);
    }
    publish(&mem, &area).unwrap();
    let lw = live::live_words(16, 64, 8);
    let lmem: Vec<AtomicU32> = (0..lw).map(|_| AtomicU32::new(0)).collect();
    for (w, h) in lmem.iter().zip(live::header(16, 64, 8, 1)) {
        w.store(h, Ordering::Relaxed);
    }
    (mem, lmem)
}

fn ask(dest: &str) -> Ask<'static> {
    Ask {
        dest: a(dest),
        v6_ok: false,
        key: 0,
        rand: 0,
        local_turn: 0,
        exclude: &[],
    }
}

#[test]
fn golden_header_and_service_record() {
    let h = header(1000, 64, 42);
    let bytes: Vec<u8> = h.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(&bytes[..8], b"DTTABLE1");
    assert_eq!(
        &bytes[8..32],
        &[
            1, 0, 0, 0, 0, 0, 0, 0, 0xe8, 3, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0
        ]
    );
    let rec = build::service(&Service {
        name: "db",
        policy: Policy::RoundRobin,
        flags: 0,
        rr_slot: 5,
        client_ports: vec![],
        backends: vec![backend("127.0.0.2:5432", 2, 9, &[])],
        v4: set(&[2]),
        v6: None,
    });
    #[rustfmt::skip]
    let expected: [u32; 29] = [
        1, 5, 1, 0, 12, 12, 20, 20, 20, 27, 29, 0,
        // backend: ::ffff:127.0.0.2, port, weight | priority << 16, slot, standing (candidate)
        0, 0, 0xffff, 0x7f00_0002, 5432, 2, 9, 1,
        // pick set: 1 candidate, total 2, schedule 1, maglev 0; (0, 2); schedule [0]
        1, 2, 1, 0, 0, 2, 0,
        // name: length 2, "db"
        2, u32::from_le_bytes(*b"db\0\0"),
    ];
    assert_eq!(rec, expected);
    let live = live::header(16, 64, 8, 0x1_0000_0002);
    assert_eq!(
        &live[..8],
        &[
            u32::from_le_bytes(*b"DTLI"),
            u32::from_le_bytes(*b"VE01"),
            1,
            16,
            64,
            8,
            2,
            1
        ]
    );
}

#[test]
fn services_are_found_by_either_address_form_with_their_backends_and_ports() {
    let (mem, _) = image(&[web(Policy::RoundRobin)], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let found = t.read(|area| {
        assert_eq!(area.generation(), 7);
        assert_eq!(area.magic_v4(), Some(("127.77.0.0".parse().unwrap(), 16)));
        assert_eq!(area.magic_v6(), None);
        let svc = area.service("::ffff:127.77.0.9".parse().unwrap())?;
        let mut name = [0u8; 16];
        let n = svc.name(&mut name);
        assert_eq!(&name[..n], b"web");
        assert_eq!(svc.port_index(9000), Some(0));
        assert_eq!(svc.port_index(80), None);
        assert_eq!(svc.backend(1, None).unwrap().addr, a("127.0.0.3:8080"));
        assert_eq!(svc.backend(1, Some(0)).unwrap().addr, a("127.0.0.3:9091"));
        assert_eq!(svc.backend(2, None), None);
        Some(svc.rr_slot())
    });
    assert_eq!(found, Some(3));
    assert!(
        t.read(|area| area.service("127.77.0.10".parse().unwrap()))
            .is_none()
    );
}

#[test]
fn round_robin_is_one_turn_per_connect_across_every_reader_of_the_live_region() {
    let (mem, lmem) = image(&[web(Policy::RoundRobin)], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let l = Live::new(&lmem).unwrap();
    let seq: Vec<SocketAddr> = (0..4)
        .map(|_| pick(&t, Some(l), &ask("127.77.0.9:80"), true).unwrap().addr)
        .collect();
    assert_eq!(
        seq,
        [
            a("127.0.0.2:8080"),
            a("127.0.0.3:8080"),
            a("127.0.0.2:8080"),
            a("127.0.0.3:8080")
        ]
    );
    // A dry run shows the next turn without taking it.
    let next = pick(&t, Some(l), &ask("127.77.0.9:80"), false).unwrap();
    assert_eq!(next.addr, a("127.0.0.2:8080"));
    assert_eq!(
        pick(&t, Some(l), &ask("127.77.0.9:80"), true).unwrap().addr,
        next.addr
    );
    // A mapped client port gets its own backend port.
    assert_eq!(
        pick(&t, Some(l), &ask("127.77.0.9:9000"), true)
            .unwrap()
            .addr,
        a("127.0.0.3:9091")
    );
    // Excluded backends pass their turn on.
    let mut x = ask("127.77.0.9:80");
    let ex = [Some(a("127.0.0.2:8080"))];
    x.exclude = &ex;
    for _ in 0..3 {
        assert_eq!(
            pick(&t, Some(l), &x, true).unwrap().addr,
            a("127.0.0.3:8080")
        );
    }
    // A live region of another epoch is ignored: the caller's own turn counts.
    let (_, other) = image(&[], 1);
    for (w, h) in other.iter().zip(live::header(16, 64, 8, 2)) {
        w.store(h, Ordering::Relaxed);
    }
    let mut y = ask("127.77.0.9:80");
    y.local_turn = 1;
    assert_eq!(
        pick(&t, Live::new(&other), &y, true).unwrap().addr,
        a("127.0.0.3:8080")
    );
}

#[test]
fn weighted_round_robin_follows_the_schedule_and_random_the_weights() {
    let (mem, lmem) = image(&[web(Policy::WeightedRoundRobin)], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let l = Live::new(&lmem).unwrap();
    let heavy = (0..400)
        .filter(|_| {
            pick(&t, Some(l), &ask("127.77.0.9:80"), true).unwrap().addr == a("127.0.0.3:8080")
        })
        .count();
    assert_eq!(heavy, 300);
    assert_eq!(build::smooth_schedule(&[1, 3], 100), [1, 0, 1, 1]);
    assert_eq!(build::smooth_schedule(&[0, 0], 100), Vec::<u32>::new());
    assert_eq!(
        build::smooth_schedule(&[2, 6000], 100)
            .iter()
            .filter(|&&c| c == 0)
            .count(),
        1,
        "scaled, each keeps one"
    );

    let (mem, _) = image(&[web(Policy::Random)], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let heavy = (0..4000u64)
        .filter(|&r| {
            let mut q = ask("127.77.0.9:80");
            q.rand = crate::mix(r);
            pick(&t, None, &q, true).unwrap().addr == a("127.0.0.3:8080")
        })
        .count();
    assert!((2800..3200).contains(&heavy), "{heavy}");
}

#[test]
fn p2c_and_least_conn_read_shared_counts_and_stats() {
    let (mem, lmem) = image(&[web(Policy::P2c)], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let l = Live::new(&lmem).unwrap();
    // The weight-3 backend has 10 connects in flight: 10/3 > 0/1.
    l.in_flight(11).unwrap().store(10, Ordering::Relaxed);
    for r in 0..20u64 {
        let mut q = ask("127.77.0.9:80");
        q.rand = crate::mix(r);
        let p = pick(&t, Some(l), &q, false).unwrap();
        assert_eq!(p.addr, a("127.0.0.2:8080"), "draw {r}");
        assert!(!p.counted, "a dry run counts nothing");
    }
    let p = pick(&t, Some(l), &ask("127.77.0.9:80"), true).unwrap();
    assert!(p.counted);
    assert_eq!(l.in_flight_count(10), 1);
    uncount(&l, 10);
    uncount(&l, 10);
    assert_eq!(l.in_flight_count(10), 0, "below zero reads as zero");

    let (mem, lmem) = image(&[web(Policy::LeastConn)], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let l = Live::new(&lmem).unwrap();
    let aw = t.area_words();
    set_stat(&mem, aw, 10, 0, 5); // 5 established to .2 (weight 1)
    set_stat(&mem, aw, 11, 0, 3); // 3 to .3 (weight 3): 1 per unit of weight
    let seq: Vec<SocketAddr> = (0..3)
        .map(|_| pick(&t, Some(l), &ask("127.77.0.9:80"), true).unwrap().addr)
        .collect();
    // .3 costs 3/3, 4/3, 5/3 after each pick; .2 costs 5/1.
    assert!(seq.iter().all(|&x| x == a("127.0.0.3:8080")), "{seq:?}");
    assert_eq!(l.in_flight_count(11), 3);
}

#[test]
fn p2c_ewma_avoids_a_slow_backend_and_explores_an_unmeasured_one_once_at_a_time() {
    let (mem, lmem) = image(&[web(Policy::P2cEwma)], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let l = Live::new(&lmem).unwrap();
    let aw = t.area_words();
    set_stat(&mem, aw, 10, 1, 200);
    set_stat(&mem, aw, 10, 2, STAT_MEASURED);
    // .3 never measured and already trying: it costs the most.
    l.in_flight(11).unwrap().store(1, Ordering::Relaxed);
    let p = pick(&t, Some(l), &ask("127.77.0.9:80"), false).unwrap();
    assert_eq!(p.addr, a("127.0.0.2:8080"));
    assert_eq!((p.cost.latency_us, p.cost.measured), (200, true));
    set_stat(&mem, aw, 11, 1, 250_000);
    set_stat(&mem, aw, 11, 2, STAT_MEASURED);
    l.in_flight(11).unwrap().store(0, Ordering::Relaxed);
    for r in 0..10u64 {
        let mut q = ask("127.77.0.9:80");
        q.rand = crate::mix(r);
        assert_eq!(
            pick(&t, Some(l), &q, false).unwrap().addr,
            a("127.0.0.2:8080")
        );
    }
}

#[test]
fn maglev_keys_keep_their_backend_and_move_on_only_when_it_is_excluded() {
    let mut svc = web(Policy::Maglev);
    svc.v4.maglev = (0..17u16).map(|i| i % 2).collect();
    let (mem, _) = image(&[svc], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    for key in 0..50u64 {
        let mut q = ask("127.77.0.9:80");
        q.key = key;
        let owner = if (crate::mix(key) % 17).is_multiple_of(2) {
            "127.0.0.2:8080"
        } else {
            "127.0.0.3:8080"
        };
        assert_eq!(pick(&t, None, &q, true).unwrap().addr, a(owner));
        assert_eq!(
            pick(&t, None, &q, true).unwrap().addr,
            a(owner),
            "same key, same backend"
        );
        let ex = [Some(a(owner))];
        q.exclude = &ex;
        assert_ne!(pick(&t, None, &q, true).unwrap().addr, a(owner));
    }
}

#[test]
fn unknown_services_empty_sets_and_v6_sockets() {
    let mut svc = web(Policy::RoundRobin);
    svc.backends.push(backend("[fd00::5]:8080", 1, 12, &[9092]));
    svc.v6 = Some(PickSet {
        candidates: vec![(2, 1)],
        ..PickSet::default()
    });
    let mut empty = web(Policy::RoundRobin);
    empty.name = "empty";
    empty.v4 = PickSet::default();
    let (mem, _) = image(&[svc, empty], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    assert_eq!(
        pick(&t, None, &ask("127.77.0.99:80"), true),
        Err(Miss::UnknownService)
    );
    assert_eq!(
        pick(&t, None, &ask("127.77.0.10:80"), true),
        Err(Miss::NoBackend)
    );
    let mut q = ask("[::ffff:127.77.0.9]:80");
    q.v6_ok = true;
    assert_eq!(pick(&t, None, &q, true).unwrap().addr, a("[fd00::5]:8080"));
    // Its one candidate excluded, the socket spills to the service's other serving backends.
    let ex = [Some(a("[fd00::5]:8080"))];
    q.exclude = &ex;
    assert!(pick(&t, None, &q, true).unwrap().addr.is_ipv4());
}

#[test]
fn with_every_candidate_excluded_a_pick_spills_to_serving_backends_never_to_ejected_ones() {
    let mut svc = web(Policy::RoundRobin);
    svc.backends = vec![
        backend("127.0.0.2:8080", 1, 10, &[9090]),
        Backend {
            standing: Standing::OtherZone,
            ..backend("127.0.0.3:8080", 1, 11, &[9091])
        },
        Backend {
            standing: Standing::Out,
            ..backend("127.0.0.4:8080", 1, 12, &[9092])
        },
        Backend {
            priority: 1,
            standing: Standing::LowerTier,
            ..backend("127.0.0.5:8080", 1, 13, &[9093])
        },
    ];
    svc.v4 = set(&[1]);
    let (mem, _) = image(&[svc], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let b = t
        .read(|area| area.service(a("127.77.0.9:80").ip())?.backend(2, None))
        .unwrap();
    assert_eq!(b.standing, Standing::Out);
    assert_eq!(
        pick(&t, None, &ask("127.77.0.9:80"), true).unwrap().addr,
        a("127.0.0.2:8080")
    );
    let mut q = ask("127.77.0.9:80");
    let ex = [Some(a("127.0.0.2:8080"))];
    q.exclude = &ex;
    for turn in 0..4 {
        q.local_turn = turn;
        assert_eq!(
            pick(&t, None, &q, true).unwrap().addr,
            a("127.0.0.3:8080"),
            "best tier first"
        );
    }
    let ex = [Some(a("127.0.0.2:8080")), Some(a("127.0.0.3:8080"))];
    q.exclude = &ex;
    assert_eq!(
        pick(&t, None, &q, true).unwrap().addr,
        a("127.0.0.5:8080"),
        "then the lower tier"
    );
    // A named client port reaches the spare at its port for that name.
    let mut grpc = q;
    grpc.dest = a("127.77.0.9:9000");
    let ex_grpc = [Some(a("127.0.0.2:9090")), Some(a("127.0.0.3:9091"))];
    grpc.exclude = &ex_grpc;
    assert_eq!(
        pick(&t, None, &grpc, true).unwrap().addr,
        a("127.0.0.5:9093")
    );
    let ex = [ex[0], ex[1], Some(a("127.0.0.5:8080"))];
    q.exclude = &ex;
    assert_eq!(
        pick(&t, None, &q, true),
        Err(Miss::NoBackend),
        "never the ejected one"
    );
}

#[test]
fn a_generation_being_written_is_never_read_and_publishing_flips_areas() {
    let (mem, _) = image(&[web(Policy::RoundRobin)], 1);
    let t = Table::new(mem.as_slice()).unwrap();
    let active = mem[H_ACTIVE].load(Ordering::Relaxed) as usize;
    let seq = &mem[HEADER_WORDS + active * t.area_words()];
    let s = seq.load(Ordering::Relaxed);
    seq.store(s | 1, Ordering::Relaxed);
    assert_eq!(
        pick(&t, None, &ask("127.77.0.9:80"), true),
        Err(Miss::Unreadable)
    );
    seq.store(s, Ordering::Relaxed);
    assert!(pick(&t, None, &ask("127.77.0.9:80"), true).is_ok());
    // A second generation goes to the other area.
    let info = AreaInfo {
        generation: 8,
        magic_v4: ("127.77.0.0".parse().unwrap(), 16),
        magic_v6: None,
        live_epoch: 1,
    };
    publish(&mem, &build::area(&info, &[])).unwrap();
    assert_eq!(mem[H_ACTIVE].load(Ordering::Relaxed) as usize, active ^ 1);
    assert_eq!(
        pick(&t, None, &ask("127.77.0.9:80"), true),
        Err(Miss::UnknownService)
    );
    assert_eq!(t.read(|area| Some(area.generation())), Some(8));
    let huge = vec![0u32; t.area_words() + 1];
    assert_eq!(
        publish(&mem, &huge),
        Err(t.area_words() + 1),
        "too big for an area"
    );
    assert!(!t.superseded());
    supersede(&mem);
    assert!(t.superseded());
}

#[test]
fn corrupt_words_never_make_a_read_stray_or_panic() {
    let (mem, lmem) = image(&[web(Policy::LeastConn), web(Policy::Maglev)], 1);
    let l = Live::new(&lmem).unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    for round in 0..3000 {
        x = crate::mix(x.wrapping_add(round));
        let i = HEADER_WORDS + (x as usize >> 8) % (mem.len() - HEADER_WORDS);
        mem[i].store((x >> 32) as u32, Ordering::Relaxed);
        if let Ok(t) = Table::new(mem.as_slice()) {
            let mut q = ask("127.77.0.9:80");
            q.rand = x;
            q.key = x;
            let _ = pick(&t, Some(l), &q, true);
            let mut q = ask("127.77.0.10:9000");
            q.v6_ok = true;
            let _ = pick(&t, Some(l), &q, true);
        }
    }
}

#[test]
fn the_ring_carries_reports_in_order_and_a_lapped_reader_skips_ahead() {
    let (_, lmem) = image(&[], 1);
    let l = Live::new(&lmem).unwrap();
    assert_eq!(l.take(0), Take::Empty);
    let e = |p| Entry {
        report: Report::Pending { local_port: p },
        slot: 4,
        remote_port: 8080,
        counted: true,
    };
    assert!(!l.report(&e(1000)), "nobody sleeping: no wake-up");
    l.waiting_word().unwrap().store(1, Ordering::SeqCst);
    assert!(l.report(&Entry {
        report: Report::Failed { errno: 111 },
        slot: 5,
        remote_port: 80,
        counted: false
    }));
    assert_eq!(l.take(0), Take::Entry(Some(e(1000))));
    assert!(matches!(
        l.take(1),
        Take::Entry(Some(Entry {
            report: Report::Failed { errno: 111 },
            slot: 5,
            ..
        }))
    ));
    assert_eq!(l.take(2), Take::Empty);
    for p in 0..20 {
        l.report(&e(p));
    }
    assert_eq!(l.take(2), Take::Lapped(22 - 8));
    assert_eq!(l.take(14), Take::Entry(Some(e(12))));
    // Claimed but not written yet.
    l.head_word().unwrap().fetch_add(1, Ordering::SeqCst);
    assert_eq!(l.take(22), Take::NotYet);
}

#[test]
fn a_generation_written_in_place_equals_the_built_area_and_copies_unchanged_records() {
    let info = |generation| AreaInfo {
        generation,
        magic_v4: ("127.77.0.0".parse().unwrap(), 16),
        magic_v6: Some(("fd00::".parse().unwrap(), 64)),
        live_epoch: 5,
    };
    let web_rec = build::service(&web(Policy::RoundRobin));
    let mut api = web(Policy::LeastConn);
    api.name = "api";
    let api_rec = build::service(&api);
    let web_ips: Vec<IpAddr> = vec!["127.77.0.9".parse().unwrap(), "fd00::9".parse().unwrap()];
    let api_ips: Vec<IpAddr> = vec!["127.77.0.10".parse().unwrap()];
    let area_words = 1024;
    let mem: Vec<AtomicU32> = (0..table_words(area_words, 64))
        .map(|_| AtomicU32::new(0))
        .collect();
    for (w, h) in mem.iter().zip(header(area_words as u32, 64, 1)) {
        w.store(h, Ordering::Relaxed);
    }
    let area_of = |mem: &[AtomicU32]| -> Vec<u32> {
        let active = mem[H_ACTIVE].load(Ordering::Relaxed) as usize & 1;
        let base = HEADER_WORDS + active * area_words;
        let used = mem[base + A_USED].load(Ordering::Relaxed) as usize;
        // The sequence word differs by design: compare from the second word.
        mem[base + 1..base + used]
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    };

    // Generation 8 from new records: the same words as the area built in memory.
    let mut placed = Vec::new();
    let records = [
        (&web_ips[..], build::Record::New(&web_rec)),
        (&api_ips[..], build::Record::New(&api_rec)),
    ];
    publish_records(&mem, &info(8), &records, &mut placed).unwrap();
    let built = build::area(
        &info(8),
        &[(&web_ips[..], &web_rec[..]), (&api_ips[..], &api_rec[..])],
    );
    assert_eq!(area_of(&mem), built[1..]);
    assert_eq!(placed.len(), 2);
    assert_eq!(
        placed[1] - placed[0],
        web_rec.len() as u32,
        "records follow each other"
    );

    // Generation 9 copies web's record from the active area and re-encodes api: again the
    // built area's words, now in the other area.
    let active_before = mem[H_ACTIVE].load(Ordering::Relaxed);
    let at = placed[0] as usize;
    let web_at = &active_area(&mem).unwrap()[at..at + web_rec.len()];
    let mut api2 = web(Policy::P2c);
    api2.name = "api";
    let api2_rec = build::service(&api2);
    let mut placed2 = Vec::new();
    let records = [
        (&web_ips[..], build::Record::Mapped(web_at)),
        (&api_ips[..], build::Record::New(&api2_rec)),
    ];
    publish_records(&mem, &info(9), &records, &mut placed2).unwrap();
    assert_ne!(mem[H_ACTIVE].load(Ordering::Relaxed), active_before);
    let built = build::area(
        &info(9),
        &[(&web_ips[..], &web_rec[..]), (&api_ips[..], &api2_rec[..])],
    );
    assert_eq!(area_of(&mem), built[1..]);
    let t = Table::new(&mem[..]).unwrap();
    assert_eq!(t.read(|area| Some(area.generation())), Some(9));
    assert!(pick(&t, None, &ask("127.77.0.10:9000"), false).is_ok());

    // Too big: nothing is written, the active generation stays.
    let big = vec![0u32; area_words];
    let records = [(&web_ips[..], build::Record::New(&big))];
    assert!(publish_records(&mem, &info(10), &records, &mut Vec::new()).is_err());
    assert_eq!(t.read(|area| Some(area.generation())), Some(9));
    // A record past the active area is not handed out.
    assert_eq!(active_area(&mem).unwrap().len(), area_words);
    assert!(
        active_area(&mem)
            .unwrap()
            .get(area_words..area_words + 1)
            .is_none()
    );
}
