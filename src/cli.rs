//! The admin commands' client side: send one request to the daemon's admin socket and print the
//! reply as a readable table, or as JSON with `--json`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use discotech::config::{Config, DEFAULT_ADMIN_SOCKET};
use discotech::ops::admin::{self, BackendRow, Reply, Request, Resolution, ServiceRow, Status};
use discotech::service::LbPolicy;

const EX_REFUSED: u8 = 2;
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The daemon's admin socket (default: from --config, else /run/discotech/admin.sock).
    #[arg(long, short)]
    socket: Option<PathBuf>,
    /// Read the admin socket's path from this config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    json: bool,
}

pub fn admin(args: &AdminArgs, req: &Request) -> ExitCode {
    let socket = match (&args.socket, &args.config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => match Config::load(Some(c)) {
            Ok(c) => c.admin.socket,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EX_USAGE);
            }
        },
        (None, None) => PathBuf::from(DEFAULT_ADMIN_SOCKET),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("discotech: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reply = match runtime.block_on(admin::call(&socket, req)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "discotech: cannot reach the daemon at {}: {e}",
                socket.display()
            );
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        );
    }
    let Reply {
        ok: true,
        data: Some(data),
        ..
    } = reply
    else {
        if !args.json {
            eprintln!(
                "discotech: {}",
                reply
                    .error
                    .as_deref()
                    .unwrap_or("the daemon refused the request")
            );
        }
        return ExitCode::from(EX_REFUSED);
    };
    let degraded = match req {
        Request::Status => serde_json::from_value::<Status>(data.clone())
            .map(|s| status_degraded(&s))
            .unwrap_or(false),
        _ => false,
    };
    if !args.json {
        print!("{}", render(req, data));
    }
    if degraded {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn status_degraded(s: &Status) -> bool {
    !s.registry.held.is_empty() || s.registry.sources.iter().any(|src| src.state == "failed")
}

fn render(req: &Request, data: serde_json::Value) -> String {
    let result = match req {
        Request::Status => serde_json::from_value::<Status>(data).map(|s| status(&s)),
        Request::Services => serde_json::from_value::<Vec<ServiceRow>>(data).map(|rows| {
            table(
                &[
                    "SERVICE", "MAGIC V4", "MAGIC V6", "LB", "BACKENDS", "DRAINED",
                ],
                rows.iter()
                    .map(|r| {
                        vec![
                            r.name.to_string(),
                            r.magic_v4.to_string(),
                            r.magic_v6.map_or("-".into(), |a| a.to_string()),
                            r.lb.as_str().into(),
                            r.backends.to_string(),
                            r.drained.to_string(),
                        ]
                    })
                    .collect(),
            )
        }),
        Request::Backends { .. } => serde_json::from_value::<Vec<BackendRow>>(data).map(|rows| {
            let pools = rows.iter().any(|r| !r.pooled.is_empty());
            let mut header = vec!["BACKEND", "WEIGHT", "PRIORITY", "PORTS", "STATE"];
            if pools {
                header.push("POOLED (READY/SIZE)");
            }
            table(
                &header,
                rows.iter()
                    .map(|r| {
                        let ports = if r.ports.is_empty() {
                            "-".to_string()
                        } else {
                            r.ports
                                .iter()
                                .map(|(n, p)| format!("{n}={p}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        };
                        let state = match (&r.unhealthy, r.drained) {
                            (_, true) => "drained".to_string(),
                            (Some(why), _) => format!("unhealthy ({why})"),
                            (None, false) => "serving".to_string(),
                        };
                        let mut row = vec![
                            r.addr.to_string(),
                            r.weight.to_string(),
                            r.priority.to_string(),
                            ports,
                            state,
                        ];
                        if pools {
                            row.push(pooled(r));
                        }
                        row
                    })
                    .collect(),
            )
        }),
        Request::Resolve { .. } => {
            serde_json::from_value::<Resolution>(data).map(|r| resolution(&r))
        }
        _ => serde_json::from_value::<String>(data).map(|s| format!("{s}\n")),
    };
    result.unwrap_or_else(|e| format!("(unexpected reply: {e})\n"))
}

/// A backend's prefetch pools: `2/4` for its address in its own family, with the port when it
/// is not the default one and `(v6 sockets)` for v4-mapped connections of AF_INET6 callers.
fn pooled(r: &BackendRow) -> String {
    if r.pooled.is_empty() {
        return "-".into();
    }
    r.pooled
        .iter()
        .map(|p| {
            let mut s = format!("{}/{}", p.idle, p.target);
            if p.backend.port() != r.addr.port() {
                s = format!(":{} {s}", p.backend.port());
            }
            if p.inet6 && p.backend.is_ipv4() {
                s.push_str(" (v6 sockets)");
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn status(s: &Status) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = |t: Option<u64>| {
        t.map_or("never".to_string(), |t| {
            format!("{} ago", human(now.saturating_sub(t)))
        })
    };
    let mut out = format!(
        "discotech {}, up {}, config {}\nservices: {} (generation {})\n\n",
        s.version,
        human(s.uptime),
        s.config.as_deref().unwrap_or("(defaults)"),
        s.registry.services,
        s.registry.generation
    );
    if let Some(c) = &s.catch {
        out += &if c.on {
            format!("catch: on, {} connects caught ({})\n\n", c.caught, c.detail)
        } else {
            format!("catch: off ({})\n\n", c.detail)
        };
    }
    out += &table(
        &[
            "SOURCE",
            "STATE",
            "SERVICES",
            "LAST UPDATE",
            "LAST FAILURE",
            "ERROR",
        ],
        s.registry
            .sources
            .iter()
            .map(|src| {
                vec![
                    src.name.clone(),
                    src.state.clone(),
                    src.services.to_string(),
                    ago(src.last_update),
                    ago(src.last_failure),
                    src.error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    );
    if !s.registry.held.is_empty() {
        out += "\nHELD UPDATES (guard)\n";
        out += &table(
            &[
                "SERVICE",
                "REASON",
                "HELD FOR",
                "APPLIES IN",
                "KEPT BACKENDS",
            ],
            s.registry
                .held
                .iter()
                .map(|h| {
                    let kept: Vec<String> = h.kept.iter().map(ToString::to_string).collect();
                    vec![
                        h.service.to_string(),
                        h.reason.clone(),
                        human(h.age),
                        h.applies_in.map_or("never".into(), human),
                        kept.join(","),
                    ]
                })
                .collect(),
        );
    }
    if !s.registry.drained.is_empty() {
        out += "\nDRAINED\n";
        out += &table(
            &["SERVICE", "BACKEND"],
            s.registry
                .drained
                .iter()
                .flat_map(|(svc, addrs)| {
                    addrs
                        .iter()
                        .map(move |a| vec![svc.to_string(), a.to_string()])
                })
                .collect(),
        );
    }
    out
}

fn resolution(r: &Resolution) -> String {
    let mut out = format!(
        "service {} ({}{}), lb {}\n",
        r.service,
        r.magic_v4,
        r.magic_v6.map_or(String::new(), |v6| format!(", {v6}")),
        r.lb.as_str()
    );
    out += &match (r.client_port, &r.port_name) {
        (Some(p), Some(name)) => format!("client port {p} maps to named port {name}\n"),
        (Some(p), None) => format!("client port {p} is not mapped: each backend's default port\n"),
        (None, _) => {
            "any client port not mapped to a named port goes to each backend's default port\n"
                .to_string()
        }
    };
    if r.panic {
        out += "panic mode: too few backends are healthy, so connects go to all of them\n";
    }
    if r.candidates.is_empty() {
        out += "no backend can take a connect: it would fail with ECONNREFUSED\n";
    } else {
        out += "\n";
        // Outstanding picks and latency estimates mean something only where the policy keeps them.
        let p2c = r.lb.reports_done();
        let ewma = r.lb == LbPolicy::P2cEwma;
        let mut header = vec![
            "CONNECTS GO TO",
            "WEIGHT",
            "PRIORITY",
            "ZONE",
            "CONNECTIONS",
        ];
        if p2c {
            header.push("OUTSTANDING");
        }
        if ewma {
            header.push("LATENCY");
        }
        out += &table(
            &header,
            r.candidates
                .iter()
                .map(|c| {
                    let mut row = vec![
                        c.target.to_string(),
                        c.weight.to_string(),
                        c.priority.to_string(),
                        c.zone.clone().unwrap_or_else(|| "-".into()),
                        c.connections.to_string(),
                    ];
                    if p2c {
                        row.push(c.outstanding.to_string());
                    }
                    if ewma {
                        row.push(c.latency_us.map_or_else(
                            || "-".into(),
                            |us| format!("{:.3} ms", us as f64 / 1000.0),
                        ));
                    }
                    row
                })
                .collect(),
        );
    }
    if let Some(next) = &r.next {
        out += &format!("\nnext connect goes to {} ({})\n", next.target, next.why);
    }
    if !r.excluded.is_empty() {
        out += "\n";
        out += &table(
            &["LEFT OUT", "WHY"],
            r.excluded
                .iter()
                .map(|e| vec![e.addr.to_string(), e.reason.clone()])
                .collect(),
        );
    }
    out
}

fn human(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d", s / 86_400),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l += cell;
            } else {
                l += &format!("{cell:<w$}  ");
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_string()).collect());
    for row in rows {
        out += &line(row);
    }
    out
}
