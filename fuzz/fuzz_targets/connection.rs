//! Bytes written in pieces into `connection::serve` over a duplex stream, with a real buffer.
#![no_main]

use std::sync::Mutex;
use std::time::Duration;

use claimcheck_fuzz::ConnectionHarness;
use libfuzzer_sys::fuzz_target;

// One runtime and one buffer for the whole run.
static HARNESS: Mutex<Option<ConnectionHarness>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut harness = HARNESS.lock().unwrap_or_else(|e| e.into_inner());
    harness
        .get_or_insert_with(ConnectionHarness::new)
        .run(data, Duration::from_secs(10));
});
