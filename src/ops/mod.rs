//! Operating the daemon: the admin socket (its CLI is the binary's `cli.rs`), the HTTP listener
//! (metrics and the status page), the metrics themselves, and the accept loop they share.

pub mod admin;
pub mod http;
pub mod listen;
pub mod metrics;
