//! Sources tell the registry which services exist. Each source sends whole sets (`Reset`) or says
//! it is failing (`Failed`); a failing source keeps its last good set, because a source failure is
//! never a deconfiguration.
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
