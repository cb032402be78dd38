//! The real [`Os`]: the caller's socket through libc, the daemon over its unix socket with a
//! bounded wait and an owner check, and the fallback file read in small chunks from disk.
//! Built only from the safe wrappers in `sys.rs`.

use core::net::SocketAddr;

use discotech_wire::fallback::{HEADER_LEN, Header, RECORD_LEN, Record};
use discotech_wire::{MSG_LEN, Reply, Request};
use libc::c_int;

use crate::choose::{Records, choose};
use crate::config::Config;
use crate::route::{Os, Session};
use crate::sys::{self, ConnectFn, Fd, RawAddr, SockInfo};

pub struct RealOs {
    pub real: ConnectFn,
    pub cfg: &'static Config,
}

impl Os for RealOs {
    type Session = DaemonSession;

    fn sock_info(&self, fd: c_int) -> Option<SockInfo> {
        sys::sock_info(fd)
    }

    fn connect(&self, fd: c_int, to: SocketAddr, domain: c_int) -> Result<(), c_int> {
        let raw = RawAddr::for_family(to, domain).ok_or(libc::EAFNOSUPPORT)?;
        sys::connect(self.real, fd, &raw)
    }

    fn session(&self) -> Option<DaemonSession> {
        DaemonSession::open(self.real, self.cfg)
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
        sys::getpid()
    }
}

/// One connection to the daemon, opened per connect() (so nothing is shared across fork) and
/// closed when dropped.
pub struct DaemonSession {
    fd: Fd,
    timeout_ms: i64,
}

impl DaemonSession {
    fn open(real: ConnectFn, cfg: &Config) -> Option<Self> {
        let fd = sys::unix_connect(real, cfg.socket_path()).ok()?;
        // A process squatting on the socket path must not get to steer our traffic.
        let uid = sys::peer_uid(&fd)?;
        if !cfg.trusts(uid, sys::uids()) {
            return None;
        }
        Some(Self {
            fd,
            timeout_ms: cfg.timeout_ms,
        })
    }
}

impl Session for DaemonSession {
    fn ask(&mut self, req: &Request) -> Option<Reply> {
        let deadline = sys::now_ms().saturating_add(self.timeout_ms);
        let out = req.encode();
        // 64 bytes into a fresh unix socket's empty buffer go in one send.
        if sys::send(&self.fd, &out).ok()? != MSG_LEN {
            return None;
        }
        let mut buf = [0u8; MSG_LEN];
        let mut got = 0usize;
        // Bounded by the deadline; each turn either reads bytes or waits in poll.
        for _ in 0..64 {
            if got == MSG_LEN {
                break;
            }
            let left = deadline.saturating_sub(sys::now_ms());
            if left <= 0 {
                return None;
            }
            if !sys::poll_in(&self.fd, left) {
                continue;
            }
            match sys::recv(&self.fd, buf.get_mut(got..)?) {
                Ok(0) => return None,
                Ok(n) => got += n,
                Err(e) if e == libc::EAGAIN || e == libc::EINTR => {}
                Err(_) => return None,
            }
        }
        let reply = Reply::decode(&buf).ok().filter(|_| got == MSG_LEN)?;
        (reply.id == req.id).then_some(reply)
    }

    fn tell(&mut self, req: &Request) {
        let _ = sys::send(&self.fd, &req.encode());
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
