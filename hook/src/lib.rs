//! The connect hook: an LD_PRELOAD library that interposes connect() and nothing else. TCP
//! connects to a magic address are routed to a backend picked on the daemon's shared routing
//! table (see `route.rs`); everything else goes straight to libc's connect after an address
//! comparison.
//!
//! This file holds the FFI entry points (the interposed `connect` and the load-time
//! constructor); `sys.rs` holds the system calls. They are the only modules with `unsafe`.
//! Nothing here allocates, locks, panics or keeps thread-locals on the connect path, and errno
//! is left as a plain connect would leave it.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod choose;
mod config;
mod epoll;
mod handover;
mod maps;
mod os;
mod route;
mod slots;
mod sys;

use std::sync::OnceLock;

use libc::{c_int, sockaddr, socklen_t};

use crate::config::Config;
use crate::route::{State, Verdict};

/// Set once by the constructor; read with one atomic load per connect.
static CONFIG: OnceLock<Config> = OnceLock::new();
static STATE: State = State::new();

redhook::hook! {
    unsafe fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int => discotech_connect {
        let real: sys::ConnectFn = redhook::real!(connect);
        // SAFETY: connect()'s own contract: addr is null or points to len readable bytes.
        let dest = unsafe { sys::read_dest(addr, len) };
        match hooked(real, fd, dest) {
            Some(rc) => rc,
            // SAFETY: the caller's arguments, passed on unchanged to libc's connect.
            None => unsafe { real(fd, addr, len) },
        }
    }
}

/// The hook's answer for a connect, or None to pass it through untouched.
fn hooked(
    real: sys::ConnectFn,
    fd: c_int,
    dest: Option<(core::net::SocketAddr, c_int)>,
) -> Option<c_int> {
    let (dest, family) = dest?;
    let cfg = CONFIG.get()?;
    if !cfg.is_magic(dest.ip()) {
        return None;
    }
    let saved = sys::errno();
    match route::on_connect(&os::RealOs { real, cfg, family }, &STATE, fd, dest) {
        Verdict::PassThrough => {
            sys::set_errno(saved);
            None
        }
        Verdict::Return(Ok(())) => {
            sys::set_errno(saved);
            Some(0)
        }
        Verdict::Return(Err(e)) => {
            sys::set_errno(e);
            Some(-1)
        }
    }
}

/// Load time: resolve libc's connect now (so the first connect, perhaps in a signal handler,
/// does not take redhook's one-time lock), learn the configuration and map the routing table
/// (so the first connect makes no system call of its own either).
extern "C" fn init() {
    let saved = sys::errno();
    let real: sys::ConnectFn = redhook::real!(connect);
    let mut cfg = sys::with_env(c"DISCOTECH_SOCKET", Config::new);
    sys::with_env(c"DISCOTECH_DAEMON_UID", |uid| cfg.set_daemon_uid(uid));
    sys::with_env(c"DISCOTECH_HOOK_TIMEOUT_MS", |ms| cfg.set_timeout(ms));
    sys::with_env(c"DISCOTECH_HASH_KEY", |key| cfg.set_hash_key(key));
    cfg.secure = sys::secure();
    cfg.euid = sys::uids().1;
    let ranges = maps::table(&cfg)
        .and_then(|t| t.read(|area| Some((Some(area.magic_v4()?), area.magic_v6()))));
    sys::with_env(c"DISCOTECH_MAGIC_V4", |v4| {
        sys::with_env(c"DISCOTECH_MAGIC_V6", |v6| cfg.set_ranges(v4, v6, ranges))
    });
    let _ = CONFIG.set(cfg);
    if let Some(cfg) = CONFIG.get()
        && let Some(t) = maps::table(cfg)
        && let Some(epoch) = t.read(|area| Some(area.live_epoch()))
    {
        let _ = maps::live(real, cfg, epoch);
    }
    sys::set_errno(saved);
}

// SAFETY: a plain `extern "C" fn()` in .init_array, which the loader calls once when the library
// is loaded, before the program's main; `init` cannot panic (the crate's lints) and only reads.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;
