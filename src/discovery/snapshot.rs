//! The one immutable view of every service that readers use: DNS answers and the hook server.
//! The registry builds a new `Snapshot` on every change and swaps it in atomically, so a reader
//! sees either the old world or the new one, never half of each.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use imbl::{HashMap, OrdMap};

use crate::service::{ServiceName, ServiceSpec};

/// A service as published: what the sources said plus its magic addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub spec: ServiceSpec,
    pub magic_v4: Ipv4Addr,
    pub magic_v6: Option<Ipv6Addr>,
}

impl Service {
    pub fn name(&self) -> &ServiceName {
        &self.spec.name
    }
}

/// Every published service, indexed by name and by magic address. The maps are persistent
/// (structure-sharing), so the next generation is a cheap copy plus the services that changed:
/// publishing one change costs the same with ten services or ten thousand.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Increases by one with every published change; also the SOA serial.
    pub generation: u64,
    services: OrdMap<ServiceName, Arc<Service>>,
    by_addr: HashMap<IpAddr, Arc<Service>>,
}

impl Snapshot {
    pub fn new(generation: u64, services: impl IntoIterator<Item = Service>) -> Self {
        Self::default().with_changes(
            generation,
            services.into_iter().map(|s| (s.name().clone(), Some(s))),
        )
    }

    /// The next generation: `changes` upsert (`Some`) or remove (`None`) services by name.
    pub fn with_changes(
        &self,
        generation: u64,
        changes: impl IntoIterator<Item = (ServiceName, Option<Service>)>,
    ) -> Self {
        let mut next = Self {
            generation,
            ..self.clone()
        };
        for (name, service) in changes {
            if let Some(old) = next.services.remove(&name) {
                next.by_addr.remove(&IpAddr::V4(old.magic_v4));
                if let Some(v6) = old.magic_v6 {
                    next.by_addr.remove(&IpAddr::V6(v6));
                }
            }
            let Some(service) = service else { continue };
            let service = Arc::new(service);
            next.by_addr
                .insert(IpAddr::V4(service.magic_v4), service.clone());
            if let Some(v6) = service.magic_v6 {
                next.by_addr.insert(IpAddr::V6(v6), service.clone());
            }
            next.services.insert(name, service);
        }
        next
    }

    /// Looks a service up by its (lowercase) name.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        // The persistent map looks up by the key type; names are validated labels.
        let name: ServiceName = name.parse().ok()?;
        self.services.get(&name)
    }

    /// Looks a service up by one of its magic addresses. v4-mapped IPv6 addresses match the v4 address.
    pub fn by_addr(&self, addr: IpAddr) -> Option<&Arc<Service>> {
        self.by_addr.get(&addr.to_canonical())
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// The published snapshot, shared by every reader. Readers `load()`; only the registry stores.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

pub fn shared(snapshot: Snapshot) -> SharedSnapshot {
    Arc::new(ArcSwap::from_pointee(snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Backend;

    #[test]
    fn changes_make_a_new_generation_and_leave_the_old_one_alone() {
        let svc = |name: &str, last: u8| Service {
            spec: ServiceSpec::new(name.parse().unwrap()),
            magic_v4: Ipv4Addr::new(127, 77, 0, last),
            magic_v6: None,
        };
        let one = Snapshot::new(1, [svc("web", 1), svc("api", 2)]);
        let two = one.with_changes(
            2,
            [
                ("api".parse().unwrap(), None),
                ("db".parse().unwrap(), Some(svc("db", 3))),
            ],
        );
        assert!(
            two.service("api").is_none() && two.by_addr("127.77.0.2".parse().unwrap()).is_none()
        );
        assert_eq!(
            two.service("db").unwrap().magic_v4,
            Ipv4Addr::new(127, 77, 0, 3)
        );
        assert_eq!((one.len(), two.len(), two.generation), (2, 2, 2));
        assert!(
            one.service("api").is_some(),
            "readers of the old generation are undisturbed"
        );
    }

    #[test]
    fn services_are_found_by_name_and_by_any_form_of_their_address() {
        let mut spec = ServiceSpec::new("web".parse().unwrap());
        spec.backends
            .push(Backend::new("127.0.0.2:80".parse().unwrap()));
        let snap = Snapshot::new(
            7,
            [Service {
                spec,
                magic_v4: Ipv4Addr::new(127, 77, 0, 9),
                magic_v6: Some("fd64::9".parse().unwrap()),
            }],
        );
        assert_eq!(
            snap.service("web").unwrap().magic_v4,
            Ipv4Addr::new(127, 77, 0, 9)
        );
        assert!(snap.service("api").is_none());
        let mapped: IpAddr = "::ffff:127.77.0.9".parse().unwrap();
        assert_eq!(snap.by_addr(mapped).unwrap().name().as_str(), "web");
        assert_eq!(
            snap.by_addr("fd64::9".parse().unwrap())
                .unwrap()
                .name()
                .as_str(),
            "web"
        );
        assert!(snap.by_addr("127.77.0.10".parse().unwrap()).is_none());
    }
}
