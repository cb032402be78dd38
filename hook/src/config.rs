//! What the hook learns once, at load time: which addresses are magic, where the daemon's socket
//! and routing table are, and which uid the daemon must run as. Parsing is pure and
//! allocation-free; reading the environment and the table is left to `lib.rs`.

#![deny(unsafe_code)]

use core::ffi::CStr;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use discotech_wire::{v4_in, v6_in};

pub const DEFAULT_SOCKET: &[u8] = b"/run/discotech/hook.sock";
pub const DEFAULT_MAGIC_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(127, 77, 0, 0), 16);
/// How long one exchange with the daemon may take before the hook falls back.
pub const DEFAULT_TIMEOUT_MS: i64 = 50;
const TABLE_NAME: &[u8] = b"hook.snapshot";
/// A magic range read from the table is believed only if it is at least this narrow: a damaged
/// table must not make every connect of the process magic.
const MIN_TABLE_PREFIX_V4: u8 = 8;
const MIN_TABLE_PREFIX_V6: u8 = 16;
/// sun_path is 108 bytes including the NUL.
const SOCKET_MAX: usize = 108;
const TABLE_PATH_MAX: usize = SOCKET_MAX + 16;

/// The magic ranges a routing table names.
pub type TableRanges = (Option<(Ipv4Addr, u8)>, Option<(Ipv6Addr, u8)>);

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub magic_v4: (Ipv4Addr, u8),
    pub magic_v6: Option<(Ipv6Addr, u8)>,
    socket: [u8; SOCKET_MAX],
    socket_len: usize,
    /// The routing table's path, NUL-terminated.
    table_file: [u8; TABLE_PATH_MAX],
    /// A uid the daemon may run as, besides root and the process's own.
    pub daemon_uid: Option<u32>,
    pub timeout_ms: i64,
    /// A privileged (AT_SECURE) process: only root or its effective uid may answer it.
    pub secure: bool,
    /// DISCOTECH_HASH_KEY, hashed at load time: the affinity key for maglev services.
    pub hash_key: Option<u64>,
    /// The effective uid at load time: the affinity key when there is no hash key.
    pub euid: u32,
}

impl Config {
    /// Defaults with the socket at `socket` (the default path if None or unusable) and the
    /// routing table beside it.
    pub fn new(socket: Option<&[u8]>) -> Self {
        let path = socket
            .filter(|p| !p.is_empty() && p.len() < SOCKET_MAX && !p.contains(&0))
            .unwrap_or(DEFAULT_SOCKET);
        let mut cfg = Self {
            magic_v4: DEFAULT_MAGIC_V4,
            magic_v6: None,
            socket: [0; SOCKET_MAX],
            socket_len: path.len(),
            table_file: [0; TABLE_PATH_MAX],
            daemon_uid: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            secure: false,
            hash_key: None,
            euid: 0,
        };
        copy(&mut cfg.socket, path);
        // The directory part, including its trailing '/', then the table file name.
        let dir_len = path.iter().rposition(|&c| c == b'/').map_or(0, |i| i + 1);
        let dir = path.get(..dir_len).unwrap_or_default();
        copy(&mut cfg.table_file, dir);
        if let Some(rest) = cfg.table_file.get_mut(dir_len..) {
            copy(rest, TABLE_NAME);
        }
        cfg
    }

    /// Sets the magic ranges: the environment wins, then the routing table's (if narrow
    /// enough), then the defaults. Unparseable values are ignored.
    pub fn set_ranges(
        &mut self,
        env_v4: Option<&[u8]>,
        env_v6: Option<&[u8]>,
        table: Option<TableRanges>,
    ) {
        let table = table.unwrap_or((None, None));
        if let Some(v4) = env_v4.and_then(parse_v4_net) {
            self.magic_v4 = v4;
        } else if let Some(v4) = table.0.filter(|n| n.1 >= MIN_TABLE_PREFIX_V4 && n.1 <= 32) {
            self.magic_v4 = v4;
        }
        if let Some(v6) = env_v6.and_then(parse_v6_net) {
            self.magic_v6 = Some(v6);
        } else if let Some(v6) = table.1.filter(|n| n.1 >= MIN_TABLE_PREFIX_V6 && n.1 <= 128) {
            self.magic_v6 = Some(v6);
        }
    }

    pub fn set_daemon_uid(&mut self, env: Option<&[u8]>) {
        self.daemon_uid = env
            .and_then(|b| core::str::from_utf8(b).ok())
            .and_then(|s| s.trim().parse().ok());
    }

    /// An empty DISCOTECH_HASH_KEY is as if unset (the daemon keys on the uid).
    pub fn set_hash_key(&mut self, env: Option<&[u8]>) {
        self.hash_key = env.filter(|b| !b.is_empty()).map(discotech_wire::hash_key);
    }

    pub fn set_timeout(&mut self, env: Option<&[u8]>) {
        if let Some(ms) = env
            .and_then(|b| core::str::from_utf8(b).ok())
            .and_then(|s| s.trim().parse::<i64>().ok())
        {
            self.timeout_ms = ms.clamp(1, 10_000);
        }
    }

    /// True if a connect to `ip` is for the daemon to route. v4-mapped IPv6 addresses are
    /// matched against the IPv4 range.
    pub fn is_magic(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4_in(v4, self.magic_v4.0, self.magic_v4.1),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4_in(v4, self.magic_v4.0, self.magic_v4.1),
                None => self.magic_v6.is_some_and(|(net, len)| v6_in(v6, net, len)),
            },
        }
    }

    pub fn socket_path(&self) -> &[u8] {
        self.socket.get(..self.socket_len).unwrap_or_default()
    }

    pub fn table_path(&self) -> Option<&CStr> {
        CStr::from_bytes_until_nul(&self.table_file).ok()
    }

    /// True if a daemon running as `uid` may answer this process.
    pub fn trusts(&self, uid: u32, own: (u32, u32)) -> bool {
        if self.secure {
            // The real uid and the environment belong to whoever started a setuid program.
            return uid == 0 || uid == own.1;
        }
        uid == 0 || uid == own.0 || uid == own.1 || self.daemon_uid == Some(uid)
    }
}

fn copy(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}

fn split_net(b: &[u8]) -> Option<(&str, Option<u8>)> {
    let s = core::str::from_utf8(b).ok()?.trim();
    match s.split_once('/') {
        Some((addr, len)) => Some((addr, Some(len.parse().ok()?))),
        None => Some((s, None)),
    }
}

/// "127.77.0.0/16" (a bare address is a /32).
pub fn parse_v4_net(b: &[u8]) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = split_net(b)?;
    let len = len.unwrap_or(32);
    (len <= 32).then_some(())?;
    Some((addr.parse().ok()?, len))
}

/// "fd64:d15c::/64" (a bare address is a /128).
pub fn parse_v6_net(b: &[u8]) -> Option<(Ipv6Addr, u8)> {
    let (addr, len) = split_net(b)?;
    let len = len.unwrap_or(128);
    (len <= 128).then_some(())?;
    Some((addr.parse().ok()?, len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn defaults_and_paths() {
        let cfg = Config::new(None);
        assert_eq!(cfg.socket_path(), DEFAULT_SOCKET);
        assert_eq!(
            cfg.table_path().unwrap().to_bytes(),
            b"/run/discotech/hook.snapshot"
        );
        assert!(cfg.is_magic("127.77.3.4".parse().unwrap()));
        assert!(cfg.is_magic("::ffff:127.77.3.4".parse().unwrap()));
        assert!(!cfg.is_magic("127.78.0.1".parse().unwrap()));
        assert!(
            !cfg.is_magic("fd64:d15c::1".parse().unwrap()),
            "no v6 range by default"
        );

        let cfg = Config::new(Some(b"/tmp/x/hook.sock"));
        assert_eq!(cfg.socket_path(), b"/tmp/x/hook.sock");
        assert_eq!(
            cfg.table_path().unwrap().to_bytes(),
            b"/tmp/x/hook.snapshot"
        );
        let cfg = Config::new(Some(b"hook.sock"));
        assert_eq!(cfg.table_path().unwrap().to_bytes(), b"hook.snapshot");
        let long = [b'a'; 200];
        assert_eq!(
            Config::new(Some(&long)).socket_path(),
            DEFAULT_SOCKET,
            "too long for sun_path"
        );
    }

    #[test]
    fn ranges_env_beats_table_beats_default() {
        let table = (
            Some((Ipv4Addr::new(10, 77, 0, 0), 16)),
            Some(("fd00::".parse().unwrap(), 64)),
        );
        let mut cfg = Config::new(None);
        cfg.set_ranges(None, None, Some(table));
        assert!(cfg.is_magic("10.77.1.1".parse().unwrap()));
        assert!(cfg.is_magic("fd00::5".parse().unwrap()));
        cfg.set_ranges(Some(b"127.99.0.0/16"), Some(b"fd64:d15c::/64"), Some(table));
        assert!(cfg.is_magic("127.99.1.1".parse().unwrap()));
        assert!(!cfg.is_magic("10.77.1.1".parse().unwrap()));
        assert!(cfg.is_magic("fd64:d15c::9".parse().unwrap()));
        let mut cfg = Config::new(None);
        cfg.set_ranges(Some(b"garbage"), Some(b"::/129"), None);
        assert_eq!(cfg.magic_v4, DEFAULT_MAGIC_V4);
        assert_eq!(cfg.magic_v6, None);
        // A table naming the whole address space is not believed.
        let wide = (
            Some((Ipv4Addr::UNSPECIFIED, 0)),
            Some((Ipv6Addr::UNSPECIFIED, 8)),
        );
        cfg.set_ranges(None, None, Some(wide));
        assert_eq!(cfg.magic_v4, DEFAULT_MAGIC_V4);
        assert_eq!(cfg.magic_v6, None);
        assert!(!cfg.is_magic("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn parsing_nets() {
        assert_eq!(
            parse_v4_net(b"127.77.0.0/16"),
            Some((Ipv4Addr::new(127, 77, 0, 0), 16))
        );
        assert_eq!(
            parse_v4_net(b" 127.77.0.1 "),
            Some((Ipv4Addr::new(127, 77, 0, 1), 32))
        );
        assert_eq!(parse_v4_net(b"127.77.0.0/33"), None);
        assert_eq!(parse_v4_net(b"127.77.0.0/x"), None);
        assert_eq!(
            parse_v6_net(b"fd64:d15c::/64"),
            Some(("fd64:d15c::".parse().unwrap(), 64))
        );
        assert_eq!(parse_v6_net(&[0xff, 0xfe]), None);
    }

    #[test]
    fn trusted_daemon_uids() {
        let mut cfg = Config::new(None);
        assert!(cfg.trusts(0, (1000, 1000)));
        assert!(cfg.trusts(1000, (1000, 1000)));
        assert!(!cfg.trusts(1001, (1000, 1000)));
        cfg.set_daemon_uid(Some(b"1001"));
        assert!(cfg.trusts(1001, (1000, 1000)));
        cfg.set_timeout(Some(b"5"));
        assert_eq!(cfg.timeout_ms, 5);
        cfg.secure = true;
        assert!(
            !cfg.trusts(1000, (1000, 0)),
            "a setuid program does not trust its caller"
        );
        assert!(!cfg.trusts(1001, (1000, 0)));
        assert!(cfg.trusts(0, (1000, 0)));
    }
}
