//! The DNS request handler: one question in, one answer out. Service domains are answered from
//! the current snapshot; everything else goes to the forwarder. TCP framing and connection
//! handling are hickory-server's; UDP is served by `udp.rs`. Both encode through `encode` here,
//! so they give byte-identical answers.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use hickory_proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnet::IpNet;
use tracing::{debug, warn};

use super::answer::{self, Outcome, Zones};
use super::forward::Forwarder;
use crate::metrics::METRICS;
use crate::snapshot::SharedSnapshot;

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
    if builder(request, response)
        .destructive_emit(&mut encoder)
        .is_ok()
    {
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
