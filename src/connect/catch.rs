//! The catch path, for programs the hook cannot enter (Go, static binaries, io_uring, programs
//! started with a cleaned environment): BPF programs on the cgroup `connect4` and `connect6`
//! hooks (`catch/catch.bpf.c`) rewrite a connect to a magic address into a connect to a backend
//! inside the kernel, as Cilium's socket load balancer does. No proxy sits in the path, and a
//! wildcard listener on the same port never sees such a connect.
//!
//! The daemon attaches the programs at start to the cgroup2 root (or `[catch] cgroup`), with
//! `BPF_F_ALLOW_MULTI` so other programs and other daemons (one per network namespace) stay;
//! the programs act only in the daemon's network namespace. The attachment is a BPF link held
//! by the daemon: it goes when the daemon stops, however it stops.
//!
//! What the programs route by is a mirror of the routing table: for each service, each client
//! port it maps (and port 0 for every other port), a weighted round-robin schedule over the
//! table's candidates, so drains, health, ejections, slow start and the guard apply as for
//! hooked connects. Policies other than round robin are approximated by their weights (a BPF
//! program cannot see the hook's live counters). IPv4 backends and IPv4 magic addresses only
//! (also as v4-mapped on AF_INET6 sockets).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use ipnet::Ipv4Net;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connect::table::RoutingTable;
use crate::metrics::{METRICS, ServiceLabels};
use crate::service::ServiceName;

/// The compiled BPF object (empty when clang was missing at build time: see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/catch.bpf.o"));

/// Entries of a schedule (catch.bpf.c's MAX_SCHEDULE).
pub const MAX_SCHEDULE: usize = 64;
const KEY_LEN: usize = 8;
const SERVICE_LEN: usize = 16 + 8 * MAX_SCHEDULE;
const CONFIG_LEN: usize = 16;
/// How often the programs' routes and counters are looked at.
pub const TICK: Duration = Duration::from_millis(100);

type Key = [u8; KEY_LEN];
type Value = [u8; SERVICE_LEN];

/// Why the catch path is not running.
#[derive(Debug, thiserror::Error)]
pub enum CatchError {
    #[error("this build has no BPF program (clang was missing when it was built)")]
    NotBuilt,
    #[error("loading and attaching BPF programs needs CAP_BPF and CAP_NET_ADMIN (or root); {0}")]
    Permission(String),
    #[error("no cgroup2 hierarchy is mounted (set [catch] cgroup)")]
    NoCgroup,
    #[error("cannot open the cgroup {0}: {1}")]
    Cgroup(PathBuf, std::io::Error),
    #[error("cannot read the network namespace cookie: {0}")]
    Netns(std::io::Error),
    #[error("{0}")]
    Bpf(String),
}

fn bpf_error(e: impl std::error::Error) -> CatchError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        CatchError::Permission(text)
    } else {
        CatchError::Bpf(text)
    }
}

/// The first cgroup2 mount in this mount namespace (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// The loaded and attached programs, and the maps the daemon fills.
pub struct Catcher {
    services: std::sync::Mutex<BpfHashMap<MapData, Key, Value>>,
    events: std::sync::Mutex<RingBuf<MapData>>,
    /// Keeps the programs and their links (detached when dropped).
    _bpf: std::sync::Mutex<Ebpf>,
    cgroup: PathBuf,
    caught: AtomicU64,
}

impl std::fmt::Debug for Catcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catcher")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl Catcher {
    /// Loads the programs, attaches them to `cgroup` (the cgroup2 root when `None`) for the
    /// IPv4 magic range `magic`, acting in this process's network namespace.
    ///
    /// # Errors
    /// [`CatchError`]: not built, no permission, no cgroup2, or the kernel refused.
    pub fn start(magic: Ipv4Net, cgroup: Option<&Path>) -> Result<Self, CatchError> {
        if OBJECT.is_empty() {
            return Err(CatchError::NotBuilt);
        }
        let cgroup = match cgroup {
            Some(c) => c.to_path_buf(),
            None => cgroup2_root().ok_or(CatchError::NoCgroup)?,
        };
        let dir =
            std::fs::File::open(&cgroup).map_err(|e| CatchError::Cgroup(cgroup.clone(), e))?;
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").map_err(CatchError::Netns)?;
        let netns = discotech_shm::netns_cookie(std::os::fd::AsFd::as_fd(&probe))
            .map_err(|e| CatchError::Netns(std::io::Error::from_raw_os_error(e)))?;
        let mut bpf = Ebpf::load(OBJECT).map_err(bpf_error)?;
        let mut config: Array<MapData, [u8; CONFIG_LEN]> = Array::try_from(
            bpf.take_map("config")
                .ok_or_else(|| CatchError::Bpf("no config map".into()))?,
        )
        .map_err(bpf_error)?;
        let mut c = [0u8; CONFIG_LEN];
        c[0..4].copy_from_slice(&magic.network().octets());
        c[4..8].copy_from_slice(&magic.netmask().octets());
        c[8..16].copy_from_slice(&netns.to_ne_bytes());
        config.set(0, c, 0).map_err(bpf_error)?;
        for name in ["connect4", "connect6"] {
            let program: &mut CgroupSockAddr = bpf
                .program_mut(name)
                .ok_or_else(|| CatchError::Bpf(format!("no program {name}")))?
                .try_into()
                .map_err(bpf_error)?;
            program.load().map_err(bpf_error)?;
            program
                // A BPF link (Linux 5.7+): always beside other programs; flags must be 0.
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(bpf_error)?;
        }
        let services = BpfHashMap::try_from(
            bpf.take_map("services")
                .ok_or_else(|| CatchError::Bpf("no services map".into()))?,
        )
        .map_err(bpf_error)?;
        let events = RingBuf::try_from(
            bpf.take_map("events")
                .ok_or_else(|| CatchError::Bpf("no events map".into()))?,
        )
        .map_err(bpf_error)?;
        info!(cgroup = %cgroup.display(), %magic, "catching connects that bypass the hook (BPF cgroup connect4/connect6)");
        Ok(Self {
            services: std::sync::Mutex::new(services),
            events: std::sync::Mutex::new(events),
            _bpf: std::sync::Mutex::new(bpf),
            cgroup,
            caught: AtomicU64::new(0),
        })
    }

    /// Connects caught since the start.
    pub fn caught(&self) -> u64 {
        self.caught.load(Ordering::Relaxed)
    }

    /// Keeps the programs' routes equal to the routing table and reports what they catch,
    /// until `shutdown`.
    pub async fn run(self: Arc<Self>, table: Arc<RoutingTable>, shutdown: CancellationToken) {
        let mut mirror = Mirror::default();
        let mut seen: Option<u64> = None;
        let mut named: HashSet<String> = HashSet::new();
        loop {
            // Only the services the table's writes changed since the last look, unless this is
            // the first look or more writes came than the table remembers.
            let changed = table.changed_since(seen.unwrap_or(0));
            let latest = changed.as_ref().map_or_else(|| table.writes(), |c| c.0);
            if seen != Some(latest) {
                let only = seen.and(changed).map(|c| c.1);
                seen = Some(latest);
                let this = self.clone();
                let t = table.clone();
                let m = std::mem::take(&mut mirror);
                mirror = tokio::task::spawn_blocking(move || this.sync(&t, m, only.as_ref()))
                    .await
                    .unwrap_or_default();
            }
            self.count(&mirror);
            self.name_bypassers(&mirror, &mut named);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Writes the routes the table gives now for the services in `only` (every service when
    /// None); keeps each entry's turn and count.
    fn sync(
        &self,
        table: &RoutingTable,
        mut mirror: Mirror,
        only: Option<&HashSet<ServiceName>>,
    ) -> Mirror {
        let Some(snapshot) = table.last_snapshot() else {
            return mirror;
        };
        let in_scope = |name: &ServiceName| only.is_none_or(|o| o.contains(name));
        let mut want: HashMap<Key, (ServiceName, Vec<(Ipv4Addr, u16)>)> = HashMap::new();
        let scope: Vec<_> = match only {
            None => snapshot.services().collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| snapshot.service(n.as_str()))
                .collect(),
        };
        for service in scope {
            let magic = service.magic_v4;
            let ports = std::iter::once(0).chain(service.spec.client_ports.keys().copied());
            for port in ports {
                let schedule = schedule(table, SocketAddr::new(IpAddr::V4(magic), port));
                want.insert(key(magic, port), (service.name().clone(), schedule));
            }
        }
        let mut services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (k, (name, schedule)) in &want {
            if mirror
                .routes
                .get(k)
                .is_some_and(|(n, s)| n == name && s == schedule)
            {
                continue;
            }
            let old = services.get(k, 0).ok();
            let value = value(schedule, old.as_ref());
            if let Err(error) = services.insert(*k, value, 0) {
                warn!(service = %name, %error, "cannot update a catch route");
            }
        }
        // Routes of the services looked at that they no longer have (or that left).
        mirror.routes.retain(|k, (name, _)| {
            let keep = !in_scope(name) || want.contains_key(k);
            if !keep {
                let _ = services.remove(k);
            }
            keep
        });
        debug!(routes = want.len(), "catch routes written");
        mirror.routes.extend(want);
        mirror
    }

    /// Publishes the caught connects per service (the programs' counters).
    fn count(&self, mirror: &Mirror) {
        let services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut per: HashMap<&ServiceName, u64> = HashMap::new();
        for (k, (name, _)) in &mirror.routes {
            if let Ok(v) = services.get(k, 0) {
                *per.entry(name).or_default() += caught_of(&v);
            }
        }
        drop(services);
        let mut total = 0;
        for (name, n) in per {
            total += n;
            let labels = ServiceLabels {
                service: name.to_string(),
            };
            let counter = METRICS.caught_connects.get_or_create(&labels);
            let had = counter.get();
            if n > had {
                counter.inc_by(n - had);
            }
        }
        self.caught.fetch_max(total, Ordering::Relaxed);
    }

    /// Logs, once per program (command name), who bypassed the hook.
    fn name_bypassers(&self, mirror: &Mirror, named: &mut HashSet<String>) {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(e) = events.next() {
            let Some(ev) = Event::parse(&e) else { continue };
            let exe = std::fs::read_link(format!("/proc/{}/exe", ev.pid))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| ev.comm.clone());
            if named.len() >= 4096 {
                named.clear();
            }
            // By command name: the executable is only known while the process lives, and a
            // program must not be named twice because one of its processes ended sooner.
            if named.insert(ev.comm.clone()) {
                let service = mirror
                    .routes
                    .get(&key(ev.ip, ev.port))
                    .or_else(|| mirror.routes.get(&key(ev.ip, 0)))
                    .map_or_else(|| "?".to_string(), |(n, _)| n.to_string());
                info!(
                    program = %exe,
                    comm = %ev.comm,
                    pid = ev.pid,
                    uid = ev.uid,
                    %service,
                    port = ev.port,
                    "a program bypassed the connect hook; its connects are caught in the kernel"
                );
            }
        }
    }
}

/// The catch path as the daemon runs it: on, or off and why.
#[derive(Clone, Debug)]
pub enum Catch {
    On(Arc<Catcher>),
    Off(String),
}

/// The catch path in `discotech status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CatchStatus {
    pub on: bool,
    /// Where the programs are attached, or why they are not.
    pub detail: String,
    /// Connects caught since the start.
    pub caught: u64,
}

impl Catch {
    pub fn status(&self) -> CatchStatus {
        match self {
            Self::On(c) => CatchStatus {
                on: true,
                detail: format!("BPF cgroup connect4/connect6 at {}", c.cgroup.display()),
                caught: c.caught(),
            },
            Self::Off(why) => CatchStatus {
                on: false,
                detail: why.clone(),
                caught: 0,
            },
        }
    }
}

/// The weighted round-robin schedule over the candidates of a connect to `dest` (IPv4 backends).
fn schedule(table: &RoutingTable, dest: SocketAddr) -> Vec<(Ipv4Addr, u16)> {
    let weighted: Vec<(Ipv4Addr, u16, u32)> = table
        .weighted_candidates(dest, false)
        .into_iter()
        .filter_map(|(addr, w)| match addr {
            SocketAddr::V4(v4) => Some((*v4.ip(), v4.port(), w)),
            SocketAddr::V6(_) => None,
        })
        .collect();
    let weights: Vec<u32> = weighted.iter().map(|b| b.2).collect();
    discotech_wire::table::build::smooth_schedule(&weights, MAX_SCHEDULE)
        .into_iter()
        .filter_map(|pos| weighted.get(pos as usize).map(|b| (b.0, b.1)))
        .collect()
}

/// What the programs route by, as last written.
#[derive(Default)]
struct Mirror {
    routes: HashMap<Key, (ServiceName, Vec<(Ipv4Addr, u16)>)>,
}

fn key(magic: Ipv4Addr, port: u16) -> Key {
    let mut k = [0u8; KEY_LEN];
    k[0..4].copy_from_slice(&magic.octets());
    k[4..6].copy_from_slice(&port.to_be_bytes());
    k
}

/// A service entry: schedule length, turn, caught, then the schedule. The turn and the count
/// are carried over from `old`, so a route change does not restart the rotation or the count.
fn value(schedule: &[(Ipv4Addr, u16)], old: Option<&Value>) -> Value {
    let mut v = [0u8; SERVICE_LEN];
    let len = schedule.len().min(MAX_SCHEDULE) as u32;
    v[0..4].copy_from_slice(&len.to_ne_bytes());
    if let Some(old) = old {
        v[4..16].copy_from_slice(&old[4..16]);
    }
    for (i, (ip, port)) in schedule.iter().take(MAX_SCHEDULE).enumerate() {
        let at = 16 + 8 * i;
        v[at..at + 4].copy_from_slice(&ip.octets());
        v[at + 4..at + 6].copy_from_slice(&port.to_be_bytes());
    }
    v
}

fn caught_of(v: &Value) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[8..16]);
    u64::from_ne_bytes(b)
}

/// A program that bypassed the hook (catch.bpf.c's `struct event`).
#[derive(Debug, PartialEq, Eq)]
struct Event {
    pid: u32,
    uid: u32,
    ip: Ipv4Addr,
    port: u16,
    comm: String,
}

impl Event {
    fn parse(b: &[u8]) -> Option<Self> {
        let u32_at = |i: usize| Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let ip: [u8; 4] = b.get(8..12)?.try_into().ok()?;
        let port: [u8; 2] = b.get(12..14)?.try_into().ok()?;
        let comm = b.get(16..32)?;
        let end = comm.iter().position(|&c| c == 0).unwrap_or(comm.len());
        Some(Self {
            pid: u32_at(0)?,
            uid: u32_at(4)?,
            ip: Ipv4Addr::from(ip),
            port: u16::from_be_bytes(port),
            comm: String::from_utf8_lossy(comm.get(..end)?).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_laid_out_as_the_bpf_program_reads_them() {
        let k = key(Ipv4Addr::new(127, 77, 0, 9), 8080);
        assert_eq!(k, [127, 77, 0, 9, 0x1f, 0x90, 0, 0]);
        let schedule = [
            (Ipv4Addr::new(10, 0, 0, 1), 80),
            (Ipv4Addr::new(10, 0, 0, 2), 8443),
        ];
        let mut old = [0u8; SERVICE_LEN];
        old[4..8].copy_from_slice(&7u32.to_ne_bytes());
        old[8..16].copy_from_slice(&123u64.to_ne_bytes());
        let v = value(&schedule, Some(&old));
        assert_eq!(u32::from_ne_bytes(v[0..4].try_into().unwrap()), 2);
        assert_eq!(
            u32::from_ne_bytes(v[4..8].try_into().unwrap()),
            7,
            "the turn is kept"
        );
        assert_eq!(caught_of(&v), 123, "and the count");
        assert_eq!(&v[16..24], &[10, 0, 0, 1, 0, 80, 0, 0]);
        assert_eq!(&v[24..32], &[10, 0, 0, 2, 0x20, 0xfb, 0, 0]);
        assert!(v[32..].iter().all(|&b| b == 0));
    }

    #[test]
    fn events_parse_and_short_ones_are_ignored() {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&4242u32.to_ne_bytes());
        b[4..8].copy_from_slice(&1000u32.to_ne_bytes());
        b[8..12].copy_from_slice(&[127, 77, 0, 9]);
        b[12..14].copy_from_slice(&8080u16.to_be_bytes());
        b[16..20].copy_from_slice(b"wget");
        assert_eq!(
            Event::parse(&b),
            Some(Event {
                pid: 4242,
                uid: 1000,
                ip: Ipv4Addr::new(127, 77, 0, 9),
                port: 8080,
                comm: "wget".into()
            })
        );
        assert_eq!(Event::parse(&b[..20]), None);
    }
}
