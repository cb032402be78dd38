//! Fuzz target `config`: the body is [`discotech::fuzz::config`], shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discotech::fuzz::config(data));
