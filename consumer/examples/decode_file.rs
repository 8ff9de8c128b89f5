//! Times the crate's verification and decoding of one stored object on disk: the Rust side of
//! `consumer/python/bench.py`, which runs the same object through the Python package.
//!
//! ```sh
//! cargo run --release -p claimcheck-consumer --example decode_file -- POINTER OBJECT [ROUNDS]
//! ```
//!
//! Each round verifies and decodes the object in one pass (`verify_and_decode`), walking every
//! record (`Event::record`), as `claimcheck.resolve` does for a body that fits in memory.
//! Prints one JSON line: events and seconds per round (the best round).

use std::time::Instant;

use claimcheck_consumer::{verify_and_decode, Pointer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [pointer, object, rest @ ..] = &args[..] else {
        return Err("usage: decode_file POINTER OBJECT [ROUNDS]".into());
    };
    let rounds: u32 = rest.first().map_or(Ok(5), |r| r.parse())?;
    let pointer = Pointer::from_record(&std::fs::read(pointer)?)?;
    let stored = std::fs::read(object)?;
    let mut best = f64::INFINITY;
    let mut events = 0u64;
    let mut fields = 0usize;
    for _ in 0..rounds {
        let started = Instant::now();
        events = 0;
        for event in verify_and_decode(&pointer, &stored)? {
            if let rmpv::ValueRef::Map(pairs) = event.record() {
                fields += pairs.len();
            }
            events += 1;
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    println!(
        "{{\"events\":{events},\"seconds\":{best:.6},\"fields\":{}}}",
        fields / rounds.max(1) as usize
    );
    Ok(())
}
