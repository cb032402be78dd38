//! The DNS request handler: one question in, one answer out. Service domains are answered from
//! the current snapshot; everything else goes to the forwarder. Sockets, TCP framing, EDNS
//! payload limits and truncation are hickory-server's; this file decides what to say.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::Record;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnet::IpNet;
use tracing::{debug, warn};

use super::answer::{self, Outcome, Zones};
use super::forward::Forwarder;
use crate::snapshot::SharedSnapshot;

/// Largest UDP answer we send, whatever the client offers; matches common resolver practice
/// (DNS flag day 2020) and keeps answers clear of fragmentation.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

pub struct DnsHandler {
    zones: Zones,
    snapshot: SharedSnapshot,
    forwarder: Arc<Forwarder>,
}

impl DnsHandler {
    pub fn new(zones: Zones, snapshot: SharedSnapshot, forwarder: Arc<Forwarder>) -> Self {
        Self { zones, snapshot, forwarder }
    }
}

/// The records of a response, by section.
struct Sections {
    response_code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Sections {
    fn error(response_code: ResponseCode) -> Self {
        Self { response_code, authoritative: false, answers: Vec::new(), authorities: Vec::new(), additionals: Vec::new() }
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let meta = &request.metadata;
        if meta.message_type != MessageType::Query {
            // A response sent to a server is noise (or a reflection attempt): drop it.
            return dropped(meta);
        }
        let sections = if meta.op_code != OpCode::Query {
            Sections::error(ResponseCode::NotImp)
        } else if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Sections::error(ResponseCode::BADVERS)
        } else {
            match request.queries.queries() {
                [q] => self.resolve(request.src().ip(), meta.id, q.original()).await,
                _ => Sections::error(ResponseCode::FormErr),
            }
        };

        let mut metadata = Metadata::response_from_request(meta);
        metadata.response_code = sections.response_code;
        metadata.authoritative = sections.authoritative;
        metadata.recursion_available = true;
        let edns = request.edns.as_ref().map(|client| {
            let mut e = Edns::new();
            e.set_max_payload(client.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let message = builder.build(metadata, sections.answers.iter(), sections.authorities.iter(), std::iter::empty(), sections.additionals.iter());
        match response.send_response(message).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, src = %request.src(), "could not send a response");
                dropped(meta)
            }
        }
    }
}

impl DnsHandler {
    async fn resolve(&self, src: IpAddr, id: u16, query: &Query) -> Sections {
        let snapshot = self.snapshot.load();
        match answer::answer(&self.zones, &snapshot, query) {
            Outcome::Local(a) => Sections {
                response_code: a.response_code,
                authoritative: true,
                answers: a.answers,
                authorities: a.authorities,
                additionals: a.additionals,
            },
            Outcome::Forward => {
                drop(snapshot);
                if self.forwarder.is_loop(id, query) {
                    warn!(name = %query.name(), %src, "forwarding loop: our own upstream query came back to us; answering REFUSED");
                    return Sections::error(ResponseCode::Refused);
                }
                match self.forwarder.resolve(query).await {
                    Ok(f) => Sections {
                        response_code: f.response_code,
                        authoritative: false,
                        answers: f.answers,
                        authorities: f.authorities,
                        additionals: f.additionals,
                    },
                    Err(error) => {
                        debug!(name = %query.name(), %error, "forwarding failed");
                        Sections::error(ResponseCode::ServFail)
                    }
                }
            }
        }
    }
}

fn dropped(meta: &Metadata) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(meta);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

/// Access rules for hickory-server: deny everything, then allow the configured networks
/// (a more specific allow beats the catch-all deny). Not an open resolver by default.
pub fn access_lists(allow: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let everything = ["0.0.0.0/0", "::/0"].map(|n| n.parse::<IpNet>().unwrap_or_default());
    let deny = everything
        .into_iter()
        // Allowing a whole family is expressed by not denying it (an equal-length allow loses).
        .filter(|all| !allow.iter().any(|a| a.prefix_len() == 0 && a.addr().is_ipv4() == all.addr().is_ipv4()))
        .collect();
    (deny, allow.to_vec())
}
