//! DNS over UDP: one thread per socket that answers most queries without touching the async
//! runtime. Local answers (the service domains) depend only on the snapshot, so each thread keeps
//! their encoded bytes, keyed by the exact question and the client's EDNS shape, and a repeat
//! question costs one receive, one hash lookup, a copy, two patched ID bytes and one send. A cache
//! miss computes the answer on the spot with the same code as TCP; only questions that must be
//! forwarded go to a runtime task. The cache is dropped whenever the snapshot changes.
//!
//! Forwarded answers are kept the same way for at most [`FORWARDED_FRESH`] (and never past their
//! smallest TTL): the task that forwarded sends the encoded answer back to its worker, which
//! serves repeats from it, so the TTLs a client sees are at most that much behind the forwarder's
//! cache. Only NOERROR and NXDOMAIN answers are kept; failures always take the full path.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;

use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use prometheus_client::metrics::counter::Counter;

use super::server::{DnsHandler, MAX_UDP_PAYLOAD, Response, encode_udp, record};
use crate::metrics::{CacheLabels, METRICS};

/// One in this many answers from the cache has its latency measured: the clock costs more than
/// the answer.
const SAMPLE_EVERY: u32 = 64;

/// How often a worker blocked in `recv` looks at the shutdown token.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);
/// Bound on cached answers per worker: names are chosen by clients, memory is ours.
const MAX_CACHED: usize = 65_536;
/// Largest query we accept over UDP (RFC 6891 allows up to 65535, real queries are tiny).
pub(crate) const MAX_QUERY: usize = 4096;
/// How long a worker serves a forwarded answer's bytes before asking the forwarder again.
pub const FORWARDED_FRESH: Duration = Duration::from_secs(1);

/// Starts one worker thread per socket; they stop when `shutdown` is cancelled.
///
/// # Errors
/// A socket cannot be configured or a thread cannot be started.
pub fn spawn(
    sockets: Vec<UdpSocket>,
    handler: Arc<DnsHandler>,
    runtime: Handle,
    shutdown: CancellationToken,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    for socket in sockets {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(SHUTDOWN_POLL))?;
        let (learned_tx, learned) = channel();
        let worker = Worker {
            socket: Arc::new(socket),
            handler: handler.clone(),
            runtime: runtime.clone(),
            cache: HashMap::new(),
            epoch: u64::MAX,
            hits: 0,
            learned,
            learned_tx,
        };
        let stop = shutdown.clone();
        threads.push(
            std::thread::Builder::new()
                .name("dns-udp".into())
                .spawn(move || worker.run(&stop))?,
        );
    }
    Ok(threads)
}

/// An encoded answer, ID aside.
struct Cached {
    bytes: Vec<u8>,
    /// The query counter it counts into.
    counter: Counter,
    /// For a forwarded answer: until when it may be served, and the forwarder's cache-hit counter.
    forwarded: Option<(Instant, Counter)>,
}

/// A forwarded answer a runtime task sends back to its worker: the cache key and the entry.
type Learned = (Vec<u8>, Cached);

struct Worker {
    socket: Arc<UdpSocket>,
    handler: Arc<DnsHandler>,
    runtime: Handle,
    cache: HashMap<Vec<u8>, Cached>,
    epoch: u64,
    hits: u32,
    /// Forwarded answers coming back from runtime tasks.
    learned: Receiver<Learned>,
    learned_tx: Sender<Learned>,
}

impl Worker {
    fn run(mut self, shutdown: &CancellationToken) {
        let mut buf = vec![0u8; MAX_QUERY];
        let mut key = Vec::with_capacity(300);
        let mut out = Vec::with_capacity(MAX_UDP_PAYLOAD as usize);
        while !shutdown.is_cancelled() {
            let (len, src) = match self.socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // ICMP errors from earlier sends surface here; nothing to do but go on.
                    debug!(error = %e, "udp receive");
                    continue;
                }
            };
            let Some(packet) = buf.get(..len) else {
                continue;
            };
            if cache_key(packet, &mut key) && self.handler.allowed(src.ip()) {
                let epoch = self.handler.epoch();
                if epoch != self.epoch {
                    self.cache.clear();
                    self.epoch = epoch;
                }
                self.take_learned();
                if let Some(cached) = fresh(&mut self.cache, &key) {
                    self.hits = self.hits.wrapping_add(1);
                    let sampled = self.hits.is_multiple_of(SAMPLE_EVERY).then(Instant::now);
                    out.clear();
                    out.extend_from_slice(&cached.bytes);
                    if let (Some(dst), Some(id)) = (out.get_mut(..2), packet.get(..2)) {
                        dst.copy_from_slice(id);
                    }
                    cached.counter.inc();
                    if let Some((_, hit)) = &cached.forwarded {
                        hit.inc();
                    }
                    self.send(&out, src);
                    if let Some(t) = sampled {
                        METRICS.dns_duration.observe(t.elapsed().as_secs_f64());
                    }
                    continue;
                }
                self.miss(packet, src, Some(&key));
            } else {
                self.miss(packet, src, None);
            }
        }
    }

    /// Files the forwarded answers runtime tasks have sent back since the last look.
    fn take_learned(&mut self) {
        while let Ok((key, cached)) = self.learned.try_recv() {
            self.insert(key, cached);
        }
    }

    fn insert(&mut self, key: Vec<u8>, cached: Cached) {
        if self.cache.len() >= MAX_CACHED {
            make_room(&mut self.cache, Instant::now());
        }
        self.cache.insert(key, cached);
    }

    /// Computes the answer; caches it when it is local and `key` is given; forwards on a task.
    fn miss(&mut self, packet: &[u8], src: SocketAddr, key: Option<&Vec<u8>>) {
        let started = std::time::Instant::now();
        let request = match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(_) => {
                if let Some(reply) = formerr(packet) {
                    self.send(&reply, src);
                }
                return;
            }
        };
        match self.handler.respond_local(&request) {
            Ok(Some(response)) => {
                let bytes = encode_udp(&request, &response);
                self.send(&bytes, src);
                record(&request, &response, started);
                if let Some(key) = key {
                    let cached = Cached {
                        bytes,
                        counter: counter_for(&request, &response),
                        forwarded: None,
                    };
                    self.insert(key.clone(), cached);
                }
            }
            Ok(None) => {}
            Err(()) => {
                let (handler, socket) = (self.handler.clone(), self.socket.clone());
                let back = key.map(|k| (k.clone(), self.learned_tx.clone()));
                self.runtime.spawn(async move {
                    if let Some(response) = handler.respond(&request).await {
                        record(&request, &response, started);
                        let bytes = encode_udp(&request, &response);
                        // A UDP send does not block for long; a full buffer drops the answer, as on the wire.
                        if let Err(e) = socket.send_to(&bytes, request.src()) {
                            debug!(error = %e, dst = %request.src(), "udp send");
                        }
                        if let (Some((key, tx)), Some(keep)) = (back, keep_for(&response)) {
                            let hit = METRICS
                                .forward_cache
                                .get_or_create(&CacheLabels { result: "hit" })
                                .clone();
                            let cached = Cached {
                                bytes,
                                counter: counter_for(&request, &response),
                                forwarded: Some((Instant::now() + keep, hit)),
                            };
                            // The worker may be gone (shutting down): nothing to keep then.
                            let _ = tx.send((key, cached));
                        }
                    }
                });
            }
        }
    }

    fn send(&self, bytes: &[u8], dst: SocketAddr) {
        if let Err(e) = self.socket.send_to(bytes, dst)
            && e.kind() != ErrorKind::WouldBlock
        {
            warn!(error = %e, %dst, "udp send");
        }
    }
}

/// The cached answer for `key`, if it may still be served (a forwarded one for a while only).
fn fresh<'c>(cache: &'c mut HashMap<Vec<u8>, Cached>, key: &[u8]) -> Option<&'c Cached> {
    let stale = cache
        .get(key)?
        .forwarded
        .as_ref()
        .is_some_and(|(until, _)| Instant::now() >= *until);
    if stale {
        cache.remove(key);
        return None;
    }
    cache.get(key)
}

/// Frees room in a full answer map without stalling the worker on a refill: forwarded answers
/// past their time go first (a name asked once leaves one behind, and these are what fill the
/// map), and only when that frees less than a quarter does everything go. Clearing whole each
/// time would make the worker answer every local and warm name from scratch at once, long enough
/// for its socket's queue to overflow at high rates; the quarter keeps the sweep amortised.
fn make_room(cache: &mut HashMap<Vec<u8>, Cached>, now: Instant) {
    cache.retain(|_, c| c.forwarded.as_ref().is_none_or(|(until, _)| now < *until));
    if cache.len() > MAX_CACHED - MAX_CACHED / 4 {
        cache.clear();
    }
}

/// The query counter a response counts into (by type, rcode and where the answer came from).
fn counter_for(request: &Request, response: &Response) -> Counter {
    let qtype = request
        .queries
        .queries()
        .first()
        .map_or(hickory_proto::rr::RecordType::NULL, |q| q.query_type());
    METRICS.dns_counter(qtype, response.metadata.response_code, response.answered)
}

/// How long a forwarded answer's bytes may be served again: [`FORWARDED_FRESH`], never past its
/// smallest TTL; `None` for answers that are not kept (failures, or a TTL of 0).
fn keep_for(response: &Response) -> Option<Duration> {
    if !matches!(
        response.metadata.response_code,
        ResponseCode::NoError | ResponseCode::NXDomain
    ) {
        return None;
    }
    let min_ttl = response
        .answers
        .iter()
        .chain(&response.authorities)
        .chain(&response.additionals)
        .map(|r| r.ttl)
        .min()
        .unwrap_or(u32::MAX);
    let keep = FORWARDED_FRESH.min(Duration::from_secs(u64::from(min_ttl)));
    (!keep.is_zero()).then_some(keep)
}

/// For a plain query (one question, no answer or authority records, at most an EDNS version 0
/// OPT): writes into `key` the question exactly as sent plus the response-shaping bits of the
/// request (RD, CD, EDNS presence and payload), and returns true. Anything else returns false
/// and takes the full path.
pub fn cache_key(p: &[u8], key: &mut Vec<u8>) -> bool {
    key.clear();
    let Some(h) = p.get(..12) else { return false };
    let count = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    // QR=0, opcode QUERY, one question, no answers or authorities, at most one additional.
    if h[2] & 0xf8 != 0 || count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return false;
    }
    let mut i = 12;
    loop {
        let Some(&len) = p.get(i) else { return false };
        if len == 0 {
            break;
        }
        // Compression pointers (0xc0) and unknown label types have no place in a question.
        if len > 63 || i - 12 > 255 {
            return false;
        }
        i += 1 + usize::from(len);
    }
    i += 1 + 4;
    let Some(question) = p.get(12..i) else {
        return false;
    };
    key.extend_from_slice(question);
    key.push(h[2] & 0x01);
    key.push(h[3] & 0x10);
    if count(10) == 0 {
        key.extend_from_slice(&[0, 0, 0]);
        return i == p.len();
    }
    // OPT: root name, type 41, class = payload, TTL = ext-rcode, version, flags; then options.
    let Some(opt) = p.get(i..i + 11) else {
        return false;
    };
    if opt[0] != 0 || opt[1..3] != [0, 41] || opt[6] != 0 {
        return false;
    }
    let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
    if i + 11 + rdlen != p.len() {
        return false;
    }
    let payload = u16::from_be_bytes([opt[3], opt[4]]).clamp(512, MAX_UDP_PAYLOAD);
    key.push(1);
    key.extend_from_slice(&payload.to_be_bytes());
    true
}

/// FORMERR for a packet whose header parsed but whose body did not; `None` for a packet too short
/// to answer (or itself a response: never answer those).
pub(crate) fn formerr(p: &[u8]) -> Option<Vec<u8>> {
    let h = p.get(..12)?;
    if h[2] & 0x80 != 0 {
        return None;
    }
    let mut reply = vec![0u8; 12];
    reply[..2].copy_from_slice(&h[..2]);
    reply[2] = 0x80 | (h[2] & 0x79);
    reply[3] = 0x01;
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn keys_hold_the_exact_question_and_the_response_shaping_bits() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(cache_key(&query("web.disco.", None), &mut a));
        assert!(cache_key(&query("WEB.disco.", None), &mut b));
        assert_ne!(a, b, "case is part of the key, so answers echo it exactly");
        assert!(cache_key(&query("web.disco.", Some(4096)), &mut b));
        assert_ne!(a, b);
        let mut c = Vec::new();
        assert!(cache_key(&query("web.disco.", Some(9000)), &mut c));
        assert_eq!(b, c, "payloads above our limit shape the answer alike");
        let mut d = query("web.disco.", None);
        d[0] = 0x99;
        assert!(cache_key(&d, &mut c));
        assert_eq!(a, c, "the ID is not part of the key");
    }

    #[test]
    fn odd_packets_take_the_full_path() {
        let mut k = Vec::new();
        let q = query("web.disco.", None);
        assert!(!cache_key(&q[..q.len() - 1], &mut k), "truncated");
        let mut trailing = q.clone();
        trailing.push(0);
        assert!(!cache_key(&trailing, &mut k), "trailing bytes");
        let mut response = q.clone();
        response[2] |= 0x80;
        assert!(!cache_key(&response, &mut k), "a response");
        let mut two = q.clone();
        two[5] = 2;
        assert!(!cache_key(&two, &mut k), "two questions");
        let mut v1 = query("web.disco.", Some(1232));
        let opt = v1.len() - 11;
        v1[opt + 6] = 1;
        assert!(
            !cache_key(&v1, &mut k),
            "EDNS version 1 gets BADVERS from the full path"
        );
        assert!(!cache_key(&[0u8; 5], &mut k));
    }

    fn forwarded(rcode: hickory_proto::op::ResponseCode, ttls: &[u32]) -> Response {
        use hickory_proto::rr::{RData, Record, rdata::A};
        let mut metadata =
            hickory_proto::op::Metadata::new(1, MessageType::Response, OpCode::Query);
        metadata.response_code = rcode;
        let name = Name::from_ascii("www.example.test.").unwrap();
        Response {
            answered: "forwarded",
            metadata,
            edns: None,
            answers: ttls
                .iter()
                .map(|&t| Record::from_rdata(name.clone(), t, RData::A(A::new(192, 0, 2, 80))))
                .collect(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }

    #[test]
    fn forwarded_answers_are_kept_a_second_at_most_and_never_past_their_ttl() {
        use hickory_proto::op::ResponseCode;
        let second = Duration::from_secs(1);
        assert_eq!(
            keep_for(&forwarded(ResponseCode::NoError, &[300, 60])),
            Some(second)
        );
        assert_eq!(
            keep_for(&forwarded(ResponseCode::NXDomain, &[])),
            Some(second)
        );
        assert_eq!(
            keep_for(&forwarded(ResponseCode::NoError, &[60, 0])),
            None,
            "TTL 0"
        );
        assert_eq!(keep_for(&forwarded(ResponseCode::ServFail, &[60])), None);
        assert_eq!(keep_for(&forwarded(ResponseCode::Refused, &[])), None);
    }

    #[test]
    fn a_full_map_sheds_lapsed_forwarded_answers_and_keeps_the_rest() {
        let now = Instant::now();
        let entry = |forwarded: Option<Instant>| Cached {
            bytes: vec![0; 12],
            counter: Counter::default(),
            forwarded: forwarded.map(|until| (until, Counter::default())),
        };
        let key = |i: usize| format!("{i}").into_bytes();
        let mut cache = HashMap::new();
        let lapsed = MAX_CACHED / 2;
        for i in 0..MAX_CACHED {
            let until = match i {
                i if i < lapsed => Some(now - Duration::from_millis(1)),
                i if i % 2 == 0 => Some(now + FORWARDED_FRESH),
                _ => None,
            };
            cache.insert(key(i), entry(until));
        }
        make_room(&mut cache, now);
        assert_eq!(cache.len(), MAX_CACHED - lapsed, "only lapsed answers go");
        assert!(
            cache.contains_key(&key(MAX_CACHED - 1)),
            "a local answer stays"
        );
        assert!(
            cache.contains_key(&key(MAX_CACHED - 2)),
            "a fresh forwarded one stays"
        );

        // Nothing lapsed: the sweep would free too little to pay for itself, so all goes.
        let mut cache: HashMap<_, _> = (0..MAX_CACHED).map(|i| (key(i), entry(None))).collect();
        make_room(&mut cache, now);
        assert!(cache.is_empty());
    }

    #[test]
    fn formerr_echoes_the_id_and_never_answers_responses() {
        let r = formerr(&[0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff]).unwrap();
        assert_eq!(&r[..4], &[0xab, 0xcd, 0x81, 0x01]);
        assert!(formerr(&[0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(formerr(&[0, 0]).is_none());
    }
}
