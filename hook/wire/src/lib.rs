//! Wire format shared by the connect hook and the daemon (filled in by the hook work).
#![forbid(unsafe_code)]
#![no_std]
