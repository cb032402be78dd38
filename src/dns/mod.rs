//! DNS for the service domains: authoritative answers, the forwarder and its cache, and the
//! server that ties them to sockets.

pub mod answer;
pub mod cache;
pub mod forward;
pub mod server;
pub mod udp;
