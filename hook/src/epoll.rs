//! Where the program registered a socket with epoll, so that the connected socket put in its
//! place (prefetching, `handover.rs`) is registered the same way. A registration belongs to the
//! open file, not to the descriptor number: once `dup3` replaces the file behind the number, the
//! kernel drops the old file's registrations, and a program that registered before connect()
//! (nginx does, edge-triggered) would wait forever for an event.
//!
//! The kernel shows each epoll instance's registrations in `/proc/self/fdinfo/<epfd>`:
//! `tfd: <fd> events: <hex> data: <hex> pos:<n> ino:<hex> sdev:<hex>`. The epoll instances are
//! the descriptors whose link reads `anon_inode:[eventpoll]`. The scan reads into stack buffers
//! only and gives up (the caller then does not replace the socket) in a process with more than
//! [`MAX_FDS`] descriptors, or when `/proc` cannot be read.

#![deny(unsafe_code)]

use core::ffi::CStr;

use libc::c_int;

use crate::sys;

/// Descriptors looked through at most.
pub const MAX_FDS: usize = 4096;
/// Registrations of one socket kept at most (epoll instances that watch it).
pub const MAX_REGS: usize = 4;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reg {
    pub epfd: c_int,
    pub events: u32,
    pub data: u64,
}

/// The registrations of one socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct Regs {
    regs: [Reg; MAX_REGS],
    n: usize,
}

impl Regs {
    fn push(&mut self, r: Reg) -> Result<(), ()> {
        let slot = self.regs.get_mut(self.n).ok_or(())?;
        *slot = r;
        self.n += 1;
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Reg> {
        self.regs.iter().take(self.n)
    }
}

/// The epoll registrations of socket `fd` (whose inode is `ino`) in this process. Err: they
/// cannot be known, and the socket must not be replaced.
pub fn registrations(fd: c_int, ino: u64) -> Result<Regs, ()> {
    let mut regs = Regs::default();
    let dir = sys::open_dir(c"/proc/self/fd").ok_or(())?;
    let mut info_dir = None;
    let mut buf = [0u8; 2048];
    let mut seen = 0usize;
    loop {
        let n = sys::getdents(&dir, &mut buf).map_err(|_| ())?;
        if n == 0 {
            return Ok(regs);
        }
        let mut off = 0usize;
        while off < n {
            // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name (NUL-terminated)
            let reclen = match buf.get(off + 16..off + 18) {
                Some(&[lo, hi]) => usize::from(u16::from_ne_bytes([lo, hi])),
                _ => return Err(()),
            };
            let name = buf.get(off + 19..off + reclen).ok_or(())?;
            off += reclen.max(1);
            let name = CStr::from_bytes_until_nul(name).map_err(|_| ())?;
            if !name.to_bytes().first().is_some_and(u8::is_ascii_digit) {
                continue;
            }
            seen += 1;
            if seen > MAX_FDS {
                return Err(());
            }
            let mut link = [0u8; 32];
            let len = sys::readlinkat(&dir, name, &mut link).unwrap_or(0);
            if link.get(..len) != Some(b"anon_inode:[eventpoll]".as_slice()) {
                continue;
            }
            let epfd = parse_dec(name.to_bytes()).ok_or(())?;
            if info_dir.is_none() {
                info_dir = Some(sys::open_dir(c"/proc/self/fdinfo").ok_or(())?);
            }
            let info = info_dir
                .as_ref()
                .and_then(|d| sys::openat(d, name))
                .ok_or(())?;
            scan_fdinfo(&info, epfd, fd, ino, &mut regs)?;
        }
    }
}

/// Collects the lines of one epoll instance's fdinfo that register `fd` with inode `ino`.
fn scan_fdinfo(
    info: &sys::Fd,
    epfd: c_int,
    fd: c_int,
    ino: u64,
    regs: &mut Regs,
) -> Result<(), ()> {
    let mut chunk = [0u8; 4096];
    let mut line = [0u8; 256];
    let mut len = 0usize;
    loop {
        let n = sys::read(info, &mut chunk).map_err(|_| ())?;
        if n == 0 {
            break;
        }
        for &b in chunk.get(..n).ok_or(())? {
            if b == b'\n' {
                if let Some(r) = line.get(..len).and_then(|l| registration(l, fd, ino)) {
                    regs.push(Reg { epfd, ..r })?;
                }
                len = 0;
            } else if let Some(slot) = line.get_mut(len) {
                *slot = b;
                len += 1;
            }
        }
    }
    Ok(())
}

/// A `tfd:` line's registration, if it is of `fd` with inode `ino`.
fn registration(line: &[u8], fd: c_int, ino: u64) -> Option<Reg> {
    let mut words = line
        .split(u8::is_ascii_whitespace)
        .filter(|w| !w.is_empty());
    if words.next()? != b"tfd:" || parse_dec(words.next()?)? != fd {
        return None;
    }
    let (mut events, mut data, mut inode) = (None, None, None);
    while let Some(w) = words.next() {
        match w {
            b"events:" => events = parse_hex(words.next()?),
            b"data:" => data = parse_hex(words.next()?),
            w if w.starts_with(b"ino:") => inode = parse_hex(w.get(4..)?),
            _ => {}
        }
    }
    (inode? == ino).then_some(Reg {
        epfd: -1,
        events: u32::try_from(events?).ok()?,
        data: data?,
    })
}

fn parse_dec(s: &[u8]) -> Option<c_int> {
    if s.is_empty() || s.len() > 9 {
        return None;
    }
    s.iter().try_fold(0 as c_int, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + c_int::from(c - b'0'))
    })
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        let d = (c as char).to_digit(16)?;
        Some(acc << 4 | u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn fdinfo_lines_are_read_for_the_socket_asked_about_only() {
        let line = b"tfd:        7 events: 80002019 data:     55d0c0ffee10  pos:0 ino:1a2b sdev:8";
        assert_eq!(
            registration(line, 7, 0x1a2b),
            Some(Reg {
                epfd: -1,
                events: 0x8000_2019,
                data: 0x55d0_c0ff_ee10
            })
        );
        assert_eq!(registration(line, 8, 0x1a2b), None, "another descriptor");
        assert_eq!(
            registration(line, 7, 0x1a2c),
            None,
            "another socket under the number"
        );
        assert_eq!(registration(b"pos:\t0", 7, 0x1a2b), None);
        assert_eq!(
            registration(b"tfd: 7 events: zz data: 1 ino:1a2b", 7, 0x1a2b),
            None
        );
    }

    #[test]
    fn a_real_epoll_registration_is_found_with_its_events_and_data() {
        use std::os::fd::AsRawFd;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = sock.as_raw_fd();
        let ino = sys::file_id(fd).unwrap().1;
        let ep = sys::epoll_create().unwrap();
        assert!(registrations(fd, ino).unwrap().iter().next().is_none());
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32;
        sys::epoll_add(ep.raw(), fd, events, 0xdead_beef).unwrap();
        let regs: Vec<Reg> = registrations(fd, ino).unwrap().iter().copied().collect();
        // The kernel keeps EPOLLERR and EPOLLHUP in every registration; adding them is a no-op.
        let kept = events | (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        assert_eq!(
            regs,
            [Reg {
                epfd: ep.raw(),
                events: kept,
                data: 0xdead_beef
            }]
        );
    }
}
