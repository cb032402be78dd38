//! What happens at connect time: the shared routing table and the balancer, the hook socket, the
//! live region's reports and the socket table, connection prefetching, the catch path for programs
//! the hook cannot enter, and resets of connections to removed backends.

pub mod balancer;
pub mod catch;
pub mod conn_count;
pub mod hook_server;
pub mod latency;
pub mod on_remove;
pub mod prefetch;
pub mod reports;
pub mod table;
