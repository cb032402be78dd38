//! Counting this host's established TCP connections per remote address, from the kernel's socket
//! table, for least-conn balancing: a netlink sock_diag dump of ESTABLISHED TCP sockets (v4 and
//! v6) of the daemon's network namespace, or, if netlink is refused, `/proc/net/tcp{,6}` (state
//! 01). The choice among backends is left to the balancer. Netlink comes first because the
//! packaged unit hides `/proc/net` (`ProcSubset=pid`) and the kernel filters by state for us.
//! The hook server reads at most every [`REFRESH`], and only while a least-conn service is picked for.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The longest a least-conn pick works from counts older than this.
pub const REFRESH: Duration = Duration::from_millis(100);

/// Established connections per remote `ip:port`, for this network namespace: netlink first, then
/// /proc. When neither can be read the counts are empty (the balancer falls back to its
/// tie-breaks) and the last error is returned for the caller to log.
pub fn read() -> (HashMap<SocketAddr, u32>, Option<std::io::Error>) {
    match read_netlink() {
        Ok(counts) => (counts, None),
        Err(netlink) => {
            let (counts, error) = read_proc();
            (
                counts,
                error.map(|e| {
                    std::io::Error::other(format!("netlink sock_diag: {netlink}; /proc/net: {e}"))
                }),
            )
        }
    }
}

/// Netlink messages read from one dump at most: a bound, far above any real socket table
/// (each message is one socket).
const MAX_DIAG_MESSAGES: usize = 4_000_000;

/// One sock_diag dump per address family, ESTABLISHED only.
///
/// # Errors
/// The socket could not be opened or the kernel answered with an error or bytes we cannot decode.
pub fn read_netlink() -> std::io::Result<HashMap<SocketAddr, u32>> {
    let mut counts = HashMap::new();
    dump(StateFlags::ESTABLISHED, false, |row| {
        *counts.entry(row.remote).or_insert(0) += 1;
    })?;
    Ok(counts)
}

pub use netlink_packet_sock_diag::inet::StateFlags;

/// TCP states as sock_diag reports them (`include/net/tcp_states.h`).
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const LISTEN: u8 = 10;
}

/// One TCP socket of this network namespace, as a sock_diag dump shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRow {
    /// The peer (v4-mapped v6 as v4, the way backends are written).
    pub remote: SocketAddr,
    pub local_port: u16,
    /// See [`state`].
    pub state: u8,
    /// The kernel's smoothed round-trip time (tcp_info `tcpi_rtt`), when asked for and the socket
    /// has one (time-wait sockets do not).
    pub rtt_us: Option<u32>,
}

/// Offset of `tcpi_rtt` in `struct tcp_info` (8 bytes of u8 fields, then u32s from `tcpi_rto`).
const TCPI_RTT_OFFSET: usize = 68;

/// Dumps this namespace's TCP sockets (v4 and v6) in `states`, with tcp_info's RTT when `rtt`,
/// calling `each` per socket.
///
/// # Errors
/// The socket could not be opened or the kernel answered with an error or bytes we cannot decode.
pub fn dump(states: StateFlags, rtt: bool, each: impl FnMut(SockRow)) -> std::io::Result<()> {
    dump_to(states, rtt, &[], each)
}

/// [`dump`] of the sockets whose remote port is one of `ports` only (all when empty): the
/// kernel filters them (sock_diag bytecode), so a host with a large socket table, such as
/// thousands in time-wait, costs no more than the sockets asked for.
///
/// # Errors
/// As [`dump`].
pub fn dump_to(
    states: StateFlags,
    rtt: bool,
    ports: &[u16],
    mut each: impl FnMut(SockRow),
) -> std::io::Result<()> {
    use netlink_packet_sock_diag::inet::nlas::Nla;
    let mut socket = diag_socket()?;
    dump_raw(&mut socket, states, rtt, ports, |r| {
        let id = &r.header.socket_id;
        let rtt_us = r.nlas.iter().find_map(|nla| match nla {
            Nla::TcpInfo(info) => info
                .get(TCPI_RTT_OFFSET..TCPI_RTT_OFFSET + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_ne_bytes),
            _ => None,
        });
        each(SockRow {
            remote: SocketAddr::new(canonical(id.destination_address), id.destination_port),
            local_port: id.source_port,
            state: r.header.state,
            rtt_us,
        });
    })
}

/// v4-mapped v6 as v4, the way backends are written.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn diag_socket() -> std::io::Result<netlink_sys::Socket> {
    use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    Ok(socket)
}

/// Resets this namespace's established TCP connections to `remote` (sock_diag `SOCK_DESTROY`,
/// which needs `CAP_NET_ADMIN`): each side sees a reset, and a client holding one in a pool
/// reconnects elsewhere. Returns how many were reset.
///
/// # Errors
/// The dump or a destroy request failed (EPERM without the capability).
pub fn reset_connections_to(remote: SocketAddr) -> std::io::Result<usize> {
    use netlink_packet_core::{
        NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_packet_sock_diag::constants::{IPPROTO_TCP, SOCK_DESTROY};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest};

    let mut socket = diag_socket()?;
    let mut found = Vec::new();
    dump_raw(
        &mut socket,
        StateFlags::ESTABLISHED,
        false,
        &[remote.port()],
        |r| {
            let id = &r.header.socket_id;
            if canonical(id.destination_address) == remote.ip()
                && id.destination_port == remote.port()
            {
                found.push((r.header.family, id.clone()));
            }
        },
    )?;
    let mut reset = 0;
    for (family, socket_id) in found {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id,
            })
            .into(),
        );
        request.finalize();
        request.header.message_type = SOCK_DESTROY;
        let mut out = vec![0u8; request.buffer_len()];
        request.serialize(&mut out);
        socket.send(&out, 0)?;
        let mut buf = vec![0u8; 4096];
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let msg =
            NetlinkMessage::<SockDiagMessage>::deserialize(buf.get(..size).unwrap_or_default())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        match msg.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => {
                let errno = e.code.map_or(0, |c| -c.get());
                // ENOENT: it closed meanwhile.
                if errno != libc::ENOENT {
                    return Err(std::io::Error::from_raw_os_error(errno));
                }
            }
            _ => reset += 1,
        }
    }
    Ok(reset)
}

/// One sock_diag dump per address family on `socket`, handing each TCP socket's response to
/// `each`.
fn dump_raw(
    socket: &mut netlink_sys::Socket,
    states: StateFlags,
    rtt: bool,
    ports: &[u16],
    mut each: impl FnMut(&netlink_packet_sock_diag::inet::InetResponse),
) -> std::io::Result<()> {
    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId};

    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let extensions = if rtt {
        ExtensionFlags::INFO
    } else {
        ExtensionFlags::empty()
    };
    for (family, id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: extensions.clone(),
                states: states.clone(),
                socket_id: id,
            })
            .into(),
        );
        request.finalize();
        // serialize() panics on a short buffer: size it from the message itself.
        let mut out = vec![0u8; request.buffer_len()];
        request.serialize(&mut out);
        if !ports.is_empty() {
            append_port_filter(&mut out, ports);
        }
        socket.send(&out, 0)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0usize;
        'dump: loop {
            let size = socket.recv(&mut &mut buf[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let bytes = buf.get(offset..size).unwrap_or_default();
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
                    .map_err(|e| bad(format!("sock_diag reply: {e}")))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => each(&r),
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => return Err(bad(format!("sock_diag: {e:?}"))),
                    _ => {}
                }
                seen += 1;
                if len == 0 || seen > MAX_DIAG_MESSAGES {
                    return Err(bad("sock_diag dump did not end".into()));
                }
                offset += len;
            }
        }
    }
    Ok(())
}

/// `INET_DIAG_REQ_BYTECODE`: the request attribute holding a socket filter.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// Filter ops (`include/uapi/linux/inet_diag.h`).
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_D_EQ: u8 = 12;

/// The filter "remote port is one of `ports`" as sock_diag bytecode. Per port, 12 bytes: a D_EQ
/// test (true: on to the next op; false: on to the next port's test), the port, and a jump to
/// the end (accept). Then a last jump past the end (reject). Every target lies on the chain of
/// "true" steps, as the kernel's audit of the filter requires.
fn port_filter(ports: &[u16]) -> Vec<u8> {
    let total = ports.len() * 12 + 4;
    let mut bc = Vec::with_capacity(total);
    let mut op = |code: u8, yes: u8, no: u16| {
        bc.push(code);
        bc.push(yes);
        bc.extend_from_slice(&no.to_ne_bytes());
    };
    for (i, &port) in ports.iter().enumerate() {
        let to_end = u16::try_from(total - (i * 12 + 8)).unwrap_or(u16::MAX);
        op(INET_DIAG_BC_D_EQ, 8, 12);
        op(0, 0, port);
        op(INET_DIAG_BC_JMP, 4, to_end);
    }
    op(INET_DIAG_BC_JMP, 4, 8);
    bc
}

/// Appends the port filter to a serialized request and fixes the message length.
fn append_port_filter(msg: &mut Vec<u8>, ports: &[u16]) {
    let bc = port_filter(ports);
    let Ok(attr_len) = u16::try_from(bc.len() + 4) else {
        return; // too many ports for one attribute: leave the dump unfiltered
    };
    msg.extend_from_slice(&attr_len.to_ne_bytes());
    msg.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    msg.extend_from_slice(&bc);
    let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
    if let Some(head) = msg.get_mut(..4) {
        head.copy_from_slice(&len.to_ne_bytes());
    }
}

/// The /proc text tables; see [`read`].
pub fn read_proc() -> (HashMap<SocketAddr, u32>, Option<std::io::Error>) {
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
        let netlink = read_netlink().unwrap();
        assert_eq!(netlink.get(&addr), Some(&1), "{netlink:?}");
        let mut rows = Vec::new();
        dump(StateFlags::all(), true, |row| rows.push(row)).unwrap();
        let ours = rows
            .iter()
            .find(|r| r.remote == addr && r.local_port == _held.local_addr().unwrap().port())
            .unwrap_or_else(|| panic!("{rows:?}"));
        assert_eq!(ours.state, state::ESTABLISHED);
        // Loopback: a round trip well under a second, and measured.
        assert!(
            ours.rtt_us.is_some_and(|us| us > 0 && us < 1_000_000),
            "{ours:?}"
        );
        assert!(
            rows.iter()
                .any(|r| r.state == state::LISTEN && r.local_port == addr.port())
        );
        let (proc, _) = read_proc();
        assert_eq!(proc.get(&addr), Some(&1), "{proc:?}");
    }

    #[test]
    fn a_port_filtered_dump_holds_exactly_the_sockets_to_those_ports() {
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let held: Vec<_> = addrs
            .iter()
            .map(|a| std::net::TcpStream::connect(a).unwrap())
            .collect();
        let want = [addrs[0].port(), addrs[2].port()];
        let mut rows = Vec::new();
        dump_to(StateFlags::all(), false, &want, |row| rows.push(row)).unwrap();
        for (i, (a, h)) in addrs.iter().zip(&held).enumerate() {
            let seen = rows
                .iter()
                .any(|r| r.remote == *a && r.local_port == h.local_addr().unwrap().port());
            assert_eq!(seen, i != 1, "connection {i} to {a}: {rows:?}");
        }
        assert!(
            rows.iter().all(|r| want.contains(&r.remote.port())),
            "only sockets to the ports asked: {rows:?}"
        );
        assert_eq!(port_filter(&[80]).len(), 16);
    }
}
