//! The live region: counters every hooked process updates with atomic operations, and the
//! ring in which hooks report connects for the daemon to follow up. The daemon creates it as a
//! sealed memfd (it can be neither shrunk nor grown, so no process can make another fault by
//! truncating it) and passes it to hooks over the hook socket. Unlike the table it is writable
//! by every hooked process, so nothing in it is trusted: a counter only weighs between
//! backends the table already allows, and a report only asks the daemon to look.
//!
//! ```text
//! header, 16 words
//!  0  2  "DTLIVE01"            5  1  ring entries R (a power of two)
//!  2  1  version (1)           6  2  epoch (the table names the epoch its slots refer to)
//!  3  1  round-robin slots Q   8  1  ring head (entries ever claimed)
//!  4  1  backend slots B       9  1  1 while the daemon sleeps on the head (futex)
//! round-robin counters: Q words at 16
//! connects in flight per backend: B words at 16 + Q (signed; below zero reads as zero)
//! ring: R entries of 8 words at 16 + Q + B
//!  0 ticket: claimed position + 1, written last    3 local port | remote port << 16
//!  1 kind | errno << 8                              4 connect latency in µs
//!  2 backend slot                                   5 1 if the hook counted it in flight
//! ```

use core::sync::atomic::{AtomicU32, Ordering};

pub const LIVE_MAGIC: [u32; 2] = [u32::from_le_bytes(*b"DTLI"), u32::from_le_bytes(*b"VE01")];
pub const LIVE_VERSION: u32 = 1;
pub const HEADER_WORDS: usize = 16;
pub const ENTRY_WORDS: usize = 8;
const L_RR: usize = 3;
const L_BACKENDS: usize = 4;
const L_RING: usize = 5;
const L_EPOCH: usize = 6;
const L_HEAD: usize = 8;
const L_WAITING: usize = 9;
/// Counts in flight are read as at most this (a hostile writer cannot overflow a cost).
pub const MAX_IN_FLIGHT: u32 = 1 << 20;

/// The number of words a live region with these capacities takes.
pub fn live_words(rr_slots: usize, backend_slots: usize, ring: usize) -> usize {
    HEADER_WORDS + rr_slots + backend_slots + ring * ENTRY_WORDS
}

/// The header of a new live region.
pub fn header(rr_slots: u32, backend_slots: u32, ring: u32, epoch: u64) -> [u32; HEADER_WORDS] {
    let mut h = [0u32; HEADER_WORDS];
    let words = [
        LIVE_MAGIC[0],
        LIVE_MAGIC[1],
        LIVE_VERSION,
        rr_slots,
        backend_slots,
        ring,
        epoch as u32,
        (epoch >> 32) as u32,
    ];
    for (d, s) in h.iter_mut().zip(words) {
        *d = s.to_le();
    }
    h
}

/// The longest a report may wait in the ring before the daemon's reader looks: hooks do not
/// wake the reader for latency samples, so it never sleeps longer than this.
pub const SAMPLE_WAIT_MS: u32 = 100;

/// What a hook reports about one connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// A blocking connect to the backend failed with `errno`.
    Failed { errno: u16 },
    /// A non-blocking connect is under way from `local_port`: the daemon follows it in the
    /// kernel's socket table.
    Pending { local_port: u16 },
    /// A blocking connect took `latency_us` (p2c-ewma services).
    Connected { latency_us: u32 },
}

/// One ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub report: Report,
    pub slot: u32,
    /// The port the connect went to (a backend may listen on several).
    pub remote_port: u16,
    /// The hook counted this connect in flight; the daemon uncounts it when it resolves.
    pub counted: bool,
}

impl Entry {
    fn encode(&self) -> [u32; ENTRY_WORDS - 1] {
        let (kind, errno, local, latency) = match self.report {
            Report::Failed { errno } => (1, errno, 0, 0),
            Report::Pending { local_port } => (2, 0, local_port, 0),
            Report::Connected { latency_us } => (3, 0, 0, latency_us),
        };
        [
            kind | u32::from(errno) << 8,
            self.slot,
            u32::from(local) | u32::from(self.remote_port) << 16,
            latency,
            u32::from(self.counted),
            0,
            0,
        ]
    }

    fn decode(w: &[u32; ENTRY_WORDS - 1]) -> Option<Self> {
        let [kind, slot, ports, latency, counted, ..] = *w;
        let report = match kind & 0xff {
            1 => Report::Failed {
                errno: (kind >> 8) as u16,
            },
            2 => Report::Pending {
                local_port: ports as u16,
            },
            3 => Report::Connected {
                latency_us: latency,
            },
            _ => return None,
        };
        Some(Self {
            report,
            slot,
            remote_port: (ports >> 16) as u16,
            counted: counted == 1,
        })
    }
}

/// What the next ring position holds for a reader at `tail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// The entry; the reader moves on by one.
    Entry(Option<Entry>),
    /// Nothing claimed past `tail` yet.
    Empty,
    /// Claimed but not yet written (or its writer died): look again shortly.
    NotYet,
    /// The writers went round the ring past the reader: continue from this position.
    Lapped(u32),
}

/// A mapped live region.
#[derive(Clone, Copy, Debug)]
pub struct Live<'a> {
    mem: &'a [AtomicU32],
    rr: usize,
    backends: usize,
    ring: usize,
}

fn get(mem: &[AtomicU32], i: usize) -> u32 {
    mem.get(i)
        .map_or(0, |w| u32::from_le(w.load(Ordering::Relaxed)))
}

impl<'a> Live<'a> {
    /// None if the words are not a live region of this version (or shorter than it says).
    pub fn new(mem: &'a [AtomicU32]) -> Option<Self> {
        if [get(mem, 0), get(mem, 1), get(mem, 2)] != [LIVE_MAGIC[0], LIVE_MAGIC[1], LIVE_VERSION] {
            return None;
        }
        let (rr, backends, ring) = (
            get(mem, L_RR) as usize,
            get(mem, L_BACKENDS) as usize,
            get(mem, L_RING) as usize,
        );
        (ring.is_power_of_two() && live_words(rr, backends, ring) <= mem.len()).then_some(Self {
            mem,
            rr,
            backends,
            ring,
        })
    }

    pub fn epoch(&self) -> u64 {
        u64::from(get(self.mem, L_EPOCH)) | u64::from(get(self.mem, L_EPOCH + 1)) << 32
    }

    pub fn rr_slots(&self) -> usize {
        self.rr
    }

    pub fn backend_slots(&self) -> usize {
        self.backends
    }

    /// The round-robin counter of a service slot.
    pub fn rr(&self, slot: u32) -> Option<&'a AtomicU32> {
        ((slot as usize) < self.rr)
            .then(|| self.mem.get(HEADER_WORDS + slot as usize))
            .flatten()
    }

    /// The connects-in-flight counter of a backend slot.
    pub fn in_flight(&self, slot: u32) -> Option<&'a AtomicU32> {
        ((slot as usize) < self.backends)
            .then(|| self.mem.get(HEADER_WORDS + self.rr + slot as usize))
            .flatten()
    }

    /// A backend's connects in flight as a cost: negative (a decrement that raced a reset)
    /// reads as zero, and anything above [`MAX_IN_FLIGHT`] as that.
    pub fn in_flight_count(&self, slot: u32) -> u32 {
        self.in_flight(slot).map_or(0, |c| {
            let v = u32::from_le(c.load(Ordering::Relaxed)) as i32;
            (v.max(0) as u32).min(MAX_IN_FLIGHT)
        })
    }

    fn head(&self) -> Option<&'a AtomicU32> {
        self.mem.get(L_HEAD)
    }

    /// The word the daemon sleeps on (a futex): the ring head.
    pub fn head_word(&self) -> Option<&'a AtomicU32> {
        self.head()
    }

    /// The flag the daemon raises while it sleeps on the head.
    pub fn waiting_word(&self) -> Option<&'a AtomicU32> {
        self.mem.get(L_WAITING)
    }

    fn entry(&self, pos: u32) -> usize {
        HEADER_WORDS + self.rr + self.backends + (pos as usize & (self.ring - 1)) * ENTRY_WORDS
    }

    /// Appends a report. Returns true if the daemon sleeps and wants a wake-up (a futex wake
    /// on [`Live::head_word`], which the caller does: this crate makes no system calls).
    pub fn report(&self, e: &Entry) -> bool {
        let Some(head) = self.head() else {
            return false;
        };
        let pos = head.fetch_add(1, Ordering::SeqCst);
        let at = self.entry(pos);
        for (k, w) in e.encode().into_iter().enumerate() {
            if let Some(dst) = self.mem.get(at + 1 + k) {
                dst.store(w.to_le(), Ordering::Relaxed);
            }
        }
        if let Some(ticket) = self.mem.get(at) {
            ticket.store(pos.wrapping_add(1).to_le(), Ordering::Release);
        }
        self.waiting_word()
            .is_some_and(|w| w.load(Ordering::SeqCst) != 0)
    }

    /// The entry at `tail` (the daemon's reader).
    pub fn take(&self, tail: u32) -> Take {
        let Some(head) = self.head() else {
            return Take::Empty;
        };
        let head = u32::from_le(head.load(Ordering::SeqCst));
        if head == tail {
            return Take::Empty;
        }
        if head.wrapping_sub(tail) > self.ring as u32 {
            return Take::Lapped(head.wrapping_sub(self.ring as u32));
        }
        let at = self.entry(tail);
        let ticket = self
            .mem
            .get(at)
            .map_or(0, |t| u32::from_le(t.load(Ordering::Acquire)));
        if ticket != tail.wrapping_add(1) {
            return Take::NotYet;
        }
        let mut w = [0u32; ENTRY_WORDS - 1];
        for (k, o) in w.iter_mut().enumerate() {
            *o = get(self.mem, at + 1 + k);
        }
        Take::Entry(Entry::decode(&w))
    }
}
