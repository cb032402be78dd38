//! The fallback snapshot file: what the hook routes with when the daemon does not answer.
//! The daemon rewrites it atomically after every publish; the hook reads the header once at load
//! (to learn the magic ranges) and scans the fixed-size records with a small stack buffer when
//! it needs them, so reading it needs no allocation.
//!
//! ```text
//! header, 64 bytes:
//!  0  8  "DTFALLBK"
//!  8  1  version (1)
//!  9  1  IPv4 magic prefix length
//! 10  1  IPv6 magic prefix length, 255 if there is no IPv6 range
//! 11  1  reserved
//! 12  4  IPv4 magic network
//! 16 16  IPv6 magic network
//! 32  8  snapshot generation
//! 40  4  record count
//! 44  4  record length (40)
//! 48 16  reserved
//! record, 40 bytes, one per (magic address, client port, backend):
//!  0 16  magic address (v4 as mapped)
//! 16  2  client port, 0 for "any port without a mapping of its own"
//! 18  2  backend port for that client port
//! 20 16  backend address (v4 as mapped)
//! 36  2  weight
//! 38  2  priority (lower is preferred)
//! ```
//! A service with client-port mappings gets one record per backend with client port 0 (its
//! default port) plus one per backend and mapped client port.

use core::net::{Ipv4Addr, Ipv6Addr};

use crate::{byte, put, take};

pub const FILE_MAGIC: [u8; 8] = *b"DTFALLBK";
pub const FILE_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 64;
pub const RECORD_LEN: usize = 40;
/// Files claiming more records than this are treated as corrupt.
pub const MAX_RECORDS: u32 = 1 << 20;
const NO_V6: u8 = 255;

/// Why a fallback file cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackError {
    BadMagic,
    Version(u8),
    BadPrefix,
    BadRecordLen(u32),
    TooManyRecords(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub magic_v4: (Ipv4Addr, u8),
    pub magic_v6: Option<(Ipv6Addr, u8)>,
    pub generation: u64,
    pub records: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        put(&mut b, 0, &FILE_MAGIC);
        let (v6_net, v6_len) = self.magic_v6.unwrap_or((Ipv6Addr::UNSPECIFIED, NO_V6));
        put(&mut b, 8, &[FILE_VERSION, self.magic_v4.1, v6_len, 0]);
        put(&mut b, 12, &self.magic_v4.0.octets());
        put(&mut b, 16, &v6_net.octets());
        put(&mut b, 32, &self.generation.to_be_bytes());
        put(&mut b, 40, &self.records.to_be_bytes());
        put(&mut b, 44, &(RECORD_LEN as u32).to_be_bytes());
        b
    }

    /// # Errors
    /// [`FallbackError`] if the header is not one this crate wrote.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FallbackError> {
        if take::<8>(b, 0) != FILE_MAGIC {
            return Err(FallbackError::BadMagic);
        }
        let version = byte(b, 8);
        if version != FILE_VERSION {
            return Err(FallbackError::Version(version));
        }
        let (v4_len, v6_len) = (byte(b, 9), byte(b, 10));
        if v4_len > 32 || (v6_len > 128 && v6_len != NO_V6) {
            return Err(FallbackError::BadPrefix);
        }
        let record_len = u32::from_be_bytes(take(b, 44));
        if record_len as usize != RECORD_LEN {
            return Err(FallbackError::BadRecordLen(record_len));
        }
        let records = u32::from_be_bytes(take(b, 40));
        if records > MAX_RECORDS {
            return Err(FallbackError::TooManyRecords(records));
        }
        let v6 = Ipv6Addr::from(take::<16>(b, 16));
        Ok(Self {
            magic_v4: (Ipv4Addr::from(take::<4>(b, 12)), v4_len),
            magic_v6: (v6_len != NO_V6).then_some((v6, v6_len)),
            generation: u64::from_be_bytes(take(b, 32)),
            records,
        })
    }

    /// The file length this header implies.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.records) * RECORD_LEN as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub magic: Ipv6Addr,
    pub client_port: u16,
    pub backend_port: u16,
    pub backend: Ipv6Addr,
    pub weight: u16,
    pub priority: u16,
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        put(&mut b, 0, &self.magic.octets());
        put(&mut b, 16, &self.client_port.to_be_bytes());
        put(&mut b, 18, &self.backend_port.to_be_bytes());
        put(&mut b, 20, &self.backend.octets());
        put(&mut b, 36, &self.weight.to_be_bytes());
        put(&mut b, 38, &self.priority.to_be_bytes());
        b
    }

    /// Decodes the record at the start of `b` (zero-filled if `b` is short).
    pub fn decode(b: &[u8]) -> Self {
        Self {
            magic: Ipv6Addr::from(take::<16>(b, 0)),
            client_port: u16::from_be_bytes(take(b, 16)),
            backend_port: u16::from_be_bytes(take(b, 18)),
            backend: Ipv6Addr::from(take::<16>(b, 20)),
            weight: u16::from_be_bytes(take(b, 36)),
            priority: u16::from_be_bytes(take(b, 38)),
        }
    }
}
