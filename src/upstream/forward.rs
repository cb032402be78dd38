//! Upstream forwarder: answers one question from the cache or by asking the configured
//! upstreams (split DNS by zone), with serve-stale when they all fail.
//!
//! It speaks to upstreams only; building the reply to the client (header, EDNS, SERVFAIL on
//! error, REFUSED on a detected loop) is the DNS server's job.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::metrics::{CacheLabels, METRICS};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use hickory_proto::ProtoError;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::DecodeError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::cache::{Answer, Cache, Lookup, normal_name};

/// RFC 9715 / DNS flag day 2020: avoids IP fragmentation on common paths.
const EDNS_PAYLOAD: u16 = 1232;
/// Larger than what we advertise, so an upstream ignoring EDNS still decodes.
const UDP_RECV_BUF: usize = 4096;

#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub default_upstreams: Vec<SocketAddr>,
    /// Split DNS: (zone, upstreams); the longest matching zone wins (case-insensitive,
    /// label-wise suffix match).
    pub zones: Vec<(Name, Vec<SocketAddr>)>,
    /// Overall deadline for one resolve.
    pub timeout: Duration,
    /// Per upstream attempt (a TC fallback to TCP gets its own).
    pub attempt_timeout: Duration,
    /// Concurrent resolves allowed to query upstream; excess get `Busy`.
    pub max_in_flight: usize,
    /// Maximum cache entries.
    pub cache_size: usize,
    /// RFC 8767: how long past expiry an entry may still be served when upstreams fail.
    pub stale_max: Duration,
    /// TTL given to stale answers.
    pub stale_ttl: u32,
    /// RFC 8767's failure recheck timer: once the upstreams stayed silent for a question and it
    /// was answered stale, it is answered stale at once for this long, without waiting on them
    /// again; then one lookup tries them while the others go on getting the stale answer.
    /// Upstreams that refuse at once are tried on every lookup (that costs nothing).
    pub stale_recheck: Duration,
    /// Cap on every TTL passed on (and cached).
    pub max_ttl: u32,
    /// Names only this server answers (the service domains): nothing at or under them is ever
    /// taken from an upstream reply.
    pub ours: Vec<Name>,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            default_upstreams: Vec::new(),
            zones: Vec::new(),
            timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_millis(700),
            max_in_flight: 1024,
            cache_size: 10_000,
            stale_max: Duration::from_secs(86_400),
            stale_ttl: 30,
            stale_recheck: Duration::from_secs(30),
            max_ttl: 86_400,
            ours: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Upstream,
    Cache,
    Stale,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub response_code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    pub from: Origin,
}

impl Forwarded {
    fn new(a: Answer, from: Origin) -> Self {
        Self {
            response_code: a.response_code,
            answers: a.answers,
            authorities: a.authorities,
            additionals: a.additionals,
            from,
        }
    }
}

/// Why one upstream exchange did not yield an answer.
#[derive(thiserror::Error, Debug)]
pub enum UpstreamError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no matching reply within the attempt timeout")]
    Timeout,
    #[error("upstream answered {0}")]
    Rcode(ResponseCode),
    #[error("reply over TCP does not match the query")]
    Mismatch,
    #[error("undecodable reply: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode query: {0}")]
    Encode(#[from] ProtoError),
}

/// The caller answers SERVFAIL for any of these.
#[derive(thiserror::Error, Debug)]
pub enum ForwardError {
    #[error("no upstream configured for this name")]
    NoUpstreams,
    #[error("too many upstream queries in flight")]
    Busy,
    #[error("overall deadline passed")]
    Timeout,
    #[error("every upstream failed, last: {0}")]
    AllFailed(UpstreamError),
}

impl ForwardError {
    /// Whether the lookup waited on silent upstreams (rather than being refused at once, which
    /// costs a client nothing and so may be tried again on every lookup).
    fn made_clients_wait(&self) -> bool {
        matches!(
            self,
            Self::Timeout | Self::AllFailed(UpstreamError::Timeout)
        )
    }
}

/// One query on the wire to an upstream, for loop detection.
#[derive(Debug)]
struct Sent {
    token: u64,
    id: u16,
    /// The question name exactly as sent, in its randomised letter case (DNS 0x20).
    cased: String,
}

type QuestionKey = (Name, RecordType);

#[derive(Debug)]
pub struct Forwarder {
    cfg: ForwardConfig,
    /// `cfg.zones` sorted most specific first, so the first match is the longest.
    zones: Vec<(Name, Vec<SocketAddr>)>,
    cache: Cache,
    permits: Semaphore,
    in_flight: DashMap<QuestionKey, Vec<Sent>>,
    /// Questions answered stale because upstreams failed, and when to try upstreams again.
    failing: DashMap<QuestionKey, Instant>,
    /// Lets `is_loop`, called for every client query, skip hashing when nothing is in flight.
    in_flight_count: AtomicUsize,
    next_token: AtomicU64,
}

impl Forwarder {
    pub fn new(cfg: ForwardConfig) -> Self {
        let mut zones = cfg.zones.clone();
        // Stable sort: of two identical zones, the one listed first wins.
        zones.sort_by_key(|(z, _)| std::cmp::Reverse(z.num_labels()));
        let cache = Cache::new(cfg.cache_size, cfg.max_ttl, cfg.stale_max, cfg.stale_ttl);
        let permits = Semaphore::new(cfg.max_in_flight.min(Semaphore::MAX_PERMITS));
        Self {
            cfg,
            zones,
            cache,
            permits,
            in_flight: DashMap::new(),
            failing: DashMap::new(),
            in_flight_count: AtomicUsize::new(0),
            next_token: AtomicU64::new(0),
        }
    }

    pub fn upstreams_for(&self, name: &Name) -> &[SocketAddr] {
        self.zones
            .iter()
            .find(|(zone, _)| zone.zone_of(name))
            .map_or(&self.cfg.default_upstreams, |(_, ups)| ups)
    }

    /// Answer one question from cache or upstream, within `cfg.timeout`.
    ///
    /// # Errors
    /// `NoUpstreams`, `Busy` (in-flight bound reached, nothing stale to serve), `Timeout`
    /// (overall deadline), `AllFailed` (each upstream failed; carries the last reason).
    pub async fn resolve(&self, query: &Query) -> Result<Forwarded, ForwardError> {
        let start = Instant::now();
        match self.cache.lookup(query, start) {
            Lookup::Fresh(mut a) => {
                restore_case(&mut a, &query.name);
                cache_metric("hit");
                return Ok(Forwarded::new(a, Origin::Cache));
            }
            Lookup::Stale(mut a) if !self.recheck_due(query, start) => {
                restore_case(&mut a, &query.name);
                cache_metric("stale");
                return Ok(Forwarded::new(a, Origin::Stale));
            }
            _ => {}
        }
        cache_metric("miss");
        let upstreams = self.upstreams_for(&query.name);
        if upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let Ok(_permit) = self.permits.try_acquire() else {
            return self.fallback(query, ForwardError::Busy);
        };
        let deadline = after(start, self.cfg.timeout);
        let mut last = None;
        for &upstream in upstreams {
            if Instant::now() >= deadline {
                break;
            }
            match self.exchange(upstream, query, deadline).await {
                Ok(msg) => {
                    let mut answer = scrub(msg, query, &self.cfg.ours, self.cfg.max_ttl);
                    self.cache.insert(query, &answer, Instant::now());
                    if !self.failing.is_empty() {
                        self.failing.remove(&question_key(query));
                    }
                    restore_case(&mut answer, &query.name);
                    return Ok(Forwarded::new(answer, Origin::Upstream));
                }
                Err(error) => {
                    debug!(%upstream, %error, name = %query.name, "upstream attempt failed");
                    last = Some(error);
                }
            }
        }
        let error = match last {
            Some(e) if Instant::now() < deadline => ForwardError::AllFailed(e),
            _ => ForwardError::Timeout,
        };
        self.fallback(query, error)
    }

    /// RFC 8767: when upstream cannot help, an expired answer beats SERVFAIL.
    fn fallback(&self, query: &Query, error: ForwardError) -> Result<Forwarded, ForwardError> {
        match self.cache.lookup(query, Instant::now()) {
            // Another task may have refreshed the entry meanwhile.
            Lookup::Fresh(mut a) => {
                restore_case(&mut a, &query.name);
                Ok(Forwarded::new(a, Origin::Cache))
            }
            Lookup::Stale(mut a) => {
                if error.made_clients_wait() {
                    self.recheck_later(query, Instant::now());
                }
                restore_case(&mut a, &query.name);
                cache_metric("stale");
                Ok(Forwarded::new(a, Origin::Stale))
            }
            Lookup::Miss => {
                METRICS.forward_failures.inc();
                Err(error)
            }
        }
    }

    /// Whether a question answered stale after a failure may go upstream again now. When it may,
    /// the timer is pushed on at once, so that only this lookup waits on the upstreams and the
    /// ones arriving meanwhile are answered stale.
    fn recheck_due(&self, query: &Query, now: Instant) -> bool {
        if self.failing.is_empty() {
            return true;
        }
        let Some(mut recheck) = self.failing.get_mut(&question_key(query)) else {
            return true;
        };
        if now < *recheck {
            return false;
        }
        *recheck = after(now, self.cfg.stale_recheck);
        true
    }

    fn recheck_later(&self, query: &Query, now: Instant) {
        if self.cfg.stale_recheck.is_zero() {
            return;
        }
        // Only cached questions get here, but the map is ours to bound all the same.
        if self.failing.len() >= self.cfg.cache_size.max(1) {
            self.failing.clear();
        }
        self.failing
            .insert(question_key(query), after(now, self.cfg.stale_recheck));
    }

    /// True when `query` is one of our own upstream questions come back to us (through a
    /// resolver that forwards to us): it carries the ID of one of our in-flight upstream
    /// queries, or its name in exactly the random letter case we sent (DNS 0x20). Upstreams
    /// preserve the case of the question; a client practically never picks the same random
    /// pattern, and our pattern always differs from the all-lowercase and the client's own
    /// spelling, so a concurrent client asking the same question is never mistaken for a loop.
    pub fn is_loop(&self, id: u16, query: &Query) -> bool {
        if self.in_flight_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Some(sent) = self.in_flight.get(&question_key(query)) else {
            return false;
        };
        let cased = query.name.to_ascii();
        sent.iter()
            .any(|s| s.id == id || (s.cased == cased && has_letters(&cased)))
    }

    /// One upstream: UDP, then TCP on truncation. Each leg gets `attempt_timeout`,
    /// never beyond `deadline`.
    async fn exchange(
        &self,
        upstream: SocketAddr,
        query: &Query,
        deadline: Instant,
    ) -> Result<Message, UpstreamError> {
        let leg_deadline = || after(Instant::now(), self.cfg.attempt_timeout).min(deadline);
        let reply = timeout_at(leg_deadline(), self.exchange_udp(upstream, query))
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        let reply = if reply.metadata.truncation {
            timeout_at(leg_deadline(), self.exchange_tcp(upstream, query))
                .await
                .map_err(|_| UpstreamError::Timeout)??
        } else {
            reply
        };
        match reply.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(reply),
            code => Err(UpstreamError::Rcode(code)),
        }
    }

    async fn exchange_udp(
        &self,
        upstream: SocketAddr,
        query: &Query,
    ) -> Result<Message, UpstreamError> {
        let (id, cased, wire) = encode_query(query)?;
        let local: SocketAddr = match upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        // A fresh socket per query: the kernel picks a random source port, and connect()
        // makes the kernel drop datagrams from any other peer and report ICMP refusals.
        let socket = UdpSocket::bind(local).await?;
        socket.connect(upstream).await?;
        let cased_sent = cased.clone();
        let _registered = self.register(query, id, cased);
        socket.send(&wire).await?;
        let mut buf = vec![0u8; UDP_RECV_BUF];
        // Ends by a match, an I/O error, or the caller's timeout.
        loop {
            let (len, from) = socket.recv_from(&mut buf).await?;
            // Compare address and port only: a v6 peer may come back with flowinfo set.
            if from.ip() != upstream.ip() || from.port() != upstream.port() {
                continue;
            }
            let Some(data) = buf.get(..len) else { continue };
            match Message::from_vec(data) {
                Ok(msg) if is_reply_to(&msg, id, query, &cased_sent) => return Ok(msg),
                Ok(_) => debug!(%upstream, "ignoring reply that does not match the query"),
                Err(error) => debug!(%upstream, %error, "ignoring undecodable reply"),
            }
        }
    }

    async fn exchange_tcp(
        &self,
        upstream: SocketAddr,
        query: &Query,
    ) -> Result<Message, UpstreamError> {
        let (id, cased, wire) = encode_query(query)?;
        let len = u16::try_from(wire.len())
            .map_err(|_| std::io::Error::other("query longer than a TCP frame"))?;
        let mut stream = TcpStream::connect(upstream).await?;
        let cased_sent = cased.clone();
        let _registered = self.register(query, id, cased);
        let mut framed = Vec::with_capacity(wire.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&wire);
        stream.write_all(&framed).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        let msg = Message::from_vec(&reply)?;
        if is_reply_to(&msg, id, query, &cased_sent) {
            Ok(msg)
        } else {
            Err(UpstreamError::Mismatch)
        }
    }

    fn register(&self, query: &Query, id: u16, cased: String) -> Registered<'_> {
        let key = question_key(query);
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.in_flight
            .entry(key.clone())
            .or_default()
            .push(Sent { token, id, cased });
        self.in_flight_count.fetch_add(1, Ordering::AcqRel);
        Registered {
            fwd: self,
            key,
            token,
        }
    }
}

/// Removes its query from the in-flight table on drop, including when the resolve future
/// is cancelled mid-flight.
struct Registered<'a> {
    fwd: &'a Forwarder,
    key: QuestionKey,
    token: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Some(mut sent) = self.fwd.in_flight.get_mut(&self.key) {
            sent.retain(|s| s.token != self.token);
        }
        // The shard guard above is released before this second access to the same shard.
        self.fwd
            .in_flight
            .remove_if(&self.key, |_, sent| sent.is_empty());
        self.fwd.in_flight_count.fetch_sub(1, Ordering::AcqRel);
    }
}

fn question_key(query: &Query) -> QuestionKey {
    (normal_name(&query.name), query.query_type)
}

fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// A fresh random ID, RD, our own EDNS (the client's OPT never reaches here: only the
/// question does), and the name in a random letter case; returns the ID and that spelling.
fn encode_query(query: &Query) -> Result<(u16, String, Vec<u8>), ProtoError> {
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    let cased = random_case(&query.name.to_ascii(), rand::random());
    let name = Name::from_ascii(&cased).unwrap_or_else(|_| query.name.clone());
    // Rebuilt from its three fields, so no client-side flag rides along.
    let mut question = Query::query(name, query.query_type);
    question.set_query_class(query.query_class);
    msg.add_query(question);
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    msg.set_edns(edns);
    Ok((id, cased, msg.to_vec()?))
}

/// DNS 0x20: flips the case of each letter by one bit of `bits`. At least one letter ends up
/// upper case, so the result never equals the plain lowercase spelling most clients send.
fn random_case(name: &str, bits: u64) -> String {
    let mut out: String = name
        .chars()
        .scan(bits, |bits, c| {
            if !c.is_ascii_alphabetic() {
                return Some(c);
            }
            let upper = *bits & 1 == 1;
            *bits = bits.rotate_right(1);
            Some(if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            })
        })
        .collect();
    if !out.chars().any(|c| c.is_ascii_uppercase())
        && let Some(i) = out.find(|c: char| c.is_ascii_alphabetic())
    {
        out.replace_range(i..=i, &out[i..=i].to_ascii_uppercase());
    }
    out
}

fn cache_metric(result: &'static str) {
    METRICS
        .forward_cache
        .get_or_create(&CacheLabels { result })
        .inc();
}

fn has_letters(name: &str) -> bool {
    name.chars().any(|c| c.is_ascii_alphabetic())
}

/// Answers come back in the random case we sent; the client gets its own spelling back.
pub(crate) fn restore_case(answer: &mut Answer, name: &Name) {
    for r in answer
        .answers
        .iter_mut()
        .chain(answer.authorities.iter_mut())
        .chain(answer.additionals.iter_mut())
    {
        // Name equality ignores case.
        if r.name == *name {
            r.name = name.clone();
        }
    }
}

/// A reply to our query: its ID, and the question exactly as we sent it, down to the random
/// letter case (DNS 0x20: a spoofer who guessed the ID must also guess the spelling).
pub(crate) fn is_reply_to(msg: &Message, id: u16, query: &Query, cased: &str) -> bool {
    msg.metadata.id == id
        && msg.metadata.message_type == MessageType::Response
        && msg.metadata.op_code == OpCode::Query
        && matches!(msg.queries.as_slice(), [q] if q.name.eq_ignore_root(&query.name)
            && q.name.to_ascii() == cased
            && q.query_type == query.query_type
            && q.query_class == query.query_class)
}

/// What of an upstream reply reaches the client and the cache:
///
/// - answers: the records of the question's name and of the CNAME chain from it (and DNAMEs
///   above it);
/// - authorities: records of the question's zone or its parents (the SOA of a negative answer,
///   the NS of a delegation);
/// - additionals: only addresses of names those records point to (NS, MX, SRV targets), never
///   the upstream's OPT (the caller adds its own EDNS);
/// - nothing at or under a name in `ours` (the service domains this server answers itself);
/// - every TTL at most `max_ttl`.
pub(crate) fn scrub(msg: Message, query: &Query, ours: &[Name], max_ttl: u32) -> Answer {
    let foreign = |n: &Name| !ours.iter().any(|o| o.zone_of(n));
    let mut chain: Vec<Name> = vec![query.name.clone()];
    let mut answers: Vec<Record> = Vec::new();
    let mut left: Vec<Record> = msg.answers;
    // A chain in any order: each pass takes the records its names reach (bounded by the
    // number of records).
    loop {
        let before = answers.len();
        let mut rest = Vec::with_capacity(left.len());
        for r in left {
            let reached = chain.contains(&r.name)
                || (r.record_type() == RecordType::DNAME && r.name.zone_of(&query.name));
            if reached && foreign(&r.name) {
                if let RData::CNAME(target) = &r.data
                    && !chain.contains(&target.0)
                {
                    chain.push(target.0.clone());
                }
                answers.push(r);
            } else {
                rest.push(r);
            }
        }
        left = rest;
        if answers.len() == before || left.is_empty() {
            break;
        }
    }
    let authorities: Vec<Record> = msg
        .authorities
        .into_iter()
        .filter(|r| foreign(&r.name) && chain.iter().any(|c| r.name.zone_of(c)))
        .collect();
    let targets: Vec<Name> = answers
        .iter()
        .chain(&authorities)
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.clone()),
            RData::MX(mx) => Some(mx.exchange.clone()),
            RData::SRV(srv) => Some(srv.target.clone()),
            _ => None,
        })
        .collect();
    let additionals: Vec<Record> = msg
        .additionals
        .into_iter()
        .filter(|r| {
            matches!(r.record_type(), RecordType::A | RecordType::AAAA)
                && foreign(&r.name)
                && targets.contains(&r.name)
        })
        .collect();
    let clamp = |mut v: Vec<Record>| {
        for r in &mut v {
            if r.ttl > max_ttl {
                r.ttl = max_ttl;
            }
        }
        v
    };
    Answer {
        response_code: msg.metadata.response_code,
        answers: clamp(answers),
        authorities: clamp(authorities),
        additionals: clamp(additionals),
    }
}

#[cfg(test)]
mod tests;
