//! discotech: host-local service discovery and connect-time load balancing.
//!
//! Data flows one way: sources -> registry (merge, guard, magic addresses) -> one immutable
//! [`discovery::snapshot::Snapshot`] swapped atomically -> read by the DNS server and the routing
//! table hooks pick from. The folders follow that flow: [`discovery`] (sources, registry, health),
//! [`dns`], [`connect`] (routing table, balancer, hook socket, prefetching, the catch path), and
//! [`ops`] (admin, status page); [`config`] and [`daemon`] tie them together. Below every stage:
//! [`upstream`] (queries to upstream DNS servers and their cache, for the forwarder and the
//! DNS SRV source), [`metrics`], and the domain types of [`service`].
#![forbid(unsafe_code)]

pub mod addr;
pub mod config;
pub mod connect;
pub mod daemon;
pub mod diagnostic;
pub mod discovery;
pub mod dns;
pub mod duration;
#[doc(hidden)]
pub mod fuzz;
pub mod metrics;
pub mod ops;
pub mod service;
pub mod state;
pub mod upstream;
