//! Merging what the sources say into each service's spec, through the guard, into the
//! published snapshot (with its magic addresses).

use super::overlay::effective;
use super::*;

impl Registry {
    /// What every source says of one service, merged. Backends are merged by address; the first
    /// source that names the service decides its balancing policy and port map.
    pub(super) fn merged_one(&self, name: &ServiceName) -> Option<ServiceSpec> {
        let mut out: Option<ServiceSpec> = None;
        for spec in self
            .sources
            .iter()
            .flatten()
            .filter_map(|slot| slot.get(name))
        {
            match &mut out {
                None => out = Some(spec.clone()),
                Some(existing) => {
                    for b in &spec.backends {
                        if !existing.backends.iter().any(|e| e.addr == b.addr) {
                            existing.backends.push(b.clone());
                        }
                    }
                    for (port, pname) in &spec.client_ports {
                        existing
                            .client_ports
                            .entry(*port)
                            .or_insert_with(|| pname.clone());
                    }
                }
            }
        }
        out
    }

    /// Re-evaluates every service (after a restore or a reconfigure).
    pub(super) fn refresh_all(&mut self, now: u64, clock: Instant) {
        let mut names: BTreeSet<ServiceName> = self.published.keys().cloned().collect();
        for slot in self.sources.iter().flatten() {
            names.extend(slot.keys().cloned());
        }
        self.refresh(names, now, clock);
    }

    /// Re-evaluates the services in `dirty` (merge, guard, magic address, drains, health) and
    /// publishes a new snapshot if any of them changed. The cost follows the number of services
    /// that changed, not the number there are.
    pub(super) fn refresh(
        &mut self,
        dirty: impl IntoIterator<Item = ServiceName>,
        now: u64,
        clock: Instant,
    ) {
        // Before any source has spoken or been restored, there is nothing to guard against.
        let nothing_heard = self.sources.iter().all(Option::is_none);
        let old = self.shared.load_full();
        let mut changes = Vec::new();
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let mut magic_changed = false;
        for name in dirty {
            let current = self.published.get(&name).cloned();
            let publish = if nothing_heard {
                current.clone()
            } else {
                let step = self
                    .guard
                    .step(&name, current.as_ref(), self.merged_one(&name), clock);
                if let Some(h) = &step.new_hold {
                    self.note_hold(h, now);
                }
                if step.matured {
                    info!(service = %name, "held update applied after the hold-down");
                    self.event(
                        now,
                        format!("guard: held update to {name} applied after the hold-down"),
                    );
                }
                step.publish
            };
            match (&current, &publish) {
                (None, Some(_)) => added.push(name.to_string()),
                (Some(_), None) => removed.push(name.to_string()),
                _ => {}
            }
            if publish != current {
                self.dirty = true;
            }
            let service = match publish {
                Some(spec) => {
                    self.published.insert(name.clone(), spec);
                    match self.magic.assign(&name) {
                        Ok(changed) => {
                            magic_changed |= changed;
                            self.build(&name, now)
                        }
                        Err(e) => {
                            error!("{e}");
                            None
                        }
                    }
                }
                None => {
                    self.published.remove(&name);
                    magic_changed |= self.magic.release(&name, now);
                    self.forget(&name);
                    None
                }
            };
            if old.service(name.as_str()).map(|s| s.as_ref()) != service.as_ref() {
                changes.push((name, service));
            }
        }
        self.set_wake();
        METRICS
            .guard_held
            .set(i64::try_from(self.guard.held().count()).unwrap_or(i64::MAX));
        match added.len() {
            0 => {}
            1..=20 => self.event(now, format!("services added: {}", added.join(", "))),
            n => self.event(now, format!("{n} services added")),
        }
        if !removed.is_empty() {
            self.event(now, format!("services removed: {}", removed.join(", ")));
        }
        if magic_changed {
            self.persist_magic();
        }
        self.targets.store(Arc::new(self.target_map.clone()));
        if changes.is_empty() && old.generation > 0 {
            return;
        }
        let snapshot = old.with_changes(old.generation + 1, changes);
        debug!(
            generation = snapshot.generation,
            services = snapshot.len(),
            "published"
        );
        METRICS
            .generation
            .set(i64::try_from(snapshot.generation).unwrap_or(i64::MAX));
        METRICS
            .services
            .set(i64::try_from(snapshot.len()).unwrap_or(i64::MAX));
        let snapshot = Arc::new(snapshot);
        self.shared.store(snapshot.clone());
        for f in &self.on_swap {
            f(&snapshot);
        }
        self.unannounced = true;
        METRICS
            .publish_duration
            .observe(clock.elapsed().as_secs_f64());
    }

    /// The published form of one service: drains and health applied; keeps the health checker's
    /// targets and the panic set current for it.
    pub(super) fn build(&mut self, name: &ServiceName, now: u64) -> Option<Service> {
        let a = self.magic.get(name)?;
        let mut spec = self.published.get(name)?.clone();
        if let Some(d) = self.drained.get(name) {
            spec.backends.retain(|b| !d.contains(&b.addr));
        }
        // Health only knows backends that are published.
        if let Some(map) = self.unhealthy.get_mut(name) {
            map.retain(|addr, _| spec.backends.iter().any(|b| b.addr == *addr));
            if map.is_empty() {
                self.unhealthy.remove(name);
            }
        }
        if let Some(map) = self.ejected.get_mut(name) {
            map.retain(|addr, _| spec.backends.iter().any(|b| b.addr == *addr));
            if map.is_empty() {
                self.ejected.remove(name);
            }
        }
        let unhealthy = self.unhealthy.get(name);
        match &spec.health {
            Some(check) => {
                let targets = spec
                    .backends
                    .iter()
                    .map(|b| {
                        (
                            b.addr,
                            check.clone(),
                            !unhealthy.is_some_and(|u| u.contains_key(&b.addr)),
                        )
                    })
                    .collect();
                self.target_map.insert(name.clone(), targets);
            }
            None => {
                self.target_map.remove(name);
            }
        }
        // Active and passive health take backends out alike (panic mode and tiers included).
        let out = match self.ejected.get(name) {
            None => unhealthy.map(std::borrow::Cow::Borrowed),
            Some(ejected) => {
                let mut out = unhealthy.cloned().unwrap_or_default();
                for (addr, e) in ejected {
                    out.entry(*addr).or_insert_with(|| e.reason.clone());
                }
                Some(std::borrow::Cow::Owned(out))
            }
        };
        let (spec, panic) = effective(&spec, out.as_deref(), self.health_cfg.panic_threshold);
        if panic && self.panicking.insert(name.clone()) {
            warn!(service = %name, "too few healthy backends: panic mode, balancing over all of them");
            self.event(
                now,
                format!("{name}: panic mode, too few healthy backends; balancing over all"),
            );
        } else if !panic && self.panicking.remove(name) {
            info!(service = %name, "enough healthy backends again: panic mode ends");
            self.event(now, format!("{name}: panic mode ends"));
        }
        Some(Service {
            spec,
            magic_v4: a.v4,
            magic_v6: a.v6,
        })
    }

    /// Drops what is kept about a service that is gone.
    pub(super) fn forget(&mut self, name: &ServiceName) {
        self.unhealthy.remove(name);
        self.ejected.remove(name);
        self.target_map.remove(name);
        self.panicking.remove(name);
    }

    pub(super) fn note_hold(&mut self, h: &Held, now: u64) {
        METRICS.guard_holds.inc();
        let kept: Vec<String> = h.kept.iter().map(ToString::to_string).collect();
        let what = match h.reason {
            HoldReason::WouldEmpty => "would leave no backends: not applied".to_string(),
            HoldReason::SharpDrop { removed, of } => {
                format!("removes {removed} of {of} backends: held")
            }
            HoldReason::Vanished => "service gone from every source: removal held".to_string(),
        };
        self.event(now, format!("guard: update to {} {what}", h.service));
        match h.reason {
            HoldReason::WouldEmpty => {
                warn!(service = %h.service, kept = ?kept, "update would leave no backends: not applied, the current backends keep serving")
            }
            HoldReason::SharpDrop { removed, of } => {
                warn!(service = %h.service, removed, of, hold_down = ?self.guard.hold_down(), kept = ?kept, "update removes too many backends at once: removal held")
            }
            HoldReason::Vanished => {
                warn!(service = %h.service, hold_down = ?self.guard.hold_down(), "service gone from every source: removal held")
            }
        }
    }
}
