//! Fuzz target `hook_table`: the body is [`discotech::fuzz::hook_table`], shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discotech::fuzz::hook_table(data));
