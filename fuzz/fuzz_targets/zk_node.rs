//! Fuzz target `zk_node`: the body is [`discotech::fuzz::zk_node`], shared with the stable replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discotech::fuzz::zk_node(data));
