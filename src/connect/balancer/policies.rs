//! The choice among candidates, per policy: smooth weighted round robin, weighted random,
//! least connections and the power of two choices (with the latency decay p2c-ewma uses).

use super::*;

/// nginx's smooth weighted round robin: each candidate gains its weight, the largest wins and
/// pays back the total. Over any window of `sum(weights)` picks each gets exactly its weight.
pub(super) fn smooth_weighted(
    state: &mut ServiceState,
    candidates: &[usize],
    weights: &[u64],
) -> Option<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut best: Option<(usize, i64)> = None;
    for (&i, &w) in candidates.iter().zip(weights) {
        let cur = &mut state.backends.get_mut(i)?.current;
        *cur += w as i64;
        if best.is_none_or(|(_, b)| *cur > b) {
            best = Some((i, *cur));
        }
    }
    let (i, _) = best?;
    if let Some(b) = state.backends.get_mut(i) {
        b.current -= total;
    }
    Some(i)
}

pub(super) fn weighted_random<R: Rng + ?Sized>(
    candidates: &[usize],
    weights: &[u64],
    rng: &mut R,
) -> Option<usize> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    for (&i, &w) in candidates.iter().zip(weights) {
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    None
}

/// Above this many candidates least-conn compares two random ones instead of scanning all.
pub(super) const LEAST_CONN_SCAN: usize = 16;

/// Fewest connections per unit of weight; ties go to the larger weight, then in turn (round
/// robin over the tied, so equal backends with no connections share evenly). Large sets use
/// power of two choices over the same counts.
pub(super) fn least_conn<R: Rng + ?Sized>(
    state: &mut ServiceState,
    candidates: &[usize],
    weights: &[u64],
    conns: &[u64],
    rng: &mut R,
) -> Option<usize> {
    let entries: Vec<(usize, u64, u64)> = candidates
        .iter()
        .zip(weights)
        .zip(conns)
        .map(|((&i, &w), &c)| (i, w.max(1), c))
        .collect();
    // a is better than b: c_a / w_a < c_b / w_b, or equal and w_a > w_b.
    let better = |a: &(usize, u64, u64), b: &(usize, u64, u64)| {
        let (l, r) = (
            u128::from(a.2) * u128::from(b.1),
            u128::from(b.2) * u128::from(a.1),
        );
        l < r || (l == r && a.1 > b.1)
    };
    if entries.len() > LEAST_CONN_SCAN {
        let x = entries.get(rng.random_range(0..entries.len()))?;
        let mut j = rng.random_range(0..entries.len() - 1);
        if entries.get(j).is_some_and(|e| e.0 == x.0) {
            j = entries.len() - 1;
        }
        let y = entries.get(j)?;
        return Some(if better(y, x) { y.0 } else { x.0 });
    }
    let best = entries
        .iter()
        .copied()
        .reduce(|a, b| if better(&b, &a) { b } else { a })?;
    let tied: Vec<usize> = entries
        .iter()
        .filter(|e| !better(&best, e) && !better(e, &best))
        .map(|e| e.0)
        .collect();
    let i = tied.get(state.rr_next % tied.len().max(1)).copied();
    state.rr_next = state.rr_next.wrapping_add(1);
    i
}

/// Two distinct weighted-random candidates; the one with the lower `cost` per unit of weight
/// wins (ties to the first drawn).
pub(super) fn p2c<R: Rng + ?Sized>(
    candidates: &[usize],
    weights: &[u64],
    rng: &mut R,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    let a = weighted_random(candidates, weights, rng)?;
    if candidates.len() == 1 {
        return Some(a);
    }
    let rest: Vec<(usize, u64)> = candidates
        .iter()
        .copied()
        .zip(weights.iter().copied())
        .filter(|&(i, _)| i != a)
        .collect();
    let (rest_c, rest_w): (Vec<usize>, Vec<u64>) = rest.into_iter().unzip();
    let b = weighted_random(&rest_c, &rest_w, rng).or_else(|| rest_c.first().copied())?;
    let load = |i: usize| {
        let pos = candidates.iter().position(|&c| c == i).unwrap_or(0);
        let w = weights.get(pos).copied().unwrap_or(1).max(1);
        cost(i) / w as f64
    };
    Some(if load(a) <= load(b) { a } else { b })
}

/// The share of an estimate `elapsed` old that remains after decaying with time constant `decay`.
pub(super) fn decay_weight(elapsed: Duration, decay: Duration) -> f64 {
    if decay.is_zero() {
        return 0.0;
    }
    (-elapsed.as_secs_f64() / decay.as_secs_f64()).exp()
}
