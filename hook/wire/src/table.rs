//! The shared routing table: what hooked processes map read-only to pick a backend at connect
//! time without asking the daemon. The daemon writes it (`hook.snapshot` beside the hook
//! socket); it is also what the hook routes with while the daemon is down. One format for both.
//!
//! The file is an array of 32-bit little-endian words (host byte order on every supported
//! target), read and written with atomic word operations only, so concurrent readers and the
//! writer never race in the language's sense. Every offset read from the file is bounds-checked
//! against the mapping: a corrupt or hostile file can make a read fail, never make it stray.
//!
//! ```text
//! header, 16 words
//!  0  2  "DTTABLE1"
//!  2  1  version (1)
//!  3  1  flags: bit 0 superseded (the daemon replaced the file: open the path again)
//!  4  1  words per area (A)
//!  5  1  stat slots (S)
//!  6  1  active area (0 or 1)
//!  7  1  pid of the daemon that wrote it (informational)
//!  8  8  reserved
//! area 0 at word 16, area 1 at word 16 + A, A words each (one generation each)
//! stats at word 16 + 2A: S slots of 4 words, updated in place by the daemon:
//!  0 established connections to the backend (least-conn), 1 p2c-ewma latency estimate in µs,
//!  2 flags: bit 0 measured, bit 1 failing (its last connect seen failed), 3 reserved
//! ```
//!
//! Generations are double-buffered: the daemon writes the inactive area under its own
//! sequence word (odd while writing), then makes it active. A reader reads the active area and
//! checks that its sequence word did not change, so it never uses half of one generation, and
//! never waits: the writer never touches the active area.
//!
//! ```text
//! area, 16 words, then the index and the service records
//!  0  1  sequence (even: complete)        8  4  (continued: IPv6 magic network)
//!  1  2  generation                     10  1  IPv6 magic prefix length, 255: none
//!  3  1  words used                      11  1  index slots (a power of two)
//!  4  1  IPv4 magic network              12  1  index offset
//!  5  1  IPv4 magic prefix length        13  1  services
//!  6  4  IPv6 magic network              14  2  live region epoch (see `live`)
//! index: slots x 5 words: magic address (4 words, v4 as mapped), service record offset (0: empty)
//! service record, offsets inside it relative to its start (so a record can be copied whole):
//!  0  policy (low byte) | flags << 8     6  port matrix offset (n x m words)
//!  1  round-robin counter slot (live)    7  pick set for IPv4-only sockets, offset
//!  2  backends n                         8  pick set for IPv6 sockets, offset
//!  3  client ports m                     9  name offset (byte length, then the bytes)
//!  4  client port list offset (m words) 10  record length in words
//!  5  backend list offset (n x 8 words) 11  reserved
//! service flags: bit 0 prefetch (the daemon pools connections to the backends: ask it first)
//! backend: address (4 words), default port, weight | priority << 16, stat slot,
//!   standing: bit 0 serving (not ejected or held), bits 8-15 why it is or is not a candidate
//! pick set: candidates c, their total weight, schedule length L, maglev length M, then
//!   c x (backend index, effective weight), L schedule entries (candidate positions),
//!   M maglev entries (candidate positions, two u16 to a word, low half first)
//! ```
//! A pick set holds what every policy needs precomputed: the candidates after health, tiers,
//! zone preference and slow start, the smooth weighted round-robin schedule, and the maglev
//! lookup table.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::sync::atomic::{AtomicU32, Ordering, fence};

use crate::{from_mapped, to_mapped};

pub const TABLE_MAGIC: [u32; 2] = [u32::from_le_bytes(*b"DTTA"), u32::from_le_bytes(*b"BLE1")];
pub const TABLE_VERSION: u32 = 1;
pub const HEADER_WORDS: usize = 16;
pub const AREA_HEADER: usize = 16;
pub const INDEX_WORDS: usize = 5;
pub const SERVICE_HEADER: usize = 12;
pub const BACKEND_WORDS: usize = 8;
pub const SET_HEADER: usize = 4;
pub const STAT_WORDS: usize = 4;
/// "No slot": a backend or service without live counters.
pub const NO_SLOT: u32 = u32::MAX;
const NO_V6: u32 = 255;
/// Service flag: the daemon keeps established connections to this service's backends, so a
/// hook asks it for one (`Kind::Prefetch`) before connecting itself.
pub const SVC_PREFETCH: u32 = 1;
/// Header flag: the daemon replaced this file; open the path again.
pub const FLAG_SUPERSEDED: u32 = 1;
/// Stat flag: the latency estimate comes from measurements.
pub const STAT_MEASURED: u32 = 1;
/// Stat flag: the last connect the daemon saw settle (refused, timed out, or connected) failed.
pub const STAT_FAILING: u32 = 2;

pub(crate) const H_FLAGS: usize = 3;
const H_AREA_WORDS: usize = 4;
const H_STAT_SLOTS: usize = 5;
pub(crate) const H_ACTIVE: usize = 6;
const H_PID: usize = 7;

const A_SEQ: usize = 0;
const A_GEN: usize = 1;
const A_USED: usize = 3;
const A_V4: usize = 4;
const A_V6: usize = 6;
const A_V6_LEN: usize = 10;
const A_INDEX_SLOTS: usize = 11;
const A_INDEX_AT: usize = 12;
const A_SERVICES: usize = 13;
const A_EPOCH: usize = 14;

const S_POLICY: usize = 0;
const S_RR_SLOT: usize = 1;
const S_BACKENDS: usize = 2;
const S_PORTS: usize = 3;
const S_PORT_LIST: usize = 4;
const S_BACKEND_LIST: usize = 5;
const S_PORT_MATRIX: usize = 6;
const S_SET_V4: usize = 7;
const S_SET_V6: usize = 8;
const S_NAME: usize = 9;
const S_LEN: usize = 10;

/// The balancing policies, as numbered in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    RoundRobin = 1,
    WeightedRoundRobin = 2,
    Random = 3,
    P2c = 4,
    P2cEwma = 5,
    LeastConn = 6,
    Maglev = 7,
}

impl Policy {
    pub fn from_word(w: u32) -> Option<Self> {
        Some(match w & 0xff {
            1 => Self::RoundRobin,
            2 => Self::WeightedRoundRobin,
            3 => Self::Random,
            4 => Self::P2c,
            5 => Self::P2cEwma,
            6 => Self::LeastConn,
            7 => Self::Maglev,
            _ => return None,
        })
    }

    /// Policies that read connects in flight: the hook counts its connects for them.
    pub fn counts_in_flight(self) -> bool {
        matches!(self, Self::P2c | Self::P2cEwma | Self::LeastConn)
    }
}

/// Words that can be read one at a time: the mapping (atomics) or a plain buffer (tests, the
/// daemon's own copy).
pub trait Mem {
    fn words(&self) -> usize;
    /// The word at `i` (converted from little-endian), None past the end.
    fn load(&self, i: usize) -> Option<u32>;
}

impl Mem for [AtomicU32] {
    fn words(&self) -> usize {
        self.len()
    }
    fn load(&self, i: usize) -> Option<u32> {
        self.get(i).map(|w| u32::from_le(w.load(Ordering::Relaxed)))
    }
}

impl Mem for [u32] {
    fn words(&self) -> usize {
        self.len()
    }
    fn load(&self, i: usize) -> Option<u32> {
        self.get(i).map(|&w| u32::from_le(w))
    }
}

/// Why a mapping is not a table this crate can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    BadMagic,
    Version(u32),
    /// The header claims more words than the mapping has.
    Size,
}

/// A mapped table: the header checked once, areas read under their sequence words.
#[derive(Debug)]
pub struct Table<'a, M: ?Sized> {
    mem: &'a M,
    area_words: usize,
    stat_slots: usize,
}

/// The number of words a table with these capacities takes.
pub fn table_words(area_words: usize, stat_slots: usize) -> usize {
    HEADER_WORDS + 2 * area_words + stat_slots * STAT_WORDS
}

/// The header of a new table file.
pub fn header(area_words: u32, stat_slots: u32, pid: u32) -> [u32; HEADER_WORDS] {
    let mut h = [0u32; HEADER_WORDS];
    let words = [
        TABLE_MAGIC[0],
        TABLE_MAGIC[1],
        TABLE_VERSION,
        0,
        area_words,
        stat_slots,
        0,
        pid,
    ];
    for (d, s) in h.iter_mut().zip(words) {
        *d = s.to_le();
    }
    h
}

impl<'a, M: Mem + ?Sized> Table<'a, M> {
    /// # Errors
    /// [`TableError`] if the words are not a table of this version, or are shorter than the
    /// header says.
    pub fn new(mem: &'a M) -> Result<Self, TableError> {
        if [mem.load(0), mem.load(1)] != [Some(TABLE_MAGIC[0]), Some(TABLE_MAGIC[1])] {
            return Err(TableError::BadMagic);
        }
        let version = mem.load(2).unwrap_or(0);
        if version != TABLE_VERSION {
            return Err(TableError::Version(version));
        }
        let area_words = mem.load(H_AREA_WORDS).unwrap_or(0) as usize;
        let stat_slots = mem.load(H_STAT_SLOTS).unwrap_or(0) as usize;
        if area_words < AREA_HEADER
            || area_words.checked_mul(2).is_none()
            || table_words(area_words, stat_slots) > mem.words()
        {
            return Err(TableError::Size);
        }
        Ok(Self {
            mem,
            area_words,
            stat_slots,
        })
    }

    pub fn area_words(&self) -> usize {
        self.area_words
    }

    pub fn stat_slots(&self) -> usize {
        self.stat_slots
    }

    pub fn pid(&self) -> u32 {
        self.mem.load(H_PID).unwrap_or(0)
    }

    /// True once the daemon has replaced this file with a new one at the same path.
    pub fn superseded(&self) -> bool {
        self.mem.load(H_FLAGS).unwrap_or(0) & FLAG_SUPERSEDED != 0
    }

    fn area(&self, index: u32) -> Area<'a, M> {
        Area {
            mem: self.mem,
            base: HEADER_WORDS + (index as usize & 1) * self.area_words,
            len: self.area_words,
        }
    }

    /// Runs `f` on the active generation; retries if the daemon changed it meanwhile. None if
    /// `f` found nothing, or no consistent read was possible in a few tries (the caller then
    /// routes as if there were no table). Never waits.
    pub fn read<R>(&self, mut f: impl FnMut(Area<'a, M>) -> Option<R>) -> Option<R> {
        for _ in 0..4 {
            let active = self.mem.load(H_ACTIVE)?;
            fence(Ordering::Acquire);
            let area = self.area(active);
            let s1 = area.w(A_SEQ)?;
            fence(Ordering::Acquire);
            if s1 & 1 == 1 || s1 == 0 {
                core::hint::spin_loop();
                continue;
            }
            let r = f(area);
            fence(Ordering::Acquire);
            if area.w(A_SEQ) == Some(s1) {
                return r;
            }
        }
        None
    }

    /// Stat word `word` of `slot` (updated in place, outside generations).
    pub fn stat(&self, slot: u32, word: usize) -> u32 {
        if slot as usize >= self.stat_slots || word >= STAT_WORDS {
            return 0;
        }
        let at = HEADER_WORDS + 2 * self.area_words + slot as usize * STAT_WORDS + word;
        self.mem.load(at).unwrap_or(0)
    }
}

/// Offset of stat word `word` of `slot` in a table with `area_words` per area.
pub fn stat_index(area_words: usize, slot: u32, word: usize) -> usize {
    HEADER_WORDS + 2 * area_words + slot as usize * STAT_WORDS + word
}

/// One generation.
#[derive(Debug)]
pub struct Area<'a, M: ?Sized> {
    mem: &'a M,
    base: usize,
    len: usize,
}

impl<'a, M: Mem + ?Sized> Area<'a, M> {
    fn w(&self, off: usize) -> Option<u32> {
        if off < self.len {
            self.mem.load(self.base.checked_add(off)?)
        } else {
            None
        }
    }

    fn addr(&self, off: usize) -> Option<Ipv6Addr> {
        let mut v = 0u128;
        for k in 0..4 {
            v = v << 32 | u128::from(self.w(off.checked_add(k)?)?);
        }
        Some(Ipv6Addr::from(v))
    }

    pub fn generation(&self) -> u64 {
        u64::from(self.w(A_GEN).unwrap_or(0)) | u64::from(self.w(A_GEN + 1).unwrap_or(0)) << 32
    }

    /// The epoch of the live region this generation's slots refer to.
    pub fn live_epoch(&self) -> u64 {
        u64::from(self.w(A_EPOCH).unwrap_or(0)) | u64::from(self.w(A_EPOCH + 1).unwrap_or(0)) << 32
    }

    pub fn services(&self) -> u32 {
        self.w(A_SERVICES).unwrap_or(0)
    }

    /// The magic ranges.
    pub fn magic_v4(&self) -> Option<(Ipv4Addr, u8)> {
        let len = self.w(A_V4 + 1)?;
        (len <= 32).then(|| (Ipv4Addr::from(self.w(A_V4).unwrap_or(0)), len as u8))
    }

    pub fn magic_v6(&self) -> Option<(Ipv6Addr, u8)> {
        let len = self.w(A_V6_LEN)?;
        (len <= 128).then(|| (self.addr(A_V6).unwrap_or(Ipv6Addr::UNSPECIFIED), len as u8))
    }

    /// The service with magic address `ip` (either form).
    pub fn service(&self, ip: IpAddr) -> Option<Svc<'a, M>> {
        let key = to_mapped(ip);
        let slots = self.w(A_INDEX_SLOTS)? as usize;
        let at = self.w(A_INDEX_AT)? as usize;
        if slots == 0 || !slots.is_power_of_two() {
            return None;
        }
        let mut i = index_hash(key) as usize & (slots - 1);
        for _ in 0..slots {
            let e = at.checked_add(i.checked_mul(INDEX_WORDS)?)?;
            let record = self.w(e + 4)? as usize;
            if record == 0 {
                return None;
            }
            if self.addr(e)? == key {
                return Some(Svc {
                    area: *self,
                    at: record,
                });
            }
            i = (i + 1) & (slots - 1);
        }
        None
    }

    /// Every service record, in table order (for the daemon's own views and tests).
    pub fn each_service(&self, mut f: impl FnMut(Svc<'a, M>)) {
        let slots = self.w(A_INDEX_SLOTS).unwrap_or(0) as usize;
        let at = self.w(A_INDEX_AT).unwrap_or(0) as usize;
        for i in 0..slots {
            let e = at.saturating_add(i.saturating_mul(INDEX_WORDS));
            if let Some(record) = self.w(e + 4).filter(|&r| r != 0) {
                f(Svc {
                    area: *self,
                    at: record as usize,
                });
            }
        }
    }
}

fn index_hash(ip: Ipv6Addr) -> u32 {
    let v = u128::from(ip);
    let folded = (v as u64) ^ ((v >> 64) as u64).rotate_left(29);
    (crate::mix(folded) >> 32) as u32
}

/// A service record.
#[derive(Debug)]
pub struct Svc<'a, M: ?Sized> {
    area: Area<'a, M>,
    at: usize,
}

/// A backend entry of a service record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub index: u32,
    pub addr: SocketAddr,
    pub weight: u16,
    pub priority: u16,
    pub slot: u32,
    pub standing: Standing,
}

/// Where a backend stands, as the daemon saw it when it wrote the generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// In the pick sets.
    Candidate,
    /// Serving, but in a lower priority tier than the candidates.
    LowerTier,
    /// Serving, but outside the host's zone while the zone has capacity.
    OtherZone,
    /// Ejected, or held after failures (or an unknown standing word).
    Out,
}

impl Standing {
    pub fn word(self) -> u32 {
        match self {
            Self::Candidate => 1,
            Self::LowerTier => 1 | 1 << 8,
            Self::OtherZone => 1 | 2 << 8,
            Self::Out => 3 << 8,
        }
    }

    pub fn from_word(w: u32) -> Self {
        match w {
            1 => Self::Candidate,
            0x101 => Self::LowerTier,
            0x201 => Self::OtherZone,
            _ => Self::Out,
        }
    }

    /// Serving: the hook may spill to it when every candidate failed this connect.
    pub fn serving(self) -> bool {
        !matches!(self, Self::Out)
    }
}

/// A pick set: the candidates for sockets of one family.
#[derive(Debug)]
pub struct Set<'a, M: ?Sized> {
    area: Area<'a, M>,
    at: usize,
}

impl<'a, M: Mem + ?Sized> Svc<'a, M> {
    fn w(&self, off: usize) -> Option<u32> {
        self.area.w(self.at.checked_add(off)?)
    }

    fn rel(&self, field: usize) -> Option<usize> {
        self.at.checked_add(self.w(field)? as usize)
    }

    pub fn policy(&self) -> Option<Policy> {
        Policy::from_word(self.w(S_POLICY)?)
    }

    /// The service flags ([`SVC_PREFETCH`]); none when unreadable.
    pub fn flags(&self) -> u32 {
        self.w(S_POLICY).map_or(0, |w| w >> 8)
    }

    pub fn rr_slot(&self) -> u32 {
        self.w(S_RR_SLOT).unwrap_or(NO_SLOT)
    }

    pub fn backend_count(&self) -> u32 {
        self.w(S_BACKENDS).unwrap_or(0)
    }

    /// The position of `client_port` in the service's client-port mappings, if it has one.
    pub fn port_index(&self, client_port: u16) -> Option<usize> {
        let m = self.w(S_PORTS)? as usize;
        let list = self.rel(S_PORT_LIST)?;
        (0..m.min(u16::MAX as usize))
            .find(|&k| self.area.w(list + k) == Some(u32::from(client_port)))
    }

    /// Backend `index`, with the port for client-port mapping `port_index` (its default port
    /// without one).
    pub fn backend(&self, index: u32, port_index: Option<usize>) -> Option<BackendRef> {
        if index >= self.backend_count() {
            return None;
        }
        let b = self
            .rel(S_BACKEND_LIST)?
            .checked_add((index as usize).checked_mul(BACKEND_WORDS)?)?;
        let ip = from_mapped(self.area.addr(b)?);
        let mut port = self.area.w(b + 4)? as u16;
        if let Some(k) = port_index {
            let m = self.w(S_PORTS)? as usize;
            let cell = self
                .rel(S_PORT_MATRIX)?
                .checked_add((index as usize).checked_mul(m)?.checked_add(k)?)?;
            port = self.area.w(cell)? as u16;
        }
        let wp = self.area.w(b + 5)?;
        Some(BackendRef {
            index,
            addr: SocketAddr::new(ip, port),
            weight: wp as u16,
            priority: (wp >> 16) as u16,
            slot: self.area.w(b + 6)?,
            standing: Standing::from_word(self.area.w(b + 7)?),
        })
    }

    /// The candidates for a socket that can (`v6_ok`) or cannot reach IPv6 backends.
    pub fn set(&self, v6_ok: bool) -> Option<Set<'a, M>> {
        Some(Set {
            area: self.area,
            at: self.rel(if v6_ok { S_SET_V6 } else { S_SET_V4 })?,
        })
    }

    /// Copies the service's name into `buf`; returns its length.
    pub fn name(&self, buf: &mut [u8]) -> usize {
        let Some(at) = self.rel(S_NAME) else { return 0 };
        let len = (self.area.w(at).unwrap_or(0) as usize).min(buf.len());
        for (i, b) in buf.iter_mut().take(len).enumerate() {
            let word = self.area.w(at + 1 + i / 4).unwrap_or(0);
            *b = word.to_le_bytes().get(i % 4).copied().unwrap_or(0);
        }
        len
    }
}

impl<M: Mem + ?Sized> Set<'_, M> {
    fn w(&self, off: usize) -> Option<u32> {
        self.area.w(self.at.checked_add(off)?)
    }

    /// The number of candidates, at most as many as the area has room for: a corrupt count must
    /// not send a pick round billions of absent entries inside someone's connect().
    pub fn count(&self) -> u32 {
        let entries = self.at.saturating_add(SET_HEADER);
        let room = u32::try_from(self.area.len.saturating_sub(entries) / 2).unwrap_or(u32::MAX);
        self.w(0).unwrap_or(0).min(room)
    }

    pub fn total_weight(&self) -> u64 {
        u64::from(self.w(1).unwrap_or(0))
    }

    /// Candidate `pos`: (backend index, effective weight).
    pub fn candidate(&self, pos: u32) -> Option<(u32, u32)> {
        if pos >= self.count() {
            return None;
        }
        let e = SET_HEADER + 2 * pos as usize;
        Some((self.w(e)?, self.w(e + 1)?))
    }

    pub fn schedule_len(&self) -> u32 {
        self.w(2).unwrap_or(0)
    }

    pub fn schedule(&self, i: u32) -> Option<u32> {
        if i >= self.schedule_len() {
            return None;
        }
        self.w(SET_HEADER + 2 * self.count() as usize + i as usize)
    }

    pub fn maglev_len(&self) -> u32 {
        self.w(3).unwrap_or(0)
    }

    pub fn maglev(&self, i: u32) -> Option<u32> {
        if i >= self.maglev_len() {
            return None;
        }
        let base = SET_HEADER + 2 * self.count() as usize + self.schedule_len() as usize;
        let word = self.w(base + i as usize / 2)?;
        Some(if i.is_multiple_of(2) {
            word & 0xffff
        } else {
            word >> 16
        })
    }
}

/// Writes one generation into the inactive area and makes it active. Only the daemon calls
/// this, and only from one thread. `area` comes from [`build::area`]; its first word (the
/// sequence) is ignored.
///
/// # Errors
/// `Err(needed)` if the area does not fit (the daemon then makes a larger file).
pub fn publish(mem: &[AtomicU32], area: &[u32]) -> Result<(), usize> {
    let table = Table::new(mem).map_err(|_| area.len())?;
    if area.len() > table.area_words {
        return Err(area.len());
    }
    let target = (mem.load(H_ACTIVE).unwrap_or(0) & 1) ^ 1;
    let Some(dst) = area_of(mem, &table, target) else {
        return Err(area.len());
    };
    let seq = begin_write(dst);
    for (d, &src) in dst.iter().zip(area).skip(1) {
        d.store(src, Ordering::Relaxed);
    }
    end_write(mem, dst, seq, target);
    Ok(())
}

/// Writes one generation into the inactive area straight from its records and makes it
/// active: [`publish`] of [`build::area`], without the area built in memory first. A
/// [`build::Record::Mapped`] may lie in this table's active area (a service that did not
/// change). Each record's position in the area is pushed to `placed`. Only the daemon calls
/// this, and only from one thread.
///
/// # Errors
/// `Err(needed)` if the generation does not fit (nothing is written then).
pub fn publish_records(
    mem: &[AtomicU32],
    info: &build::AreaInfo,
    services: &[(&[IpAddr], build::Record<'_>)],
    placed: &mut alloc::vec::Vec<u32>,
) -> Result<(), usize> {
    let needed = build::area_len(services);
    let table = Table::new(mem).map_err(|_| needed)?;
    if needed > table.area_words {
        return Err(needed);
    }
    let target = (mem.load(H_ACTIVE).unwrap_or(0) & 1) ^ 1;
    let Some(area) = area_of(mem, &table, target) else {
        return Err(needed);
    };
    let seq = begin_write(area);
    build::write_area(&mut &*area, info, services, placed);
    end_write(mem, area, seq, target);
    Ok(())
}

/// The active area's words, whence a next generation copies the records that did not change.
pub fn active_area(mem: &[AtomicU32]) -> Option<&[AtomicU32]> {
    let table = Table::new(mem).ok()?;
    area_of(mem, &table, mem.load(H_ACTIVE)? & 1)
}

/// Area `index` (0 or 1) of a table's words.
fn area_of<'m>(
    mem: &'m [AtomicU32],
    table: &Table<'_, [AtomicU32]>,
    index: u32,
) -> Option<&'m [AtomicU32]> {
    let base = HEADER_WORDS + index as usize * table.area_words;
    mem.get(base..base + table.area_words)
}

/// Marks an area being written (its sequence odd): a reader still on it (two generations
/// old) retries. Returns the odd sequence.
fn begin_write(area: &[AtomicU32]) -> u32 {
    let s = area
        .first()
        .map_or(0, |w| u32::from_le(w.load(Ordering::Relaxed)));
    let next = if s & 1 == 1 { s } else { s.wrapping_add(1) };
    if let Some(w) = area.first() {
        w.store(next.to_le(), Ordering::Relaxed);
    }
    fence(Ordering::Release);
    next
}

/// Marks an area written (its sequence even again, never 0, which reads as "never written")
/// and makes it the active one.
fn end_write(mem: &[AtomicU32], area: &[AtomicU32], seq: u32, target: u32) {
    let done = seq.wrapping_add(1).max(2);
    if let Some(w) = area.first() {
        w.store(done.to_le(), Ordering::Release);
    }
    if let Some(a) = mem.get(H_ACTIVE) {
        a.store(target.to_le(), Ordering::Release);
    }
}

/// Marks a table file as replaced: readers open the path again.
pub fn supersede(mem: &[AtomicU32]) {
    if let Some(f) = mem.get(H_FLAGS) {
        f.fetch_or(FLAG_SUPERSEDED.to_le(), Ordering::Release);
    }
}

/// Sets stat word `word` of `slot` (the daemon's in-place updates).
pub fn set_stat(mem: &[AtomicU32], area_words: usize, slot: u32, word: usize, value: u32) {
    if let Some(w) = mem.get(stat_index(area_words, slot, word)) {
        w.store(value.to_le(), Ordering::Relaxed);
    }
}

/// Sets the bits of `mask` in stat word `word` of `slot` to those of `value`, leaving the others.
pub fn update_stat(
    mem: &[AtomicU32],
    area_words: usize,
    slot: u32,
    word: usize,
    mask: u32,
    value: u32,
) {
    if let Some(w) = mem.get(stat_index(area_words, slot, word)) {
        let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(((u32::from_le(old) & !mask) | (value & mask)).to_le())
        });
    }
}

// Manual impls: a derive would require `M: Copy`, and these only hold a reference to M.
macro_rules! copy_view {
    ($($t:ident),*) => {$(
        impl<M: ?Sized> Clone for $t<'_, M> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<M: ?Sized> Copy for $t<'_, M> {}
    )*};
}
copy_view!(Table, Area, Svc, Set);

pub mod build;

#[cfg(test)]
mod tests;
