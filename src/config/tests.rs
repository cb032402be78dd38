use super::*;

fn parse(src: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/discotech/discotech.toml"), src, &["127.0.0.53".parse().unwrap(), "192.0.2.1".parse().unwrap()])
}

fn errors(src: &str) -> Vec<String> {
    parse(src).unwrap_err().0.iter().map(ToString::to_string).collect()
}

#[test]
fn defaults_are_sensible_and_skip_our_own_address_as_upstream() {
    let c = parse("").unwrap();
    assert_eq!(c.dns.listen, vec!["127.0.0.53:53".parse::<SocketAddr>().unwrap()]);
    assert_eq!(c.dns.domains, vec![Name::from_ascii("disco.").unwrap()]);
    assert_eq!(c.dns.magic_v4.to_string(), "127.77.0.0/16");
    assert_eq!(c.dns.magic_v6, None);
    assert_eq!(c.dns.upstreams, vec!["192.0.2.1:53".parse::<SocketAddr>().unwrap()]);
    assert_eq!(c.state.dir, PathBuf::from("/var/lib/discotech"));
    assert_eq!(c.state.quarantine, Duration::from_secs(86_400));
    assert_eq!(c.hook.socket, PathBuf::from("/run/discotech/hook.sock"));
    assert!(c.dns.allow.iter().any(|n| n.contains(&"127.0.0.1".parse::<IpAddr>().unwrap())));
    assert!(!c.dns.allow.iter().any(|n| n.contains(&"10.0.0.1".parse::<IpAddr>().unwrap())));
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
    assert_eq!(c.dns.upstreams[1], "127.0.0.2:53".parse::<SocketAddr>().unwrap());
    assert_eq!(c.dns.forward[0].zone.to_string(), "corp.example.");
    assert_eq!(c.dns.ttl, 300);
    assert_eq!(c.state.dir, PathBuf::from("/etc/discotech/state"), "relative paths are relative to the config file");
    assert_eq!(c.sources, vec![SourceConfig::File { name: "file:zones".into(), path: "/etc/discotech/zones".into() }]);
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
    assert!(errs[0].starts_with("/etc/discotech/discotech.toml:3:12: dns.magic_v4: "), "{}", errs[0]);
    assert!(errs.iter().any(|e| e.contains(":4:14: dns.upstreams: 127.0.0.53:53 is one of our own listen addresses")), "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains(":4:31: dns.upstreams: \"nonsense\" is not an address")), "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains(":5:7: dns.ttl: must be between")), "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains(":7:8: source.kind: unknown source kind")), "{errs:#?}");
}

#[test]
fn unknown_keys_and_syntax_errors_name_the_line() {
    let errs = errors("[dns]\nlisten = [\"127.0.0.53:53\"]\nlsten = 1\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].contains(":3:1: unknown field `lsten`"), "{}", errs[0]);
    let errs = errors("[dns\n");
    assert!(errs[0].starts_with("/etc/discotech/discotech.toml:1:"), "{}", errs[0]);
}

#[test]
fn wildcard_listener_catches_loopback_loops() {
    let errs = errors("[dns]\nlisten = [\"0.0.0.0:53\"]\nupstreams = [\"127.0.0.1:53\"]\n");
    assert!(errs[0].contains("forwarding loop"), "{errs:?}");
    assert!(parse("[dns]\nlisten = [\"0.0.0.0:53\"]\nupstreams = [\"127.0.0.1:5300\"]\n").is_ok());
}

#[test]
fn forward_zones_may_not_overlap_service_domains() {
    let errs = errors("[[dns.forward]]\nzone = \"x.disco\"\nupstreams = [\"127.0.0.1:5301\"]\n");
    assert!(errs[0].contains("dns.forward.zone: x.disco. overlaps the service domain disco."), "{errs:?}");
}

#[test]
fn resolv_conf_nameservers_are_read() {
    let ns = parse_resolv_conf("# c\nsearch x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\noptions edns0\n");
    assert_eq!(ns, vec!["127.0.0.53".parse::<IpAddr>().unwrap(), "fe80::1".parse::<IpAddr>().unwrap()]);
}
