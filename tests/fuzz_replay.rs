//! Replays every kept fuzz input (`fuzz/corpus/<target>/`, the crash inputs kept in
//! `fuzz/regressions/<target>/`, and any `crash-*` left in `fuzz/artifacts/<target>/`) through the
//! fuzz targets' bodies in `discotech::fuzz`, on stable and in seconds, so what the fuzzers found
//! stays fixed without nightly. The fuzzing itself is `cargo +nightly fuzz run` (see
//! docs/reliability.md).
//!
//! `write_seed_corpora` (ignored) writes the hand-made seed inputs the corpora started from.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use discotech::fuzz::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files kept for `target`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir();
    let mut files = Vec::new();
    for (sub, prefix) in [("corpus", ""), ("regressions", ""), ("artifacts", "crash-")] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_file() && name.starts_with(prefix) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_kept_fuzz_input_replays_cleanly() {
    let mut failed = Vec::new();
    let mut total = 0;
    for (target, body) in TARGETS {
        let files = inputs(target);
        assert!(
            !files.is_empty(),
            "no corpus for fuzz target {target} in {}",
            fuzz_dir().display()
        );
        total += files.len();
        for file in files {
            let data = match std::fs::read(&file) {
                Ok(data) => data,
                // A fuzzer running beside us reduced it away meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("{}: {e}", file.display()),
            };
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                failed.push(file);
            }
        }
    }
    assert!(total >= TARGETS.len());
    assert!(failed.is_empty(), "fuzz inputs that fail: {failed:#?}");
}

#[test]
fn every_target_has_a_cargo_fuzz_binary_and_no_binary_lacks_a_target() {
    let mut binaries: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    binaries.sort();
    let mut targets: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    targets.sort();
    assert_eq!(binaries, targets);
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for t in &targets {
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{t}.rs\"")),
            "{t} missing from fuzz/Cargo.toml"
        );
    }
}

/// Writes the seed inputs into `fuzz/corpus/<target>/seed-*`: real queries and replies built with
/// hickory, golden hook messages, tables and live regions built with the wire crate's own
/// encoders, and every config and zone file the repository ships or documents.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the seeds change"]
fn write_seed_corpora() {
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    for (name, bytes) in seeds::queries() {
        seeds.push(("dns_request", name, bytes));
    }
    for (name, bytes) in seeds::replies() {
        seeds.push(("dns_reply", name, bytes));
    }
    for (name, bytes) in seeds::hook_messages() {
        seeds.push(("hook_messages", name, bytes));
    }
    for (name, bytes) in seeds::tables() {
        seeds.push(("hook_table", name, bytes));
    }
    for (name, bytes) in seeds::live_regions() {
        seeds.push(("hook_live", name, bytes));
    }
    for (name, text, is_zone) in seeds::toml_files() {
        seeds.push((
            if is_zone { "zone" } else { "config" },
            name,
            text.into_bytes(),
        ));
    }
    for (name, bytes) in seeds::zk_nodes() {
        seeds.push(("zk_node", name, bytes));
    }
    for (target, name, bytes) in &seeds {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
    // Every target got seeds.
    for (target, body) in TARGETS {
        assert!(seeds.iter().any(|(t, _, _)| t == target), "{target}");
        for (_, _, bytes) in seeds.iter().filter(|(t, _, _)| t == target) {
            body(bytes);
        }
    }
}

mod seeds {
    use super::*;
    use discotech_wire::live::{self, Entry, Live, Report};
    use discotech_wire::table::build::{self, AreaInfo, Backend, PickSet, Service};
    use discotech_wire::table::{self, Policy, Standing};
    use discotech_wire::{FLAG_HASH_KEY, FLAG_INET6, Kind, Reply, Request, Status, to_mapped};
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, NULL, SOA, SRV, TXT};
    use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn query(id: u16, qname: &str, t: RecordType, edns: Option<u16>) -> Message {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), t));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m
    }

    pub fn queries() -> Vec<(String, Vec<u8>)> {
        use RecordType::*;
        let mut out = Vec::new();
        let plain: &[(&str, RecordType, Option<u16>)] = &[
            ("web.disco.", A, None),
            ("WeB.DiScO.", A, Some(1232)),
            ("web.svc.internal.", AAAA, Some(4096)),
            ("web.disco.", SRV, Some(1232)),
            ("_grpc._tcp.web.disco.", SRV, None),
            ("_tcp.web.disco.", SRV, None),
            ("big.disco.", SRV, None),
            ("big.disco.", SRV, Some(1232)),
            ("127-0-0-2.web.disco.", A, None),
            ("fd00--3.web.disco.", AAAA, None),
            ("2.1.77.127.in-addr.arpa.", PTR, None),
            (
                "2.0.0.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.5.1.d.4.6.d.f.ip6.arpa.",
                PTR,
                None,
            ),
            ("disco.", SOA, None),
            ("disco.", NS, None),
            ("web.disco.", ANY, None),
            ("api.disco.", AAAA, None),
            ("nope.disco.", A, Some(512)),
            ("www.example.com.", A, None),
        ];
        for (i, (q, t, edns)) in plain.iter().enumerate() {
            let bytes = query(0x1000 + i as u16, q, *t, *edns).to_vec().unwrap();
            out.push((format!("{}-{t}", q.trim_end_matches('.')), bytes));
        }
        let mut chaos = query(7, "web.disco.", TXT, None);
        chaos.queries[0].set_query_class(DNSClass::CH);
        out.push(("chaos-class".into(), chaos.to_vec().unwrap()));
        let mut v1 = query(8, "web.disco.", A, Some(1232));
        if let Some(e) = v1.edns.as_mut() {
            e.set_version(1);
            e.set_dnssec_ok(true);
        }
        out.push(("edns-version-1".into(), v1.to_vec().unwrap()));
        let mut notify = query(9, "disco.", SOA, None);
        notify.metadata.op_code = OpCode::Notify;
        out.push(("notify".into(), notify.to_vec().unwrap()));
        let mut two = query(10, "web.disco.", A, None);
        two.add_query(Query::query(name("api.disco."), A));
        out.push(("two-questions".into(), two.to_vec().unwrap()));
        let mut response = query(11, "web.disco.", A, None);
        response.metadata.message_type = MessageType::Response;
        out.push(("a-response".into(), response.to_vec().unwrap()));
        let whole = query(12, "web.disco.", A, None).to_vec().unwrap();
        out.push(("truncated".into(), whole[..whole.len() - 3].to_vec()));
        // A question whose name is a compression pointer into the header.
        let mut pointer = whole[..12].to_vec();
        pointer.extend_from_slice(&[0xc0, 0x04, 0, 1, 0, 1]);
        out.push(("pointer-question".into(), pointer));
        out
    }

    const REPLY_ID: u16 = 0x5a5a;
    const CASED: &str = "wWw.ExAmplE.cOm.";

    fn reply(code: ResponseCode) -> Message {
        let mut m = Message::response(REPLY_ID, OpCode::Query);
        m.metadata.response_code = code;
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_query(Query::query(name(CASED), RecordType::A));
        m
    }

    fn rec(owner: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(name(owner), ttl, data)
    }

    pub fn replies() -> Vec<(String, Vec<u8>)> {
        let a = |last: u8| RData::A(A::new(192, 0, 2, last));
        let soa = RData::SOA(SOA::new(
            name("ns1.example.com."),
            name("hostmaster.example.com."),
            2024,
            3600,
            600,
            86400,
            300,
        ));
        let mut out = Vec::new();
        let mut ok = reply(ResponseCode::NoError);
        ok.add_answer(rec(CASED, 300, a(10)));
        out.push(("answer".into(), ok.clone()));
        let mut chain = reply(ResponseCode::NoError);
        chain.add_answer(rec(
            CASED,
            60,
            RData::CNAME(CNAME(name("cdn.example.net."))),
        ));
        chain.add_answer(rec("cdn.example.net.", 999_999, a(11)));
        chain.add_answer(rec("web.disco.", 60, a(66)));
        chain.add_answer(rec("unrelated.example.org.", 60, a(67)));
        chain.add_authority(rec("example.net.", 60, RData::NS(NS(name("ns.disco.")))));
        chain.add_additional(rec("ns.disco.", 60, a(68)));
        out.push(("cname-chain-and-poison".into(), chain));
        let mut nx = reply(ResponseCode::NXDomain);
        nx.add_authority(rec("example.com.", 300, soa.clone()));
        out.push(("nxdomain".into(), nx));
        let mut referral = reply(ResponseCode::NoError);
        referral.add_authority(rec(
            "example.com.",
            3600,
            RData::NS(NS(name("ns1.example.com."))),
        ));
        referral.add_additional(rec("ns1.example.com.", 3600, a(53)));
        referral.add_additional(rec(
            "ns1.example.com.",
            3600,
            RData::AAAA(AAAA("2001:db8::53".parse().unwrap())),
        ));
        referral.add_additional(rec("evil.example.", 3600, a(99)));
        out.push(("referral-with-glue".into(), referral));
        let mut dname = reply(ResponseCode::NoError);
        // hickory has no DNAME type: it carries one as raw RDATA (the target in wire form).
        let target = b"\x07example\x03net\x00".to_vec();
        dname.add_answer(rec(
            "example.com.",
            60,
            RData::Unknown {
                code: RecordType::DNAME,
                rdata: NULL::with(target),
            },
        ));
        dname.add_answer(rec(
            CASED,
            60,
            RData::CNAME(CNAME(name("www.example.net."))),
        ));
        dname.add_answer(rec("www.example.net.", 60, a(12)));
        out.push(("dname".into(), dname));
        let mut srv = reply(ResponseCode::NoError);
        srv.add_answer(rec(
            CASED,
            60,
            RData::SRV(SRV::new(0, 1, 443, name("host.example.com."))),
        ));
        srv.add_additional(rec("host.example.com.", 60, a(13)));
        srv.add_answer(rec(
            CASED,
            60,
            RData::TXT(TXT::new(vec!["v=spf1 -all".into()])),
        ));
        out.push(("srv-and-txt".into(), srv));
        let mut tc = reply(ResponseCode::NoError);
        tc.metadata.truncation = true;
        out.push(("truncated".into(), tc));
        let mut wrong_id = ok.clone();
        wrong_id.metadata.id = 0x1111;
        out.push(("wrong-id".into(), wrong_id));
        let mut servfail = reply(ResponseCode::ServFail);
        let mut e = Edns::new();
        e.set_max_payload(4096);
        servfail.set_edns(e);
        out.push(("servfail-edns".into(), servfail));
        out.into_iter()
            .map(|(n, m)| (n, m.to_vec().unwrap()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    pub fn hook_messages() -> Vec<(String, Vec<u8>)> {
        let pick = Request::pick(1, ip("127.77.0.9"), 9000, FLAG_INET6, 4242);
        let mut failed = pick;
        failed.kind = Kind::Failed;
        failed.attempt = 1;
        failed.backend = to_mapped(ip("127.0.0.2"));
        failed.backend_port = 8080;
        failed.errno = 111;
        let mut done = failed;
        done.kind = Kind::Done;
        done.errno = 0;
        done.latency_us = 850;
        let mut hashed = pick;
        hashed.flags |= FLAG_HASH_KEY;
        hashed.hash_key = discotech_wire::hash_key(b"session-42");
        let mut map = pick;
        map.kind = Kind::MapLive;
        let ok = Reply::ok(1, sock("[fd00::3]:8081"), 1, 7);
        let refused = Reply::refuse(2, Status::UnknownService, 7);
        let mut stream = Vec::new();
        for m in [pick, failed, done, hashed, map] {
            stream.extend_from_slice(&m.encode());
        }
        stream.extend_from_slice(&ok.encode());
        stream.extend_from_slice(&refused.encode());
        let mut v2 = pick.encode();
        v2[2] = 2;
        vec![
            ("pick".into(), pick.encode().to_vec()),
            ("failed".into(), failed.encode().to_vec()),
            ("done".into(), done.encode().to_vec()),
            ("reply-ok".into(), ok.encode().to_vec()),
            ("reply-refused".into(), refused.encode().to_vec()),
            ("version-2".into(), v2.to_vec()),
            ("stream".into(), stream),
        ]
    }

    fn backend(addr: &str, weight: u16, priority: u16, slot: u32, standing: Standing) -> Backend {
        Backend {
            addr: sock(addr),
            weight,
            priority,
            slot,
            ports: vec![9090],
            standing,
        }
    }

    fn set(weights: &[u32], maglev: bool) -> PickSet {
        PickSet {
            candidates: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| (i as u32, w))
                .collect(),
            schedule: build::smooth_schedule(weights, 4096),
            maglev: if maglev {
                (0..13u16).map(|i| i % weights.len() as u16).collect()
            } else {
                Vec::new()
            },
        }
    }

    /// A table file image with one service at 127.77.0.9 published, as little-endian words.
    fn table_image(policy: Policy) -> Vec<u8> {
        let record = build::service(&Service {
            name: "web",
            policy,
            flags: 0,
            rr_slot: 3,
            client_ports: vec![9000],
            backends: vec![
                backend("127.0.0.2:8080", 1, 0, 10, Standing::Candidate),
                backend("127.0.0.3:8080", 3, 0, 11, Standing::Candidate),
                backend("[fd00::4]:8080", 2, 0, 12, Standing::Candidate),
                backend("127.0.0.5:8080", 1, 1, 13, Standing::LowerTier),
                backend("127.0.0.6:8080", 1, 0, NO_SLOT, Standing::Out),
            ],
            v4: set(&[1, 3], policy == Policy::Maglev),
            v6: Some(set(&[1, 3, 2], policy == Policy::Maglev)),
        });
        let magics = [ip("127.77.0.9"), ip("fd64:d15c::9")];
        let info = AreaInfo {
            generation: 7,
            magic_v4: ("127.77.0.0".parse().unwrap(), 16),
            magic_v6: Some(("fd64:d15c::".parse().unwrap(), 64)),
            live_epoch: 1,
        };
        let area = build::area(&info, &[(&magics[..], &record[..])]);
        let area_words = area.len() + 8;
        let mem: Vec<AtomicU32> = (0..table::table_words(area_words, 16))
            .map(|_| AtomicU32::new(0))
            .collect();
        for (w, h) in mem.iter().zip(table::header(area_words as u32, 16, 1)) {
            w.store(h, Ordering::Relaxed);
        }
        table::publish(&mem, &area).unwrap();
        table::set_stat(&mem, area_words, 11, 0, 4);
        table::set_stat(&mem, area_words, 12, 1, 900);
        table::set_stat(&mem, area_words, 12, 2, table::STAT_MEASURED);
        mem.iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect()
    }

    const NO_SLOT: u32 = table::NO_SLOT;

    /// The 40 bytes of a `hook_table` input before the table.
    fn ask(dest: IpAddr, port: u16, flags: u8, rand: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(&to_mapped(dest).octets());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&[flags, 0]);
        b.extend_from_slice(&42u64.to_be_bytes());
        b.extend_from_slice(&rand.to_be_bytes());
        b.extend_from_slice(&5u32.to_be_bytes());
        b
    }

    pub fn tables() -> Vec<(String, Vec<u8>)> {
        let policies = [
            Policy::RoundRobin,
            Policy::WeightedRoundRobin,
            Policy::Random,
            Policy::P2c,
            Policy::P2cEwma,
            Policy::LeastConn,
            Policy::Maglev,
        ];
        let mut out = Vec::new();
        for (i, policy) in policies.into_iter().enumerate() {
            let image = table_image(policy);
            let (dest, flags) = match i % 3 {
                0 => (ip("127.77.0.9"), 2 | 8),
                1 => (ip("fd64:d15c::9"), 1 | 2 | 8 | 16),
                _ => (ip("127.77.0.9"), 8 | 16),
            };
            let mut input = ask(dest, 9000 + (i as u16 % 2), flags, 0x0123_4567_89ab_cdef);
            input.extend_from_slice(&image);
            out.push((format!("{policy:?}"), input));
        }
        let mut unknown = ask(ip("127.77.0.10"), 80, 2 | 8, 1);
        unknown.extend_from_slice(&table_image(Policy::RoundRobin));
        out.push(("unknown-service".into(), unknown));
        // The header alone, to be repaired (flag 4): the fuzzer fills in the areas.
        let mut bare = ask(ip("127.77.0.9"), 80, 4 | 8, 1);
        bare.extend_from_slice(&table_image(Policy::Random)[..64]);
        bare.resize(bare.len() + 4 * 64, 0);
        out.push(("repaired-header".into(), bare));
        out
    }

    pub fn live_regions() -> Vec<(String, Vec<u8>)> {
        let (rr, backends, ring) = (4u32, 8u32, 8u32);
        let words = live::live_words(rr as usize, backends as usize, ring as usize);
        let mem: Vec<AtomicU32> = (0..words).map(|_| AtomicU32::new(0)).collect();
        for (w, h) in mem.iter().zip(live::header(rr, backends, ring, 7)) {
            w.store(h, Ordering::Relaxed);
        }
        let l = Live::new(&mem).unwrap();
        let reports = [
            Report::Failed { errno: 111 },
            Report::Pending { local_port: 40000 },
            Report::Connected { latency_us: 850 },
        ];
        for (i, report) in reports.into_iter().cycle().take(11).enumerate() {
            l.report(&Entry {
                report,
                slot: i as u32 % 8,
                remote_port: 8080,
                counted: i % 2 == 0,
            });
        }
        if let Some(c) = l.in_flight(2) {
            c.store(u32::MAX, Ordering::Relaxed);
        }
        let region: Vec<u8> = mem
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        // flags, sizes, report (kind, errno, local port, remote port, latency, slot, counted), tail
        let head = |flags: u8, tail: u32| {
            let mut b = vec![
                flags, 4, 8, 3, 0, 0, 111, 0x9c, 0x40, 0x1f, 0x90, 0, 0, 3, 0,
            ];
            b.extend_from_slice(&[0, 0, 0, 5, 1]);
            b.extend_from_slice(&tail.to_be_bytes());
            b
        };
        let mut taken = head(0, 5);
        taken.extend_from_slice(&region);
        let mut lapped = head(0, 0);
        lapped.extend_from_slice(&region);
        let mut built = head(1, 0);
        built.extend_from_slice(&[0; 16]);
        vec![
            ("ring".into(), taken),
            ("lapped".into(), lapped),
            ("built".into(), built),
        ]
    }

    /// Every TOML file and TOML block the repository ships or documents: (name, text, is a zone).
    pub fn toml_files() -> Vec<(String, String, bool)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut out = Vec::new();
        for f in [
            "packaging/discotech.toml",
            "packaging/examples/discotech-beside-resolved.toml",
            "zones/example.toml",
        ] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            let stem = f.replace('/', "-");
            out.push((stem, text.clone(), f.starts_with("zones")));
        }
        let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        docs.push(root.join("README.md"));
        docs.push(root.join("src/discovery/source/zone.rs"));
        docs.sort();
        for doc in docs {
            let text = std::fs::read_to_string(&doc).unwrap();
            let stem = doc.file_stem().unwrap().to_string_lossy().into_owned();
            let lines: Vec<&str> = text
                .lines()
                .map(|l| {
                    l.strip_prefix("//! ")
                        .or(l.strip_prefix("//!"))
                        .unwrap_or(l)
                })
                .collect();
            let mut block: Option<Vec<&str>> = None;
            let mut n = 0;
            for line in lines {
                match (&mut block, line.trim()) {
                    (None, "```toml") => block = Some(Vec::new()),
                    (Some(b), "```") => {
                        let body = b.join("\n") + "\n";
                        let is_zone = body.contains("[services.");
                        n += 1;
                        out.push((format!("{stem}-{n}"), body, is_zone));
                        block = None;
                    }
                    (Some(b), _) => b.push(line),
                    _ => {}
                }
            }
        }
        out.push(("empty".into(), String::new(), false));
        out
    }

    /// 1 byte layout (0 auto, 1 serverset, 2 curator, 3 nerve, 4 host-port), 1 name length,
    /// the name, the data.
    pub fn zk_nodes() -> Vec<(String, Vec<u8>)> {
        let node = |format: u8, name: &str, data: &str| {
            let mut b = vec![format, name.len() as u8];
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(data.as_bytes());
            b
        };
        vec![
            (
                "serverset".into(),
                node(
                    1,
                    "member_0000000001",
                    r#"{"serviceEndpoint":{"host":"10.0.0.1","port":31000},"additionalEndpoints":{"http":{"host":"10.0.0.1","port":31001},"other":{"host":"10.0.0.9","port":1}},"status":"ALIVE","shard":3}"#,
                ),
            ),
            (
                "serverset-dead".into(),
                node(
                    0,
                    "member_2",
                    r#"{"serviceEndpoint":{"host":"::1","port":80},"status":"STARTING"}"#,
                ),
            ),
            (
                "curator".into(),
                node(
                    2,
                    "8c2f",
                    r#"{"name":"web","id":"8c2f","address":"10.0.0.2","port":8080,"sslPort":8443,"payload":{"x":1},"registrationTimeUTC":1700000000000,"serviceType":"DYNAMIC","uriSpec":null}"#,
                ),
            ),
            (
                "curator-auto".into(),
                node(
                    0,
                    "x",
                    r#"{"address":"[fd00::2]","port":null,"sslPort":8443,"enabled":true}"#,
                ),
            ),
            (
                "nerve".into(),
                node(
                    3,
                    "i-abc_web",
                    r#"{"host":"10.0.0.3","port":9000,"name":"i-abc","weight":3,"labels":{"az":"a"}}"#,
                ),
            ),
            ("host-port".into(), node(4, "10.0.0.4:80", "")),
            (
                "host-port-v6-auto".into(),
                node(0, "[fd00::1]:443", "free form"),
            ),
            ("not-json".into(), node(1, "m", "{not json")),
        ]
    }
}
