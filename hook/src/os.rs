//! The real [`Os`]: the caller's socket through libc, the daemon over its unix socket with a
//! bounded wait and an owner check, and the fallback file read in small chunks from disk.
//! Built only from the safe wrappers in `sys.rs`.

use core::net::SocketAddr;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use discotech_wire::fallback::{HEADER_LEN, Header, RECORD_LEN, Record};
use discotech_wire::{
    FLAG_REPORT_DONE, Kind, MSG_LEN, Reply, Request, Status, from_mapped, to_mapped,
};
use libc::c_int;

use crate::choose::{Records, choose};
use crate::config::Config;
use crate::route::{Os, Session};
use crate::slots::{PREFETCH_DEPTH, Prefetched};
use crate::sys::{self, ConnectFn, Fd, RawAddr, SockInfo};

pub struct RealOs {
    pub real: ConnectFn,
    pub cfg: &'static Config,
    /// The family of the caller's sockaddr: connect() only works when it is the socket's
    /// domain, so it stands in for asking the kernel (one system call fewer).
    pub family: c_int,
    /// getpid() once per connect.
    pub pid: u32,
}

impl Os for RealOs {
    type Session = DaemonSession;

    fn hash_key(&self) -> Option<u64> {
        self.cfg.hash_key
    }

    fn sock_info(&self, fd: c_int) -> Option<SockInfo> {
        sys::sock_info(fd, self.family)
    }

    fn inode(&self, fd: c_int) -> Option<u64> {
        sys::inode(fd)
    }

    fn connect(&self, fd: c_int, to: SocketAddr, domain: c_int) -> Result<(), c_int> {
        let raw = RawAddr::for_family(to, domain).ok_or(libc::EAFNOSUPPORT)?;
        sys::connect(self.real, fd, &raw)
    }

    fn session(&self) -> Option<DaemonSession> {
        DaemonSession::open(self.real, self.cfg, self.pid)
    }

    fn fallback(
        &self,
        dest: SocketAddr,
        v6_ok: bool,
        exclude: &[Option<SocketAddr>],
        turn: u32,
    ) -> Option<SocketAddr> {
        let file = FallbackFile::open(self.cfg)?;
        choose(&file, dest, v6_ok, exclude, turn)
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn now_us(&self) -> u64 {
        sys::now_us()
    }

    fn local_port(&self, fd: c_int) -> Option<u16> {
        sys::local_port(fd)
    }
}

/// Lanes: the process's connections to the daemon, reused across connects so a lookup costs no
/// connect and no credentials check, and (with pipelining, below) usually no round trip.
///
/// Lock-free: a connect takes a lane with one compare-and-swap on its `holder` (the holder's pid
/// and a token), trying each lane once starting from one picked by its stack address (so
/// threads tend to keep to their own lane); with every lane busy it opens a connection of its
/// own for this lookup. So two threads (or a signal handler and the code it interrupted) never
/// share a connection and nobody waits. A lane's connection is only used by the process that
/// opened it (the pid is checked, so a fork child opens its own) and only while the descriptor
/// number still holds the same socket (the inode is checked, in case the application closed it
/// and the number was reused).
///
/// Pipelining: when a destination's queue of picks in a lane runs low, the lane asks for a few
/// more in one write without waiting, so most connects find their answer already there and the
/// daemon is woken once per few connects. Only a lane's holder touches its pipeline; the
/// replies expected are `inflight_n` ids from `inflight_next`.
pub struct Lane {
    cached: AtomicU64,
    cached_ino: AtomicU64,
    holder: AtomicU64,
    prefetched: Prefetched,
    inflight_next: AtomicU32,
    inflight_n: AtomicU32,
    inflight_dest: [AtomicU64; 3],
}

const LANES: usize = 4;
static LANE: [Lane; LANES] = [const { Lane::new() }; LANES];
static TOKEN: AtomicU32 = AtomicU32::new(0);
static NEXT_PREFETCH_ID: AtomicU32 = AtomicU32::new(0);
const NONE: u64 = u64::MAX;
/// A pick made ahead is used only this soon after it arrived, so a backend change reaches a
/// busy process within this bound (and a failed connect to a stale pick is retried anyway).
const PREFETCH_MAX_AGE_MS: i64 = 500;
/// Prefetch ids have the top bit set, so they never collide with the ids `route` uses.
const PREFETCH_ID_BIT: u32 = 1 << 31;

fn prefetch_id(n: u32) -> u32 {
    (n & !PREFETCH_ID_BIT) | PREFETCH_ID_BIT
}

fn pack(pid: u32, fd: c_int) -> u64 {
    u64::from(pid) << 32 | u64::from(fd as u32)
}

impl Lane {
    const fn new() -> Self {
        Self {
            cached: AtomicU64::new(NONE),
            cached_ino: AtomicU64::new(0),
            holder: AtomicU64::new(0),
            prefetched: Prefetched::new(),
            inflight_next: AtomicU32::new(0),
            inflight_n: AtomicU32::new(0),
            inflight_dest: [const { AtomicU64::new(0) }; 3],
        }
    }

    /// Takes a lane if one is free. A holder from another pid is a thread of the parent we were
    /// forked from: it does not exist here, so its claim is void.
    fn take(pid: u32) -> Option<(&'static Lane, u64)> {
        let token = pack(pid, (TOKEN.fetch_add(1, Ordering::Relaxed) | 1) as c_int);
        let here = 0u8;
        // Thread stacks sit megabytes apart: hash the page number so they spread over lanes.
        let page = ((&raw const here) as usize >> 12) as u64;
        let start = (page.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % LANES;
        for k in 0..LANES {
            let Some(lane) = LANE.get((start + k) % LANES) else {
                continue;
            };
            let held = lane.holder.load(Ordering::Acquire);
            let free = held == 0 || (held >> 32) as u32 != pid;
            if free
                && lane
                    .holder
                    .compare_exchange(held, token, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                return Some((lane, token));
            }
        }
        None
    }

    fn release(&self, token: u64) {
        let _ = self
            .holder
            .compare_exchange(token, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Makes `fd` this lane's connection.
    fn adopt(&self, pid: u32, fd: c_int) {
        self.cached_ino
            .store(sys::inode(fd).unwrap_or(0), Ordering::Release);
        self.cached.store(pack(pid, fd), Ordering::Release);
        self.reset_pipeline();
    }

    fn inflight_dest(&self) -> (SocketAddr, u8) {
        let [hi, lo, meta] = [0, 1, 2].map(|i| {
            self.inflight_dest
                .get(i)
                .map_or(0, |a| a.load(Ordering::Relaxed))
        });
        let ip = from_mapped(core::net::Ipv6Addr::from(
            u128::from(hi) << 64 | u128::from(lo),
        ));
        (SocketAddr::new(ip, meta as u16), (meta >> 16) as u8)
    }

    fn set_inflight(&self, first: u32, n: u32, dest: SocketAddr, flags: u8) {
        let v = u128::from(to_mapped(dest.ip()));
        let words = [
            (v >> 64) as u64,
            v as u64,
            u64::from(dest.port()) | u64::from(flags) << 16,
        ];
        for (a, w) in self.inflight_dest.iter().zip(words) {
            a.store(w, Ordering::Relaxed);
        }
        self.inflight_next.store(first, Ordering::Relaxed);
        self.inflight_n.store(n, Ordering::Relaxed);
    }

    /// A new or lost connection: no replies are coming, and picks made by whatever daemon was
    /// on the old one are not trusted to be current.
    fn reset_pipeline(&self) {
        self.inflight_n.store(0, Ordering::Relaxed);
        self.prefetched.clear();
    }
}

/// A conversation with the daemon: the process's shared connection or one of its own.
pub struct DaemonSession {
    fd: c_int,
    /// The lane whose connection `fd` is, held with that token; None for a connection of our own.
    cached: Option<(&'static Lane, u64)>,
    broken: bool,
    timeout_ms: i64,
    real: ConnectFn,
    cfg: &'static Config,
}

/// A new connection to the daemon, if it is there and trusted.
fn open_daemon(real: ConnectFn, cfg: &Config) -> Option<Fd> {
    let fd = sys::unix_connect(real, cfg.socket_path()).ok()?;
    // A process squatting on the socket path must not get to steer our traffic.
    let uid = sys::peer_uid(fd.raw())?;
    cfg.trusts(uid, sys::uids()).then_some(fd)
}

impl DaemonSession {
    fn open(real: ConnectFn, cfg: &'static Config, pid: u32) -> Option<Self> {
        let timeout_ms = cfg.timeout_ms;
        let Some((lane, token)) = Lane::take(pid) else {
            let fd = open_daemon(real, cfg)?.into_raw();
            return Some(Self {
                fd,
                cached: None,
                broken: false,
                timeout_ms,
                real,
                cfg,
            });
        };
        let cached = Some((lane, token));
        let held = lane.cached.load(Ordering::Acquire);
        if held != NONE {
            let fd = held as u32 as c_int;
            let ours = sys::inode(fd) == Some(lane.cached_ino.load(Ordering::Acquire));
            if ours && (held >> 32) as u32 == pid {
                return Some(Self {
                    fd,
                    cached,
                    broken: false,
                    timeout_ms,
                    real,
                    cfg,
                });
            }
            if ours {
                // Inherited from the process we were forked from: our copy, not to be shared.
                sys::close(fd);
            }
            lane.cached.store(NONE, Ordering::Release);
        }
        let Some(fd) = open_daemon(real, cfg) else {
            lane.release(token);
            return None;
        };
        let fd = fd.into_raw();
        lane.adopt(pid, fd);
        Some(Self {
            fd,
            cached,
            broken: false,
            timeout_ms,
            real,
            cfg,
        })
    }

    fn lane(&self) -> Option<&'static Lane> {
        self.cached.map(|(lane, _)| lane)
    }

    /// Sends `req` and waits (bounded) for its reply. A prefetch reply that arrives first is
    /// filed for later.
    fn exchange(&mut self, req: &Request) -> Option<Reply> {
        let deadline = sys::now_ms().saturating_add(self.timeout_ms);
        // 64 bytes fit a unix socket buffer the daemon keeps draining: one send.
        if sys::send(self.fd, &req.encode()).ok()? != MSG_LEN {
            return None;
        }
        for _ in 0..PREFETCH_DEPTH + 2 {
            let reply = self.read_reply(deadline)?;
            if reply.id == req.id {
                return Some(reply);
            }
            if !self.file_prefetch(&reply) {
                return None;
            }
        }
        None
    }

    /// One whole reply, waiting until `deadline` (a deadline in the past: no waiting).
    fn read_reply(&mut self, deadline: i64) -> Option<Reply> {
        let mut buf = [0u8; MSG_LEN];
        let mut got = 0usize;
        // Bounded by the deadline; each turn either reads bytes or waits in poll.
        for _ in 0..64 {
            if got == MSG_LEN {
                break;
            }
            match sys::recv(self.fd, buf.get_mut(got..)?) {
                Ok(0) => return None,
                Ok(n) => {
                    got += n;
                    continue;
                }
                Err(e) if e == libc::EAGAIN || e == libc::EINTR => {}
                Err(_) => return None,
            }
            let left = deadline.saturating_sub(sys::now_ms());
            if left <= 0 {
                return None;
            }
            sys::poll_in(self.fd, left);
        }
        if got != MSG_LEN {
            return None;
        }
        Reply::decode(&buf).ok()
    }

    /// Files the next reply of the outstanding prefetch. False if `reply` is not that one.
    fn file_prefetch(&mut self, reply: &Reply) -> bool {
        let Some(lane) = self.lane() else {
            return false;
        };
        let (next, n) = (
            lane.inflight_next.load(Ordering::Relaxed),
            lane.inflight_n.load(Ordering::Relaxed),
        );
        if n == 0 || reply.id != next {
            return false;
        }
        lane.inflight_next
            .store(prefetch_id(next.wrapping_add(1)), Ordering::Relaxed);
        lane.inflight_n.store(n - 1, Ordering::Relaxed);
        let (dest, flags) = lane.inflight_dest();
        if reply.status == Status::Ok {
            if reply.flags & FLAG_REPORT_DONE != 0 {
                // The service went p2c: this pick counts as outstanding until reported done.
                let mut done = Request::pick(next, dest.ip(), dest.port(), flags, sys::getpid());
                done.kind = Kind::Done;
                done.backend = reply.backend;
                done.backend_port = reply.backend_port;
                self.tell(&done);
            } else {
                lane.prefetched
                    .put(dest, flags, reply.backend_addr(), sys::now_ms());
            }
        }
        true
    }

    /// Collects prefetch replies that have already arrived, without waiting.
    fn collect(&mut self) {
        let Some(lane) = self.lane() else { return };
        let mut buf = [0u8; MSG_LEN];
        for _ in 0..PREFETCH_DEPTH {
            if lane.inflight_n.load(Ordering::Relaxed) == 0 {
                return;
            }
            match sys::recv(self.fd, &mut buf) {
                Err(e) if e == libc::EAGAIN || e == libc::EINTR => return,
                Ok(MSG_LEN) => {
                    if !Reply::decode(&buf).is_ok_and(|r| self.file_prefetch(&r)) {
                        self.broken = true;
                        return;
                    }
                }
                _ => {
                    self.broken = true;
                    return;
                }
            }
        }
    }

    /// When `req`'s destination has at most one pick queued and nothing is on its way, asks
    /// for enough to fill the queue, in one write, without waiting.
    fn refill(&mut self, req: &Request) {
        let Some(lane) = self.lane() else { return };
        let dest = SocketAddr::new(req.magic_ip(), req.port);
        let queued = lane.prefetched.len(dest, req.flags);
        if self.broken || lane.inflight_n.load(Ordering::Relaxed) != 0 || queued > 1 {
            return;
        }
        let n = PREFETCH_DEPTH - queued;
        let first = prefetch_id(NEXT_PREFETCH_ID.fetch_add(n as u32, Ordering::Relaxed));
        let mut buf = [0u8; MSG_LEN * PREFETCH_DEPTH];
        let mut id = first;
        for chunk in buf.chunks_exact_mut(MSG_LEN).take(n) {
            let mut ahead = *req;
            ahead.id = id;
            chunk.copy_from_slice(&ahead.encode());
            id = prefetch_id(id.wrapping_add(1));
        }
        let Some(out) = buf.get(..MSG_LEN * n) else {
            return;
        };
        if sys::send(self.fd, out).ok() == Some(out.len()) {
            lane.set_inflight(first, n as u32, dest, req.flags);
        } else {
            // Part of a batch may have gone out: the stream can no longer be trusted.
            self.broken = true;
        }
    }

    /// Replaces a shared connection the daemon closed (idle timeout, restart) with a new one.
    fn reconnect(&mut self) -> bool {
        let Some(lane) = self.lane() else {
            return false;
        };
        let Some(fd) = open_daemon(self.real, self.cfg) else {
            return false;
        };
        sys::close(self.fd);
        self.fd = fd.into_raw();
        lane.adopt(sys::getpid(), self.fd);
        self.broken = false;
        true
    }
}

impl Session for DaemonSession {
    fn ask(&mut self, req: &Request) -> Option<Reply> {
        let ahead = self.cached.is_some() && req.kind == Kind::Pick && req.attempt == 0;
        if let Some(lane) = self.lane().filter(|_| ahead) {
            self.collect();
            let dest = SocketAddr::new(req.magic_ip(), req.port);
            if !self.broken
                && lane.prefetched.len(dest, req.flags) == 0
                && lane.inflight_n.load(Ordering::Relaxed) != 0
                && lane.inflight_dest() == (dest, req.flags)
            {
                // The answer is on its way: wait for it rather than ask again, so every pick
                // the daemon makes is used, in the daemon's order.
                let deadline = sys::now_ms().saturating_add(self.timeout_ms);
                match self.read_reply(deadline) {
                    Some(r) if self.file_prefetch(&r) => {}
                    _ => {
                        self.broken = true;
                        return None;
                    }
                }
            }
            if let Some(b) =
                lane.prefetched
                    .take(dest, req.flags, sys::now_ms(), PREFETCH_MAX_AGE_MS)
            {
                self.refill(req);
                return Some(Reply::ok(req.id, b, 0, 0));
            }
        }
        let reply = self.ask_now(req)?;
        if ahead && reply.status == Status::Ok && reply.flags & FLAG_REPORT_DONE == 0 {
            self.refill(req);
        }
        Some(reply)
    }

    fn tell(&mut self, req: &Request) {
        if sys::send(self.fd, &req.encode()).ok() != Some(MSG_LEN) {
            self.broken = true;
        }
    }
}

impl DaemonSession {
    fn ask_now(&mut self, req: &Request) -> Option<Reply> {
        let started = sys::now_ms();
        if let Some(reply) = self.exchange(req) {
            return Some(reply);
        }
        // A shared connection that failed at once was most likely closed by the daemon while
        // we were not looking: one retry on a new connection. A slow daemon gets no retry.
        let quick = sys::now_ms().saturating_sub(started) < self.timeout_ms;
        if self.cached.is_some()
            && quick
            && self.reconnect()
            && let Some(reply) = self.exchange(req)
        {
            return Some(reply);
        }
        self.broken = true;
        None
    }
}

impl Drop for DaemonSession {
    fn drop(&mut self) {
        match self.cached {
            None => sys::close(self.fd),
            Some((lane, token)) => {
                if self.broken {
                    // A reply may still arrive on it; a new connection keeps answers in order.
                    lane.cached.store(NONE, Ordering::Release);
                    sys::close(self.fd);
                    lane.reset_pipeline();
                }
                lane.release(token);
            }
        }
    }
}

/// The fallback file, opened for one lookup.
pub struct FallbackFile {
    fd: Fd,
    records: u32,
}

impl FallbackFile {
    pub fn open(cfg: &Config) -> Option<Self> {
        let fd = sys::open_read(cfg.fallback_path()?)?;
        let header = read_header(&fd)?;
        // A file whose length disagrees with its header is not one the daemon finished writing.
        (sys::file_size(&fd)? == header.file_len()).then_some(Self {
            fd,
            records: header.records,
        })
    }
}

/// The header of an open fallback file.
pub fn read_header(fd: &Fd) -> Option<Header> {
    let mut buf = [0u8; HEADER_LEN];
    (sys::pread_full(fd, &mut buf, 0) == HEADER_LEN).then_some(())?;
    Header::decode(&buf).ok()
}

const CHUNK: usize = 16;

impl Records for FallbackFile {
    fn scan(&self, f: &mut dyn FnMut(&Record)) {
        let mut buf = [0u8; RECORD_LEN * CHUNK];
        let mut done: u32 = 0;
        while done < self.records {
            let offset = HEADER_LEN as u64 + u64::from(done) * RECORD_LEN as u64;
            let n = sys::pread_full(&self.fd, &mut buf, offset) / RECORD_LEN;
            if n == 0 {
                return;
            }
            let n = n.min((self.records - done) as usize);
            for rec in buf.chunks_exact(RECORD_LEN).take(n) {
                f(&Record::decode(rec));
            }
            done += n as u32;
        }
    }
}
