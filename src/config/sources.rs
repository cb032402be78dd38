//! `[[source]]` and `[[register]]`: the file, DNS SRV and ZooKeeper sources and the ZooKeeper
//! registrations, validated.

use super::*;

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
}

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

    fn parse(s: &str) -> Result<Self, String> {
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

/// `[[source]] kind = "dns-srv"`: each service follows one SRV name upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSrvSource {
    pub name: String,
    /// Resolvers to ask; default: `dns.upstreams`.
    pub resolvers: Vec<SocketAddr>,
    pub services: BTreeMap<ServiceName, Name>,
    /// Polling honours the SRV TTL, clamped to [min_ttl, max_ttl].
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

/// `[[register]]`: announce a local service into ZooKeeper while its health check passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub service: ServiceName,
    pub addr: SocketAddr,
    pub hosts: Vec<String>,
    /// The service's node; the instance is an ephemeral child of it.
    pub path: String,
    pub format: ZkFormat,
    pub session_timeout: Duration,
    pub auth: Option<String>,
    pub ports: BTreeMap<PortName, u16>,
    pub check: HealthCheck,
}

/// A ZooKeeper path: absolute, no empty segments, no trailing slash.
pub(super) fn zk_path(p: &str) -> Result<String, String> {
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

impl Validator<'_> {
    pub(super) fn source(
        &mut self,
        s: &S<RawSource>,
        base: &Path,
        upstreams: &[SocketAddr],
    ) -> Option<SourceConfig> {
        let raw = s.get_ref();
        let kind = raw.kind.get_ref().as_str();
        // Each kind accepts only its own keys.
        let allowed: &[&str] = match kind {
            "file" => &["path"],
            "zookeeper" => &["hosts", "root", "session_timeout", "auth", "format"],
            "dns-srv" => &["resolvers", "services", "min_ttl", "max_ttl"],
            other => {
                self.problem(&raw.kind, "source.kind", format!("unknown source kind {other:?}, expected \"file\", \"zookeeper\" or \"dns-srv\""));
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
            self.problem(
                s,
                &format!("source.{key}"),
                format!("`{key}` does not apply to a {kind} source"),
            );
        }
        let name = |default: String| raw.name.as_ref().map_or(default, |n| n.get_ref().clone());
        match kind {
            "file" => {
                let Some(path) = &raw.path else {
                    self.problem(s, "source.path", "a file source needs `path` (a directory of *.toml zone files, or one file)");
                    return None;
                };
                Some(SourceConfig::File {
                    name: name(format!("file:{}", path.get_ref())),
                    path: base.join(path.get_ref()),
                })
            }
            "zookeeper" => {
                let hosts = self.zk_hosts(s, raw.hosts.as_deref(), "source.hosts")?;
                let Some(root) = &raw.root else {
                    self.problem(
                        s,
                        "source.root",
                        "a zookeeper source needs `root`, the path whose children are services",
                    );
                    return None;
                };
                let root_path = self.check(root, "source.root", |p| zk_path(p))?;
                let format = match &raw.format {
                    Some(f) => self.check(f, "source.format", |f| ZkFormat::parse(f))?,
                    None => ZkFormat::Auto,
                };
                Some(SourceConfig::Zookeeper(ZookeeperSource {
                    name: name(format!("zookeeper:{root_path}")),
                    hosts,
                    root: root_path,
                    session_timeout: self.duration(
                        &raw.session_timeout,
                        "source.session_timeout",
                        Duration::from_secs(10),
                    ),
                    auth: self.zk_auth(raw.auth.as_ref()),
                    format,
                }))
            }
            _ => {
                let resolvers = match &raw.resolvers {
                    Some(list) => list
                        .iter()
                        .filter_map(|a| self.check(a, "source.resolvers", |s| parse_addr(s, 53)))
                        .collect(),
                    None => upstreams.to_vec(),
                };
                if resolvers.is_empty() {
                    self.problem(
                        s,
                        "source.resolvers",
                        "a dns-srv source needs resolvers (or dns.upstreams)",
                    );
                }
                let mut services = BTreeMap::new();
                for (svc, srv) in raw.services.iter().flatten() {
                    let field = format!("source.services.{svc}");
                    let Some(svc_name) = self.check(srv, &field, |_| {
                        svc.parse::<ServiceName>()
                            .map_err(|e| format!("invalid service name {svc:?}: {e}"))
                    }) else {
                        continue;
                    };
                    if let Some(srv_name) = self.check(srv, &field, |n| parse_zone(n)) {
                        services.insert(svc_name, srv_name);
                    }
                }
                if services.is_empty() {
                    self.problem(s, "source.services", "a dns-srv source needs services = { name = \"_http._tcp.web.example.com\" }");
                }
                let min_ttl = self.duration(&raw.min_ttl, "source.min_ttl", Duration::from_secs(5));
                let max_ttl =
                    self.duration(&raw.max_ttl, "source.max_ttl", Duration::from_secs(300));
                if min_ttl > max_ttl || min_ttl.is_zero() {
                    self.problem(
                        s,
                        "source.min_ttl",
                        "min_ttl must be above zero and at most max_ttl",
                    );
                }
                Some(SourceConfig::DnsSrv(DnsSrvSource {
                    name: name("dns-srv".into()),
                    resolvers,
                    services,
                    min_ttl,
                    max_ttl,
                }))
            }
        }
    }

    pub(super) fn zk_hosts(
        &mut self,
        at: &S<impl Sized>,
        hosts: Option<&[S<String>]>,
        field: &str,
    ) -> Option<Vec<String>> {
        let Some(hosts) = hosts.filter(|h| !h.is_empty()) else {
            self.problem(
                at,
                field,
                "needs at least one ZooKeeper host, e.g. hosts = [\"127.0.0.1:2181\"]",
            );
            return None;
        };
        let ok: Vec<String> = hosts
            .iter()
            .filter_map(|h| {
                self.check(h, field, |h| match h.rsplit_once(':') {
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

    pub(super) fn zk_auth(&mut self, auth: Option<&S<String>>) -> Option<String> {
        let auth = auth?;
        self.check(auth, "auth", |a| {
            if a.contains(':') {
                Ok(a.clone())
            } else {
                Err("digest auth is \"user:password\"")
            }
        })
    }

    pub(super) fn registration(&mut self, r: &S<RawRegister>) -> Option<Registration> {
        let raw = r.get_ref();
        let service = self.check(&raw.service, "register.service", |s| {
            s.parse::<ServiceName>()
                .map_err(|e| format!("invalid service name {s:?}: {e}"))
        });
        let addr = self.check(&raw.addr, "register.addr", |s| {
            parse_addr(s, 0).and_then(|a| {
                if a.port() == 0 {
                    Err(format!("{s:?} needs a port"))
                } else {
                    Ok(a)
                }
            })
        });
        let hosts = self.zk_hosts(r, Some(&raw.hosts), "register.hosts");
        let path = self.check(&raw.path, "register.path", |p| zk_path(p));
        let format = match &raw.format {
            Some(f) => self.check(f, "register.format", |f| match ZkFormat::parse(f)? {
                ZkFormat::Auto => Err(
                    "registration needs a concrete format: serverset, curator, nerve or host-port"
                        .to_string(),
                ),
                other => Ok(other),
            }),
            None => Some(ZkFormat::Serverset),
        };
        let mut ports = BTreeMap::new();
        for (name, port) in raw.ports.iter().flatten() {
            let field = format!("register.ports.{name}");
            let pname = self.check(port, &field, |_| {
                name.parse::<PortName>().map_err(|e| e.to_string())
            });
            let number = self.check(port, &field, |p| {
                u16::try_from(*p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or("must be a port number (1-65535)")
            });
            if let (Some(n), Some(p)) = (pname, number) {
                ports.insert(n, p);
            }
        }
        let check = match &raw.check {
            Some(c) => self.health_check(c)?,
            None => HealthCheck {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                jitter: Duration::from_millis(200),
                rise: 2,
                fall: 2,
            },
        };
        let session_timeout = self.duration(
            &raw.session_timeout,
            "register.session_timeout",
            Duration::from_secs(10),
        );
        let auth = self.zk_auth(raw.auth.as_ref());
        Some(Registration {
            service: service?,
            addr: addr?,
            hosts: hosts?,
            path: path?,
            format: format?,
            session_timeout,
            auth,
            ports,
            check,
        })
    }
}
