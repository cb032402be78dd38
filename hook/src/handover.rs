//! Putting a connection the daemon established (prefetching) in place of the program's socket:
//! which sockets may take one, and how the program's socket options and descriptor flags are
//! carried over before `dup3` makes the program's descriptor number the connected socket.
//!
//! A socket is taken over only when nothing the program did to it would be lost: not bound (a
//! bound address or port is the program's choice of source), and none of the options that act
//! on the handshake or cannot be read back (a device binding, transparent proxying, TCP Fast
//! Open, a set MSS or window clamp, a saved SYN). Everything else the program may set before
//! connect() is copied: see [`COPIED`]. `TCP_MD5SIG` cannot be read back and is not detected.

#![deny(unsafe_code)]

use libc::c_int;

use crate::{epoll, sys};

/// Int options copied from the program's socket when they differ from the pooled one's.
const COPIED: [(c_int, c_int); 12] = [
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_MARK),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
    (libc::IPPROTO_TCP, libc::TCP_CORK),
];

/// The MSS an unconnected socket reports when the program did not set one (TCP_MSS_DEFAULT).
const DEFAULT_MSS: c_int = 536;

/// Whether `fd` may receive a pooled connection: unbound, and without an option that acts on
/// the handshake or cannot be copied.
pub fn can_take_over(fd: c_int) -> bool {
    if sys::is_bound(fd) != Some(false) {
        return false;
    }
    let int = |level, name| sys::getsockopt_int(fd, level, name);
    let mut dev = [0u8; libc::IFNAMSIZ];
    let bound_to_device =
        sys::getsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, &mut dev)
            .is_none_or(|n| n > 0 && dev.first() != Some(&0));
    !(bound_to_device
        || int(libc::SOL_IP, libc::IP_TRANSPARENT).unwrap_or(0) != 0
        || int(libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT).unwrap_or(0) != 0
        || int(libc::IPPROTO_TCP, libc::TCP_SAVE_SYN).unwrap_or(0) != 0
        || int(libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP).unwrap_or(0) != 0
        || int(libc::IPPROTO_TCP, libc::TCP_MAXSEG).is_some_and(|m| m != DEFAULT_MSS))
}

/// Makes `fd` the connected socket `pooled` (which is closed either way), with the program's
/// options, blocking mode and close-on-exec. `domain` is the program's socket family;
/// `defaults` a new socket's `SO_RCVBUF` and `SO_SNDBUF` (0: unknown, not copied). Returns
/// whether the program's socket was non-blocking. On an error `fd` is untouched.
pub fn take_over(
    fd: c_int,
    pooled: sys::Fd,
    domain: c_int,
    defaults: (u32, u32),
) -> Result<bool, c_int> {
    let p = pooled.raw();
    if sys::getsockopt_int(p, libc::SOL_SOCKET, libc::SO_DOMAIN) != Some(domain)
        || sys::getsockopt_int(p, libc::SOL_SOCKET, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
    {
        return Err(libc::EAFNOSUPPORT);
    }
    // The traffic class first: setting it also sets SO_PRIORITY, which is then copied over it.
    copy_int(fd, p, libc::IPPROTO_IP, libc::IP_TOS)?;
    if domain == libc::AF_INET6 {
        copy_int(fd, p, libc::IPPROTO_IPV6, libc::IPV6_TCLASS)?;
    }
    for (level, name) in COPIED {
        copy_int(fd, p, level, name)?;
    }
    for (name, default) in [(libc::SO_RCVBUF, defaults.0), (libc::SO_SNDBUF, defaults.1)] {
        let theirs = sys::getsockopt_int(fd, libc::SOL_SOCKET, name).ok_or(libc::EINVAL)?;
        if default != 0 && u32::try_from(theirs).ok() != Some(default) {
            // The kernel doubles what is set (for its bookkeeping) and reports the double.
            sys::setsockopt_int(p, libc::SOL_SOCKET, name, theirs / 2)?;
        }
    }
    copy_bytes::<{ core::mem::size_of::<libc::linger>() }>(
        fd,
        p,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
    )?;
    copy_bytes::<16>(fd, p, libc::IPPROTO_TCP, libc::TCP_CONGESTION)?;
    let (status, descriptor) = sys::fd_flags(fd).ok_or(libc::EBADF)?;
    let (pooled_status, _) = sys::fd_flags(p).ok_or(libc::EBADF)?;
    let nonblocking = status & libc::O_NONBLOCK != 0;
    let wanted = (pooled_status & !libc::O_NONBLOCK) | (status & libc::O_NONBLOCK);
    if wanted != pooled_status {
        sys::set_status_flags(p, wanted)?;
    }
    let cloexec = if descriptor & libc::FD_CLOEXEC != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    // Registrations with epoll belong to the file dup3 replaces: find them first, make them
    // again after. A socket whose registrations cannot be known is not replaced.
    let ino = sys::file_id(fd).ok_or(libc::EBADF)?.1;
    let regs = epoll::registrations(fd, ino).map_err(|()| libc::EMFILE)?;
    sys::dup3(p, fd, cloexec)?;
    for r in regs.iter() {
        // Cannot fail for a live epoll instance and a new file; nothing to undo if it did.
        let _ = sys::epoll_add(r.epfd, fd, r.events, r.data);
    }
    Ok(nonblocking)
}

fn copy_int(from: c_int, to: c_int, level: c_int, name: c_int) -> Result<(), c_int> {
    let Some(theirs) = sys::getsockopt_int(from, level, name) else {
        return Ok(()); // an option this kernel does not have: nothing to copy
    };
    if sys::getsockopt_int(to, level, name) != Some(theirs) {
        sys::setsockopt_int(to, level, name, theirs)?;
    }
    Ok(())
}

fn copy_bytes<const N: usize>(
    from: c_int,
    to: c_int,
    level: c_int,
    name: c_int,
) -> Result<(), c_int> {
    let (mut theirs, mut ours) = ([0u8; N], [0u8; N]);
    let Some(n) = sys::getsockopt_bytes(from, level, name, &mut theirs) else {
        return Ok(());
    };
    let m = sys::getsockopt_bytes(to, level, name, &mut ours);
    let (Some(t), o) = (theirs.get(..n), m.and_then(|m| ours.get(..m))) else {
        return Ok(());
    };
    if o != Some(t) {
        sys::setsockopt_bytes(to, level, name, t)?;
    }
    Ok(())
}
