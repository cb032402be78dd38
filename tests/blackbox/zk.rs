//! A real ZooKeeper server (the Debian `zookeeper` package) inside a test's namespace, and the
//! `zkctl` example to write its nodes from inside that namespace (the test process lives in the
//! host's network namespace and cannot reach the namespace's loopback).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::{DISCOTECH, Daemon, Netns, eventually};

const ZK_CLASSPATH: &str = "/usr/share/java/zookeeper.jar:/etc/zookeeper/conf";

pub struct ZkServer {
    pub pid: u32,
    pub hosts: String,
    cfg: PathBuf,
    log: PathBuf,
}

impl ZkServer {
    /// Starts a standalone server on 127.0.0.1:`port` with a fresh data dir and waits (bounded)
    /// until it answers. Session timeouts may be as short as 1 s (tickTime 500 ms).
    pub fn start(ns: &Netns, port: u16) -> Self {
        let data = ns.path("zk-data");
        std::fs::create_dir_all(&data).expect("zk data dir");
        let cfg = ns.path("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=\nminSessionTimeout=1000\nmaxSessionTimeout=30000\nmaxClientCnxns=0\n",
                data.display()
            ),
        )
        .expect("zoo.cfg");
        let mut zk = Self {
            pid: 0,
            hosts: format!("127.0.0.1:{port}"),
            cfg,
            log: ns.path("zookeeper.log"),
        };
        zk.restart(ns);
        zk
    }

    /// Starts the server again (same data dir) after `kill`.
    pub fn restart(&mut self, ns: &Netns) {
        let cfg = self.cfg.to_str().expect("utf-8 path");
        self.pid = ns.spawn(
            "java",
            &[
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Dzookeeper.admin.enableServer=false",
                "-cp",
                ZK_CLASSPATH,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                cfg,
            ],
            &self.log,
        );
        let out = ns.run(&zkctl(), &[&self.hosts, "wait"]);
        assert!(
            out.status.success(),
            "ZooKeeper did not start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn kill(&self, ns: &Netns) {
        ns.kill(self.pid);
    }

    /// SIGSTOP / SIGCONT, to make the server unresponsive without closing its connections.
    pub fn pause(&self) {
        signal(self.pid, "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid, "CONT");
    }

    /// Runs zkctl commands ("create /a DATA", "delete /a", "ls /a") and returns their output.
    pub fn ctl(&self, ns: &Netns, commands: &[&str]) -> String {
        let mut args = vec![self.hosts.as_str()];
        args.extend_from_slice(commands);
        ns.ok(&zkctl(), &args)
    }

    /// The children of `path`, sorted; empty if it does not exist.
    pub fn ls(&self, ns: &Netns, path: &str) -> Vec<String> {
        let out = ns.run(&zkctl(), &[&self.hosts, &format!("ls {path}")]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

/// The zkctl example next to the discotech binary, built once if `cargo test` did not build it
/// (it does unless only some test targets were asked for).
pub fn zkctl() -> String {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = Path::new(DISCOTECH)
            .parent()
            .expect("target dir")
            .join("examples")
            .join("zkctl");
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--example", "zkctl"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo build --example zkctl");
            assert!(status.success(), "cannot build the zkctl example");
        }
        path
    })
    .to_str()
    .expect("utf-8 path")
    .to_owned()
}

/// A daemon on 127.0.0.53:53 whose config also has `extra` (ZooKeeper sources, registrations,
/// guard settings) after the harness's own sections; the zones dir stays as a file source.
pub fn daemon<'a>(ns: &'a Netns, extra: &str) -> Daemon<'a> {
    let d = Daemon::configure(ns, "127.0.0.53:53", "upstreams = []");
    let mut text = std::fs::read_to_string(&d.config).expect("config");
    text.push('\n');
    text.push_str(extra);
    std::fs::write(&d.config, text).expect("config");
    d
}

/// The `[[source]]` section of a ZooKeeper source on `root`.
pub fn source(zk: &ZkServer, root: &str, session_timeout: &str) -> String {
    format!(
        "[[source]]\nkind = \"zookeeper\"\nname = \"zk\"\nhosts = [\"{}\"]\nroot = \"{root}\"\nsession_timeout = \"{session_timeout}\"\n",
        zk.hosts
    )
}

/// SRV answers of `name` (sorted), polled until `want` holds or `timeout` passes; returns the last.
pub fn srv_until(
    d: &Daemon,
    name: &str,
    timeout: Duration,
    want: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let mut last = Vec::new();
    let ok = eventually(timeout, || {
        let mut got = d.short(name, "SRV");
        got.sort();
        last.clone_from(&got);
        want(&got).then_some(())
    });
    if ok.is_none() {
        panic!(
            "SRV {name} never matched within {timeout:?}; last answer {last:?}\ndaemon log:\n{}",
            d.log_text()
        );
    }
    last
}
