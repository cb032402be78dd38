//! Where services come from and how they become one snapshot: sources, the registry (merge,
//! guard, magic addresses, persistence), active health checks, and registrations.

pub mod guard;
pub mod health;
pub mod magic;
pub mod register;
pub mod registry;
pub mod snapshot;
pub mod source;
