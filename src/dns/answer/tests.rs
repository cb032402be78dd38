use super::*;
use crate::service::{Backend, ServiceSpec};

fn zones() -> Zones {
    Zones::new(
        vec![
            Name::from_ascii("disco.").unwrap(),
            Name::from_ascii("svc.internal.").unwrap(),
        ],
        "127.77.0.0/16".parse().unwrap(),
        Some("fd64:d15c::/64".parse().unwrap()),
        60,
        5,
        5,
    )
}

fn snap() -> Snapshot {
    let mut web = ServiceSpec::new("web".parse().unwrap());
    web.backends
        .push(Backend::new("127.0.0.2:8080".parse().unwrap()));
    let mut b = Backend::new("[fd00::3]:8081".parse().unwrap());
    b.weight = 2;
    b.set_port("grpc".parse().unwrap(), 9091);
    web.backends.push(b);
    web.client_ports.insert(9090, "grpc".parse().unwrap());
    let api = ServiceSpec::new("api".parse().unwrap());
    Snapshot::new(
        42,
        [
            Service {
                spec: web,
                magic_v4: "127.77.1.2".parse().unwrap(),
                magic_v6: Some("fd64:d15c::1:2".parse().unwrap()),
            },
            Service {
                spec: api,
                magic_v4: "127.77.3.4".parse().unwrap(),
                magic_v6: None,
            },
        ],
    )
}

fn ask(name: &str, t: RecordType) -> Answer {
    match answer(
        &zones(),
        &snap(),
        &Query::query(Name::from_ascii(name).unwrap(), t),
    ) {
        Outcome::Local(a) => a,
        Outcome::Forward => panic!("{name} was forwarded"),
    }
}

fn rdata(a: &Answer) -> Vec<String> {
    a.answers
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.ttl, r.data))
        .collect()
}

#[test]
fn a_and_aaaa_give_the_magic_addresses_case_insensitively() {
    let a = ask("WEB.Disco.", RecordType::A);
    assert_eq!(a.response_code, ResponseCode::NoError);
    assert_eq!(
        rdata(&a),
        ["WEB.Disco. 60 127.77.1.2"],
        "owner keeps the question's case"
    );
    assert_eq!(
        rdata(&ask("web.svc.internal.", RecordType::AAAA)),
        ["web.svc.internal. 60 fd64:d15c::1:2"]
    );
}

#[test]
fn aaaa_without_a_v6_address_is_nodata_with_soa() {
    let a = ask("api.disco.", RecordType::AAAA);
    assert_eq!(a.response_code, ResponseCode::NoError);
    assert!(a.answers.is_empty());
    assert_eq!(a.authorities.len(), 1);
    assert_eq!(a.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(a.authorities[0].ttl, 5);
}

#[test]
fn srv_lists_backends_with_resolvable_targets_and_glue() {
    let a = ask("web.disco.", RecordType::SRV);
    assert_eq!(
        rdata(&a),
        [
            "web.disco. 5 0 1 8080 127-0-0-2.web.disco.",
            "web.disco. 5 0 2 8081 fd00-0-0-0-0-0-0-3.web.disco."
        ]
    );
    let glue: Vec<String> = a
        .additionals
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    assert_eq!(
        glue,
        [
            "127-0-0-2.web.disco. 127.0.0.2",
            "fd00-0-0-0-0-0-0-3.web.disco. fd00::3"
        ]
    );
    // The targets resolve on their own too.
    assert_eq!(
        rdata(&ask("127-0-0-2.web.disco.", RecordType::A)),
        ["127-0-0-2.web.disco. 5 127.0.0.2"]
    );
    assert_eq!(
        rdata(&ask("fd00-0-0-0-0-0-0-3.web.disco.", RecordType::AAAA)),
        ["fd00-0-0-0-0-0-0-3.web.disco. 5 fd00::3"]
    );
    assert_eq!(
        ask("127-0-0-9.web.disco.", RecordType::A).response_code,
        ResponseCode::NXDomain,
        "not a backend of web"
    );
}

#[test]
fn named_port_srv_uses_each_backends_number() {
    let a = ask("_grpc._tcp.web.disco.", RecordType::SRV);
    assert_eq!(
        rdata(&a),
        [
            "_grpc._tcp.web.disco. 5 0 1 8080 127-0-0-2.web.disco.",
            "_grpc._tcp.web.disco. 5 0 2 9091 fd00-0-0-0-0-0-0-3.web.disco."
        ]
    );
    assert_eq!(
        ask("_http._tcp.web.disco.", RecordType::SRV).response_code,
        ResponseCode::NXDomain
    );
    let ent = ask("_tcp.web.disco.", RecordType::SRV);
    assert_eq!(
        (ent.response_code, ent.answers.len()),
        (ResponseCode::NoError, 0),
        "empty non-terminal"
    );
}

#[test]
fn unknown_names_are_nxdomain_with_soa_and_known_names_other_types_nodata() {
    let nx = ask("nope.disco.", RecordType::A);
    assert_eq!(nx.response_code, ResponseCode::NXDomain);
    let soa = &nx.authorities[0];
    assert_eq!(soa.name.to_string(), "disco.");
    assert!(
        soa.data
            .to_string()
            .starts_with("localhost. hostmaster.disco. 42 "),
        "{}",
        soa.data
    );
    let txt = ask("web.disco.", RecordType::TXT);
    assert_eq!(
        (txt.response_code, txt.answers.len(), txt.authorities.len()),
        (ResponseCode::NoError, 0, 1)
    );
    assert_eq!(
        ask("a.b.web.disco.", RecordType::A).response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(
        ask("api.disco.", RecordType::SRV).answers.len(),
        0,
        "no backends: no SRV"
    );
}

#[test]
fn apex_has_soa_and_ns() {
    assert_eq!(
        ask("disco.", RecordType::SOA).answers[0].record_type(),
        RecordType::SOA
    );
    assert_eq!(
        rdata(&ask("disco.", RecordType::NS)),
        ["disco. 60 localhost."]
    );
    assert_eq!(
        ask("disco.", RecordType::A).response_code,
        ResponseCode::NoError
    );
}

#[test]
fn ptr_names_the_service_of_a_magic_address() {
    assert_eq!(
        rdata(&ask("2.1.77.127.in-addr.arpa.", RecordType::PTR)),
        ["2.1.77.127.in-addr.arpa. 60 web.disco."]
    );
    assert_eq!(
        ask("9.9.77.127.in-addr.arpa.", RecordType::PTR).response_code,
        ResponseCode::NXDomain
    );
    let rev: String = "fd64d15c000000000000000000010002"
        .chars()
        .rev()
        .map(|c| format!("{c}."))
        .collect::<String>()
        + "ip6.arpa.";
    assert_eq!(
        rdata(&ask(&rev, RecordType::PTR)),
        [format!("{rev} 60 web.disco.")]
    );
}

#[test]
fn everything_else_is_forwarded() {
    for name in [
        "example.com.",
        "disco.example.",
        "1.0.0.127.in-addr.arpa.",
        "2.1.78.127.in-addr.arpa.",
    ] {
        assert_eq!(
            answer(
                &zones(),
                &snap(),
                &Query::query(Name::from_ascii(name).unwrap(), RecordType::A)
            ),
            Outcome::Forward,
            "{name}"
        );
    }
}

#[test]
fn reverse_zones_are_octet_aligned() {
    assert_eq!(
        reverse_zone_v4("127.77.0.0/16".parse().unwrap()).to_string(),
        "77.127.in-addr.arpa."
    );
    assert_eq!(
        reverse_zone_v4("10.1.2.0/20".parse().unwrap()).to_string(),
        "1.10.in-addr.arpa."
    );
    assert_eq!(
        reverse_zone_v6("fd64:d15c::/64".parse().unwrap()).to_string(),
        "0.0.0.0.0.0.0.0.c.5.1.d.4.6.d.f.ip6.arpa."
    );
}
