//! The real [`Os`]: the caller's socket through libc, the shared table and live region as
//! `maps.rs` keeps them, and the daemon over its unix socket with a bounded wait and an owner
//! check. Built only from the safe wrappers in `sys.rs`.

#![deny(unsafe_code)]

use core::net::SocketAddr;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use discotech_wire::live::{Entry, Live, Report};
use discotech_wire::table::Table;
use discotech_wire::{MSG_LEN, Reply, Request};
use libc::c_int;

use crate::config::Config;
use crate::handover;
use crate::maps;
use crate::route::{Os, Session};
use crate::sys::{self, ConnectFn, Fd, RawAddr, SockInfo};

pub struct RealOs {
    pub real: ConnectFn,
    pub cfg: &'static Config,
    /// The family of the caller's sockaddr: connect() only works when it is the socket's
    /// domain, so it stands in for asking the kernel (one system call fewer).
    pub family: c_int,
}

/// Draws for random and p2c picks: a process-wide counter mixed with the clock.
static DRAWS: AtomicU64 = AtomicU64::new(0);

impl Os for RealOs {
    type Session = DaemonSession;

    fn sock_info(&self, fd: c_int) -> Option<SockInfo> {
        sys::sock_info(fd, self.family)
    }

    fn connect(&self, fd: c_int, to: SocketAddr, domain: c_int) -> Result<(), c_int> {
        let raw = RawAddr::for_family(to, domain).ok_or(libc::EAFNOSUPPORT)?;
        sys::connect(self.real, fd, &raw)
    }

    fn table(&self) -> Option<Table<'static, [AtomicU32]>> {
        maps::table(self.cfg)
    }

    fn live(&self, epoch: u64) -> Option<Live<'static>> {
        maps::live(self.real, self.cfg, epoch)
    }

    /// Wakes a sleeping reader for reports it must act on at once (a failure to check, a
    /// connect to follow while it is under way); a latency sample waits for the reader's next
    /// round (at most [`discotech_wire::live::SAMPLE_WAIT_MS`]), which keeps the wake-up off p2c-ewma's connect path.
    fn report(&self, live: &Live<'_>, e: &Entry) {
        if live.report(e)
            && !matches!(e.report, Report::Connected { .. })
            && let Some(head) = live.head_word()
        {
            discotech_shm::futex_wake(head);
        }
    }

    fn session(&self) -> Option<DaemonSession> {
        DaemonSession::open(self.real, self.cfg, sys::getpid())
    }

    /// Asked only on the way to the daemon's socket (getpid is a system call).
    fn pid(&self) -> u32 {
        sys::getpid()
    }

    fn now_us(&self) -> u64 {
        sys::now_us()
    }

    fn now_ms(&self) -> i64 {
        sys::now_ms()
    }

    fn local_port(&self, fd: c_int) -> Option<u16> {
        sys::local_port(fd)
    }

    fn hash_key(&self) -> Option<u64> {
        self.cfg.hash_key
    }

    fn key(&self) -> u64 {
        self.cfg.hash_key.unwrap_or(u64::from(self.cfg.euid))
    }

    fn rand(&self) -> u64 {
        let n = DRAWS.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        discotech_wire::mix(n ^ sys::now_ns())
    }

    fn can_take_over(&self, fd: c_int) -> bool {
        handover::can_take_over(fd)
    }

    fn take_over(
        &self,
        fd: c_int,
        pooled: c_int,
        domain: c_int,
        reply: &Reply,
    ) -> Result<bool, c_int> {
        handover::take_over(fd, sys::adopt(pooled), domain, (reply.rcvbuf, reply.sndbuf))
    }

    fn close(&self, fd: c_int) {
        sys::close(fd);
    }
}

/// Lanes: the process's connections to the daemon, reused across connects so a question costs
/// no connect and no credentials check. Used only when the shared table is not mapped.
///
/// Lock-free: a connect takes a lane with one compare-and-swap on its `holder` (the holder's pid
/// and a token), trying each lane once starting from one picked by its stack address (so
/// threads tend to keep to their own lane); with every lane busy it opens a connection of its
/// own for this question. So two threads (or a signal handler and the code it interrupted)
/// never share a connection and nobody waits. A lane's connection is only used by the process
/// that opened it (the pid is checked, so a fork child opens its own) and only while the
/// descriptor number still holds the same socket (device and inode are checked, in case the
/// application closed it and the number was reused, even for a file on another device).
pub struct Lane {
    cached: AtomicU64,
    cached_dev: AtomicU64,
    cached_ino: AtomicU64,
    holder: AtomicU64,
}

const LANES: usize = 4;
static LANE: [Lane; LANES] = [const { Lane::new() }; LANES];
static TOKEN: AtomicU32 = AtomicU32::new(0);
const NONE: u64 = u64::MAX;

fn pack(pid: u32, fd: c_int) -> u64 {
    u64::from(pid) << 32 | u64::from(fd as u32)
}

impl Lane {
    const fn new() -> Self {
        Self {
            cached: AtomicU64::new(NONE),
            cached_dev: AtomicU64::new(0),
            cached_ino: AtomicU64::new(0),
            holder: AtomicU64::new(0),
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
        let (dev, ino) = sys::file_id(fd).unwrap_or((0, 0));
        self.cached_dev.store(dev, Ordering::Release);
        self.cached_ino.store(ino, Ordering::Release);
        self.cached.store(pack(pid, fd), Ordering::Release);
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
    pid: u32,
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
        let session = |fd, cached| Self {
            fd,
            cached,
            broken: false,
            timeout_ms: cfg.timeout_ms,
            real,
            cfg,
            pid,
        };
        let Some((lane, token)) = Lane::take(pid) else {
            return Some(session(open_daemon(real, cfg)?.into_raw(), None));
        };
        let cached = Some((lane, token));
        let held = lane.cached.load(Ordering::Acquire);
        if held != NONE {
            let fd = held as u32 as c_int;
            let ours = sys::file_id(fd)
                == Some((
                    lane.cached_dev.load(Ordering::Acquire),
                    lane.cached_ino.load(Ordering::Acquire),
                ));
            if ours && (held >> 32) as u32 == pid {
                return Some(session(fd, cached));
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
        Some(session(fd, cached))
    }

    /// Sends `req` and waits (bounded) for its reply, skipping late replies to earlier
    /// questions that timed out.
    fn exchange(&mut self, req: &Request) -> Option<Reply> {
        let deadline = sys::now_ms().saturating_add(self.timeout_ms);
        // 64 bytes fit a unix socket buffer the daemon keeps draining: one send.
        if sys::send(self.fd, &req.encode()).ok()? != MSG_LEN {
            return None;
        }
        for _ in 0..4 {
            let reply = self.read_reply(deadline)?;
            if reply.id == req.id {
                return Some(reply);
            }
        }
        None
    }

    /// One whole reply, waiting until `deadline` (a deadline in the past: no waiting).
    fn read_reply(&mut self, deadline: i64) -> Option<Reply> {
        self.read_reply_into(deadline, None)
    }

    /// [`Self::read_reply`], keeping in `fd` a descriptor passed with the reply (`None`: any
    /// passed descriptor is closed).
    fn read_reply_into(
        &mut self,
        deadline: i64,
        mut fd: Option<&mut Option<sys::Fd>>,
    ) -> Option<Reply> {
        let mut buf = [0u8; MSG_LEN];
        let mut got = 0usize;
        // Bounded by the deadline; each turn either reads bytes or waits in poll.
        for _ in 0..64 {
            if got == MSG_LEN {
                break;
            }
            match discotech_shm::recv_with_fd(self.fd, buf.get_mut(got..)?) {
                Ok((0, _)) => return None,
                Ok((n, passed)) => {
                    got += n;
                    if let (Some(slot), Some(passed)) = (fd.as_deref_mut(), passed) {
                        *slot = Some(sys::adopt(passed));
                    } else if let Some(passed) = passed {
                        sys::close(passed);
                    }
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

    /// Replaces a shared connection the daemon closed (idle timeout, restart) with a new one.
    fn reconnect(&mut self) -> bool {
        let Some((lane, _)) = self.cached else {
            return false;
        };
        let Some(fd) = open_daemon(self.real, self.cfg) else {
            return false;
        };
        sys::close(self.fd);
        self.fd = fd.into_raw();
        lane.adopt(self.pid, self.fd);
        self.broken = false;
        true
    }
}

impl Session for DaemonSession {
    fn ask(&mut self, req: &Request) -> Option<Reply> {
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

    fn tell(&mut self, req: &Request) {
        if sys::send(self.fd, &req.encode()).ok() != Some(MSG_LEN) {
            self.broken = true;
        }
    }

    fn ask_pooled(&mut self, req: &Request) -> Option<(Reply, Option<c_int>)> {
        let started = sys::now_ms();
        if let Some(got) = self.exchange_pooled(req) {
            return Some(got);
        }
        // As in `ask`: a shared connection the daemon closed while we were not looking gets one
        // retry on a new connection; a slow daemon does not.
        let quick = sys::now_ms().saturating_sub(started) < self.timeout_ms;
        if self.cached.is_some()
            && quick
            && self.reconnect()
            && let Some(got) = self.exchange_pooled(req)
        {
            return Some(got);
        }
        self.broken = true;
        None
    }
}

impl DaemonSession {
    fn exchange_pooled(&mut self, req: &Request) -> Option<(Reply, Option<c_int>)> {
        let deadline = sys::now_ms().saturating_add(self.timeout_ms);
        if sys::send(self.fd, &req.encode()).ok()? != MSG_LEN {
            return None;
        }
        for _ in 0..4 {
            let mut fd = None;
            let reply = self.read_reply_into(deadline, Some(&mut fd))?;
            if reply.id == req.id {
                return Some((reply, fd.map(sys::Fd::into_raw)));
            }
            // A late reply to an earlier question: its descriptor, if any, closes here.
        }
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
                }
                lane.release(token);
            }
        }
    }
}
