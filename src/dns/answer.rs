//! Authoritative answers for the service domains, as a pure function of one snapshot and one
//! question: no sockets, no clock. The server decides forwarding, EDNS and truncation; this file
//! decides what is true.
//!
//! Names under each service domain `D`:
//! - `D`: SOA and NS.
//! - `<svc>.D`: A/AAAA (the magic addresses), SRV (one record per backend, default ports).
//! - `_<port>._tcp.<svc>.D`: SRV with each backend's number for that named port.
//! - `<a-b-c-d>.<svc>.D`: A/AAAA of one backend, the target of the SRV records.
//! - reverse names inside the magic ranges: PTR to `<svc>.D`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::discovery::snapshot::{Service, Snapshot};
use crate::service::{Backend, PortName};

/// What the answers need from the config.
#[derive(Debug, Clone)]
pub struct Zones {
    pub domains: Vec<Name>,
    pub magic_v4: Ipv4Net,
    pub magic_v6: Option<Ipv6Net>,
    pub ttl: u32,
    pub srv_ttl: u32,
    pub negative_ttl: u32,
    reverse_v4: Name,
    reverse_v6: Option<Name>,
}

impl Zones {
    pub fn new(
        domains: Vec<Name>,
        magic_v4: Ipv4Net,
        magic_v6: Option<Ipv6Net>,
        ttl: u32,
        srv_ttl: u32,
        negative_ttl: u32,
    ) -> Self {
        Self {
            reverse_v4: reverse_zone_v4(magic_v4),
            reverse_v6: magic_v6.map(reverse_zone_v6),
            domains,
            magic_v4,
            magic_v6,
            ttl,
            srv_ttl,
            negative_ttl,
        }
    }
}

/// An authoritative answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub response_code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The name is ours: answer authoritatively.
    Local(Answer),
    /// Not ours: forward upstream.
    Forward,
}

/// Answers `query` from `snap`, or says it belongs upstream.
pub fn answer(zones: &Zones, snap: &Snapshot, query: &Query) -> Outcome {
    let qname = query.name();
    let lower = qname.to_lowercase();
    let qtype = query.query_type();
    if let Some(domain) = zones.domains.iter().find(|d| d.zone_of(&lower)) {
        if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
            return Outcome::Local(Answer::empty(ResponseCode::Refused));
        }
        let relative: Vec<&[u8]> = lower
            .iter()
            .take(lower.num_labels().saturating_sub(domain.num_labels()) as usize)
            .collect();
        let mut b = Builder {
            zones,
            snap,
            owner: qname,
            apex: domain,
            answer: Answer::empty(ResponseCode::NoError),
        };
        b.service_domain(&relative, qtype);
        return Outcome::Local(b.answer);
    }
    if let Some((apex, ip)) = reverse(zones, &lower) {
        if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
            return Outcome::Local(Answer::empty(ResponseCode::Refused));
        }
        let mut b = Builder {
            zones,
            snap,
            owner: qname,
            apex: &apex,
            answer: Answer::empty(ResponseCode::NoError),
        };
        b.reverse(ip, qtype);
        return Outcome::Local(b.answer);
    }
    Outcome::Forward
}

impl Answer {
    fn empty(response_code: ResponseCode) -> Self {
        Self {
            response_code,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

struct Builder<'a> {
    zones: &'a Zones,
    snap: &'a Snapshot,
    owner: &'a Name,
    apex: &'a Name,
    answer: Answer,
}

impl Builder<'_> {
    fn service_domain(&mut self, relative: &[&[u8]], qtype: RecordType) {
        match relative {
            [] => self.apex(qtype),
            [svc] => match self.service(svc) {
                Some(s) => self.service_name(&s, qtype),
                None => self.nxdomain(),
            },
            [tcp, svc] if *tcp == b"_tcp" => match self.service(svc) {
                // `_tcp.web.D` exists as an empty non-terminal when web has named ports (RFC 8020).
                Some(s) if s.spec.port_names().next().is_some() => self.nodata(),
                _ => self.nxdomain(),
            },
            [port, tcp, svc] if *tcp == b"_tcp" && port.first() == Some(&b'_') => {
                let port = std::str::from_utf8(port)
                    .ok()
                    .and_then(|p| p.get(1..))
                    .and_then(|p| p.parse::<PortName>().ok());
                match (self.service(svc), port) {
                    (Some(s), Some(port)) if s.spec.port_names().any(|p| *p == port) => {
                        if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                            self.srv(&s, Some(&port));
                        } else {
                            self.nodata();
                        }
                    }
                    _ => self.nxdomain(),
                }
            }
            [host, svc] => match (self.service(svc), parse_dashed(host)) {
                (Some(s), Some(ip)) if s.spec.backends.iter().any(|b| b.addr.ip() == ip) => {
                    match address_record(self.owner.clone(), self.zones.srv_ttl, ip, qtype) {
                        Some(r) => self.answer.answers.push(r),
                        None => self.nodata(),
                    }
                }
                _ => self.nxdomain(),
            },
            _ => self.nxdomain(),
        }
    }

    fn service(&self, label: &[u8]) -> Option<std::sync::Arc<Service>> {
        std::str::from_utf8(label)
            .ok()
            .and_then(|l| self.snap.service(l))
            .cloned()
    }

    fn apex(&mut self, qtype: RecordType) {
        let ttl = self.zones.ttl;
        match qtype {
            RecordType::SOA => {
                let soa = self.soa(ttl);
                self.answer.answers.push(soa);
            }
            RecordType::NS => self.answer.answers.push(Record::from_rdata(
                self.owner.clone(),
                ttl,
                RData::NS(NS(Name::from_ascii("localhost.").unwrap_or_default())),
            )),
            RecordType::ANY => {
                let soa = self.soa(ttl);
                self.answer.answers.push(soa);
                self.answer.answers.push(Record::from_rdata(
                    self.owner.clone(),
                    ttl,
                    RData::NS(NS(Name::from_ascii("localhost.").unwrap_or_default())),
                ));
            }
            _ => self.nodata(),
        }
    }

    fn service_name(&mut self, s: &Service, qtype: RecordType) {
        let owner = self.owner.clone();
        let ttl = self.zones.ttl;
        match qtype {
            RecordType::A => {
                self.answer
                    .answers
                    .push(Record::from_rdata(owner, ttl, RData::A(A(s.magic_v4))))
            }
            RecordType::AAAA => match s.magic_v6 {
                Some(v6) => {
                    self.answer
                        .answers
                        .push(Record::from_rdata(owner, ttl, RData::AAAA(AAAA(v6))))
                }
                None => self.nodata(),
            },
            RecordType::SRV => self.srv(s, None),
            RecordType::ANY => {
                self.answer.answers.push(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::A(A(s.magic_v4)),
                ));
                if let Some(v6) = s.magic_v6 {
                    self.answer
                        .answers
                        .push(Record::from_rdata(owner, ttl, RData::AAAA(AAAA(v6))));
                }
            }
            _ => self.nodata(),
        }
    }

    fn srv(&mut self, s: &Service, port: Option<&PortName>) {
        if s.spec.backends.is_empty() {
            return self.nodata();
        }
        let service_name = Name::from_labels([s.name().as_str().as_bytes()])
            .ok()
            .and_then(|n| n.append_domain(self.apex).ok());
        let Some(service_name) = service_name else {
            return self.nodata();
        };
        for b in &s.spec.backends {
            let Some(target) = target_name(b, &service_name) else {
                continue;
            };
            let rdata = SRV::new(b.priority, b.weight, b.port_for(port), target.clone());
            self.answer.answers.push(Record::from_rdata(
                self.owner.clone(),
                self.zones.srv_ttl,
                RData::SRV(rdata),
            ));
            let qtype = if b.addr.is_ipv4() {
                RecordType::A
            } else {
                RecordType::AAAA
            };
            if let Some(glue) = address_record(target, self.zones.srv_ttl, b.addr.ip(), qtype) {
                self.answer.additionals.push(glue);
            }
        }
    }

    fn reverse(&mut self, ip: IpAddr, qtype: RecordType) {
        let Some(s) = self
            .snap
            .by_addr(ip)
            .filter(|s| s.magic_v4 == ip.to_canonical() || s.magic_v6.map(IpAddr::V6) == Some(ip))
        else {
            return self.nxdomain();
        };
        let Some(domain) = self.zones.domains.first() else {
            return self.nxdomain();
        };
        let target = Name::from_labels([s.name().as_str().as_bytes()])
            .ok()
            .and_then(|n| n.append_domain(domain).ok());
        match (qtype, target) {
            (RecordType::PTR | RecordType::ANY, Some(target)) => {
                self.answer.answers.push(Record::from_rdata(
                    self.owner.clone(),
                    self.zones.ttl,
                    RData::PTR(PTR(target)),
                ));
            }
            _ => self.nodata(),
        }
    }

    fn soa(&self, ttl: u32) -> Record {
        let rname = Name::from_ascii("hostmaster")
            .ok()
            .and_then(|h| h.append_domain(self.apex).ok())
            .unwrap_or_default();
        let serial = u32::try_from(self.snap.generation % (1 << 32)).unwrap_or(0);
        let soa = SOA::new(
            Name::from_ascii("localhost.").unwrap_or_default(),
            rname,
            serial,
            3600,
            600,
            86_400,
            self.zones.negative_ttl,
        );
        Record::from_rdata(self.apex.clone(), ttl, RData::SOA(soa))
    }

    fn nodata(&mut self) {
        self.answer.answers.clear();
        self.answer.additionals.clear();
        let soa = self.soa(self.zones.negative_ttl);
        self.answer.authorities.push(soa);
    }

    fn nxdomain(&mut self) {
        self.nodata();
        self.answer.response_code = ResponseCode::NXDomain;
    }
}

/// `127-0-0-2.web.disco.` for 127.0.0.2; `fd00-0-0-0-0-0-0-1.web.disco.` for fd00::1.
fn target_name(b: &Backend, service: &Name) -> Option<Name> {
    let label = match b.addr.ip() {
        IpAddr::V4(v4) => v4.octets().map(|o| o.to_string()).join("-"),
        IpAddr::V6(v6) => v6.segments().map(|s| format!("{s:x}")).join("-"),
    };
    Name::from_labels([label.as_bytes()])
        .ok()?
        .append_domain(service)
        .ok()
}

fn parse_dashed(label: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(label).ok()?;
    let parts: Vec<&str> = s.split('-').collect();
    match parts.len() {
        4 => {
            let mut o = [0u8; 4];
            for (dst, p) in o.iter_mut().zip(&parts) {
                *dst = p.parse().ok()?;
            }
            Some(IpAddr::V4(Ipv4Addr::from(o)))
        }
        8 => {
            let mut seg = [0u16; 8];
            for (dst, p) in seg.iter_mut().zip(&parts) {
                *dst = u16::from_str_radix(p, 16).ok()?;
            }
            Some(IpAddr::V6(Ipv6Addr::from(seg)))
        }
        _ => None,
    }
}

fn address_record(owner: Name, ttl: u32, ip: IpAddr, qtype: RecordType) -> Option<Record> {
    match (ip, qtype) {
        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
            Some(Record::from_rdata(owner, ttl, RData::A(A(v4))))
        }
        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
            Some(Record::from_rdata(owner, ttl, RData::AAAA(AAAA(v6))))
        }
        _ => None,
    }
}

/// For a reverse name inside one of the magic ranges: the range's reverse zone and the address.
fn reverse(zones: &Zones, lower: &Name) -> Option<(Name, IpAddr)> {
    if zones.reverse_v4.zone_of(lower) {
        let labels: Vec<&[u8]> = lower.iter().collect();
        if let [d, c, b, a, _, _] = labels.as_slice() {
            let octet = |l: &[u8]| std::str::from_utf8(l).ok()?.parse::<u8>().ok();
            let ip = Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?);
            return zones
                .magic_v4
                .contains(&ip)
                .then(|| (zones.reverse_v4.clone(), IpAddr::V4(ip)));
        }
        return None;
    }
    let (net, zone) = (zones.magic_v6?, zones.reverse_v6.as_ref()?);
    if !zone.zone_of(lower) || lower.num_labels() != 34 {
        return None;
    }
    let mut bits: u128 = 0;
    for l in lower.iter().take(32).collect::<Vec<_>>().iter().rev() {
        let nibble = std::str::from_utf8(l)
            .ok()
            .and_then(|s| u8::from_str_radix(s, 16).ok())
            .filter(|n| *n < 16 && l.len() == 1)?;
        bits = (bits << 4) | u128::from(nibble);
    }
    let ip = Ipv6Addr::from(bits);
    net.contains(&ip).then(|| (zone.clone(), IpAddr::V6(ip)))
}

/// `77.127.in-addr.arpa.` for 127.77.0.0/16: the octet-aligned zone enclosing the range.
fn reverse_zone_v4(net: Ipv4Net) -> Name {
    let octets = net.network().octets();
    let whole = usize::from(net.prefix_len() / 8);
    let mut labels: Vec<String> = octets
        .iter()
        .take(whole)
        .rev()
        .map(ToString::to_string)
        .collect();
    labels.extend(["in-addr".to_string(), "arpa".to_string()]);
    Name::from_labels(labels.iter().map(String::as_bytes)).unwrap_or_default()
}

fn reverse_zone_v6(net: Ipv6Net) -> Name {
    let bits = u128::from(net.network());
    let nibbles = usize::from(net.prefix_len() / 4);
    let mut labels: Vec<String> = (0..nibbles)
        .rev()
        .map(|i| format!("{:x}", (bits >> (124 - 4 * i)) & 0xf))
        .collect();
    labels.extend(["ip6".to_string(), "arpa".to_string()]);
    Name::from_labels(labels.iter().map(String::as_bytes)).unwrap_or_default()
}

#[cfg(test)]
mod tests;
