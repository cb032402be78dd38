use super::*;
use crate::discovery::source::zookeeper::config::ZkFormat;
use crate::service::CheckKind;

fn parse(src: &str) -> Result<Config, ConfigError> {
    Config::parse(
        Path::new("/etc/discotech/discotech.toml"),
        src,
        &["127.0.0.53".parse().unwrap(), "192.0.2.1".parse().unwrap()],
    )
}

fn errors(src: &str) -> Vec<String> {
    parse(src)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn defaults_are_sensible_and_skip_our_own_address_as_upstream() {
    let c = parse("").unwrap();
    assert_eq!(
        c.dns.listen,
        vec!["127.0.0.53:53".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.dns.domains, vec![Name::from_ascii("disco.").unwrap()]);
    assert_eq!(c.dns.magic_v4.to_string(), "127.77.0.0/16");
    assert_eq!(c.dns.magic_v6, None);
    assert_eq!(
        c.dns.upstreams,
        vec!["192.0.2.1:53".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.state.dir, PathBuf::from("/var/lib/discotech"));
    assert_eq!(c.state.quarantine, Duration::from_secs(86_400));
    assert_eq!(c.hook.socket, PathBuf::from("/run/discotech/hook.sock"));
    assert!(
        c.dns
            .allow
            .iter()
            .any(|n| n.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()))
    );
    assert!(
        !c.dns
            .allow
            .iter()
            .any(|n| n.contains(&"10.0.0.1".parse::<IpAddr>().unwrap()))
    );
}

#[test]
fn full_example_parses() {
    let c = parse(
        r#"
[dns]
listen = ["127.0.0.53:53", "[::1]:5353"]
domains = ["Disco", "svc.internal."]
magic_v4 = "127.77.0.0/16"
magic_v6 = "fd64:d15c::/64"
upstreams = ["127.0.0.1:5300", "127.0.0.2"]
ttl = 300
[[dns.forward]]
zone = "corp.example"
upstreams = ["127.0.0.1:5301"]
[state]
dir = "state"
quarantine = "48h"
[[source]]
kind = "file"
path = "zones"
"#,
    )
    .unwrap();
    assert_eq!(c.dns.domains[0].to_string(), "disco.");
    assert_eq!(c.dns.domains[1].to_string(), "svc.internal.");
    assert_eq!(
        c.dns.upstreams[1],
        "127.0.0.2:53".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.dns.forward[0].zone.to_string(), "corp.example.");
    assert_eq!(c.dns.ttl, 300);
    assert_eq!(
        c.state.dir,
        PathBuf::from("/etc/discotech/state"),
        "relative paths are relative to the config file"
    );
    assert_eq!(
        c.sources,
        vec![SourceConfig::File {
            name: "file:zones".into(),
            path: "/etc/discotech/zones".into()
        }]
    );
}

#[test]
fn every_problem_is_reported_with_line_column_and_field() {
    let errs = errors(
        r#"[dns]
listen = ["127.0.0.53:53"]
magic_v4 = "127.77.0.0/30"
upstreams = ["127.0.0.53:53", "nonsense"]
ttl = -1
[[source]]
kind = "zookeeper-ish"
"#,
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        errs[0].starts_with("/etc/discotech/discotech.toml:3:12: dns.magic_v4: "),
        "{}",
        errs[0]
    );
    assert!(
        errs.iter().any(|e| e
            .contains(":4:14: dns.upstreams: 127.0.0.53:53 is one of our own listen addresses")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains(":4:31: dns.upstreams: \"nonsense\" is not an address")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains(":5:7: dns.ttl: must be between")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains(":7:8: source.kind: unknown source kind")),
        "{errs:#?}"
    );
}

#[test]
fn unknown_keys_and_syntax_errors_name_the_line() {
    let errs = errors("[dns]\nlisten = [\"127.0.0.53:53\"]\nlsten = 1\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].contains(":3:1: unknown field `lsten`"),
        "{}",
        errs[0]
    );
    let errs = errors("[dns\n");
    assert!(
        errs[0].starts_with("/etc/discotech/discotech.toml:1:"),
        "{}",
        errs[0]
    );
}

#[test]
fn wildcard_listen_addresses_are_refused_with_their_line() {
    for wild in ["0.0.0.0:53", "[::]:53"] {
        let errs = errors(&format!(
            "[dns]\nlisten = [\"127.0.0.53:53\", \"{wild}\"]\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("/etc/discotech/discotech.toml:2:")
                && errs[0].contains("dns.listen")
                && errs[0].contains("is a wildcard"),
            "{errs:?}"
        );
    }
}

#[test]
fn forward_zones_may_not_overlap_service_domains() {
    let errs = errors("[[dns.forward]]\nzone = \"x.disco\"\nupstreams = [\"127.0.0.1:5301\"]\n");
    assert!(
        errs[0].contains("dns.forward.zone: x.disco. overlaps the service domain disco."),
        "{errs:?}"
    );
}

#[test]
fn resolv_conf_nameservers_are_read() {
    let ns = parse_resolv_conf(
        "# c\nsearch x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\noptions edns0\n",
    );
    assert_eq!(
        ns,
        vec![
            "127.0.0.53".parse::<IpAddr>().unwrap(),
            "fe80::1".parse::<IpAddr>().unwrap()
        ]
    );
}

#[test]
fn remote_sources_guard_and_registrations_parse() {
    let c = parse(
        r#"
[dns]
upstreams = ["127.0.0.1:5300"]
[guard]
max_drop = 0.3
hold_down = "2m"
[[source]]
kind = "zookeeper"
hosts = ["127.0.0.1:2181", "zk2:2181"]
root = "/discovery"
auth = "disco:secret"
[[source]]
kind = "dns-srv"
services = { web = "_http._tcp.web.prod.example.com" }
max_ttl = "1m"
[[register]]
service = "web"
addr = "127.0.0.2:8080"
hosts = ["127.0.0.1:2181"]
path = "/discovery/web"
ports = { grpc = 9090 }
check = { kind = "http", path = "/health", expect = "200-299", interval = "1s", rise = 1 }
"#,
    )
    .unwrap();
    assert_eq!(
        c.guard,
        GuardConfig {
            max_drop: 0.3,
            hold_down: Duration::from_secs(120)
        }
    );
    let SourceConfig::Zookeeper(zk) = &c.sources[0] else {
        panic!("{:?}", c.sources[0])
    };
    assert_eq!(
        (zk.root.as_str(), zk.format, zk.session_timeout),
        ("/discovery", ZkFormat::Auto, Duration::from_secs(10))
    );
    assert_eq!(zk.auth.as_deref(), Some("disco:secret"));
    let SourceConfig::DnsSrv(srv) = &c.sources[1] else {
        panic!("{:?}", c.sources[1])
    };
    assert_eq!(
        srv.resolvers,
        vec!["127.0.0.1:5300".parse::<SocketAddr>().unwrap()],
        "defaults to dns.upstreams"
    );
    assert_eq!(
        srv.services.values().next().unwrap().to_string(),
        "_http._tcp.web.prod.example.com."
    );
    assert_eq!(srv.max_ttl, Duration::from_secs(60));
    let r = &c.registrations[0];
    assert_eq!(r.format, ZkFormat::Serverset);
    assert_eq!(
        r.check.kind,
        CheckKind::Http {
            path: "/health".into(),
            expect: (200, 299)
        }
    );
    assert_eq!((r.check.rise, r.check.fall), (1, 2));
    assert_eq!(r.ports.values().copied().collect::<Vec<_>>(), [9090]);
}

#[test]
fn remote_source_mistakes_are_located() {
    let errs = errors(
        r#"[[source]]
kind = "zookeeper"
hosts = ["127.0.0.1"]
root = "discovery/"
path = "/x"
[[source]]
kind = "dns-srv"
services = { "bad_name" = "_x._tcp.example.com" }
[[register]]
service = "web"
addr = "127.0.0.2"
hosts = ["127.0.0.1:2181"]
path = "/d/web"
format = "auto"
check = { kind = "icmp" }
[guard]
max_drop = 1.5
"#,
    );
    let want = [
        ":1:1: source.path: `path` does not apply to a zookeeper source",
        ":3:10: source.hosts: \"127.0.0.1\" is not host:port",
        ":8:27: source.services.bad_name: invalid service name",
        ":11:8: register.addr: \"127.0.0.2\" needs a port",
        ":14:10: register.format: registration needs a concrete format",
        ":15:18: check.kind: unknown check kind \"icmp\"",
        ":17:12: guard.max_drop: must be a share between 0.0 and 1.0",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e.contains(w)),
            "missing {w:?} in {errs:#?}"
        );
    }
}

#[test]
fn balance_zone_and_share_are_validated_with_their_position() {
    let c = parse("[balance]\nzone = \"EU-1\"\nlocal_min_share = 0.5\n").unwrap();
    assert_eq!(
        (c.balance.zone.as_deref(), c.balance.local_min_share),
        (Some("eu-1"), 0.5)
    );
    let c = parse("").unwrap();
    assert_eq!((c.balance.zone, c.balance.local_min_share), (None, 0.3));
    let errs = errors("[balance]\nzone = \"a b\"\nlocal_min_share = 2.0\nzones = 1\n");
    assert!(
        errs.iter()
            .any(|e| e.contains(":4:1: unknown field `zones`")),
        "{errs:?}"
    );
    let errs = errors("[balance]\nzone = \"a b\"\nlocal_min_share = 2.0\n");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].contains(":2:8: balance.zone: invalid zone"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains(":3:19: balance.local_min_share: must be a share"),
        "{errs:?}"
    );
}

#[test]
fn a_health_check_path_with_crlf_or_spaces_is_refused_where_it_stands() {
    let errs = errors(
        "[[register]]\nservice = \"web\"\naddr = \"127.0.0.2:80\"\nhosts = [\"127.0.0.1:2181\"]\npath = \"/d/web\"\n\
         check = { kind = \"http\", path = \"/h HTTP/1.1\\r\\nHost: evil\\r\\n\\r\\nGET /\" }\n",
    );
    assert!(
        errs.iter().any(|e| e.contains(":6:")
            && e.contains("check.path")
            && e.contains("only visible ASCII")),
        "{errs:?}"
    );
    let errs = errors(
        "[[register]]\nservice = \"web\"\naddr = \"127.0.0.2:80\"\nhosts = [\"127.0.0.1:2181\"]\npath = \"/d/web\"\n\
         check = { kind = \"http\", path = \"health\" }\n",
    );
    assert!(
        errs.iter().any(|e| e.contains("must start with \"/\"")),
        "{errs:?}"
    );
}
