//! The routing table as the daemon reads it back: what a connect may be sent to.

use std::net::Ipv4Addr;

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
    b.ports.insert(grpc, 9090);
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
