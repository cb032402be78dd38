//! The connect decision against a fake kernel, a routing table and live region in memory, and
//! a fake daemon.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use discotech_wire::live::{self, Take};
use discotech_wire::table as wire_table;
use discotech_wire::table::build::{self, AreaInfo, Backend, PickSet, Service};

use super::*;

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const WEB: &str = "127.77.0.9:80";

#[derive(Default)]
struct Fake {
    info: Option<SockInfo>,
    /// Results per backend, consumed in order; missing means Ok.
    results: RefCell<HashMap<SocketAddr, Vec<Result<(), c_int>>>>,
    connects: RefCell<Vec<(SocketAddr, c_int)>>,
    daemon_up: bool,
    /// The daemon's backends in round-robin order; failed ones are skipped.
    daemon_backends: Vec<SocketAddr>,
    daemon_status: Option<Status>,
    report_done: bool,
    requests: RefCell<Vec<Request>>,
    rr: RefCell<usize>,
    failed: RefCell<Vec<SocketAddr>>,
    /// The shared table and live region, when the test maps them.
    table: Option<Table<'static, [AtomicU32]>>,
    live: Option<Live<'static>>,
    /// Which socket is behind the fd the tests use (its local port is derived from it).
    ino: RefCell<u64>,
    hash_key: Option<u64>,
    /// The fake monotonic clock (µs); every connect takes `connect_us`.
    clock: RefCell<u64>,
    connect_us: u64,
    clock_reads: RefCell<u32>,
    draws: Cell<u64>,
    /// Prefetching: the descriptors the fake daemon has pooled (handed out from the back).
    pooled: RefCell<Vec<c_int>>,
    /// The caller's socket cannot take a pooled connection over (bound, an odd option).
    cannot_take_over: bool,
    /// The caller's socket is non-blocking.
    nonblocking: bool,
    /// Take-overs made: (caller's fd, pooled fd, domain); and descriptors closed unused.
    taken: RefCell<Vec<(c_int, c_int, c_int)>>,
    closed: RefCell<Vec<c_int>>,
}

struct FakeSession<'a>(&'a Fake);

impl Session for FakeSession<'_> {
    fn ask(&mut self, req: &Request) -> Option<Reply> {
        let f = self.0;
        f.requests.borrow_mut().push(*req);
        if req.kind == Kind::Failed {
            f.failed.borrow_mut().push(req.backend_addr());
        }
        if let Some(status) = f.daemon_status {
            return Some(Reply::refuse(req.id, status, 1));
        }
        let failed = f.failed.borrow();
        let live: Vec<SocketAddr> = f
            .daemon_backends
            .iter()
            .copied()
            .filter(|b| !failed.contains(b))
            .collect();
        if live.is_empty() {
            return Some(Reply::refuse(req.id, Status::NoBackend, 1));
        }
        let mut rr = f.rr.borrow_mut();
        let b = live[*rr % live.len()];
        *rr += 1;
        Some(Reply::ok(
            req.id,
            b,
            if f.report_done { FLAG_REPORT_DONE } else { 0 },
            1,
        ))
    }

    fn tell(&mut self, req: &Request) {
        self.0.requests.borrow_mut().push(*req);
    }

    fn ask_pooled(&mut self, req: &Request) -> Option<(Reply, Option<c_int>)> {
        let f = self.0;
        f.requests.borrow_mut().push(*req);
        match f.pooled.borrow_mut().pop() {
            Some(fd) => Some((
                Reply::ok(req.id, a("127.0.0.3:8080"), FLAG_HANDED_OVER, 1),
                Some(fd),
            )),
            None => Some((Reply::refuse(req.id, Status::NoBackend, 1), None)),
        }
    }
}

impl<'a> Os for &'a Fake {
    type Session = FakeSession<'a>;

    fn sock_info(&self, _fd: c_int) -> Option<SockInfo> {
        self.info
    }

    fn connect(&self, _fd: c_int, to: SocketAddr, domain: c_int) -> Result<(), c_int> {
        self.connects.borrow_mut().push((to, domain));
        *self.clock.borrow_mut() += self.connect_us;
        let mut results = self.results.borrow_mut();
        match results.get_mut(&to) {
            Some(list) if !list.is_empty() => list.remove(0),
            _ => Ok(()),
        }
    }

    fn table(&self) -> Option<Table<'static, [AtomicU32]>> {
        self.table
    }

    fn live(&self, epoch: u64) -> Option<Live<'static>> {
        self.live.filter(|l| l.epoch() == epoch)
    }

    fn report(&self, live: &Live<'_>, e: &Entry) {
        live.report(e);
    }

    fn session(&self) -> Option<FakeSession<'a>> {
        self.daemon_up.then_some(FakeSession(self))
    }

    fn pid(&self) -> u32 {
        42
    }

    fn hash_key(&self) -> Option<u64> {
        self.hash_key
    }

    fn key(&self) -> u64 {
        self.hash_key.unwrap_or(1000)
    }

    fn rand(&self) -> u64 {
        let n = self.draws.get() + 1;
        self.draws.set(n);
        discotech_wire::mix(n)
    }

    fn now_us(&self) -> u64 {
        *self.clock_reads.borrow_mut() += 1;
        *self.clock.borrow()
    }

    fn now_ms(&self) -> i64 {
        (*self.clock.borrow() / 1000) as i64
    }

    fn can_take_over(&self, _fd: c_int) -> bool {
        !self.cannot_take_over
    }

    fn take_over(
        &self,
        fd: c_int,
        pooled: c_int,
        domain: c_int,
        _reply: &Reply,
    ) -> Result<bool, c_int> {
        self.taken.borrow_mut().push((fd, pooled, domain));
        Ok(self.nonblocking)
    }

    fn close(&self, fd: c_int) {
        self.closed.borrow_mut().push(fd);
    }

    fn local_port(&self, _fd: c_int) -> Option<u16> {
        // Another socket under the same number (another `ino`) has another port.
        Some(40_000 + u16::try_from(*self.ino.borrow() - 777).unwrap())
    }
}

fn tcp(domain: c_int) -> Option<SockInfo> {
    Some(SockInfo {
        stream: true,
        domain,
    })
}

fn fake(backends: &[&str]) -> Fake {
    Fake {
        info: tcp(libc::AF_INET),
        daemon_up: true,
        ino: RefCell::new(777),
        hash_key: None,
        daemon_backends: backends.iter().map(|b| a(b)).collect(),
        ..Fake::default()
    }
}

const EPOCH: u64 = 5;

/// A table and its live region, leaked so they live as long as a mapping would.
#[derive(Clone, Copy)]
struct Shm {
    table: Table<'static, [AtomicU32]>,
    live: Live<'static>,
    table_mem: &'static [AtomicU32],
    live_mem: &'static [AtomicU32],
}

/// A table with the service `web` at 127.77.0.9 over `backends` (slots 0, 1, ...) under
/// `policy`, and a live region for it.
fn shared(policy: Policy, backends: &[&str]) -> Shm {
    shared_with(policy, 0, backends)
}

/// [`shared`], with service flags.
fn shared_with(policy: Policy, flags: u32, backends: &[&str]) -> Shm {
    let weights: Vec<u32> = backends.iter().map(|_| 1).collect();
    let svc = Service {
        name: "web",
        policy,
        flags,
        rr_slot: 0,
        client_ports: vec![],
        backends: backends
            .iter()
            .enumerate()
            .map(|(i, b)| Backend {
                addr: a(b),
                weight: 1,
                priority: 0,
                slot: i as u32,
                ports: vec![],
                standing: wire_table::Standing::Candidate,
            })
            .collect(),
        v4: PickSet {
            candidates: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| (i as u32, w))
                .collect(),
            schedule: build::smooth_schedule(&weights, 64),
            maglev: Vec::new(),
        },
        v6: None,
    };
    let record = build::service(&svc);
    let magic = [a(WEB).ip()];
    let info = AreaInfo {
        generation: 1,
        magic_v4: ("127.77.0.0".parse().unwrap(), 16),
        magic_v6: None,
        live_epoch: EPOCH,
    };
    let area = build::area(&info, &[(&magic[..], &record[..])]);
    let area_words = area.len() + 16;
    let mem: Vec<AtomicU32> = (0..wire_table::table_words(area_words, 16))
        .map(|_| AtomicU32::new(0))
        .collect();
    for (w, h) in mem.iter().zip(wire_table::header(area_words as u32, 16, 1)) {
        w.store(h, Ordering::Relaxed);
    }
    wire_table::publish(&mem, &area).unwrap();
    let lmem: Vec<AtomicU32> = (0..live::live_words(4, 16, 16))
        .map(|_| AtomicU32::new(0))
        .collect();
    for (w, h) in lmem.iter().zip(live::header(4, 16, 16, EPOCH)) {
        w.store(h, Ordering::Relaxed);
    }
    let table_mem: &'static [AtomicU32] = Vec::leak(mem);
    let live_mem: &'static [AtomicU32] = Vec::leak(lmem);
    Shm {
        table: Table::new(table_mem).unwrap(),
        live: Live::new(live_mem).unwrap(),
        table_mem,
        live_mem,
    }
}

/// A process (its own fake and state) that maps `shared`.
fn mapped(s: Shm) -> Fake {
    Fake {
        table: Some(s.table),
        live: Some(s.live),
        ..fake(&[])
    }
}

/// The ring's entries from `from` on.
fn ring(live: &Live<'_>, from: u32) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut tail = from;
    while let Take::Entry(Some(e)) = live.take(tail) {
        out.push(e);
        tail += 1;
    }
    out
}

fn targets(f: &Fake) -> Vec<SocketAddr> {
    f.connects.borrow().iter().map(|c| c.0).collect()
}

#[test]
fn round_robin_is_one_rotation_across_processes_without_asking_the_daemon() {
    let s = shared(Policy::RoundRobin, &["127.0.0.2:8080", "127.0.0.3:8080"]);
    // Short-lived processes: each makes one connect with state of its own.
    let mut got = Vec::new();
    for _ in 0..6 {
        let p = mapped(s);
        assert_eq!(
            on_connect(&&p, &State::new(), 3, a(WEB)),
            Verdict::Return(Ok(()))
        );
        got.extend(targets(&p));
        assert!(p.requests.borrow().is_empty(), "no question to the daemon");
        assert_eq!(*p.clock_reads.borrow(), 0, "not timed");
    }
    let (x, y) = (a("127.0.0.2:8080"), a("127.0.0.3:8080"));
    assert_eq!(got, [x, y, x, y, x, y]);
    assert!(ring(&s.live, 0).is_empty(), "nothing to report");
}

#[test]
fn a_refused_backend_is_reported_on_the_ring_held_and_another_tried() {
    let s = shared(Policy::RoundRobin, &["127.0.0.2:8080", "127.0.0.3:8080"]);
    let p = mapped(s);
    p.results
        .borrow_mut()
        .insert(a("127.0.0.2:8080"), vec![Err(libc::ECONNREFUSED)]);
    let state = State::new();
    assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    assert_eq!(targets(&p), [a("127.0.0.2:8080"), a("127.0.0.3:8080")]);
    let reports = ring(&s.live, 0);
    assert_eq!(
        reports,
        [Entry {
            report: Report::Failed {
                errno: libc::ECONNREFUSED as u16
            },
            slot: 0,
            remote_port: 8080,
            counted: false,
        }]
    );
    // Held: this process's next connects skip it, though the rotation comes round to it.
    for _ in 0..3 {
        assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    }
    assert_eq!(targets(&p)[2..], [a("127.0.0.3:8080"); 3]);
    // Another process is not steered by this one's hold.
    let q = mapped(s);
    for _ in 0..2 {
        assert_eq!(
            on_connect(&&q, &State::new(), 3, a(WEB)),
            Verdict::Return(Ok(()))
        );
    }
    let mut other = targets(&q);
    other.sort();
    assert_eq!(other, [a("127.0.0.2:8080"), a("127.0.0.3:8080")]);
    // When the hold ends the backend is back in this process's rotation.
    *p.clock.borrow_mut() += (HOLD_MS as u64 + 1) * 1000;
    for _ in 0..2 {
        assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    }
    assert!(targets(&p)[5..].contains(&a("127.0.0.2:8080")));
}

#[test]
fn a_process_holding_every_backend_still_connects_rather_than_refuse() {
    let s = shared(Policy::RoundRobin, &["127.0.0.2:8080"]);
    let p = mapped(s);
    p.results
        .borrow_mut()
        .insert(a("127.0.0.2:8080"), vec![Err(libc::ECONNREFUSED)]);
    let state = State::new();
    assert_eq!(
        on_connect(&&p, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::ECONNREFUSED))
    );
    assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    assert_eq!(targets(&p), [a("127.0.0.2:8080"); 2]);
}

#[test]
fn a_nonblocking_connect_is_reported_pending_with_its_local_port_and_stays_counted() {
    let s = shared(Policy::P2c, &["127.0.0.2:8080"]);
    let p = mapped(s);
    p.results.borrow_mut().insert(
        a("127.0.0.2:8080"),
        vec![Err(libc::EINPROGRESS), Err(libc::EISCONN)],
    );
    let state = State::new();
    assert_eq!(
        on_connect(&&p, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::EINPROGRESS))
    );
    assert_eq!(
        ring(&s.live, 0),
        [Entry {
            report: Report::Pending { local_port: 40_000 },
            slot: 0,
            remote_port: 8080,
            counted: true,
        }]
    );
    assert_eq!(
        s.live.in_flight_count(0),
        1,
        "the daemon uncounts it when it settles"
    );
    // The repeated connect on the same socket goes to the same backend, with no new pick.
    assert_eq!(
        on_connect(&&p, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::EISCONN))
    );
    assert_eq!(s.live.in_flight_count(0), 1);
    assert_eq!(ring(&s.live, 0).len(), 1);
}

#[test]
fn a_blocking_connect_is_uncounted_when_it_returns_and_p2c_ewma_reports_its_time() {
    for policy in [Policy::P2c, Policy::LeastConn, Policy::P2cEwma] {
        let s = shared(policy, &["127.0.0.2:8080", "127.0.0.3:8080"]);
        let mut p = mapped(s);
        p.connect_us = 1_250;
        assert_eq!(
            on_connect(&&p, &State::new(), 3, a(WEB)),
            Verdict::Return(Ok(()))
        );
        // least-conn counts the pick until the daemon next reads the kernel's socket table.
        let left = u32::from(policy == Policy::LeastConn);
        assert_eq!(
            s.live.in_flight_count(0) + s.live.in_flight_count(1),
            left,
            "{policy:?}"
        );
        let reports = ring(&s.live, 0);
        if policy == Policy::P2cEwma {
            assert_eq!(reports.len(), 1);
            assert_eq!(reports[0].report, Report::Connected { latency_us: 1_250 });
            assert!(!reports[0].counted);
        } else {
            assert!(reports.is_empty(), "{policy:?}: {reports:?}");
        }
    }
}

#[test]
fn hostile_counters_only_weigh_between_the_tables_backends() {
    let backends = ["127.0.0.2:8080", "127.0.0.3:8080"];
    for policy in [
        Policy::RoundRobin,
        Policy::P2c,
        Policy::LeastConn,
        Policy::P2cEwma,
    ] {
        let s = shared(policy, &backends);
        // Another process scribbles over every word after the header: round-robin counters,
        // counts in flight and the ring.
        for (i, w) in s.live_mem.iter().enumerate().skip(live::HEADER_WORDS) {
            w.store(
                (i as u32).wrapping_mul(0x9e37_79b9) | 0x8000_0000,
                Ordering::Relaxed,
            );
        }
        let p = mapped(s);
        let state = State::new();
        for _ in 0..50 {
            assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
        }
        assert!(
            targets(&p)
                .iter()
                .all(|t| backends.contains(&t.to_string().as_str())),
            "{policy:?}"
        );
    }
}

#[test]
fn unknown_services_and_empty_services_are_refused_from_the_table_without_a_connect() {
    let s = shared(Policy::RoundRobin, &[]);
    let p = mapped(s);
    assert_eq!(
        on_connect(&&p, &State::new(), 3, a(WEB)),
        Verdict::Return(Err(libc::ECONNREFUSED))
    );
    assert_eq!(
        on_connect(&&p, &State::new(), 3, a("127.77.0.10:80")),
        Verdict::Return(Err(libc::ECONNREFUSED))
    );
    assert!(p.connects.borrow().is_empty());
    assert!(p.requests.borrow().is_empty());
}

#[test]
fn a_table_being_rewritten_past_reading_sends_the_question_to_the_daemon() {
    let s = shared(Policy::RoundRobin, &["127.0.0.2:8080"]);
    let mut p = mapped(s);
    p.daemon_backends = vec![a("127.0.0.9:9999")];
    p.daemon_up = true;
    // The active area's sequence word is odd: a writer is in the middle of it.
    // Header word 6 is the active area (pinned by the wire crate's golden-bytes tests).
    let active = s.table_mem[6].load(Ordering::Relaxed) as usize & 1;
    let seq = &s.table_mem[wire_table::HEADER_WORDS + active * s.table.area_words()];
    seq.fetch_add(1, Ordering::Relaxed);
    assert_eq!(
        on_connect(&&p, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    assert_eq!(targets(&p), [a("127.0.0.9:9999")]);
    assert_eq!(p.requests.borrow()[0].kind, Kind::Pick);
    seq.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn udp_and_non_sockets_pass_through_untouched() {
    let mut f = fake(&["127.0.0.2:8080"]);
    f.info = Some(SockInfo {
        stream: false,
        domain: libc::AF_INET,
    });
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::PassThrough
    );
    f.info = None;
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::PassThrough
    );
    assert!(f.connects.borrow().is_empty());
    assert!(
        f.requests.borrow().is_empty(),
        "no daemon traffic for passthrough"
    );
}

#[test]
fn the_chosen_backend_is_connected_in_the_sockets_family() {
    let f = fake(&["127.0.0.2:8080", "127.0.0.3:8080"]);
    let state = State::new();
    assert_eq!(on_connect(&&f, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    assert_eq!(on_connect(&&f, &state, 4, a(WEB)), Verdict::Return(Ok(())));
    assert_eq!(
        *f.connects.borrow(),
        [
            (a("127.0.0.2:8080"), libc::AF_INET),
            (a("127.0.0.3:8080"), libc::AF_INET)
        ]
    );
    let req = f.requests.borrow()[0];
    assert_eq!(
        (req.kind, req.port, req.pid, req.flags),
        (Kind::Pick, 80, 42, 0)
    );

    // An AF_INET6 socket to the v4-mapped magic address: the daemon sees the same magic address,
    // the backend goes out on the v6 socket (the fake records the domain; os.rs maps the address).
    let mut f6 = fake(&["127.0.0.2:8080"]);
    f6.info = tcp(libc::AF_INET6);
    assert_eq!(
        on_connect(&&f6, &state, 5, a("[::ffff:127.77.0.9]:80")),
        Verdict::Return(Ok(()))
    );
    assert_eq!(
        f6.connects.borrow()[0],
        (a("127.0.0.2:8080"), libc::AF_INET6)
    );
    let req = f6.requests.borrow()[0];
    assert_eq!(req.magic_ip(), a(WEB).ip());
    assert_eq!(req.flags, FLAG_INET6);
}

#[test]
fn a_refused_backend_is_reported_and_another_tried() {
    let f = fake(&["127.0.0.2:8080", "127.0.0.3:8080"]);
    f.results
        .borrow_mut()
        .insert(a("127.0.0.2:8080"), vec![Err(libc::ECONNREFUSED)]);
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    let connects: Vec<SocketAddr> = f.connects.borrow().iter().map(|c| c.0).collect();
    assert_eq!(connects, [a("127.0.0.2:8080"), a("127.0.0.3:8080")]);
    let reqs = f.requests.borrow();
    assert_eq!(reqs[1].kind, Kind::Failed);
    assert_eq!(reqs[1].backend_addr(), a("127.0.0.2:8080"));
    assert_eq!(reqs[1].errno, libc::ECONNREFUSED as u16);
    assert_eq!(reqs[1].attempt, 1);
}

#[test]
fn when_every_backend_refuses_the_errno_is_the_real_one_and_attempts_are_bounded() {
    let backends = [
        "127.0.0.2:1",
        "127.0.0.3:1",
        "127.0.0.4:1",
        "127.0.0.5:1",
        "127.0.0.6:1",
        "127.0.0.7:1",
    ];
    let f = fake(&backends);
    for b in backends {
        f.results
            .borrow_mut()
            .insert(a(b), vec![Err(libc::EHOSTUNREACH)]);
    }
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::Return(Err(libc::EHOSTUNREACH))
    );
    assert_eq!(f.connects.borrow().len(), MAX_ATTEMPTS);

    // Errors that are not about the backend are returned as they are, without a retry.
    let f = fake(&["127.0.0.2:8080", "127.0.0.3:8080"]);
    f.results
        .borrow_mut()
        .insert(a("127.0.0.2:8080"), vec![Err(libc::EACCES)]);
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::Return(Err(libc::EACCES))
    );
    assert_eq!(f.connects.borrow().len(), 1);
}

#[test]
fn a_repeated_nonblocking_connect_goes_to_the_same_backend_without_asking() {
    let mut f = fake(&["127.0.0.2:8080", "127.0.0.3:8080"]);
    f.info = tcp(libc::AF_INET);
    f.results.borrow_mut().insert(
        a("127.0.0.2:8080"),
        vec![
            Err(libc::EINPROGRESS),
            Err(libc::EALREADY),
            Err(libc::EISCONN),
        ],
    );
    let state = State::new();
    assert_eq!(
        on_connect(&&f, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::EINPROGRESS))
    );
    assert_eq!(
        on_connect(&&f, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::EALREADY))
    );
    assert_eq!(
        on_connect(&&f, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::EISCONN))
    );
    let connects: Vec<SocketAddr> = f.connects.borrow().iter().map(|c| c.0).collect();
    assert_eq!(connects, [a("127.0.0.2:8080"); 3]);
    assert_eq!(
        f.requests.borrow().len(),
        1,
        "one pick for the whole connect"
    );
    // Finished (EISCONN): the next connect on that fd is a new one.
    assert_eq!(on_connect(&&f, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    assert_eq!(f.connects.borrow()[3].0, a("127.0.0.3:8080"));
}

#[test]
fn without_table_or_daemon_a_process_routes_by_what_it_learned_else_refuses() {
    let state = State::new();
    // Nothing known: fail fast with ECONNREFUSED and no connect.
    let mut down = fake(&[]);
    down.daemon_up = false;
    assert_eq!(
        on_connect(&&down, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::ECONNREFUSED))
    );
    assert!(down.connects.borrow().is_empty());

    // Learned while the daemon was up, then the daemon is gone.
    let up = fake(&["127.0.0.2:8080", "127.0.0.3:8080"]);
    for _ in 0..2 {
        assert_eq!(on_connect(&&up, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    }
    let mut gone = fake(&[]);
    gone.daemon_up = false;
    for _ in 0..2 {
        assert_eq!(
            on_connect(&&gone, &state, 3, a(WEB)),
            Verdict::Return(Ok(()))
        );
    }
    let mut got = targets(&gone);
    got.sort();
    assert_eq!(
        got,
        [a("127.0.0.2:8080"), a("127.0.0.3:8080")],
        "rotates over them"
    );

    // Offline, a refused backend is skipped in favour of another known one.
    gone.results
        .borrow_mut()
        .insert(a("127.0.0.2:8080"), vec![Err(libc::ECONNREFUSED)]);
    gone.results
        .borrow_mut()
        .insert(a("127.0.0.3:8080"), vec![Err(libc::ECONNREFUSED)]);
    gone.connects.borrow_mut().clear();
    assert_eq!(
        on_connect(&&gone, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::ECONNREFUSED))
    );
    let mut got = targets(&gone);
    got.sort();
    assert_eq!(got, [a("127.0.0.2:8080"), a("127.0.0.3:8080")]);
}

#[test]
fn unknown_services_and_empty_services_are_refused_without_a_connect() {
    for status in [Status::UnknownService, Status::NoBackend] {
        let mut f = fake(&["127.0.0.2:8080"]);
        f.daemon_status = Some(status);
        assert_eq!(
            on_connect(&&f, &State::new(), 3, a(WEB)),
            Verdict::Return(Err(libc::ECONNREFUSED))
        );
        assert!(
            f.connects.borrow().is_empty(),
            "the daemon's word beats what was learned"
        );
    }
    // A daemon that does not speak our version is treated as down.
    let state = State::new();
    let up = fake(&["127.0.0.5:8080"]);
    assert_eq!(on_connect(&&up, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    let mut f = fake(&[]);
    f.daemon_status = Some(Status::UnsupportedVersion);
    assert_eq!(on_connect(&&f, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    assert_eq!(targets(&f), [a("127.0.0.5:8080")]);
}

#[test]
fn p2c_answers_get_a_done_report_after_the_connect() {
    let mut f = fake(&["127.0.0.2:8080"]);
    f.report_done = true;
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    let reqs = f.requests.borrow();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].kind, Kind::Done);
    assert_eq!(reqs[1].backend_addr(), a("127.0.0.2:8080"));
}

#[test]
fn a_done_report_carries_the_connect_time_or_the_local_port_while_in_progress() {
    let mut f = fake(&["127.0.0.2:8080"]);
    f.report_done = true;
    f.connect_us = 1_250;
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    let done = f.requests.borrow()[1];
    assert_eq!(done.kind, Kind::Done);
    assert_eq!(done.latency_us, 1_250);
    assert_eq!(done.flags & FLAG_PENDING, 0);

    // A non-blocking connect: the hook cannot see it finish; the daemon looks it up by port.
    f.requests.borrow_mut().clear();
    f.results
        .borrow_mut()
        .insert(a("127.0.0.2:8080"), vec![Err(libc::EINPROGRESS)]);
    assert_eq!(
        on_connect(&&f, &State::new(), 4, a(WEB)),
        Verdict::Return(Err(libc::EINPROGRESS))
    );
    let done = f.requests.borrow()[1];
    assert_eq!(done.kind, Kind::Done);
    assert_eq!(done.flags & FLAG_PENDING, FLAG_PENDING);
    assert_eq!(done.errno, 40_000, "the local port");
    assert_eq!(done.latency_us, 0, "not measured by the hook");

    // Services without done reports are not timed at all.
    let g = fake(&["127.0.0.2:8080"]);
    assert_eq!(
        on_connect(&&g, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    assert!(g.requests.borrow().iter().all(|r| r.kind != Kind::Done));
    assert_eq!(*g.clock_reads.borrow(), 0, "no clock reads");
    assert_eq!(
        *f.clock_reads.borrow(),
        3,
        "two for the timed connect, one for the pending one"
    );
}

#[test]
fn a_reused_fd_number_is_a_new_socket_and_gets_a_new_pick() {
    let f = fake(&["127.0.0.2:8080", "127.0.0.3:8080"]);
    f.results
        .borrow_mut()
        .insert(a("127.0.0.2:8080"), vec![Err(libc::EINPROGRESS)]);
    let state = State::new();
    assert_eq!(
        on_connect(&&f, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::EINPROGRESS))
    );
    // The application closed fd 3 without connecting again; a new socket got the number.
    *f.ino.borrow_mut() = 778;
    assert_eq!(on_connect(&&f, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    let connects: Vec<SocketAddr> = f.connects.borrow().iter().map(|c| c.0).collect();
    assert_eq!(connects, [a("127.0.0.2:8080"), a("127.0.0.3:8080")]);
    assert_eq!(f.requests.borrow().len(), 2, "asked again");
}

#[test]
fn a_hash_key_rides_on_every_request_with_its_flag() {
    let mut f = fake(&["127.0.0.2:8080"]);
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    assert!(
        f.requests
            .borrow()
            .iter()
            .all(|r| r.flags & FLAG_HASH_KEY == 0 && r.hash_key == 0)
    );
    f.requests.borrow_mut().clear();
    f.hash_key = Some(discotech_wire::hash_key(b"tenant-a"));
    f.report_done = true;
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    let reqs = f.requests.borrow();
    assert!(!reqs.is_empty());
    assert!(
        reqs.iter()
            .all(|r| r.flags & FLAG_HASH_KEY != 0
                && r.hash_key == discotech_wire::hash_key(b"tenant-a")),
        "{reqs:?}"
    );
}

#[test]
fn a_prefetch_service_gets_the_daemons_connection_without_a_connect_of_its_own() {
    let s = shared_with(
        Policy::RoundRobin,
        wire_table::SVC_PREFETCH,
        &["127.0.0.2:8080", "127.0.0.3:8080"],
    );
    let p = mapped(s);
    p.pooled.borrow_mut().extend([41, 40]);
    let state = State::new();
    assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    assert!(targets(&p).is_empty(), "no connect of its own");
    assert_eq!(*p.taken.borrow(), [(3, 40, libc::AF_INET)]);
    let req = p.requests.borrow()[0];
    assert_eq!((req.kind, req.port, req.flags), (Kind::Prefetch, 80, 0));

    // Non-blocking: "in progress", and a repeated connect() reaches the same backend.
    let p = Fake {
        nonblocking: true,
        info: tcp(libc::AF_INET6),
        ..mapped(s)
    };
    p.pooled.borrow_mut().push(42);
    assert_eq!(
        on_connect(&&p, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::EINPROGRESS))
    );
    assert_eq!(*p.taken.borrow(), [(3, 42, libc::AF_INET6)]);
    assert_eq!(
        p.requests.borrow()[0].flags,
        FLAG_INET6,
        "the family is asked for"
    );
    p.results
        .borrow_mut()
        .insert(a("127.0.0.3:8080"), vec![Err(libc::EISCONN)]);
    assert_eq!(
        on_connect(&&p, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::EISCONN))
    );
    assert_eq!(targets(&p), [a("127.0.0.3:8080")]);
    assert_eq!(p.requests.borrow().len(), 1, "no second question");
}

#[test]
fn without_a_pooled_connection_a_prefetch_connect_is_an_ordinary_one() {
    let s = shared_with(
        Policy::RoundRobin,
        wire_table::SVC_PREFETCH,
        &["127.0.0.2:8080"],
    );
    // The pool is empty: the table's pick, connected by the hook.
    let p = mapped(s);
    assert_eq!(
        on_connect(&&p, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    assert_eq!(targets(&p), [a("127.0.0.2:8080")]);
    assert_eq!(p.requests.borrow().len(), 1);

    // A socket that cannot take one over (bound, or an option that cannot be copied): the
    // daemon is not even asked.
    let p = Fake {
        cannot_take_over: true,
        ..mapped(s)
    };
    p.pooled.borrow_mut().push(40);
    assert_eq!(
        on_connect(&&p, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    assert_eq!(targets(&p), [a("127.0.0.2:8080")]);
    assert!(p.requests.borrow().is_empty());
    assert!(p.taken.borrow().is_empty());

    // A service without the flag never asks.
    let plain = mapped(shared(Policy::RoundRobin, &["127.0.0.2:8080"]));
    plain.pooled.borrow_mut().push(40);
    assert_eq!(
        on_connect(&&plain, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    assert!(plain.requests.borrow().is_empty());
}

#[test]
fn a_daemon_that_does_not_answer_is_not_asked_again_for_a_second() {
    let s = shared_with(
        Policy::RoundRobin,
        wire_table::SVC_PREFETCH,
        &["127.0.0.2:8080"],
    );
    let p = Fake {
        daemon_up: false,
        ..mapped(s)
    };
    let state = State::new();
    for _ in 0..3 {
        assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    }
    assert_eq!(targets(&p).len(), 3, "every connect made by the hook");
    // The daemon is back: still quiet until the second is over, then asked again.
    let p = Fake {
        clock: RefCell::new(*p.clock.borrow()),
        ..mapped(s)
    };
    p.pooled.borrow_mut().push(40);
    assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    assert!(p.requests.borrow().is_empty(), "quiet");
    *p.clock.borrow_mut() += 1_000_000;
    assert_eq!(on_connect(&&p, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    assert_eq!(*p.taken.borrow(), [(3, 40, libc::AF_INET)]);
}
