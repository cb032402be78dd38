//! Forwarder tests against fake upstreams on loopback (port 0, in-process); nothing here
//! sends a packet off the machine.

use super::*;
use hickory_proto::rr::RData;
use hickory_proto::rr::rdata::{A, SOA};
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

type Handler = dyn Fn(&Message) -> Vec<Message> + Send + Sync;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn q(s: &str) -> Query {
    Query::query(name(s), RecordType::A)
}

fn a(owner: &Name, ttl: u32, last: u8) -> Record {
    Record::from_rdata(
        owner.clone(),
        ttl,
        RData::A(A(Ipv4Addr::new(10, 0, 0, last))),
    )
}

fn reply(req: &Message, code: ResponseCode, ttl: u32, last: u8) -> Message {
    let mut m = Message::response(req.metadata.id, OpCode::Query);
    m.metadata.response_code = code;
    m.add_queries(req.queries.clone());
    if code == ResponseCode::NoError {
        m.add_answer(a(&req.queries[0].name, ttl, last));
    }
    m
}

fn ips(f: &Forwarded) -> Vec<IpAddr> {
    let ip = |r: &Record| match &r.data {
        RData::A(a) => IpAddr::V4(a.0),
        other => panic!("unexpected {other:?}"),
    };
    f.answers.iter().map(ip).collect()
}

fn ip(last: u8) -> Vec<IpAddr> {
    vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))]
}

/// A fake upstream on loopback answering each query with whatever `h` returns.
async fn upstream(h: impl Fn(&Message) -> Vec<Message> + Send + Sync + 'static) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let h: Box<Handler> = Box::new(h);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        for _ in 0..64 {
            let (len, from) = sock.recv_from(&mut buf).await.unwrap();
            for r in h(&Message::from_vec(&buf[..len]).unwrap()) {
                sock.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            }
        }
    });
    addr
}

/// Bound but never reads: queries vanish, like a dead server behind a firewall.
async fn silent() -> (UdpSocket, SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    (sock, addr)
}

fn cfg(ups: Vec<SocketAddr>) -> ForwardConfig {
    ForwardConfig {
        default_upstreams: ups,
        timeout: Duration::from_secs(1),
        attempt_timeout: Duration::from_millis(300),
        stale_recheck: Duration::ZERO,
        ..ForwardConfig::default()
    }
}

#[test]
fn longest_zone_wins_label_wise_and_case_insensitively() {
    let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let fwd = Forwarder::new(ForwardConfig {
        default_upstreams: vec![addr(1)],
        zones: vec![
            (name("example.com."), vec![addr(2)]),
            (name("Corp.Example.COM."), vec![addr(3)]),
        ],
        ..ForwardConfig::default()
    });
    assert_eq!(fwd.upstreams_for(&name("db.corp.example.com.")), [addr(3)]);
    assert_eq!(fwd.upstreams_for(&name("CORP.example.com")), [addr(3)]);
    assert_eq!(fwd.upstreams_for(&name("xcorp.example.com.")), [addr(2)]);
    assert_eq!(fwd.upstreams_for(&name("EXAMPLE.com.")), [addr(2)]);
    assert_eq!(fwd.upstreams_for(&name("example.org.")), [addr(1)]);
    assert_eq!(fwd.upstreams_for(&name("com.")), [addr(1)]);
}

#[tokio::test]
async fn resolves_via_upstream_then_serves_from_cache() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let up = upstream(move |req| {
        let payload = req.edns.as_ref().map(Edns::max_payload);
        log.lock()
            .unwrap()
            .push((req.metadata.recursion_desired, payload));
        let mut r = reply(req, ResponseCode::NoError, 60, 1);
        r.set_edns(Edns::new());
        vec![r]
    })
    .await;
    let fwd = Forwarder::new(cfg(vec![up]));
    let first = fwd.resolve(&q("www.example.")).await.unwrap();
    assert_eq!(
        (first.from, first.response_code),
        (Origin::Upstream, ResponseCode::NoError)
    );
    assert_eq!(ips(&first), ip(1));
    assert!(
        first
            .additionals
            .iter()
            .all(|r| r.record_type() != RecordType::OPT)
    );
    assert_eq!(*seen.lock().unwrap(), vec![(true, Some(EDNS_PAYLOAD))]);

    let second = fwd.resolve(&q("WWW.example.")).await.unwrap();
    assert_eq!(second.from, Origin::Cache);
    assert_eq!(ips(&second), ip(1));
    assert!(second.answers[0].ttl <= 60);
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "cache hit must not query upstream"
    );
}

#[tokio::test]
async fn mismatched_replies_are_ignored_until_the_right_one() {
    let up = upstream(|req| {
        let mut wrong_id = reply(req, ResponseCode::NoError, 60, 66);
        wrong_id.metadata.id = req.metadata.id.wrapping_add(1);
        let mut wrong_q = reply(req, ResponseCode::NoError, 60, 77);
        wrong_q.queries[0].name = name("evil.example.");
        let mut wrong_type = reply(req, ResponseCode::NoError, 60, 88);
        wrong_type.queries[0].query_type = RecordType::AAAA;
        vec![
            wrong_id,
            wrong_q,
            wrong_type,
            reply(req, ResponseCode::NoError, 60, 1),
        ]
    })
    .await;
    let fwd = Forwarder::new(cfg(vec![up]));
    let got = fwd.resolve(&q("www.example.")).await.unwrap();
    assert_eq!(ips(&got), ip(1));
}

#[tokio::test]
async fn reply_from_another_address_is_ignored() {
    // The spoofer answers first, with the right ID and question, from another port.
    let spoofer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (real, real_addr) = silent().await;
    let fwd = Arc::new(Forwarder::new(cfg(vec![real_addr])));
    let task = tokio::spawn({
        let fwd = fwd.clone();
        async move { fwd.resolve(&q("www.example.")).await }
    });
    let mut buf = vec![0u8; 4096];
    let (len, client) = real.recv_from(&mut buf).await.unwrap();
    let req = Message::from_vec(&buf[..len]).unwrap();
    let forged = reply(&req, ResponseCode::NoError, 60, 66).to_vec().unwrap();
    spoofer.send_to(&forged, client).unwrap();
    let genuine = reply(&req, ResponseCode::NoError, 60, 1).to_vec().unwrap();
    real.send_to(&genuine, client).await.unwrap();
    assert_eq!(ips(&task.await.unwrap().unwrap()), ip(1));
}

#[tokio::test]
async fn truncated_udp_answer_is_retried_over_tcp() {
    // UDP and TCP on the same port, as a real server would be.
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let (len, from) = udp.recv_from(&mut buf).await.unwrap();
        let mut tc = reply(
            &Message::from_vec(&buf[..len]).unwrap(),
            ResponseCode::NoError,
            60,
            9,
        );
        tc.metadata.truncation = true;
        udp.send_to(&tc.to_vec().unwrap(), from).await.unwrap();
    });
    tokio::spawn(async move {
        let (mut s, _) = tcp.accept().await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut req = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut req).await.unwrap();
        let r = reply(
            &Message::from_vec(&req).unwrap(),
            ResponseCode::NoError,
            60,
            2,
        );
        let wire = r.to_vec().unwrap();
        s.write_all(&u16::try_from(wire.len()).unwrap().to_be_bytes())
            .await
            .unwrap();
        s.write_all(&wire).await.unwrap();
    });
    let got = Forwarder::new(cfg(vec![addr]))
        .resolve(&q("big.example."))
        .await
        .unwrap();
    assert_eq!(ips(&got), ip(2), "the answer must come from the TCP leg");
}

#[tokio::test]
async fn dead_or_failing_upstreams_fall_through_to_the_next() {
    let (_dead, dead) = silent().await;
    let servfail = upstream(|req| vec![reply(req, ResponseCode::ServFail, 0, 0)]).await;
    let good = upstream(|req| vec![reply(req, ResponseCode::NoError, 60, 3)]).await;
    let fwd = Forwarder::new(cfg(vec![dead, servfail, good]));
    let started = Instant::now();
    let got = fwd.resolve(&q("www.example.")).await.unwrap();
    assert_eq!((got.from, ips(&got)), (Origin::Upstream, ip(3)));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited out the dead one"
    );
}

#[tokio::test]
async fn nxdomain_is_an_answer_and_is_cached() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let up = upstream(move |req| {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut r = reply(req, ResponseCode::NXDomain, 0, 0);
        let soa = SOA::new(name("ns.example."), name("h.example."), 1, 60, 60, 600, 300);
        r.add_authority(Record::from_rdata(name("example."), 3600, RData::SOA(soa)));
        vec![r]
    })
    .await;
    let fwd = Forwarder::new(cfg(vec![up]));
    let first = fwd.resolve(&q("nope.example.")).await.unwrap();
    let second = fwd.resolve(&q("nope.example.")).await.unwrap();
    assert_eq!(first.response_code, ResponseCode::NXDomain);
    assert_eq!(
        (second.from, second.response_code),
        (Origin::Cache, ResponseCode::NXDomain)
    );
    assert!(
        second.authorities[0].ttl <= 300,
        "negative TTL bounded by SOA minimum"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn all_upstreams_dead_is_an_error_within_the_timeout() {
    let (_s1, dead1) = silent().await;
    let (_s2, dead2) = silent().await;
    let fwd = Forwarder::new(ForwardConfig {
        timeout: Duration::from_millis(500),
        ..cfg(vec![dead1, dead2])
    });
    let started = Instant::now();
    let err = fwd.resolve(&q("www.example.")).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ForwardError::Timeout), "{err:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(700),
        "{took:?}"
    );
    assert!(matches!(
        Forwarder::new(cfg(vec![])).resolve(&q("x.")).await,
        Err(ForwardError::NoUpstreams)
    ));
}

/// An upstream that answers with a 1 s TTL until its flag is set, then not at all.
async fn silenceable_upstream() -> (SocketAddr, Arc<AtomicBool>) {
    let silent_now = Arc::new(AtomicBool::new(false));
    let flag = silent_now.clone();
    let up = upstream(move |req| {
        if flag.load(Ordering::SeqCst) {
            vec![]
        } else {
            vec![reply(req, ResponseCode::NoError, 1, 4)]
        }
    })
    .await;
    (up, silent_now)
}

#[tokio::test]
async fn serves_stale_when_upstream_goes_silent_and_refreshes_after() {
    let (up, silent_now) = silenceable_upstream().await;
    let fwd = Forwarder::new(cfg(vec![up]));
    assert_eq!(
        fwd.resolve(&q("www.example.")).await.unwrap().from,
        Origin::Upstream
    );
    silent_now.store(true, Ordering::SeqCst);
    // Real sockets rule out a paused clock, so let the 1 s TTL run out for real.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = fwd.resolve(&q("www.example.")).await.unwrap();
    assert_eq!((stale.from, ips(&stale)), (Origin::Stale, ip(4)));
    assert_eq!(stale.answers[0].ttl, 30);

    silent_now.store(false, Ordering::SeqCst);
    let fresh = fwd.resolve(&q("www.example.")).await.unwrap();
    assert_eq!(
        fresh.from,
        Origin::Upstream,
        "with no recheck timer, an expired entry goes upstream first"
    );
}

#[tokio::test]
async fn after_a_failure_stale_answers_come_at_once_until_the_recheck_timer_lapses() {
    let (up, silent_now) = silenceable_upstream().await;
    let recheck = Duration::from_millis(1500);
    let fwd = Forwarder::new(ForwardConfig {
        stale_recheck: recheck,
        ..cfg(vec![up])
    });
    fwd.resolve(&q("www.example.")).await.unwrap();
    silent_now.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let started = Instant::now();
    let first = fwd.resolve(&q("www.example.")).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(first.from, Origin::Stale);
    assert!(
        waited >= Duration::from_millis(300),
        "the first waits out the attempt: {waited:?}"
    );

    let started = Instant::now();
    for _ in 0..5 {
        let again = fwd.resolve(&q("WWW.example.")).await.unwrap();
        assert_eq!((again.from, ips(&again)), (Origin::Stale, ip(4)));
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "within the recheck timer no lookup waits on the upstream: {:?}",
        started.elapsed()
    );

    // The upstream is back, but nobody asks it before the timer lapses.
    silent_now.store(false, Ordering::SeqCst);
    assert_eq!(
        fwd.resolve(&q("www.example.")).await.unwrap().from,
        Origin::Stale
    );
    tokio::time::sleep(recheck).await;
    assert_eq!(
        fwd.resolve(&q("www.example.")).await.unwrap().from,
        Origin::Upstream,
        "the timer lapsed: one lookup goes upstream"
    );
}

/// Starts a resolve against a server that never answers; returns the ID and the question
/// name (as spelled on the wire) of the query the server received.
async fn stuck_resolve(fwd: &Arc<Forwarder>, sink: &UdpSocket, question: &str) -> (u16, Name) {
    let fwd = fwd.clone();
    let question = q(question);
    tokio::spawn(async move { fwd.resolve(&question).await });
    let mut buf = vec![0u8; 4096];
    let (len, _) = timeout_at(
        after(Instant::now(), Duration::from_secs(1)),
        sink.recv_from(&mut buf),
    )
    .await
    .unwrap()
    .unwrap();
    let msg = Message::from_vec(&buf[..len]).unwrap();
    (msg.metadata.id, msg.queries[0].name.clone())
}

#[tokio::test]
async fn is_loop_only_for_our_own_question_coming_back() {
    let (sink, addr) = silent().await;
    let fwd = Arc::new(Forwarder::new(cfg(vec![addr])));
    let question = q("loop.example.");
    assert!(!fwd.is_loop(0, &question), "nothing in flight yet");

    let (id, sent) = stuck_resolve(&fwd, &sink, "loop.example.").await;
    let spelled = sent.to_ascii();
    assert!(
        spelled.chars().any(|c| c.is_ascii_uppercase()),
        "0x20: {spelled}"
    );
    assert!(spelled.eq_ignore_ascii_case("loop.example."));
    let echoed = Query::query(sent.clone(), RecordType::A);
    assert!(
        fwd.is_loop(id.wrapping_add(1), &echoed),
        "our exact spelling came back under a new ID"
    );
    assert!(fwd.is_loop(id, &question), "our own ID came back");
    assert!(
        !fwd.is_loop(id.wrapping_add(1), &question),
        "a client asking the same question concurrently"
    );
    assert!(
        !fwd.is_loop(id.wrapping_add(1), &q("LOOP.EXAMPLE.")),
        "a client shouting"
    );
    assert!(!fwd.is_loop(id, &q("other.example.")));
    let aaaa = Query::query(sent, RecordType::AAAA);
    assert!(!fwd.is_loop(id, &aaaa));

    // Once the attempt times out, the question is no longer ours.
    let cleared = async {
        for _ in 0..100 {
            if !fwd.is_loop(id, &question) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(cleared.await);
    assert!(fwd.in_flight.is_empty());
}

#[test]
fn random_case_always_differs_from_lowercase() {
    for bits in [0, 1, u64::MAX, 0x5555] {
        let c = random_case("www.example.com.", bits);
        assert!(c.eq_ignore_ascii_case("www.example.com."));
        assert_ne!(c, "www.example.com.", "bits {bits:x}");
    }
    assert_eq!(random_case("1.2.3.", 7), "1.2.3.");
}

#[tokio::test]
async fn excess_concurrent_queries_are_busy() {
    let (sink, addr) = silent().await;
    let fwd = Arc::new(Forwarder::new(ForwardConfig {
        max_in_flight: 1,
        ..cfg(vec![addr])
    }));
    stuck_resolve(&fwd, &sink, "one.example.").await;
    assert!(matches!(
        fwd.resolve(&q("two.example.")).await,
        Err(ForwardError::Busy)
    ));
}

#[tokio::test]
async fn upstream_records_outside_the_question_or_under_our_domains_are_dropped() {
    let up = upstream(|req| {
        let qname = req.queries[0].name.clone();
        let mut r = reply(req, ResponseCode::NoError, 4_294_967_295, 1);
        // Out of bailiwick in every section, and a try at a service name.
        r.add_answer(a(&name("bank.example."), 60, 66));
        r.add_answer(a(&name("web.disco."), 60, 6));
        let soa = SOA::new(
            name("ns.example."),
            name("admin.example."),
            1,
            60,
            60,
            60,
            60,
        );
        r.add_authority(Record::from_rdata(
            name("example."),
            60,
            RData::SOA(soa.clone()),
        ));
        r.add_authority(Record::from_rdata(name("other."), 60, RData::SOA(soa)));
        r.add_additional(a(&name("web.disco."), 60, 6));
        r.add_additional(a(&name("ns.example."), 60, 7));
        assert!(qname.to_ascii().chars().any(|c| c.is_ascii_uppercase()));
        vec![r]
    })
    .await;
    let fwd = Forwarder::new(ForwardConfig {
        ours: vec![name("disco.")],
        max_ttl: 3600,
        ..cfg(vec![up])
    });
    let got = fwd.resolve(&q("www.example.")).await.unwrap();
    assert_eq!(ips(&got), ip(1), "only the question's own record: {got:?}");
    assert_eq!(got.answers[0].ttl, 3600, "TTLs are clamped to max_ttl");
    assert_eq!(got.authorities.len(), 1, "{got:?}");
    assert_eq!(got.authorities[0].name, name("example."));
    assert!(got.additionals.is_empty(), "no target named them: {got:?}");
}

#[tokio::test]
async fn a_cname_chain_survives_the_scrub_in_any_order() {
    let up = upstream(|req| {
        let qname = req.queries[0].name.clone();
        let mut r = Message::response(req.metadata.id, OpCode::Query);
        r.add_queries(req.queries.clone());
        // Target first, then the CNAME that leads to it.
        r.add_answer(a(&name("edge.cdn.example."), 60, 9));
        r.add_answer(Record::from_rdata(
            qname,
            60,
            RData::CNAME(hickory_proto::rr::rdata::CNAME(name("edge.cdn.example."))),
        ));
        vec![r]
    })
    .await;
    let fwd = Forwarder::new(cfg(vec![up]));
    let got = fwd.resolve(&q("www.example.")).await.unwrap();
    assert_eq!(got.answers.len(), 2, "{got:?}");
}

#[tokio::test]
async fn a_reply_that_loses_the_random_letter_case_is_not_believed() {
    let up = upstream(|req| {
        let mut r = reply(req, ResponseCode::NoError, 60, 1);
        // A spoofer who guessed the ID but not the spelling.
        let lower = Name::from_ascii(req.queries[0].name.to_ascii().to_ascii_lowercase()).unwrap();
        let mut question = Query::query(lower, RecordType::A);
        question.set_query_class(req.queries[0].query_class);
        r.queries = vec![question];
        vec![r]
    })
    .await;
    let fwd = Forwarder::new(cfg(vec![up]));
    let got = fwd.resolve(&q("www.example.")).await;
    assert!(got.is_err(), "{got:?}");
}
