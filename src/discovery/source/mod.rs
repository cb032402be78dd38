//! Sources tell the registry which services exist. Each source runs as its own task and sends
//! [`SourceEvent`]s on the channel the registry reads, tagged with its index in the config:
//!
//! - `Reset`: the source's complete set of services, replacing what it said before. The file
//!   source sends one after each scan whose result differs from what it last sent (the zone files'
//!   last good content, merged); ZooKeeper after each full read (at start and in every new
//!   session) and when a service node goes away. The registry replaces the source's set and
//!   re-evaluates only the services whose spec changed: a service the set no longer names is
//!   gone from this source, and its removal goes through the guard like any other.
//! - `Update`: one service's complete spec from this source, the rest of its set unchanged.
//!   dns-srv sends one after every successful lookup, ZooKeeper one per service a watch changed.
//!   The registry puts it in the source's set (an identical spec changes nothing). An update
//!   cannot say a service is gone; that takes a `Reset`.
//! - `Failed`: the source could not be read. The file source sends it when its path cannot be
//!   read (a zone file with mistakes is not a failure: it keeps its last good content), dns-srv
//!   when one service's lookup fails, ZooKeeper when its connection or session is lost; the file
//!   and ZooKeeper sources only when the error changes. The registry changes no service (the last
//!   good set stays in force, because a source failure is never a deconfiguration), marks the
//!   source failed in its status and metrics, and logs it; the next `Reset` or `Update` from the
//!   source marks it recovered.
//!
//! Each kind's config sits beside it (`zookeeper/config.rs`, `dns_srv/config.rs`); `config.rs`
//! tells the kinds of a `[[source]]` apart and `raw.rs` holds the table as written. Zone files,
//! the file source's format, are parsed in `zone.rs`.

pub mod config;
pub mod dns_srv;
pub mod file;
pub mod raw;
pub mod zone;
pub mod zookeeper;

use crate::service::ServiceSpec;

/// What a source reports. `source` is the index of the source in the config.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// The complete current set of services from this source.
    Reset {
        source: usize,
        services: Vec<ServiceSpec>,
    },
    /// One service of this source, the rest unchanged (sources that learn services one by one).
    Update { source: usize, service: ServiceSpec },
    /// The source could not be read; its last good set stays in force.
    Failed { source: usize, error: String },
}
