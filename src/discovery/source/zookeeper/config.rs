//! `[[source]] kind = "zookeeper"`, validated, and the ZooKeeper keys a `[[register]]` shares
//! with it (hosts, paths, auth, node formats). Watching the tree is the source's job.

use std::time::Duration;

use toml::Spanned;

use crate::diagnostic::Checker;
use crate::discovery::source::raw::RawSource;

/// How service instances are written in ZooKeeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZkFormat {
    /// Recognise each node by its content: JSON of any known layout, else a `host:port` node name.
    #[default]
    Auto,
    /// Finagle/Aurora serverset JSON: serviceEndpoint, additionalEndpoints, status.
    Serverset,
    /// Curator x-discovery ServiceInstance JSON.
    Curator,
    /// SmartStack Nerve JSON: host, port, name, weight.
    Nerve,
    /// The node name is `host:port`; data is ignored.
    HostPort,
}

impl ZkFormat {
    pub const NAMES: &'static [&'static str] =
        &["auto", "serverset", "curator", "nerve", "host-port"];

    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "serverset" => Ok(Self::Serverset),
            "curator" => Ok(Self::Curator),
            "nerve" => Ok(Self::Nerve),
            "host-port" => Ok(Self::HostPort),
            other => Err(format!(
                "unknown format {other:?}, expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// `[[source]] kind = "zookeeper"`: each child of `root` is a service, each of its children an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZookeeperSource {
    pub name: String,
    /// `host:port` of each ensemble member.
    pub hosts: Vec<String>,
    /// Absolute path, no trailing slash (except `/` itself).
    pub root: String,
    pub session_timeout: Duration,
    /// Digest auth as `user:password`.
    pub auth: Option<String>,
    pub format: ZkFormat,
}

impl ZookeeperSource {
    /// Checks a zookeeper `[[source]]`'s keys, reporting each problem into `c`; `name` gives the
    /// source's name from the default (`zookeeper:<root>`) when the table names none.
    pub(crate) fn from_raw(
        c: &mut Checker,
        s: &Spanned<RawSource>,
        name: impl FnOnce(String) -> String,
    ) -> Option<Self> {
        let raw = s.get_ref();
        let hosts = zk_hosts(c, s, raw.hosts.as_deref(), "source.hosts")?;
        let Some(root) = &raw.root else {
            c.problem(
                s,
                "source.root",
                "a zookeeper source needs `root`, the path whose children are services",
            );
            return None;
        };
        let root_path = c.check(root, "source.root", |p| zk_path(p))?;
        let format = match &raw.format {
            Some(f) => c.check(f, "source.format", |f| ZkFormat::parse(f))?,
            None => ZkFormat::Auto,
        };
        Some(Self {
            name: name(format!("zookeeper:{root_path}")),
            hosts,
            root: root_path,
            session_timeout: c.duration(
                &raw.session_timeout,
                "source.session_timeout",
                Duration::from_secs(10),
            ),
            auth: zk_auth(c, raw.auth.as_ref()),
            format,
        })
    }
}

/// A ZooKeeper path: absolute, no empty segments, no trailing slash.
pub(crate) fn zk_path(p: &str) -> Result<String, String> {
    if p == "/" {
        return Ok(p.to_string());
    }
    if !p.starts_with('/') || p.ends_with('/') || p.contains("//") {
        return Err(format!(
            "{p:?} is not a ZooKeeper path; write e.g. \"/discovery\""
        ));
    }
    Ok(p.to_string())
}

/// The ensemble's `host:port`s: all of them, or `None` with each bad one (or their absence,
/// reported at `at`) reported as `field`.
pub(crate) fn zk_hosts<T>(
    c: &mut Checker,
    at: &Spanned<T>,
    hosts: Option<&[Spanned<String>]>,
    field: &str,
) -> Option<Vec<String>> {
    let Some(hosts) = hosts.filter(|h| !h.is_empty()) else {
        c.problem(
            at,
            field,
            "needs at least one ZooKeeper host, e.g. hosts = [\"127.0.0.1:2181\"]",
        );
        return None;
    };
    let ok: Vec<String> = hosts
        .iter()
        .filter_map(|h| {
            c.check(h, field, |h| match h.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) =>
                {
                    Ok(h.clone())
                }
                _ => Err(format!("{h:?} is not host:port")),
            })
        })
        .collect();
    (ok.len() == hosts.len()).then_some(ok)
}

/// Digest auth, `user:password`.
pub(crate) fn zk_auth(c: &mut Checker, auth: Option<&Spanned<String>>) -> Option<String> {
    let auth = auth?;
    c.check(auth, "auth", |a| {
        if a.contains(':') {
            Ok(a.clone())
        } else {
            Err("digest auth is \"user:password\"")
        }
    })
}
