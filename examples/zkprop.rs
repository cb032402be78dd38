//! Propagation latency of the ZooKeeper source, end to end (benches/zk/run.sh runs it): from a
//! ZooKeeper `create` of an instance to the first hooked connect that lands on it, beside a plain
//! watch-and-reread client in the same run. Run under `discotech run` so connects are hooked:
//!
//! ```text
//! zkprop HOSTS SERVICE_PATH TARGET PORT_A PORT_B UPDATES
//! ```
//! Two backends listen on 127.0.0.1:PORT_A and :PORT_B and answer each connect with one byte naming
//! themselves. The service starts with A registered (as `127.0.0.1:PORT_A`). Each update registers
//! the other one, records T0, waits for a hooked connect to TARGET (the service's magic address)
//! to land on it (T1) and for the watch client to see it (Tw), then deregisters the old one and
//! waits until connects land only on the new one. A prober connects every 100 us.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use zookeeper_async::{Acl, CreateMode, ZooKeeper};

const WAIT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [hosts, path, target, a, b, updates] = args.as_slice() else {
        eprintln!("usage: zkprop HOSTS SERVICE_PATH TARGET PORT_A PORT_B UPDATES");
        return ExitCode::from(64);
    };
    let (Ok(target), Ok(a), Ok(b), Ok(updates)) = (
        target.parse::<SocketAddr>(),
        a.parse::<u16>(),
        b.parse::<u16>(),
        updates.parse::<usize>(),
    ) else {
        eprintln!("zkprop: bad arguments");
        return ExitCode::from(64);
    };
    for (id, port) in [(1u8, a), (2u8, b)] {
        let l = match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("zkprop: bind {port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(&[id]);
            }
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (probe_tx, probe_rx) = std_mpsc::channel::<(Instant, u8)>();
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let id = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                    .ok()
                    .and_then(|mut s| {
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b).ok().map(|()| b[0])
                    });
                if probe_tx.send((Instant::now(), id.unwrap_or(0))).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zkprop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(hosts, path, [a, b], updates, probe_rx));
    stop.store(true, Ordering::Relaxed);
    let _ = prober.join();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zkprop: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(hosts: &str) -> Result<ZooKeeper, String> {
    ZooKeeper::connect(hosts, Duration::from_secs(10), |_| {})
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// The baseline: re-list the service's children whenever the watch fires, report each listing.
async fn watch_client(
    zk: ZooKeeper,
    path: String,
    out: mpsc::UnboundedSender<(Instant, Vec<String>)>,
) {
    let (fired_tx, mut fired) = mpsc::unbounded_channel::<()>();
    loop {
        let tx = fired_tx.clone();
        let Ok(children) = zk
            .get_children_w(&path, move |_| {
                let _ = tx.send(());
            })
            .await
        else {
            return;
        };
        if out.send((Instant::now(), children)).is_err() {
            return;
        }
        if fired.recv().await.is_none() {
            return;
        }
    }
}

async fn run(
    hosts: &str,
    path: &str,
    ports: [u16; 2],
    updates: usize,
    probes: std_mpsc::Receiver<(Instant, u8)>,
) -> Result<(), String> {
    let writer = connect(hosts).await?;
    let (watch_tx, mut watched) = mpsc::unbounded_channel();
    tokio::spawn(watch_client(
        connect(hosts).await?,
        path.to_string(),
        watch_tx,
    ));
    let node = |i: usize| format!("{path}/127.0.0.1:{}", ports[i]);
    let mut hooked = Vec::with_capacity(updates);
    let mut watch = Vec::with_capacity(updates);
    let mut current = 0usize;
    // Start from "only A": wait until connects land on A alone.
    settle(&probes, 1).await?;
    for _ in 0..updates {
        let next = 1 - current;
        let want = u8::try_from(next + 1).unwrap_or(0);
        while watched.try_recv().is_ok() {}
        while probes.try_recv().is_ok() {}
        let t0 = Instant::now();
        writer
            .create(
                &node(next),
                Vec::new(),
                Acl::open_unsafe().clone(),
                CreateMode::Ephemeral,
            )
            .await
            .map_err(|e| format!("create: {e}"))?;
        let name = format!("127.0.0.1:{}", ports[next]);
        let (mut t_hook, mut t_watch) = (None, None);
        let deadline = Instant::now() + WAIT;
        while (t_hook.is_none() || t_watch.is_none()) && Instant::now() < deadline {
            while let Ok((t, id)) = probes.try_recv() {
                if id == want && t_hook.is_none() {
                    t_hook = Some(t);
                }
            }
            while let Ok((t, children)) = watched.try_recv() {
                if children.contains(&name) && t_watch.is_none() {
                    t_watch = Some(t);
                }
            }
            tokio::time::sleep(Duration::from_micros(50)).await;
        }
        let (Some(th), Some(tw)) = (t_hook, t_watch) else {
            return Err(format!(
                "update to {name} not seen within {WAIT:?} (hooked {t_hook:?}, watch {t_watch:?})"
            ));
        };
        hooked.push(th.saturating_duration_since(t0));
        watch.push(tw.saturating_duration_since(t0));
        writer
            .delete(&node(current), None)
            .await
            .map_err(|e| format!("delete: {e}"))?;
        settle(&probes, want).await?;
        current = next;
    }
    let _ = writer.close().await;
    report("hooked connect lands on the new backend", &mut hooked);
    report("plain watch-and-reread client sees it", &mut watch);
    Ok(())
}

/// Waits until 20 connects in a row land on backend `id`.
async fn settle(probes: &std_mpsc::Receiver<(Instant, u8)>, id: u8) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    let mut streak = 0;
    while streak < 20 {
        if Instant::now() > deadline {
            return Err(format!("connects did not settle on backend {id}"));
        }
        match probes.try_recv() {
            Ok((_, got)) if got == id => streak += 1,
            Ok(_) => streak = 0,
            Err(_) => tokio::time::sleep(Duration::from_micros(100)).await,
        }
    }
    Ok(())
}

fn report(what: &str, d: &mut [Duration]) {
    d.sort();
    let p = |q: f64| {
        d.get(((d.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |x| x.as_secs_f64() * 1000.0)
    };
    println!(
        "{what}: n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        d.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    );
}
