//! The instance layouts people already keep in ZooKeeper, read into a [`Backend`] and written back
//! for registration: Finagle/Aurora serversets, Curator x-discovery, SmartStack Nerve and plain
//! `host:port` node names. Pure functions over bytes; watching and reading nodes is the source's job.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::config::ZkFormat;
use crate::service::{Backend, PortName, ServiceName};

/// Curator's `port` and `sslPort` become these named ports, so `_https._tcp.web.disco` works.
pub const CURATOR_PORT: &str = "http";
pub const CURATOR_SSL_PORT: &str = "https";

/// Why a node could not be read as an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("data is not valid JSON: {0}")]
    Json(String),
    #[error(
        "data matches no known layout (serverset, curator, nerve) and the node name is not host:port"
    )]
    Unknown,
    #[error("{layout} data is malformed: {reason}")]
    Layout {
        layout: &'static str,
        reason: String,
    },
    #[error("{field}: {value:?} is not an IP address (host names are not resolved)")]
    Host { field: &'static str, value: String },
    #[error("{field}: {value} is not a port number (1-65535)")]
    Port { field: &'static str, value: i64 },
    #[error("node name {0:?} is not host:port")]
    HostPort(String),
}

/// Reads one instance node. `Ok(None)` is a well-formed instance that must not take traffic
/// (serverset status other than ALIVE, Curator `enabled: false`, Nerve weight 0).
///
/// # Errors
/// The node's data (or, for `host-port`, its name) is not an instance of the expected layout.
pub fn parse(
    format: ZkFormat,
    node_name: &str,
    data: &[u8],
) -> Result<Option<Backend>, FormatError> {
    match format {
        ZkFormat::HostPort => host_port(node_name).map(|a| Some(Backend::new(a))),
        ZkFormat::Serverset => serverset(&json_object(data)?),
        ZkFormat::Curator => curator(&json_object(data)?),
        ZkFormat::Nerve => nerve(&json_object(data)?),
        ZkFormat::Auto => auto(node_name, data),
    }
}

/// Recognises the layout by its distinctive keys; data that is not JSON at all (often empty)
/// falls back to the node name, as host:port registries leave the data empty or free-form.
fn auto(node_name: &str, data: &[u8]) -> Result<Option<Backend>, FormatError> {
    let trimmed = data.trim_ascii();
    if trimmed.first() == Some(&b'{') {
        let obj = json_object(trimmed)?;
        if obj.contains_key("serviceEndpoint") {
            return serverset(&obj);
        }
        if obj.contains_key("address") && (obj.contains_key("port") || obj.contains_key("sslPort"))
        {
            return curator(&obj);
        }
        if obj.contains_key("host") && obj.contains_key("port") {
            return nerve(&obj);
        }
        return host_port(node_name)
            .map(|a| Some(Backend::new(a)))
            .map_err(|_| FormatError::Unknown);
    }
    host_port(node_name)
        .map(|a| Some(Backend::new(a)))
        .map_err(|_| FormatError::Unknown)
}

fn json_object(data: &[u8]) -> Result<Map<String, Value>, FormatError> {
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(FormatError::Json("expected a JSON object".into())),
        Err(e) => Err(FormatError::Json(e.to_string())),
    }
}

fn layout<T: for<'de> Deserialize<'de>>(
    layout: &'static str,
    obj: &Map<String, Value>,
) -> Result<T, FormatError> {
    T::deserialize(Value::Object(obj.clone())).map_err(|e| FormatError::Layout {
        layout,
        reason: e.to_string(),
    })
}

fn ip(field: &'static str, host: &str) -> Result<IpAddr, FormatError> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().map_err(|_| FormatError::Host {
        field,
        value: host.to_string(),
    })
}

fn port(field: &'static str, p: i64) -> Result<u16, FormatError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or(FormatError::Port { field, value: p })
}

/// `10.0.0.1:8080` or `[::1]:8080`.
fn host_port(name: &str) -> Result<SocketAddr, FormatError> {
    name.parse::<SocketAddr>()
        .ok()
        .filter(|a| a.port() != 0)
        .ok_or_else(|| FormatError::HostPort(name.to_string()))
}

#[derive(Deserialize)]
struct Endpoint {
    host: String,
    port: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Serverset {
    service_endpoint: Endpoint,
    #[serde(default)]
    additional_endpoints: BTreeMap<String, Endpoint>,
    status: Option<String>,
}

/// Finagle/Aurora `ServiceInstance`. A missing status counts as ALIVE (old writers omit it).
/// Additional endpoints become named ports when they are on the same host; an endpoint on another
/// host, or with a name that is not a DNS label, cannot be expressed as a named port and is ignored.
fn serverset(obj: &Map<String, Value>) -> Result<Option<Backend>, FormatError> {
    let s: Serverset = layout("serverset", obj)?;
    if s.status.as_deref().is_some_and(|st| st != "ALIVE") {
        return Ok(None);
    }
    let host = ip("serviceEndpoint.host", &s.service_endpoint.host)?;
    let mut b = Backend::new(SocketAddr::new(
        host,
        port("serviceEndpoint.port", s.service_endpoint.port)?,
    ));
    for (name, ep) in &s.additional_endpoints {
        let (Ok(pname), Ok(h)) = (
            name.parse::<PortName>(),
            ip("additionalEndpoints.host", &ep.host),
        ) else {
            continue;
        };
        if h == host {
            b.set_port(pname, port("additionalEndpoints.port", ep.port)?);
        }
    }
    Ok(Some(b))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Curator {
    address: String,
    port: Option<i64>,
    ssl_port: Option<i64>,
    enabled: Option<bool>,
}

/// Curator x-discovery `ServiceInstance`: `port` is the default port and also the named port
/// `http`, `sslPort` the named port `https` (and the default when there is no `port`).
fn curator(obj: &Map<String, Value>) -> Result<Option<Backend>, FormatError> {
    let c: Curator = layout("curator", obj)?;
    if c.enabled == Some(false) {
        return Ok(None);
    }
    let host = ip("address", &c.address)?;
    let plain = c.port.map(|p| port("port", p)).transpose()?;
    let ssl = c.ssl_port.map(|p| port("sslPort", p)).transpose()?;
    let Some(default) = plain.or(ssl) else {
        return Err(FormatError::Layout {
            layout: "curator",
            reason: "neither port nor sslPort is set".into(),
        });
    };
    let mut b = Backend::new(SocketAddr::new(host, default));
    if let (Some(p), Ok(n)) = (plain, CURATOR_PORT.parse()) {
        b.set_port(n, p);
    }
    if let (Some(p), Ok(n)) = (ssl, CURATOR_SSL_PORT.parse()) {
        b.set_port(n, p);
    }
    Ok(Some(b))
}

#[derive(Deserialize)]
struct Nerve {
    host: String,
    port: i64,
    weight: Option<i64>,
}

/// SmartStack Nerve: host, port, optional weight (0 means drained, as in HAProxy).
fn nerve(obj: &Map<String, Value>) -> Result<Option<Backend>, FormatError> {
    let n: Nerve = layout("nerve", obj)?;
    let host = ip("host", &n.host)?;
    let mut b = Backend::new(SocketAddr::new(host, port("port", n.port)?));
    match n.weight {
        Some(0) => return Ok(None),
        Some(w) => {
            b.weight = u16::try_from(w).map_err(|_| FormatError::Layout {
                layout: "nerve",
                reason: format!("weight {w} is not 0-65535"),
            })?;
        }
        None => {}
    }
    Ok(Some(b))
}

/// How a registration names its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName {
    /// The child name, or its prefix when `sequential`.
    pub name: String,
    /// ZooKeeper appends a 10-digit counter, as Finagle (`member_`) and Nerve do.
    pub sequential: bool,
}

/// What a registration writes: the node name and the data, in the layout readers of `format` expect.
/// `id` names Curator instances (Curator uses the instance id as the node name).
/// Named ports a layout cannot carry (all of them for nerve and host-port; all but http/https for
/// curator) are left out; `unsupported_ports` says which.
pub fn encode(
    format: ZkFormat,
    service: &ServiceName,
    addr: SocketAddr,
    ports: &BTreeMap<PortName, u16>,
    id: &str,
    now_ms: u64,
) -> (NodeName, Vec<u8>) {
    let host = addr.ip().to_string();
    match format {
        ZkFormat::Serverset | ZkFormat::Auto => {
            let extra: Map<String, Value> = ports
                .iter()
                .map(|(n, p)| (n.to_string(), json!({ "host": host, "port": p })))
                .collect();
            let data = json!({
                "serviceEndpoint": { "host": host, "port": addr.port() },
                "additionalEndpoints": extra,
                "status": "ALIVE",
            });
            (
                NodeName {
                    name: "member_".into(),
                    sequential: true,
                },
                data.to_string().into_bytes(),
            )
        }
        ZkFormat::Curator => {
            let find = |n: &str| ports.iter().find(|(k, _)| k.as_str() == n).map(|(_, p)| *p);
            let data = json!({
                "name": service.as_str(),
                "id": id,
                "address": host,
                "port": find(CURATOR_PORT).unwrap_or(addr.port()),
                "sslPort": find(CURATOR_SSL_PORT),
                "payload": null,
                "registrationTimeUTC": now_ms,
                "serviceType": "DYNAMIC",
                "uriSpec": null,
            });
            (
                NodeName {
                    name: id.to_string(),
                    sequential: false,
                },
                data.to_string().into_bytes(),
            )
        }
        ZkFormat::Nerve => {
            let data =
                json!({ "host": host, "port": addr.port(), "name": service.as_str(), "weight": 1 });
            (
                NodeName {
                    name: format!("{service}_"),
                    sequential: true,
                },
                data.to_string().into_bytes(),
            )
        }
        ZkFormat::HostPort => (
            NodeName {
                name: addr.to_string(),
                sequential: false,
            },
            Vec::new(),
        ),
    }
}

/// The named ports `format` cannot carry, so the registration can say so once at start.
pub fn unsupported_ports(format: ZkFormat, ports: &BTreeMap<PortName, u16>) -> Vec<PortName> {
    ports
        .keys()
        .filter(|n| match format {
            ZkFormat::Serverset | ZkFormat::Auto => false,
            ZkFormat::Curator => n.as_str() != CURATOR_PORT && n.as_str() != CURATOR_SSL_PORT,
            ZkFormat::Nerve | ZkFormat::HostPort => true,
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pn(s: &str) -> PortName {
        s.parse().unwrap()
    }

    #[test]
    fn serverset_with_named_ports_and_status() {
        let data = br#"{"serviceEndpoint":{"host":"10.0.0.1","port":31000},
            "additionalEndpoints":{"http":{"host":"10.0.0.1","port":31001},"other-host":{"host":"10.0.0.9","port":1},"bad_name":{"host":"10.0.0.1","port":2}},
            "status":"ALIVE","shard":3}"#;
        for format in [ZkFormat::Serverset, ZkFormat::Auto] {
            let b = parse(format, "member_0000000001", data).unwrap().unwrap();
            assert_eq!(b.addr, addr("10.0.0.1:31000"));
            assert_eq!(
                b.ports().clone().into_iter().collect::<Vec<_>>(),
                [(pn("http"), 31001)]
            );
        }
        let dead = br#"{"serviceEndpoint":{"host":"10.0.0.1","port":31000},"status":"STARTING"}"#;
        assert_eq!(parse(ZkFormat::Serverset, "m", dead), Ok(None));
        let no_status = br#"{"serviceEndpoint":{"host":"::1","port":80}}"#;
        assert_eq!(
            parse(ZkFormat::Auto, "m", no_status).unwrap().unwrap().addr,
            addr("[::1]:80")
        );
    }

    #[test]
    fn curator_ports_become_http_and_https() {
        let data = br#"{"name":"web","id":"8c2f","address":"10.0.0.2","port":8080,"sslPort":8443,"payload":{"x":1},
            "registrationTimeUTC":1700000000000,"serviceType":"DYNAMIC","uriSpec":null}"#;
        let b = parse(ZkFormat::Auto, "8c2f", data).unwrap().unwrap();
        assert_eq!(b.addr, addr("10.0.0.2:8080"));
        assert_eq!(b.ports().get(&pn("https")), Some(&8443));
        assert_eq!(b.ports().get(&pn("http")), Some(&8080));
        let ssl_only = br#"{"address":"10.0.0.2","port":null,"sslPort":8443}"#;
        assert_eq!(
            parse(ZkFormat::Curator, "x", ssl_only)
                .unwrap()
                .unwrap()
                .addr,
            addr("10.0.0.2:8443")
        );
        let disabled = br#"{"address":"10.0.0.2","port":1,"enabled":false}"#;
        assert_eq!(parse(ZkFormat::Curator, "x", disabled), Ok(None));
        let neither = br#"{"address":"10.0.0.2","port":null}"#;
        assert!(matches!(
            parse(ZkFormat::Curator, "x", neither),
            Err(FormatError::Layout { .. })
        ));
    }

    #[test]
    fn nerve_weight_and_drain() {
        let data =
            br#"{"host":"10.0.0.3","port":9000,"name":"i-abc","weight":3,"labels":{"az":"a"}}"#;
        let b = parse(ZkFormat::Auto, "i-abc_web", data).unwrap().unwrap();
        assert_eq!((b.addr, b.weight), (addr("10.0.0.3:9000"), 3));
        assert_eq!(
            parse(
                ZkFormat::Nerve,
                "n",
                br#"{"host":"10.0.0.3","port":9000,"weight":0}"#
            ),
            Ok(None)
        );
        assert_eq!(
            parse(ZkFormat::Nerve, "n", br#"{"host":"10.0.0.3","port":9000}"#)
                .unwrap()
                .unwrap()
                .weight,
            1
        );
    }

    #[test]
    fn host_port_names_ignore_the_data() {
        assert_eq!(
            parse(ZkFormat::HostPort, "10.0.0.4:80", b"{garbage")
                .unwrap()
                .unwrap()
                .addr,
            addr("10.0.0.4:80")
        );
        assert_eq!(
            parse(ZkFormat::Auto, "[fd00::1]:443", b"")
                .unwrap()
                .unwrap()
                .addr,
            addr("[fd00::1]:443")
        );
        assert_eq!(
            parse(ZkFormat::Auto, "10.0.0.4:80", b"hello")
                .unwrap()
                .unwrap()
                .addr,
            addr("10.0.0.4:80")
        );
        assert_eq!(
            parse(ZkFormat::HostPort, "web-1", b""),
            Err(FormatError::HostPort("web-1".into()))
        );
        assert_eq!(
            parse(ZkFormat::HostPort, "10.0.0.4:0", b""),
            Err(FormatError::HostPort("10.0.0.4:0".into()))
        );
    }

    #[test]
    fn malformed_data_is_an_error_with_a_reason() {
        assert!(matches!(
            parse(ZkFormat::Serverset, "m", b"{not json"),
            Err(FormatError::Json(_))
        ));
        assert!(matches!(
            parse(ZkFormat::Serverset, "m", b"[1,2]"),
            Err(FormatError::Json(_))
        ));
        assert_eq!(
            parse(ZkFormat::Auto, "m", br#"{"foo":1}"#),
            Err(FormatError::Unknown)
        );
        assert_eq!(
            parse(ZkFormat::Auto, "member_1", b""),
            Err(FormatError::Unknown)
        );
        let host = parse(
            ZkFormat::Serverset,
            "m",
            br#"{"serviceEndpoint":{"host":"web.example.com","port":80}}"#,
        );
        assert!(matches!(host, Err(FormatError::Host { .. })), "{host:?}");
        let port = parse(ZkFormat::Nerve, "m", br#"{"host":"10.0.0.1","port":70000}"#);
        assert_eq!(
            port,
            Err(FormatError::Port {
                field: "port",
                value: 70000
            })
        );
        let missing = parse(
            ZkFormat::Serverset,
            "m",
            br#"{"serviceEndpoint":{"host":"10.0.0.1"}}"#,
        );
        assert!(
            matches!(&missing, Err(FormatError::Layout { layout: "serverset", reason }) if reason.contains("port")),
            "{missing:?}"
        );
    }

    #[test]
    fn every_encoder_round_trips_through_the_parsers() {
        let svc: ServiceName = "web".parse().unwrap();
        let a = addr("10.1.2.3:8080");
        let mut ports = BTreeMap::new();
        ports.insert(pn("admin"), 9990);
        ports.insert(pn("https"), 8443);
        for format in [
            ZkFormat::Serverset,
            ZkFormat::Curator,
            ZkFormat::Nerve,
            ZkFormat::HostPort,
        ] {
            let (node, data) = encode(
                format,
                &svc,
                a,
                &ports,
                "0f1e2d3c-0000-4000-8000-000000000001",
                1,
            );
            let child = if node.sequential {
                format!("{}0000000007", node.name)
            } else {
                node.name.clone()
            };
            for reader in [format, ZkFormat::Auto] {
                let b = parse(reader, &child, &data)
                    .unwrap_or_else(|e| panic!("{format:?} read as {reader:?}: {e}"))
                    .unwrap();
                assert_eq!(b.addr, a, "{format:?}");
                let unsupported = unsupported_ports(format, &ports);
                for (n, p) in &ports {
                    if !unsupported.contains(n) {
                        assert_eq!(b.ports().get(n), Some(p), "{format:?} keeps {n}");
                    }
                }
            }
        }
        assert_eq!(unsupported_ports(ZkFormat::Curator, &ports), [pn("admin")]);
        assert!(unsupported_ports(ZkFormat::Serverset, &ports).is_empty());
    }
}
