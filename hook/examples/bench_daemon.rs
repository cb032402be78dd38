//! A stand-in daemon for benchmarks and manual tests: `discotech::connect::hook_server::serve` (the code
//! `discotech serve` runs) on a multi-threaded runtime, with one service whose magic address
//! and backends come from the command line, and its routing table beside the socket.
//!
//! `bench_daemon SOCKET MAGIC_V4 LB BACKEND...` (LB: any policy name, e.g. round-robin, p2c, least-conn)

use std::net::SocketAddr;
use std::path::PathBuf;

use discotech::connect::hook_server::{self, HookServerConfig};
use discotech::discovery::snapshot::{Service, Snapshot, shared};
use discotech::service::{Backend, ServiceSpec};
use tokio_util::sync::CancellationToken;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, magic, lb, backends @ ..] = args.as_slice() else {
        return Err("usage: bench_daemon SOCKET MAGIC_V4 LB BACKEND...".into());
    };
    let mut spec = ServiceSpec::new("web".parse()?);
    spec.lb = lb.parse()?;
    for b in backends {
        spec.backends.push(Backend::new(b.parse::<SocketAddr>()?));
    }
    let snap = Snapshot::new(
        1,
        [Service {
            spec,
            magic_v4: magic.parse()?,
            magic_v6: None,
        }],
    );
    let socket = PathBuf::from(socket);
    let _ = std::fs::remove_file(&socket);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(&socket)?;
        println!("listening");
        let cfg = HookServerConfig {
            socket: socket.clone(),
            fallback_file: Some(hook_server::fallback_path_for(&socket)),
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop2.cancel();
        });
        hook_server::serve(listener, shared(snap), cfg, stop).await
    })?;
    Ok(())
}
