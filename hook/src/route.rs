//! The decision for one connect() to a magic address: ask the daemon (or, when it does not
//! answer, the fallback file or what this process learned), connect the caller's own socket to
//! the chosen backend, retry refused or unreachable backends a bounded number of times and
//! report them, and remember pending connects so a repeated connect() goes to the same backend.
//!
//! Safe code over the [`Os`] trait, so the tests drive it with a fake "real connect" and a fake
//! daemon. The real implementation is in `os.rs`.

use core::net::SocketAddr;
use core::sync::atomic::{AtomicU32, Ordering};

use discotech_wire::{
    FLAG_HASH_KEY, FLAG_INET6, FLAG_PENDING, FLAG_REPORT_DONE, Kind, Reply, Request, Status,
    to_mapped,
};
use libc::c_int;

use crate::choose::choose;
use crate::slots::{FdTable, Learned};
use crate::sys::SockInfo;

/// Backends tried for one blocking connect before giving up.
pub const MAX_ATTEMPTS: usize = 4;

/// What the hook needs from the operating system and the daemon.
pub trait Os {
    type Session: Session;
    fn sock_info(&self, fd: c_int) -> Option<SockInfo>;
    /// The inode of the socket behind `fd` (which socket it is, not just its number).
    fn inode(&self, fd: c_int) -> Option<u64>;
    /// The real connect of `fd` to `to`, in the socket's `domain`. Err is the errno.
    fn connect(&self, fd: c_int, to: SocketAddr, domain: c_int) -> Result<(), c_int>;
    /// A conversation with the daemon, or None if it cannot be reached (or is not trusted).
    fn session(&self) -> Option<Self::Session>;
    /// A choice from the fallback file, if there is one and it knows the service.
    fn fallback(
        &self,
        dest: SocketAddr,
        v6_ok: bool,
        exclude: &[Option<SocketAddr>],
        turn: u32,
    ) -> Option<SocketAddr>;
    fn pid(&self) -> u32;
    /// Microseconds on a monotonic clock: connects to services that want done reports are timed.
    fn now_us(&self) -> u64;
    /// The local port of `fd` (for a done report of a connect still in progress).
    fn local_port(&self, fd: c_int) -> Option<u16>;
    /// The caller's affinity key (DISCOTECH_HASH_KEY, hashed at load time), if it set one.
    fn hash_key(&self) -> Option<u64> {
        None
    }
}

pub trait Session {
    /// One request and its reply, within the hook's time bound. None: no usable answer (the
    /// session must not be used again).
    fn ask(&mut self, req: &Request) -> Option<Reply>;
    /// A message without a reply.
    fn tell(&mut self, req: &Request);
}

/// The process-wide state the decision reads and updates.
pub struct State {
    pub fds: FdTable,
    pub learned: Learned,
    next_id: AtomicU32,
    turn: AtomicU32,
}

impl State {
    pub const fn new() -> Self {
        Self {
            fds: FdTable::new(),
            learned: Learned::new(),
            next_id: AtomicU32::new(1),
            turn: AtomicU32::new(0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours after all (not a TCP socket, or not a socket): call the real connect unchanged.
    PassThrough,
    /// The connect's result: Ok, or the errno to set.
    Return(Result<(), c_int>),
}

/// errnos meaning "the connect is under way": the socket is committed to this backend.
fn pending(e: c_int) -> bool {
    matches!(e, libc::EINPROGRESS | libc::EALREADY | libc::EINTR)
}

/// errnos meaning "this backend is not there": try another.
fn retryable(e: c_int) -> bool {
    matches!(
        e,
        libc::ECONNREFUSED | libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ETIMEDOUT
    )
}

#[derive(Clone, Copy)]
struct Target {
    addr: SocketAddr,
    report_done: bool,
}

enum Choice {
    Use(Target),
    /// The daemon (or the records) says there is nothing to connect to.
    Refuse,
}

struct Ctx<'a, O: Os> {
    os: &'a O,
    state: &'a State,
    /// Opened when first needed, released while the connect runs unless a done report is due.
    session: Option<O::Session>,
    /// The daemon did not answer once: do not wait for it again during this connect.
    daemon_down: bool,
    dest: SocketAddr,
    v6_ok: bool,
    flags: u8,
}

impl<O: Os> Ctx<'_, O> {
    fn request(&self, kind: Kind) -> Request {
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        let mut req = Request::pick(
            id,
            self.dest.ip(),
            self.dest.port(),
            self.flags,
            self.os.pid(),
        );
        req.kind = kind;
        if let Some(key) = self.os.hash_key() {
            req.flags |= FLAG_HASH_KEY;
            req.hash_key = key;
        }
        req
    }

    /// Asks the daemon; a daemon that fails once is not asked again during this connect.
    fn ask(&mut self, req: &Request) -> Option<Reply> {
        if self.daemon_down {
            return None;
        }
        if self.session.is_none() {
            self.session = self.os.session();
        }
        let reply = self.session.as_mut().and_then(|s| s.ask(req));
        if reply.is_none() {
            self.session = None;
            self.daemon_down = true;
        }
        reply
    }

    fn choice_from(&self, reply: Option<Reply>, tried: &[Option<SocketAddr>]) -> Option<Choice> {
        let reply = reply?;
        match reply.status {
            Status::Ok => {
                let addr = reply.backend_addr();
                if tried.contains(&Some(addr)) || (!self.v6_ok && addr.is_ipv6()) {
                    return None;
                }
                self.state.learned.put(self.dest, addr);
                Some(Choice::Use(Target {
                    addr,
                    report_done: reply.flags & FLAG_REPORT_DONE != 0,
                }))
            }
            Status::UnknownService | Status::NoBackend => Some(Choice::Refuse),
            // Version skew or a confused daemon: route as if it were down.
            Status::BadRequest | Status::UnsupportedVersion => None,
        }
    }

    fn offline(&self, tried: &[Option<SocketAddr>]) -> Choice {
        let turn = self.state.turn.fetch_add(1, Ordering::Relaxed);
        let from_file = self.os.fallback(self.dest, self.v6_ok, tried, turn);
        match from_file.or_else(|| choose(&self.state.learned, self.dest, self.v6_ok, tried, turn))
        {
            Some(addr) => Choice::Use(Target {
                addr,
                report_done: false,
            }),
            None => Choice::Refuse,
        }
    }
}

/// Routes one connect() of `fd` to the magic address `dest`.
pub fn on_connect<O: Os>(os: &O, state: &State, fd: c_int, dest: SocketAddr) -> Verdict {
    let Some(info) = os.sock_info(fd) else {
        return Verdict::PassThrough;
    };
    if !info.stream || !(info.domain == libc::AF_INET || info.domain == libc::AF_INET6) {
        return Verdict::PassThrough;
    }
    // A repeated connect on a socket whose connect is under way: same backend, no question.
    if let Some((ino, backend)) = state.fds.get(fd, dest)
        && os.inode(fd) == Some(ino)
    {
        let r = os.connect(fd, backend, info.domain);
        if !matches!(r, Err(e) if pending(e)) {
            state.fds.remove(fd, ino);
        }
        return Verdict::Return(r);
    }
    let v6_ok = info.domain == libc::AF_INET6;
    // FLAG_NONBLOCK is left unset: finding out costs a system call and the daemon needs no
    // more than the family.
    let flags = if v6_ok { FLAG_INET6 } else { 0 };
    let mut ctx = Ctx {
        os,
        state,
        session: None,
        daemon_down: false,
        dest,
        v6_ok,
        flags,
    };
    let mut tried: [Option<SocketAddr>; MAX_ATTEMPTS] = [None; MAX_ATTEMPTS];

    let pick = ctx.request(Kind::Pick);
    let reply = ctx.ask(&pick);
    let mut choice = ctx
        .choice_from(reply, &tried)
        .unwrap_or_else(|| ctx.offline(&tried));
    let mut last = libc::ECONNREFUSED;
    for attempt in 0..MAX_ATTEMPTS {
        let Choice::Use(target) = choice else { break };
        if let Some(t) = tried.get_mut(attempt) {
            *t = Some(target.addr);
        }
        if !target.report_done {
            // Let other threads use the process's daemon connection while this connect runs.
            ctx.session = None;
        }
        // Only services that want done reports (p2c, p2c-ewma) are timed: two clock reads.
        let started = target.report_done.then(|| os.now_us());
        let r = os.connect(fd, target.addr, info.domain);
        let e = match r {
            Err(e) if retryable(e) => e,
            _ => {
                let in_progress = matches!(r, Err(e) if pending(e));
                if in_progress && let Some(ino) = os.inode(fd) {
                    state.fds.put(fd, ino, dest, target.addr);
                }
                if let Some(started) = started {
                    let mut done = ctx.request(Kind::Done);
                    done.backend = to_mapped(target.addr.ip());
                    done.backend_port = target.addr.port();
                    if in_progress {
                        // The daemon times the rest from the kernel's socket table, where the
                        // connection is found by its local port.
                        if let Some(port) = os.local_port(fd) {
                            done.flags |= FLAG_PENDING;
                            done.errno = port;
                        }
                    } else if r.is_ok() {
                        let took = os.now_us().saturating_sub(started);
                        done.latency_us = u32::try_from(took).unwrap_or(u32::MAX).max(1);
                    }
                    if let Some(s) = ctx.session.as_mut() {
                        s.tell(&done);
                    }
                }
                return Verdict::Return(r);
            }
        };
        last = e;
        // Report the failure; the daemon's answer is the next backend to try.
        let mut failed = ctx.request(Kind::Failed);
        failed.attempt = u8::try_from(attempt + 1).unwrap_or(u8::MAX);
        failed.backend = to_mapped(target.addr.ip());
        failed.backend_port = target.addr.port();
        failed.errno = u16::try_from(e).unwrap_or(u16::MAX);
        let reply = ctx.ask(&failed);
        choice = match ctx.choice_from(reply, &tried) {
            Some(c) => c,
            None => ctx.offline(&tried),
        };
    }
    Verdict::Return(Err(last))
}

#[cfg(test)]
mod tests;
