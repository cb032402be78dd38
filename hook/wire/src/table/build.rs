//! Encoding a generation: the daemon's side of the table. Each service record is
//! position-independent (its offsets are relative to its own start), so the daemon can keep
//! the encoded record of a service that did not change and copy it into the next generation.
//!
//! Runs in the daemon only (never in a hooked process); its indexing is over lengths it has
//! just computed.
#![allow(clippy::indexing_slicing)]

use alloc::vec;
use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::sync::atomic::{AtomicU32, Ordering};

use super::{
    AREA_HEADER, BACKEND_WORDS, INDEX_WORDS, NO_V6, Policy, SERVICE_HEADER, Standing, index_hash,
};
use crate::to_mapped;

/// A backend as the daemon describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u16,
    pub priority: u16,
    /// Its slot in the live counters and the stats (`NO_SLOT`: none).
    pub slot: u32,
    /// Its port for each of the service's client-port mappings, in order.
    pub ports: Vec<u16>,
    pub standing: Standing,
}

/// The candidates for one socket family, with what the policies need precomputed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PickSet {
    /// (backend index, effective weight), in order.
    pub candidates: Vec<(u32, u32)>,
    /// Smooth weighted round robin: candidate positions in turn.
    pub schedule: Vec<u32>,
    /// Maglev: the candidate position owning each slot.
    pub maglev: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service<'a> {
    pub name: &'a str,
    pub policy: Policy,
    /// Service flags ([`super::SVC_PREFETCH`]), stored above the policy byte.
    pub flags: u32,
    /// Its round-robin counter in the live region (`NO_SLOT`: none).
    pub rr_slot: u32,
    pub client_ports: Vec<u16>,
    pub backends: Vec<Backend>,
    pub v4: PickSet,
    /// For IPv6 sockets; None when it is the same as `v4` (no IPv6 backends).
    pub v6: Option<PickSet>,
}

fn push_addr(out: &mut Vec<u32>, ip: IpAddr) {
    let v = u128::from(to_mapped(ip));
    for k in (0..4).rev() {
        out.push((v >> (32 * k)) as u32);
    }
}

fn push_set(out: &mut Vec<u32>, set: &PickSet) {
    let total: u64 = set.candidates.iter().map(|&(_, w)| u64::from(w)).sum();
    out.extend([
        set.candidates.len() as u32,
        u32::try_from(total).unwrap_or(u32::MAX),
        set.schedule.len() as u32,
        set.maglev.len() as u32,
    ]);
    for &(i, w) in &set.candidates {
        out.extend([i, w]);
    }
    out.extend(&set.schedule);
    for pair in set.maglev.chunks(2) {
        let lo = u32::from(pair.first().copied().unwrap_or(0));
        let hi = u32::from(pair.get(1).copied().unwrap_or(0));
        out.push(lo | hi << 16);
    }
}

/// One service record, in host words (see the module docs of `table` for the layout).
pub fn service(s: &Service<'_>) -> Vec<u32> {
    let (n, m) = (s.backends.len(), s.client_ports.len());
    let mut out = vec![0u32; SERVICE_HEADER];
    let mut fields = [0u32; SERVICE_HEADER];
    fields[super::S_POLICY] = s.policy as u32 | (s.flags & 0xff_ffff) << 8;
    fields[super::S_RR_SLOT] = s.rr_slot;
    fields[super::S_BACKENDS] = n as u32;
    fields[super::S_PORTS] = m as u32;
    fields[super::S_PORT_LIST] = out.len() as u32;
    out.extend(s.client_ports.iter().map(|&p| u32::from(p)));
    fields[super::S_BACKEND_LIST] = out.len() as u32;
    for b in &s.backends {
        push_addr(&mut out, b.addr.ip());
        out.extend([
            u32::from(b.addr.port()),
            u32::from(b.weight) | u32::from(b.priority) << 16,
            b.slot,
            b.standing.word(),
        ]);
        debug_assert_eq!(
            (out.len() - fields[super::S_BACKEND_LIST] as usize) % BACKEND_WORDS,
            0
        );
    }
    fields[super::S_PORT_MATRIX] = out.len() as u32;
    for b in &s.backends {
        for k in 0..m {
            out.push(u32::from(b.ports.get(k).copied().unwrap_or(b.addr.port())));
        }
    }
    fields[super::S_SET_V4] = out.len() as u32;
    push_set(&mut out, &s.v4);
    fields[super::S_SET_V6] = match &s.v6 {
        Some(v6) => {
            let at = out.len() as u32;
            push_set(&mut out, v6);
            at
        }
        None => fields[super::S_SET_V4],
    };
    fields[super::S_NAME] = out.len() as u32;
    let name = s.name.as_bytes();
    out.push(name.len() as u32);
    for chunk in name.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        out.push(u32::from_le_bytes(w));
    }
    fields[super::S_LEN] = out.len() as u32;
    out[..SERVICE_HEADER].copy_from_slice(&fields);
    out
}

/// What a generation says besides its services.
#[derive(Clone, Copy, Debug)]
pub struct AreaInfo {
    pub generation: u64,
    pub magic_v4: (Ipv4Addr, u8),
    pub magic_v6: Option<(Ipv6Addr, u8)>,
    pub live_epoch: u64,
}

/// One service record of a generation: newly encoded words (from [`service`], host order), or
/// a record already in a mapped table, copied as it is.
#[derive(Clone, Copy, Debug)]
pub enum Record<'r> {
    New(&'r [u32]),
    Mapped(&'r [AtomicU32]),
}

impl Record<'_> {
    pub fn len(&self) -> usize {
        match self {
            Self::New(w) => w.len(),
            Self::Mapped(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Words an area is written into, in the file's little-endian order: a vector, or the
/// inactive area of a mapped table.
pub(super) trait Sink {
    fn get(&self, i: usize) -> u32;
    fn set(&mut self, i: usize, le: u32);
}

impl Sink for [u32] {
    fn get(&self, i: usize) -> u32 {
        self[i]
    }
    fn set(&mut self, i: usize, le: u32) {
        self[i] = le;
    }
}

impl Sink for &[AtomicU32] {
    fn get(&self, i: usize) -> u32 {
        self[i].load(Ordering::Relaxed)
    }
    fn set(&mut self, i: usize, le: u32) {
        self[i].store(le, Ordering::Relaxed);
    }
}

/// Index slots for `addrs` magic addresses: at most half full.
fn index_slots(addrs: usize) -> usize {
    (addrs * 2).max(8).next_power_of_two()
}

/// The words a generation of these services takes.
pub fn area_len(services: &[(&[IpAddr], Record<'_>)]) -> usize {
    let addrs: usize = services.iter().map(|(a, _)| a.len()).sum();
    let records: usize = services.iter().map(|(_, r)| r.len()).sum();
    AREA_HEADER + index_slots(addrs) * INDEX_WORDS + records
}

/// Writes a whole generation into `out` (at least [`area_len`] words): the area header, the
/// index by magic address, and the records, each record's position pushed to `placed`. The
/// first word (the area's sequence) is left alone. Returns the words used.
pub(super) fn write_area<S: Sink + ?Sized>(
    out: &mut S,
    info: &AreaInfo,
    services: &[(&[IpAddr], Record<'_>)],
    placed: &mut Vec<u32>,
) -> usize {
    let addrs: usize = services.iter().map(|(a, _)| a.len()).sum();
    let slots = index_slots(addrs);
    let index_at = AREA_HEADER;
    let (v6_net, v6_len) = match info.magic_v6 {
        Some((net, len)) => (net, u32::from(len)),
        None => (Ipv6Addr::UNSPECIFIED, NO_V6),
    };
    let mut head = Vec::with_capacity(AREA_HEADER);
    head.extend([
        0,
        info.generation as u32,
        (info.generation >> 32) as u32,
        0,
        u32::from(info.magic_v4.0),
        u32::from(info.magic_v4.1),
    ]);
    push_addr(&mut head, IpAddr::V6(v6_net));
    head.extend([
        v6_len,
        slots as u32,
        index_at as u32,
        services.len() as u32,
        info.live_epoch as u32,
        (info.live_epoch >> 32) as u32,
    ]);
    for (i, &w) in head.iter().enumerate().skip(1) {
        out.set(i, w.to_le());
    }
    for i in index_at..index_at + slots * INDEX_WORDS {
        out.set(i, 0);
    }
    let mut at = index_at + slots * INDEX_WORDS;
    let mut key_words = Vec::with_capacity(4);
    for (magics, record) in services {
        placed.push(at as u32);
        match record {
            Record::New(words) => {
                for (i, &w) in words.iter().enumerate() {
                    out.set(at + i, w.to_le());
                }
            }
            Record::Mapped(words) => {
                for (i, w) in words.iter().enumerate() {
                    out.set(at + i, w.load(Ordering::Relaxed));
                }
            }
        }
        for &ip in *magics {
            let key = to_mapped(ip);
            let mut i = index_hash(key) as usize & (slots - 1);
            while out.get(index_at + i * INDEX_WORDS + 4) != 0 {
                i = (i + 1) & (slots - 1);
            }
            let e = index_at + i * INDEX_WORDS;
            key_words.clear();
            push_addr(&mut key_words, IpAddr::V6(key));
            for (j, &w) in key_words.iter().enumerate() {
                out.set(e + j, w.to_le());
            }
            out.set(e + 4, (at as u32).to_le());
        }
        at += record.len();
    }
    out.set(super::A_USED, (at as u32).to_le());
    at
}

/// A whole generation in memory: the area header, the index by magic address, and the
/// records. `services` pairs each record (from [`service`]) with its magic addresses. (The
/// daemon writes generations in place, with [`super::publish_records`].)
pub fn area(info: &AreaInfo, services: &[(&[IpAddr], &[u32])]) -> Vec<u32> {
    let records: Vec<(&[IpAddr], Record<'_>)> =
        services.iter().map(|&(m, r)| (m, Record::New(r))).collect();
    let mut out = vec![0u32; area_len(&records)];
    write_area(out.as_mut_slice(), info, &records, &mut Vec::new());
    out
}

/// A smooth weighted round-robin schedule (nginx's): over every `sum(weights)` turns each
/// candidate comes up exactly its weight's number of times, interleaved. Weights are reduced
/// by their common divisor and scaled down to at most `max_len` turns (each keeping at least
/// one) first.
pub fn smooth_schedule(weights: &[u32], max_len: usize) -> Vec<u32> {
    let g = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
    if g == 0 {
        return Vec::new();
    }
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x / g)).collect();
    let sum: u64 = w.iter().sum();
    if sum > max_len as u64 {
        for x in &mut w {
            if *x > 0 {
                *x = (*x * max_len as u64 / sum).max(1);
            }
        }
    }
    let total: i64 = w.iter().map(|&x| x as i64).sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &x) in w.iter().enumerate() {
            current[i] += x as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}
