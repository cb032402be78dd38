//! The decision for one connect() to a magic address. With the shared routing table mapped
//! (the usual case) the hook picks the backend itself, on the table and the live counters every
//! hooked process shares (`discotech_wire::pick`): no question to the daemon, no system call
//! but the real connect. A refused backend is held out of this process's picks for a moment,
//! reported on the live region's ring (a hint the daemon confirms with a connect of its own),
//! and another is tried, a bounded number of times. A non-blocking connect still in progress is
//! reported too, with its local port, so the daemon can follow it in the kernel's socket table
//! and count a refusal or a timeout. A repeated connect() on a socket whose connect is under
//! way goes to the same backend.
//!
//! Without a table (none yet, or one this process does not trust) the daemon is asked over its
//! socket, and when it does not answer either, the process routes by what it learned from
//! earlier answers.
//!
//! Safe code over the [`Os`] trait, so the tests drive it with a fake "real connect", a table
//! in memory and a fake daemon. The real implementation is in `os.rs`.

#![deny(unsafe_code)]

use core::net::SocketAddr;
use core::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use discotech_wire::live::{Entry, Live, Report};
use discotech_wire::pick::{Ask, Miss, Picked, pick, uncount};
use discotech_wire::table::{Policy, SVC_PREFETCH, Table};
use discotech_wire::{
    FLAG_HANDED_OVER, FLAG_HASH_KEY, FLAG_INET6, FLAG_PENDING, FLAG_REPORT_DONE, Kind, Reply,
    Request, Status, to_mapped,
};
use libc::c_int;

use crate::choose::choose;
use crate::slots::{FdTable, Holds, Learned};
use crate::sys::SockInfo;

/// How long a process connects prefetch services by itself after the daemon did not answer.
pub const PREFETCH_QUIET_MS: i64 = 1_000;

/// Backends tried for one blocking connect before giving up.
pub const MAX_ATTEMPTS: usize = 4;
/// How long this process keeps a backend that refused it out of its own picks: long enough
/// for the daemon to confirm the failure and publish a table without it.
pub const HOLD_MS: i64 = 2_000;
/// Places for backends to skip in one pick: those tried during this connect, then holds.
const EXCLUDE: usize = MAX_ATTEMPTS + 4;

/// What the hook needs from the operating system, the shared table and the daemon.
pub trait Os {
    type Session: Session;
    fn sock_info(&self, fd: c_int) -> Option<SockInfo>;
    /// The real connect of `fd` to `to`, in the socket's `domain`. Err is the errno.
    fn connect(&self, fd: c_int, to: SocketAddr, domain: c_int) -> Result<(), c_int>;
    /// The shared routing table, if this process has one mapped (or can map it now).
    fn table(&self) -> Option<Table<'static, [AtomicU32]>>;
    /// The live region of `epoch`, if this process has it mapped (or can get it now).
    fn live(&self, epoch: u64) -> Option<Live<'static>>;
    /// Appends `e` to the live region's ring (and wakes the daemon if it sleeps).
    fn report(&self, live: &Live<'_>, e: &Entry);
    /// A conversation with the daemon, or None if it cannot be reached (or is not trusted).
    fn session(&self) -> Option<Self::Session>;
    fn pid(&self) -> u32;
    /// Microseconds on a monotonic clock (connects to p2c-ewma services are timed).
    fn now_us(&self) -> u64;
    /// Milliseconds on the same clock (holds).
    fn now_ms(&self) -> i64;
    /// The local port of `fd` (to report a connect still in progress).
    fn local_port(&self, fd: c_int) -> Option<u16>;
    /// The caller's affinity key (DISCOTECH_HASH_KEY, hashed at load time), if it set one.
    fn hash_key(&self) -> Option<u64>;
    /// The affinity key maglev uses: the hash key, else the effective uid (as the daemon does
    /// for a hook that asks it).
    fn key(&self) -> u64;
    /// Random bits (random and p2c picks).
    fn rand(&self) -> u64;
    /// Whether `fd` may be replaced by a pooled connection (see `handover.rs`).
    fn can_take_over(&self, fd: c_int) -> bool;
    /// Puts the connected socket `pooled` (a descriptor received from the daemon, consumed
    /// either way) in place of `fd`, with `fd`'s options and flags. Ok(non-blocking) or the
    /// errno of what failed, with `fd` untouched.
    fn take_over(
        &self,
        fd: c_int,
        pooled: c_int,
        domain: c_int,
        reply: &Reply,
    ) -> Result<bool, c_int>;
    /// Closes a descriptor the daemon sent that is not used.
    fn close(&self, fd: c_int);
}

pub trait Session {
    /// One request and its reply, within the hook's time bound. None: no usable answer (the
    /// session must not be used again).
    fn ask(&mut self, req: &Request) -> Option<Reply>;
    /// A message without a reply.
    fn tell(&mut self, req: &Request);
    /// A prefetch request: the reply and the descriptor that came with it, if one did.
    fn ask_pooled(&mut self, req: &Request) -> Option<(Reply, Option<c_int>)>;
}

/// The process-wide state the decision reads and updates.
pub struct State {
    pub fds: FdTable,
    pub learned: Learned,
    pub holds: Holds,
    next_id: AtomicU32,
    turn: AtomicU32,
    /// Until when (ms) prefetch services are connected without asking the daemon, which did
    /// not answer the last time.
    prefetch_quiet_until: AtomicI64,
}

impl State {
    pub const fn new() -> Self {
        Self {
            fds: FdTable::new(),
            learned: Learned::new(),
            holds: Holds::new(),
            next_id: AtomicU32::new(1),
            turn: AtomicU32::new(0),
            prefetch_quiet_until: AtomicI64::new(i64::MIN),
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

/// Routes one connect() of `fd` to the magic address `dest`.
pub fn on_connect<O: Os>(os: &O, state: &State, fd: c_int, dest: SocketAddr) -> Verdict {
    let Some(info) = os.sock_info(fd) else {
        return Verdict::PassThrough;
    };
    if !info.stream || !(info.domain == libc::AF_INET || info.domain == libc::AF_INET6) {
        return Verdict::PassThrough;
    }
    // A repeated connect on a socket whose connect is under way: same backend, no question.
    // The socket is known by its local port (a new socket under a reused number has none yet).
    if let Some((port, backend)) = state.fds.get(fd, dest)
        && os.local_port(fd).map(u64::from) == Some(port)
    {
        let r = os.connect(fd, backend, info.domain);
        if !matches!(r, Err(e) if pending(e)) {
            state.fds.remove(fd, port);
        }
        return Verdict::Return(r);
    }
    let call = Call {
        os,
        state,
        fd,
        dest,
        domain: info.domain,
        v6_ok: info.domain == libc::AF_INET6,
    };
    match os.table() {
        Some(table) => {
            if prefetches(&table, dest)
                && let Some(v) = call.via_pool(info.domain)
            {
                return v;
            }
            call.via_table(&table).unwrap_or_else(|| call.via_daemon())
        }
        None => call.via_daemon(),
    }
}

/// Whether the service at `dest` has the daemon keep connections ready.
fn prefetches(table: &Table<'static, [AtomicU32]>, dest: SocketAddr) -> bool {
    table
        .read(|area| Some(area.service(dest.ip())?.flags()))
        .is_some_and(|f| f & SVC_PREFETCH != 0)
}

/// One connect being routed.
struct Call<'a, O: Os> {
    os: &'a O,
    state: &'a State,
    fd: c_int,
    dest: SocketAddr,
    domain: c_int,
    v6_ok: bool,
}

impl<O: Os> Call<'_, O> {
    /// Asks the daemon for one of its established connections and puts it in place of the
    /// caller's socket. None: connect as without prefetching (the socket cannot take one over,
    /// the daemon has none or does not answer, or the take-over failed with the socket as it was).
    fn via_pool(&self, domain: c_int) -> Option<Verdict> {
        let os = self.os;
        let now = os.now_ms();
        if now < self.state.prefetch_quiet_until.load(Ordering::Relaxed)
            || !os.can_take_over(self.fd)
        {
            return None;
        }
        let quiet = || {
            self.state
                .prefetch_quiet_until
                .store(now.saturating_add(PREFETCH_QUIET_MS), Ordering::Relaxed);
        };
        let Some(mut session) = os.session() else {
            quiet();
            return None;
        };
        let flags = if self.v6_ok { FLAG_INET6 } else { 0 };
        let req = request(os, self.state, self.dest, flags, Kind::Prefetch);
        let Some((reply, pooled)) = session.ask_pooled(&req) else {
            quiet();
            return None;
        };
        drop(session);
        let pooled = pooled?;
        if reply.status != Status::Ok || reply.flags & FLAG_HANDED_OVER == 0 {
            os.close(pooled);
            return None;
        }
        match os.take_over(self.fd, pooled, domain, &reply) {
            Ok(false) => Some(Verdict::Return(Ok(()))),
            // Non-blocking: the connect is "in progress" with the socket already writable, which
            // every event loop handles as a connect that completed at once. A repeated connect()
            // goes to the same backend, and so gets EISCONN, as after any finished connect.
            Ok(true) => {
                if let Some(port) = os.local_port(self.fd) {
                    self.state
                        .fds
                        .put(self.fd, u64::from(port), self.dest, reply.backend_addr());
                }
                Some(Verdict::Return(Err(libc::EINPROGRESS)))
            }
            Err(_) => None,
        }
    }

    /// Picks from the shared table and connects. None if the table could not be read
    /// consistently before any connect was made (the daemon is asked instead).
    fn via_table(&self, table: &Table<'static, [AtomicU32]>) -> Option<Verdict> {
        let os = self.os;
        let live = table
            .read(|area| Some(area.live_epoch()))
            .and_then(|epoch| os.live(epoch));
        let mut tried: [Option<SocketAddr>; MAX_ATTEMPTS] = [None; MAX_ATTEMPTS];
        let mut last = libc::ECONNREFUSED;
        for attempt in 0..MAX_ATTEMPTS {
            let mut exclude = [None; EXCLUDE];
            for (x, t) in exclude.iter_mut().zip(tried) {
                *x = t;
            }
            if self.state.holds.any() {
                self.state.holds.fill(&mut exclude, os.now_ms());
            }
            let ask = Ask {
                dest: self.dest,
                v6_ok: self.v6_ok,
                key: os.key(),
                rand: os.rand(),
                local_turn: self.state.turn.fetch_add(1, Ordering::Relaxed),
                exclude: &exclude,
            };
            let p = match pick(table, live, &ask, true) {
                Ok(p) => p,
                Err(Miss::Unreadable) if attempt == 0 => return None,
                Err(Miss::NoBackend) if attempt == 0 && self.state.holds.any() => {
                    // Every backend left is one this process holds: better one of them than
                    // none (the hold is a guess; the daemon has not ejected them).
                    match pick(
                        table,
                        live,
                        &Ask {
                            exclude: &[],
                            ..ask
                        },
                        true,
                    ) {
                        Ok(p) => p,
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            if let Some(t) = tried.get_mut(attempt) {
                *t = Some(p.addr);
            }
            let timed = p.policy == Policy::P2cEwma;
            let started = if timed { os.now_us() } else { 0 };
            let r = os.connect(self.fd, p.addr, self.domain);
            match r {
                Err(e) if pending(e) => {
                    self.pending(live.as_ref(), &p);
                    return Some(Verdict::Return(r));
                }
                Err(e) if retryable(e) => {
                    last = e;
                    self.uncount(live.as_ref(), &p);
                    self.state
                        .holds
                        .put(p.addr, os.now_ms().saturating_add(HOLD_MS));
                    self.tell(
                        live.as_ref(),
                        &p,
                        Report::Failed {
                            errno: u16::try_from(e).unwrap_or(u16::MAX),
                        },
                    );
                }
                Err(_) => {
                    self.uncount(live.as_ref(), &p);
                    return Some(Verdict::Return(r));
                }
                Ok(()) => {
                    self.uncount_returned(live.as_ref(), &p);
                    if timed {
                        let took = os.now_us().saturating_sub(started);
                        self.tell(
                            live.as_ref(),
                            &p,
                            Report::Connected {
                                latency_us: u32::try_from(took).unwrap_or(u32::MAX).max(1),
                            },
                        );
                    }
                    return Some(Verdict::Return(r));
                }
            }
        }
        Some(Verdict::Return(Err(last)))
    }

    /// A connect in progress: remembered for a repeated connect(), and reported so the daemon
    /// follows it (and uncounts it from the connects in flight when it settles).
    fn pending(&self, live: Option<&Live<'_>>, p: &Picked) {
        let local_port = self.os.local_port(self.fd);
        if let Some(port) = local_port {
            self.state
                .fds
                .put(self.fd, u64::from(port), self.dest, p.addr);
        }
        match (live, local_port) {
            (Some(_), Some(local_port)) => self.tell(live, p, Report::Pending { local_port }),
            _ => self.uncount_returned(live, p),
        }
    }

    /// Uncounts a connect that failed: it never reaches the kernel's table of connections.
    fn uncount(&self, live: Option<&Live<'_>>, p: &Picked) {
        if p.counted
            && let Some(l) = live
        {
            uncount(l, p.slot);
        }
    }

    /// Uncounts a connect that returned (or is left to the daemon), unless its policy is
    /// least-conn: there a pick counts until the daemon's next look at the kernel's socket
    /// table, which then shows the connection itself.
    fn uncount_returned(&self, live: Option<&Live<'_>>, p: &Picked) {
        if p.policy != Policy::LeastConn {
            self.uncount(live, p);
        }
    }

    fn tell(&self, live: Option<&Live<'_>>, p: &Picked, report: Report) {
        if let Some(l) = live {
            self.os.report(
                l,
                &Entry {
                    report,
                    slot: p.slot,
                    remote_port: p.addr.port(),
                    counted: p.counted
                        && p.policy != Policy::LeastConn
                        && matches!(report, Report::Pending { .. }),
                },
            );
        }
    }

    /// Asks the daemon over its socket, or routes by what this process learned.
    fn via_daemon(&self) -> Verdict {
        let mut ctx = Ctx {
            os: self.os,
            state: self.state,
            session: None,
            daemon_down: false,
            dest: self.dest,
            v6_ok: self.v6_ok,
            // FLAG_NONBLOCK is left unset: finding out costs a system call and the daemon
            // needs no more than the family.
            flags: if self.v6_ok { FLAG_INET6 } else { 0 },
        };
        let (os, fd) = (self.os, self.fd);
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
            let started = target.report_done.then(|| os.now_us());
            let r = os.connect(fd, target.addr, self.domain);
            let e = match r {
                Err(e) if retryable(e) => e,
                _ => {
                    let in_progress = matches!(r, Err(e) if pending(e));
                    if in_progress && let Some(port) = os.local_port(fd) {
                        self.state
                            .fds
                            .put(fd, u64::from(port), self.dest, target.addr);
                    }
                    if let Some(started) = started {
                        ctx.done(target.addr, in_progress, r.is_ok(), started, fd);
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

/// A request of `kind` about a connect to `dest`, with the next id and the caller's affinity key.
fn request<O: Os>(os: &O, state: &State, dest: SocketAddr, flags: u8, kind: Kind) -> Request {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let mut req = Request::pick(id, dest.ip(), dest.port(), flags, os.pid());
    req.kind = kind;
    if let Some(key) = os.hash_key() {
        req.flags |= FLAG_HASH_KEY;
        req.hash_key = key;
    }
    req
}

/// A connect routed by the daemon's answers.
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
        request(self.os, self.state, self.dest, self.flags, kind)
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

    /// Tells the daemon a connect it picked for a p2c service is done (or, in progress, where
    /// to find it in the kernel's socket table).
    fn done(&mut self, backend: SocketAddr, in_progress: bool, ok: bool, started: u64, fd: c_int) {
        let mut done = self.request(Kind::Done);
        done.backend = to_mapped(backend.ip());
        done.backend_port = backend.port();
        if in_progress {
            if let Some(port) = self.os.local_port(fd) {
                done.flags |= FLAG_PENDING;
                done.errno = port;
            }
        } else if ok {
            let took = self.os.now_us().saturating_sub(started);
            done.latency_us = u32::try_from(took).unwrap_or(u32::MAX).max(1);
        }
        if let Some(s) = self.session.as_mut() {
            s.tell(&done);
        }
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

    /// Without the daemon: rotation over the backends it named before.
    fn offline(&self, tried: &[Option<SocketAddr>]) -> Choice {
        let turn = self.state.turn.fetch_add(1, Ordering::Relaxed);
        match choose(&self.state.learned, self.dest, self.v6_ok, tried, turn) {
            Some(addr) => Choice::Use(Target {
                addr,
                report_done: false,
            }),
            None => Choice::Refuse,
        }
    }
}

#[cfg(test)]
mod tests;
