//! The system calls behind the shared routing table, as a small safe API: map a file as a
//! slice of atomic words, create a sealed memfd, wait and wake on a word shared between
//! processes (futex), and pass a descriptor over a unix socket.
//!
//! Both the daemon (which forbids `unsafe`) and the hook (which keeps `unsafe` to two modules)
//! use this crate, so the unsafe code for shared memory lives here once. Nothing here
//! allocates or panics: the hook calls it inside other people's processes.
#![no_std]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

extern crate std;

use core::ffi::CStr;
use core::mem::{MaybeUninit, size_of};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use libc::c_int;

fn errno() -> c_int {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// A shared mapping of a file, seen as 32-bit words that every process mapping the file may
/// read and (if mapped writable) update with atomic operations.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<AtomicU32>,
    words: usize,
}

// SAFETY: the mapping is only reached through `&[AtomicU32]`, which is Sync; it stays valid
// until the `Mapping` is dropped (or forever, once leaked).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `words` 32-bit words of the file behind `fd`, shared, read-only or
    /// writable. Fails with EINVAL if the file is shorter than that (a mapping past the end of
    /// a file faults on access), or with the errno of fstat or mmap.
    ///
    /// # Errors
    /// The errno of the failed call.
    pub fn map(fd: BorrowedFd<'_>, words: usize, writable: bool) -> Result<Self, c_int> {
        let len = words
            .checked_mul(4)
            .filter(|&l| l > 0)
            .ok_or(libc::EINVAL)?;
        if file_size(fd)? < len as u64 {
            return Err(libc::EINVAL);
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a file we checked is at least `len` bytes long;
        // the kernel chooses the address, so nothing of ours is overlapped.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        let ptr = NonNull::new(p.cast::<AtomicU32>()).ok_or(libc::ENOMEM)?;
        Ok(Self { ptr, words })
    }

    /// The mapped words.
    pub fn words(&self) -> &[AtomicU32] {
        // SAFETY: `ptr` is a page-aligned mapping of `words` 4-byte words, valid until drop;
        // AtomicU32 has the size and alignment of u32 and permits shared mutation.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }

    /// Keeps the mapping for the rest of the process's life. The hook does this: another thread
    /// may still be reading a mapping it has replaced, and unmapping it would make that read
    /// fault.
    pub fn leak(self) -> &'static [AtomicU32] {
        let me = core::mem::ManuallyDrop::new(self);
        // SAFETY: never unmapped from here on, so valid for 'static.
        unsafe { core::slice::from_raw_parts(me.ptr.as_ptr(), me.words) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region `map` created; `words()` borrows cannot outlive self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.words * 4) };
    }
}

/// The size of the file behind `fd`.
///
/// # Errors
/// The errno of fstat.
pub fn file_size(fd: BorrowedFd<'_>) -> Result<u64, c_int> {
    Ok(stat(fd)?.st_size as u64)
}

/// Raises this process's soft limit on open descriptors to its hard limit; returns the soft
/// limit now in force.
///
/// # Errors
/// The errno of getrlimit or setrlimit.
pub fn raise_nofile() -> Result<u64, c_int> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(errno());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(errno());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// The calling process's soft limit on open descriptors.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// Gives the allocator's free memory back to the system (glibc's `malloc_trim`), holes inside
/// the heap included: after a transient the size of the whole state (reading every service at
/// start-up), the freed pages would otherwise stay resident. Costs a walk of the free lists.
/// Only the daemon calls this.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The calling process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The network namespace cookie of the socket `fd` (`SO_NETNS_COOKIE`): the same for every
/// socket of one namespace, as BPF's `bpf_get_netns_cookie` reports it.
///
/// # Errors
/// The errno of getsockopt (ENOPROTOOPT before Linux 5.14).
pub fn netns_cookie(fd: BorrowedFd<'_>) -> Result<u64, c_int> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are live locals of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(errno()) }
}

/// fstat of `fd`.
///
/// # Errors
/// The errno of fstat.
pub fn stat(fd: BorrowedFd<'_>) -> Result<libc::stat, c_int> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the buffer we own.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(errno());
    }
    // SAFETY: fstat returned 0, so it initialised the buffer.
    Ok(unsafe { st.assume_init() })
}

/// A memfd of `bytes` zero bytes, close-on-exec, sealed so that nobody holding it (or a
/// mapping of it) can shrink or grow it: a process that maps it can never be made to fault by
/// another process truncating it under its feet.
///
/// # Errors
/// The errno of memfd_create, ftruncate or fcntl.
pub fn sealed_memfd(name: &CStr, bytes: u64) -> Result<OwnedFd, c_int> {
    // SAFETY: name is NUL-terminated.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(errno());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = libc::off_t::try_from(bytes).map_err(|_| libc::EINVAL)?;
    // SAFETY: plain calls on a descriptor we own.
    unsafe {
        if libc::ftruncate(raw, len) != 0 {
            return Err(errno());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        if libc::fcntl(raw, libc::F_ADD_SEALS, seals) != 0 {
            return Err(errno());
        }
    }
    Ok(fd)
}

/// The seals of a memfd (F_GET_SEALS); 0 for other files.
pub fn seals(fd: BorrowedFd<'_>) -> c_int {
    // SAFETY: F_GET_SEALS only reads the descriptor's state.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    rc.max(0)
}

/// Sleeps while `word` holds `expected`, for at most `timeout_ms`, or until a [`futex_wake`]
/// on the same word from any process that maps it. Returns early on a signal or a change.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout_ms: u32) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::from(timeout_ms / 1000),
        tv_nsec: libc::c_long::from(timeout_ms % 1000) * 1_000_000,
    };
    // SAFETY: a shared (not private) futex wait on a live, aligned word; the kernel only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &raw const ts,
        )
    };
}

/// Wakes every process waiting in [`futex_wait`] on `word`. Async-signal-safe.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: a shared futex wake on a live, aligned word; the kernel only reads it.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, c_int::MAX) };
}

const CMSG_SPACE: usize = 64;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// Sends `bytes` with the descriptor `fd` attached (SCM_RIGHTS), without blocking or SIGPIPE.
///
/// # Errors
/// The errno of sendmsg (EAGAIN when the socket buffer is full).
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> Result<usize, c_int> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<c_int>() as u32) } as usize;
    if space > CMSG_SPACE {
        return Err(libc::EINVAL);
    }
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` bytes we own, enough for one header and one int;
    // CMSG_FIRSTHDR and CMSG_DATA stay inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        if c.is_null() {
            return Err(libc::EINVAL);
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<c_int>() as u32) as _;
        core::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<c_int>(), fd.as_raw_fd());
    }
    // SAFETY: msg and everything it points to are live locals.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &raw const msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 { Err(errno()) } else { Ok(n as usize) }
}

/// [`recv_with_fd`], with the descriptor owned (closed when dropped).
///
/// # Errors
/// The errno of recvmsg.
pub fn recv_with_owned_fd(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Option<OwnedFd>), c_int> {
    let (n, fd) = recv_with_fd(sock.as_raw_fd(), buf)?;
    // SAFETY: the kernel just installed this descriptor in our table for us alone.
    Ok((n, fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })))
}

/// Receives into `buf` without blocking, taking at most one descriptor passed with it (opened
/// close-on-exec; any further ones are closed). Returns the bytes read and the descriptor.
///
/// # Errors
/// The errno of recvmsg.
pub fn recv_with_fd(sock: RawFd, buf: &mut [u8]) -> Result<(usize, Option<RawFd>), c_int> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE as _;
    // SAFETY: msg points to live buffers of the lengths given.
    let n = unsafe {
        libc::recvmsg(
            sock,
            &raw mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(errno());
    }
    let mut got = None;
    // SAFETY: the kernel filled msg_controllen bytes of our control buffer; the CMSG macros
    // walk only inside it, and each SCM_RIGHTS payload holds whole ints.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<c_int>();
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*c).cmsg_len as usize).saturating_sub(header) / size_of::<c_int>();
                for k in 0..count {
                    let fd = core::ptr::read_unaligned(data.add(k));
                    if got.is_none() {
                        got = Some(fd);
                    } else {
                        libc::close(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n as usize, got))
}

/// The mappings a process keeps for its life (leaked, never unmapped), with one of them
/// current: readers on any thread take the current one with a few atomic loads, a writer
/// installs a new one without waiting for them. A reader that loaded an older mapping keeps
/// reading valid memory. The slots are reused after `N` installs, so a reader checks the
/// slot's sequence word around its two loads.
#[derive(Debug)]
pub struct Held<const N: usize> {
    installs: AtomicU32,
    /// Slot index + 1 of the current mapping; 0: none.
    current: AtomicU32,
    slots: [HeldSlot; N],
}

#[derive(Debug)]
struct HeldSlot {
    seq: AtomicU32,
    ptr: AtomicPtr<AtomicU32>,
    len: AtomicUsize,
}

impl<const N: usize> Held<N> {
    pub const fn new() -> Self {
        Self {
            installs: AtomicU32::new(0),
            current: AtomicU32::new(0),
            slots: [const {
                HeldSlot {
                    seq: AtomicU32::new(0),
                    ptr: AtomicPtr::new(core::ptr::null_mut()),
                    len: AtomicUsize::new(0),
                }
            }; N],
        }
    }

    /// The current mapping, if any.
    pub fn current(&self) -> Option<&'static [AtomicU32]> {
        for _ in 0..4 {
            let i = self.current.load(Ordering::Acquire).checked_sub(1)? as usize;
            let slot = self.slots.get(i)?;
            let s1 = slot.seq.load(Ordering::Acquire);
            let ptr = slot.ptr.load(Ordering::Acquire);
            let len = slot.len.load(Ordering::Acquire);
            if s1 & 1 == 0 && slot.seq.load(Ordering::Acquire) == s1 && !ptr.is_null() {
                // SAFETY: (ptr, len) was stored together by `install` from a leaked mapping
                // (the unchanged, even sequence word shows the pair is whole), and leaked
                // mappings stay valid for the life of the process.
                return Some(unsafe { core::slice::from_raw_parts(ptr, len) });
            }
            core::hint::spin_loop();
        }
        None
    }

    /// Leaks `m` and makes it current.
    pub fn install(&self, m: Mapping) -> &'static [AtomicU32] {
        let words = m.leak();
        let i = self.installs.fetch_add(1, Ordering::AcqRel) as usize % N;
        if let Some(slot) = self.slots.get(i) {
            let s = slot.seq.fetch_add(1, Ordering::AcqRel);
            if s & 1 == 1 {
                // Another installer is on this slot (N installs raced): leave it to them.
                slot.seq.fetch_sub(1, Ordering::AcqRel);
                return words;
            }
            slot.ptr.store(words.as_ptr().cast_mut(), Ordering::Release);
            slot.len.store(words.len(), Ordering::Release);
            slot.seq.fetch_add(1, Ordering::AcqRel);
            self.current.store(i as u32 + 1, Ordering::Release);
        }
        words
    }
}

impl<const N: usize> Default for Held<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use core::sync::atomic::Ordering;
    use std::os::fd::AsFd;

    #[test]
    fn a_sealed_memfd_is_shared_between_mappings_and_cannot_shrink() {
        let fd = sealed_memfd(c"test", 4096).unwrap();
        let a = Mapping::map(fd.as_fd(), 1024, true).unwrap();
        let b = Mapping::map(fd.as_fd(), 1024, true).unwrap();
        a.words()[7].store(42, Ordering::Release);
        assert_eq!(b.words()[7].load(Ordering::Acquire), 42);
        // SAFETY: a plain ftruncate on a descriptor we own.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), 0) };
        assert_eq!((rc, errno()), (-1, libc::EPERM), "the shrink seal holds");
        assert_eq!(
            Mapping::map(fd.as_fd(), 2048, false).unwrap_err(),
            libc::EINVAL,
            "no mapping past the end"
        );
    }

    #[test]
    fn a_descriptor_passes_over_a_unix_socket() {
        let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = sealed_memfd(c"pass", 4096).unwrap();
        Mapping::map(fd.as_fd(), 1, true).unwrap().words()[0].store(7, Ordering::Release);
        assert_eq!(send_with_fd(x.as_fd(), b"hi", fd.as_fd()), Ok(2));
        let mut buf = [0u8; 8];
        let (n, got) = recv_with_fd(y.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
        // SAFETY: the descriptor we just received is ours.
        let got = unsafe { OwnedFd::from_raw_fd(got.unwrap()) };
        let m = Mapping::map(got.as_fd(), 1, false).unwrap();
        assert_eq!(m.words()[0].load(Ordering::Acquire), 7);
    }

    #[test]
    fn held_mappings_stay_readable_after_newer_ones_are_installed() {
        static HELD: Held<2> = Held::new();
        assert!(HELD.current().is_none());
        let mut old = None;
        for k in 0..5u32 {
            let fd = sealed_memfd(c"held", 4096).unwrap();
            let m = Mapping::map(fd.as_fd(), 1024, true).unwrap();
            m.words()[0].store(k, Ordering::Relaxed);
            HELD.install(m);
            assert_eq!(HELD.current().unwrap()[0].load(Ordering::Relaxed), k);
            if let Some(o) = old.replace(HELD.current().unwrap()) {
                // An older mapping a reader kept is still valid memory.
                assert_eq!(o[0].load(Ordering::Relaxed), k - 1);
            }
        }
    }

    #[test]
    fn a_futex_wait_returns_on_a_changed_word_and_on_timeout() {
        let w = AtomicU32::new(1);
        futex_wait(&w, 0, 1000); // not the expected value: returns at once
        let started = std::time::Instant::now();
        futex_wait(&w, 1, 20);
        assert!(started.elapsed() >= std::time::Duration::from_millis(15));
        futex_wake(&w);
    }
}
