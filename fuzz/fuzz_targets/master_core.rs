//! The master core fed scheduler calls, agent messages and operator requests made of
//! fuzz bytes, against a live agent and framework (see `agora_fuzz::master`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| agora_fuzz::master::Master::run(data));
