//! The ZooKeeper source: each child of `root` is a service, each child of a service node an
//! instance in one of the layouts of [`formats`]. It watches the root's children, every service's
//! children and every instance's data, re-reads only what a watch said changed, and reports it
//! within milliseconds: an `Update` per changed service (so one change costs the same with ten or
//! ten thousand services), a whole-set `Reset` after a full read or when a service goes away.
//! A lost connection or an expired session keeps the last good set (a `Failed`, never an empty
//! `Reset`); once reachable again it re-reads everything in a fresh session with new watches,
//! because neither the server nor the client library carries watches over a reconnect.

pub mod config;
pub mod formats;
pub mod session;
mod tree;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_async::{WatchedEvent, WatchedEventType, ZkError, ZkState};

use self::config::{ZkFormat, ZookeeperSource};
use self::formats::FormatError;
use self::session::{BACKOFF_MAX, BACKOFF_MIN, Session, SessionError, jitter};
use self::tree::{Data, Instance, Instances, Tree};
use super::SourceEvent;
use crate::metrics::{METRICS, SourceLabels};
use crate::service::{ServiceName, ServiceSpec};

/// After a pass, further changes wait this long so a burst (a deploy restarting many instances)
/// becomes one update; a lone change is applied at once.
const COALESCE: Duration = Duration::from_millis(5);
/// Requests in flight at once during a (re)read: enough to hide the round trip, few enough not to
/// flood the client library's queue.
const PARALLEL: usize = 64;

/// What a watch said changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Dirty {
    Root,
    Service(String),
    Instance(String, String),
}

impl Dirty {
    /// What a watch event under `root` asks to re-read: the root's children, a service's
    /// children, or an instance. Session events (no path) and paths deeper than an instance ask
    /// for nothing.
    fn of(root: &str, event: &WatchedEvent) -> Option<Self> {
        if event.event_type == WatchedEventType::None {
            return None;
        }
        let path = event.path.as_deref()?;
        let rest = if root == "/" {
            path.strip_prefix('/')?
        } else if path == root {
            ""
        } else {
            path.strip_prefix(root)?.strip_prefix('/')?
        };
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(""), None, None) => Some(Self::Root),
            (Some(svc), None, None) => Some(Self::Service(svc.to_owned())),
            (Some(svc), Some(child), None) if !svc.is_empty() && !child.is_empty() => {
                Some(Self::Instance(svc.to_owned(), child.to_owned()))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Changes {
    root: bool,
    services: BTreeSet<String>,
    instances: BTreeSet<(String, String)>,
}

impl Changes {
    fn add(&mut self, d: Dirty) {
        match d {
            Dirty::Root => self.root = true,
            Dirty::Service(s) => {
                self.services.insert(s);
            }
            Dirty::Instance(s, i) => {
                self.instances.insert((s, i));
            }
        }
    }

    fn is_empty(&self) -> bool {
        !self.root && self.services.is_empty() && self.instances.is_empty()
    }
}

/// The running source: configuration, the view of the tree, and where to report.
struct Watcher {
    cfg: ZookeeperSource,
    index: usize,
    tx: mpsc::Sender<SourceEvent>,
    events: mpsc::UnboundedSender<Dirty>,
    tree: Tree,
    /// Service name -> the node names spelling it (normally one).
    aliases: BTreeMap<ServiceName, BTreeSet<String>>,
    /// Service nodes whose instances changed since the last publish.
    touched: BTreeSet<String>,
    /// What the registry last got from this source.
    sent: Option<BTreeMap<ServiceName, ServiceSpec>>,
    /// Service node names already reported as invalid, so each is logged once.
    bad_names: HashSet<String>,
    /// The last failure reported, so a persisting failure is reported once.
    failing: Option<String>,
}

/// Watches `cfg.root` and reports its services until `shutdown`.
#[allow(deprecated)] // ZkState::NotConnected is how the client library reports an expired session.
pub async fn run(
    cfg: ZookeeperSource,
    index: usize,
    tx: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) {
    let (events, mut dirty) = mpsc::unbounded_channel();
    let mut w = Watcher::new(cfg, index, tx, events);
    let what = w.cfg.name.clone();
    let connected = METRICS
        .zookeeper_connected
        .get_or_create_owned(&SourceLabels {
            source: what.clone(),
        });
    'session: loop {
        connected.set(0);
        // Every watch reports through this one callback, by path: the client then keeps nothing
        // per watched node (a closure per node cost about 300 bytes each, 60 MB at 200,000).
        let on_watch = {
            let (events, root) = (w.events.clone(), w.cfg.root.clone());
            move |e: WatchedEvent| {
                if let Some(d) = Dirty::of(&root, &e) {
                    let _ = events.send(d);
                }
            }
        };
        let mut s = match Session::connect(
            &w.cfg.hosts,
            w.cfg.session_timeout,
            w.cfg.auth.clone(),
            &what,
            on_watch,
            &shutdown,
        )
        .await
        {
            Ok(s) => s,
            Err(_) => return,
        };
        connected.set(1);
        let mut need_sync = true;
        let mut backoff = BACKOFF_MIN;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut disconnected = false;
        let mut last_pass = Instant::now() - COALESCE;
        let mut in_burst = false;
        loop {
            if need_sync && retry_at.is_none_or(|t| t <= tokio::time::Instant::now()) {
                // Changes queued before a full read are covered by it.
                while dirty.try_recv().is_ok() {}
                match w.full_sync(&s).await {
                    Ok(()) => {
                        need_sync = false;
                        retry_at = None;
                        backoff = BACKOFF_MIN;
                        if !w.publish_all().await {
                            break 'session;
                        }
                    }
                    Err(e) => {
                        if !w.fail(&e).await {
                            break 'session;
                        }
                        retry_at = Some(tokio::time::Instant::now() + jitter(backoff));
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            let retry = {
                let wait = if need_sync && !disconnected {
                    retry_at
                } else {
                    None
                };
                async move {
                    match wait {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => {
                    s.close().await;
                    return;
                }
                () = retry => {}
                state = s.states.recv() => match state {
                    Some(ZkState::Connecting | ZkState::NotConnected) => {
                        if state == Some(ZkState::NotConnected) {
                            warn!(source = %what, "ZooKeeper session expired; a new session will re-read everything");
                        }
                        connected.set(0);
                        if !disconnected {
                            disconnected = true;
                            if !w.fail(&SessionError::Disconnected).await {
                                break 'session;
                            }
                        }
                    }
                    Some(ZkState::Connected | ZkState::ConnectedReadOnly) => {
                        if disconnected {
                            // The server may have dropped this connection's watches (an expired
                            // session): a fresh client re-reads everything with new watches.
                            info!(source = %what, "ZooKeeper is reachable again; re-reading with a fresh session");
                            s.close().await;
                            continue 'session;
                        }
                    }
                    Some(ZkState::AuthFailed | ZkState::Closed) | None => {
                        warn!(source = %what, state = ?state, "ZooKeeper client gave up; starting a new one");
                        s.close().await;
                        continue 'session;
                    }
                    Some(ZkState::Associating) => {}
                },
                Some(first) = dirty.recv() => {
                    if need_sync {
                        // A watch fired while a full read is pending (say the missing root was
                        // created): the tree is reachable, so read now instead of after the backoff.
                        retry_at = None;
                        continue;
                    }
                    // A lone change, or one following a single earlier change, goes at once; in a
                    // sustained burst (passes closer than COALESCE twice running) each pass waits
                    // out the rest of COALESCE, so the burst becomes a few updates, not hundreds.
                    let since = last_pass.elapsed();
                    let sustained = std::mem::replace(&mut in_burst, since < COALESCE) && since < COALESCE;
                    if sustained {
                        tokio::select! {
                            () = shutdown.cancelled() => { s.close().await; return; }
                            () = tokio::time::sleep(COALESCE - since) => {}
                        }
                    }
                    let mut changes = Changes::default();
                    changes.add(first);
                    while let Ok(d) = dirty.try_recv() {
                        changes.add(d);
                    }
                    last_pass = Instant::now();
                    match w.apply(&s, changes).await {
                        Ok(()) => {
                            let read = last_pass.elapsed();
                            if !w.publish_touched().await {
                                break 'session;
                            }
                            debug!(source = %what, read_us = read.as_micros() as u64, total_us = last_pass.elapsed().as_micros() as u64, "applied a change");
                        }
                        Err(e) => {
                            debug!(source = %what, error = %e, "incremental read failed; re-reading everything");
                            need_sync = true;
                            retry_at = Some(tokio::time::Instant::now() + jitter(backoff));
                        }
                    }
                }
            }
        }
    }
}

impl Watcher {
    fn new(
        cfg: ZookeeperSource,
        index: usize,
        tx: mpsc::Sender<SourceEvent>,
        events: mpsc::UnboundedSender<Dirty>,
    ) -> Self {
        Self {
            cfg,
            index,
            tx,
            events,
            tree: Tree::default(),
            aliases: BTreeMap::new(),
            touched: BTreeSet::new(),
            sent: None,
            bad_names: HashSet::new(),
            failing: None,
        }
    }

    fn path(&self, parts: &[&str]) -> String {
        let mut p = if self.cfg.root == "/" {
            String::new()
        } else {
            self.cfg.root.clone()
        };
        for part in parts {
            p.push('/');
            p.push_str(part);
        }
        if p.is_empty() { "/".into() } else { p }
    }

    /// Lists `path`'s children and leaves a watch on them. `None`: no such node.
    async fn list(&self, s: &Session, path: String) -> Result<Option<Vec<String>>, SessionError> {
        match s
            .op("get_children", &path, s.zk.get_children(&path, true))
            .await
        {
            Ok(mut children) => {
                children.sort();
                Ok(Some(children))
            }
            Err(e) if e.code() == Some(ZkError::NoNode) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads an instance's data and leaves a watch on it. `None`: the node is gone.
    async fn data(
        &self,
        s: &Session,
        service: &str,
        child: &str,
    ) -> Result<Option<Data>, SessionError> {
        let path = self.path(&[service, child]);
        match s.op("get_data", &path, s.zk.get_data(&path, true)).await {
            Ok((data, stat)) => Ok(Some((data, stat.mzxid))),
            Err(e) if e.code() == Some(ZkError::NoNode) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The root's children. A missing root is a failure, not "no services": it is more likely a
    /// wrong path or a wiped ensemble than a deliberate empty registry. A watch reports its creation.
    async fn root(&self, s: &Session) -> Result<Vec<String>, SessionError> {
        if let Some(mut children) = self.list(s, self.cfg.root.clone()).await? {
            if self.cfg.root == "/" {
                // ZooKeeper's own subtree (quotas, config) is not a service.
                children.retain(|c| c != "zookeeper");
            }
            return Ok(children);
        }
        s.op("exists", &self.cfg.root, s.zk.exists(&self.cfg.root, true))
            .await?;
        Err(SessionError::Op {
            op: "get_children",
            path: self.cfg.root.clone(),
            error: ZkError::NoNode,
        })
    }

    /// Lists many services at once. Gone services come back as `None`.
    async fn list_services(
        &self,
        s: &Session,
        names: Vec<String>,
    ) -> Result<Vec<(String, Option<Vec<String>>)>, SessionError> {
        let results: Vec<_> = stream::iter(names)
            .map(|name| async move {
                let r = self.list(s, self.path(&[&name])).await;
                r.map(|c| (name, c))
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Reads many instances at once, each parsed as it arrives (so that no node's raw data
    /// outlives its own read). Gone instances come back as `None`. With `host-port` the data is
    /// never needed, so nothing is read (and no data watch is left).
    async fn read_instances(
        &self,
        s: &Session,
        nodes: Vec<(String, String)>,
    ) -> Result<Vec<((String, String), Option<Instance>)>, SessionError> {
        if self.cfg.format == ZkFormat::HostPort {
            return Ok(nodes
                .into_iter()
                .map(|(svc, child)| {
                    let instance = self.parse(&svc, &child, (Vec::new(), 0));
                    ((svc, child), Some(instance))
                })
                .collect());
        }
        let results: Vec<_> = stream::iter(nodes)
            .map(|(svc, child)| async move {
                let r = self.data(s, &svc, &child).await;
                r.map(|d| {
                    let instance = d.map(|d| self.parse(&svc, &child, d));
                    ((svc, child), instance)
                })
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Reads the whole tree with fresh watches, replacing the view only if every read succeeded.
    async fn full_sync(&mut self, s: &Session) -> Result<(), SessionError> {
        let started = Instant::now();
        let names = self.root(s).await?;
        let listed = self.list_services(s, names).await?;
        let mut read: BTreeMap<String, Vec<(String, Instance)>> = BTreeMap::new();
        let mut nodes = Vec::new();
        for (name, children) in listed {
            let Some(children) = children else { continue };
            for c in &children {
                nodes.push((name.clone(), c.clone()));
            }
            read.insert(name, Vec::with_capacity(children.len()));
        }
        let count = nodes.len();
        for ((svc, child), instance) in self.read_instances(s, nodes).await? {
            let Some(instance) = instance else { continue };
            if let Some(m) = read.get_mut(&svc) {
                m.push((child, instance));
            }
        }
        self.tree = Tree {
            services: read
                .into_iter()
                .map(|(svc, instances)| (svc, Instances::from(instances)))
                .collect(),
        };
        self.reindex();
        debug!(source = %self.cfg.name, services = self.tree.services.len(), instances = count, ms = started.elapsed().as_millis() as u64, "read the whole tree");
        Ok(())
    }

    /// Re-reads what the watches reported: the root's children, then the services' children,
    /// then instance data, each step in parallel.
    async fn apply(&mut self, s: &Session, mut changes: Changes) -> Result<(), SessionError> {
        let mut structure = false;
        while !changes.is_empty() {
            if std::mem::take(&mut changes.root) {
                let names = self.root(s).await?;
                let now: BTreeSet<&String> = names.iter().collect();
                let touched = &mut self.touched;
                self.tree.services.retain(|n, _| {
                    let keep = now.contains(n);
                    if !keep {
                        touched.insert(n.clone());
                    }
                    keep
                });
                for n in &names {
                    if !self.tree.services.contains_key(n) {
                        changes.services.insert(n.clone());
                    }
                }
                structure = true;
            }
            let services: Vec<String> = std::mem::take(&mut changes.services).into_iter().collect();
            for (name, children) in self.list_services(s, services).await? {
                self.touched.insert(name.clone());
                let Some(children) = children else {
                    structure |= self.tree.services.remove(&name).is_some();
                    continue;
                };
                structure |= !self.tree.services.contains_key(&name);
                let instances = self.tree.services.entry(name.clone()).or_default();
                instances.retain(|c| children.binary_search_by(|x| x.as_str().cmp(c)).is_ok());
                for c in children {
                    if !instances.contains_key(&c) {
                        changes.instances.insert((name.clone(), c));
                    }
                }
            }
            let nodes: Vec<(String, String)> = std::mem::take(&mut changes.instances)
                .into_iter()
                .filter(|(svc, _)| self.tree.services.contains_key(svc))
                .collect();
            for ((svc, child), instance) in self.read_instances(s, nodes).await? {
                self.touched.insert(svc.clone());
                match instance {
                    Some(instance) => {
                        if let Some(m) = self.tree.services.get_mut(&svc) {
                            m.insert(child, instance);
                        }
                    }
                    None => {
                        if let Some(m) = self.tree.services.get_mut(&svc) {
                            m.remove(&child);
                        }
                    }
                }
            }
        }
        if structure {
            self.reindex();
        }
        Ok(())
    }

    /// Parses an instance, reusing the previous result when the node did not change so that a
    /// malformed node is logged once per change, not once per re-read.
    fn parse(&self, svc: &str, child: &str, (data, mzxid): Data) -> Instance {
        if let Some(old) = self.tree.services.get(svc).and_then(|m| m.get(child))
            && old.mzxid == mzxid
        {
            return old.clone();
        }
        let backend = match formats::parse(self.cfg.format, child, &data) {
            Ok(b) => b,
            Err(e) => {
                self.log_malformed(svc, child, &e);
                None
            }
        };
        Instance { mzxid, backend }
    }

    fn log_malformed(&self, svc: &str, child: &str, e: &FormatError) {
        warn!(source = %self.cfg.name, path = %self.path(&[svc, child]), error = %e, "skipping a malformed instance node");
    }

    /// Rebuilds the service name -> node names index after services came or went. Node names
    /// that are not service names are skipped (logged once); `Web` and `web` are one service.
    fn reindex(&mut self) {
        let mut aliases: BTreeMap<ServiceName, BTreeSet<String>> = BTreeMap::new();
        let mut bad = HashSet::new();
        for node in self.tree.services.keys() {
            match node.parse::<ServiceName>() {
                Ok(name) => {
                    aliases.entry(name).or_default().insert(node.clone());
                }
                Err(e) => {
                    if !self.bad_names.contains(node) {
                        warn!(source = %self.cfg.name, path = %self.path(&[node]), error = %e, "skipping a service node whose name is not a service name");
                    }
                    bad.insert(node.clone());
                }
            }
        }
        self.aliases = aliases;
        self.bad_names = bad;
    }

    /// One service as the registry wants it: instances ordered by node name, deduplicated by address.
    fn spec(&self, name: &ServiceName) -> Option<ServiceSpec> {
        let nodes = self.aliases.get(name)?;
        let services: Vec<&Instances> = nodes
            .iter()
            .filter_map(|n| self.tree.services.get(n))
            .collect();
        // Sized once: the list is kept (by the registry too) until the service changes.
        let mut backends = Vec::with_capacity(services.iter().map(|i| i.len()).sum());
        let mut seen = HashSet::new();
        for b in services
            .iter()
            .flat_map(|i| i.values())
            .filter_map(|i| i.backend.as_ref())
        {
            if seen.insert(b.addr) {
                backends.push(b.clone());
            }
        }
        backends.shrink_to_fit();
        let mut spec = ServiceSpec::new(name.clone());
        spec.backends = backends.into();
        Some(spec)
    }

    /// Sends every service as one `Reset` if anything differs from what was sent.
    /// False when the registry is gone (shutting down).
    async fn publish_all(&mut self) -> bool {
        self.touched.clear();
        let all: BTreeMap<ServiceName, ServiceSpec> = self
            .aliases
            .keys()
            .filter_map(|n| self.spec(n).map(|s| (n.clone(), s)))
            .collect();
        self.recovered(all.len());
        if self.sent.as_ref() == Some(&all) {
            return true;
        }
        debug!(source = %self.cfg.name, services = all.len(), backends = all.values().map(|s| s.backends.len()).sum::<usize>(), "ZooKeeper services changed");
        let services: Vec<ServiceSpec> = all.values().cloned().collect();
        self.sent = Some(all);
        self.tx
            .send(SourceEvent::Reset {
                source: self.index,
                services,
            })
            .await
            .is_ok()
    }

    /// Sends only the services a pass touched, as `Update`s, so the cost of one change does not
    /// grow with the number of services. A service that went away needs a `Reset` (an update
    /// cannot say "gone"), which is rare: services come and go far less often than instances.
    async fn publish_touched(&mut self) -> bool {
        let touched: BTreeSet<ServiceName> = std::mem::take(&mut self.touched)
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        let Some(sent) = &self.sent else {
            return self.publish_all().await;
        };
        let mut updates = Vec::new();
        for name in &touched {
            match self.spec(name) {
                None if sent.contains_key(name) => return self.publish_all().await,
                None => {}
                Some(spec) if sent.get(name) != Some(&spec) => updates.push(spec),
                Some(_) => {}
            }
        }
        self.recovered(self.aliases.len());
        for spec in updates {
            debug!(source = %self.cfg.name, service = %spec.name, backends = spec.backends.len(), "ZooKeeper service changed");
            if let Some(sent) = self.sent.as_mut() {
                sent.insert(spec.name.clone(), spec.clone());
            }
            if self
                .tx
                .send(SourceEvent::Update {
                    source: self.index,
                    service: spec,
                })
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    fn recovered(&mut self, services: usize) {
        if self.failing.take().is_some() {
            info!(source = %self.cfg.name, services, "ZooKeeper source recovered");
        }
    }

    /// Reports a failure once per distinct error; the registry keeps the last good set.
    async fn fail(&mut self, e: &SessionError) -> bool {
        let msg = e.to_string();
        if self.failing.as_ref() == Some(&msg) {
            return true;
        }
        self.failing = Some(msg.clone());
        self.tx
            .send(SourceEvent::Failed {
                source: self.index,
                error: msg,
            })
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests;
