"""The consumer crate's test vectors (consumer/tests/vectors/manifest.json): every one, good
and damaged, gives its expected events or exception, from bytes and from a file object."""

import io
import json

import pytest

import claimcheck
from conftest import VECTORS

MANIFEST = json.loads((VECTORS / "manifest.json").read_text())

EXPECTED_ERRORS = {
    "checksum_mismatch": (claimcheck.ChecksumMismatch, None),
    "stored_size_mismatch": (claimcheck.SizeMismatch, "stored object bytes"),
    "event_count_mismatch": (claimcheck.SizeMismatch, "event count"),
    "inline_size_mismatch": (claimcheck.SizeMismatch, "inline body bytes"),
    "unsupported_version": (claimcheck.UnsupportedVersion, None),
    "malformed_pointer": (claimcheck.MalformedPointer, None),
}


def test_the_manifest_names_every_outcome_we_know():
    assert MANIFEST, "no vectors"
    assert {v["expect"] for v in MANIFEST} <= {"events", *EXPECTED_ERRORS}


def load(name):
    record = VECTORS / f"{name}.record"
    if record.exists():
        return claimcheck.Pointer.parse(record.read_bytes()), None
    pointer = claimcheck.Pointer.parse((VECTORS / f"{name}.pointer.json").read_bytes())
    return pointer, (VECTORS / f"{name}.object").read_bytes()


@pytest.mark.parametrize("vector", MANIFEST, ids=[v["name"] for v in MANIFEST])
@pytest.mark.parametrize("source", ["bytes", "file"])
@pytest.mark.parametrize("passes", ["verify-then-decode", "one-pass"])
def test_vector(vector, source, passes):
    name, expect = vector["name"], vector["expect"]

    def events():
        pointer, body = load(name)
        if body is not None and source == "file":
            body = io.BytesIO(body)
        if passes == "one-pass":
            return list(claimcheck.decode(pointer, body, verify_first=True))
        claimcheck.verify(pointer, body)
        if body is not None and source == "file":
            body.seek(0)
        return list(claimcheck.decode(pointer, body))

    if expect == "events":
        got = events()
        lines = (VECTORS / f"{name}.events.jsonl").read_text().splitlines()
        assert [json.loads(e.to_json()) for e in got] == [json.loads(line) for line in lines]
        for event, line in zip(got, lines):
            want = json.loads(line)
            assert event.tag == want["tag"]
            assert event.datetime.strftime("%Y-%m-%dT%H:%M:%S.%f") == want["time"][:26]
            assert event.time == pytest.approx(event.datetime.timestamp(), abs=1e-6)
            assert (event.metadata is None) == ("metadata" not in want)
            assert isinstance(event.record, dict)
    else:
        kind, what = EXPECTED_ERRORS[expect]
        with pytest.raises(kind) as raised:
            events()
        # A newer version is this reader's limit, not the chunk's fault: not one to skip.
        reader = expect == "unsupported_version"
        assert raised.value.is_chunk_error is not reader
        assert isinstance(raised.value, claimcheck.ReaderError if reader else claimcheck.ChunkError)
        if what is not None:
            assert raised.value.what == what


def test_records_become_python_values():
    pointer, body = load("msgpack-zstd")
    events = list(claimcheck.decode(pointer, body))
    assert events[0].record == {"msg": "hello", "level": "info"}
    assert events[1].record == {"n": -42, "f": 1.5, "ok": True, "none": None, "list": [1, "two", [3]]}
    assert events[2].metadata == {"k8s": {"pod": "web-1"}}
    assert events[3].record == {b"raw": b"\xff\xfebytes"}
    last = events[4].record
    assert last[7] == "int key"
    assert last["ts"].isoformat() == "2026-11-21T16:00:00.250000+00:00"
    assert last["x"] == {"ext": 5, "data": b"\x01\x02\x03"}
    assert last["big"] == 2**64 - 1
    assert last["text"] == "ü€😀"
    assert events[0].time_ns == (1795276801, 123456789)
    assert events[0].tag == pointer.tag == "app.web"
