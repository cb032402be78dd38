//! Slots in the live region and the stats: given out to services (round-robin counters) and
//! their backends (counters, stats), kept while they stay, and rested for [`SLOT_REST`] after
//! they leave so that a hook still on an older generation never counts for a stranger.

use super::*;

/// Slots given out and taken back; a slot taken back rests for [`SLOT_REST`] before it is
/// given out again.
pub(super) struct SlotPool {
    free: Vec<u32>,
    resting: VecDeque<(u32, Instant)>,
    next: u32,
    limit: u32,
}

impl SlotPool {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            free: Vec::new(),
            resting: VecDeque::new(),
            next: 0,
            limit,
        }
    }

    /// A slot for a newcomer, listed in `fresh` (`NO_SLOT` when all are taken).
    pub(super) fn take(&mut self, now: Instant, fresh: &mut Vec<u32>) -> u32 {
        while let Some(&(s, at)) = self.resting.front() {
            if now.saturating_duration_since(at) < SLOT_REST {
                break;
            }
            self.resting.pop_front();
            self.free.push(s);
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.next < self.limit => {
                self.next += 1;
                self.next - 1
            }
            None => return NO_SLOT,
        };
        fresh.push(slot);
        slot
    }

    pub(super) fn give_back(&mut self, slot: u32, now: Instant) {
        self.resting.push_back((slot, now));
    }
}

/// Slots by key (services: their round-robin counters).
pub(super) struct SlotMap<K> {
    by_key: HashMap<K, u32>,
    pool: SlotPool,
}

impl<K: std::hash::Hash + Eq + Clone> SlotMap<K> {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            by_key: HashMap::new(),
            pool: SlotPool::new(limit),
        }
    }

    /// The slot of `key`, assigned now if it has none (`NO_SLOT` when all are taken).
    pub(super) fn get(&mut self, key: &K, now: Instant, fresh: &mut Vec<u32>) -> u32 {
        if let Some(&s) = self.by_key.get(key) {
            return s;
        }
        let slot = self.pool.take(now, fresh);
        if slot != NO_SLOT {
            self.by_key.insert(key.clone(), slot);
        }
        slot
    }

    /// Releases the slot of `key`, if it has one.
    pub(super) fn release(&mut self, key: &K, now: Instant) {
        if let Some(slot) = self.by_key.remove(key) {
            self.pool.give_back(slot, now);
        }
    }
}

/// Gives back `slot`, which `addr` of `service` held.
pub(super) fn release_backend(
    w: &mut Writer,
    service: &ServiceName,
    addr: SocketAddr,
    slot: u32,
    now: Instant,
) {
    if slot == NO_SLOT {
        return;
    }
    w.backends.give_back(slot, now);
    if let Some(owner) = w.owners.get_mut(slot as usize) {
        *owner = None;
    }
    debug!(%service, backend = %addr, slot, "backend slot freed");
}

/// What slot `slots[i]` of a cached service stands for.
pub(super) fn slot_info(c: &Cached, i: usize) -> Option<SlotInfo> {
    let b = c.service.spec.backends.get(i)?;
    let mut ports = vec![b.addr.port()];
    ports.extend(b.ports().values().copied());
    ports.sort_unstable();
    ports.dedup();
    Some(SlotInfo {
        service: c.service.name().clone(),
        backend: b.addr,
        ports,
        policy: c.service.spec.lb,
    })
}
