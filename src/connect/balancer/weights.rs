//! Which backends are eligible and what each weighs: health, tiers, zone preference, slow
//! start, and the cap on ejections.

use super::*;

/// Zone preference, applied after health, ejection and tiers: of the eligible candidates, those
/// in the host's `zone` alone, while there is at least one and they hold at least `share` per
/// mille of the candidates' weight; otherwise all of them (spill over). Weights count as 1 when
/// all are zero, as elsewhere.
pub(super) fn prefer_zone(
    spec: &ServiceSpec,
    candidates: Vec<usize>,
    zone: &str,
    share: u64,
) -> Vec<usize> {
    let weight = |i: usize| {
        let w = spec.backends.get(i).map_or(0, |b| u64::from(b.weight));
        if w == 0 { 1 } else { w }
    };
    let local: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| spec.backends.get(i).is_some_and(|b| b.zone() == Some(zone)))
        .collect();
    let local_w: u64 = local.iter().map(|&i| weight(i)).sum();
    let total_w: u64 = candidates.iter().map(|&i| weight(i)).sum();
    if !local.is_empty() && local_w * 1000 >= share * total_w {
        local
    } else {
        candidates
    }
}

/// Each candidate's weight for this pick: its configured weight (all-zero means "no
/// preference"), scaled, times its slow-start factor.
pub(super) fn effective_weights(
    spec: &ServiceSpec,
    state: &ServiceState,
    candidates: &[usize],
    now: Instant,
) -> Vec<u64> {
    let raw: Vec<u64> = candidates
        .iter()
        .map(|&i| spec.backends.get(i).map_or(0, |b| u64::from(b.weight)))
        .collect();
    let all_zero = raw.iter().all(|&w| w == 0);
    candidates
        .iter()
        .zip(raw)
        .map(|(&i, w)| {
            let w = if all_zero { 1 } else { w } * WEIGHT_SCALE;
            let ramp = spec
                .slow_start
                .as_deref()
                .copied()
                .zip(state.backends.get(i).and_then(|b| b.ramp_start(now)));
            match ramp {
                Some((slow, since)) => {
                    let per_mille = slow_start_per_mille(
                        slow.window,
                        u64::from(slow.floor_percent) * 10,
                        now.saturating_duration_since(since),
                    );
                    (w * per_mille / 1000).max(1)
                }
                None => w,
            }
        })
        .collect()
}

/// The share (per mille) of its weight a backend gets `elapsed` into a slow-start `window`:
/// linear from `floor` to 1000.
pub fn slow_start_per_mille(window: Duration, floor: u64, elapsed: Duration) -> u64 {
    if window.is_zero() || elapsed >= window {
        return 1000;
    }
    let floor = floor.min(1000);
    let progress = (elapsed.as_millis() * 1000 / window.as_millis().max(1)) as u64;
    floor + (1000 - floor) * progress / 1000
}

pub(super) fn eligible(
    spec: &ServiceSpec,
    state: &ServiceState,
    v6_ok: bool,
    now: Instant,
) -> Vec<usize> {
    let reachable: Vec<usize> = spec
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| v6_ok || b.addr.is_ipv4())
        .map(|(i, _)| i)
        .collect();
    let not_held: Vec<usize> = reachable
        .iter()
        .copied()
        .filter(|&i| state.backends.get(i).is_none_or(|b| !b.out_at(now)))
        .collect();
    let pool = if not_held.is_empty() {
        reachable
    } else {
        not_held
    };
    let Some(best) = pool
        .iter()
        .filter_map(|&i| spec.backends.get(i).map(|b| b.priority))
        .min()
    else {
        return Vec::new();
    };
    pool.into_iter()
        .filter(|&i| spec.backends.get(i).is_some_and(|b| b.priority == best))
        .collect()
}

/// Whether one more ejection keeps the ejected share within the cap. At least one backend always
/// stays in, so a lone backend is never ejected, whatever the cap says.
pub(super) fn may_eject(outlier: &Outlier, ejected_now: usize, total: usize) -> bool {
    ejected_now + 1 < total
        && (ejected_now + 1) * 100 <= usize::from(outlier.max_ejected_percent) * total
}
