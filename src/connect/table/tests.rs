//! The routing table as the daemon reads it back: what a connect may be sent to.

use std::net::Ipv4Addr;

use std::collections::HashSet;

use super::*;
use crate::connect::balancer::{Balancer, DEFAULT_FAIL_HOLD};
use crate::service::{Backend, PortName};

fn table(dir: &Path) -> RoutingTable {
    RoutingTable::new(
        &dir.join("hook.snapshot"),
        "127.77.0.0/16".parse().unwrap(),
        None,
        Arc::new(Mutex::new(Balancer::new(DEFAULT_FAIL_HOLD))),
    )
}

#[test]
fn candidates_are_the_pick_set_with_the_port_the_client_port_maps_to() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path());
    let magic = Ipv4Addr::new(127, 77, 0, 9);
    let dest = |port| SocketAddr::new(magic.into(), port);
    assert!(
        t.candidates(dest(80), false).is_empty(),
        "nothing published yet"
    );

    let mut spec = ServiceSpec::new("web".parse().unwrap());
    let grpc: PortName = "grpc".parse().unwrap();
    spec.client_ports.insert(9000, grpc.clone());
    spec.backends
        .push(Backend::new("127.0.0.2:8080".parse().unwrap()));
    let mut b = Backend::new("127.0.0.3:8080".parse().unwrap());
    b.set_port(grpc, 9090);
    spec.backends.push(b);
    let mut backup = Backend::new("127.0.0.4:8080".parse().unwrap());
    backup.priority = 1;
    spec.backends.push(backup);
    let service = Service {
        spec,
        magic_v4: magic,
        magic_v6: None,
    };
    t.publish(&Arc::new(Snapshot::new(1, vec![service])));

    let addrs = |v: Vec<SocketAddr>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(
        addrs(t.candidates(dest(80), false)),
        ["127.0.0.2:8080", "127.0.0.3:8080"],
        "the best tier, default ports"
    );
    assert_eq!(
        addrs(t.candidates(dest(9000), true)),
        ["127.0.0.2:8080", "127.0.0.3:9090"],
        "the named port where a backend has it"
    );
    assert!(
        t.candidates(
            SocketAddr::new(Ipv4Addr::new(127, 77, 0, 10).into(), 80),
            false
        )
        .is_empty()
    );
}

#[test]
fn each_write_remembers_the_services_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let t = table(dir.path());
    let service = |name: &str, last: u8| Service {
        spec: {
            let mut s = ServiceSpec::new(name.parse().unwrap());
            s.backends
                .push(Backend::new(SocketAddr::new([127, 0, 0, last].into(), 80)));
            s
        },
        magic_v4: Ipv4Addr::new(127, 77, 0, last),
        magic_v6: None,
    };
    let names = |c: Option<(u64, HashSet<ServiceName>)>| {
        let (n, set) = c.expect("remembered");
        let mut v: Vec<String> = set.iter().map(ToString::to_string).collect();
        v.sort();
        (n, v)
    };
    let one = Snapshot::new(1, vec![service("web", 2)]);
    t.publish(&Arc::new(one.clone()));
    assert_eq!(names(t.changed_since(0)), (1, vec!["web".to_string()]));
    // Services as the registry publishes them: unchanged ones keep their Arc and are copied.
    let web: ServiceName = "web".parse().unwrap();
    let api: ServiceName = "api".parse().unwrap();
    let two = one.with_changes(2, [(api, Some(service("api", 3)))]);
    t.publish(&Arc::new(two.clone()));
    assert_eq!(names(t.changed_since(1)), (2, vec!["api".to_string()]));
    t.publish(&Arc::new(two.with_changes(3, [(web, None)])));
    assert_eq!(
        names(t.changed_since(2)),
        (3, vec!["web".to_string()]),
        "web left"
    );
    assert_eq!(names(t.changed_since(3)), (3, vec![]));
    assert_eq!(names(t.changed_since(0)).1, ["api", "web"]);
    // A reader further behind than the table remembers is told to look at everything.
    let last = t.last_snapshot().unwrap();
    for _ in 0..CHANGES_KEPT {
        t.publish(&last);
    }
    assert!(t.changed_since(0).is_none());
    assert!(t.changed_since(t.writes() - 1).is_some());
}
