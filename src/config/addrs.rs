//! The networks and magic ranges of `[dns]`, and the system's resolvers. Addresses and names
//! that sources write too are parsed in `crate::addr`.

use super::*;

pub(super) fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a network; write e.g. \"10.0.0.0/8\" or \"127.0.0.1\""))
}

pub(super) fn parse_magic_v4(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 network; write e.g. \"127.77.0.0/16\""))?;
    if net.prefix_len() > 28 {
        return Err(format!(
            "{s:?} is too small: use at most /28 so there is room for services"
        ));
    }
    Ok(net.trunc())
}

pub(super) fn parse_magic_v6(s: &str) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv6 network; write e.g. \"fd64:d15c::/64\""))?;
    if net.prefix_len() > 120 {
        return Err(format!("{s:?} is too small: use at most /120"));
    }
    Ok(net.trunc())
}

pub(super) fn default_magic_v4() -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(127, 77, 0, 0), 16)
}

/// True when queries sent to `a` would reach one of our own listeners.
pub(super) fn is_ours(a: &SocketAddr, listen: &[SocketAddr]) -> bool {
    listen.iter().any(|l| {
        l.port() == a.port()
            && (l.ip() == a.ip()
                || (l.ip().is_unspecified() && (a.ip().is_loopback() || a.ip().is_unspecified())))
    })
}

/// The `nameserver` lines of /etc/resolv.conf.
pub(super) fn system_nameservers() -> Vec<IpAddr> {
    std::fs::read_to_string(RESOLV_CONF)
        .map(|s| parse_resolv_conf(&s))
        .unwrap_or_default()
}

pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|w| w.split('%').next().and_then(|a| a.parse().ok()))
        .collect()
}
