//! Observing a running daemon: Prometheus metrics scraped and parsed, and the status page
//! rendered by headless Chromium (with a screenshot the test keeps).

use std::time::Duration;

use crate::harness::{Daemon, Netns, eventually};

fn start(ns: &Netns) -> Daemon<'_> {
    let mut d = Daemon::configure(
        ns,
        "127.0.0.53:53",
        "upstreams = []\n[metrics]\nlisten = [\"127.0.0.1:9253\"]",
    );
    d.zone("web.toml", "[services.web]\nbackends = [\"127.0.0.2:8080\", { addr = \"127.0.0.3:8081\", weight = 2 }]\n");
    d.start();
    d
}

/// The value of one sample line `name{labels} value` in a Prometheus text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

fn scrape(ns: &Netns) -> String {
    ns.ok(
        "curl",
        &["-sf", "--max-time", "5", "http://127.0.0.1:9253/metrics"],
    )
}

#[test]
fn metrics_count_queries_by_type_and_answer_and_describe_sources() {
    let ns = Netns::new();
    let d = start(&ns);
    let a = r#"discotech_dns_queries_total{qtype="A",rcode="NOERROR",answer="local"}"#;
    let nx = r#"discotech_dns_queries_total{qtype="A",rcode="NXDOMAIN",answer="local"}"#;
    let before = sample(&scrape(&ns), a).unwrap_or(0.0);
    for _ in 0..5 {
        d.short("web.disco", "A");
    }
    d.short("nope.disco", "A");
    let text = scrape(&ns);
    assert_eq!(sample(&text, a), Some(before + 5.0), "{text}");
    assert_eq!(sample(&text, nx), Some(1.0));
    assert_eq!(sample(&text, "discotech_services"), Some(1.0));
    assert!(
        sample(&text, "discotech_dns_query_duration_seconds_count").is_some_and(|n| n >= 2.0),
        "{text}"
    );
    let source = text
        .lines()
        .find(|l| l.starts_with("discotech_source_up{"))
        .expect("a source_up series");
    assert!(source.ends_with(" 1"), "{source}");
    assert!(
        text.contains("# HELP discotech_guard_held_updates"),
        "documented families"
    );
    // Every sample line parses: name, optional labels, a number.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(value.parse::<f64>().is_ok(), "unparsable sample: {line}");
    }
}

#[test]
fn status_page_renders_in_headless_chromium() {
    let ns = Netns::new();
    let d = start(&ns);
    let _ = d.short("nope.disco", "A");
    d.zone("web.toml", "[services.web]\nbackends = []\n");
    let held = eventually(Duration::from_secs(3), || {
        d.log_text()
            .contains("would leave no backends")
            .then_some(())
    });
    assert!(held.is_some());

    let profile = ns.path("chromium-profile");
    let shot = ns.path("status-page.png");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,900",
    ];
    let user_dir = format!("--user-data-dir={}", profile.display());
    let screenshot = format!("--screenshot={}", shot.display());
    let mut args: Vec<&str> = common.to_vec();
    args.extend([user_dir.as_str(), "--dump-dom", "http://127.0.0.1:9253/"]);
    let dom = ns.ok("chromium", &args);
    assert!(dom.contains("<h1>discotech"), "{dom}");
    assert!(
        dom.contains("<b>web</b>") && dom.contains("127.0.0.2:8080") && dom.contains("w2 p0"),
        "services and backends: {dom}"
    );
    assert!(
        dom.contains("degraded") && dom.contains("update would leave no backends"),
        "the held update shows: {dom}"
    );
    assert!(dom.contains("file:"), "the source row: {dom}");

    let mut args: Vec<&str> = common.to_vec();
    args.extend([
        user_dir.as_str(),
        screenshot.as_str(),
        "http://127.0.0.1:9253/",
    ]);
    ns.ok("chromium", &args);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot, {} bytes",
        png.len()
    );
    // Keep it where a person can look at it after the run.
    let keep = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&keep, &png).expect("keep screenshot");
}

#[test]
fn the_http_listener_answers_json_and_rejects_the_rest() {
    let ns = Netns::new();
    let _d = start(&ns);
    let json = ns.ok(
        "curl",
        &[
            "-sf",
            "--max-time",
            "5",
            "http://127.0.0.1:9253/status.json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["services"], 1);
    let code = ns.ok(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "http://127.0.0.1:9253/nope",
        ],
    );
    assert_eq!(code, "404");
    let code = ns.ok(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "--max-time",
            "5",
            "http://127.0.0.1:9253/metrics",
        ],
    );
    assert_eq!(code, "405");
    // HEAD: the headers of a GET, no body.
    let head = ns.ok(
        "curl",
        &["-sI", "--max-time", "5", "http://127.0.0.1:9253/metrics"],
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length:"),
        "{head}"
    );
    // Keep-alive: a second request on the same connection (no new connect).
    let connects = ns.ok(
        "curl",
        &[
            "-s",
            "-w",
            "%{num_connects}\n",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "http://127.0.0.1:9253/status.json",
            "-o",
            "/dev/null",
            "http://127.0.0.1:9253/metrics",
        ],
    );
    assert_eq!(
        connects.lines().collect::<Vec<_>>(),
        ["1", "0"],
        "{connects}"
    );
    // A name this host is not (a page rebinding its own name to 127.0.0.1): not answered.
    let code = ns.ok(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: rebind.attacker.test",
            "--max-time",
            "5",
            "http://127.0.0.1:9253/status.json",
        ],
    );
    assert_eq!(code, "421");
}

#[test]
fn repeated_forwarded_questions_are_counted_and_their_ttls_keep_counting_down() {
    let ns = Netns::new();
    crate::harness::dnsmasq(
        &ns,
        "127.0.0.1",
        5300,
        &[("www.example.test", "192.0.2.80")],
        60,
    );
    let mut d = Daemon::configure(
        &ns,
        "127.0.0.53:53",
        "upstreams = [\"127.0.0.1:5300\"]\n[metrics]\nlisten = [\"127.0.0.1:9253\"]",
    );
    d.start();
    // 40 questions in one dig run, back to back: one goes upstream, the rest are repeats.
    let batch = ns.path("batch.txt");
    std::fs::write(&batch, "www.example.test A +noall +answer\n".repeat(40)).expect("batch");
    let out = d.dig(&["-f", batch.to_str().expect("utf-8")]);
    let ttls: Vec<u32> = out
        .lines()
        .filter(|l| l.contains("\tIN\tA\t192.0.2.80"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(ttls.len(), 40, "{out}");
    assert!(ttls.iter().all(|&t| (58..=60).contains(&t)), "{ttls:?}");
    let text = scrape(&ns);
    let forwarded = r#"discotech_dns_queries_total{qtype="A",rcode="NOERROR",answer="forwarded"}"#;
    assert_eq!(sample(&text, forwarded), Some(40.0), "{text}");
    let hits = r#"discotech_forward_cache_total{result="hit"}"#;
    let misses = r#"discotech_forward_cache_total{result="miss"}"#;
    assert_eq!(sample(&text, misses), Some(1.0), "{text}");
    assert_eq!(sample(&text, hits), Some(39.0), "{text}");

    // Repeats are answered from encoded bytes for at most a second: the TTL a client sees keeps
    // counting down while the questions keep coming.
    let first = ttls[0];
    let later = eventually(Duration::from_secs(6), || {
        let line = d.dig(&["www.example.test", "A", "+noall", "+answer"]);
        let ttl: u32 = line.split_whitespace().nth(1)?.parse().ok()?;
        (ttl + 3 <= first).then_some(ttl)
    });
    assert!(later.is_some(), "the TTL stayed at {first} or near it");
}
