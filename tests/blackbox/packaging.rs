//! The Debian package and its systemd unit, installed for real: `packaging/build-deb.sh` builds the
//! .deb (once per test run), and each test installs it with `dpkg -i` into a scratch root: an overlay
//! of `/` mounted inside the test's private mount namespace, with a fresh /run and /tmp, entered with
//! chroot. The maintainer scripts run as on a host (group created, unit enabled), and every write
//! lands in the overlay's tmpfs, never on the host: its /etc/resolv.conf, /etc/systemd and dpkg
//! database stay untouched. The installed binary then serves inside the namespace, where only
//! loopback exists.
//!
//! Two tests boot systemd as PID 1 of a PID namespace in the scratch root, so the real service manager
//! runs the shipped unit with its sandbox, and the real systemd-resolved (installed only there, from
//! the .deb tests/run.sh downloads) routes `~disco` to discotech through the shipped drop-in. Another
//! checks mode (b) without systemd, with a dnsmasq routing as the drop-in says in resolved's place.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::{Netns, dnsmasq, dnsmasq_args, eventually};

const VPC_RESOLVER: &str = "127.0.0.10";

/// Builds the .deb once per test process; every test gets the same file.
fn deb() -> &'static Path {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = DEB.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/build-deb.sh");
        let out = Command::new(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("build-deb.sh named no .deb: {stdout}"))
        }
    });
    match built {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The package installed with `dpkg -i` into an overlay of `/` inside `ns`'s mount namespace.
struct Scratch<'a> {
    ns: &'a Netns,
    root: String,
    dpkg_output: String,
}

impl<'a> Scratch<'a> {
    fn install(ns: &'a Netns) -> Self {
        let deb = deb();
        let ovl = ns.path("overlay");
        let root = ns.path("root");
        std::fs::create_dir_all(&ovl).expect("overlay dir");
        std::fs::create_dir_all(&root).expect("root dir");
        let (ovl, root) = (ovl.display().to_string(), root.display().to_string());
        let setup = format!(
            "set -e
             mount -t tmpfs tmpfs {ovl}
             mkdir {ovl}/upper {ovl}/work
             mount -t overlay overlay -o lowerdir=/,upperdir={ovl}/upper,workdir={ovl}/work {root}
             test \"$(findmnt -n -o FSTYPE {root})\" = overlay
             mount -t tmpfs tmpfs {root}/run
             mount -t tmpfs tmpfs {root}/tmp
             mount --rbind /dev {root}/dev
             mount -t proc proc {root}/proc
             cp {deb} {root}/var/tmp/discotech.deb",
            deb = deb.display()
        );
        ns.ok("sh", &["-c", &setup]);
        let s = Self {
            ns,
            root,
            dpkg_output: String::new(),
        };
        let out = s.chroot(&["dpkg", "-i", "/var/tmp/discotech.deb"]);
        assert!(out.status.success(), "dpkg -i failed:\n{}", text(&out));
        Self {
            dpkg_output: text(&out),
            ..s
        }
    }

    /// Runs a command chrooted into the scratch root (bounded by 60 s).
    fn chroot(&self, args: &[&str]) -> Output {
        let mut c = self.ns.cmd("timeout");
        c.args(["60", "chroot", &self.root])
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c.output()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
    }

    fn chroot_ok(&self, args: &[&str]) -> String {
        let out = self.chroot(args);
        assert!(
            out.status.success(),
            "{args:?} in the scratch root failed: {}\n{}",
            out.status,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A file of the scratch root, read from inside the namespace.
    fn read(&self, path: &str) -> String {
        self.chroot_ok(&["cat", path])
    }

    /// Writes a file of the scratch root (through the namespace: the overlay is not visible outside).
    fn write(&self, path: &str, content: &str) {
        let staged = self.ns.path("staged");
        std::fs::write(&staged, content).expect("stage file");
        self.ns.ok(
            "cp",
            &[
                staged.to_str().expect("utf-8"),
                &format!("{}{path}", self.root),
            ],
        );
    }

    fn exists(&self, path: &str) -> bool {
        self.chroot(&["test", "-e", path]).status.success()
    }

    /// Starts the installed daemon with `config` (a path inside the root).
    fn serve(&self, config: &str) -> u32 {
        let log = self.ns.path("discotech.log");
        self.ns.spawn(
            "chroot",
            &[
                &self.root,
                "/usr/bin/discotech",
                "serve",
                "--config",
                config,
            ],
            &log,
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.ns.path("discotech.log")).unwrap_or_default()
    }
}

/// systemd booted as PID 1 of new PID, mount and cgroup namespaces, chrooted into a scratch root:
/// the real service manager runs the installed unit with its whole sandbox. Its cgroup namespace is
/// rooted in a cgroup of its own (`discotech-test-PID` in every hierarchy), so two booted systems never
/// manage each other's services, and nothing is left in the host's cgroup tree afterwards.
struct Booted {
    /// systemd's pid as seen from the test.
    pid: u32,
    /// The cgroup made for it, removed on drop.
    cgroup: String,
}

/// Joins a fresh cgroup in every hierarchy, then execs systemd in the scratch root ($1).
const BOOT: &str = r#"set -e
cg=discotech-test-$$
for h in /sys/fs/cgroup/*/; do
    [ -f "${h}cgroup.procs" ] || continue
    mkdir -p "$h$cg"
    if [ -f "$h$cg/cpuset.cpus" ]; then
        cat "${h}cpuset.cpus" > "$h$cg/cpuset.cpus"
        cat "${h}cpuset.mems" > "$h$cg/cpuset.mems"
    fi
    echo $$ > "$h$cg/cgroup.procs"
done
exec unshare --pid --fork --mount --propagation private --cgroup --kill-child \
    chroot "$1" /bin/sh -c 'mount -t proc proc /proc && exec /lib/systemd/systemd --system'
"#;

impl Scratch<'_> {
    fn boot(&self) -> Booted {
        // The scratch root is a copy of this machine's image, whose enabled services (web servers,
        // databases, resolvers, timers) have nothing to do with the test: only ours stay enabled.
        self.chroot_ok(&[
            "sh",
            "-c",
            "cd /etc/systemd/system && for w in *.wants; do find \"$w\" -mindepth 1 -maxdepth 1 ! -name discotech.service ! -name systemd-resolved.service -delete; done",
        ]);
        let log = self.ns.path("systemd.log");
        let unshare = self.ns.spawn("sh", &["-c", BOOT, "boot", &self.root], &log);
        let mut booted = Booted {
            pid: 0,
            cgroup: format!("discotech-test-{unshare}"),
        };
        let pid = eventually(Duration::from_secs(10), || {
            let children =
                std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
            let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "systemd").then_some(pid)
        });
        booted.pid = pid.unwrap_or_else(|| {
            panic!(
                "systemd did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let state = eventually(Duration::from_secs(60), || {
            let state = booted.run(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            ["running", "degraded"]
                .contains(&state.as_str())
                .then_some(state)
        });
        assert!(
            state.is_some(),
            "systemd did not finish booting: {}",
            text(&booted.run(&["systemctl", "list-jobs", "--no-pager"]))
        );
        booted
    }
}

impl Booted {
    /// Runs a command inside the booted system (its namespaces and root), bounded by 60 s.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args([
                "60",
                "nsenter",
                "-t",
                &self.pid.to_string(),
                "-m",
                "-p",
                "-n",
                "-r",
                "-w",
                "--",
            ])
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SYSTEMD_PAGER", "")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} under systemd failed: {}\n{}",
            out.status,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn active(&self, unit: &str) -> String {
        String::from_utf8_lossy(&self.run(&["systemctl", "is-active", unit]).stdout)
            .trim()
            .to_string()
    }

    fn journal(&self, unit: &str) -> String {
        String::from_utf8_lossy(
            &self
                .run(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
                .stdout,
        )
        .into_owned()
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init from outside ends the whole namespace.
        if self.pid != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
        // Its cgroups empty once every process in it is reaped; remove them deepest first.
        let hierarchies: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path().join(&self.cgroup)).collect())
            .unwrap_or_default();
        let _ = eventually(Duration::from_secs(5), || {
            let mut left = false;
            for top in &hierarchies {
                let mut dirs = vec![top.clone()];
                let mut i = 0;
                while let Some(dir) = dirs.get(i).cloned() {
                    dirs.extend(
                        std::fs::read_dir(&dir)
                            .map(|d| {
                                d.flatten()
                                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                                    .map(|e| e.path())
                                    .collect::<Vec<_>>()
                            })
                            .unwrap_or_default(),
                    );
                    i += 1;
                }
                for dir in dirs.iter().rev() {
                    if std::fs::remove_dir(dir).is_err() && dir.exists() {
                        left = true;
                    }
                }
            }
            (!left).then_some(())
        });
    }
}

/// The `[Resolve]` keys of a resolved.conf drop-in, as resolved reads them (last assignment wins).
fn resolved_keys(text: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            assert_eq!(section, "Resolve", "key {k} outside [Resolve]");
            keys.retain(|(key, _)| key != k.trim());
            keys.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    keys
}

fn key<'k>(keys: &'k [(String, String)], name: &str) -> Option<&'k str> {
    keys.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `[Service]` settings of a unit file (the last value of each key; repeated keys joined by spaces).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn installed_unit_passes_systemd_analyze_verify() {
    let ns = Netns::new();
    let root = Scratch::install(&ns);
    let unit = "/usr/lib/systemd/system/discotech.service";
    // verify checks every key and that the Exec binaries exist, which they do only once installed.
    let out = root.chroot(&["systemd-analyze", "verify", unit]);
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify:\n{}",
        text(&out)
    );

    // The same check on a copy with a typo proves verify's silence above means something.
    let broken = root
        .read(unit)
        .replace("ProtectSystem=strict", "ProtectSytem=strict");
    root.write("/etc/systemd/system/discotech-typo.service", &broken);
    let out = root.chroot(&[
        "systemd-analyze",
        "verify",
        "/etc/systemd/system/discotech-typo.service",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ProtectSytem"),
        "a typo went unnoticed:\n{}",
        text(&out)
    );

    // The hardening the issue asks for, as shipped.
    let settings = unit_settings(&root.read(unit));
    let value = |k: &str| {
        settings
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        value("CapabilityBoundingSet"),
        "CAP_NET_BIND_SERVICE CAP_BPF CAP_NET_ADMIN"
    );
    assert_eq!(
        value("AmbientCapabilities"),
        "CAP_NET_BIND_SERVICE CAP_BPF CAP_NET_ADMIN"
    );
    assert_eq!(value("ProtectSystem"), "strict");
    assert_eq!(value("PrivateTmp"), "yes");
    assert_eq!(value("NoNewPrivileges"), "yes");
    assert_eq!(value("RuntimeDirectory"), "discotech");
    assert_eq!(value("RuntimeDirectoryPreserve"), "yes");
    assert_eq!(value("StateDirectory"), "discotech");
    assert_eq!(value("Restart"), "always");
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(value("ReadWritePaths"), "/var/lib/discotech /run/discotech");
    for family in ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"] {
        assert!(
            value("RestrictAddressFamilies")
                .split(' ')
                .any(|f| f == family),
            "{family} not allowed"
        );
    }
    // Root, so the hook trusts the socket owner out of the box (see the unit's comment).
    assert_eq!(
        value("User"),
        "",
        "the hook trusts a root-owned daemon socket; another user needs DISCOTECH_DAEMON_UID in every app"
    );

    // The unit is enabled by the postinst, and the admin group exists.
    assert!(
        root.exists("/etc/systemd/system/multi-user.target.wants/discotech.service"),
        "not enabled; dpkg said:\n{}",
        root.dpkg_output
    );
    root.chroot_ok(&["getent", "group", "discotech"]);
    // tmpfiles.d creates /run/discotech as documented.
    root.chroot_ok(&["systemd-tmpfiles", "--create", "discotech.conf"]);
    let run = root.chroot_ok(&["stat", "-c", "%a %U %G", "/run/discotech"]);
    assert_eq!(run.trim(), "755 root discotech");
}

#[test]
fn deb_ships_the_binary_the_hook_the_unit_and_conffiles() {
    let deb = deb().to_str().expect("utf-8 path");
    let list = Command::new("dpkg-deb")
        .args(["-c", deb])
        .output()
        .expect("dpkg-deb");
    assert!(list.status.success(), "{}", text(&list));
    let list = String::from_utf8_lossy(&list.stdout);
    for (path, mode) in [
        ("./usr/bin/discotech", "-rwxr-xr-x"),
        ("./usr/lib/discotech/libdiscotech_hook.so", "-rw-r--r--"),
        ("./usr/lib/systemd/system/discotech.service", "-rw-r--r--"),
        ("./usr/lib/tmpfiles.d/discotech.conf", "-rw-r--r--"),
        ("./usr/lib/sysusers.d/discotech.conf", "-rw-r--r--"),
        ("./etc/discotech/discotech.toml", "-rw-r--r--"),
        ("./etc/discotech/zones/example.toml", "-rw-r--r--"),
        (
            "./usr/share/doc/discotech/examples/resolved.conf.d-discotech.conf",
            "-rw-r--r--",
        ),
        (
            "./usr/share/doc/discotech/examples/discotech-beside-resolved.toml",
            "-rw-r--r--",
        ),
        (
            "./usr/share/doc/discotech/examples/hook-dropin.conf",
            "-rw-r--r--",
        ),
        ("./usr/share/doc/discotech/docs/deployment.md", "-rw-r--r--"),
        (
            "./usr/share/doc/discotech/docs/configuration.md",
            "-rw-r--r--",
        ),
        ("./usr/share/doc/discotech/copyright", "-rw-r--r--"),
    ] {
        let line = list
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{list}"));
        assert!(
            line.starts_with(mode) && line.contains(" 0/0 "),
            "{path}: {line}"
        );
    }
    // The shipped drop-in must not switch the host resolver: nothing under /etc/systemd.
    assert!(
        !list.contains("./etc/systemd/"),
        "the package installs resolver configuration:\n{list}"
    );

    let field = |f: &str| {
        String::from_utf8_lossy(
            &Command::new("dpkg-deb")
                .args(["-f", deb, f])
                .output()
                .expect("dpkg-deb -f")
                .stdout,
        )
        .trim()
        .to_string()
    };
    assert_eq!(field("Package"), "discotech");
    assert!(
        field("Depends").split(", ").any(|d| d == "systemd"),
        "Depends: {}",
        field("Depends")
    );

    let ctrl = tempfile::tempdir().expect("tempdir");
    let out = Command::new("dpkg-deb")
        .args(["-e", deb, ctrl.path().to_str().expect("utf-8")])
        .output()
        .expect("dpkg-deb -e");
    assert!(out.status.success(), "{}", text(&out));
    let conffiles = std::fs::read_to_string(ctrl.path().join("conffiles")).expect("conffiles");
    let conffiles: Vec<&str> = conffiles.lines().collect();
    assert_eq!(
        conffiles,
        [
            "/etc/discotech/discotech.toml",
            "/etc/discotech/zones/example.toml"
        ]
    );

    // The hook is a shared library that interposes connect(), not a stray rlib or executable.
    let x = ctrl.path().join("x");
    let out = Command::new("dpkg-deb")
        .args(["-x", deb, x.to_str().expect("utf-8")])
        .output()
        .expect("dpkg-deb -x");
    assert!(out.status.success(), "{}", text(&out));
    let syms = Command::new("readelf")
        .args(["-h", "--dyn-syms", "-W"])
        .arg(x.join("usr/lib/discotech/libdiscotech_hook.so"))
        .output()
        .expect("readelf");
    let syms = String::from_utf8_lossy(&syms.stdout);
    assert!(syms.contains("DYN (Shared object file)"), "{syms}");
    assert!(
        syms.lines().any(|l| l.contains(" FUNC ")
            && l.contains(" GLOBAL ")
            && l.split_whitespace().last() == Some("connect")),
        "connect not exported"
    );
}

/// Mode (a): the package as the host's resolver on 127.0.0.53, following docs/deployment.md: set
/// upstreams to the VPC resolver, point resolv.conf at 127.0.0.53, preload the hook with
/// `discotech run`. Then remove and purge.
#[test]
fn installed_package_serves_as_the_system_resolver_and_routes_hooked_connects() {
    let ns = Netns::new();
    let root = Scratch::install(&ns);
    // The cgroup2 hierarchy, where the daemon attaches its catch path (a host's /sys has it).
    ns.ok(
        "sh",
        &[
            "-c",
            &format!(
                "mkdir -p {r}/sys/fs/cgroup && mount -t cgroup2 none {r}/sys/fs/cgroup",
                r = root.root
            ),
        ],
    );
    dnsmasq(
        &ns,
        VPC_RESOLVER,
        53,
        &[("db.vpc.internal", "10.1.2.3")],
        300,
    );

    // The shipped config passes its own check, then again with the upstream set as the docs say.
    root.chroot_ok(&[
        "discotech",
        "check",
        "--config",
        "/etc/discotech/discotech.toml",
    ]);
    let config = root.read("/etc/discotech/discotech.toml");
    assert!(config.contains("listen = [\"127.0.0.53:53\"]"), "{config}");
    let upstream_line = config
        .lines()
        .find(|l| l.starts_with("# upstreams = "))
        .expect("the example config shows where upstreams go");
    root.write(
        "/etc/discotech/discotech.toml",
        &config.replace(upstream_line, &format!("upstreams = [\"{VPC_RESOLVER}\"]")),
    );
    root.chroot_ok(&[
        "discotech",
        "check",
        "--config",
        "/etc/discotech/discotech.toml",
    ]);
    root.write(
        "/etc/resolv.conf",
        "nameserver 127.0.0.53\noptions timeout:2 attempts:1\n",
    );

    root.serve("/etc/discotech/discotech.toml");
    // Real libc clients in the installed root: the example zone's service, and a forwarded name.
    let web = eventually(Duration::from_secs(10), || {
        let out = root.chroot(&["getent", "hosts", "web.disco"]);
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
    });
    let web = web.unwrap_or_else(|| {
        panic!(
            "web.disco did not resolve through 127.0.0.53; log:\n{}",
            root.log()
        )
    });
    assert!(
        web.starts_with("127.77."),
        "web.disco is {web}, not a magic address"
    );
    let vpc = root.chroot_ok(&["getent", "hosts", "db.vpc.internal"]);
    assert!(vpc.starts_with("10.1.2.3 "), "forwarded name: {vpc}");
    let srv = root.chroot_ok(&["dig", "+short", "web.disco", "SRV"]);
    assert!(
        srv.contains(" 8080 127-0-0-2.web.disco.") && srv.contains(" 8080 127-0-0-3.web.disco."),
        "{srv}"
    );

    // The installed daemon's runtime files, where the unit and the hook expect them.
    assert_eq!(
        root.chroot_ok(&["stat", "-c", "%a", "/run/discotech/hook.sock"])
            .trim(),
        "666"
    );
    assert_eq!(
        root.chroot_ok(&["stat", "-c", "%a", "/run/discotech/admin.sock"])
            .trim(),
        "660"
    );
    let services = root.chroot_ok(&["discotech", "services"]);
    assert!(
        services
            .lines()
            .any(|l| l.starts_with("web ") && l.contains(&web)),
        "{services}"
    );

    // The hook from /usr/lib/discotech, found by `discotech run`, sends curl's connect to a backend.
    for backend in ["127.0.0.2", "127.0.0.3"] {
        let dir = ns.path(backend);
        std::fs::create_dir_all(&dir).expect("backend dir");
        std::fs::write(dir.join("who"), backend).expect("backend file");
        ns.spawn(
            "/usr/bin/python3",
            &[
                "-m",
                "http.server",
                "--bind",
                backend,
                "--directory",
                dir.to_str().expect("utf-8"),
                "8080",
            ],
            &ns.path(&format!("{backend}.log")),
        );
    }
    let answered = eventually(Duration::from_secs(10), || {
        let out = root.chroot(&[
            "discotech",
            "run",
            "--",
            "curl",
            "-sf",
            "--max-time",
            "3",
            "http://web.disco:8080/who",
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    let answered = answered.unwrap_or_else(|| {
        panic!(
            "hooked curl to web.disco got no backend; log:\n{}",
            root.log()
        )
    });
    assert!(
        answered == "127.0.0.2" || answered == "127.0.0.3",
        "{answered}"
    );
    // The answer above came through the hook: the kernel caught nothing. Without the hook, the
    // installed daemon's catch path (BPF) sends the same connect to a backend.
    let status = |r: &Scratch<'_>| {
        String::from_utf8_lossy(&r.chroot(&["discotech", "status"]).stdout).into_owned()
    };
    let before = status(&root);
    assert!(before.contains("catch: on, 0 connects caught"), "{before}");
    let bare = root.chroot(&[
        "curl",
        "-sf",
        "--max-time",
        "3",
        "http://web.disco:8080/who",
    ]);
    let caught = String::from_utf8_lossy(&bare.stdout);
    assert!(
        bare.status.success() && (caught == "127.0.0.2" || caught == "127.0.0.3"),
        "an unhooked connect to the magic address: {}; log:\n{}",
        text(&bare),
        root.log()
    );
    let counted = eventually(Duration::from_secs(3), || {
        status(&root)
            .contains("catch: on, 1 connects caught")
            .then_some(())
    });
    assert!(counted.is_some(), "{}", status(&root));

    // remove keeps the config and the state (addresses survive a reinstall); purge removes both.
    assert!(
        root.exists("/var/lib/discotech/magic.json"),
        "no state written; log:\n{}",
        root.log()
    );
    root.chroot_ok(&["dpkg", "-r", "discotech"]);
    assert!(
        !root.exists("/usr/bin/discotech")
            && !root.exists("/usr/lib/discotech/libdiscotech_hook.so")
    );
    assert!(
        root.exists("/etc/discotech/discotech.toml")
            && root.exists("/var/lib/discotech/magic.json")
    );
    root.chroot_ok(&["dpkg", "-P", "discotech"]);
    assert!(
        !root.exists("/etc/discotech/discotech.toml"),
        "purge left the config"
    );
    assert!(!root.exists("/var/lib/discotech"), "purge left the state");
}

/// Mode (b): beside systemd-resolved, which keeps 127.0.0.53 and 127.0.0.54 and routes `~disco` to
/// discotech on the address in the shipped drop-in.
#[test]
fn installed_package_serves_beside_resolved_on_the_drop_in_address() {
    let ns = Netns::new();
    let root = Scratch::install(&ns);
    let keys = resolved_keys(
        &root.read("/usr/share/doc/discotech/examples/resolved.conf.d-discotech.conf"),
    );
    let dns = key(&keys, "DNS")
        .expect("the drop-in sets DNS=")
        .to_string();
    assert_eq!(key(&keys, "Domains"), Some("~disco"), "{keys:?}");
    let addr: std::net::Ipv4Addr = dns.parse().unwrap_or_else(|e| panic!("DNS={dns}: {e}"));
    assert!(addr.is_loopback(), "DNS={dns} must be a loopback address");
    assert!(
        !["127.0.0.53", "127.0.0.54"].contains(&dns.as_str()),
        "DNS={dns} is where resolved itself listens"
    );

    // The shipped mode-(b) config listens where the drop-in points, and names real upstreams.
    let example = root.read("/usr/share/doc/discotech/examples/discotech-beside-resolved.toml");
    assert!(
        example.contains(&format!("listen = [\"{dns}:53\"]")),
        "the example config does not listen on DNS={dns}:\n{example}"
    );
    let upstreams = example
        .lines()
        .find(|l| l.starts_with("upstreams = "))
        .expect("the example names its upstreams");
    assert!(
        !upstreams.contains("127.0.0.53") && !upstreams.contains("127.0.0.54"),
        "a forwarding loop through resolved: {upstreams}"
    );
    root.write(
        "/etc/discotech/discotech.toml",
        &example.replace(upstreams, &format!("upstreams = [\"{VPC_RESOLVER}\"]")),
    );
    root.chroot_ok(&[
        "discotech",
        "check",
        "--config",
        "/etc/discotech/discotech.toml",
    ]);

    // resolved's place: a stub on 127.0.0.53 (and its proxy stub on 127.0.0.54) that routes as the
    // drop-in tells resolved to. Both hold their ports before discotech starts, as on a real host.
    dnsmasq(
        &ns,
        VPC_RESOLVER,
        53,
        &[("db.vpc.internal", "10.1.2.3")],
        300,
    );
    let resolved_log = ns.path("resolved-standin.log");
    let args = dnsmasq_args(
        &["127.0.0.53", "127.0.0.54"],
        53,
        &[
            format!("--server=/disco/{dns}"),
            format!("--server={VPC_RESOLVER}"),
        ],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ns.spawn("dnsmasq", &refs, &resolved_log);
    root.write(
        "/etc/resolv.conf",
        "nameserver 127.0.0.53\noptions timeout:2 attempts:1\n",
    );
    root.serve("/etc/discotech/discotech.toml");

    let direct = eventually(Duration::from_secs(10), || {
        let out = root.chroot(&[
            "dig",
            &format!("@{dns}"),
            "+short",
            "+time=1",
            "+tries=1",
            "web.disco",
        ]);
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    });
    let direct =
        direct.unwrap_or_else(|| panic!("discotech did not answer on {dns}; log:\n{}", root.log()));
    assert!(direct.starts_with("127.77."), "{direct}");
    // Through the resolver the host uses: service names reach discotech, the rest goes upstream.
    let via_stub = root.chroot_ok(&["getent", "hosts", "web.disco"]);
    assert!(
        via_stub.starts_with(&format!("{direct} ")),
        "via 127.0.0.53: {via_stub}\nstand-in log:\n{}",
        std::fs::read_to_string(&resolved_log).unwrap_or_default()
    );
    let vpc = root.chroot_ok(&["getent", "hosts", "db.vpc.internal"]);
    assert!(vpc.starts_with("10.1.2.3 "), "{vpc}");
    // Each listener belongs to the right daemon: discotech left resolved's addresses alone.
    let ss = ns.ok("ss", &["-lnupH"]);
    let owner = |addr: &str| {
        ss.lines()
            .find(|l| l.contains(&format!(" {addr}:53 ")))
            .unwrap_or_else(|| panic!("nothing on {addr}:53:\n{ss}"))
            .to_string()
    };
    assert!(owner(&dns).contains("\"discotech\""), "{ss}");
    assert!(
        owner("127.0.0.53").contains("\"dnsmasq\"") && owner("127.0.0.54").contains("\"dnsmasq\""),
        "{ss}"
    );
}

/// The installed unit under a real systemd (PID 1 of its own namespace): started at boot because the
/// postinst enabled it, running with only CAP_NET_BIND_SERVICE inside its sandbox, reloading on
/// `systemctl reload`, keeping /run/discotech over a stop; then stopped by `dpkg -r` and started again
/// by the postinst of a reinstall, as on a host.
#[test]
fn installed_unit_runs_hardened_under_systemd() {
    let ns = Netns::new();
    let root = Scratch::install(&ns);
    let sd = root.boot();
    let active = eventually(Duration::from_secs(30), || {
        (sd.active("discotech") == "active").then_some(())
    });
    assert!(
        active.is_some(),
        "discotech.service is {}:\n{}",
        sd.active("discotech"),
        sd.journal("discotech")
    );
    // The answer, or None when nothing answers on 127.0.0.53.
    let dig = |name: &str| {
        let out = ns.run(
            "dig",
            &["@127.0.0.53", "+short", "+time=1", "+tries=1", name],
        );
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !answer.is_empty()).then_some(answer)
    };
    let web = eventually(Duration::from_secs(10), || dig("web.disco")).unwrap_or_default();
    assert!(
        web.starts_with("127.77."),
        "web.disco from the systemd-run daemon: {web:?}\n{}",
        sd.journal("discotech")
    );

    // The process the unit made: uid 0, group discotech, three capabilities, no new privileges, seccomp on.
    let main_pid = sd
        .ok(&["systemctl", "show", "-P", "MainPID", "discotech"])
        .trim()
        .to_string();
    let status = sd.ok(&["cat", &format!("/proc/{main_pid}/status")]);
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let gid = sd
        .ok(&["getent", "group", "discotech"])
        .split(':')
        .nth(2)
        .unwrap_or_default()
        .to_string();
    assert_eq!(field("Uid"), "0 0 0 0");
    assert_eq!(field("Gid"), format!("{gid} {gid} {gid} {gid}"));
    // CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12) and CAP_BPF (39), nothing else.
    const CAPS: &str = "0000008000001400";
    for caps in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(field(caps), CAPS, "{caps}:\n{status}");
    }
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2", "no system call filter");
    // ProtectSystem=strict: the daemon sees the system read-only, except its state and runtime dirs.
    let mounts = sd.ok(&["cat", &format!("/proc/{main_pid}/mountinfo")]);
    let writable = |path: &str| {
        let under = |target: &str| {
            target == "/" || path == target || path.starts_with(&format!("{target}/"))
        };
        // The last mount on the longest matching mount point is the one the daemon sees.
        let line = mounts
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(under))
            .max_by_key(|l| l.split(' ').nth(4).map_or(0, str::len));
        line.and_then(|l| l.split(' ').nth(5))
            .is_some_and(|opts| opts.split(',').any(|o| o == "rw"))
    };
    for path in ["/usr/bin", "/etc/discotech", "/var/lib/dpkg", "/"] {
        assert!(
            !writable(path),
            "{path} is writable for the daemon:\n{mounts}"
        );
    }
    for path in ["/var/lib/discotech", "/run/discotech"] {
        assert!(
            writable(path),
            "{path} is not writable for the daemon:\n{mounts}"
        );
    }

    let stat = |path: &str| sd.ok(&["stat", "-c", "%a %U %G", path]).trim().to_string();
    assert_eq!(stat("/run/discotech"), "755 root discotech");
    assert_eq!(stat("/run/discotech/admin.sock"), "660 root discotech");
    assert_eq!(stat("/run/discotech/hook.sock"), "666 root discotech");
    assert_eq!(stat("/var/lib/discotech"), "750 root discotech");

    // systemctl reload is a SIGHUP the daemon applies, in the same process.
    sd.ok(&["systemctl", "reload", "discotech"]);
    let reloaded = eventually(Duration::from_secs(10), || {
        sd.journal("discotech").contains("reloaded").then_some(())
    });
    assert!(
        reloaded.is_some(),
        "no reload in the journal:\n{}",
        sd.journal("discotech")
    );
    assert_eq!(
        sd.ok(&["systemctl", "show", "-P", "MainPID", "discotech"])
            .trim(),
        main_pid
    );

    // RuntimeDirectoryPreserve=yes: hooked programs keep the fallback file while the daemon is stopped.
    assert!(
        sd.run(&["test", "-s", "/run/discotech/hook.snapshot"])
            .status
            .success(),
        "no hook.snapshot"
    );
    sd.ok(&["systemctl", "stop", "discotech"]);
    assert!(
        sd.run(&["test", "-s", "/run/discotech/hook.snapshot"])
            .status
            .success(),
        "stopping the unit removed hook.snapshot"
    );
    sd.ok(&["systemctl", "start", "discotech"]);
    assert_eq!(sd.active("discotech"), "active");

    // dpkg -r stops the daemon (prerm); a reinstall starts it again (postinst, systemd running).
    // This machine is a container image whose policy-rc.d forbids that; a host has none.
    root.chroot_ok(&["rm", "-f", "/usr/sbin/policy-rc.d"]);
    sd.ok(&["dpkg", "-r", "discotech"]);
    assert_ne!(sd.active("discotech"), "active");
    assert_eq!(dig("web.disco"), None, "still answering after dpkg -r");
    sd.ok(&["dpkg", "-i", "/var/tmp/discotech.deb"]);
    let back = eventually(Duration::from_secs(20), || dig("web.disco"));
    assert_eq!(
        back.as_deref(),
        Some(web.as_str()),
        "after reinstall:\n{}",
        sd.journal("discotech")
    );
    assert_eq!(sd.active("discotech"), "active");
}

/// Where tests/run.sh puts the systemd-resolved package (the version of the installed systemd), which
/// is installed only into scratch roots: on the host it would take over /etc/resolv.conf.
const RESOLVED_DEB: &str = "target/packaging-test/systemd-resolved.deb";

/// Mode (b) with the real systemd-resolved: the shipped drop-in installed, resolved on 127.0.0.53 and
/// 127.0.0.54, discotech from the shipped beside-resolved config on the drop-in's address.
#[test]
fn resolved_with_the_shipped_drop_in_routes_the_service_domain_to_discotech() {
    let resolved_deb = Path::new(env!("CARGO_MANIFEST_DIR")).join(RESOLVED_DEB);
    assert!(
        resolved_deb.is_file(),
        "{} is missing: tests/run.sh downloads it (apt-get download systemd-resolved)",
        resolved_deb.display()
    );
    let ns = Netns::new();
    let root = Scratch::install(&ns);
    root.chroot_ok(&["rm", "-f", "/usr/sbin/policy-rc.d"]);
    ns.ok(
        "cp",
        &[
            resolved_deb.to_str().expect("utf-8"),
            &format!("{}/var/tmp/systemd-resolved.deb", root.root),
        ],
    );
    root.chroot_ok(&["dpkg", "-i", "/var/tmp/systemd-resolved.deb"]);

    // The documented steps: the example config with real upstreams, the drop-in in resolved.conf.d.
    dnsmasq(
        &ns,
        VPC_RESOLVER,
        53,
        &[("db.vpc.internal", "10.1.2.3")],
        300,
    );
    let example = root.read("/usr/share/doc/discotech/examples/discotech-beside-resolved.toml");
    let upstreams = example
        .lines()
        .find(|l| l.starts_with("upstreams = "))
        .expect("the example names its upstreams");
    root.write(
        "/etc/discotech/discotech.toml",
        &example.replace(upstreams, &format!("upstreams = [\"{VPC_RESOLVER}\"]")),
    );
    root.chroot_ok(&["mkdir", "-p", "/etc/systemd/resolved.conf.d"]);
    root.chroot_ok(&[
        "cp",
        "/usr/share/doc/discotech/examples/resolved.conf.d-discotech.conf",
        "/etc/systemd/resolved.conf.d/discotech.conf",
    ]);

    // resolved asks its global DNS servers only while some link has a routable address; a veth pair
    // whose ends are both in this namespace gives it one that leads nowhere. LLMNR and mDNS are off, so
    // resolved sends nothing on it: its only server is discotech on loopback.
    ns.ok("sh", &["-c", "ip link add dt0 type veth peer name dt1 && ip addr add 192.0.2.1/24 dev dt0 && ip link set dt0 up && ip link set dt1 up"]);
    root.write(
        "/etc/systemd/resolved.conf.d/zz-test-no-multicast.conf",
        "[Resolve]\nLLMNR=no\nMulticastDNS=no\n",
    );

    let sd = root.boot();
    for unit in ["discotech", "systemd-resolved"] {
        let up = eventually(Duration::from_secs(30), || {
            (sd.active(unit) == "active").then_some(())
        });
        assert!(
            up.is_some(),
            "{unit} is {}:\n{}",
            sd.active(unit),
            sd.journal(unit)
        );
    }
    // `resolvectl status` under Global, with or without the colons it prints on a terminal.
    let status = sd.ok(&["resolvectl", "status", "--no-pager"]);
    let global: Vec<String> = status
        .lines()
        .map(|l| {
            l.replace(':', " ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert!(
        global.iter().any(|l| l == "DNS Servers 127.0.0.153")
            && global.iter().any(|l| l == "DNS Domain ~disco"),
        "{status}"
    );

    // resolved answers the service name from discotech, and other names through it too.
    let query = eventually(Duration::from_secs(20), || {
        let out = sd.run(&["resolvectl", "query", "--cache=no", "web.disco"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    let query = query.unwrap_or_else(|| {
        panic!(
            "resolvectl query web.disco failed:\n{}\n{}",
            text(&sd.run(&["resolvectl", "query", "web.disco"])),
            sd.journal("systemd-resolved")
        )
    });
    let direct = ns.ok("dig", &["@127.0.0.153", "+short", "web.disco"]);
    assert!(
        direct.trim().starts_with("127.77.") && query.contains(direct.trim()),
        "resolved: {query}\ndiscotech: {direct}"
    );
    // Real clients, through /etc/resolv.conf -> resolved's stub on 127.0.0.53.
    let getent = sd.ok(&["getent", "hosts", "web.disco"]);
    assert!(
        getent.starts_with(&format!("{} ", direct.trim())),
        "{getent}"
    );
    let vpc = sd.ok(&["getent", "hosts", "db.vpc.internal"]);
    assert!(vpc.starts_with("10.1.2.3 "), "{vpc}");
    let ss = ns.ok("ss", &["-lnupH"]);
    // resolved binds its stub to lo: `127.0.0.53%lo:53`.
    let bound = |field: &str, addr: &str| {
        field == format!("{addr}:53")
            || (field.starts_with(&format!("{addr}%")) && field.ends_with(":53"))
    };
    let owner = |addr: &str| {
        ss.lines()
            .find(|l| l.split_whitespace().any(|f| bound(f, addr)))
            .unwrap_or_else(|| panic!("nothing on {addr}:53:\n{ss}"))
            .to_string()
    };
    assert!(owner("127.0.0.153").contains("\"discotech\""), "{ss}");
    assert!(
        owner("127.0.0.53").contains("\"systemd-resolve\"")
            && owner("127.0.0.54").contains("\"systemd-resolve\""),
        "{ss}"
    );
}
