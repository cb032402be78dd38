//! The pick: one backend for one connect, read from the shared table and the live counters.
//! The hook runs it on every connect to a magic address; the daemon runs the same function to
//! answer hooks that ask over the socket and to explain the next pick (`discotech resolve`),
//! so the explanation and the connects agree by construction.
//!
//! Allocation-free and panic-free. With `advance` false nothing changes (a dry run).
//!
//! - round robin and weighted round robin turn one counter per service, shared by every
//!   process: the n-th connect of the host gets the n-th turn, whichever process makes it;
//! - random draws by weight from the caller's random bits;
//! - p2c compares connects in flight (per unit of weight) of two weighted-random candidates,
//!   p2c-ewma their latency estimate x (in flight + 1); a backend never measured that already
//!   has a connect in flight costs the most but one, so it is explored one connect at a time;
//!   one whose last connect the daemon saw fail (refused, timed out) costs the most of all;
//! - least-conn takes the fewest established connections (from the daemon's view of the
//!   kernel's socket table) plus connects picked since, per unit of weight; ties go to the
//!   larger weight, then in turn; above [`LEAST_CONN_SCAN`] candidates it compares two;
//! - maglev looks the caller's key up in the table's lookup table.
//!
//! Backends in `exclude` (tried during this connect, or held by this process after a failure)
//! are skipped: the next usable candidate in order takes the turn.

use core::net::SocketAddr;
use core::sync::atomic::Ordering;

use crate::live::Live;
use crate::mix;
use crate::table::{Mem, Policy, STAT_FAILING, STAT_MEASURED, Set, Svc, Table};

/// Above this many candidates least-conn compares two random ones instead of scanning all.
pub const LEAST_CONN_SCAN: u32 = 16;
/// At most this many backends are looked at to spill to (see `spill`).
pub const MAX_SPILL_SCAN: u32 = 1024;

/// One connect's question.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'e> {
    /// The magic address and port the program connected to.
    pub dest: SocketAddr,
    /// The socket can reach IPv6 backends (AF_INET6).
    pub v6_ok: bool,
    /// The caller's affinity key (maglev).
    pub key: u64,
    /// Random bits (random, p2c).
    pub rand: u64,
    /// The turn to use when there are no shared counters (a per-process counter).
    pub local_turn: u32,
    pub exclude: &'e [Option<SocketAddr>],
}

/// What the chosen backend's cost was made of (for explanations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub connections: u32,
    pub in_flight: u32,
    pub latency_us: u32,
    pub measured: bool,
    /// The last connect to it the daemon saw settle failed.
    pub failing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Picked {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The backend's index in its service record and its slot.
    pub backend: u32,
    pub slot: u32,
    pub policy: Policy,
    pub generation: u64,
    /// The connect was counted in flight (the caller, or the daemon, uncounts it).
    pub counted: bool,
    /// The turn used (round robin, weighted, ties), if any.
    pub turn: Option<u32>,
    pub cost: Cost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// No consistent read of the table (being replaced, or not a table).
    Unreadable,
    /// The address is magic but no service has it.
    UnknownService,
    /// The service has no usable backend for this socket.
    NoBackend,
}

struct Ctx<'a, 'e, M: ?Sized> {
    table: &'a Table<'a, M>,
    svc: Svc<'a, M>,
    set: Set<'a, M>,
    port_index: Option<usize>,
    live: Option<Live<'a>>,
    ask: &'a Ask<'e>,
}

impl<M: Mem + ?Sized> Ctx<'_, '_, M> {
    /// Candidate `pos` as (address, slot, weight), unless excluded.
    fn usable(&self, pos: u32) -> Option<(SocketAddr, u32, u32, u32)> {
        let (index, weight) = self.set.candidate(pos)?;
        let b = self.svc.backend(index, self.port_index)?;
        (!self.ask.exclude.contains(&Some(b.addr))).then_some((b.addr, b.slot, weight, index))
    }

    /// Every candidate is excluded (each failed during this connect, or is held): the
    /// service's other serving backends (a lower tier, another zone), the best tier first, in
    /// turn. Better than refusing a connect that one of them would take.
    fn spill(&self, turn: u32) -> Option<(SocketAddr, u32, u32, u32)> {
        let n = self.svc.backend_count().min(MAX_SPILL_SCAN);
        let spare = |i: u32| {
            self.svc.backend(i, self.port_index).filter(|b| {
                b.standing.serving()
                    && (self.ask.v6_ok || b.addr.is_ipv4())
                    && !self.ask.exclude.contains(&Some(b.addr))
            })
        };
        let best = (0..n).filter_map(spare).map(|b| b.priority).min()?;
        let tier = |i: &u32| spare(*i).is_some_and(|b| b.priority == best);
        let k = (0..n).filter(tier).count() as u32;
        let i = (0..n).filter(tier).nth((turn % k.max(1)) as usize)?;
        let b = spare(i)?;
        Some((b.addr, b.slot, u32::from(b.weight), b.index))
    }

    fn first_usable_from(&self, start: u32) -> Option<u32> {
        let c = self.set.count();
        (0..c)
            .map(|i| (start % c).wrapping_add(i) % c)
            .find(|&p| self.usable(p).is_some())
    }

    /// A weighted draw among usable candidates other than `skip`.
    fn draw(&self, r: u32, skip: Option<u32>) -> Option<u32> {
        let c = self.set.count();
        let ok = |p: u32| Some(p) != skip;
        let total: u64 = (0..c)
            .filter(|&p| ok(p))
            .filter_map(|p| self.usable(p).map(|u| u64::from(u.2)))
            .sum();
        if total == 0 {
            // Only zero weights left: any usable one, in turn.
            return (0..c)
                .map(|i| (r % c.max(1)).wrapping_add(i) % c)
                .find(|&p| ok(p) && self.usable(p).is_some());
        }
        let mut x = u64::from(r) % total;
        for p in (0..c).filter(|&p| ok(p)) {
            if let Some(u) = self.usable(p) {
                let w = u64::from(u.2);
                if x < w {
                    return Some(p);
                }
                x -= w;
            }
        }
        None
    }

    fn cost(&self, policy: Policy, slot: u32) -> (u64, Cost) {
        let in_flight = self.live.map_or(0, |l| l.in_flight_count(slot));
        let flags = self.table.stat(slot, 2);
        let c = Cost {
            connections: self.table.stat(slot, 0),
            in_flight,
            latency_us: self.table.stat(slot, 1),
            measured: flags & STAT_MEASURED != 0,
            failing: flags & STAT_FAILING != 0,
        };
        let value = match policy {
            // A backend whose last connect failed loses to any other, even one being explored.
            _ if c.failing => u64::MAX,
            Policy::P2cEwma if !c.measured && in_flight > 0 => u64::MAX - 1,
            Policy::P2cEwma => u64::from(c.latency_us) * (u64::from(in_flight) + 1),
            Policy::LeastConn => u64::from(c.connections) + u64::from(in_flight),
            _ => u64::from(in_flight),
        };
        (value, c)
    }

    /// a's cost per unit of weight is below b's (ties: the larger weight).
    fn better(a: (u64, u32), b: (u64, u32)) -> bool {
        let (wa, wb) = (u128::from(a.1.max(1)), u128::from(b.1.max(1)));
        let (l, r) = (u128::from(a.0) * wb, u128::from(b.0) * wa);
        l < r || (l == r && a.1 > b.1)
    }

    fn two_choices(&self, policy: Policy) -> Option<u32> {
        let (r1, r2) = (self.ask.rand as u32, (self.ask.rand >> 32) as u32);
        let a = self.draw(r1, None)?;
        let Some(b) = self.draw(r2, Some(a)) else {
            return Some(a);
        };
        let of = |p: u32| {
            let u = self.usable(p)?;
            Some((self.cost(policy, u.1).0, u.2))
        };
        Some(match (of(a), of(b)) {
            (Some(ca), Some(cb)) if Self::better(cb, ca) => b,
            _ => a,
        })
    }
}

/// Chooses a backend for `ask`; see the module docs. `live` is used only if it is the region
/// the table's slots refer to.
///
/// # Errors
/// [`Miss`] when there is nothing to connect to, or no consistent read of the table.
pub fn pick<M: Mem + ?Sized>(
    table: &Table<'_, M>,
    live: Option<Live<'_>>,
    ask: &Ask<'_>,
    advance: bool,
) -> Result<Picked, Miss> {
    let mut turn_taken: Option<u32> = None;
    let mut miss = Miss::Unreadable;
    let found = table.read(|area| {
        let live = live.filter(|l| l.epoch() == area.live_epoch());
        let Some(svc) = area.service(ask.dest.ip()) else {
            miss = Miss::UnknownService;
            return None;
        };
        let (Some(policy), Some(set)) = (svc.policy(), svc.set(ask.v6_ok)) else {
            miss = Miss::Unreadable;
            return None;
        };
        miss = Miss::NoBackend;
        if set.count() == 0 {
            return None;
        }
        let cx = Ctx {
            table,
            svc,
            set,
            port_index: svc.port_index(ask.dest.port()),
            live,
            ask,
        };
        let counter = live.and_then(|l| l.rr(svc.rr_slot()));
        let mut turn = || {
            *turn_taken.get_or_insert_with(|| match counter {
                Some(c) if advance => u32::from_le(c.fetch_add(1u32.to_le(), Ordering::Relaxed)),
                Some(c) => u32::from_le(c.load(Ordering::Relaxed)),
                None => ask.local_turn,
            })
        };
        let c = set.count();
        let pos = match policy {
            Policy::RoundRobin => cx.first_usable_from(turn() % c),
            Policy::WeightedRoundRobin => match set.schedule_len() {
                0 => cx.first_usable_from(turn() % c),
                l => cx.first_usable_from(set.schedule(turn() % l).unwrap_or(0)),
            },
            Policy::Random => cx.draw(ask.rand as u32, None),
            Policy::P2c | Policy::P2cEwma => cx.two_choices(policy),
            Policy::LeastConn if c > LEAST_CONN_SCAN => cx.two_choices(policy),
            Policy::LeastConn => {
                let entry = |p: u32| cx.usable(p).map(|u| (cx.cost(policy, u.1).0, u.2));
                let best = (0..c)
                    .filter_map(entry)
                    .reduce(|a, b| if Ctx::<M>::better(b, a) { b } else { a });
                best.and_then(|best| {
                    let tied = |p: &u32| {
                        entry(*p).is_some_and(|e| {
                            !Ctx::<M>::better(best, e) && !Ctx::<M>::better(e, best)
                        })
                    };
                    let ties = (0..c).filter(tied).count() as u32;
                    let nth = turn() % ties.max(1);
                    (0..c).filter(tied).nth(nth as usize)
                })
            }
            Policy::Maglev => match set.maglev_len() {
                0 => cx.draw(mix(ask.key) as u32, None),
                m => cx.first_usable_from(set.maglev((mix(ask.key) % u64::from(m)) as u32)?),
            },
        };
        let (addr, slot, _, backend) = match pos.and_then(|p| cx.usable(p)) {
            Some(u) => u,
            None => cx.spill(ask.local_turn ^ ask.rand as u32)?,
        };
        let (_, cost) = cx.cost(policy, slot);
        let counted = advance && policy.counts_in_flight() && live.is_some();
        Some((
            Picked {
                addr,
                backend,
                slot,
                policy,
                generation: area.generation(),
                counted,
                turn: turn_taken,
                cost,
            },
            live,
        ))
    });
    let (mut picked, live) = found.ok_or(miss)?;
    if picked.counted {
        match live.and_then(|l| l.in_flight(picked.slot)) {
            Some(c) => {
                c.fetch_add(1u32.to_le(), Ordering::Relaxed);
            }
            None => picked.counted = false,
        }
    }
    Ok(picked)
}

/// Uncounts a connect counted in flight by [`pick`] (it returned, or the daemon saw it end).
pub fn uncount(live: &Live<'_>, slot: u32) {
    if let Some(c) = live.in_flight(slot) {
        c.fetch_sub(1u32.to_le(), Ordering::Relaxed);
    }
}
