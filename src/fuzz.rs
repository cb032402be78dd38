//! The bodies of the fuzz targets: one function per target, each taking arbitrary bytes. The
//! cargo-fuzz crate in `fuzz/` calls them under libFuzzer on nightly, and `tests/fuzz_replay.rs`
//! replays every kept corpus file through them on stable, so both run the same code.
//!
//! Each function drives real code the way the daemon or the hook does (the UDP fast path, the
//! forwarder's reply handling, the hook's table reader and pick, the config, zone and ZooKeeper
//! parsers) against small fixed fixtures, and checks what must hold for any input. Harness code,
//! not product code: a failed check panics, because that is how a fuzzer hears of a bug.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use discotech_wire::live::{self, Entry, Live, Report, Take};
use discotech_wire::pick::{Ask, pick, uncount};
use discotech_wire::table::{self, HEADER_WORDS, Table};
use discotech_wire::{MSG_LEN, Reply, Request as HookRequest, from_mapped, mix};
use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;

use crate::config::Config;
use crate::discovery::snapshot::{Service, Snapshot, shared};
use crate::discovery::source::zone;
use crate::discovery::source::zookeeper::config::ZkFormat;
use crate::discovery::source::zookeeper::formats;
use crate::dns::answer::{Outcome, Zones, answer};
use crate::dns::server::{DnsHandler, DnsState, MAX_UDP_PAYLOAD, Response, encode_udp};
use crate::dns::udp::{MAX_QUERY, cache_key, formerr};
use crate::service::{Backend, PortName, ServiceName, ServiceSpec};
use crate::upstream::cache::{Answer, Cache, Lookup};
use crate::upstream::forward::{ForwardConfig, Forwarder, is_reply_to, restore_case, scrub};

/// A target's body: takes any bytes; panics on a bug.
pub type Body = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and of its corpus directory.
pub const TARGETS: &[(&str, Body)] = &[
    ("dns_request", dns_request),
    ("dns_reply", dns_reply),
    ("hook_messages", hook_messages),
    ("hook_table", hook_table),
    ("hook_live", hook_live),
    ("config", config),
    ("zone", zone),
    ("zk_node", zk_node),
];

/// Where fuzzed queries come from: an allowed (loopback) client.
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40_000);

/// The zones of every DNS target: two service domains, both magic ranges.
fn zones() -> Zones {
    let domain = |s: &str| Name::from_ascii(s).expect("fixture domain");
    Zones::new(
        vec![domain("disco."), domain("svc.internal.")],
        "127.77.0.0/16".parse().expect("fixture v4 range"),
        Some("fd64:d15c::/64".parse().expect("fixture v6 range")),
        60,
        5,
        5,
    )
}

/// A small fixed world: `web` (a v4 and a v6 backend, a named port), `api` (no backends) and
/// `big` (enough SRV records to truncate a UDP answer).
fn services() -> Vec<Service> {
    let name = |s: &str| s.parse::<ServiceName>().expect("fixture service name");
    let addr = |s: &str| s.parse::<SocketAddr>().expect("fixture backend");
    let grpc: PortName = "grpc".parse().expect("fixture port name");
    let mut web = ServiceSpec::new(name("web"));
    web.backends.push(Backend::new(addr("127.0.0.2:8080")));
    let mut v6 = Backend::new(addr("[fd00::3]:8081"));
    v6.weight = 2;
    v6.set_port(grpc.clone(), 9091);
    web.backends.push(v6);
    web.client_ports.insert(9090, grpc);
    let mut big = ServiceSpec::new(name("big"));
    for i in 1..=60u8 {
        big.backends.push(Backend::new(SocketAddr::new(
            Ipv4Addr::new(127, 0, 1, i).into(),
            9000,
        )));
    }
    vec![
        Service {
            spec: web,
            magic_v4: Ipv4Addr::new(127, 77, 1, 2),
            magic_v6: Some("fd64:d15c::1:2".parse().expect("fixture v6")),
        },
        Service {
            spec: ServiceSpec::new(name("api")),
            magic_v4: Ipv4Addr::new(127, 77, 3, 4),
            magic_v6: None,
        },
        Service {
            spec: big,
            magic_v4: Ipv4Addr::new(127, 77, 5, 6),
            magic_v6: None,
        },
    ]
}

/// The DNS handler every query target asks, built once (it keeps no per-query state).
fn dns_handler() -> &'static DnsHandler {
    static HANDLER: OnceLock<DnsHandler> = OnceLock::new();
    HANDLER.get_or_init(|| {
        let zones = zones();
        let forwarder = Arc::new(Forwarder::new(ForwardConfig {
            ours: zones.domains.clone(),
            ..ForwardConfig::default()
        }));
        let state = DnsState {
            zones,
            forwarder,
            allow: vec!["127.0.0.0/8".parse().expect("fixture allow")],
        };
        DnsHandler::new(state, shared(Snapshot::new(1, services())))
    })
}

/// What the UDP worker sends back for one packet on a cache miss.
#[derive(Debug, PartialEq)]
enum Sent {
    Nothing,
    /// Handed to the forwarder (not run here: it needs the network).
    Forwarded,
    Bytes(Vec<u8>),
}

/// `udp.rs`'s miss path: parse, answer locally or forward, encode (or FORMERR when the header
/// parsed but the body did not).
fn serve(packet: &[u8]) -> Sent {
    let Ok(request) = Request::from_bytes(packet.to_vec(), CLIENT, Protocol::Udp) else {
        return formerr(packet).map_or(Sent::Nothing, |reply| {
            assert_eq!(reply.get(..2), packet.get(..2), "FORMERR echoes the ID");
            Sent::Bytes(reply)
        });
    };
    match dns_handler().respond_local(&request) {
        Ok(Some(response)) => {
            let bytes = encode_udp(&request, &response);
            check_encoded(&request, &response, &bytes);
            Sent::Bytes(bytes)
        }
        Ok(None) => Sent::Nothing,
        Err(()) => Sent::Forwarded,
    }
}

/// What any UDP answer must be: within the size the client can take, its ID and a response,
/// decodable, and holding what we answered (a prefix of it when truncated).
fn check_encoded(request: &Request, response: &Response, bytes: &[u8]) {
    let max = response.edns.as_ref().map_or(512, Edns::max_payload);
    assert!(max <= MAX_UDP_PAYLOAD.max(512));
    assert!(
        bytes.len() <= usize::from(max),
        "answer larger than allowed"
    );
    assert_eq!(bytes.get(..2), Some(&request.metadata.id.to_be_bytes()[..]));
    assert!(bytes.get(2).is_some_and(|b| b & 0x80 != 0), "QR set");
    // The question goes back byte for byte, as hickory-server does for TCP; a question whose
    // name is itself a compression pointer then points into our header, not the client's, so
    // such (hand-made) questions decode differently and are not checked further.
    if !plain_names(request.queries.as_bytes()) {
        return;
    }
    let msg = match Message::from_vec(bytes) {
        Ok(msg) => msg,
        Err(e) => panic!("our answer does not decode: {e}"),
    };
    // By number: 16 is both BADVERS and BADSIG, and hickory reads it back as the latter.
    assert_eq!(
        u16::from(msg.metadata.response_code),
        u16::from(response.metadata.response_code)
    );
    let n = msg.answers.len();
    assert!(n <= response.answers.len());
    assert_eq!(msg.answers[..], response.answers[..n], "answers as sent");
    if !msg.metadata.truncation {
        assert_eq!(n, response.answers.len());
        assert_eq!(msg.authorities, response.authorities);
    }
}

/// True when every question name in `raw` (a question section) is spelled out in full, without
/// a compression pointer.
fn plain_names(raw: &[u8]) -> bool {
    let mut at = 0;
    while at < raw.len() {
        loop {
            match raw.get(at) {
                Some(0) => break,
                Some(&len @ 1..=63) => at += 1 + usize::from(len),
                _ => return false,
            }
        }
        at += 1 + 4;
    }
    true
}

/// Target `dns_request`: arbitrary bytes as a query to the UDP server, answered from a fixed
/// snapshot. Covers the fast path's cache key, hickory's request parser, `answer`, the server's
/// planning and the UDP encoder. A query the fast path would cache is asked again with another
/// ID and flipped header bits outside the key: the answer must be the same but for the ID, or
/// the cache would serve one client another's answer.
pub fn dns_request(data: &[u8]) {
    let packet = data.get(..MAX_QUERY).unwrap_or(data);
    let mut key = Vec::new();
    let cacheable = cache_key(packet, &mut key);
    let first = serve(packet);
    if !cacheable {
        return;
    }
    let mut variant = packet.to_vec();
    if let [id0, id1, flags, more, ..] = variant.as_mut_slice() {
        (*id0, *id1) = (!*id0, *id1 ^ 0x5a);
        *flags ^= 0x04; // AA
        *more ^= 0xa0; // RA and AD
    }
    // The DO bit of the OPT record, when there is one: after the question and the key's 5 bytes.
    let question = key.len().saturating_sub(5);
    if packet.get(11) == Some(&1)
        && let Some(ttl) = variant.get_mut(12 + question + 7)
    {
        *ttl ^= 0x80;
    }
    let mut again = Vec::new();
    assert!(cache_key(&variant, &mut again) && again == key, "same key");
    let second = serve(&variant);
    match (&first, &second) {
        (Sent::Bytes(a), Sent::Bytes(b)) => {
            assert_eq!(a.get(2..), b.get(2..), "one key, one answer");
        }
        _ => assert_eq!(first, second, "one key, one outcome"),
    }
}

/// The upstream exchange `dns_reply` plays: our query for `www.example.com.` A, sent with this
/// ID and this random letter case.
const REPLY_ID: u16 = 0x5a5a;
const REPLY_CASED: &str = "wWw.ExAmplE.cOm.";
const MAX_TTL: u32 = 86_400;

struct ReplyFixture {
    query: Query,
    client: Request,
    ours: Vec<Name>,
}

fn reply_fixture() -> &'static ReplyFixture {
    static FIXTURE: OnceLock<ReplyFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let name = Name::from_ascii("www.example.com.").expect("fixture name");
        let query = Query::query(name, RecordType::A);
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.set_edns(edns);
        let bytes = m.to_vec().expect("fixture query encodes");
        let client = Request::from_bytes(bytes, CLIENT, Protocol::Udp).expect("fixture query");
        ReplyFixture {
            query,
            client,
            ours: zones().domains,
        }
    })
}

/// Target `dns_reply`: arbitrary bytes as an upstream's reply to a fixed query. Covers decoding,
/// the reply check (ID, question, 0x20 case), `scrub`, the forwarder's cache and the encoding of
/// the answer for the client. Every decoded reply is scrubbed, matching or not, so the fuzzer
/// need not guess the ID to reach it. Checks what `scrub` promises: nothing at or under a service
/// domain, no TTL above the cap, only addresses in the additional section.
pub fn dns_reply(data: &[u8]) {
    let f = reply_fixture();
    let Ok(msg) = Message::from_vec(data) else {
        return;
    };
    if is_reply_to(&msg, REPLY_ID, &f.query, REPLY_CASED) {
        assert_eq!(msg.metadata.id, REPLY_ID);
        assert_eq!(msg.queries.len(), 1);
    }
    let scrubbed = scrub(msg, &f.query, &f.ours, MAX_TTL);
    check_scrubbed(&scrubbed, &f.ours);
    let cache = Cache::new(8, MAX_TTL, Duration::from_secs(86_400), 30);
    let now = tokio::time::Instant::now();
    cache.insert(&f.query, &scrubbed, now);
    if let Lookup::Fresh(a) | Lookup::Stale(a) = cache.lookup(&f.query, now) {
        check_scrubbed(&a, &f.ours);
    }
    let mut answer = scrubbed;
    restore_case(&mut answer, &f.query.name);
    let mut metadata = Metadata::response_from_request(&f.client.metadata);
    metadata.response_code = answer.response_code;
    metadata.recursion_available = true;
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_PAYLOAD);
    let response = Response {
        answered: "forwarded",
        metadata,
        edns: Some(edns),
        answers: answer.answers,
        authorities: answer.authorities,
        additionals: answer.additionals,
    };
    let bytes = encode_udp(&f.client, &response);
    assert!(bytes.len() <= usize::from(MAX_UDP_PAYLOAD));
    assert_eq!(bytes.get(..2), Some(&0x1234u16.to_be_bytes()[..]));
}

fn check_scrubbed(a: &Answer, ours: &[Name]) {
    let all = || a.answers.iter().chain(&a.authorities).chain(&a.additionals);
    for r in all() {
        assert!(
            !ours.iter().any(|o| o.zone_of(&r.name)),
            "upstream record for a service domain passed: {r}"
        );
        assert!(r.ttl <= MAX_TTL, "TTL above the cap: {r}");
    }
    assert!(
        a.additionals
            .iter()
            .all(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA)),
        "only addresses in the additional section"
    );
}

/// Target `hook_messages`: arbitrary bytes as a stream of 64-byte hook messages (the last one
/// zero-padded), decoded both as requests (the daemon's side) and as replies (the hook's). A
/// message that decodes must encode back to the same bytes (reserved reply bytes aside).
pub fn hook_messages(data: &[u8]) {
    for chunk in data.chunks(MSG_LEN) {
        let mut b = [0u8; MSG_LEN];
        b.iter_mut().zip(chunk).for_each(|(d, s)| *d = *s);
        let _ = discotech_wire::version_of(&b);
        if let Ok(req) = HookRequest::decode(&b) {
            assert_eq!(req.encode(), b, "request round trip");
            let _ = (req.magic_ip(), req.backend_addr());
        }
        if let Ok(reply) = Reply::decode(&b) {
            let again = reply.encode();
            assert_eq!(again.get(..36), b.get(..36), "reply round trip");
            assert_eq!(Reply::decode(&again), Ok(reply));
            let _ = reply.backend_addr();
        }
    }
}

/// The question part of a `hook_table` input, before the table words.
const ASK_BYTES: usize = 40;

/// Target `hook_table`: a routing table read from arbitrary words, and the hook's pick over it.
///
/// Input: 16 bytes destination address (v4 as mapped), 2 port, 1 flags (1 the socket is
/// AF_INET6, 2 advance the counters, 4 repair the header so the fuzzer gets past it, 8 with a
/// live region, 16 exclude the service's first backend), 1 unused, 8 key, 8 random bits,
/// 4 local turn; then the table as little-endian words. The reader must never panic nor stray,
/// and a pick must name a backend of the service asked for, never an excluded one; a dry run
/// must leave the live counters alone.
pub fn hook_table(data: &[u8]) {
    let (Some(head), Some(rest)) = (data.get(..ASK_BYTES), data.get(ASK_BYTES..)) else {
        return;
    };
    let word = |at: usize| u32::from_be_bytes(take(head, at));
    let long = |at: usize| u64::from_be_bytes(take(head, at));
    let dest = SocketAddr::new(
        from_mapped(Ipv6Addr::from(take::<16>(head, 0))),
        u16::from_be_bytes(take(head, 16)),
    );
    let flags = head.get(18).copied().unwrap_or(0);
    let (key, rand, local_turn) = (long(20), long(28), word(36));
    let mut words: Vec<u32> = rest
        .chunks(4)
        .map(|c| u32::from_le_bytes(take(c, 0)))
        .collect();
    if flags & 4 != 0 && !repair_table(&mut words) {
        return;
    }
    let Ok(t) = Table::new(words.as_slice()) else {
        return;
    };
    let _ = (t.pid(), t.superseded(), t.stat(0, 0), t.stat(u32::MAX, 9));
    let epoch = t.read(|a| {
        let _ = (a.generation(), a.services(), a.magic_v4(), a.magic_v6());
        Some(a.live_epoch())
    });
    let live_mem: Vec<std::sync::atomic::AtomicU32> = if flags & 8 != 0 {
        live_region(epoch.unwrap_or(0), rand)
    } else {
        Vec::new()
    };
    let live = Live::new(&live_mem);
    let backend = |index: u32| {
        t.read(|a| {
            let svc = a.service(dest.ip())?;
            svc.backend(index, svc.port_index(dest.port()))
                .map(|b| b.addr)
        })
    };
    let excluded = if flags & 16 != 0 { backend(0) } else { None };
    let exclude = [excluded];
    let ask = Ask {
        dest,
        v6_ok: flags & 1 != 0,
        key,
        rand,
        local_turn,
        exclude: &exclude,
    };
    let advance = flags & 2 != 0;
    let before = counters(&live_mem);
    let picked = pick(&t, live, &ask, advance);
    if !advance {
        assert_eq!(before, counters(&live_mem), "a dry run changes nothing");
    }
    let Ok(p) = picked else { return };
    assert_ne!(excluded, Some(p.addr), "an excluded backend was picked");
    assert_eq!(
        backend(p.backend),
        Some(p.addr),
        "the pick is a backend of the service"
    );
    if p.counted
        && let Some(l) = live
    {
        uncount(&l, p.slot);
    }
}

/// Makes `words` a table header the reader accepts, keeping the capacities where they fit: the
/// fuzzer then spends its time on the areas. False when too short to hold two areas.
fn repair_table(words: &mut Vec<u32>) -> bool {
    let min = HEADER_WORDS + 2 * table::AREA_HEADER;
    if words.len() < min {
        words.resize(min, 0);
    }
    let len = words.len();
    let get = |w: &[u32], i: usize| w.get(i).copied().unwrap_or(0);
    let stat_slots = (get(words, 5) as usize % 64).min((len - min) / table::STAT_WORDS);
    let room = (len - HEADER_WORDS - stat_slots * table::STAT_WORDS) / 2;
    let wanted = get(words, 4) as usize;
    let area = if (table::AREA_HEADER..=room).contains(&wanted) {
        wanted
    } else {
        room
    };
    let header = table::header(area as u32, stat_slots as u32, get(words, 7));
    let active = get(words, 6) & 1;
    for (i, h) in header.iter().enumerate().take(6) {
        if let Some(w) = words.get_mut(i) {
            *w = *h;
        }
    }
    if let Some(w) = words.get_mut(6) {
        *w = active;
    }
    // The active area's sequence word: even and not zero, or the reader treats it as in writing.
    if let Some(seq) = words.get_mut(HEADER_WORDS + active as usize * area) {
        *seq = (*seq | 2) & !1;
    }
    true
}

/// A live region for the table's epoch, its counters filled from `rand` (some of them
/// "negative", as a decrement racing a reset leaves them).
fn live_region(epoch: u64, rand: u64) -> Vec<std::sync::atomic::AtomicU32> {
    let (rr, backends, ring) = (16u32, 64u32, 8u32);
    let words = live::live_words(rr as usize, backends as usize, ring as usize);
    let header = live::header(rr, backends, ring, epoch);
    (0..words)
        .map(|i| {
            let w = header
                .get(i)
                .copied()
                .unwrap_or_else(|| (mix(rand ^ i as u64) as u32) & 0x8000_00ff);
            std::sync::atomic::AtomicU32::new(w)
        })
        .collect()
}

fn counters(mem: &[std::sync::atomic::AtomicU32]) -> Vec<u32> {
    mem.iter()
        .map(|w| w.load(std::sync::atomic::Ordering::Relaxed))
        .collect()
}

/// The `N` bytes at `at`, zero-filled past the end.
fn take<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(at..) {
        out.iter_mut().zip(src).for_each(|(d, s)| *d = *s);
    }
    out
}

/// Target `hook_live`: the live region from arbitrary words, as the daemon's report reader and a
/// hook's reporter use it.
///
/// Input: 1 byte flags (1 build a valid header from the next three bytes: round-robin slots,
/// backend slots, log2 of the ring size), 3 bytes sizes, 16 bytes a report (kind, errno 2,
/// local port 2, remote port 2, latency 4, slot 4, counted 1), 4 bytes the reader's tail; then
/// the region as little-endian words. The reader must never loop, stray or panic; a report
/// appended must be read back as written.
pub fn hook_live(data: &[u8]) {
    let (Some(head), Some(rest)) = (data.get(..24), data.get(24..)) else {
        return;
    };
    let mut words: Vec<u32> = rest
        .chunks(4)
        .map(|c| u32::from_le_bytes(take(c, 0)))
        .collect();
    let byte = |i: usize| head.get(i).copied().unwrap_or(0);
    if byte(0) & 1 != 0 {
        let (rr, backends, ring) = (
            u32::from(byte(1) % 32),
            u32::from(byte(2)),
            1u32 << (byte(3) % 8),
        );
        let need = live::live_words(rr as usize, backends as usize, ring as usize);
        if words.len() < need {
            words.resize(need, 0);
        }
        for (w, h) in words
            .iter_mut()
            .zip(live::header(rr, backends, ring, 7).iter().take(8))
        {
            *w = *h;
        }
    }
    let mem: Vec<std::sync::atomic::AtomicU32> = words
        .into_iter()
        .map(std::sync::atomic::AtomicU32::new)
        .collect();
    let Some(l) = Live::new(&mem) else {
        assert!(byte(0) & 1 == 0, "a region built by `header` reads back");
        return;
    };
    let _ = l.epoch();
    for slot in 0..=8u32 {
        let _ = l.rr(slot);
        assert!(l.in_flight_count(slot) <= live::MAX_IN_FLIGHT);
    }
    let word = |at: usize| u32::from_be_bytes(take(head, at));
    uncount(&l, word(15));
    // The daemon's reader: from the tail, bounded, never lapped twice in a row by a ring that
    // does not move.
    let mut tail = word(20);
    let mut lapped = false;
    for _ in 0..64 {
        match l.take(tail) {
            Take::Entry(_) => (tail, lapped) = (tail.wrapping_add(1), false),
            Take::Lapped(t) => {
                assert!(!lapped, "lapped twice at {tail}");
                (tail, lapped) = (t, true);
            }
            Take::Empty | Take::NotYet => break,
        }
    }
    let report = match byte(4) % 3 {
        0 => Report::Failed {
            errno: u16::from_be_bytes(take(head, 5)),
        },
        1 => Report::Pending {
            local_port: u16::from_be_bytes(take(head, 7)),
        },
        _ => Report::Connected {
            latency_us: word(11),
        },
    };
    let entry = Entry {
        report,
        slot: word(15),
        remote_port: u16::from_be_bytes(take(head, 9)),
        counted: byte(19) & 1 != 0,
    };
    let Some(pos) = l
        .head_word()
        .map(|h| u32::from_le(h.load(std::sync::atomic::Ordering::SeqCst)))
    else {
        return;
    };
    let _ = l.report(&entry);
    assert_eq!(l.take(pos), Take::Entry(Some(entry)), "a report reads back");
}

/// Target `config`: arbitrary text as the daemon's config file. Every problem must point inside
/// the text; a config that validates must yield DNS zones.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let nameservers = [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53))];
    match Config::parse(
        Path::new("/etc/discotech/discotech.toml"),
        text,
        &nameservers,
    ) {
        Ok(c) => {
            let _ = c.dns.zones();
        }
        Err(d) => check_diagnostics(text, &d.0),
    }
}

fn check_diagnostics(text: &str, problems: &[crate::diagnostic::Diagnostic]) {
    assert!(!problems.is_empty(), "an error names a problem");
    let lines = text.matches('\n').count() + 1;
    for p in problems {
        assert!(p.line <= lines, "{p} is past the end");
        assert!(!p.to_string().is_empty());
    }
}

/// Target `zone`: arbitrary text as a zone file of the file source. Every problem must point
/// inside the text; the services of a good file are published and asked for over DNS.
pub fn zone(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let specs = match zone::parse(Path::new("zones/fuzz.toml"), text) {
        Ok(specs) => specs,
        Err(d) => return check_diagnostics(text, &d),
    };
    let zones = zones();
    let published: Vec<Service> = specs
        .into_iter()
        .take(64)
        .zip(1u16..)
        .map(|(spec, i)| {
            let [hi, lo] = i.to_be_bytes();
            Service {
                spec,
                magic_v4: Ipv4Addr::new(127, 77, hi, lo),
                magic_v6: Some(Ipv6Addr::new(0xfd64, 0xd15c, 0, 0, 0, 0, 0, i)),
            }
        })
        .collect();
    let snap = Snapshot::new(1, published.clone());
    assert_eq!(snap.len(), published.len(), "service names are unique");
    for s in published.iter().take(8) {
        let ask = |name: String, t: RecordType| {
            let name = Name::from_ascii(&name).ok()?;
            match answer(&zones, &snap, &Query::query(name, t)) {
                Outcome::Local(a) => Some(a),
                Outcome::Forward => panic!("a service name was forwarded"),
            }
        };
        let svc = s.name().as_str();
        let a = ask(format!("{svc}.disco."), RecordType::A);
        assert!(
            a.is_some_and(|a| a.response_code == ResponseCode::NoError && a.answers.len() == 1)
        );
        for t in [RecordType::AAAA, RecordType::SRV, RecordType::ANY] {
            let _ = ask(format!("{svc}.svc.internal."), t);
        }
        for port in s.spec.port_names() {
            let _ = ask(format!("_{port}._tcp.{svc}.disco."), RecordType::SRV);
        }
        let [_, _, c, d] = s.magic_v4.octets();
        let _ = ask(format!("{d}.{c}.77.127.in-addr.arpa."), RecordType::PTR);
    }
}

/// Target `zk_node`: an instance node from ZooKeeper. Input: 1 byte layout (auto, serverset,
/// curator, nerve, host-port), 1 byte node name length, the node name, then the node's data.
/// An instance that parses must survive being registered in its layout and read back.
pub fn zk_node(data: &[u8]) {
    let format = match data.first().copied().unwrap_or(0) % 5 {
        0 => ZkFormat::Auto,
        1 => ZkFormat::Serverset,
        2 => ZkFormat::Curator,
        3 => ZkFormat::Nerve,
        _ => ZkFormat::HostPort,
    };
    let n = usize::from(data.get(1).copied().unwrap_or(0));
    let rest = data.get(2..).unwrap_or(&[]);
    let (name, node) = rest.split_at(n.min(rest.len()));
    let name = String::from_utf8_lossy(name);
    // The same node name as a service node (the source's index of services).
    let _ = name.parse::<ServiceName>();
    let Ok(Some(b)) = formats::parse(format, &name, node) else {
        return;
    };
    assert_ne!(b.addr.port(), 0, "port 0 is never a backend");
    let svc: ServiceName = "web".parse().expect("fixture service name");
    let (node_name, bytes) = formats::encode(format, &svc, b.addr, b.ports(), "fuzz-id", 0);
    let child = if node_name.sequential {
        format!("{}0000000001", node_name.name)
    } else {
        node_name.name
    };
    let back = match formats::parse(format, &child, &bytes) {
        Ok(Some(back)) => back,
        other => panic!("{format:?} registration of {b:?} reads back as {other:?}"),
    };
    // By address and port: a scope id (`[fe80::1%2]:80` in a host:port name) has no place in
    // the JSON layouts, and an interface index from another host means nothing here anyway.
    assert_eq!(
        (back.addr.ip(), back.addr.port()),
        (b.addr.ip(), b.addr.port()),
        "{format:?} round trip"
    );
    let unsupported = formats::unsupported_ports(format, b.ports());
    for (port, number) in b.ports().iter().filter(|(p, _)| !unsupported.contains(p)) {
        assert_eq!(
            back.ports().get(port),
            Some(number),
            "{format:?} keeps {port}"
        );
    }
}
