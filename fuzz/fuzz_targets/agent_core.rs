//! The agent core fed master and executor messages made of fuzz bytes, with
//! restarts from its own checkpoint (see `agora_fuzz::agent`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| agora_fuzz::agent::Agent::run(data));
