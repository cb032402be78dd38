//! Fuzz target `hook_live`: the body is [`discotech::fuzz::hook_live`], shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discotech::fuzz::hook_live(data));
