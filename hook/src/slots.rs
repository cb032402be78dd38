//! The hook's process-wide memory, lock-free and fixed-size: which backend each pending connect
//! went to (so a repeated connect() on the same socket goes to the same place), the backends
//! the daemon named recently (to keep routing when it stops answering and there is no table),
//! and the backends this process saw refuse (held out of its own picks for a moment).
//!
//! Each slot is a tiny seqlock over atomic words: a writer that finds the slot busy gives up
//! (losing one cache entry is harmless), a reader that sees a write in progress retries a few
//! times and then treats the slot as empty. Nobody ever waits, so a connect from a signal
//! handler that interrupted a writer cannot deadlock.

#![deny(unsafe_code)]

use core::net::{Ipv6Addr, SocketAddr};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use crate::choose::Record;
use discotech_wire::{from_mapped, to_mapped};

use crate::choose::Records;

struct Slot<const N: usize> {
    seq: AtomicU32,
    words: [AtomicU64; N],
}

impl<const N: usize> Slot<N> {
    const fn new() -> Self {
        Self {
            seq: AtomicU32::new(0),
            words: [const { AtomicU64::new(0) }; N],
        }
    }

    fn write(&self, value: [u64; N]) -> bool {
        let s = self.seq.load(Ordering::Relaxed);
        if s & 1 == 1
            || self
                .seq
                .compare_exchange(s, s.wrapping_add(1), Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        fence(Ordering::Release);
        for (w, v) in self.words.iter().zip(value) {
            w.store(v, Ordering::Relaxed);
        }
        self.seq.store(s.wrapping_add(2), Ordering::Release);
        true
    }

    fn read(&self) -> Option<[u64; N]> {
        for _ in 0..4 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                core::hint::spin_loop();
                continue;
            }
            let mut out = [0u64; N];
            for (o, w) in out.iter_mut().zip(&self.words) {
                *o = w.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return Some(out);
            }
        }
        None
    }
}

fn split(ip: Ipv6Addr) -> (u64, u64) {
    let v = u128::from(ip);
    ((v >> 64) as u64, v as u64)
}

fn join(hi: u64, lo: u64) -> Ipv6Addr {
    Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo))
}

const FD_SLOTS: usize = 256;

/// fd -> (which socket: its local port, destination asked for, backend chosen) for connects
/// still pending.
/// Direct-mapped by fd number; a collision evicts (the evicted connect just asks again).
pub struct FdTable {
    slots: [Slot<6>; FD_SLOTS],
}

impl FdTable {
    pub const fn new() -> Self {
        Self {
            slots: [const { Slot::new() }; FD_SLOTS],
        }
    }

    fn slot(&self, fd: i32) -> Option<&Slot<6>> {
        self.slots.get(fd.unsigned_abs() as usize % FD_SLOTS)
    }

    pub fn put(&self, fd: i32, socket: u64, dest: SocketAddr, backend: SocketAddr) {
        let (dh, dl) = split(to_mapped(dest.ip()));
        let (bh, bl) = split(to_mapped(backend.ip()));
        let meta =
            u64::from(fd as u32) | u64::from(dest.port()) << 32 | u64::from(backend.port()) << 48;
        if let Some(s) = self.slot(fd) {
            s.write([meta, socket, dh, dl, bh, bl]);
        }
    }

    /// The socket (its local port) and backend of a pending connect on descriptor `fd` to
    /// `dest`. The caller checks the port (one getsockname, only when there is a candidate) to
    /// tell the same socket from a new one that reuses the number.
    pub fn get(&self, fd: i32, dest: SocketAddr) -> Option<(u64, SocketAddr)> {
        let [meta, socket, dh, dl, bh, bl] = self.slot(fd)?.read()?;
        let (dest_port, backend_port) = ((meta >> 32) as u16, (meta >> 48) as u16);
        let same = socket != 0
            && meta as u32 == fd as u32
            && dest_port == dest.port()
            && join(dh, dl) == to_mapped(dest.ip());
        same.then(|| {
            (
                socket,
                SocketAddr::new(from_mapped(join(bh, bl)), backend_port),
            )
        })
    }

    pub fn remove(&self, fd: i32, socket: u64) {
        if let Some(s) = self.slot(fd)
            && s.read().is_some_and(|w| w[1] == socket)
        {
            s.write([0; 6]);
        }
    }
}

const LEARNED_SLOTS: usize = 64;
const VALID: u64 = 1;

/// (magic address, client port) -> backends the daemon chose recently. Used only when the
/// daemon does not answer. Hashed by the whole triple, so one service's backends spread over
/// several slots and the offline chooser can still rotate among them.
pub struct Learned {
    slots: [Slot<5>; LEARNED_SLOTS],
}

impl Learned {
    pub const fn new() -> Self {
        Self {
            slots: [const { Slot::new() }; LEARNED_SLOTS],
        }
    }

    pub fn put(&self, dest: SocketAddr, backend: SocketAddr) {
        let (mh, ml) = split(to_mapped(dest.ip()));
        let (bh, bl) = split(to_mapped(backend.ip()));
        let meta = VALID | u64::from(dest.port()) << 16 | u64::from(backend.port()) << 32;
        let value = [meta, mh, ml, bh, bl];
        // FNV-1a over the words: cheap and good enough to spread a handful of entries.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for w in value {
            h = (h ^ w).wrapping_mul(0x0100_0000_01b3);
        }
        if let Some(s) = self.slots.get((h % LEARNED_SLOTS as u64) as usize)
            && s.read() != Some(value)
        {
            s.write(value);
        }
    }
}

impl Records for Learned {
    fn scan(&self, f: &mut dyn FnMut(&Record)) {
        for s in &self.slots {
            if let Some([meta, mh, ml, bh, bl]) = s.read()
                && meta & VALID != 0
            {
                f(&Record {
                    magic: join(mh, ml),
                    client_port: (meta >> 16) as u16,
                    backend_port: (meta >> 32) as u16,
                    backend: join(bh, bl),
                    weight: 1,
                    priority: 0,
                });
            }
        }
    }
}

const HOLD_SLOTS: usize = 8;

/// Backends this process saw refuse a connect, each skipped by its picks until a time
/// (monotonic ms): the next connect of a busy process does not walk into the same refusal while
/// the daemon confirms it. Per process on purpose: one process's failures steer only its own
/// picks (another user's reports must not steer ours).
pub struct Holds {
    slots: [Slot<3>; HOLD_SLOTS],
    next: AtomicU32,
    /// Holds ever written: zero means none to check (and no clock to read).
    any: AtomicU32,
}

impl Holds {
    pub const fn new() -> Self {
        Self {
            slots: [const { Slot::new() }; HOLD_SLOTS],
            next: AtomicU32::new(0),
            any: AtomicU32::new(0),
        }
    }

    pub fn put(&self, backend: SocketAddr, until_ms: i64) {
        let (h, l) = split(to_mapped(backend.ip()));
        let meta = VALID | u64::from(backend.port()) << 8 | (until_ms.max(0) as u64) << 24;
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % HOLD_SLOTS;
        if let Some(s) = self.slots.get(i) {
            s.write([meta, h, l]);
            self.any.store(1, Ordering::Relaxed);
        }
    }

    /// True if there may be holds to check.
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed) != 0
    }

    /// Writes the backends held at `now_ms` into the free places of `out`.
    pub fn fill(&self, out: &mut [Option<SocketAddr>], now_ms: i64) {
        let mut free = out.iter_mut().filter(|o| o.is_none());
        for s in &self.slots {
            if let Some([meta, h, l]) = s.read()
                && meta & VALID != 0
                && (meta >> 24) as i64 > now_ms
                && let Some(o) = free.next()
            {
                *o = Some(SocketAddr::new(from_mapped(join(h, l)), (meta >> 8) as u16));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn fd_table_matches_descriptor_and_destination_and_keeps_the_inode() {
        let t = FdTable::new();
        let dest = a("127.77.0.9:80");
        t.put(5, 1234, dest, a("127.0.0.2:8080"));
        assert_eq!(t.get(5, dest), Some((1234, a("127.0.0.2:8080"))));
        assert_eq!(t.get(5, a("127.77.0.9:81")), None, "other port");
        assert_eq!(t.get(5 + FD_SLOTS as i32, dest), None, "colliding fd");
        let mapped = a("[::ffff:127.77.0.9]:80");
        assert_eq!(
            t.get(5, mapped),
            Some((1234, a("127.0.0.2:8080"))),
            "mapped form"
        );
        t.remove(5, 9999);
        assert!(t.get(5, dest).is_some(), "remove needs the same socket");
        t.remove(5, 1234);
        assert_eq!(t.get(5, dest), None);
        t.put(7, 1, dest, a("[fd00::2]:443"));
        assert_eq!(t.get(7, dest), Some((1, a("[fd00::2]:443"))));
    }

    #[test]
    fn a_slot_being_written_reads_as_empty_and_refuses_a_second_writer() {
        let s: Slot<2> = Slot::new();
        assert!(s.write([1, 2]));
        assert_eq!(s.read(), Some([1, 2]));
        s.seq.fetch_add(1, Ordering::Relaxed); // a writer interrupted mid-write
        assert_eq!(s.read(), None);
        assert!(!s.write([3, 4]));
    }

    #[test]
    fn holds_skip_a_backend_until_their_time() {
        let h = Holds::new();
        assert!(!h.any());
        h.put(a("127.0.0.2:8080"), 1000);
        h.put(a("[fd00::2]:443"), 500);
        assert!(h.any());
        let mut out = [Some(a("127.0.0.9:1")), None, None];
        h.fill(&mut out, 400);
        assert_eq!(
            out,
            [
                Some(a("127.0.0.9:1")),
                Some(a("127.0.0.2:8080")),
                Some(a("[fd00::2]:443"))
            ]
        );
        let mut out = [None, None];
        h.fill(&mut out, 600);
        assert_eq!(out, [Some(a("127.0.0.2:8080")), None], "one hold ended");
        let mut out = [None];
        h.fill(&mut out, 1000);
        assert_eq!(out, [None]);
    }

    #[test]
    fn learned_backends_are_kept_once_each() {
        let l = Learned::new();
        let dest = a("127.77.0.9:80");
        for _ in 0..3 {
            l.put(dest, a("127.0.0.2:8080"));
            l.put(dest, a("127.0.0.3:8080"));
        }
        let mut seen = [0usize; 2];
        l.scan(&mut |r| {
            assert_eq!(from_mapped(r.magic), dest.ip());
            assert_eq!(r.client_port, 80);
            let i = usize::from(r.backend == to_mapped(a("127.0.0.3:8080").ip()));
            seen[i] += 1;
        });
        assert!(
            seen == [1, 1] || seen == [0, 1] || seen == [1, 0],
            "{seen:?}"
        );
    }
}
