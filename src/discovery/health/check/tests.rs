//! The rise/fall counting, and the probe against small servers on 127.0.0.1 written here on plain
//! sockets: what they receive, and what each kind of answer (or silence) makes of a check.

use std::future::Future;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;

#[test]
fn rise_and_fall_need_consecutive_results() {
    let mut h = Streak::new(2, 3);
    assert!(!h.healthy(), "starts unhealthy");
    assert_eq!(h.observe(true), None);
    assert_eq!(h.observe(false), None, "a failure resets the rise streak");
    assert_eq!(h.observe(true), None);
    assert_eq!(h.observe(true), Some(true));
    assert_eq!(h.observe(true), None);
    assert_eq!(h.observe(false), None);
    assert_eq!(h.observe(false), None);
    assert_eq!(h.observe(true), None, "a pass resets the fall streak");
    assert_eq!(h.observe(false), None);
    assert_eq!(h.observe(false), None);
    assert_eq!(h.observe(false), Some(false));
    assert!(!h.healthy());
}

#[test]
fn rise_and_fall_of_one_switch_at_once() {
    let mut h = Streak::new(1, 1);
    assert_eq!(h.observe(true), Some(true));
    assert_eq!(h.observe(false), Some(false));
    let mut zero = Streak::new(0, 0);
    assert_eq!(zero.observe(true), Some(true), "0 is treated as 1");
}

const LONG: Duration = Duration::from_secs(5);

fn http(path: &str, expect: (u16, u16)) -> CheckKind {
    CheckKind::Http {
        path: path.into(),
        expect,
    }
}

/// A listener whose first connection is handed to `answer` once the request head is in (or the
/// client stopped sending); the task returns the bytes it received.
async fn server<F, Fut>(answer: F) -> (SocketAddr, JoinHandle<Vec<u8>>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        answer(conn).await;
        head
    });
    (addr, task)
}

/// A server that answers `bytes` and closes.
async fn answering(bytes: &'static [u8]) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    server(move |mut c| async move {
        c.write_all(bytes).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn a_status_in_range_passes_and_one_outside_fails_with_it() {
    let (addr, _) = answering(b"HTTP/1.1 204 No Content\r\n\r\n").await;
    check(&http("/", (200, 299)), addr, LONG).await.unwrap();

    let (addr, _) =
        answering(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy").await;
    let err = check(&http("/", (200, 399)), addr, LONG).await.unwrap_err();
    assert!(
        matches!(
            err,
            CheckError::Status {
                status: 503,
                lo: 200,
                hi: 399
            }
        ),
        "{err}"
    );
    assert_eq!(err.to_string(), "HTTP status 503 is outside 200-399");
}

#[tokio::test]
async fn headers_a_strict_parser_would_refuse_do_not_fail_the_check() {
    let (addr, _) = answering(
        b"HTTP/1.1 200 OK\r\nX Bad: 1\r\nServer : old\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    check(&http("/", (200, 200)), addr, LONG).await.unwrap();
}

#[tokio::test]
async fn the_request_is_one_get_with_host_and_connection_close() {
    let (addr, head) = server(|mut c| async move {
        // No half-close before the answer: some servers take it for a client that went away.
        let mut more = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(100), c.read(&mut more)).await;
        assert!(
            early.is_err(),
            "the probe sent more, or shut down: {early:?}"
        );
        c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
    })
    .await;
    check(&http("/health?full=1", (200, 200)), addr, LONG)
        .await
        .unwrap();
    let head = String::from_utf8(head.await.unwrap()).unwrap();
    let (line, headers) = head.split_once("\r\n").unwrap();
    assert_eq!(line, "GET /health?full=1 HTTP/1.1");
    let mut headers: Vec<&str> = headers.trim_end_matches("\r\n").split("\r\n").collect();
    headers.sort_unstable();
    let host = format!("Host: {addr}");
    assert_eq!(
        headers,
        [
            "Accept: */*",
            "Connection: close",
            host.as_str(),
            "User-Agent: discotech-check"
        ],
        "{head:?}"
    );
    assert!(head.ends_with("\r\n\r\n"), "no body: {head:?}");
}

#[tokio::test]
async fn an_unspecified_address_is_checked_on_this_host() {
    let (addr, head) = answering(b"HTTP/1.1 200 OK\r\n\r\n").await;
    let any = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
    check(&http("/", (200, 200)), any, LONG).await.unwrap();
    let head = head.await.unwrap();
    let host = format!("\r\nHost: 127.0.0.1:{}\r\n", addr.port());
    assert!(head.windows(host.len()).any(|w| w == host.as_bytes()));
}

#[tokio::test]
async fn another_protocol_fails_as_not_http_without_waiting() {
    let (addr, server) = server(|mut c| async move {
        c.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
        // Says nothing more and keeps the connection, as an SSH server would.
        tokio::time::sleep(LONG * 2).await;
    })
    .await;
    let err = check(&http("/", (200, 399)), addr, LONG).await.unwrap_err();
    assert!(matches!(err, CheckError::NotHttp(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "not an HTTP answer: invalid HTTP version parsed"
    );
    server.abort();
}

#[tokio::test]
async fn a_server_that_closes_without_answering_fails_with_a_readable_error() {
    let (addr, _) = server(|c| async move { drop(c) }).await;
    let err = check(&http("/", (200, 399)), addr, LONG).await.unwrap_err();
    assert!(matches!(err, CheckError::Http(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "HTTP request: connection closed before message completed"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_at_the_timeout() {
    let (addr, server) = server(|c| async move {
        tokio::time::sleep(LONG * 2).await;
        drop(c);
    })
    .await;
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = check(&http("/", (200, 399)), addr, timeout)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, CheckError::Timeout(t) if t == timeout),
        "{err:?}"
    );
    assert!(
        took >= timeout && took < timeout + LONG,
        "timed out after {took:?}"
    );
    server.abort();
}

/// Writes `head`, then `chunk` until the client has gone; true when it went.
async fn endless_body(mut c: TcpStream, head: &[u8], chunk: &[u8]) -> bool {
    c.write_all(head).await.unwrap();
    for _ in 0..100_000 {
        if c.write_all(chunk).await.is_err() {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn a_long_body_is_neither_read_nor_waited_for() {
    let (gone_tx, mut gone) = tokio::sync::mpsc::channel(2);
    let chunk: &'static [u8] = Box::leak(
        format!("10000\r\n{}\r\n", "x".repeat(0x10000))
            .into_bytes()
            .into_boxed_slice(),
    );
    let heads: [&'static [u8]; 2] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];
    for head in heads {
        let tx = gone_tx.clone();
        let (addr, _) = server(move |c| async move {
            let _ = tx.send(endless_body(c, head, chunk).await).await;
        })
        .await;
        // A probe that read the body would run into the timeout.
        check(&http("/", (200, 299)), addr, LONG).await.unwrap();
        let went = tokio::time::timeout(LONG, gone.recv()).await;
        assert_eq!(went, Ok(Some(true)), "the probe drops the connection");
    }
}

#[test]
fn a_path_that_is_no_request_target_is_refused() {
    let host: SocketAddr = "127.0.0.1:80".parse().unwrap();
    for path in [
        "/a b",
        "/a\r\nX-Injected: 1",
        "/a\nb",
        "http://elsewhere/",
        "*",
        "/a#fragment",
        "/caf\u{e9}",
    ] {
        let err = request(path, host).unwrap_err();
        assert!(
            matches!(err, CheckError::BadPath { .. }),
            "{path:?}: {err:?}"
        );
    }
    let ok = request("/health?x=1&y=%20", host).unwrap();
    assert_eq!(ok.uri(), "/health?x=1&y=%20");
}

#[tokio::test]
async fn a_refused_path_puts_nothing_on_the_wire() {
    let (addr, head) = server(|_| async {}).await;
    let err = check(&http("/a\r\nHost: evil", (200, 399)), addr, LONG)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "HTTP path \"/a\\r\\nHost: evil\" cannot be sent: invalid uri character"
    );
    assert!(head.await.unwrap().is_empty());
}

#[tokio::test]
async fn a_tcp_check_passes_on_connect_and_a_refused_one_names_the_address() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    check(&CheckKind::Tcp, addr, LONG).await.unwrap();
    drop(listener);
    let err = check(&CheckKind::Tcp, addr, LONG).await.unwrap_err();
    assert!(matches!(err, CheckError::Connect { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!("connect to {addr}: ")),
        "{err}"
    );
}
