//! A tiny ZooKeeper command line for tests and benchmarks, so they need not start a JVM per write
//! (zkCli.sh takes seconds). Each argument after the hosts is one command, run in order:
//!
//! ```text
//! zkctl [--auth user:pass] HOSTS "wait" "create /a/b DATA" "set /a/b DATA" "delete /a" "ls /a" "get /a/b"
//! ```
//! `create` makes missing parents and replaces the data of an existing node; `delete` is
//! recursive and ignores a missing node; `wait` retries until the server answers (30 s at most).
//! With `--auth`, created nodes are readable and writable only by that digest user.
//! `fill /root S B` creates S services (`svc-0`...) of B serverset members each, many requests in
//! flight at once, for scale measurements.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use zookeeper_async::{Acl, CreateMode, ZkError, ZooKeeper};

const OP_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let auth = match args.iter().position(|a| a == "--auth") {
        Some(i) if i + 1 < args.len() => {
            let v = args.remove(i + 1);
            args.remove(i);
            Some(v)
        }
        _ => None,
    };
    if args.is_empty() {
        eprintln!("usage: zkctl [--auth user:pass] HOSTS COMMAND...");
        return ExitCode::from(64);
    }
    let hosts = args.remove(0);
    match run(&hosts, auth, &args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zkctl: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(hosts: &str, auth: Option<&str>) -> Result<ZooKeeper, String> {
    let zk = tokio::time::timeout(
        OP_TIMEOUT,
        ZooKeeper::connect_with_retry_time(
            hosts,
            Duration::from_secs(10),
            |_| {},
            Duration::from_millis(100),
        ),
    )
    .await
    .map_err(|_| format!("cannot connect to {hosts}"))?
    .map_err(|e| format!("connect {hosts}: {e}"))?;
    if let Some(a) = auth {
        op(zk.add_auth("digest", a.as_bytes().to_vec()))
            .await
            .map_err(|e| format!("auth: {e}"))?;
    }
    Ok(zk)
}

async fn op<T>(f: impl std::future::Future<Output = Result<T, ZkError>>) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn run(hosts: &str, auth: Option<String>, commands: &[String]) -> Result<(), String> {
    if commands.first().is_some_and(|c| c == "wait") {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let zk = connect(hosts, None).await?;
                let r = op(zk.exists("/", false)).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), zk.close()).await;
                r
            };
            match attempt.await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("server did not answer: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let commands: Vec<&String> = commands.iter().filter(|c| *c != "wait").collect();
    if commands.is_empty() {
        return Ok(());
    }
    let zk = connect(hosts, auth.as_deref()).await?;
    let acl = if auth.is_some() {
        Acl::creator_all().clone()
    } else {
        Acl::open_unsafe().clone()
    };
    for command in commands {
        let mut parts = command.splitn(3, ' ');
        let (verb, path, data) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let what = |e: String| format!("{command}: {e}");
        match verb {
            "create" => {
                let mut prefix = String::new();
                let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
                for (i, seg) in segments.iter().enumerate() {
                    prefix.push('/');
                    prefix.push_str(seg);
                    let body = if i + 1 == segments.len() {
                        data.as_bytes().to_vec()
                    } else {
                        Vec::new()
                    };
                    match op(zk.create(&prefix, body.clone(), acl.clone(), CreateMode::Persistent))
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if e == ZkError::NodeExists.to_string() => {
                            if i + 1 == segments.len() {
                                op(zk.set_data(&prefix, body, None)).await.map_err(what)?;
                            }
                        }
                        Err(e) => return Err(what(e)),
                    }
                }
            }
            "set" => {
                op(zk.set_data(path, data.as_bytes().to_vec(), None))
                    .await
                    .map_err(what)?;
            }
            "delete" => delete(&zk, path).await.map_err(what)?,
            "ls" => {
                let mut children = op(zk.get_children(path, false)).await.map_err(what)?;
                children.sort();
                for c in children {
                    println!("{c}");
                }
            }
            "get" => {
                let (bytes, _) = op(zk.get_data(path, false)).await.map_err(what)?;
                println!("{}", String::from_utf8_lossy(&bytes));
            }
            "fill" => fill(&zk, path, data, &acl).await.map_err(what)?,
            other => return Err(format!("unknown command {other:?}")),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), zk.close()).await;
    Ok(())
}

/// Depth first, so a service node goes with its instances.
async fn delete(zk: &ZooKeeper, path: &str) -> Result<(), String> {
    let mut stack = vec![(path.to_string(), false)];
    while let Some((p, expanded)) = stack.pop() {
        if expanded {
            match op(zk.delete(&p, None)).await {
                Ok(()) => {}
                Err(e) if e == ZkError::NoNode.to_string() => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        stack.push((p.clone(), true));
        match op(zk.get_children(&p, false)).await {
            Ok(children) => {
                for c in children {
                    let child = if p == "/" {
                        format!("/{c}")
                    } else {
                        format!("{p}/{c}")
                    };
                    stack.push((child, false));
                }
            }
            Err(e) if e == ZkError::NoNode.to_string() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates `spec` = "S B": S services of B serverset members under `root`, pipelined.
async fn fill(zk: &ZooKeeper, root: &str, spec: &str, acl: &[Acl]) -> Result<(), String> {
    use futures::stream::{self, StreamExt};
    let mut words = spec.split_whitespace().map(str::parse::<usize>);
    let (Some(Ok(services)), Some(Ok(backends))) = (words.next(), words.next()) else {
        return Err("fill needs SERVICES BACKENDS".into());
    };
    let ignore_exists = |r: Result<String, String>| match r {
        Err(e) if e != ZkError::NodeExists.to_string() => Err(e),
        _ => Ok(()),
    };
    ignore_exists(op(zk.create(root, Vec::new(), acl.to_vec(), CreateMode::Persistent)).await)?;
    let svc_paths: Vec<String> = (0..services).map(|s| format!("{root}/svc-{s}")).collect();
    let results: Vec<Result<(), String>> = stream::iter(svc_paths.iter())
        .map(|p| async move {
            ignore_exists(op(zk.create(p, Vec::new(), acl.to_vec(), CreateMode::Persistent)).await)
        })
        .buffer_unordered(256)
        .collect()
        .await;
    results.into_iter().collect::<Result<(), String>>()?;
    let members = (0..services).flat_map(|s| (0..backends).map(move |b| (s, b)));
    let results: Vec<Result<(), String>> = stream::iter(members)
        .map(|(s, b)| async move {
            let host = format!("10.{}.{}.{}", s / 256 % 256, s % 256, b % 250 + 1);
            let data = format!(r#"{{"serviceEndpoint":{{"host":"{host}","port":{}}},"additionalEndpoints":{{}},"status":"ALIVE"}}"#, 8000 + b);
            let path = format!("{root}/svc-{s}/member_{b:010}");
            ignore_exists(op(zk.create(&path, data.into_bytes(), acl.to_vec(), CreateMode::Persistent)).await)
        })
        .buffer_unordered(256)
        .collect()
        .await;
    results.into_iter().collect::<Result<(), String>>()
}
