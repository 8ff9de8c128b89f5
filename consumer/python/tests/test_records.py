"""Records become Python values: every msgpack type, and map keys (cached across records and
chunks) that are the same object from one record to the next but never mix up."""

import json
import math

import google_crc32c
import msgpack
import pytest

import claimcheck


def chunk(records, tag="app.records", times=None):
    """A pointer and an uncompressed msgpack body holding `records` (values, or msgpack bytes
    packed by hand), one event each, at `times` (an EventTime a second apart if not given)."""
    packer = msgpack.Packer()
    body = b""
    for i, r in enumerate(records):
        time = msgpack.ExtType(0, (1_795_276_800 + i).to_bytes(4, "big") + bytes(4))
        if times is not None:
            time = times[i]
        body += b"\x92" + packer.pack(time) + (r if isinstance(r, bytes) else packer.pack(r))
    pointer = {
        "v": 1,
        "chunk_id": "0193a1c2e4f87d3e9a5b6c7d8e9f0a1b",
        "bucket": "b",
        "key": "k",
        "tag": tag,
        "timekey": 1_795_276_800,
        "first_time": 1_795_276_800,
        "last_time": 1_795_276_800 + len(records),
        "records": len(records),
        "bytes": len(body),
        "stored_bytes": len(body),
        "format": "msgpack",
        "compression": "none",
        "checksum": {"crc32c": "%08x" % google_crc32c.value(body)},
        "producer": "h",
        "created_at": "2026-11-21T16:00:00.000Z",
    }
    return claimcheck.Pointer.parse(json.dumps(pointer).encode()), body


def records(values, tag="app.records"):
    pointer, body = chunk(values, tag)
    claimcheck.verify(pointer, body)
    return [e.record for e in claimcheck.decode(pointer, body)]


def test_every_type():
    value = {
        "nil": None,
        "t": True,
        "f": False,
        "ints": [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63 - 1, 2**64 - 1],
        "negative": [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)],
        "float": 1.25,
        "str": "x" * 40,
        "str16": "y" * 300,
        "str32": "z" * 70_000,
        "bin": b"\x00\xff",
        "bin16": b"b" * 300,
        "list": [1, ["two", [3.5]], {}],
        "map": {"nested": {"deeper": [{"k": "v"}]}},
        "array16": list(range(20)),
        "map16": {f"k{i}": i for i in range(20)},
    }
    assert records([value]) == [value]


def test_float32_and_extensions():
    raw = msgpack.packb(
        {
            "f32": 0.5,
            "ts4": msgpack.Timestamp(1_795_276_800),
            "ts8": msgpack.Timestamp(1_795_276_800, 250_000_000),
            "ts12": msgpack.Timestamp(-1, 0),
            "ext": msgpack.ExtType(7, b""),
            "ext16": msgpack.ExtType(8, b"e" * 300),
        },
        use_single_float=True,
    )
    (got,) = records([raw])
    assert got["f32"] == 0.5
    assert got["ts4"].isoformat() == "2026-11-21T16:00:00+00:00"
    assert got["ts8"].isoformat() == "2026-11-21T16:00:00.250000+00:00"
    assert got["ts12"].isoformat() == "1969-12-31T23:59:59+00:00"
    assert got["ext"] == {"ext": 7, "data": b""}
    assert got["ext16"] == {"ext": 8, "data": b"e" * 300}


def test_times_outside_datetimes_range():
    # Any sender may write them: a record's stays an extension, an event's raises on
    # `datetime` alone.
    far = msgpack.Timestamp(253_402_300_800)
    early = msgpack.Timestamp(-62_135_596_801)
    last = msgpack.Timestamp(253_402_300_799, 999_999_999)
    (got,) = records([{"far": far, "early": early, "last": last}])
    assert got["far"] == {"ext": -1, "data": far.to_bytes()}
    assert got["early"] == {"ext": -1, "data": early.to_bytes()}
    assert got["last"].isoformat() == "9999-12-31T23:59:59.999999+00:00"

    pointer, body = chunk([{"n": 1}, {"n": 2}], times=[2**40, 1_795_276_800])
    far_event, event = claimcheck.decode(pointer, body)
    assert far_event.time_ns == (2**40, 0)
    assert far_event.record == {"n": 1}
    with pytest.raises(ValueError, match="outside datetime's years"):
        far_event.datetime
    assert event.datetime.isoformat() == "2026-11-21T16:00:00+00:00"


def test_unusual_keys():
    # msgpack's Packer writes what Python allows as keys; the rest is packed by hand:
    # an array key (a tuple in Python), a map key (not hashable: its repr) and invalid UTF-8.
    raw = (
        b"\x86"
        + msgpack.packb(1) + msgpack.packb("int")
        + msgpack.packb(None) + msgpack.packb("nil")
        + msgpack.packb([1, "a"]) + msgpack.packb("array")
        + msgpack.packb({"a": 1}) + msgpack.packb("map")
        + b"\xa2\xff\xfe" + msgpack.packb("bad utf-8")
        + msgpack.packb("k" * 100) + msgpack.packb("long")
    )
    (got,) = records([raw])
    assert got == {
        1: "int",
        None: "nil",
        (1, "a"): "array",
        "{'a': 1}": "map",
        "\ufffd\ufffd": "bad utf-8",
        "k" * 100: "long",
    }


def test_invalid_utf8_values_are_replaced():
    raw = b"\x81" + msgpack.packb("v") + b"\xa4a\xffb\xc3"
    assert records([raw]) == [{"v": "a\ufffdb\ufffd"}]


def test_keys_are_shared_between_records_and_never_mixed_up():
    first = [{"host": "a", "status": 200, f"only{i}": i} for i in range(50)]
    got = records(first)
    assert got == first
    # The same key is the same string object in every record.
    hosts = {id(next(k for k in r if k == "host")) for r in got}
    assert len(hosts) == 1
    # Another chunk, other keys and a key that was a value before: no mix-up.
    second = [{"a": "host", "host": {"status": "a"}, "": 0}]
    assert records(second, tag="other") == second


def test_keys_in_changing_orders_and_nested_maps():
    # The cache guesses that a record lists its keys in the order the last one did: every
    # shuffle, a nested map in between and a key of one byte more must still come out right.
    keys = ["host", "method", "path", "status", "hos", "hostt"]
    rows = []
    for i in range(40):
        order = keys[i % 6 :] + keys[: i % 6]
        if i % 3 == 0:
            order.reverse()
        row = {k: f"{k}-{i}" for k in order}
        row["nested"] = {k: i for k in reversed(order)}
        rows.append(row)
    got = records(rows)
    assert got == rows
    assert [list(r) for r in got] == [list(r) for r in rows]
    assert [list(r["nested"]) for r in got] == [list(r["nested"]) for r in rows]


def test_many_distinct_keys():
    # More distinct keys than the cache holds: it starts afresh, values stay right.
    values = [{f"key-{i}-{j}": j for j in range(100)} for i in range(100)]
    assert records(values) == values


def test_a_chunk_shares_one_tag_string():
    pointer, body = chunk([{"a": 1}, {"a": 2}], tag="app.shared")
    tags = [e.tag for e in claimcheck.decode(pointer, body)]
    assert tags == ["app.shared", "app.shared"]
    assert tags[0] is tags[1]


@pytest.mark.parametrize("value", [math.inf, -0.0, 1e308])
def test_floats(value):
    (got,) = records([{"f": value}])
    assert got["f"] == value and math.copysign(1, got["f"]) == math.copysign(1, value)
