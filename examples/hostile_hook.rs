//! A hostile local process, for the black-box tests of what hooks can and cannot do to each
//! other: it speaks the hook protocol, maps the live region, and lies.
//!
//! ```text
//! hostile_hook SOCKET MAGIC PORT SECS RATE [--scribble] [--slots N] BACKEND...
//! ```
//!
//! For SECS seconds, RATE times a second: a `Failed` message over SOCKET for each BACKEND (a
//! connect to MAGIC:PORT that "failed" there), and a `Failed` report in the live region's ring
//! for each of the first N backend slots (default 16: the ones a small table uses). With `--scribble`, each round also writes junk over every round-robin
//! turn and in-flight counter. Prints what it sent. Bounded by SECS (at most 600).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use discotech_shm::Mapping;
use discotech_wire::live::{Entry, Live, Report};
use discotech_wire::{Kind, MSG_LEN, Request, to_mapped};

struct Args {
    socket: String,
    magic: IpAddr,
    port: u16,
    secs: u64,
    rate: u32,
    scribble: bool,
    slots: u32,
    backends: Vec<SocketAddr>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut next = |what: &str| it.next().ok_or(format!("missing {what}"));
    let socket = next("SOCKET")?;
    let magic = next("MAGIC")?.parse().map_err(|e| format!("MAGIC: {e}"))?;
    let port = next("PORT")?.parse().map_err(|e| format!("PORT: {e}"))?;
    let secs: u64 = next("SECS")?.parse().map_err(|e| format!("SECS: {e}"))?;
    let rate: u32 = next("RATE")?.parse().map_err(|e| format!("RATE: {e}"))?;
    let mut scribble = false;
    let mut slots = 16;
    let mut backends = Vec::new();
    while let Some(a) = it.next() {
        if a == "--scribble" {
            scribble = true;
        } else if a == "--slots" {
            let n = it.next().ok_or("--slots needs a number")?;
            slots = n.parse().map_err(|e| format!("--slots {n}: {e}"))?;
        } else {
            backends.push(a.parse().map_err(|e| format!("BACKEND {a}: {e}"))?);
        }
    }
    Ok(Args {
        socket,
        magic,
        port,
        secs: secs.min(600),
        rate: rate.clamp(1, 10_000),
        scribble,
        slots,
        backends,
    })
}

/// Asks for the live region and maps it writable, as every hook may.
fn map_live(socket: &str) -> Result<Mapping, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{socket}: {e}"))?;
    let mut req = Request::pick(1, IpAddr::from([0, 0, 0, 0]), 0, 0, 0);
    req.kind = Kind::MapLive;
    s.write_all(&req.encode()).map_err(|e| e.to_string())?;
    let mut buf = [0u8; MSG_LEN];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match discotech_shm::recv_with_owned_fd(s.as_fd(), &mut buf) {
            Ok((n, Some(fd))) if n == MSG_LEN => {
                let bytes = discotech_shm::file_size(fd.as_fd())
                    .map_err(|e| format!("fstat: errno {e}"))?;
                let words = usize::try_from(bytes / 4).map_err(|e| e.to_string())?;
                return Mapping::map(fd.as_fd(), words, true)
                    .map_err(|e| format!("mmap: errno {e}"));
            }
            Ok((0, _)) => return Err("the daemon closed the socket".into()),
            Ok(_) => return Err("a reply without the live region".into()),
            Err(libc::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(format!("recvmsg: errno {e}")),
        }
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hostile_hook: {e}");
            return ExitCode::from(2);
        }
    };
    let mapping = match map_live(&args.socket) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("hostile_hook: cannot map the live region: {e}");
            return ExitCode::from(1);
        }
    };
    let Some(live) = Live::new(mapping.words()) else {
        eprintln!("hostile_hook: the live region has no valid header");
        return ExitCode::from(1);
    };
    let mut sock = match UnixStream::connect(&args.socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hostile_hook: {}: {e}", args.socket);
            return ExitCode::from(1);
        }
    };
    sock.set_nonblocking(true).ok();
    let (mut socket_reports, mut ring_reports, mut scribbles) = (0u64, 0u64, 0u64);
    let every = Duration::from_secs(1) / args.rate;
    let end = Instant::now() + Duration::from_secs(args.secs);
    let mut junk = 0x9e37_79b9_u32;
    let mut id = 0u32;
    while Instant::now() < end {
        for b in &args.backends {
            id = id.wrapping_add(1);
            let mut req = Request::pick(id, args.magic, args.port, 0, std::process::id());
            req.kind = Kind::Failed;
            req.backend = to_mapped(b.ip());
            req.backend_port = b.port();
            req.errno = 111;
            if sock.write_all(&req.encode()).is_ok() {
                socket_reports += 1;
            }
        }
        // The daemon answers a Failed message with a new pick: read and drop them.
        let mut sink = [0u8; 4096];
        while matches!(sock.read(&mut sink), Ok(n) if n > 0) {}
        let slots = u32::try_from(live.backend_slots())
            .unwrap_or(0)
            .min(args.slots);
        for slot in 0..slots {
            let entry = Entry {
                report: Report::Failed { errno: 111 },
                slot,
                remote_port: args.port,
                counted: false,
            };
            if live.report(&entry)
                && let Some(head) = live.head_word()
            {
                discotech_shm::futex_wake(head);
            }
            ring_reports += 1;
        }
        if args.scribble {
            for slot in 0..u32::try_from(live.rr_slots()).unwrap_or(0) {
                junk = junk.rotate_left(7) ^ 0x5bd1_e995;
                if let Some(w) = live.rr(slot) {
                    w.store(junk, Ordering::Relaxed);
                }
            }
            for slot in 0..u32::try_from(live.backend_slots()).unwrap_or(0) {
                junk = junk.rotate_left(7) ^ 0x5bd1_e995;
                if let Some(w) = live.in_flight(slot) {
                    w.store(junk, Ordering::Relaxed);
                }
            }
            scribbles += 1;
        }
        std::thread::sleep(every);
    }
    println!("socket_reports={socket_reports} ring_reports={ring_reports} scribbles={scribbles}");
    ExitCode::SUCCESS
}
