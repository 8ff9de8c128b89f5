//! Replays the fuzz corpus without libFuzzer: every file of `fuzz/seeds/<target>/`,
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the same harness as
//! the fuzz targets (`fuzz/src/lib.rs`), with the same invariants. See `fuzz/README.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

/// Every input file of a target, with a check that the corpus is really there.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["seeds", "corpus", "regressions"] {
        let dir = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            assert!(
                dir.ends_with(Path::new("regressions").join(target)),
                "{} is missing: the corpus must be committed",
                dir.display()
            );
            continue;
        };
        let before = files.len();
        files.extend(
            entries
                .map(|e| e.expect("read a corpus directory").path())
                .filter(|p| p.is_file()),
        );
        assert!(
            files.len() > before || dir.ends_with(Path::new("regressions").join(target)),
            "{} is empty: nothing would be replayed",
            dir.display()
        );
    }
    files.sort();
    files
}

/// Runs `check` on every input, naming the file that fails.
fn replay(target: &str, mut check: impl FnMut(&[u8])) -> usize {
    let files = inputs(target);
    for path in &files {
        let data = std::fs::read(path).expect("read a corpus file");
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
        if let Err(panic) = run {
            eprintln!("fuzz input {} fails", path.display());
            std::panic::resume_unwind(panic);
        }
    }
    files.len()
}

#[test]
fn frame_corpus_replays() {
    let n = replay("frame", harness::frame);
    assert!(n >= 40, "only {n} frame inputs");
}

#[test]
fn connection_corpus_replays() {
    let mut h = harness::ConnectionHarness::new();
    let n = replay("connection", |data| h.run(data, Duration::from_secs(30)));
    h.close();
    assert!(n >= 40, "only {n} connection inputs");
}

/// The reference model agrees with a few hand-checked cases, so a replay that passes means
/// something.
#[test]
fn the_model_expects_what_the_protocol_says() {
    let config = harness::connection_config();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/frame");
    let read = |name: &str| std::fs::read(root.join(name)).expect("seed");

    let e = harness::expected(&read("capture-fluentd-out-forward-text-ack"), &config);
    assert_eq!(e.acks.len(), 1);
    assert!(
        e.acks[0].ends_with(b"==\n"),
        "Fluentd's token ends in a newline"
    );
    assert_eq!((e.stored_events, e.closed_for_error), (20, false));

    let e = harness::expected(&read("capture-node-message-ack"), &config);
    assert_eq!((e.acks.len(), e.stored_events), (3, 3));

    // Metrics are acknowledged but not stored.
    let e = harness::expected(&read("fluent-signal-metrics"), &config);
    assert_eq!((e.acks.len(), e.stored_events), (1, 0));

    // Garbage after a good request: one ack at most, then the connection is closed.
    let e = harness::expected(&read("reserved-byte"), &config);
    assert_eq!(
        (e.acks.len(), e.stored_events, e.closed_for_error),
        (1, 1, true)
    );

    // Beyond the decompression limit: whole entries are stored a piece at a time and acked;
    // one entry larger than the limit closes the connection.
    let e = harness::expected(&read("gzip-beyond-limit-in-pieces"), &config);
    assert_eq!(
        (e.acks.len(), e.stored_events, e.closed_for_error),
        (1, 20_000, false)
    );
    let e = harness::expected(&read("gzip-over-limit"), &config);
    assert!(e.closed_for_error && e.acks.is_empty());

    let e = harness::expected(&read("over-chunk-size-limit"), &config);
    assert!(e.closed_for_error && e.acks.is_empty());

    // A PING before the data is a request without events (until the handshake exists).
    let e = harness::expected(&read("ping-fluentbit-then-data"), &config);
    assert_eq!((e.acks.len(), e.stored_events), (1, 5));
}
