//! The connect decision against a fake kernel and a fake daemon.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::cell::RefCell;
use std::collections::HashMap;

use discotech_wire::fallback::Record;

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
    file: Vec<Record>,
    /// The inode behind the fd the tests use.
    ino: RefCell<u64>,
    hash_key: Option<u64>,
    /// The fake monotonic clock (µs); every connect takes `connect_us`.
    clock: RefCell<u64>,
    connect_us: u64,
    clock_reads: RefCell<u32>,
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
}

impl<'a> Os for &'a Fake {
    type Session = FakeSession<'a>;

    fn sock_info(&self, _fd: c_int) -> Option<SockInfo> {
        self.info
    }

    fn inode(&self, _fd: c_int) -> Option<u64> {
        Some(*self.ino.borrow())
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

    fn session(&self) -> Option<FakeSession<'a>> {
        self.daemon_up.then_some(FakeSession(self))
    }

    fn fallback(
        &self,
        dest: SocketAddr,
        v6_ok: bool,
        exclude: &[Option<SocketAddr>],
        turn: u32,
    ) -> Option<SocketAddr> {
        choose(&self.file[..], dest, v6_ok, exclude, turn)
    }

    fn pid(&self) -> u32 {
        42
    }

    fn hash_key(&self) -> Option<u64> {
        self.hash_key
    }

    fn now_us(&self) -> u64 {
        *self.clock_reads.borrow_mut() += 1;
        *self.clock.borrow()
    }

    fn local_port(&self, _fd: c_int) -> Option<u16> {
        Some(40_000)
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

fn record(backend: &str) -> Record {
    let b = a(backend);
    Record {
        magic: to_mapped(a(WEB).ip()),
        client_port: 0,
        backend_port: b.port(),
        backend: to_mapped(b.ip()),
        weight: 1,
        priority: 0,
    }
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
fn daemon_down_routes_from_the_fallback_file_then_from_what_was_learned_else_refuses() {
    let state = State::new();
    // Nothing known: fail fast with ECONNREFUSED and no connect.
    let mut down = fake(&[]);
    down.daemon_up = false;
    assert_eq!(
        on_connect(&&down, &state, 3, a(WEB)),
        Verdict::Return(Err(libc::ECONNREFUSED))
    );
    assert!(down.connects.borrow().is_empty());

    // The fallback file knows the service.
    down.file = vec![record("127.0.0.5:8080"), record("127.0.0.6:8080")];
    assert_eq!(
        on_connect(&&down, &state, 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    assert_eq!(
        on_connect(&&down, &state, 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    let mut got: Vec<SocketAddr> = down.connects.borrow().iter().map(|c| c.0).collect();
    got.sort();
    assert_eq!(
        got,
        [a("127.0.0.5:8080"), a("127.0.0.6:8080")],
        "rotates over the file's backends"
    );

    // Learned while the daemon was up, then the daemon and the file are gone.
    let up = fake(&["127.0.0.2:8080"]);
    assert_eq!(on_connect(&&up, &state, 3, a(WEB)), Verdict::Return(Ok(())));
    let mut gone = fake(&[]);
    gone.daemon_up = false;
    assert_eq!(
        on_connect(&&gone, &state, 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
    assert_eq!(gone.connects.borrow()[0].0, a("127.0.0.2:8080"));

    // Offline, a refused backend is skipped in favour of another known one.
    let mut off = fake(&[]);
    off.daemon_up = false;
    off.file = vec![record("127.0.0.5:8080"), record("127.0.0.6:8080")];
    off.results
        .borrow_mut()
        .insert(a("127.0.0.5:8080"), vec![Err(libc::ECONNREFUSED)]);
    off.results
        .borrow_mut()
        .insert(a("127.0.0.6:8080"), vec![Err(libc::ECONNREFUSED)]);
    let st = State::new();
    assert_eq!(
        on_connect(&&off, &st, 3, a(WEB)),
        Verdict::Return(Err(libc::ECONNREFUSED))
    );
    let mut got: Vec<SocketAddr> = off.connects.borrow().iter().map(|c| c.0).collect();
    got.sort();
    assert_eq!(got, [a("127.0.0.5:8080"), a("127.0.0.6:8080")]);
}

#[test]
fn unknown_services_and_empty_services_are_refused_without_a_connect() {
    for status in [Status::UnknownService, Status::NoBackend] {
        let mut f = fake(&["127.0.0.2:8080"]);
        f.daemon_status = Some(status);
        f.file = vec![record("127.0.0.5:8080")];
        assert_eq!(
            on_connect(&&f, &State::new(), 3, a(WEB)),
            Verdict::Return(Err(libc::ECONNREFUSED))
        );
        assert!(
            f.connects.borrow().is_empty(),
            "the daemon's word beats the file"
        );
    }
    // A daemon that does not speak our version is treated as down.
    let mut f = fake(&[]);
    f.daemon_status = Some(Status::UnsupportedVersion);
    f.file = vec![record("127.0.0.5:8080")];
    assert_eq!(
        on_connect(&&f, &State::new(), 3, a(WEB)),
        Verdict::Return(Ok(()))
    );
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
