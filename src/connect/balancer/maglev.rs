//! Maglev consistent hashing: the lookup table of a weighted backend set.

use super::*;

/// Maglev lookup table size: a prime well above any backend count, so each backend owns about
/// 1/n of the slots to within a fraction of a percent.
pub(super) const MAGLEV_SIZE: usize = 65_537;

/// Maglev (Eisenbud et al., NSDI 2016): each backend walks its own permutation of the slots
/// (offset and skip from two hashes of its address) and they take turns claiming free slots.
/// Removing one backend moves mostly the keys it owned. Entries are positions in `backends`.
///
/// Weighted: in every round each backend earns its weight in credit and claims one slot per
/// heaviest weight of credit, so the heaviest claims one slot a round and a backend owns about
/// `weight / sum(weights)` of the table. Weight 0 owns nothing unless every weight is 0 (then
/// all count as 1, as elsewhere); `weights` shorter than `backends` counts the rest as 1.
pub fn maglev_table(backends: &[SocketAddr], weights: &[u16], size: usize) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    let mut weights: Vec<u64> = (0..n)
        .map(|i| weights.get(i).map_or(1, |&w| u64::from(w)))
        .collect();
    if weights.iter().all(|&w| w == 0) {
        weights.fill(1);
    }
    let heaviest = weights.iter().copied().max().unwrap_or(1).max(1);
    let mut credit = vec![0u64; n];
    let size64 = size as u64;
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let name = b.to_string();
            let offset = fnv1a(name.as_bytes(), 0xcbf2_9ce4_8422_2325) % size64;
            let skip = fnv1a(name.as_bytes(), 0x8422_2325_cbf2_9ce4)
                % (size64.saturating_sub(1).max(1))
                + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let (Some(tries), Some(c)) = (next.get_mut(i), credit.get_mut(i)) else {
                continue;
            };
            *c += weights.get(i).copied().unwrap_or(0);
            while *c >= heaviest {
                *c -= heaviest;
                // More backends than slots: the table is full before every backend had a turn.
                if filled == size {
                    break 'fill;
                }
                loop {
                    let slot = ((offset + *tries * skip) % size64) as usize;
                    *tries += 1;
                    if let Some(entry) = table.get_mut(slot)
                        && *entry == u32::MAX
                    {
                        *entry = i as u32;
                        filled += 1;
                        break;
                    }
                }
            }
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

/// FNV-1a with a chosen basis: stable across builds and restarts, unlike std's hasher, so a
/// key keeps its backend when the daemon is upgraded.
pub(super) fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finaliser: spreads small keys (uids 0, 1000, 1001) over the table.
pub(super) fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
