//! Upstream DNS: queries to the configured upstream servers (retries, 0x20, bailiwick scrub,
//! serve-stale) and the cache of their answers. Used by the DNS server's forwarder and by the
//! DNS SRV source, so it sits below both.

pub mod cache;
pub mod forward;
