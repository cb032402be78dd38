//! Socket addresses and DNS names as config and zone files write them, with messages that show
//! how to write them. Shared by the config's own sections and by the tables each source and
//! registration checks for itself; what they mean is left to those callers.

use std::net::{IpAddr, SocketAddr};

use hickory_proto::rr::Name;

/// `ip:port`, `[v6]:port`, or a bare address with `default_port`.
///
/// # Errors
/// A message with examples of what is accepted.
pub fn parse_addr(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("{s:?} is not an address; write e.g. \"127.0.0.1:53\", \"[::1]:53\" or \"127.0.0.1\""))
}

/// A DNS zone name, lowercased and fully qualified.
///
/// # Errors
/// The root zone, or text that is not a domain name.
pub fn parse_zone(s: &str) -> Result<Name, String> {
    let trimmed = s.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("the root zone cannot be a service domain or forward zone".into());
    }
    let mut name =
        Name::from_ascii(trimmed).map_err(|e| format!("{s:?} is not a domain name: {e}"))?;
    name.set_fqdn(true);
    if name.iter().any(|l| l.is_empty() || l.len() > 63) {
        return Err(format!("{s:?} is not a domain name"));
    }
    Ok(name.to_lowercase())
}
