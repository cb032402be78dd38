//! Bounded answer cache for the upstream forwarder, with RFC 2308 negative caching and
//! RFC 8767 serve-stale bookkeeping.
//!
//! It only stores and ages answers; deciding when to ask upstream, and when a stale answer
//! may be served, is left to [`super::forward`]. The clock is passed in (`now`) so tests
//! age entries without sleeping.

use std::sync::Mutex;
use std::time::Duration;

use dashmap::DashMap;
use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::time::Instant;

/// RFC 2308 section 5 leaves the TTL of a negative answer without an SOA to the resolver;
/// a minute keeps misses cheap without pinning a name that is about to appear.
const NEGATIVE_TTL_WITHOUT_SOA: u32 = 60;

/// An answer as cached and as handed back: the sections of one upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub response_code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// Result of a cache lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Unexpired; TTLs already decreased by the entry's age.
    Fresh(Answer),
    /// Expired but within `stale_max` of its expiry; TTLs set to `stale_ttl` (RFC 8767 4).
    Stale(Answer),
    Miss,
}

/// Canonical form of a name for keys: lowercase and fully qualified, so `Example.COM`
/// and `example.com.` share one entry.
pub fn normal_name(name: &Name) -> Name {
    let mut name = name.to_lowercase();
    name.set_fqdn(true);
    name
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    name: Name,
    rtype: RecordType,
    class: DNSClass,
}

impl Key {
    fn of(query: &Query) -> Self {
        Self {
            name: normal_name(&query.name),
            rtype: query.query_type,
            class: query.query_class,
        }
    }
}

#[derive(Debug)]
struct Entry {
    answer: Answer,
    inserted: Instant,
    ttl: u32,
}

impl Entry {
    fn expires(&self) -> Instant {
        // Instant holds i64 seconds on every platform we run on; a u32 TTL cannot overflow it,
        // but fall back to "already expired" rather than panic if it ever did.
        self.inserted
            .checked_add(Duration::from_secs(u64::from(self.ttl)))
            .unwrap_or(self.inserted)
    }
}

/// Answer cache bounded to `capacity` entries.
#[derive(Debug)]
pub struct Cache {
    map: DashMap<Key, Entry>,
    /// Serialises inserts so the size check and the insert cannot race past `capacity`;
    /// lookups never take it, so hits stay on the `DashMap` shard read lock only.
    insert_lock: Mutex<()>,
    capacity: usize,
    max_ttl: u32,
    stale_max: Duration,
    stale_ttl: u32,
}

impl Cache {
    pub fn new(capacity: usize, max_ttl: u32, stale_max: Duration, stale_ttl: u32) -> Self {
        Self {
            map: DashMap::new(),
            insert_lock: Mutex::new(()),
            capacity,
            max_ttl,
            stale_max,
            stale_ttl,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn lookup(&self, query: &Query, now: Instant) -> Lookup {
        let Some(entry) = self.map.get(&Key::of(query)) else {
            return Lookup::Miss;
        };
        let age = now.saturating_duration_since(entry.inserted);
        let age_secs = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        if age_secs < entry.ttl {
            return Lookup::Fresh(map_ttls(&entry.answer, |ttl| ttl.saturating_sub(age_secs)));
        }
        let past_expiry = now.saturating_duration_since(entry.expires());
        if past_expiry <= self.stale_max {
            let stale_ttl = self.stale_ttl;
            return Lookup::Stale(map_ttls(&entry.answer, |_| stale_ttl));
        }
        Lookup::Miss
    }

    /// Stores `answer` for `query` and returns the TTL it was cached with (0: not cached).
    ///
    /// A TTL-0 answer also drops any older entry: it is newer evidence than what we held.
    pub fn insert(&self, query: &Query, answer: &Answer, now: Instant) -> u32 {
        let key = Key::of(query);
        let ttl = cache_ttl(answer, self.max_ttl);
        if ttl == 0 || self.capacity == 0 {
            self.map.remove(&key);
            return 0;
        }
        // Clamp every record so nothing served from cache outlives its entry (and max_ttl).
        let answer = map_ttls(answer, |record_ttl| record_ttl.min(ttl));
        let _guard = self
            .insert_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            self.make_room(now);
        }
        self.map.insert(
            key,
            Entry {
                answer,
                inserted: now,
                ttl,
            },
        );
        ttl
    }

    /// Frees at least one slot: first drop entries too old even to serve stale, then, if
    /// still full, the soonest-expiring eighth (a batch, so a full cache does not rescan
    /// the whole map on every insert). Caller holds `insert_lock`.
    fn make_room(&self, now: Instant) {
        let stale_max = self.stale_max;
        self.map
            .retain(|_, e| now.saturating_duration_since(e.expires()) <= stale_max);
        if self.map.len() < self.capacity {
            return;
        }
        let mut expiries: Vec<Instant> = self.map.iter().map(|e| e.expires()).collect();
        let evict = (self.capacity / 8).clamp(1, expiries.len().max(1));
        if expiries.is_empty() {
            return;
        }
        let (below, threshold, _) = expiries.select_nth_unstable(evict - 1);
        let threshold = *threshold;
        // Entries tied with the threshold are evicted only up to the batch size.
        let mut ties_left = evict - below.iter().filter(|&&e| e < threshold).count();
        self.map.retain(|_, e| {
            let exp = e.expires();
            if exp < threshold {
                false
            } else if exp == threshold && ties_left > 0 {
                ties_left -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// TTL an answer may be cached for: the smallest answer TTL; for NXDOMAIN/NODATA also
/// bounded by min(SOA TTL, SOA MINIMUM) from the authority section (RFC 2308 5), or
/// [`NEGATIVE_TTL_WITHOUT_SOA`]; capped at `max_ttl`.
pub fn cache_ttl(answer: &Answer, max_ttl: u32) -> u32 {
    let mut ttl = answer
        .answers
        .iter()
        .map(|r| r.ttl)
        .min()
        .unwrap_or(u32::MAX);
    let negative = answer.response_code == ResponseCode::NXDomain || answer.answers.is_empty();
    if negative {
        let soa_ttl = answer
            .authorities
            .iter()
            .filter_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
            .min()
            .unwrap_or(NEGATIVE_TTL_WITHOUT_SOA);
        ttl = ttl.min(soa_ttl);
    }
    ttl.min(max_ttl)
}

fn map_ttls(answer: &Answer, f: impl Fn(u32) -> u32) -> Answer {
    let section = |records: &[Record]| -> Vec<Record> {
        records
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.ttl = f(r.ttl);
                r
            })
            .collect()
    };
    Answer {
        response_code: answer.response_code,
        answers: section(&answer.answers),
        authorities: section(&answer.authorities),
        additionals: section(&answer.additionals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use std::net::Ipv4Addr;

    const DAY: Duration = Duration::from_secs(86_400);

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn q(s: &str) -> Query {
        Query::query(name(s), RecordType::A)
    }

    fn a(owner: &str, ttl: u32, last: u8) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::new(10, 0, 0, last))))
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        let data = SOA::new(
            name("ns.example."),
            name("h.example."),
            1,
            60,
            60,
            600,
            minimum,
        );
        Record::from_rdata(name("example."), ttl, RData::SOA(data))
    }

    fn positive(ttls: &[u32]) -> Answer {
        Answer {
            response_code: ResponseCode::NoError,
            answers: ttls.iter().map(|&t| a("www.example.", t, 1)).collect(),
            authorities: vec![],
            additionals: vec![],
        }
    }

    fn negative(code: ResponseCode, authorities: Vec<Record>) -> Answer {
        Answer {
            response_code: code,
            answers: vec![],
            authorities,
            additionals: vec![],
        }
    }

    fn answer_ttls(l: &Lookup) -> Vec<u32> {
        match l {
            Lookup::Fresh(a) | Lookup::Stale(a) => a.answers.iter().map(|r| r.ttl).collect(),
            Lookup::Miss => panic!("expected a hit, got a miss"),
        }
    }

    #[test]
    fn ttl_decrements_with_age_then_expires_then_goes_stale_then_gone() {
        let cache = Cache::new(10, 86_400, Duration::from_secs(100), 30);
        let t0 = Instant::now();
        assert_eq!(
            cache.insert(&q("www.example."), &positive(&[300, 60]), t0),
            60
        );

        // Records are clamped to the entry TTL, then aged; lookup is case-insensitive.
        let hit = cache.lookup(&q("WWW.Example."), t0 + Duration::from_secs(25));
        assert!(matches!(hit, Lookup::Fresh(_)));
        assert_eq!(answer_ttls(&hit), vec![35, 35]);

        let hit = cache.lookup(&q("www.example."), t0 + Duration::from_millis(59_900));
        assert_eq!(answer_ttls(&hit), vec![1, 1], "never 0 while fresh");

        let stale = cache.lookup(&q("www.example."), t0 + Duration::from_secs(60));
        assert!(matches!(stale, Lookup::Stale(_)));
        assert_eq!(answer_ttls(&stale), vec![30, 30]);

        let edge = cache.lookup(&q("www.example."), t0 + Duration::from_secs(160));
        assert!(matches!(edge, Lookup::Stale(_)));
        let gone = cache.lookup(&q("www.example."), t0 + Duration::from_secs(161));
        assert_eq!(gone, Lookup::Miss);
        assert_eq!(cache.lookup(&q("other.example."), t0), Lookup::Miss);
    }

    #[test]
    fn negative_ttl_comes_from_soa() {
        // min(SOA TTL, SOA MINIMUM), both directions.
        let nx = negative(ResponseCode::NXDomain, vec![soa(3600, 120)]);
        assert_eq!(cache_ttl(&nx, 86_400), 120);
        let nx = negative(ResponseCode::NXDomain, vec![soa(90, 900)]);
        assert_eq!(cache_ttl(&nx, 86_400), 90);
        // NODATA (NOERROR, empty answer) is negative too.
        let nodata = negative(ResponseCode::NoError, vec![soa(3600, 45)]);
        assert_eq!(cache_ttl(&nodata, 86_400), 45);
        // No SOA: a fixed default.
        let bare = negative(ResponseCode::NXDomain, vec![]);
        assert_eq!(cache_ttl(&bare, 86_400), NEGATIVE_TTL_WITHOUT_SOA);
        // Caps and zero.
        assert_eq!(cache_ttl(&positive(&[200_000]), 86_400), 86_400);
        assert_eq!(cache_ttl(&positive(&[0, 50]), 86_400), 0);
    }

    #[test]
    fn negative_answer_is_cached_and_aged_with_its_soa() {
        let cache = Cache::new(10, 86_400, DAY, 30);
        let t0 = Instant::now();
        let nx = negative(ResponseCode::NXDomain, vec![soa(3600, 120)]);
        assert_eq!(cache.insert(&q("nope.example."), &nx, t0), 120);
        match cache.lookup(&q("nope.example."), t0 + Duration::from_secs(20)) {
            Lookup::Fresh(a) => {
                assert_eq!(a.response_code, ResponseCode::NXDomain);
                assert_eq!(
                    a.authorities[0].ttl, 100,
                    "SOA TTL clamped to 120 then aged"
                );
            }
            other => panic!("expected fresh NXDOMAIN, got {other:?}"),
        }
    }

    #[test]
    fn ttl_zero_is_not_cached_and_drops_old_entry() {
        let cache = Cache::new(10, 86_400, DAY, 30);
        let t0 = Instant::now();
        cache.insert(&q("www.example."), &positive(&[60]), t0);
        assert_eq!(cache.insert(&q("www.example."), &positive(&[0]), t0), 0);
        assert_eq!(cache.lookup(&q("www.example."), t0), Lookup::Miss);
        assert!(cache.is_empty());
    }

    #[test]
    fn size_is_bounded_and_evicts_soonest_expiring_first() {
        let cache = Cache::new(16, 86_400, DAY, 30);
        let t0 = Instant::now();
        // The first entry expires soonest; everything else has the same longer TTL, so
        // the tie-breaking path is exercised too.
        cache.insert(&q("first.example."), &positive(&[10]), t0);
        for i in 0..200 {
            let n = format!("h{i}.example.");
            assert!(cache.insert(&q(&n), &positive(&[600]), t0) > 0);
            assert!(cache.len() <= 16, "len {} after {i}", cache.len());
        }
        assert_eq!(cache.lookup(&q("first.example."), t0), Lookup::Miss);
        // The most recent insert is always kept.
        assert!(matches!(
            cache.lookup(&q("h199.example."), t0),
            Lookup::Fresh(_)
        ));
        // Updating an existing key at capacity does not evict.
        let before = cache.len();
        cache.insert(&q("h199.example."), &positive(&[700]), t0);
        assert_eq!(cache.len(), before);
    }

    #[test]
    fn full_cache_purges_entries_past_stale_max_first() {
        let cache = Cache::new(4, 86_400, Duration::from_secs(10), 30);
        let t0 = Instant::now();
        for i in 0..3 {
            cache.insert(&q(&format!("old{i}.example.")), &positive(&[5]), t0);
        }
        cache.insert(&q("keep.example."), &positive(&[3600]), t0);
        // Later, the three "old" entries are 15 s past expiry (> stale_max): they go, and
        // the long-lived entry survives even though it is older than the newcomer.
        let t1 = t0 + Duration::from_secs(20);
        cache.insert(&q("new.example."), &positive(&[60]), t1);
        assert_eq!(cache.len(), 2);
        assert!(matches!(
            cache.lookup(&q("keep.example."), t1),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            cache.lookup(&q("new.example."), t1),
            Lookup::Fresh(_)
        ));
    }

    #[test]
    fn zero_capacity_disables_caching() {
        let cache = Cache::new(0, 86_400, DAY, 30);
        let now = Instant::now();
        assert_eq!(cache.insert(&q("www.example."), &positive(&[60]), now), 0);
        assert!(cache.is_empty());
    }
}
