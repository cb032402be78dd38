//! The shared routing table and the live region as this process maps them. The table is a file
//! beside the daemon's socket, mapped read-only, believed only when its owner is a uid the
//! daemon may run as and nobody else may write it; the live region is a sealed memfd the daemon
//! passes over its socket. Both are mapped once and kept (a newer mapping replaces an older one
//! as current, the older stays valid for threads still reading it: see `discotech_shm::Held`).
//!
//! Mapping costs system calls, so it happens on the first connect that needs it, again only
//! when the daemon replaced its table (a restart) or started a new live region, and at most once
//! per [`RETRY_MS`] when it fails. Every other connect reads the current mappings with a few
//! atomic loads.

#![deny(unsafe_code)]

use core::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::os::fd::AsFd;

use discotech_shm::{Held, Mapping};
use discotech_wire::live::Live;
use discotech_wire::table::Table;
use discotech_wire::{Kind, MSG_LEN, Reply, Request, Status};

use crate::config::Config;
use crate::sys::{self, ConnectFn};

static TABLE: Held<8> = Held::new();
static LIVE: Held<8> = Held::new();
static TABLE_NEXT_TRY: AtomicI64 = AtomicI64::new(0);
/// The device and inode of the table file mapped last (a superseded table whose file is still
/// the one at the path is not mapped again).
static TABLE_ID: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static LIVE_NEXT_TRY: AtomicI64 = AtomicI64::new(0);
/// How long after a failed attempt to map (or a replaced table) the next one may be made.
pub const RETRY_MS: i64 = 200;

/// True at most once per [`RETRY_MS`] per `next` (one thread wins the attempt).
fn due(next: &AtomicI64) -> bool {
    let now = sys::now_ms();
    let at = next.load(Ordering::Relaxed);
    now >= at
        && next
            .compare_exchange(
                at,
                now.saturating_add(RETRY_MS),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
}

/// The routing table, mapping it (again) if needed and due.
pub fn table(cfg: &Config) -> Option<Table<'static, [AtomicU32]>> {
    let current = TABLE.current().and_then(|w| Table::new(w).ok());
    match current {
        Some(t) if !t.superseded() => Some(t),
        // Replaced by a restarted daemon: the new file, once it can be had; the old one until.
        Some(t) => map_table(cfg).or(Some(t)),
        None => map_table(cfg),
    }
}

/// Maps the table at its path, if the file is one to believe.
fn map_table(cfg: &Config) -> Option<Table<'static, [AtomicU32]>> {
    if !due(&TABLE_NEXT_TRY) {
        return None;
    }
    let fd = sys::open_nofollow(cfg.table_path()?)?;
    let st = sys::file_stat(&fd)?;
    // A file someone else could have planted or edited must not steer this process's connects.
    let mode = st.mode;
    if !cfg.trusts(st.uid, sys::uids()) || mode & 0o022 != 0 || mode & libc::S_IFMT != libc::S_IFREG
    {
        return None;
    }
    let [dev, ino] = &TABLE_ID;
    if TABLE.current().is_some()
        && (dev.load(Ordering::Relaxed), ino.load(Ordering::Relaxed)) == st.id
    {
        return None; // the file already mapped (its daemon stopped): keep reading it
    }
    let words = usize::try_from(st.size / 4).ok()?;
    let m = Mapping::map(fd.as_fd(), words, false).ok()?;
    Table::new(m.words()).ok()?;
    dev.store(st.id.0, Ordering::Relaxed);
    ino.store(st.id.1, Ordering::Relaxed);
    Table::new(TABLE.install(m)).ok()
}

/// The live region of epoch `epoch` (the one the table's slots refer to), asking the daemon for
/// it if needed and due.
pub fn live(real: ConnectFn, cfg: &Config, epoch: u64) -> Option<Live<'static>> {
    if let Some(l) = LIVE.current().and_then(Live::new)
        && l.epoch() == epoch
    {
        return Some(l);
    }
    if epoch == 0 || !due(&LIVE_NEXT_TRY) {
        return None;
    }
    let fd = request_live(real, cfg)?;
    // Sealed against shrinking, or another process could make our reads fault.
    if discotech_shm::seals(fd.as_fd()) & libc::F_SEAL_SHRINK == 0 {
        return None;
    }
    let size = sys::file_stat(&fd)?.size;
    let m = Mapping::map(fd.as_fd(), usize::try_from(size / 4).ok()?, true).ok()?;
    Live::new(m.words())?;
    let l = Live::new(LIVE.install(m))?;
    (l.epoch() == epoch).then_some(l)
}

/// Asks the daemon for the live region's descriptor (one exchange on a connection of its own).
fn request_live(real: ConnectFn, cfg: &Config) -> Option<sys::Fd> {
    let sock = sys::unix_connect(real, cfg.socket_path()).ok()?;
    let uid = sys::peer_uid(sock.raw())?;
    if !cfg.trusts(uid, sys::uids()) {
        return None;
    }
    let mut req = Request::pick(1, core::net::Ipv4Addr::UNSPECIFIED.into(), 0, 0, 0);
    req.kind = Kind::MapLive;
    if sys::send(sock.raw(), &req.encode()).ok()? != MSG_LEN {
        return None;
    }
    let deadline = sys::now_ms().saturating_add(cfg.timeout_ms);
    let mut buf = [0u8; MSG_LEN];
    for _ in 0..8 {
        match discotech_shm::recv_with_fd(sock.raw(), &mut buf) {
            Ok((n, fd)) => {
                let fd = fd.map(sys::adopt);
                let reply = (n == MSG_LEN).then(|| Reply::decode(&buf).ok()).flatten()?;
                return (reply.status == Status::Ok).then_some(fd).flatten();
            }
            Err(e) if e == libc::EAGAIN || e == libc::EINTR => {
                let left = deadline.saturating_sub(sys::now_ms());
                if left <= 0 {
                    return None;
                }
                sys::poll_in(sock.raw(), left);
            }
            Err(_) => return None,
        }
    }
    None
}
