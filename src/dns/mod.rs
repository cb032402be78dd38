//! DNS for the service domains: authoritative answers, and the server that ties them and the
//! forwarder ([`crate::upstream`]) to sockets.

pub mod answer;
pub mod server;
pub mod udp;
