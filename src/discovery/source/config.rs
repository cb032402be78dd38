//! `[[source]]`: which kind a table is, whether it holds only that kind's keys, and the
//! validated [`SourceConfig`]. Each remote kind checks its own keys in its `config.rs`
//! (`zookeeper/config.rs`, `dns_srv/config.rs`); the file source needs only a path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::dns_srv::config::DnsSrvSource;
use super::raw::RawSource;
use super::zookeeper::config::ZookeeperSource;
use crate::diagnostic::Checker;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of `*.toml` zone files, or one file.
    File {
        name: String,
        path: PathBuf,
    },
    Zookeeper(ZookeeperSource),
    DnsSrv(DnsSrvSource),
}

impl SourceConfig {
    pub fn name(&self) -> &str {
        match self {
            Self::File { name, .. } => name,
            Self::Zookeeper(z) => &z.name,
            Self::DnsSrv(d) => &d.name,
        }
    }

    /// Checks one `[[source]]`, reporting each problem into `c`. Paths are relative to `base`
    /// (the config file's directory); a dns-srv source without resolvers asks `upstreams`.
    pub(crate) fn from_raw(
        c: &mut Checker,
        s: &Spanned<RawSource>,
        base: &Path,
        upstreams: &[SocketAddr],
    ) -> Option<Self> {
        let raw = s.get_ref();
        let kind = raw.kind.get_ref().as_str();
        // Each kind accepts only its own keys.
        let allowed: &[&str] = match kind {
            "file" => &["path"],
            "zookeeper" => &["hosts", "root", "session_timeout", "auth", "format"],
            "dns-srv" => &["resolvers", "services", "min_ttl", "max_ttl"],
            other => {
                c.problem(&raw.kind, "source.kind", format!("unknown source kind {other:?}, expected \"file\", \"zookeeper\" or \"dns-srv\""));
                return None;
            }
        };
        let present = [
            ("path", raw.path.is_some()),
            ("hosts", raw.hosts.is_some()),
            ("root", raw.root.is_some()),
            ("session_timeout", raw.session_timeout.is_some()),
            ("auth", raw.auth.is_some()),
            ("format", raw.format.is_some()),
            ("resolvers", raw.resolvers.is_some()),
            ("services", raw.services.is_some()),
            ("min_ttl", raw.min_ttl.is_some()),
            ("max_ttl", raw.max_ttl.is_some()),
        ];
        for (key, _) in present.iter().filter(|(k, p)| *p && !allowed.contains(k)) {
            c.problem(
                s,
                &format!("source.{key}"),
                format!("`{key}` does not apply to a {kind} source"),
            );
        }
        let name = |default: String| raw.name.as_ref().map_or(default, |n| n.get_ref().clone());
        match kind {
            "file" => {
                let Some(path) = &raw.path else {
                    c.problem(s, "source.path", "a file source needs `path` (a directory of *.toml zone files, or one file)");
                    return None;
                };
                Some(Self::File {
                    name: name(format!("file:{}", path.get_ref())),
                    path: base.join(path.get_ref()),
                })
            }
            "zookeeper" => ZookeeperSource::from_raw(c, s, name).map(Self::Zookeeper),
            _ => Some(Self::DnsSrv(DnsSrvSource::from_raw(c, s, name, upstreams))),
        }
    }
}
