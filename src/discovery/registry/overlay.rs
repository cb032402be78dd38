//! What health and operators take out of the published specs: active health, passive-health
//! ejections (which end by themselves) and drains; panic mode and tiers via `effective`, here.

use super::*;

impl Registry {
    /// Records a health check's verdict on one backend and republishes.
    pub fn set_health_of(
        &mut self,
        service: &ServiceName,
        addr: SocketAddr,
        healthy: bool,
        reason: &str,
        now: u64,
    ) {
        let known = self
            .published
            .get(service)
            .is_some_and(|s| s.backends.iter().any(|b| b.addr == addr));
        if !known {
            return;
        }
        let changed = if healthy {
            self.unhealthy
                .get_mut(service)
                .and_then(|m| m.remove(&addr))
                .is_some()
        } else {
            self.unhealthy
                .entry(service.clone())
                .or_default()
                .insert(addr, reason.to_string())
                .is_none()
        };
        self.note_in_pick_set(service, addr);
        if changed {
            if healthy {
                info!(%service, %addr, "backend healthy again");
                self.event(now, format!("{addr} of {service} is healthy again"));
            } else {
                warn!(%service, %addr, %reason, "backend unhealthy: out of the pick set");
                self.event(now, format!("{addr} of {service} is unhealthy: {reason}"));
            }
            self.refresh([service.clone()], now, Instant::now());
        }
    }

    /// Records a passive-health ejection of one backend until `until` and republishes: the
    /// backend leaves the published spec (health's panic mode and tiers apply) and returns by
    /// itself when `until` passes (see [`Registry::wake`]). A backend already ejected gets the
    /// new `until`. Backends the registry does not publish are ignored.
    pub fn eject(
        &mut self,
        service: &ServiceName,
        addr: SocketAddr,
        until: Instant,
        reason: &str,
        now: u64,
        clock: Instant,
    ) {
        let known = self
            .published
            .get(service)
            .is_some_and(|s| s.backends.iter().any(|b| b.addr == addr));
        if !known || until <= clock {
            return;
        }
        let ejection = Ejection {
            until,
            reason: reason.to_string(),
        };
        let again = self
            .ejected
            .entry(service.clone())
            .or_default()
            .insert(addr, ejection)
            .is_some();
        self.set_wake();
        self.note_in_pick_set(service, addr);
        if again {
            debug!(%service, %addr, %reason, "ejection extended");
            return;
        }
        info!(%service, %addr, %reason, "backend ejected: out of SRV answers until the ejection ends");
        self.event(now, format!("{addr} of {service} {reason}"));
        self.refresh([service.clone()], now, clock);
    }

    /// Keeps the `backend_healthy` gauge current: 1 while neither kind of health holds it out.
    pub(super) fn note_in_pick_set(&self, service: &ServiceName, addr: SocketAddr) {
        let out = self
            .unhealthy
            .get(service)
            .is_some_and(|m| m.contains_key(&addr))
            || self
                .ejected
                .get(service)
                .is_some_and(|m| m.contains_key(&addr));
        let labels = crate::metrics::BackendLabels {
            service: service.to_string(),
            backend: addr.to_string(),
        };
        METRICS
            .backend_healthy
            .get_or_create(&labels)
            .set(i64::from(!out));
    }

    /// Active health's verdicts and passive-health ejections together, for the status: the
    /// reason of an ejection tells how long it has left.
    pub(super) fn unhealthy_status(
        &self,
        clock: Instant,
    ) -> BTreeMap<ServiceName, BTreeMap<SocketAddr, String>> {
        let mut out = self.unhealthy.clone();
        for (service, map) in &self.ejected {
            let entry = out.entry(service.clone()).or_default();
            for (addr, e) in map {
                let left = e.until.saturating_duration_since(clock);
                // Rounded up: "0s left" would read as over.
                let left = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                let ejected = format!("{}, {left}s left", e.reason);
                entry
                    .entry(*addr)
                    .and_modify(|why| *why = format!("{why}; {ejected}"))
                    .or_insert(ejected);
            }
        }
        out
    }

    /// Drains or undrains one backend.
    ///
    /// # Errors
    /// The service or the backend is unknown.
    pub fn drain(
        &mut self,
        service: &ServiceName,
        addr: SocketAddr,
        drain: bool,
        now: u64,
    ) -> Result<(), String> {
        let spec = self
            .published
            .get(service)
            .ok_or_else(|| format!("no service {service}"))?;
        if drain && !spec.backends.iter().any(|b| b.addr == addr) {
            return Err(format!("{addr} is not a backend of {service}"));
        }
        let set = self.drained.entry(service.clone()).or_default();
        let changed = if drain {
            set.insert(addr)
        } else {
            set.remove(&addr)
        };
        if set.is_empty() {
            self.drained.remove(service);
        }
        if changed {
            info!(%service, %addr, drain, "drain changed");
            self.event(
                now,
                format!(
                    "{} {addr} of {service}",
                    if drain { "drained" } else { "undrained" }
                ),
            );
            self.dirty = true;
            self.refresh([service.clone()], now, Instant::now());
        }
        Ok(())
    }
}

/// What a service offers given its backends' health, for the snapshot (and so for SRV answers and
/// connect picks alike):
/// - unhealthy backends leave;
/// - while the best priority tier keeps at least `panic_threshold` of its size healthy, it serves
///   alone (lower tiers stay as published backups);
/// - when it falls below, healthy backends of the next tiers join it at its priority until that
///   share is reached again, so the few survivors are not crushed and traffic returns to the
///   best tier as soon as it recovers;
/// - when even every tier together cannot reach the share, the service is in panic mode and
///   balances over all its backends, healthy or not: answers never go empty.
///
/// Returns the spec to publish and whether the service is in panic mode.
pub fn effective(
    spec: &crate::service::ServiceSpec,
    unhealthy: Option<&BTreeMap<SocketAddr, String>>,
    panic_threshold: f64,
) -> (crate::service::ServiceSpec, bool) {
    let Some(unhealthy) = unhealthy.filter(|u| !u.is_empty()) else {
        return (spec.clone(), false);
    };
    let Some(best) = spec.backends.iter().map(|b| b.priority).min() else {
        return (spec.clone(), false);
    };
    let best_size = spec.backends.iter().filter(|b| b.priority == best).count();
    let needed = (panic_threshold * best_size as f64).ceil() as usize;
    let mut tiers: Vec<u16> = spec.backends.iter().map(|b| b.priority).collect();
    tiers.sort_unstable();
    tiers.dedup();
    let healthy = |b: &&crate::service::Backend| !unhealthy.contains_key(&b.addr);

    let mut out = spec.clone();
    out.backends.clear();
    let mut active = 0;
    let mut joined = Vec::new();
    for tier in &tiers {
        if active >= needed.max(1) {
            break;
        }
        for b in spec
            .backends
            .iter()
            .filter(|b| b.priority == *tier)
            .filter(healthy)
        {
            let mut b = b.clone();
            b.priority = best;
            out.backends.push(b);
            active += 1;
        }
        joined.push(*tier);
    }
    if active == 0 || active < needed {
        return (spec.clone(), true);
    }
    // Tiers that did not have to join stay behind as backups, healthy members only.
    out.backends.extend(
        spec.backends
            .iter()
            .filter(|b| !joined.contains(&b.priority))
            .filter(healthy)
            .cloned(),
    );
    (out, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Backend;

    fn spec(tiers: &[(u16, u8)]) -> ServiceSpec {
        let mut s = ServiceSpec::new("web".parse().unwrap());
        let mut n = 1;
        for (prio, count) in tiers {
            for _ in 0..*count {
                let mut b = Backend::new(SocketAddr::from(([127, 0, 1, n], 80)));
                b.priority = *prio;
                s.backends.push(b);
                n += 1;
            }
        }
        s
    }

    fn down(last_octets: &[u8]) -> BTreeMap<SocketAddr, String> {
        last_octets
            .iter()
            .map(|n| {
                (
                    SocketAddr::from(([127, 0, 1, *n], 80)),
                    "refused".to_string(),
                )
            })
            .collect()
    }

    fn shape(s: &ServiceSpec) -> Vec<(u8, u16)> {
        s.backends
            .iter()
            .map(|b| match b.addr.ip() {
                std::net::IpAddr::V4(v4) => (v4.octets()[3], b.priority),
                std::net::IpAddr::V6(_) => (0, b.priority),
            })
            .collect()
    }

    #[test]
    fn unhealthy_backends_leave_while_enough_remain() {
        let (s, panic) = effective(&spec(&[(0, 4)]), Some(&down(&[2])), 0.5);
        assert_eq!(shape(&s), [(1, 0), (3, 0), (4, 0)]);
        assert!(!panic);
    }

    #[test]
    fn below_the_threshold_the_next_tier_joins_at_the_best_priority() {
        // 1 of 4 primaries healthy: the two backups join so that the survivor is not crushed.
        let (s, panic) = effective(&spec(&[(0, 4), (1, 2)]), Some(&down(&[1, 2, 3])), 0.5);
        assert_eq!(shape(&s), [(4, 0), (5, 0), (6, 0)]);
        assert!(!panic);
        // All primaries down: failover to the backup tier.
        let (s, _) = effective(&spec(&[(0, 2), (1, 2)]), Some(&down(&[1, 2])), 0.5);
        assert_eq!(shape(&s), [(3, 0), (4, 0)]);
    }

    #[test]
    fn healthy_primaries_keep_backups_behind() {
        let (s, _) = effective(&spec(&[(0, 2), (1, 2)]), Some(&down(&[4])), 0.5);
        assert_eq!(
            shape(&s),
            [(1, 0), (2, 0), (3, 1)],
            "the unhealthy backup leaves, the healthy one waits"
        );
    }

    #[test]
    fn panic_mode_balances_over_everything() {
        let all = spec(&[(0, 4)]);
        let (s, panic) = effective(&all, Some(&down(&[1, 2, 3])), 0.5);
        assert!(panic, "1 of 4 is below half and there is nowhere to spill");
        assert_eq!(s, all);
        let (s, panic) = effective(&all, Some(&down(&[1, 2, 3, 4])), 0.5);
        assert!(panic && s.backends.len() == 4, "never empty");
        let (_, panic) = effective(&all, Some(&down(&[1, 2, 3])), 0.0);
        assert!(!panic, "threshold 0 disables panic mode");
    }
}
