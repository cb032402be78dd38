//! Fuzz target `zone`: the body is [`discotech::fuzz::zone`], shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discotech::fuzz::zone(data));
