//! Fuzz target `dns_reply`: the body is [`discotech::fuzz::dns_reply`], shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discotech::fuzz::dns_reply(data));
