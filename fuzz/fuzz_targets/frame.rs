//! Bytes → request scanner → `frame::parse` → `entries::Pieces` → `entries::split`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    claimcheck_fuzz::frame(data);
});
