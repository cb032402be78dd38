use super::*;

fn watcher() -> (Watcher, mpsc::Receiver<SourceEvent>) {
    let (tx, rx) = mpsc::channel(16);
    let (events, _) = mpsc::unbounded_channel();
    let cfg = ZookeeperSource {
        name: "zk".into(),
        hosts: vec!["127.0.0.1:2181".into()],
        root: "/disco".into(),
        session_timeout: Duration::from_secs(10),
        auth: None,
        format: ZkFormat::Auto,
    };
    (Watcher::new(cfg, 7, tx, events), rx)
}

fn put(w: &mut Watcher, svc: &str, child: &str) {
    let instance = w.parse(svc, child, (Vec::new(), 0));
    w.tree
        .services
        .entry(svc.into())
        .or_default()
        .insert(child.into(), instance);
    w.touched.insert(svc.into());
}

fn addrs(spec: &ServiceSpec) -> Vec<String> {
    spec.backends.iter().map(|b| b.addr.to_string()).collect()
}

#[test]
fn node_names_differing_in_case_are_one_service_and_bad_names_are_skipped() {
    let (mut w, _rx) = watcher();
    put(&mut w, "Web", "127.0.0.3:80");
    put(&mut w, "web", "127.0.0.2:80");
    put(&mut w, "web", "127.0.0.3:80");
    put(&mut w, "bad_name", "127.0.0.4:80");
    w.tree.services.insert("empty".into(), Instances::default());
    w.reindex();
    assert_eq!(
        w.aliases
            .keys()
            .map(ServiceName::as_str)
            .collect::<Vec<_>>(),
        ["empty", "web"]
    );
    assert!(w.bad_names.contains("bad_name"));
    let web = w.spec(&"web".parse().unwrap()).unwrap();
    assert_eq!(
        addrs(&web),
        ["127.0.0.3:80", "127.0.0.2:80"],
        "node order, one entry per address"
    );
    assert!(
        w.spec(&"empty".parse().unwrap())
            .unwrap()
            .backends
            .is_empty()
    );
}

#[tokio::test]
async fn changes_go_out_as_updates_and_a_vanished_service_as_a_reset() {
    let (mut w, mut rx) = watcher();
    put(&mut w, "web", "127.0.0.2:80");
    put(&mut w, "api", "127.0.0.5:80");
    w.reindex();
    assert!(w.publish_all().await);
    let SourceEvent::Reset {
        source: 7,
        services,
    } = rx.recv().await.unwrap()
    else {
        panic!("a reset first")
    };
    assert_eq!(services.len(), 2);

    put(&mut w, "web", "127.0.0.3:80");
    assert!(w.publish_touched().await);
    let SourceEvent::Update { service, .. } = rx.recv().await.unwrap() else {
        panic!("an update")
    };
    assert_eq!(
        (service.name.as_str(), addrs(&service)),
        (
            "web",
            vec!["127.0.0.2:80".to_string(), "127.0.0.3:80".into()]
        )
    );
    assert!(
        rx.try_recv().is_err(),
        "api did not change, so it is not sent"
    );

    assert!(w.publish_touched().await);
    assert!(rx.try_recv().is_err(), "nothing touched, nothing sent");

    w.tree.services.remove("api");
    w.touched.insert("api".into());
    w.reindex();
    assert!(w.publish_touched().await);
    let SourceEvent::Reset { services, .. } = rx.recv().await.unwrap() else {
        panic!("a reset says a service is gone")
    };
    assert_eq!(
        services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["web"]
    );
}

#[tokio::test]
async fn a_failure_is_reported_once_until_a_publish_clears_it() {
    let (mut w, mut rx) = watcher();
    assert!(w.fail(&SessionError::Disconnected).await);
    assert!(w.fail(&SessionError::Disconnected).await);
    assert!(matches!(
        rx.recv().await,
        Some(SourceEvent::Failed { source: 7, .. })
    ));
    assert!(rx.try_recv().is_err(), "the same failure is reported once");
    w.reindex();
    assert!(w.publish_all().await);
    assert!(matches!(rx.recv().await, Some(SourceEvent::Reset { .. })));
    assert!(w.failing.is_none());
}

#[test]
fn paths_under_the_root_and_under_slash() {
    let (mut w, _rx) = watcher();
    assert_eq!(w.path(&["web", "member_1"]), "/disco/web/member_1");
    assert_eq!(w.path(&[]), "/disco");
    w.cfg.root = "/".into();
    assert_eq!(w.path(&["web"]), "/web");
    assert_eq!(w.path(&[]), "/");
}

fn event(kind: WatchedEventType, path: &str) -> WatchedEvent {
    WatchedEvent {
        event_type: kind,
        keeper_state: zookeeper_async::KeeperState::SyncConnected,
        path: Some(path.into()),
    }
}

#[test]
fn a_watch_event_names_what_to_re_read_by_its_path() {
    use WatchedEventType as E;
    let of = |root: &str, kind, path: &str| Dirty::of(root, &event(kind, path));
    assert_eq!(
        of("/disco", E::NodeChildrenChanged, "/disco"),
        Some(Dirty::Root)
    );
    assert_eq!(of("/disco", E::NodeCreated, "/disco"), Some(Dirty::Root));
    assert_eq!(
        of("/disco", E::NodeChildrenChanged, "/disco/web"),
        Some(Dirty::Service("web".into()))
    );
    assert_eq!(
        of("/disco", E::NodeDataChanged, "/disco/web/member_0000000001"),
        Some(Dirty::Instance("web".into(), "member_0000000001".into()))
    );
    assert_eq!(
        of("/disco", E::NodeDeleted, "/disco/web/member_0000000001"),
        Some(Dirty::Instance("web".into(), "member_0000000001".into()))
    );
    // Beside or below the tree: nothing of ours.
    assert_eq!(of("/disco", E::NodeDataChanged, "/discotech/web"), None);
    assert_eq!(of("/disco", E::NodeDataChanged, "/disco/web/a/b"), None);
    assert_eq!(of("/disco", E::NodeDataChanged, "/other"), None);
    // The root "/" itself.
    assert_eq!(of("/", E::NodeChildrenChanged, "/"), Some(Dirty::Root));
    assert_eq!(
        of("/", E::NodeChildrenChanged, "/web"),
        Some(Dirty::Service("web".into()))
    );
    assert_eq!(
        of("/", E::NodeDataChanged, "/web/m1"),
        Some(Dirty::Instance("web".into(), "m1".into()))
    );
    // Session events carry no path and ask for nothing.
    let session = WatchedEvent {
        event_type: WatchedEventType::None,
        keeper_state: zookeeper_async::KeeperState::Disconnected,
        path: None,
    };
    assert_eq!(Dirty::of("/disco", &session), None);
}
