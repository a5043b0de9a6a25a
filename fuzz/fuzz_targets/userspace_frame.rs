//! Raw frames into the userspace engine's `handle_frame` (and its timers), on any port (the
//! host port of the node's own traffic included) and with either checksum state: never a
//! panic. One engine lives for the whole run, so
//! connections, neighbours and affinity entries that earlier inputs created are reached by
//! later ones (replies, ICMP errors, ARP). Under `cfg(fuzzing)` the engine skips its L4
//! checksum check, so mutated frames get past it into the NAT path.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use svcnat_userspace::engine::{Engine, testing};

static ENGINE: OnceLock<Engine> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let engine = ENGINE.get_or_init(testing::fuzz_engine);
    testing::fuzz_one(engine, data);
});
