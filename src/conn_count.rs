//! Counting this host's established TCP connections per remote address, from the kernel's socket
//! table, for least-conn balancing. Reads `/proc/net/tcp` and `/proc/net/tcp6` (state 01,
//! ESTABLISHED) of the daemon's network namespace; the choice among backends is left to the
//! balancer.
//!
//! Why /proc rather than netlink sock_diag: the daemon forbids unsafe code and carries no netlink
//! crate yet; parsing the text table costs about 1 ms per 10k sockets, and the hook server reads
//! it at most every [`REFRESH`], and only while some least-conn service is being balanced.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The longest a least-conn pick works from counts older than this.
pub const REFRESH: Duration = Duration::from_millis(100);

/// Established connections per remote `ip:port`, for this network namespace. A table that cannot
/// be read (e.g. `/proc/net` hidden by systemd's `ProcSubset=pid`) counts nothing, and the
/// balancer falls back to its tie-breaks; the error is returned for the caller to log once.
///
/// # Errors
/// The first table that could not be read.
pub fn read() -> (HashMap<SocketAddr, u32>, Option<std::io::Error>) {
    let mut counts = HashMap::new();
    let mut error = None;
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => parse(&text, &mut counts),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    (counts, error)
}

/// Adds the ESTABLISHED rows of one `/proc/net/tcp{,6}` table to `counts`, keyed by remote
/// address (v4-mapped v6 addresses as v4, the way backends are written). Lines that do not parse
/// are skipped: the kernel's format is fixed, and a half-read table only undercounts.
pub fn parse(text: &str, counts: &mut HashMap<SocketAddr, u32>) {
    for line in text.lines().skip(1) {
        let mut fields = line.split_whitespace();
        let (Some(_sl), Some(_local), Some(remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if state != "01" {
            continue;
        }
        if let Some(addr) = parse_addr(remote) {
            *counts.entry(addr).or_insert(0) += 1;
        }
    }
}

/// `0100007F:1F90` (v4) or 32 hex digits `:port` (v6): each 32-bit word in host byte order
/// (little-endian on the machines we ship for), the port big-endian hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(
            if cfg!(target_endian = "little") {
                w.swap_bytes()
            } else {
                w
            }
            .to_be_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b.get_mut(i * 4..i * 4 + 4)?.copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_rows_are_counted_by_remote_address() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:9C40 0200007F:1B59 01 00000000:00000000 00:00000000 00000000     0        0 1 1 0 20 4 30 10 -1\n\
   1: 0100007F:9C41 0200007F:1B59 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n\
   2: 0100007F:9C42 0300007F:1B59 06 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n\
   3: 0200007F:1B59 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1\n\
   garbage\n";
        let v6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:1F90 01 0\n\
   1: 0000000000000000FFFF00000100007F:9C41 0000000000000000FFFF00000300007F:1B59 01 0\n";
        let mut c = HashMap::new();
        parse(v4, &mut c);
        parse(v6, &mut c);
        assert_eq!(c.get(&"127.0.0.2:7001".parse().unwrap()), Some(&2));
        assert_eq!(
            c.get(&"127.0.0.3:7001".parse().unwrap()),
            Some(&1),
            "TIME_WAIT (06) is not counted; v4-mapped is v4"
        );
        assert_eq!(c.get(&"[::1]:8080".parse().unwrap()), Some(&1));
        assert_eq!(c.len(), 3, "{c:?}");
    }

    #[test]
    fn the_live_table_sees_a_connection_we_hold() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = std::net::TcpStream::connect(addr).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let (c, error) = read();
        assert!(error.is_none(), "{error:?}");
        assert_eq!(c.get(&addr), Some(&1), "{c:?}");
    }
}
