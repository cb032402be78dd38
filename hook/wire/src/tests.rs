//! Golden bytes: if one of these changes, the protocol changed and VERSION must too.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;

const PICK_GOLDEN: [u8; MSG_LEN] = [
    b'D', b'T', 1, 1, 0, 0, 0, 7, // magic, version, kind pick, id 7
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 77, 0, 9, // ::ffff:127.77.0.9
    0x1f, 0x90, 3, 0, 0, 0, 0x30,
    0x39, // port 8080, flags inet6|nonblock, attempt 0, pid 12345
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // backend (none)
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // backend port, errno, reserved
];

#[test]
fn pick_request_golden_bytes() {
    let magic = IpAddr::V4(Ipv4Addr::new(127, 77, 0, 9));
    let req = Request::pick(7, magic, 8080, FLAG_INET6 | FLAG_NONBLOCK, 12345);
    assert_eq!(req.encode(), PICK_GOLDEN);
    assert_eq!(Request::decode(&PICK_GOLDEN), Ok(req));
    assert_eq!(req.magic_ip(), magic);
}

#[test]
fn failed_request_golden_bytes() {
    let mut req = Request::pick(0x0102_0304, "fd64:d15c::5".parse().unwrap(), 443, 0, 1);
    req.kind = Kind::Failed;
    req.attempt = 2;
    req.backend = to_mapped("127.0.0.3".parse().unwrap());
    req.backend_port = 8443;
    req.errno = 111;
    let b = req.encode();
    let want: [u8; MSG_LEN] = [
        b'D', b'T', 1, 2, 1, 2, 3, 4, //
        0xfd, 0x64, 0xd1, 0x5c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, //
        0x01, 0xbb, 0, 2, 0, 0, 0, 1, //
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 3, //
        0x20, 0xfb, 0, 111, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(b, want);
    let back = Request::decode(&b).unwrap();
    assert_eq!(back, req);
    assert_eq!(back.backend_addr(), "127.0.0.3:8443".parse().unwrap());
}

#[test]
fn reply_golden_bytes() {
    let reply = Reply::ok(
        7,
        "127.0.0.2:8081".parse().unwrap(),
        FLAG_REPORT_DONE,
        0x0102,
    );
    let want: [u8; MSG_LEN] = [
        b'D', b'T', 1, 0x81, 0, 0, 0, 7, //
        0, 1, 0x1f, 0x91, // status ok, flags report-done, port 8081
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2, //
        0, 0, 0, 0, 0, 0, 1, 2, // generation
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(reply.encode(), want);
    let back = Reply::decode(&want).unwrap();
    assert_eq!(back, reply);
    assert_eq!(back.backend_addr(), "127.0.0.2:8081".parse().unwrap());

    let refused = Reply::refuse(9, Status::NoBackend, 3).encode();
    assert_eq!(
        &refused[..12],
        &[b'D', b'T', 1, 0x81, 0, 0, 0, 9, 2, 0, 0, 0]
    );
    assert_eq!(Reply::decode(&refused).unwrap().status, Status::NoBackend);
}

#[test]
fn malformed_messages_are_rejected_not_misread() {
    let mut b = PICK_GOLDEN;
    b[0] = b'X';
    assert_eq!(Request::decode(&b), Err(DecodeError::BadMagic));
    let mut b = PICK_GOLDEN;
    b[2] = 2;
    assert_eq!(Request::decode(&b), Err(DecodeError::Version(2)));
    assert_eq!(version_of(&b), 2);
    let mut b = PICK_GOLDEN;
    b[3] = 9;
    assert_eq!(Request::decode(&b), Err(DecodeError::Kind(9)));
    // A request is not a reply and vice versa.
    assert_eq!(Reply::decode(&PICK_GOLDEN), Err(DecodeError::Kind(1)));
    let mut r = Reply::refuse(1, Status::Ok, 0).encode();
    assert_eq!(Request::decode(&r), Err(DecodeError::Kind(0x81)));
    r[8] = 200;
    assert_eq!(Reply::decode(&r), Err(DecodeError::Status(200)));
    // Every byte pattern decodes or errors; none panics.
    for i in 0..MSG_LEN {
        for v in [0u8, 1, 0x7f, 0x81, 0xff] {
            let mut b = PICK_GOLDEN;
            b[i] = v;
            let _ = Request::decode(&b);
            let _ = Reply::decode(&b);
        }
    }
}

#[test]
fn mapped_addresses_round_trip() {
    let v4: IpAddr = "10.1.2.3".parse().unwrap();
    assert_eq!(
        to_mapped(v4),
        "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap()
    );
    assert_eq!(from_mapped(to_mapped(v4)), v4);
    let v6: IpAddr = "fd64::1".parse().unwrap();
    assert_eq!(from_mapped(to_mapped(v6)), v6);
}

#[test]
fn range_membership() {
    let net = Ipv4Addr::new(127, 77, 0, 0);
    assert!(v4_in(Ipv4Addr::new(127, 77, 255, 1), net, 16));
    assert!(!v4_in(Ipv4Addr::new(127, 78, 0, 1), net, 16));
    assert!(v4_in(Ipv4Addr::new(1, 2, 3, 4), net, 0));
    assert!(v4_in(net, net, 32));
    assert!(!v4_in(Ipv4Addr::new(127, 77, 0, 1), net, 32));
    let net6: Ipv6Addr = "fd64:d15c::".parse().unwrap();
    assert!(v6_in("fd64:d15c::1:2".parse().unwrap(), net6, 64));
    assert!(!v6_in("fd64:d15d::1".parse().unwrap(), net6, 64));
    assert!(v6_in("::1".parse().unwrap(), net6, 0));
}

#[test]
fn map_live_request_golden_bytes() {
    let mut req = Request::pick(9, "127.77.0.9".parse().unwrap(), 0, 0, 1);
    req.kind = Kind::MapLive;
    let b = req.encode();
    assert_eq!(&b[..8], &[b'D', b'T', 1, 4, 0, 0, 0, 9]);
    assert_eq!(Request::decode(&b).unwrap().kind, Kind::MapLive);
}

#[test]
fn hash_key_sits_in_bytes_52_to_60_and_old_requests_carry_zero() {
    let mut req = Request::pick(7, "127.77.0.1".parse().unwrap(), 80, FLAG_HASH_KEY, 42);
    req.hash_key = 0x0102_0304_0506_0708;
    let b = req.encode();
    assert_eq!(&b[52..60], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&b[60..], &[0, 0, 0, 0]);
    assert_eq!(Request::decode(&b), Ok(req));
    assert_eq!(Request::decode(&PICK_GOLDEN).map(|r| r.hash_key), Ok(0));
    assert_eq!(hash_key(b"tenant-a"), hash_key(b"tenant-a"));
    assert_ne!(hash_key(b"tenant-a"), hash_key(b"tenant-b"));
}

#[test]
fn done_golden_bytes_carry_latency_and_the_pending_local_port() {
    let mut done = Request::pick(9, "127.77.0.1".parse().unwrap(), 80, FLAG_PENDING, 42);
    done.kind = Kind::Done;
    done.backend = to_mapped("127.0.0.2".parse().unwrap());
    done.backend_port = 8080;
    done.errno = 40_000; // the caller's local port
    done.latency_us = 1_234_567;
    let b = done.encode();
    assert_eq!(b[3], 3, "kind done");
    assert_eq!(b[26], FLAG_PENDING);
    assert_eq!(&b[50..52], &40_000u16.to_be_bytes());
    assert_eq!(&b[60..64], &[0x00, 0x12, 0xd6, 0x87]);
    assert_eq!(Request::decode(&b), Ok(done));
    // Hooks that predate the field send zero: "not measured".
    assert_eq!(Request::decode(&PICK_GOLDEN).map(|r| r.latency_us), Ok(0));
}

#[test]
fn prefetch_golden_bytes_request_kind_5_and_the_reply_carries_buffer_defaults() {
    let mut req = Request::pick(3, "127.77.0.9".parse().unwrap(), 80, FLAG_INET6, 1);
    req.kind = Kind::Prefetch;
    let b = req.encode();
    assert_eq!(&b[..8], &[b'D', b'T', 1, 5, 0, 0, 0, 3]);
    assert_eq!(Request::decode(&b), Ok(req));

    let mut reply = Reply::ok(3, "127.0.0.2:8080".parse().unwrap(), FLAG_HANDED_OVER, 1);
    reply.rcvbuf = 131_072;
    reply.sndbuf = 16_384;
    let b = reply.encode();
    assert_eq!(&b[8..10], &[0, 2], "status ok, flag handed over");
    assert_eq!(&b[36..44], &[0, 2, 0, 0, 0, 0, 0x40, 0]);
    assert_eq!(&b[44..], &[0; 20]);
    assert_eq!(Reply::decode(&b), Ok(reply));
    // A reply of a daemon that predates them reads as "no defaults known".
    let old = Reply::refuse(3, Status::NoBackend, 1).encode();
    assert_eq!(
        Reply::decode(&old).map(|r| (r.rcvbuf, r.sndbuf)),
        Ok((0, 0))
    );
}
