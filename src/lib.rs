//! discotech: host-local service discovery and connect-time load balancing.
//!
//! Data flows one way: sources -> registry (merge, magic addresses) -> one immutable
//! [`snapshot::Snapshot`] swapped atomically -> read by the DNS server and the hook server.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balancer;
pub mod catch;
pub mod config;
pub mod conn_count;
pub mod daemon;
pub mod diagnostic;
pub mod dns;
pub mod duration;
#[doc(hidden)]
pub mod fuzz;
pub mod guard;
pub mod health;
pub mod hook_server;
pub mod http;
pub mod latency;
pub mod listen;
pub mod magic;
pub mod metrics;
pub mod on_remove;
pub mod prefetch;
pub mod register;
pub mod registry;
pub mod reports;
pub mod service;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod table;
