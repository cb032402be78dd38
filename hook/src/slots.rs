//! The hook's process-wide memory, lock-free and fixed-size: which backend each pending connect
//! went to (so a repeated connect() on the same socket goes to the same place), and the
//! backends the daemon named recently (to keep routing when it stops answering).
//!
//! Each slot is a tiny seqlock over atomic words: a writer that finds the slot busy gives up
//! (losing one cache entry is harmless), a reader that sees a write in progress retries a few
//! times and then treats the slot as empty. Nobody ever waits, so a connect from a signal
//! handler that interrupted a writer cannot deadlock.

use core::net::{Ipv6Addr, SocketAddr};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use discotech_wire::fallback::Record;
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

/// fd -> (socket inode, destination asked for, backend chosen) for connects still pending.
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

    pub fn put(&self, fd: i32, ino: u64, dest: SocketAddr, backend: SocketAddr) {
        let (dh, dl) = split(to_mapped(dest.ip()));
        let (bh, bl) = split(to_mapped(backend.ip()));
        let meta =
            u64::from(fd as u32) | u64::from(dest.port()) << 32 | u64::from(backend.port()) << 48;
        if let Some(s) = self.slot(fd) {
            s.write([meta, ino, dh, dl, bh, bl]);
        }
    }

    /// The socket inode and backend of a pending connect on descriptor `fd` to `dest`. The
    /// caller checks the inode (one fstat, only when there is a candidate) to tell the same
    /// socket from a new one that reuses the number.
    pub fn get(&self, fd: i32, dest: SocketAddr) -> Option<(u64, SocketAddr)> {
        let [meta, ino, dh, dl, bh, bl] = self.slot(fd)?.read()?;
        let (dest_port, backend_port) = ((meta >> 32) as u16, (meta >> 48) as u16);
        let same = ino != 0
            && meta as u32 == fd as u32
            && dest_port == dest.port()
            && join(dh, dl) == to_mapped(dest.ip());
        same.then(|| {
            (
                ino,
                SocketAddr::new(from_mapped(join(bh, bl)), backend_port),
            )
        })
    }

    pub fn remove(&self, fd: i32, ino: u64) {
        if let Some(s) = self.slot(fd)
            && s.read().is_some_and(|w| w[1] == ino)
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

const PREFETCH_SLOTS: usize = 16;
/// Picks kept ahead per destination.
pub const PREFETCH_DEPTH: usize = 4;
const PREFETCH_WORDS: usize = 3 + 3 * PREFETCH_DEPTH;

/// Picks the daemon made ahead of time: per (magic address, port, socket family) a short queue,
/// each pick with the time it arrived. A connect that finds a fresh one uses it instead of
/// waiting for a round trip; taking one removes it, so every daemon pick is used at most once
/// and in the daemon's order. A destination hashing to a slot held by another evicts it.
pub struct Prefetched {
    slots: [Slot<PREFETCH_WORDS>; PREFETCH_SLOTS],
}

impl Prefetched {
    pub const fn new() -> Self {
        Self {
            slots: [const { Slot::new() }; PREFETCH_SLOTS],
        }
    }

    fn key(dest: SocketAddr, flags: u8) -> (u64, u64, u64, usize) {
        let (mh, ml) = split(to_mapped(dest.ip()));
        let meta = VALID | u64::from(dest.port()) << 8 | u64::from(flags) << 24;
        let h = (mh ^ ml.rotate_left(17) ^ meta.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0x0100_0000_01b3);
        (meta, mh, ml, (h >> 32) as usize % PREFETCH_SLOTS)
    }

    /// The queue for this key: (count, slot words), or None if the slot holds another key.
    fn queue(
        &self,
        dest: SocketAddr,
        flags: u8,
    ) -> (Option<&Slot<PREFETCH_WORDS>>, [u64; PREFETCH_WORDS], usize) {
        let (meta, mh, ml, i) = Self::key(dest, flags);
        let slot = self.slots.get(i);
        let mut w = slot.and_then(Slot::read).unwrap_or([0; PREFETCH_WORDS]);
        let ours = w.first().is_some_and(|&m| m & 0xffff_ffff == meta)
            && w.get(1) == Some(&mh)
            && w.get(2) == Some(&ml);
        if !ours {
            w = [0; PREFETCH_WORDS];
            if let Some(m) = w.get_mut(0) {
                *m = meta;
            }
            if let Some(h) = w.get_mut(1) {
                *h = mh;
            }
            if let Some(l) = w.get_mut(2) {
                *l = ml;
            }
        }
        let count = w
            .first()
            .map_or(0, |m| (m >> 32) as usize)
            .min(PREFETCH_DEPTH);
        (slot, w, count)
    }

    fn set_count(w: &mut [u64; PREFETCH_WORDS], count: usize) {
        if let Some(m) = w.get_mut(0) {
            *m = (*m & 0xffff_ffff) | (count as u64) << 32;
        }
    }

    /// Appends a pick (dropped if the queue is full).
    pub fn put(&self, dest: SocketAddr, flags: u8, backend: SocketAddr, now_ms: i64) {
        let (slot, mut w, count) = self.queue(dest, flags);
        if count >= PREFETCH_DEPTH {
            return;
        }
        let (bh, bl) = split(to_mapped(backend.ip()));
        let at = 3 + 3 * count;
        for (k, v) in [bh, bl, u64::from(backend.port()) | (now_ms as u64) << 16]
            .into_iter()
            .enumerate()
        {
            if let Some(x) = w.get_mut(at + k) {
                *x = v;
            }
        }
        Self::set_count(&mut w, count + 1);
        if let Some(s) = slot {
            s.write(w);
        }
    }

    /// The oldest pick for this key that is at most `max_age_ms` old; older ones are dropped.
    pub fn take(
        &self,
        dest: SocketAddr,
        flags: u8,
        now_ms: i64,
        max_age_ms: i64,
    ) -> Option<SocketAddr> {
        let (slot, w, count) = self.queue(dest, flags);
        let slot = slot?;
        let mut found = None;
        let mut used = 0;
        while used < count && found.is_none() {
            let at = 3 + 3 * used;
            let (bh, bl, pt) = (w.get(at)?, w.get(at + 1)?, w.get(at + 2)?);
            used += 1;
            if now_ms.saturating_sub((pt >> 16) as i64) <= max_age_ms {
                found = Some(SocketAddr::new(from_mapped(join(*bh, *bl)), *pt as u16));
            }
        }
        if used == 0 {
            return None;
        }
        // Shift the rest to the front.
        let mut out = [0u64; PREFETCH_WORDS];
        for (k, v) in w.iter().take(3).enumerate() {
            if let Some(o) = out.get_mut(k) {
                *o = *v;
            }
        }
        for (k, v) in w
            .iter()
            .skip(3 + 3 * used)
            .take(3 * (count - used))
            .enumerate()
        {
            if let Some(o) = out.get_mut(3 + k) {
                *o = *v;
            }
        }
        Self::set_count(&mut out, count - used);
        if !slot.write(out) {
            return None; // a writer in the way: treat as empty rather than use a pick twice
        }
        found
    }

    /// Picks queued for this key.
    pub fn len(&self, dest: SocketAddr, flags: u8) -> usize {
        self.queue(dest, flags).2
    }

    /// Forgets every pick (they came from a daemon connection that is gone).
    pub fn clear(&self) {
        for s in &self.slots {
            s.write([0; PREFETCH_WORDS]);
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
    fn prefetched_picks_are_used_once_in_order_and_only_while_fresh() {
        let p = Prefetched::new();
        let dest = a("127.77.0.9:80");
        p.put(dest, 0, a("127.0.0.2:8080"), 1000);
        p.put(dest, 0, a("127.0.0.3:8080"), 1100);
        assert_eq!(p.len(dest, 0), 2);
        assert_eq!(p.take(dest, 1, 1000, 500), None, "other socket family");
        assert_eq!(p.take(a("127.77.0.9:81"), 0, 1000, 500), None, "other port");
        assert_eq!(p.take(dest, 0, 1400, 500), Some(a("127.0.0.2:8080")));
        assert_eq!(p.take(dest, 0, 1400, 500), Some(a("127.0.0.3:8080")));
        assert_eq!(p.take(dest, 0, 1400, 500), None, "used once");
        for i in 0..6 {
            p.put(dest, 0, a(&format!("127.0.0.{}:1", 10 + i)), 2000 + i);
        }
        assert_eq!(p.len(dest, 0), PREFETCH_DEPTH, "a full queue drops more");
        // The first two went stale; the third is the oldest fresh one.
        assert_eq!(p.take(dest, 0, 2502, 500), Some(a("127.0.0.12:1")));
        assert_eq!(p.len(dest, 0), 1);
        p.clear();
        assert_eq!(p.take(dest, 0, 2502, 500), None);
        p.put(dest, 0, a("[fd00::1]:443"), 10);
        assert_eq!(p.take(dest, 0, 10, 500), Some(a("[fd00::1]:443")));
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
