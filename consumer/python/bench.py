"""Decoding speed of the Python package against the Rust crate and a pure-Python reader, on
the same stored object, in one run.

    scripts/build-python && .venv/bin/pip install --force-reinstall --no-deps target/python/dist/*.whl
    .venv/bin/python consumer/python/bench.py [--events 200000] [--compression zstd]

The object is a msgpack body of access-log-like events (~200 bytes each, the sidecar's
`bench --payload logs` shape), compressed, with its pointer. Each reader verifies it (sizes,
CRC32C, event count) and then decodes every event, touching each record:

* rust:        the crate's `verify_and_decode` (one pass), walking each record
               (consumer/examples/decode_file.rs, built here with cargo --release unless
               --rust-bin is given);
* python:      `claimcheck.decode(..., verify_first=True)` (one pass, what `resolve` does
               for a body that fits in memory), reading `event.record` (a dict);
* python-lazy: the same without reading `event.record` (tag and time only);
* pure-python: zstandard + google-crc32c + msgpack, all in Python (this file only);
* msgpack-only: msgpack's C unpacker alone over the body already decompressed: no checks, no
               decompression, no time conversion. No Python reader built on msgpack can be
               faster than this, whatever it does around it.

MB/s is of the decompressed body. Each round runs every reader once, in turn; the best of
--rounds rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_body(n: int) -> bytes:
    import msgpack

    rng = random.Random(7)
    paths = ["/", "/api/v1/orders", "/api/v1/users/%d", "/static/app.js", "/healthz"]
    out = bytearray()
    packer = msgpack.Packer()
    base = 1_763_740_800
    for i in range(n):
        record = {
            "host": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}",
            "method": rng.choice(["GET", "GET", "POST", "PUT"]),
            "path": rng.choice(paths).replace("%d", str(rng.randrange(10**6))),
            "status": rng.choice([200, 200, 200, 201, 304, 404, 500]),
            "bytes": rng.randrange(100, 50_000),
            "ua": "Mozilla/5.0 (X11; Linux x86_64)",
            "request_id": "%032x" % rng.getrandbits(128),
            "latency_ms": round(rng.random() * 250, 3),
        }
        secs, nanos = base + i // 1000, (i % 1000) * 1_000_000
        out += b"\x92"
        out += packer.pack(msgpack.ExtType(0, secs.to_bytes(4, "big") + nanos.to_bytes(4, "big")))
        out += packer.pack(record)
    return bytes(out)


def compress(body: bytes, compression: str) -> bytes:
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(body)
    if compression == "gzip":
        import gzip

        return gzip.compress(body, compresslevel=6)
    return body


def pointer_json(body: bytes, stored: bytes, records: int, compression: str) -> bytes:
    import google_crc32c

    return json.dumps(
        {
            "v": 1,
            "chunk_id": "%032x" % random.Random(1).getrandbits(128),
            "bucket": "bench",
            "key": "bench/chunk.msgpack",
            "tag": "bench.access",
            "timekey": 1763740800,
            "first_time": 1763740800,
            "last_time": 1763740800 + records // 1000,
            "records": records,
            "bytes": len(body),
            "stored_bytes": len(stored),
            "format": "msgpack",
            "compression": compression,
            "checksum": {"crc32c": "%08x" % google_crc32c.value(stored)},
            "producer": "bench",
            "created_at": "2026-11-21T16:00:00.000Z",
        }
    ).encode()


def pure_python(pointer: dict, stored: bytes) -> int:
    """A small reader in Python: checks, decompresses and walks the entries."""
    import google_crc32c
    import msgpack

    if len(stored) != pointer["stored_bytes"]:
        raise ValueError("stored size")
    if "%08x" % google_crc32c.value(stored) != pointer["checksum"]["crc32c"]:
        raise ValueError("checksum")
    if pointer["compression"] == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=True)
    elif pointer["compression"] == "gzip":
        import gzip
        import io

        reader = gzip.GzipFile(fileobj=io.BytesIO(stored))
    else:
        import io

        reader = io.BytesIO(stored)
    unpacker = msgpack.Unpacker(reader, raw=False, strict_map_key=False, read_size=64 * 1024)
    n = 0
    fields = 0
    for entry in unpacker:
        t, record = entry
        if isinstance(t, list):
            t = t[0]
        if isinstance(t, msgpack.ExtType):
            secs = int.from_bytes(t.data[:4], "big") + int.from_bytes(t.data[4:], "big") / 1e9
        else:
            secs = float(t)
        fields += len(record)
        n += 1
    if n != pointer["records"]:
        raise ValueError("event count")
    return n


def msgpack_only(body: bytes) -> int:
    """msgpack's C unpacker over the decompressed body, touching each record: the floor of
    any Python reader that builds records with it."""
    import io

    import msgpack

    unpacker = msgpack.Unpacker(io.BytesIO(body), raw=False, strict_map_key=False, read_size=64 * 1024)
    n = 0
    fields = 0
    for _, record in unpacker:
        fields += len(record)
        n += 1
    return n


def timed(fn):
    """`fn` as a reader: its seconds and its result."""

    def run():
        started = time.perf_counter()
        result = fn()
        return time.perf_counter() - started, result

    return run


def interleaved(readers: dict, rounds: int) -> dict:
    """Each reader once per round, in turn, and its best round: a slow moment of a shared
    machine falls on every reader alike rather than on whichever ran then."""
    best = {name: (float("inf"), None) for name in readers}
    for _ in range(rounds):
        for name, run in readers.items():
            seconds, result = run()
            if seconds < best[name][0]:
                best[name] = (seconds, result)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--compression", choices=["zstd", "gzip", "none"], default="zstd")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rust-bin", help="a built decode_file example (default: cargo build --release)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = ap.parse_args()

    import claimcheck

    body = make_body(args.events)
    stored = compress(body, args.compression)
    record = pointer_json(body, stored, args.events, args.compression)

    pointer = claimcheck.Pointer.parse(record)

    def python_records():
        n = 0
        fields = 0
        for e in claimcheck.decode(pointer, stored, verify_first=True):
            fields += len(e.record)
            e.time
            n += 1
        return n

    def python_lazy():
        n = 0
        for e in claimcheck.decode(pointer, stored, verify_first=True):
            e.tag, e.time
            n += 1
        return n

    with tempfile.TemporaryDirectory() as tmp:
        ppath, opath = Path(tmp) / "pointer.json", Path(tmp) / "object"
        ppath.write_bytes(record)
        opath.write_bytes(stored)
        rust_bin = args.rust_bin
        if rust_bin is None:
            subprocess.run(
                ["cargo", "build", "--release", "--locked", "--quiet", "-p", "claimcheck-consumer",
                 "--example", "decode_file"],
                cwd=ROOT, check=True,
            )
            rust_bin = ROOT / "target" / "release" / "examples" / "decode_file"

        def rust():
            # One round per process: the rounds of every reader take turns.
            out = subprocess.run(
                [str(rust_bin), str(ppath), str(opath), "1"],
                check=True, capture_output=True, text=True,
            ).stdout
            result = json.loads(out)
            return result["seconds"], result["events"]

        results = interleaved(
            {
                "rust": rust,
                "python": timed(python_records),
                "python-lazy": timed(python_lazy),
                "pure-python": timed(lambda: pure_python(json.loads(record), stored)),
                "msgpack-only": timed(lambda: msgpack_only(body)),
            },
            args.rounds,
        )

    for name, (_, n) in results.items():
        if n != args.events:
            print(f"{name} decoded {n} events, not {args.events}", file=sys.stderr)
            return 1
    report = {
        "events": args.events,
        "body_bytes": len(body),
        "stored_bytes": len(stored),
        "compression": args.compression,
        "readers": {
            name: {
                "seconds": round(s, 6),
                "events_per_sec": round(args.events / s),
                "mb_per_sec": round(len(body) / s / 1e6, 1),
            }
            for name, (s, _) in results.items()
        },
    }
    rust_s = results["rust"][0]
    report["python_vs_rust"] = round(results["python"][0] / rust_s, 2)
    report["pure_python_vs_python"] = round(results["pure-python"][0] / results["python"][0], 2)
    report["msgpack_only_vs_python"] = round(results["msgpack-only"][0] / results["python"][0], 2)
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{args.events:,} events, {len(body) / 1e6:.1f} MB of body, "
        f"{len(stored) / 1e6:.1f} MB stored ({args.compression}); best of {args.rounds} rounds"
    )
    print(f"{'reader':<12} {'seconds':>9} {'events/s':>12} {'MB/s':>8}")
    for name, r in report["readers"].items():
        print(f"{name:<12} {r['seconds']:>9.4f} {r['events_per_sec']:>12,} {r['mb_per_sec']:>8.1f}")
    print(f"python / rust: {report['python_vs_rust']}x the time; "
          f"pure-python / python: {report['pure_python_vs_python']}x; "
          f"msgpack-only / python: {report['msgpack_only_vs_python']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
