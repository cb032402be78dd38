//! A private network + mount namespace per test, with the real `discotech` binary and real
//! clients inside it. `Netns` holds the namespaces open with a sleeping process and runs commands
//! in them with nsenter; everything it starts is killed on drop. Nothing here touches the host's
//! network or /etc/resolv.conf: the resolv.conf bind mount lives in the test's mount namespace.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const DISCOTECH: &str = env!("CARGO_BIN_EXE_discotech");

pub struct Netns {
    holder: Child,
    pid: u32,
    pub dir: tempfile::TempDir,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    /// A fresh namespace with `lo` up and nothing else.
    pub fn new() -> Self {
        assert!(
            unsafe_free_is_root(),
            "the black-box tests need root (unshare -mn); run them as the README says"
        );
        let mut holder = Command::new("unshare")
            .args([
                "--net",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                "ip link set lo up && echo ready && exec sleep 3600",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("unshare (util-linux) must be installed");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("namespace holder output");
        assert_eq!(line.trim(), "ready", "namespace setup failed");
        let pid = holder.id();
        Self {
            holder,
            pid,
            dir: tempfile::tempdir().expect("tempdir"),
            children: Mutex::new(Vec::new()),
        }
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.pid.to_string())
            .args(["-n", "-m", "--"])
            .arg(program);
        c
    }

    /// Runs to completion inside the namespace (bounded by `timeout` via coreutils timeout).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut c = self.cmd("timeout");
        c.arg("20").arg(program).args(args);
        c.output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// stdout of a command that must succeed.
    pub fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process inside the namespace; it is killed when the namespace drops.
    pub fn spawn(&self, program: &str, args: &[&str], log: &Path) -> u32 {
        let log = std::fs::File::create(log).expect("log file");
        let child = self
            .cmd(program)
            .args(args)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let pid = child.id();
        self.children.lock().expect("children").push(child);
        pid
    }

    /// Stops a process started with `spawn` (SIGTERM, then SIGKILL after 5 s) and returns its exit code.
    pub fn stop(&self, pid: u32) -> Option<i32> {
        let mut children = self.children.lock().expect("children");
        let i = children.iter().position(|c| c.id() == pid)?;
        let mut child = children.swap_remove(i);
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills a process started with `spawn` at once (SIGKILL), as a crash would.
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().expect("children");
        if let Some(i) = children.iter().position(|c| c.id() == pid) {
            let mut child = children.swap_remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Makes this namespace's /etc/resolv.conf point at `nameserver` (a bind mount private to it).
    pub fn resolv_conf(&self, nameserver: &str) {
        let path = self.dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n"),
        )
        .expect("write resolv.conf");
        self.ok(
            "mount",
            &[
                "--bind",
                path.to_str().expect("utf-8 path"),
                "/etc/resolv.conf",
            ],
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for mut c in self
            .children
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn unsafe_free_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Polls `f` every 20 ms until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `discotech serve` inside a namespace, with its own config, zones and state dirs.
pub struct Daemon<'a> {
    pub ns: &'a Netns,
    pub pid: u32,
    pub config: PathBuf,
    pub zones: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub listen: SocketAddr,
}

impl<'a> Daemon<'a> {
    /// Writes a config with `extra` TOML appended to `[dns]` and the zones dir as the file source.
    pub fn configure(ns: &'a Netns, listen: &str, dns_extra: &str) -> Self {
        let zones = ns.path("zones");
        let state = ns.path("state");
        std::fs::create_dir_all(&zones).expect("zones dir");
        let config = ns.path("discotech.toml");
        std::fs::write(
            &config,
            format!(
                "[dns]\nlisten = [\"{listen}\"]\n{dns_extra}\n[state]\ndir = \"{}\"\n[hook]\nsocket = \"{}\"\n[admin]\nsocket = \"{}\"\n[[source]]\nkind = \"file\"\npath = \"{}\"\n",
                state.display(),
                ns.path("hook.sock").display(),
                ns.path("admin.sock").display(),
                zones.display()
            ),
        )
        .expect("config");
        Self {
            ns,
            pid: 0,
            config,
            zones,
            state,
            log: ns.path("discotech.log"),
            listen: listen.parse().expect("listen addr"),
        }
    }

    pub fn zone(&self, file: &str, toml: &str) {
        std::fs::write(self.zones.join(file), toml).expect("zone file");
    }

    /// Starts the daemon and waits until it answers over DNS.
    pub fn start(&mut self) {
        self.start_under(&[]);
    }

    /// Starts the daemon as the last arguments of `wrapper` (e.g. `prlimit --nofile=...`).
    pub fn start_under(&mut self, wrapper: &[&str]) {
        let config = self.config.to_str().expect("utf-8");
        let mut args: Vec<&str> = wrapper.iter().skip(1).copied().collect();
        if !wrapper.is_empty() {
            args.push(DISCOTECH);
        }
        args.extend(["serve", "--config", config]);
        let program = wrapper.first().copied().unwrap_or(DISCOTECH);
        self.pid = self.ns.spawn(program, &args, &self.log);
        let server = format!("@{}", self.listen.ip());
        let port = self.listen.port().to_string();
        let up = eventually(Duration::from_secs(10), || {
            let out = self.ns.run(
                "dig",
                &[
                    &server, "-p", &port, "disco", "SOA", "+short", "+time=1", "+tries=1",
                ],
            );
            (out.status.success() && !out.stdout.is_empty()).then_some(())
        });
        assert!(
            up.is_some(),
            "discotech did not start answering; log:\n{}",
            self.log_text()
        );
    }

    pub fn stop(&mut self) -> Option<i32> {
        self.ns.stop(self.pid)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `dig` against this daemon with extra args; returns stdout.
    pub fn dig(&self, args: &[&str]) -> String {
        let server = format!("@{}", self.listen.ip());
        let port = self.listen.port().to_string();
        let mut all = vec![server.as_str(), "-p", port.as_str(), "+time=3", "+tries=1"];
        all.extend_from_slice(args);
        self.ns.ok("dig", &all)
    }

    /// Runs `args` under `discotech run` with this daemon's config (the hook preloaded).
    pub fn hooked(&self, args: &[&str]) -> std::process::Output {
        let config = self.config.to_str().expect("utf-8");
        let mut all = vec!["run", "--config", config, "--"];
        all.extend_from_slice(args);
        self.ns.run(DISCOTECH, &all)
    }

    /// `dig +short NAME TYPE`, one line per record.
    pub fn short(&self, name: &str, rtype: &str) -> Vec<String> {
        self.dig(&[name, rtype, "+short"])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// dnsmasq's arguments for a server in the foreground on `addrs` and `port` that reads no system
/// file (resolv.conf, hosts, its config), plus `extra`.
pub fn dnsmasq_args(addrs: &[&str], port: u16, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "--keep-in-foreground".to_string(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--conf-file=/dev/null".into(),
        "--bind-interfaces".into(),
        format!("--port={port}"),
        "--pid-file=".into(),
        "--user=root".into(),
    ];
    args.extend(addrs.iter().map(|a| format!("--listen-address={a}")));
    args.extend_from_slice(extra);
    args
}

/// A dnsmasq upstream inside the namespace, answering only the given host records.
pub fn dnsmasq(ns: &Netns, addr: &str, port: u16, records: &[(&str, &str)], ttl: u32) -> u32 {
    let mut args = dnsmasq_args(&[addr], port, &[format!("--local-ttl={ttl}")]);
    for (name, ip) in records {
        args.push(format!("--host-record={name},{ip}"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = ns.path(&format!("dnsmasq-{addr}-{port}.log"));
    let pid = ns.spawn("dnsmasq", &refs, &log);
    let server = format!("@{addr}");
    let p = port.to_string();
    let probe = records.first().map_or("localhost", |r| r.0);
    let up = eventually(Duration::from_secs(10), || {
        let out = ns.run(
            "dig",
            &[&server, "-p", &p, probe, "+short", "+time=1", "+tries=1"],
        );
        (out.status.success() && !out.stdout.is_empty()).then_some(())
    });
    assert!(
        up.is_some(),
        "dnsmasq did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    pid
}

/// The C test programs, compiled once per test run.
/// A greeter (tests/clients/greeter.c) named `name` on `ip:7001` for 300 s, answering before this
/// returns; its pid.
pub fn greeter(ns: &Netns, name: &str, ip: &str) -> u32 {
    let greeter = c_program("greeter");
    let hookclient = c_program("hookclient");
    let pid = ns.spawn(
        greeter.to_str().expect("utf-8"),
        &[name, ip, "7001", "300"],
        &ns.path(&format!("greeter-{name}.log")),
    );
    let up = eventually(Duration::from_secs(5), || {
        let out = ns.run(hookclient.to_str().expect("utf-8"), &["block", ip, "7001"]);
        String::from_utf8_lossy(&out.stdout)
            .starts_with("OK ")
            .then_some(())
    });
    assert!(up.is_some(), "greeter {name} on {ip} did not start");
    pid
}

pub fn c_program(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("clients");
        std::fs::create_dir_all(&dir).expect("clients dir");
        for prog in ["hookclient", "greeter", "delayline", "prefetchclient"] {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/clients/{prog}.c"));
            let status = Command::new("cc")
                .args(["-O2", "-pthread", "-o"])
                .arg(dir.join(prog))
                .arg(&src)
                .status()
                .expect("cc");
            assert!(status.success(), "cannot compile {prog}.c");
        }
        dir
    });
    dir.join(name)
}

/// A cargo example of this package, built beside the `discotech` binary (`cargo test` and the
/// README's test command build examples; a lone `cargo test --test blackbox` may not have).
pub fn example(name: &str) -> String {
    let path = Path::new(DISCOTECH)
        .parent()
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --examples` (tests/run.sh does)",
        path.display()
    );
    path.to_str().expect("utf-8").to_owned()
}

/// The connect hook library next to the discotech binary, built once if missing (it is a
/// separate package, which `cargo test --test blackbox` alone does not build).
pub fn ensure_hook_library() {
    static BUILT: OnceLock<()> = OnceLock::new();
    // Built every run (cargo makes it a no-op when nothing changed): a library left over from
    // an older build would test old hook code against the new daemon.
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "discotech-hook"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build -p discotech-hook");
        assert!(status.success(), "cannot build the hook library");
        let lib = Path::new(DISCOTECH)
            .parent()
            .expect("target dir")
            .join("libdiscotech_hook.so");
        assert!(lib.exists(), "{} was not built", lib.display());
    });
}

/// A python HTTP server on `ip:port` whose `/who` answers `name` (and `/healthz` answers `ok`).
pub fn backend(ns: &Netns, ip: &str, port: u16, name: &str) -> u32 {
    let dir = ns.path(&format!("www-{name}"));
    std::fs::create_dir_all(&dir).expect("www dir");
    std::fs::write(dir.join("who"), name).expect("who file");
    std::fs::write(dir.join("healthz"), "ok\n").expect("healthz file");
    let port = port.to_string();
    let pid = ns.spawn(
        "python3",
        &[
            "-m",
            "http.server",
            &port,
            "--bind",
            ip,
            "--directory",
            dir.to_str().expect("utf-8"),
        ],
        &ns.path(&format!("www-{name}.log")),
    );
    let url = format!("http://{ip}:{port}/who");
    let up = eventually(Duration::from_secs(10), || {
        let out = ns.run("curl", &["-s", "--max-time", "1", &url]);
        (String::from_utf8_lossy(&out.stdout) == name).then_some(())
    });
    assert!(up.is_some(), "backend {name} did not start");
    pid
}

/// `curl http://NAME:PORT/who` `n` times in one process with the hook preloaded through
/// `discotech run`, a new connection each time; the answering backends' names in order.
/// (One process, because the pick order is only meaningful within one hook client.)
pub fn hooked_who(d: &Daemon, host: &str, port: u16, n: usize) -> Vec<String> {
    let url = format!("http://{host}:{port}/who");
    let mut args = vec![
        "curl",
        "-s",
        "--max-time",
        "3",
        "-H",
        "Connection: close",
        "-w",
        "\\n",
    ];
    args.extend(std::iter::repeat_n(url.as_str(), n));
    let out = d.hooked(&args);
    let mut got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        got.push(format!(
            "error {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    got
}

/// The stdout of a command that must have succeeded (its output and errors in the failure message).
pub fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
