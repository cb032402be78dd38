//! The byte formats shared by the connect hook and the daemon, defined once so the two sides
//! cannot drift: the shared routing table hooks pick from ([`table`], with the pick itself in
//! [`pick`]), the live region of shared counters and reports ([`live`]), and the fixed-size
//! messages on the hook socket ([`Request`], [`Reply`]).
//!
//! Everything here is `no_std`, allocation-free and panic-free: the hook decodes these bytes
//! inside other people's processes, possibly from a signal handler.
//!
//! # Messages (version 1)
//! Every message in either direction is exactly [`MSG_LEN`] = 64 bytes, integers big-endian,
//! addresses as 16 IPv6 bytes (IPv4 as v4-mapped `::ffff:a.b.c.d`). Reserved bytes are sent as
//! zero and ignored on receipt.
//!
//! Request (hook -> daemon):
//! ```text
//!  0  2  "DT"
//!  2  1  version (1)
//!  3  1  kind: 1 pick, 2 failed (report a backend and pick another), 3 done (no reply),
//!          4 map the live region (the reply carries its descriptor, see [`live`]),
//!          5 prefetch: an established connection for this connect, if the daemon pools one
//!  4  4  id, echoed in the reply
//!  8 16  magic address the caller connected to
//! 24  2  client port
//! 26  1  flags: bit 0 the caller's socket is AF_INET6, bit 1 it is non-blocking (optional:
//!          the hook leaves it unset rather than spend a system call; the daemon ignores it)
//! 27  1  attempt (0 for the first pick of a connect)
//! 28  4  caller pid as the caller sees it (informational; the daemon trusts SO_PEERCRED)
//! 32 16  backend address (failed, done; zero for pick)
//! 48  2  backend port (failed, done)
//! 50  2  errno the backend connect failed with (failed); the local port of the caller's socket
//!          (done with FLAG_PENDING)
//! 52  8  affinity key (with FLAG_HASH_KEY)
//! 60  4  connect latency in microseconds (done; 0: not measured)
//! ```
//! Request flags: bit 0 AF_INET6, bit 1 non-blocking, bit 2 `hash_key` is set, bit 3 (done)
//! the connect was still in progress when it returned, so the daemon measures it from the
//! kernel's socket table. Bytes 52..64 were reserved (zero) in the first hooks, so adding them
//! did not change the version: a zero key or latency reads as "none".
//! Reply (daemon -> hook), to pick, failed and prefetch:
//! ```text
//!  0  2  "DT"
//!  2  1  version (1)
//!  3  1  kind: 0x81 pick reply
//!  4  4  id of the request
//!  8  1  status: 0 ok, 1 unknown service, 2 no backend, 3 bad request, 4 unsupported version
//!  9  1  flags: bit 0 send a done message when the connect returns (p2c services),
//!          bit 1 (prefetch) the connected socket to the backend is attached (SCM_RIGHTS)
//! 10  2  backend port
//! 12 16  backend address
//! 28  8  snapshot generation the answer came from
//! 36  4  (prefetch) SO_RCVBUF of a new TCP socket of the daemon's, as getsockopt reads it
//! 40  4  (prefetch) SO_SNDBUF likewise: the hook copies the caller's buffer sizes only when
//!          they differ from these (the caller set them)
//! 44 20  reserved
//! ```
//! A prefetch reply without a socket (status `NoBackend`: none pooled, or none for this caller)
//! sends the hook on to its ordinary connect.
#![forbid(unsafe_code)]
#![no_std]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

extern crate alloc;

pub mod live;
pub mod pick;
pub mod table;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// The size of every message, request or reply.
pub const MSG_LEN: usize = 64;
/// First two bytes of every message.
pub const MAGIC: [u8; 2] = *b"DT";

const REPLY_KIND: u8 = 0x81;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Choose a backend for a connect to a magic address.
    Pick,
    /// The backend in the request refused or was unreachable: note it and choose another.
    Failed,
    /// The connect to the backend in the request returned; no reply is sent.
    Done,
    /// Asks for the live region: the reply carries its epoch in `generation` and the region's
    /// descriptor (SCM_RIGHTS), or status `NoBackend` without one.
    MapLive,
    /// Asks for an established connection for a connect to a prefetch service: the reply
    /// carries it ([`FLAG_HANDED_OVER`]) or has status `NoBackend`.
    Prefetch,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Pick => 1,
            Self::Failed => 2,
            Self::Done => 3,
            Self::MapLive => 4,
            Self::Prefetch => 5,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Pick),
            2 => Some(Self::Failed),
            3 => Some(Self::Done),
            4 => Some(Self::MapLive),
            5 => Some(Self::Prefetch),
            _ => None,
        }
    }
}

/// Request flag: the caller's socket is AF_INET6, so a v6 backend is usable.
pub const FLAG_INET6: u8 = 1;
/// Request flag: the caller's socket is non-blocking (informational; may be left unset).
pub const FLAG_NONBLOCK: u8 = 2;
/// Request flag: `hash_key` carries the caller's affinity key (DISCOTECH_HASH_KEY); without it
/// the daemon keys on the caller's uid.
pub const FLAG_HASH_KEY: u8 = 4;
/// Request flag (done): the connect returned EINPROGRESS; `errno` carries the local port of the
/// caller's socket so the daemon can find the connection in the kernel's socket table.
pub const FLAG_PENDING: u8 = 8;
/// Reply flag: send a [`Kind::Done`] message once the connect to the backend returns.
pub const FLAG_REPORT_DONE: u8 = 1;
/// Reply flag (prefetch): the established connection is attached to this reply.
pub const FLAG_HANDED_OVER: u8 = 2;

/// Why bytes are not a valid message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The first two bytes are not "DT".
    BadMagic,
    /// A version this crate does not speak; carries the version seen.
    Version(u8),
    /// Unknown message kind.
    Kind(u8),
    /// Unknown status code in a reply.
    Status(u8),
}

/// A message from the hook to the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub id: u32,
    /// The destination the application asked for (v4 as mapped).
    pub magic: Ipv6Addr,
    pub port: u16,
    pub flags: u8,
    pub attempt: u8,
    pub pid: u32,
    /// For [`Kind::Failed`] and [`Kind::Done`]: the backend concerned (v4 as mapped).
    pub backend: Ipv6Addr,
    pub backend_port: u16,
    /// For [`Kind::Failed`]: the errno of the failed connect. For [`Kind::Done`] with
    /// [`FLAG_PENDING`]: the local port of the caller's socket.
    pub errno: u16,
    /// With [`FLAG_HASH_KEY`]: the affinity key for hashing balancers. Bytes 52..60, zero in
    /// messages from hooks that predate it, so the version did not change.
    pub hash_key: u64,
    /// For [`Kind::Done`]: how long the connect took, in microseconds; 0 when not measured.
    /// Bytes 60..64.
    pub latency_us: u32,
}

impl Request {
    /// A pick request for a connect to `magic:port`.
    pub fn pick(id: u32, magic: IpAddr, port: u16, flags: u8, pid: u32) -> Self {
        Self {
            kind: Kind::Pick,
            id,
            magic: to_mapped(magic),
            port,
            flags,
            attempt: 0,
            pid,
            backend: Ipv6Addr::UNSPECIFIED,
            backend_port: 0,
            errno: 0,
            hash_key: 0,
            latency_us: 0,
        }
    }

    /// The magic address in its canonical form (v4 if mapped).
    pub fn magic_ip(&self) -> IpAddr {
        from_mapped(self.magic)
    }

    /// The backend named by a failed or done message, canonical.
    pub fn backend_addr(&self) -> SocketAddr {
        SocketAddr::new(from_mapped(self.backend), self.backend_port)
    }

    pub fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        header(&mut b, self.kind.to_byte(), self.id);
        put(&mut b, 8, &self.magic.octets());
        put(&mut b, 24, &self.port.to_be_bytes());
        put(&mut b, 26, &[self.flags, self.attempt]);
        put(&mut b, 28, &self.pid.to_be_bytes());
        put(&mut b, 32, &self.backend.octets());
        put(&mut b, 48, &self.backend_port.to_be_bytes());
        put(&mut b, 50, &self.errno.to_be_bytes());
        put(&mut b, 52, &self.hash_key.to_be_bytes());
        put(&mut b, 60, &self.latency_us.to_be_bytes());
        b
    }

    /// # Errors
    /// [`DecodeError`] for a wrong magic, version or kind.
    pub fn decode(b: &[u8; MSG_LEN]) -> Result<Self, DecodeError> {
        let (kind, id) = check_header(b)?;
        let kind = Kind::from_byte(kind).ok_or(DecodeError::Kind(kind))?;
        Ok(Self {
            kind,
            id,
            magic: Ipv6Addr::from(take16(b, 8)),
            port: u16::from_be_bytes(take(b, 24)),
            flags: byte(b, 26),
            attempt: byte(b, 27),
            pid: u32::from_be_bytes(take(b, 28)),
            backend: Ipv6Addr::from(take16(b, 32)),
            backend_port: u16::from_be_bytes(take(b, 48)),
            errno: u16::from_be_bytes(take(b, 50)),
            hash_key: u64::from_be_bytes(take(b, 52)),
            latency_us: u32::from_be_bytes(take(b, 60)),
        })
    }
}

/// The outcome of a pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Connect to the backend in the reply.
    Ok,
    /// The address is in the magic range but no service has it: fail the connect.
    UnknownService,
    /// The service exists but has no usable backend: fail the connect.
    NoBackend,
    /// The daemon could not make sense of the request.
    BadRequest,
    /// The daemon does not speak the request's version.
    UnsupportedVersion,
}

impl Status {
    fn to_byte(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::UnknownService => 1,
            Self::NoBackend => 2,
            Self::BadRequest => 3,
            Self::UnsupportedVersion => 4,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Ok),
            1 => Some(Self::UnknownService),
            2 => Some(Self::NoBackend),
            3 => Some(Self::BadRequest),
            4 => Some(Self::UnsupportedVersion),
            _ => None,
        }
    }
}

/// The daemon's answer to a pick or failed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub id: u32,
    pub status: Status,
    pub flags: u8,
    /// The chosen backend (v4 as mapped); unspecified unless `status` is [`Status::Ok`].
    pub backend: Ipv6Addr,
    pub backend_port: u16,
    pub generation: u64,
    /// Prefetch replies: a new TCP socket's `SO_RCVBUF` and `SO_SNDBUF` on the daemon's side.
    pub rcvbuf: u32,
    pub sndbuf: u32,
}

impl Reply {
    /// A reply carrying a backend.
    pub fn ok(id: u32, backend: SocketAddr, flags: u8, generation: u64) -> Self {
        Self {
            id,
            status: Status::Ok,
            flags,
            backend: to_mapped(backend.ip()),
            backend_port: backend.port(),
            generation,
            rcvbuf: 0,
            sndbuf: 0,
        }
    }

    /// A reply without a backend.
    pub fn refuse(id: u32, status: Status, generation: u64) -> Self {
        Self {
            id,
            status,
            flags: 0,
            backend: Ipv6Addr::UNSPECIFIED,
            backend_port: 0,
            generation,
            rcvbuf: 0,
            sndbuf: 0,
        }
    }

    /// The chosen backend, canonical (v4 if mapped).
    pub fn backend_addr(&self) -> SocketAddr {
        SocketAddr::new(from_mapped(self.backend), self.backend_port)
    }

    pub fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        header(&mut b, REPLY_KIND, self.id);
        put(&mut b, 8, &[self.status.to_byte(), self.flags]);
        put(&mut b, 10, &self.backend_port.to_be_bytes());
        put(&mut b, 12, &self.backend.octets());
        put(&mut b, 28, &self.generation.to_be_bytes());
        put(&mut b, 36, &self.rcvbuf.to_be_bytes());
        put(&mut b, 40, &self.sndbuf.to_be_bytes());
        b
    }

    /// # Errors
    /// [`DecodeError`] for a wrong magic, version, kind or status.
    pub fn decode(b: &[u8; MSG_LEN]) -> Result<Self, DecodeError> {
        let (kind, id) = check_header(b)?;
        if kind != REPLY_KIND {
            return Err(DecodeError::Kind(kind));
        }
        let status = byte(b, 8);
        Ok(Self {
            id,
            status: Status::from_byte(status).ok_or(DecodeError::Status(status))?,
            flags: byte(b, 9),
            backend_port: u16::from_be_bytes(take(b, 10)),
            backend: Ipv6Addr::from(take16(b, 12)),
            generation: u64::from_be_bytes(take(b, 28)),
            rcvbuf: u32::from_be_bytes(take(b, 36)),
            sndbuf: u32::from_be_bytes(take(b, 40)),
        })
    }
}

/// Reads the version byte of any message, so a daemon can answer a newer hook with
/// [`Status::UnsupportedVersion`] instead of silence.
pub fn version_of(b: &[u8; MSG_LEN]) -> u8 {
    byte(b, 2)
}

/// The 16-byte form used on the wire: IPv4 as v4-mapped IPv6.
pub fn to_mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The canonical form of a wire address: v4-mapped becomes IPv4.
pub fn from_mapped(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

/// True if `ip` (in either form) is inside `net/prefix` of the same family.
pub fn v4_in(ip: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = 32u32.saturating_sub(u32::from(prefix.min(32)));
    let mask = u32::MAX.checked_shl(shift).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// True if `ip` is inside `net/prefix`.
pub fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = 128u32.saturating_sub(u32::from(prefix.min(128)));
    let mask = u128::MAX.checked_shl(shift).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

fn header(b: &mut [u8; MSG_LEN], kind: u8, id: u32) {
    put(b, 0, &MAGIC);
    put(b, 2, &[VERSION, kind]);
    put(b, 4, &id.to_be_bytes());
}

fn check_header(b: &[u8; MSG_LEN]) -> Result<(u8, u32), DecodeError> {
    if take::<2>(b, 0) != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = byte(b, 2);
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    Ok((byte(b, 3), u32::from_be_bytes(take(b, 4))))
}

/// Copies `src` into `b` at `at`; out-of-range parts are dropped (never reached with the
/// constant offsets above, but this cannot panic).
pub(crate) fn put(b: &mut [u8], at: usize, src: &[u8]) {
    if let Some(dst) = b.get_mut(at..at.saturating_add(src.len())) {
        dst.copy_from_slice(src);
    }
}

/// The `N` bytes at `at`, zero-filled where out of range.
pub(crate) fn take<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(at..at.saturating_add(N)) {
        out.copy_from_slice(src);
    }
    out
}

fn take16(b: &[u8], at: usize) -> [u8; 16] {
    take::<16>(b, at)
}

pub(crate) fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests;

/// The 64-bit affinity key for a `DISCOTECH_HASH_KEY` value: FNV-1a of its bytes, stable across
/// builds so a key keeps its backend across upgrades of either side.
pub fn hash_key(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finaliser: spreads small keys (uids 0, 1000, 1001) over a table. The daemon's
/// maglev tables and the pick in `pick` use the same function, so they agree on every key.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
