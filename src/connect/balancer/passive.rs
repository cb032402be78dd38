//! Passive health: failures hooks report (hints the daemon confirms), ejections, connects done,
//! latency samples for p2c-ewma.

use super::*;

impl Balancer {
    /// A hook reported that a connect to `backend` (its default address) of `spec` failed: hold
    /// it out for the fail hold, and eject it when its consecutive failures reach the service's
    /// threshold (see the module docs).
    pub fn report_failure(
        &mut self,
        spec: &ServiceSpec,
        backend: SocketAddr,
        now: Instant,
    ) -> FailureOutcome {
        let Some(state) = self.services.get_mut(&spec.name) else {
            return FailureOutcome::Unknown;
        };
        let Some(i) = state.index_of(backend) else {
            return FailureOutcome::Unknown;
        };
        let outlier = spec.outlier.as_deref().copied().unwrap_or_default();
        // Ejected backends leave the published list (and wait in `departed`): they still count
        // against the cap, or one ejection after another could take out all but one.
        let away = state
            .departed
            .values()
            .filter(|(b, _)| b.ejected(now))
            .count();
        let total = state.backends.len() + away;
        let ejected_now = state.backends.iter().filter(|b| b.ejected(now)).count() + away;
        let Some(b) = state.backends.get_mut(i) else {
            return FailureOutcome::Unknown;
        };
        if b.picks_since_failure > PICK_SLACK {
            b.consecutive_failures = 0;
        }
        b.picks_since_failure = 0;
        b.consecutive_failures = b.consecutive_failures.saturating_add(1);
        b.held_until = When::at(later(now, self.fail_hold));
        if b.ejected(now)
            || outlier.consecutive_failures == 0
            || b.consecutive_failures < outlier.consecutive_failures
        {
            return FailureOutcome::Held {
                consecutive: b.consecutive_failures,
            };
        }
        if !may_eject(&outlier, ejected_now, total) {
            return FailureOutcome::CapReached {
                consecutive: b.consecutive_failures,
            };
        }
        // A backend that stayed in for the longest ejection starts its growth over.
        if b.ejected_until
            .get()
            .is_some_and(|end| now.saturating_duration_since(end) >= outlier.max_ejection)
        {
            b.times_ejected = 0;
        }
        b.times_ejected = b.times_ejected.saturating_add(1);
        let for_ = outlier
            .base_ejection
            .saturating_mul(b.times_ejected)
            .min(outlier.max_ejection);
        b.ejected_until = When::at(later(now, for_));
        b.consecutive_failures = 0;
        FailureOutcome::Ejected {
            for_,
            times: b.times_ejected,
        }
    }

    /// The daemon's own connect confirmed a failure a hook reported: the backend reaches its
    /// service's threshold of consecutive failures at once. The threshold guards against one
    /// client's passing errors, which the confirmation has ruled out; the ejection cap still
    /// applies, and a threshold of 0 (outlier ejection off) still means no ejection.
    pub fn confirm_failure(
        &mut self,
        spec: &ServiceSpec,
        backend: SocketAddr,
        now: Instant,
    ) -> FailureOutcome {
        let threshold = spec
            .outlier
            .as_deref()
            .copied()
            .unwrap_or_default()
            .consecutive_failures;
        if let Some(b) = self.backend_mut(&spec.name, backend) {
            b.picks_since_failure = 0;
            b.consecutive_failures = b.consecutive_failures.max(threshold.saturating_sub(1));
        }
        self.report_failure(spec, backend, now)
    }

    /// A connect picked for `backend` returned: one fewer outstanding (p2c).
    pub fn done(&mut self, service: &ServiceName, backend: SocketAddr) {
        if let Some(b) = self.backend_mut(service, backend) {
            b.outstanding = b.outstanding.saturating_sub(1);
        }
    }

    /// A connect to `backend` took `latency` (p2c-ewma's samples, from the hook or the kernel).
    pub fn observe_latency(
        &mut self,
        service: &ServiceName,
        backend: SocketAddr,
        latency: Duration,
        now: Instant,
    ) {
        let decay = self.ewma_decay;
        if let Some(b) = self.backend_mut(service, backend) {
            b.observe(latency.as_secs_f64() * 1e6, now, decay);
        }
    }

    /// The latency estimate (p2c-ewma) of a backend at `now`, if it has one.
    pub fn latency_estimate(
        &self,
        service: &ServiceName,
        backend: SocketAddr,
        now: Instant,
    ) -> Option<Duration> {
        let us = self
            .backend(service, backend)?
            .ewma_at(now, self.ewma_decay);
        (us > 0.0).then(|| Duration::from_secs_f64(us / 1e6))
    }

    /// A connect to `backend` is known to have worked (p2c `done` without a failure): its run of
    /// consecutive failures ends.
    pub fn report_success(&mut self, service: &ServiceName, backend: SocketAddr) {
        if let Some(b) = self.backend_mut(service, backend) {
            b.consecutive_failures = 0;
        }
    }

    /// Until when `backend` is ejected, if it is at `now`.
    pub fn ejected_until(
        &self,
        service: &ServiceName,
        backend: SocketAddr,
        now: Instant,
    ) -> Option<Instant> {
        self.backend(service, backend)
            .and_then(|b| b.ejected_until.get())
            .filter(|&t| t > now)
    }
}
