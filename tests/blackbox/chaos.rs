//! The chaos scripts of `tests/chaos/` in their short forms (each well under a minute), one test
//! per script: the script makes its own namespaces, runs its scenario and prints a `RESULT` line,
//! and the test asserts on that line. The full-length runs and their figures are in
//! docs/reliability.md; this keeps the scripts working and the short scenarios passing.
//!
//! The scripts load the machine on purpose, so they run one at a time (a lock), and each is
//! bounded by `timeout`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use crate::harness::DISCOTECH;
use crate::harness::ensure_hook_library;
use crate::zk::zkctl;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `tests/chaos/<script>` with the test build's binaries and `env`, bounded by `limit_s`;
/// returns the key=value pairs of its RESULT line (the run's whole output if there is none).
fn chaos(script: &str, env: &[(&str, &str)], limit_s: u32) -> HashMap<String, String> {
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ensure_hook_library();
    for tool in ["dig", "dnsperf", "dnsmasq", "cc", "java", "tc"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is needed by the chaos scripts (apt-get install dnsutils dnsperf dnsmasq-base gcc zookeeper iproute2)"
        );
    }
    let bin = Path::new(DISCOTECH).parent().expect("target dir");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/chaos")
        .join(script);
    let out = Command::new("timeout")
        .args(["-s", "TERM", "-k", "30", &limit_s.to_string(), "bash"])
        .arg(&path)
        .env("DISCOTECH", DISCOTECH)
        .env("HOOK_LIB", bin.join("libdiscotech_hook.so"))
        .env("ZKCTL", zkctl())
        .envs(env.iter().copied())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let Some(line) = stdout.lines().rev().find(|l| l.starts_with("RESULT ")) else {
        panic!(
            "{script} printed no RESULT line ({}):\n{stdout}\n{stderr}",
            out.status
        );
    };
    eprintln!("{line}");
    let result: HashMap<String, String> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert!(
        out.status.success(),
        "{script} did not meet its goal ({}): {line}\n{stderr}",
        out.status
    );
    result
}

fn num(r: &HashMap<String, String>, key: &str) -> i64 {
    r.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RESULT has no number {key}: {r:?}"))
}

#[test]
fn daemon_killed_five_times_under_hooked_load_loses_no_connect_and_keeps_magic_addresses() {
    let r = chaos(
        "daemon-restarts.sh",
        &[
            ("RESTARTS", "5"),
            ("RATE", "200"),
            ("UP", "1"),
            ("EXEC_EVERY", "100"),
        ],
        120,
    );
    assert_eq!(num(&r, "restarts"), 5);
    assert!(num(&r, "connects") > 2_000, "load ran: {r:?}");
    assert!(num(&r, "execs") > 0, "re-exec'd clients ran: {r:?}");
    for key in [
        "failed",
        "wrong",
        "magic_changed",
        "corrupt_files",
        "panics",
    ] {
        assert_eq!(num(&r, key), 0, "{key}: {r:?}");
    }
}

#[test]
fn upstream_killed_for_fifteen_seconds_cached_names_answer_stale_without_servfail() {
    let r = chaos(
        "upstream-down.sh",
        &[
            ("DOWN", "15"),
            ("NAMES", "50"),
            ("QPS", "200"),
            ("CHECK_EVERY", "5"),
        ],
        120,
    );
    assert!(num(&r, "queries") >= 2_000, "load ran: {r:?}");
    assert_eq!(num(&r, "noerror"), num(&r, "queries"), "{r:?}");
    for key in ["servfail", "other_rcode", "lost", "check_failures"] {
        assert_eq!(num(&r, key), 0, "{key}: {r:?}");
    }
    assert!(num(&r, "checks") >= 3, "{r:?}");
    assert!(num(&r, "recovered_ms") >= 0, "{r:?}");
}

#[test]
fn hook_tortured_by_threads_forks_execs_and_signal_handlers_keeps_every_connect_right() {
    let r = chaos("hook-torture.sh", &[("TOTAL", "20000")], 180);
    assert!(num(&r, "connects") >= 20_000, "{r:?}");
    assert!(
        num(&r, "signal_ok") > 0,
        "the signal handler connected: {r:?}"
    );
    assert!(
        num(&r, "execs") > 0 && num(&r, "forks") > num(&r, "execs"),
        "{r:?}"
    );
    for key in [
        "mismatches",
        "signal_fail",
        "child_fail",
        "crashes",
        "hangs",
        "panics",
    ] {
        assert_eq!(num(&r, key), 0, "{key}: {r:?}");
    }
    assert!(r["refused"].starts_with("ECONNREFUSED/"), "{r:?}");
    assert!(r["noroute"].starts_with("ENETUNREACH/"), "{r:?}");
    assert!(r["unreach"].starts_with("EHOSTUNREACH/"), "{r:?}");
}

#[test]
fn zookeeper_session_expired_mid_changes_final_srv_answers_equal_zookeeper() {
    let r = chaos(
        "zk-expiry.sh",
        &[
            ("CHANGES", "200"),
            ("EXPIRE_AT", "100"),
            ("ZK_RESTART_AT", "160"),
            ("FREEZE", "5"),
        ],
        180,
    );
    assert_eq!(num(&r, "changes"), 200);
    assert!(
        num(&r, "expiries_logged") >= 1,
        "the session expired: {r:?}"
    );
    assert_eq!(num(&r, "zk_restarts"), 1);
    assert_eq!(num(&r, "mismatched_services"), 0, "{r:?}");
    assert!(num(&r, "converge_ms") >= 0, "{r:?}");
}

#[test]
fn zookeeper_partitioned_for_twenty_seconds_every_service_name_still_answers() {
    let r = chaos(
        "zk-unreachable.sh",
        &[
            ("PARTITION", "20"),
            ("SERVICES", "5"),
            ("QPS", "200"),
            ("CHECK_EVERY", "5"),
        ],
        240,
    );
    assert!(num(&r, "queries") >= 3_000, "load ran: {r:?}");
    assert_eq!(num(&r, "noerror"), num(&r, "queries"), "{r:?}");
    for key in ["nxdomain", "servfail", "lost", "check_failures", "panics"] {
        assert_eq!(num(&r, key), 0, "{key}: {r:?}");
    }
    assert!(
        (0..1_000).contains(&num(&r, "cold_start_ms")),
        "a restart while partitioned serves from disk at once: {r:?}"
    );
    assert!(num(&r, "recovered_ms") >= 0, "{r:?}");
}

#[test]
fn soak_short_at_two_thousand_qps_loses_nothing() {
    let r = chaos(
        "soak.sh",
        &[
            ("DURATION", "20"),
            ("QPS", "2000"),
            ("WARMUP", "5"),
            ("SAMPLE", "5"),
            ("SERVICES", "200"),
            ("CHECK_RSS", "0"),
        ],
        120,
    );
    assert!(num(&r, "queries") >= 35_000, "load ran: {r:?}");
    assert_eq!(num(&r, "lost"), 0, "{r:?}");
    assert_eq!(num(&r, "servfail"), 0, "{r:?}");
    assert_eq!(num(&r, "noerror"), num(&r, "queries"), "{r:?}");
}
