//! Choosing a backend without the daemon and without the shared table, from what this process
//! learned from the daemon's answers: records for the exact client port if there are any, else the service's default
//! records; only backends the socket's family can reach and not already tried; the best
//! priority; then weighted rotation by a process-wide counter. Streams over the records (the
//! source scans them, a few passes) so nothing is allocated.

#![deny(unsafe_code)]

use core::net::{IpAddr, SocketAddr};

use core::net::Ipv6Addr;

use discotech_wire::{from_mapped, to_mapped};

/// A backend the process learned from the daemon's answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub magic: Ipv6Addr,
    /// 0 for "any port without a mapping of its own".
    pub client_port: u16,
    pub backend_port: u16,
    pub backend: Ipv6Addr,
    pub weight: u16,
    pub priority: u16,
}

/// Something that can show its records one at a time.
pub trait Records {
    fn scan(&self, f: &mut dyn FnMut(&Record));
}

impl Records for [Record] {
    fn scan(&self, f: &mut dyn FnMut(&Record)) {
        self.iter().for_each(f);
    }
}

/// A backend for a connect to `dest`, or None if the records know none usable.
/// `exclude` lists backends that already failed; `turn` rotates the choice.
pub fn choose<R: Records + ?Sized>(
    src: &R,
    dest: SocketAddr,
    v6_ok: bool,
    exclude: &[Option<SocketAddr>],
    turn: u32,
) -> Option<SocketAddr> {
    let magic = to_mapped(dest.ip());
    let usable = |r: &Record, port: u16| {
        let backend = SocketAddr::new(from_mapped(r.backend), r.backend_port);
        r.magic == magic
            && r.client_port == port
            && (v6_ok || matches!(backend.ip(), IpAddr::V4(_)))
            && !exclude.contains(&Some(backend))
    };
    // Pass 1: which port key applies, and the best priority under it.
    let (mut exact, mut exact_best, mut default_best) = (false, u16::MAX, u16::MAX);
    src.scan(&mut |r| {
        if r.magic == magic && r.client_port == dest.port() && dest.port() != 0 {
            exact = true;
        }
        if usable(r, dest.port()) {
            exact_best = exact_best.min(r.priority);
        }
        if usable(r, 0) {
            default_best = default_best.min(r.priority);
        }
    });
    // A mapped client port whose backends are all excluded falls back to nothing rather than
    // to the default port: a different port is a different service endpoint.
    let (port, best) = if exact {
        (dest.port(), exact_best)
    } else {
        (0, default_best)
    };
    if best == u16::MAX {
        return None; // no usable record under the applicable key
    }
    let weight = |r: &Record| u64::from(r.weight.max(1));
    // Pass 2: total weight of the candidates.
    let mut total = 0u64;
    src.scan(&mut |r| {
        if usable(r, port) && r.priority == best {
            total += weight(r);
        }
    });
    if total == 0 {
        return None;
    }
    // Pass 3: the candidate the turn lands on.
    let mut x = u64::from(turn) % total;
    let mut chosen = None;
    src.scan(&mut |r| {
        if chosen.is_none() && usable(r, port) && r.priority == best {
            let w = weight(r);
            if x < w {
                chosen = Some(SocketAddr::new(from_mapped(r.backend), r.backend_port));
            } else {
                x -= w;
            }
        }
    });
    chosen
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    fn rec(magic: &str, client_port: u16, backend: &str, weight: u16, priority: u16) -> Record {
        let b: SocketAddr = backend.parse().unwrap();
        Record {
            magic: to_mapped(magic.parse().unwrap()),
            client_port,
            backend_port: b.port(),
            backend: to_mapped(b.ip()),
            weight,
            priority,
        }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn table() -> [Record; 6] {
        [
            rec("127.77.0.9", 0, "127.0.0.2:8080", 1, 0),
            rec("127.77.0.9", 0, "127.0.0.3:8080", 3, 0),
            rec("127.77.0.9", 0, "127.0.0.4:8080", 1, 1),
            rec("127.77.0.9", 9000, "127.0.0.2:9090", 1, 0),
            rec("127.77.0.9", 0, "[fd00::5]:8080", 1, 0),
            rec("127.77.0.10", 0, "127.0.0.7:80", 1, 0),
        ]
    }

    #[test]
    fn weighted_rotation_over_the_best_priority_of_the_default_port() {
        let t = table();
        let dest = a("127.77.0.9:80");
        let mut counts = [0; 3];
        for turn in 0..40 {
            match choose(&t[..], dest, false, &[], turn).unwrap() {
                b if b == a("127.0.0.2:8080") => counts[0] += 1,
                b if b == a("127.0.0.3:8080") => counts[1] += 1,
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(counts, [10, 30, 0]);
        // With v6 allowed the v6 backend joins the rotation (weights 1+3+1 = 5).
        let v6 = (0..5)
            .filter(|&turn| choose(&t[..], dest, true, &[], turn) == Some(a("[fd00::5]:8080")))
            .count();
        assert_eq!(v6, 1);
    }

    #[test]
    fn mapped_ports_exclusions_and_lower_tiers() {
        let t = table();
        assert_eq!(
            choose(&t[..], a("127.77.0.9:9000"), false, &[], 7),
            Some(a("127.0.0.2:9090"))
        );
        // Its only backend failed: nothing, rather than the default port.
        assert_eq!(
            choose(
                &t[..],
                a("127.77.0.9:9000"),
                false,
                &[Some(a("127.0.0.2:9090"))],
                0
            ),
            None
        );
        // The best tier failed: the next tier.
        let ex = [Some(a("127.0.0.2:8080")), Some(a("127.0.0.3:8080"))];
        assert_eq!(
            choose(&t[..], a("127.77.0.9:80"), false, &ex, 0),
            Some(a("127.0.0.4:8080"))
        );
        // The v4-mapped destination matches too; unknown services get nothing.
        assert_eq!(
            choose(&t[..], a("[::ffff:127.77.0.10]:80"), true, &[], 3),
            Some(a("127.0.0.7:80"))
        );
        assert_eq!(choose(&t[..], a("127.77.0.11:80"), true, &[], 0), None);
    }
}
