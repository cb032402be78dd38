//! What one HTTP health check costs (benches/health/run.sh runs it): `N` checks, one after the
//! other, against a tiny HTTP server written here on plain sockets (no HTTP library), in the
//! daemon's kind of runtime. Prints the mean, median and 99th percentile time per check.
//!
//! ```text
//! checkcost [N]        # N defaults to 2000
//! ```
//! The server answers each connection with a fixed `200` and a small body once it has read the
//! request head, then closes; its cost is in every figure, the same for any probe.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use discotech::discovery::health::{CheckKind, check};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";

/// Accepts forever: reads up to the end of the request head, answers, closes.
async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn.write_all(ANSWER).await;
        });
    }
}

async fn measure(addr: SocketAddr, n: usize) -> Result<Vec<Duration>, String> {
    let kind = CheckKind::Http {
        path: "/healthz".into(),
        expect: (200, 399),
    };
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        check(&kind, addr, Duration::from_secs(1))
            .await
            .map_err(|e| format!("check {i}: {e}"))?;
        times.push(start.elapsed());
    }
    Ok(times)
}

fn main() -> ExitCode {
    let n = match std::env::args().nth(1).map(|a| a.parse::<usize>()) {
        None => 2000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: checkcost [N]");
            return ExitCode::from(64);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(serve(listener));
        // Warm up the runtime and the server's task before measuring.
        measure(addr, 50.min(n)).await?;
        measure(addr, n).await
    });
    let mut times = match result {
        Ok(t) => t,
        Err(e) => {
            eprintln!("checkcost: {e}");
            return ExitCode::FAILURE;
        }
    };
    let total: Duration = times.iter().sum();
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{n} HTTP checks: mean {:.1} us, median {:.1} us, p99 {:.1} us",
        total.as_secs_f64() * 1e6 / n as f64,
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
    );
    ExitCode::SUCCESS
}
