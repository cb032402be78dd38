//! Magic addresses: one stable address per service in each configured range.
//!
//! An address is derived from the service name (FNV-1a, stable across versions and platforms),
//! collisions probe forward deterministically, and the whole map is persisted so an address never
//! changes meaning: once given, it stays with its service across restarts and reloads. When a
//! service goes away its address is quarantined (default 24 h) before anyone else may get it,
//! because clients cache answers; if the service comes back meanwhile it gets its address back.
//! Exhaustion is an error for that service, never silent reuse.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::service::ServiceName;

/// The addresses of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub v4: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6: Option<Ipv6Addr>,
}

/// An address whose service went away, held back until `freed_at + quarantine`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freed {
    pub service: ServiceName,
    #[serde(flatten)]
    pub addrs: Assignment,
    /// Unix seconds.
    pub freed_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MagicError {
    #[error(
        "magic range {range} is exhausted: no address left for service {service} (addresses of removed services stay quarantined)"
    )]
    Exhausted { range: String, service: ServiceName },
}

/// The persisted form (`magic.json` in the state dir).
#[derive(Debug, Default, Serialize, Deserialize)]
struct MagicFile {
    version: u32,
    services: BTreeMap<ServiceName, Assignment>,
    #[serde(default)]
    quarantine: Vec<Freed>,
}

/// The map from services to magic addresses.
#[derive(Debug)]
pub struct MagicMap {
    v4: Ipv4Net,
    v6: Option<Ipv6Net>,
    quarantine: Duration,
    assigned: BTreeMap<ServiceName, Assignment>,
    freed: Vec<Freed>,
    /// Every address assigned or quarantined, kept up to date so one assignment costs O(1).
    taken: HashSet<IpAddr>,
}

/// What `sync` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub changed: bool,
    pub errors: Vec<MagicError>,
}

impl MagicMap {
    pub fn new(v4: Ipv4Net, v6: Option<Ipv6Net>, quarantine: Duration) -> Self {
        Self {
            v4,
            v6,
            quarantine,
            assigned: BTreeMap::new(),
            freed: Vec::new(),
            taken: HashSet::new(),
        }
    }

    /// Restores a persisted map. Entries outside the current ranges are dropped (the range was changed
    /// by the operator) and returned as warnings; a v6 address is added where a v6 range is new.
    ///
    /// # Errors
    /// The file is not valid JSON of the expected shape.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<Vec<String>, serde_json::Error> {
        let file: MagicFile = serde_json::from_slice(bytes)?;
        let mut warnings = Vec::new();
        let mut fits = |name: &ServiceName, a: &mut Assignment| {
            if !self.v4.contains(&a.v4) {
                warnings.push(format!(
                    "{name}: persisted address {} is outside magic_v4 {}; a new one will be given",
                    a.v4, self.v4
                ));
                return false;
            }
            match (self.v6, a.v6) {
                (Some(net), Some(v6)) if !net.contains(&v6) => {
                    warnings.push(format!("{name}: persisted address {v6} is outside magic_v6 {net}; a new one will be given"));
                    a.v6 = None;
                }
                (None, Some(_)) => a.v6 = None,
                _ => {}
            }
            true
        };
        self.assigned = file
            .services
            .into_iter()
            .filter_map(|(n, mut a)| fits(&n, &mut a).then_some((n, a)))
            .collect();
        self.freed = file
            .quarantine
            .into_iter()
            .filter_map(|mut f| fits(&f.service.clone(), &mut f.addrs).then_some(f))
            .collect();
        self.taken = self
            .assigned
            .values()
            .chain(self.freed.iter().map(|f| &f.addrs))
            .flat_map(addrs)
            .collect();
        Ok(warnings)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let file = MagicFile {
            version: 1,
            services: self.assigned.clone(),
            quarantine: self.freed.clone(),
        };
        serde_json::to_vec_pretty(&file).unwrap_or_default()
    }

    pub fn get(&self, service: &ServiceName) -> Option<Assignment> {
        self.assigned.get(service).copied()
    }

    pub fn quarantined(&self) -> &[Freed] {
        &self.freed
    }

    /// Makes the map match the set of live services at time `now` (unix seconds): new services get
    /// addresses, gone services move to quarantine, expired quarantine is released.
    pub fn sync(&mut self, live: &BTreeSet<ServiceName>, now: u64) -> SyncOutcome {
        let mut out = SyncOutcome {
            changed: self.expire(now),
            errors: Vec::new(),
        };
        let gone: Vec<ServiceName> = self
            .assigned
            .keys()
            .filter(|n| !live.contains(*n))
            .cloned()
            .collect();
        for service in gone {
            out.changed |= self.release(&service, now);
        }
        for service in live {
            match self.assign(service) {
                Ok(changed) => out.changed |= changed,
                Err(e) => out.errors.push(e),
            }
        }
        out
    }

    /// Releases quarantined addresses whose time is up; true if any were.
    pub fn expire(&mut self, now: u64) -> bool {
        let quarantine = self.quarantine.as_secs();
        let before = self.freed.len();
        let (keep, done): (Vec<Freed>, Vec<Freed>) = std::mem::take(&mut self.freed)
            .into_iter()
            .partition(|f| now < f.freed_at.saturating_add(quarantine));
        self.freed = keep;
        for f in &done {
            for a in addrs(&f.addrs) {
                self.taken.remove(&a);
            }
        }
        self.freed.len() != before
    }

    /// Moves a service's addresses to quarantine; true if it had any.
    pub fn release(&mut self, service: &ServiceName, now: u64) -> bool {
        match self.assigned.remove(service) {
            Some(addrs) => {
                self.freed.push(Freed {
                    service: service.clone(),
                    addrs,
                    freed_at: now,
                });
                true
            }
            None => false,
        }
    }

    /// Gives `service` its addresses (its old ones if it is back within its quarantine); true if
    /// anything changed.
    ///
    /// # Errors
    /// The range has no address left.
    pub fn assign(&mut self, service: &ServiceName) -> Result<bool, MagicError> {
        if let Some(a) = self.assigned.get_mut(service) {
            if a.v6.is_none() && self.v6.is_some() {
                a.v6 = probe_v6(self.v6, service, &self.taken);
                if let Some(v6) = a.v6 {
                    self.taken.insert(IpAddr::V6(v6));
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        // A service that comes back within its quarantine gets its old addresses back.
        let reclaimed = self
            .freed
            .iter()
            .position(|f| &f.service == service)
            .map(|i| self.freed.swap_remove(i).addrs);
        let a = match reclaimed {
            Some(a) => a,
            None => {
                let v4 = probe_v4(self.v4, service, &self.taken).ok_or_else(|| {
                    MagicError::Exhausted {
                        range: self.v4.to_string(),
                        service: service.clone(),
                    }
                })?;
                self.taken.insert(IpAddr::V4(v4));
                Assignment {
                    v4,
                    v6: probe_v6(self.v6, service, &self.taken),
                }
            }
        };
        self.taken.extend(addrs(&a));
        self.assigned.insert(service.clone(), a);
        Ok(true)
    }
}

fn addrs(a: &Assignment) -> impl Iterator<Item = IpAddr> {
    [Some(IpAddr::V4(a.v4)), a.v6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
}

/// FNV-1a, 64 bit: tiny, and its output never changes between Rust versions (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// First free address from the name's hash, probing forward. Skips the range's first and last
/// address (network and broadcast-looking addresses confuse people and some tools).
fn probe_v4(net: Ipv4Net, service: &ServiceName, taken: &HashSet<IpAddr>) -> Option<Ipv4Addr> {
    let base = u32::from(net.network());
    let usable = (1u64 << (32 - net.prefix_len())) - 2;
    let start = fnv1a(service.as_str().as_bytes()) % usable;
    (0..usable)
        .map(|i| Ipv4Addr::from(base + 1 + u32::try_from((start + i) % usable).unwrap_or(0)))
        .find(|a| !taken.contains(&IpAddr::V4(*a)))
}

fn probe_v6(
    net: Option<Ipv6Net>,
    service: &ServiceName,
    taken: &HashSet<IpAddr>,
) -> Option<Ipv6Addr> {
    let net = net?;
    let base = u128::from(net.network());
    let host_bits = 128 - u32::from(net.prefix_len());
    let usable = if host_bits >= 64 {
        u128::from(u64::MAX)
    } else {
        (1u128 << host_bits) - 2
    };
    let start = u128::from(fnv1a(service.as_str().as_bytes())) % usable;
    // The space is vast; a bounded probe finds a hole long before this runs out.
    (0..usable.min(1 << 20))
        .map(|i| Ipv6Addr::from(base + 1 + (start + i) % usable))
        .find(|a| !taken.contains(&IpAddr::V6(*a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn map(v4: &str) -> MagicMap {
        MagicMap::new(
            v4.parse().unwrap(),
            Some("fd64:d15c::/64".parse().unwrap()),
            Duration::from_secs(DAY),
        )
    }

    fn names(list: &[&str]) -> BTreeSet<ServiceName> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn svc(n: &str) -> ServiceName {
        n.parse().unwrap()
    }

    #[test]
    fn addresses_derive_from_the_name_alone() {
        let mut a = map("127.77.0.0/16");
        let mut b = map("127.77.0.0/16");
        a.sync(&names(&["web", "api"]), 0);
        b.sync(&names(&["api", "db", "web"]), 0);
        assert_eq!(a.get(&svc("web")), b.get(&svc("web")));
        assert_eq!(a.get(&svc("api")), b.get(&svc("api")));
        let web = a.get(&svc("web")).unwrap();
        assert!(
            "127.77.0.0/16"
                .parse::<Ipv4Net>()
                .unwrap()
                .contains(&web.v4)
        );
        assert!(web.v6.is_some());
    }

    #[test]
    fn addresses_stay_across_a_restore() {
        let mut a = map("127.77.0.0/16");
        a.sync(&names(&["web", "api"]), 0);
        let mut b = map("127.77.0.0/16");
        assert!(b.restore(&a.to_json()).unwrap().is_empty());
        let out = b.sync(&names(&["web", "api"]), 10);
        assert!(!out.changed);
        assert_eq!(a.get(&svc("web")), b.get(&svc("web")));
    }

    #[test]
    fn collisions_probe_deterministically_and_a_full_range_is_an_error() {
        // A /28 has 14 usable addresses: 20 services cannot all fit.
        let mut m = map("127.77.0.0/28");
        let all: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = m.sync(&names(&refs), 0);
        assert_eq!(out.errors.len(), 6);
        let given: HashSet<Ipv4Addr> = refs
            .iter()
            .filter_map(|n| m.get(&svc(n)))
            .map(|a| a.v4)
            .collect();
        assert_eq!(given.len(), 14, "every address distinct");
        assert!(
            !given.contains(&"127.77.0.0".parse().unwrap())
                && !given.contains(&"127.77.0.15".parse().unwrap())
        );
        let mut again = map("127.77.0.0/28");
        again.sync(&names(&refs), 0);
        for n in &refs {
            assert_eq!(
                m.get(&svc(n)),
                again.get(&svc(n)),
                "same order of probing gives the same result"
            );
        }
    }

    #[test]
    fn freed_addresses_are_quarantined_then_released() {
        let mut m = map("127.77.0.0/28");
        m.sync(&names(&["web"]), 0);
        let web = m.get(&svc("web")).unwrap();
        m.sync(&names(&[]), 100);
        assert_eq!(m.quarantined().len(), 1);
        // Fill the range: nobody may take web's address while it is quarantined.
        let all: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        m.sync(&names(&refs), 200);
        assert!(
            refs.iter()
                .all(|n| m.get(&svc(n)).is_none_or(|a| a.v4 != web.v4))
        );
        // After the quarantine, the address may be given again.
        let out = m.sync(&names(&refs), 100 + DAY);
        assert!(m.quarantined().is_empty());
        assert!(out.changed);
        assert!(
            refs.iter()
                .any(|n| m.get(&svc(n)).is_some_and(|a| a.v4 == web.v4))
        );
    }

    #[test]
    fn a_service_back_within_quarantine_gets_its_address_back() {
        let mut m = map("127.77.0.0/16");
        m.sync(&names(&["web"]), 0);
        let web = m.get(&svc("web")).unwrap();
        m.sync(&names(&[]), 10);
        m.sync(&names(&["web"]), 20);
        assert_eq!(m.get(&svc("web")), Some(web));
        assert!(m.quarantined().is_empty());
    }

    #[test]
    fn a_changed_range_reassigns_and_says_so() {
        let mut a = map("127.77.0.0/16");
        a.sync(&names(&["web"]), 0);
        let mut b = MagicMap::new(
            "127.88.0.0/16".parse().unwrap(),
            None,
            Duration::from_secs(DAY),
        );
        let warnings = b.restore(&a.to_json()).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("outside magic_v4"));
        b.sync(&names(&["web"]), 1);
        assert!(
            b.get(&svc("web"))
                .unwrap()
                .v4
                .to_string()
                .starts_with("127.88.")
        );
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_panic() {
        assert!(map("127.77.0.0/16").restore(b"{\"services\": 3").is_err());
    }
}
