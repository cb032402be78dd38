//! Every system call the hook makes, as small safe wrappers over libc. One of the two modules in
//! this crate with `unsafe` (the other is `lib.rs`, the FFI entry points). Each wrapper only
//! passes pointers to locals it owns, is async-signal-safe, and allocates nothing.
//! Errors come back as the raw errno value.

use core::ffi::CStr;
use core::mem::{MaybeUninit, size_of};
use core::net::{IpAddr, SocketAddr};

use libc::{c_int, c_void, sockaddr, socklen_t};

/// The libc connect the hook wraps (resolved with dlsym(RTLD_NEXT) by redhook).
pub type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

/// The thread's errno.
pub fn errno() -> c_int {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(value: c_int) {
    // SAFETY: as above; writing errno is what libc functions do.
    unsafe { *libc::__errno_location() = value }
}

/// A socket address in the kernel's layout, on the stack.
#[derive(Clone, Copy)]
pub struct RawAddr {
    storage: libc::sockaddr_storage,
    len: socklen_t,
}

impl RawAddr {
    /// `addr` in the layout of a socket of `family` (AF_INET or AF_INET6). An IPv4 address on an
    /// AF_INET6 socket becomes v4-mapped; an IPv6 address cannot go on an AF_INET socket (None).
    pub fn for_family(addr: SocketAddr, family: c_int) -> Option<Self> {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
        let len = match (family, addr.ip()) {
            (libc::AF_INET, IpAddr::V4(v4)) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: addr.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { core::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
                size_of::<libc::sockaddr_in>()
            }
            (libc::AF_INET6, ip) => {
                let v6 = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: addr.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { core::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
                size_of::<libc::sockaddr_in6>()
            }
            _ => return None,
        };
        Some(Self {
            storage,
            len: len as socklen_t,
        })
    }

    fn as_ptr(&self) -> *const sockaddr {
        (&raw const self.storage).cast()
    }
}

/// Reads the destination of a connect() call: `(address, sockaddr family)`, or None for
/// anything that is not a complete AF_INET/AF_INET6 address.
///
/// # Safety
/// `addr` must be null or point to at least `len` readable bytes, as connect() requires.
pub unsafe fn read_dest(addr: *const sockaddr, len: socklen_t) -> Option<(SocketAddr, c_int)> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: addr is non-null with at least sa_family_t readable bytes (caller's contract);
    // read_unaligned because callers need not align their sockaddr buffers.
    let family =
        c_int::from(unsafe { core::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()) });
    match family {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: len covers a whole sockaddr_in.
            let sin = unsafe { core::ptr::read_unaligned(addr.cast::<libc::sockaddr_in>()) };
            let ip = core::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some((
                SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)),
                family,
            ))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: len covers a whole sockaddr_in6.
            let sin6 = unsafe { core::ptr::read_unaligned(addr.cast::<libc::sockaddr_in6>()) };
            let ip = core::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some((
                SocketAddr::new(IpAddr::V6(ip), u16::from_be(sin6.sin6_port)),
                family,
            ))
        }
        _ => None,
    }
}

/// Calls the real connect with `to`.
pub fn connect(real: ConnectFn, fd: c_int, to: &RawAddr) -> Result<(), c_int> {
    // SAFETY: `real` is libc's connect; `to` points to `to.len` initialized bytes.
    let rc = unsafe { real(fd, to.as_ptr(), to.len) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// What the hook needs to know about the caller's socket before it asks anyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockInfo {
    pub stream: bool,
    pub domain: c_int,
}

pub fn getsockopt_int(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: value and len are live locals of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&raw mut value).cast::<c_void>(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Sets an int socket option; Err is the errno.
pub fn setsockopt_int(fd: c_int, level: c_int, name: c_int, value: c_int) -> Result<(), c_int> {
    // SAFETY: value is a live local of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast::<c_void>(),
            size_of::<c_int>() as socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// Reads a socket option of at most `buf.len()` bytes into `buf`; returns its length.
pub fn getsockopt_bytes(fd: c_int, level: c_int, name: c_int, buf: &mut [u8]) -> Option<usize> {
    let mut len = socklen_t::try_from(buf.len()).ok()?;
    // SAFETY: buf is a live, writable slice of len bytes; the kernel writes at most len.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &raw mut len) };
    (rc == 0).then_some(len as usize)
}

/// Sets a socket option from bytes; Err is the errno.
pub fn setsockopt_bytes(fd: c_int, level: c_int, name: c_int, value: &[u8]) -> Result<(), c_int> {
    let len = socklen_t::try_from(value.len()).map_err(|_| libc::EINVAL)?;
    // SAFETY: value is a live slice of len bytes.
    let rc = unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), len) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// `fcntl(fd, F_GETFL)` and `fcntl(fd, F_GETFD)`: the file status and descriptor flags.
pub fn fd_flags(fd: c_int) -> Option<(c_int, c_int)> {
    // SAFETY: F_GETFL and F_GETFD take no argument and touch no memory of ours.
    let (fl, fdf) = unsafe {
        (
            libc::fcntl(fd, libc::F_GETFL),
            libc::fcntl(fd, libc::F_GETFD),
        )
    };
    (fl >= 0 && fdf >= 0).then_some((fl, fdf))
}

/// `fcntl(fd, F_SETFL, flags)`.
pub fn set_status_flags(fd: c_int, flags: c_int) -> Result<(), c_int> {
    // SAFETY: F_SETFL takes an int argument and touches no memory of ours.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// `dup3(from, to, flags)`: `to` becomes `from`'s socket, atomically closing what it was.
pub fn dup3(from: c_int, to: c_int, flags: c_int) -> Result<(), c_int> {
    // SAFETY: dup3 touches no memory of ours; both numbers are the caller's to give.
    let rc = unsafe { libc::dup3(from, to, flags) };
    if rc == to { Ok(()) } else { Err(errno()) }
}

/// Whether `fd` has a local address: a bound port or a specific address (the program called
/// bind, or the socket is connected).
pub fn is_bound(fd: c_int) -> Option<bool> {
    let local = local_addr(fd)?;
    Some(local.port() != 0 || !local.ip().is_unspecified())
}

/// Which file `fd` is: its device and inode, or None if it is not open.
pub fn file_id(fd: c_int) -> Option<(u64, u64)> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the stat buffer we own.
    let rc = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    // SAFETY: fstat returned 0, so it initialized the buffer.
    (rc == 0).then(|| {
        let st = unsafe { st.assume_init() };
        (st.st_dev, st.st_ino)
    })
}

/// The caller's socket: its type (one system call); `domain` is taken as given.
pub fn sock_info(fd: c_int, domain: c_int) -> Option<SockInfo> {
    let ty = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?;
    Some(SockInfo {
        stream: ty == libc::SOCK_STREAM,
        domain,
    })
}

pub fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// (real uid, effective uid)
pub fn uids() -> (u32, u32) {
    // SAFETY: getuid and geteuid have no preconditions.
    unsafe { (libc::getuid(), libc::geteuid()) }
}

/// The monotonic clock.
fn monotonic() -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a live local; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts
}

/// Milliseconds on the monotonic clock.
pub fn now_ms() -> i64 {
    let ts = monotonic();
    ts.tv_sec
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec / 1_000_000)
}

/// Microseconds on the monotonic clock.
pub fn now_us() -> u64 {
    let ts = monotonic();
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1000)
}

/// The local port `fd` is bound to (after a connect, the one the kernel chose), if any.
pub fn local_port(fd: c_int) -> Option<u16> {
    local_addr(fd).map(|a| a.port()).filter(|&p| p != 0)
}

/// The local address of an AF_INET or AF_INET6 socket (`getsockname`).
fn local_addr(fd: c_int) -> Option<SocketAddr> {
    let mut ss = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into the storage we own and updates `len`.
    let rc =
        unsafe { libc::getsockname(fd, ss.as_mut_ptr().cast::<libc::sockaddr>(), &raw mut len) };
    if rc != 0 {
        return None;
    }
    // SAFETY: zeroed storage is a valid sockaddr_storage; getsockname filled a prefix of it.
    let ss = unsafe { ss.assume_init() };
    match c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { *(&raw const ss).cast::<libc::sockaddr_in>() };
            let ip = core::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { *(&raw const ss).cast::<libc::sockaddr_in6>() };
            let ip = core::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

/// An owned file descriptor, closed on drop.
#[derive(Debug)]
pub struct Fd(c_int);

impl Fd {
    pub fn raw(&self) -> c_int {
        self.0
    }

    /// Gives up ownership without closing.
    pub fn into_raw(self) -> c_int {
        let fd = self.0;
        core::mem::forget(self);
        fd
    }
}

impl std::os::fd::AsFd for Fd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the Fd owns an open descriptor until it is dropped, which outlives the borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) }
    }
}

/// Takes ownership of a descriptor the kernel just gave us (received with SCM_RIGHTS).
pub fn adopt(raw: c_int) -> Fd {
    Fd(raw)
}

/// Opens a file read-only and close-on-exec, refusing a symbolic link.
pub fn open_nofollow(path: &CStr) -> Option<Fd> {
    // SAFETY: path is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    (fd >= 0).then_some(Fd(fd))
}

/// Opens a directory for reading its entries (`/proc/self/fd`).
pub fn open_dir(path: &CStr) -> Option<Fd> {
    // SAFETY: path is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_DIRECTORY,
        )
    };
    (fd >= 0).then_some(Fd(fd))
}

/// Reads directory entries into `buf` (`getdents64`); Ok(0) at the end.
pub fn getdents(dir: &Fd, buf: &mut [u8]) -> Result<usize, c_int> {
    // SAFETY: buf is a live, writable slice of buf.len() bytes; the kernel writes at most that.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.0, buf.as_mut_ptr(), buf.len()) };
    if n < 0 { Err(errno()) } else { Ok(n as usize) }
}

/// The target of the link `name` in the directory `dir`, into `buf`; its length.
pub fn readlinkat(dir: &Fd, name: &CStr, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: name is NUL-terminated; buf is a live, writable slice of buf.len() bytes.
    let n = unsafe { libc::readlinkat(dir.0, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).ok()
}

/// Opens `name` in the directory `dir` read-only.
pub fn openat(dir: &Fd, name: &CStr) -> Option<Fd> {
    // SAFETY: name is NUL-terminated.
    let fd = unsafe { libc::openat(dir.0, name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    (fd >= 0).then_some(Fd(fd))
}

/// One read; Ok(0) at the end.
pub fn read(fd: &Fd, buf: &mut [u8]) -> Result<usize, c_int> {
    // SAFETY: buf is a live, writable slice of buf.len() bytes.
    let n = unsafe { libc::read(fd.0, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 { Err(errno()) } else { Ok(n as usize) }
}

/// A new epoll instance (tests).
#[cfg(test)]
pub fn epoll_create() -> Option<Fd> {
    // SAFETY: epoll_create1 takes no pointers.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    (fd >= 0).then_some(Fd(fd))
}

/// `epoll_ctl(epfd, EPOLL_CTL_ADD, fd, {events, data})`.
pub fn epoll_add(epfd: c_int, fd: c_int, events: u32, data: u64) -> Result<(), c_int> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: ev is a live local epoll_event.
    let rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &raw mut ev) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// (owner uid, mode, size) of an open file.
pub fn file_stat(fd: &Fd) -> Option<FileStat> {
    use std::os::fd::AsFd;
    let st = discotech_shm::stat(fd.as_fd()).ok()?;
    Some(FileStat {
        uid: st.st_uid,
        mode: st.st_mode,
        size: st.st_size as u64,
        id: (st.st_dev, st.st_ino),
    })
}

/// What the hook checks of a file it maps.
#[derive(Clone, Copy, Debug)]
pub struct FileStat {
    pub uid: u32,
    pub mode: u32,
    pub size: u64,
    /// Device and inode: which file it is.
    pub id: (u64, u64),
}

/// Nanoseconds on the monotonic clock (the vDSO: no system call).
pub fn now_ns() -> u64 {
    let ts = monotonic();
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Closes a descriptor this crate opened and kept as a raw number.
pub fn close(fd: c_int) {
    drop(Fd(fd));
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor; errors from close are not actionable here.
        unsafe { libc::close(self.0) };
    }
}

/// A connected, non-blocking, close-on-exec unix stream socket to `path` (a NUL-free byte
/// path shorter than sun_path). Connects with the real connect, so it never re-enters the hook.
pub fn unix_connect(real: ConnectFn, path: &[u8]) -> Result<Fd, c_int> {
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut sun: libc::sockaddr_un = unsafe { MaybeUninit::zeroed().assume_init() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.is_empty() || path.len() >= sun.sun_path.len() {
        return Err(libc::ENAMETOOLONG);
    }
    for (dst, &src) in sun.sun_path.iter_mut().zip(path) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(errno());
    }
    let fd = Fd(raw);
    let len = (size_of::<libc::sa_family_t>() + path.len() + 1) as socklen_t;
    // SAFETY: sun is a live local of at least `len` bytes; `real` is libc's connect.
    let rc = unsafe { real(fd.0, (&raw const sun).cast::<sockaddr>(), len) };
    if rc != 0 {
        return Err(errno());
    }
    Ok(fd)
}

/// The uid of the process on the other end of a unix socket (SO_PEERCRED).
pub fn peer_uid(fd: c_int) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as socklen_t;
    // SAFETY: cred and len are live locals of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<c_void>(),
            &raw mut len,
        )
    };
    (rc == 0 && len as usize == size_of::<libc::ucred>()).then_some(cred.uid)
}

/// One non-blocking send without SIGPIPE. Returns bytes sent.
pub fn send(fd: c_int, buf: &[u8]) -> Result<usize, c_int> {
    // SAFETY: buf is a live slice of buf.len() bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 { Err(errno()) } else { Ok(n as usize) }
}

/// Waits up to `timeout_ms` for `fd` to become readable. EINTR counts as "not yet".
pub fn poll_in(fd: c_int, timeout_ms: i64) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout_ms.clamp(0, i64::from(c_int::MAX)) as c_int;
    // SAFETY: p is a live local array of one pollfd.
    let rc = unsafe { libc::poll(&raw mut p, 1, ms) };
    rc > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// True in a setuid/setgid or otherwise privileged program (the kernel's AT_SECURE).
pub fn secure() -> bool {
    // SAFETY: getauxval only reads the auxiliary vector.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// Runs `f` on an environment variable's bytes without allocating. Load-time only: getenv is
/// not safe against a concurrent setenv, which is why it is never called on the connect path,
/// and the bytes must not outlive `f`. In a setuid or otherwise privileged program (AT_SECURE,
/// as with /etc/ld.so.preload) the environment belongs to a less trusted caller and is ignored,
/// like glibc's secure_getenv: otherwise anyone could point a privileged process at their own
/// "daemon".
pub fn with_env<R>(name: &CStr, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    // SAFETY: name is NUL-terminated; a non-null result is a NUL-terminated string in the
    // environment block, read here before anything in this thread could change it.
    let value = unsafe {
        let p = if secure() {
            core::ptr::null_mut()
        } else {
            libc::getenv(name.as_ptr())
        };
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_bytes())
        }
    };
    f(value)
}
