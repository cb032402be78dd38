//! Fuzz target `hook_messages`: the body is [`discotech::fuzz::hook_messages`], shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discotech::fuzz::hook_messages(data));
