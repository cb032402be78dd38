//! The DNS request handler: one question in, one answer out. Service domains are answered from
//! the current snapshot; everything else goes to the forwarder. TCP framing and connection
//! handling are hickory-server's; UDP is served by `udp.rs`. Both take their answers from here;
//! UDP answers are encoded by `encode_udp`, which also compresses answer names against the
//! question (TCP answers, encoded by hickory-server, only against each other).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use hickory_proto::ProtoError;
use hickory_proto::op::{
    Edns, EmitAndCount, Header, HeaderCounts, MessageType, Metadata, OpCode, Query, ResponseCode,
    emit_message_parts,
};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use ipnet::IpNet;
use tracing::{debug, warn};

use super::answer::{self, Outcome, Zones};
use crate::discovery::snapshot::SharedSnapshot;
use crate::metrics::METRICS;
use crate::upstream::forward::Forwarder;

/// Largest UDP answer we send, whatever the client offers; matches common resolver practice
/// (DNS flag day 2020) and keeps answers clear of fragmentation.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// What a reload may change: the zones, the forwarder and who may ask.
pub struct DnsState {
    pub zones: Zones,
    pub forwarder: Arc<Forwarder>,
    pub allow: Vec<IpNet>,
}

pub struct DnsHandler {
    state: ArcSwap<DnsState>,
    snapshot: SharedSnapshot,
    reloads: AtomicU64,
}

/// A response before encoding: header fields, EDNS and records by section.
#[derive(Debug)]
pub struct Response {
    /// How it was answered, for metrics: `local`, `forwarded`, `refused` or `error`.
    pub answered: &'static str,
    pub metadata: Metadata,
    pub edns: Option<Edns>,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// The records of a response, by section.
struct Sections {
    answered: &'static str,
    response_code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Sections {
    fn error(response_code: ResponseCode) -> Self {
        let answered = if response_code == ResponseCode::Refused {
            "refused"
        } else {
            "error"
        };
        Self {
            answered,
            response_code,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// What to do with a request before any I/O.
enum Plan<'r> {
    Done(Sections),
    Forward(&'r Query),
}

impl DnsHandler {
    pub fn new(state: DnsState, snapshot: SharedSnapshot) -> Self {
        Self {
            state: ArcSwap::from_pointee(state),
            snapshot,
            reloads: AtomicU64::new(0),
        }
    }

    /// Swaps in reloaded zones, forwarder and access list; queries in flight finish with the old ones.
    pub fn replace(&self, state: DnsState) {
        self.state.store(Arc::new(state));
        self.reloads.fetch_add(1, Ordering::AcqRel);
    }

    pub fn forwarder(&self) -> Arc<Forwarder> {
        self.state.load().forwarder.clone()
    }

    /// Changes whenever local answers may change: cached local answers are valid for one epoch.
    pub fn epoch(&self) -> u64 {
        self.snapshot.load().generation ^ (self.reloads.load(Ordering::Acquire) << 48)
    }

    pub fn allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.state.load().allow.iter().any(|n| n.contains(&ip))
    }

    /// `None` for requests that get no response at all (responses sent to us).
    fn plan<'r>(&self, request: &'r Request) -> Option<Plan<'r>> {
        let meta = &request.metadata;
        if meta.message_type != MessageType::Query {
            // A response sent to a server is noise (or a reflection attempt): drop it.
            return None;
        }
        if !self.allowed(request.src().ip()) {
            return Some(Plan::Done(Sections::error(ResponseCode::Refused)));
        }
        if meta.op_code != OpCode::Query {
            return Some(Plan::Done(Sections::error(ResponseCode::NotImp)));
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Some(Plan::Done(Sections::error(ResponseCode::BADVERS)));
        }
        let [q] = request.queries.queries() else {
            return Some(Plan::Done(Sections::error(ResponseCode::FormErr)));
        };
        let query = q.original();
        let snapshot = self.snapshot.load();
        Some(
            match answer::answer(&self.state.load().zones, &snapshot, query) {
                Outcome::Local(a) => Plan::Done(Sections {
                    answered: "local",
                    response_code: a.response_code,
                    authoritative: true,
                    answers: a.answers,
                    authorities: a.authorities,
                    additionals: a.additionals,
                }),
                Outcome::Forward => Plan::Forward(query),
            },
        )
    }

    /// The response for a request that needs no forwarding, without awaiting anything;
    /// `Err(())` when the request must be forwarded (use `respond`), `Ok(None)` to drop it.
    #[allow(clippy::result_unit_err)]
    pub fn respond_local(&self, request: &Request) -> Result<Option<Response>, ()> {
        match self.plan(request) {
            None => Ok(None),
            Some(Plan::Done(s)) => Ok(Some(finish(request, s))),
            Some(Plan::Forward(_)) => Err(()),
        }
    }

    /// The response for any request; `None` to drop it.
    pub async fn respond(&self, request: &Request) -> Option<Response> {
        let sections = match self.plan(request)? {
            Plan::Done(s) => s,
            Plan::Forward(query) => {
                self.forward(request.src().ip(), request.metadata.id, query)
                    .await
            }
        };
        Some(finish(request, sections))
    }

    async fn forward(&self, src: IpAddr, id: u16, query: &Query) -> Sections {
        let forwarder = self.forwarder();
        if forwarder.is_loop(id, query) {
            warn!(name = %query.name(), %src, "forwarding loop: our own upstream query came back to us; answering REFUSED");
            return Sections::error(ResponseCode::Refused);
        }
        match forwarder.resolve(query).await {
            Ok(f) => Sections {
                answered: "forwarded",
                response_code: f.response_code,
                authoritative: false,
                answers: f.answers,
                authorities: f.authorities,
                additionals: f.additionals,
            },
            Err(error) => {
                debug!(name = %query.name(), %error, "forwarding failed");
                Sections {
                    answered: "forwarded",
                    ..Sections::error(ResponseCode::ServFail)
                }
            }
        }
    }
}

fn finish(request: &Request, s: Sections) -> Response {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = s.response_code;
    metadata.authoritative = s.authoritative;
    metadata.recursion_available = true;
    let edns = request.edns.as_ref().map(|client| {
        let mut e = Edns::new();
        e.set_max_payload(client.max_payload().clamp(512, MAX_UDP_PAYLOAD));
        e
    });
    Response {
        answered: s.answered,
        metadata,
        edns,
        answers: s.answers,
        authorities: s.authorities,
        additionals: s.additionals,
    }
}

/// Counts one answered query and its time.
pub fn record(request: &Request, response: &Response, started: std::time::Instant) {
    let qtype = request
        .queries
        .queries()
        .first()
        .map_or(hickory_proto::rr::RecordType::NULL, |q| q.query_type());
    METRICS
        .dns_counter(qtype, response.metadata.response_code, response.answered)
        .inc();
    METRICS
        .dns_duration
        .observe(started.elapsed().as_secs_f64());
}

/// Encodes `response` to `request` for UDP: at most the client's EDNS payload (512 without
/// EDNS), truncated with TC when it does not fit.
pub fn encode_udp(request: &Request, response: &Response) -> Vec<u8> {
    let max = response.edns.as_ref().map_or(512, Edns::max_payload);
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max);
    // What hickory's `MessageResponse::destructive_emit` does, but with our question section.
    let emitted = emit_message_parts(
        &response.metadata,
        &mut Question(&request.queries),
        &mut response.answers.iter(),
        &mut response.authorities.iter(),
        &mut response.additionals.iter(),
        response.edns.as_ref(),
        None,
        &mut encoder,
    );
    if emitted.is_ok() {
        // A record that did not fit was rolled back by moving the offset only: drop its bytes.
        let end = encoder.offset();
        bytes.truncate(end);
        return bytes;
    }
    // Could not encode at all: a bare SERVFAIL beats silence.
    bytes.clear();
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    let mut encoder = BinEncoder::new(&mut bytes);
    let _ = Header {
        metadata,
        counts: HeaderCounts::default(),
    }
    .emit(&mut encoder);
    bytes
}

/// The question section exactly as the client sent it (letter case included), with the first
/// question's name and each of its suffixes offered for compression, as `Name::emit` does, so that
/// answer owners become pointers to it (RFC 1035 4.1.4). hickory's own question emitter offers
/// the whole section, type and class included, which no name ever matches.
struct Question<'q>(&'q Queries);

impl EmitAndCount for Question<'_> {
    fn emit(&mut self, encoder: &mut BinEncoder<'_>) -> Result<usize, ProtoError> {
        let start = encoder.offset();
        let raw = self.0.as_bytes();
        encoder.emit_vec(raw)?;
        if let Some(end) = name_end(raw) {
            let mut label = 0;
            while label < end {
                encoder.store_label_pointer(start + label, start + end);
                label += 1 + usize::from(raw[label]);
            }
        }
        Ok(self.0.len())
    }
}

/// Where the root label of the name at the start of `raw` is; `None` if there is no name or it
/// is itself compressed (a pointer, which a first question has nothing to point back to).
fn name_end(raw: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        match *raw.get(at)? {
            0 => return Some(at),
            len @ 1..=63 => at += 1 + usize::from(len),
            _ => return None,
        }
    }
}

/// The response as hickory-server encodes it itself: for TCP, whose `ResponseHandler` takes only
/// a `MessageResponse`.
fn builder<'q, 'a>(
    request: &'q Request,
    response: &'a Response,
) -> hickory_server::zone_handler::MessageResponse<
    'q,
    'a,
    std::slice::Iter<'a, Record>,
    std::slice::Iter<'a, Record>,
    std::iter::Empty<&'a Record>,
    std::slice::Iter<'a, Record>,
>
where
    'a: 'q,
{
    let mut b = MessageResponseBuilder::new(&request.queries, None);
    if let Some(e) = &response.edns {
        b.edns(e);
    }
    b.build(
        response.metadata,
        response.answers.iter(),
        response.authorities.iter(),
        std::iter::empty(),
        response.additionals.iter(),
    )
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut handle: R,
    ) -> ResponseInfo {
        let started = std::time::Instant::now();
        let Some(response) = self.respond(request).await else {
            return dropped(&request.metadata);
        };
        record(request, &response, started);
        match handle.send_response(builder(request, &response)).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, src = %request.src(), "could not send a response");
                dropped(&request.metadata)
            }
        }
    }
}

fn dropped(meta: &Metadata) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(meta);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::{A, SOA, SRV};
    use hickory_proto::rr::{Name, RData, RecordType};
    use hickory_server::net::xfer::Protocol;

    use super::*;

    fn request(name: &str, qtype: RecordType, edns: bool) -> Request {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.edns = Some(e);
        }
        let src = "127.0.0.1:5353".parse().unwrap();
        Request::from_bytes(m.to_vec().unwrap(), src, Protocol::Udp).unwrap()
    }

    fn response(request: &Request, answers: Vec<Record>, authorities: Vec<Record>) -> Response {
        let s = Sections {
            answered: "local",
            response_code: ResponseCode::NoError,
            authoritative: true,
            answers,
            authorities,
            additionals: Vec::new(),
        };
        finish(request, s)
    }

    /// The question's name as the client spelled it.
    fn qname(request: &Request) -> Name {
        request.queries.queries()[0].original().name().clone()
    }

    fn a(owner: Name) -> Record {
        Record::from_rdata(owner, 5, RData::A(A(Ipv4Addr::new(127, 77, 0, 1))))
    }

    /// hickory-server's own encoding of the same response (what TCP answers use).
    fn hickory(request: &Request, response: &Response, max: u16) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        builder(request, response)
            .destructive_emit(&mut encoder)
            .unwrap();
        bytes
    }

    #[test]
    fn an_a_answer_owner_is_a_pointer_to_the_question() {
        let req = request("web.disco.", RecordType::A, false);
        let resp = response(&req, vec![a(qname(&req))], Vec::new());
        let bytes = encode_udp(&req, &resp);
        // Header 12, question 11 + 4, answer: pointer 2, type, class, TTL and length 10, address 4.
        assert_eq!(bytes.len(), 12 + 15 + 16);
        assert_eq!(bytes[27..29], [0xc0, 12]);
        assert_eq!(
            hickory(&req, &resp, 512).len(),
            52,
            "hickory: owner in full"
        );
        let msg = Message::from_vec(&bytes).unwrap();
        assert_eq!(msg, Message::from_vec(&hickory(&req, &resp, 512)).unwrap());
        assert_eq!(msg.answers, resp.answers);
    }

    #[test]
    fn apart_from_compression_answers_are_hickorys_edns_included() {
        let req = request("nope.disco.", RecordType::A, true);
        let apex = Name::from_ascii("disco.").unwrap();
        let soa = SOA::new(
            Name::from_ascii("localhost.").unwrap(),
            Name::from_ascii("hostmaster.disco.").unwrap(),
            1,
            3600,
            600,
            86400,
            5,
        );
        let resp = response(
            &req,
            Vec::new(),
            vec![Record::from_rdata(apex, 5, RData::SOA(soa))],
        );
        let bytes = encode_udp(&req, &resp);
        let msg = Message::from_vec(&bytes).unwrap();
        assert_eq!(msg, Message::from_vec(&hickory(&req, &resp, 1232)).unwrap());
        assert_eq!(msg.edns.as_ref().map(Edns::max_payload), Some(1232));
        // The SOA owner `disco.` points into the question's `nope.disco.`.
        assert_eq!(hickory(&req, &resp, 1232).len() - bytes.len(), 7 - 2);
    }

    #[test]
    fn a_mixed_case_question_is_echoed_byte_exact() {
        let req = request("WeB.DiScO.", RecordType::A, false);
        let resp = response(&req, vec![a(qname(&req))], Vec::new());
        let bytes = encode_udp(&req, &resp);
        let question = req.queries.as_bytes();
        assert_eq!(&bytes[12..12 + question.len()], question);
        assert_eq!(bytes[27..29], [0xc0, 12]);
        let msg = Message::from_vec(&bytes).unwrap();
        assert_eq!(msg.queries[0].name().to_ascii(), "WeB.DiScO.");
        assert_eq!(msg.answers[0].name.to_ascii(), "WeB.DiScO.");
    }

    #[test]
    fn big_srv_answers_fit_one_more_record_before_truncating() {
        let req = request("_grpc._tcp.big.disco.", RecordType::SRV, false);
        let answers = (1..=60)
            .map(|i| {
                let target = Name::from_ascii(format!("127-0-1-{i}.big.disco.")).unwrap();
                let srv = SRV::new(0, 1, 9000, target);
                Record::from_rdata(qname(&req), 5, RData::SRV(srv))
            })
            .collect();
        let resp = response(&req, answers, Vec::new());
        let bytes = encode_udp(&req, &resp);
        let msg = Message::from_vec(&bytes).unwrap();
        assert!(msg.metadata.truncation);
        assert_eq!(msg.answers, resp.answers[..12]);
        // Header 12, question 22 + 4, 12 answers of 39 or 40 bytes; nothing after them.
        assert_eq!(bytes.len(), 12 + 26 + 9 * 39 + 3 * 40);
        let before = Message::from_vec(&hickory(&req, &resp, 512)).unwrap();
        assert!(before.metadata.truncation);
        assert_eq!(before.answers.len(), 11, "hickory: first owner in full");
    }

    #[test]
    fn only_a_plain_name_is_offered_for_compression() {
        assert_eq!(name_end(b"\x03web\x05disco\x00\x00\x01\x00\x01"), Some(10));
        assert_eq!(name_end(b"\x00\x00\x02\x00\x01"), Some(0));
        assert_eq!(name_end(b"\x03web\xc0\x0c\x00\x01\x00\x01"), None);
        assert_eq!(name_end(b"\x03web"), None);
        assert_eq!(name_end(b""), None);
    }
}
