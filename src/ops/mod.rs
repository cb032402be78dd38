//! Operating the daemon: the admin socket (its CLI is the binary's `cli.rs`), the HTTP listener
//! (metrics and the status page), and the accept loop they share. The metrics themselves are
//! [`crate::metrics`], below every stage that counts into them.

pub mod admin;
pub mod http;
pub mod listen;
