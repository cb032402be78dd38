//! What health and operators take out of the published specs: active health, passive-health
//! ejections (which end by themselves) and drains; panic mode and tiers via `health::effective`.

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
