"""Objects and records written by the real sidecar, read back through moto with boto3."""

import base64
import copy

import pytest

import claimcheck
import claimcheck.lambda_

SHAPES = [
    ("msgpack", "zstd"),
    ("msgpack", "gzip"),
    ("msgpack", "none"),
    ("json", "zstd"),
    ("json", "gzip"),
    ("json", "none"),
]
EVENTS_PER_CHUNK = 50


def events_for(tag, n, start=1_763_740_800):
    return [
        (
            tag,
            (start, i * 1000 + 7),
            {"msg": f"line {i} " + "x" * (i % 17), "n": i, "ok": i % 2 == 0, "nested": {"a": [i, "b"]}},
        )
        for i in range(n)
    ]


def produce(sidecars, name, fmt, compression, inline_max="0", chunks=1):
    """Starts a sidecar of this shape, sends `chunks` chunks' worth of events and returns the
    events sent and the pointer records published."""
    sidecar = sidecars(
        name,
        "--format", fmt,
        "--compression", compression,
        "--inline-max-bytes", inline_max,
        "--chunk-limit-records", str(EVENTS_PER_CHUNK),
    )
    sent = events_for(f"app.{name}", EVENTS_PER_CHUNK * chunks)
    sidecar.send(sent)
    return sidecar, sent, sidecar.records(chunks)


def check(events, sent):
    assert [e.tag for e in events] == [tag for tag, _, _ in sent]
    assert [e.time_ns for e in events] == [t for _, t, _ in sent]
    assert [e.record for e in events] == [r for _, _, r in sent]
    for e, (_, (secs, nanos), _) in zip(events, sent):
        assert e.time == pytest.approx(secs + nanos / 1e9)
        assert e.datetime.timestamp() == pytest.approx(secs + nanos / 1e9, abs=1e-6)


def check_chunks(events, sent):
    """`check` for events of several chunks, which the sidecar uploads concurrently and so
    may publish in any order: compared in the order of their times (each event's is unique)."""
    check(sorted(events, key=lambda e: e.time_ns), sorted(sent, key=lambda s: s[1]))


@pytest.mark.parametrize("fmt,compression", SHAPES, ids=[f"{f}-{c}" for f, c in SHAPES])
def test_resolve_objects_of_every_format_and_compression(sidecars, s3, fmt, compression):
    _, sent, records = produce(sidecars, f"{fmt}-{compression}", fmt, compression)
    pointer = claimcheck.Pointer.parse(records[0]["Data"])
    assert (pointer.format, pointer.compression, pointer.is_inline) == (fmt, compression, False)
    assert pointer.records == EVENTS_PER_CHUNK
    # Verified before the first event: decoded in the same pass, checked from a compressed
    # copy, or read twice; or read once and checked at the end.
    for options in (
        {},
        {"in_memory_body_bytes": 0},
        {"in_memory_body_bytes": 0, "in_memory_object_bytes": 0},
        {"verify_first": False},
    ):
        events = claimcheck.resolve(records[0]["Data"], s3, **options)
        assert events.pointer == pointer
        check(list(events), sent)


def test_inline_records_need_no_s3(sidecars):
    _, sent, records = produce(sidecars, "inline", "msgpack", "zstd", inline_max="24KiB")
    pointer = claimcheck.Pointer.parse(records[0]["Data"])
    assert pointer.is_inline and pointer.v == 2 and pointer.bucket == ""

    class NoS3:
        def get_object(self, **_):
            raise AssertionError("an inline pointer was fetched")

    check(list(claimcheck.resolve(pointer, NoS3())), sent)
    # Over in_memory_body_bytes: checked first, then decoded as iterated, not held whole.
    events = claimcheck.resolve(pointer, NoS3(), in_memory_body_bytes=0)
    assert not events.done
    check(list(events), sent)
    assert events.done


def test_object_errors(sidecars, s3):
    sidecar, _, records = produce(sidecars, "damaged", "msgpack", "zstd", chunks=3)
    pointers = [claimcheck.Pointer.parse(r["Data"]) for r in records]

    s3.delete_object(Bucket=pointers[0].bucket, Key=pointers[0].key)
    with pytest.raises(claimcheck.ObjectMissing) as raised:
        claimcheck.resolve(pointers[0], s3)
    assert raised.value.is_chunk_error and raised.value.key == pointers[0].key

    body = s3.get_object(Bucket=pointers[1].bucket, Key=pointers[1].key)["Body"].read()
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 1
    s3.put_object(Bucket=pointers[1].bucket, Key=pointers[1].key, Body=bytes(damaged))
    for options in (
        {},
        {"in_memory_body_bytes": 0},
        {"in_memory_body_bytes": 0, "in_memory_object_bytes": 0},
    ):
        with pytest.raises(claimcheck.ChecksumMismatch):
            claimcheck.resolve(pointers[1], s3, **options)
    with pytest.raises(claimcheck.ChecksumMismatch):
        list(claimcheck.resolve(pointers[1], s3, verify_first=False))

    s3.put_object(Bucket=pointers[2].bucket, Key=pointers[2].key, Body=body[:-3])
    for options in ({}, {"in_memory_body_bytes": 0}):
        with pytest.raises(claimcheck.SizeMismatch):
            claimcheck.resolve(pointers[2], s3, **options)

    with pytest.raises(claimcheck.BodyTooLarge) as raised:
        claimcheck.resolve(pointers[2], s3, max_body_bytes=10)
    assert isinstance(raised.value, claimcheck.ReaderError)
    assert not raised.value.is_chunk_error


def test_a_changed_object_is_not_read_twice(sidecars, s3):
    from claimcheck import _get

    _, _, records = produce(sidecars, "changed", "msgpack", "gzip")
    pointer = claimcheck.Pointer.parse(records[0]["Data"])
    with pytest.raises(claimcheck.ObjectChanged):
        _get(s3, pointer, if_match='"0123456789abcdef0123456789abcdef"')


def test_s3_failures_are_retryable(moto):
    import boto3
    from botocore.config import Config

    record = claimcheck.Pointer.parse(
        b'{"v":1,"chunk_id":"0193a1c2e4f87d3e9a5b6c7d8e9f0a1b","bucket":"no-such-bucket-here",'
        b'"key":"k","tag":"t","timekey":0,"first_time":1,"last_time":1,"records":1,"bytes":1,'
        b'"stored_bytes":1,"format":"msgpack","compression":"none","checksum":{"crc32c":"00000000"},'
        b'"producer":"h","created_at":"2026-01-01T00:00:00.000Z"}'
    )
    dead = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(claimcheck.S3Error) as raised:
        claimcheck.resolve(record, dead)
    assert not raised.value.is_chunk_error


def lambda_event(records, shard="shardId-000000000000"):
    return {
        "Records": [
            {
                "eventID": f"{shard}:{r['SequenceNumber']}",
                "eventSource": "aws:kinesis",
                "kinesis": {
                    "data": base64.b64encode(r["Data"]).decode(),
                    "sequenceNumber": r["SequenceNumber"],
                    "partitionKey": r["PartitionKey"],
                },
            }
            for r in records
        ]
    }


def test_lambda_batches(sidecars, s3):
    _, sent, records = produce(sidecars, "lambda", "msgpack", "zstd", inline_max="2KiB", chunks=4)
    claimcheck.lambda_.forget()
    event = lambda_event(records)
    # A re-published pointer: the same chunk twice in one batch.
    event["Records"].insert(2, copy.deepcopy(event["Records"][1]))

    got = []
    with claimcheck.lambda_.chunks(event, s3) as batch:
        for chunk in batch:
            got.extend(chunk.events)
    assert batch.response == {"batchItemFailures": []}
    check_chunks(got, sent)

    # A warm container drops the chunks it already processed.
    with claimcheck.lambda_.chunks(event, s3) as again:
        assert list(again) == []
    assert again.response == {"batchItemFailures": []}


def test_lambda_reports_the_record_to_retry_from(sidecars, s3):
    _, _, records = produce(sidecars, "lambda-fail", "msgpack", "gzip", chunks=3)
    claimcheck.lambda_.forget()
    event = lambda_event(records)

    # The function fails on the second chunk: Lambda must retry from it.
    seen = []
    with claimcheck.lambda_.chunks(event, s3) as batch:
        for chunk in batch:
            if len(seen) == 1:
                raise RuntimeError("downstream is down")
            seen.append(chunk.pointer.chunk_id)
    assert batch.response == {"batchItemFailures": [{"itemIdentifier": records[1]["SequenceNumber"]}]}
    assert isinstance(batch.error, RuntimeError)

    # Lambda retries from the second record; the first is dropped as a duplicate if resent.
    with claimcheck.lambda_.chunks(event, s3) as retry:
        ids = [chunk.pointer.chunk_id for chunk in retry]
    assert ids == [claimcheck.Pointer.parse(r["Data"]).chunk_id for r in records[1:]]

    # A missing object stops the batch there, unless chunk errors are skipped.
    claimcheck.lambda_.forget()
    p = claimcheck.Pointer.parse(records[1]["Data"])
    s3.delete_object(Bucket=p.bucket, Key=p.key)
    with claimcheck.lambda_.chunks(event, s3) as batch:
        ids = [chunk.pointer.chunk_id for chunk in batch]
    assert len(ids) == 1
    assert batch.response == {"batchItemFailures": [{"itemIdentifier": records[1]["SequenceNumber"]}]}
    assert isinstance(batch.error, claimcheck.ObjectMissing)

    claimcheck.lambda_.forget()
    with claimcheck.lambda_.chunks(event, s3, skip=lambda e: e.is_chunk_error) as batch:
        ids = [chunk.pointer.chunk_id for chunk in batch]
    assert len(ids) == 2
    assert batch.response == {"batchItemFailures": []}

    # Without the with block the exception fails the invocation, as Lambda expects.
    claimcheck.lambda_.forget()
    with pytest.raises(RuntimeError):
        for chunk in claimcheck.lambda_.chunks(event, s3, skip=lambda e: e.is_chunk_error):
            raise RuntimeError("boom")


def test_lambda_skips_a_chunk_whose_events_fail_as_they_are_read(sidecars, s3):
    _, _, records = produce(sidecars, "lambda-damaged", "msgpack", "zstd", chunks=3)
    p = claimcheck.Pointer.parse(records[1]["Data"])
    body = bytearray(s3.get_object(Bucket=p.bucket, Key=p.key)["Body"].read())
    body[len(body) // 2] ^= 0x10
    s3.put_object(Bucket=p.bucket, Key=p.key, Body=bytes(body))
    event = lambda_event(records)

    def run(**options):
        claimcheck.lambda_.forget()
        seen = []
        with claimcheck.lambda_.chunks(event, s3, verify_first=False, **options) as batch:
            for chunk in batch:
                seen.append(chunk.pointer.chunk_id)
                list(chunk.events)
        # The damage showed while the second chunk's events were read, not before.
        assert len(seen) == 2
        assert isinstance(batch.error, claimcheck.ChunkError)
        return batch.response

    def retry_from(i):
        return {"batchItemFailures": [{"itemIdentifier": records[i]["SequenceNumber"]}]}

    assert run() == retry_from(1)
    assert run(skip=lambda e: e.is_chunk_error) == retry_from(2)


def test_lambda_loop_left_early(sidecars, s3):
    _, _, records = produce(sidecars, "lambda-break", "msgpack", "zstd", chunks=3)
    ids = [claimcheck.Pointer.parse(r["Data"]).chunk_id for r in records]
    event = lambda_event(records)

    def retry_from(i):
        return {"batchItemFailures": [{"itemIdentifier": records[i]["SequenceNumber"]}]}

    def fresh():
        claimcheck.lambda_.forget()
        return claimcheck.lambda_.chunks(event, s3)

    # Left before reading the second chunk's events (out of time, say): Lambda retries from it.
    with fresh() as batch:
        for n, chunk in enumerate(batch):
            if n == 1:
                break
            assert not chunk.events.done
            list(chunk.events)
            assert chunk.events.done
    assert batch.response == retry_from(1)
    with claimcheck.lambda_.chunks(event, s3) as retry:
        assert [c.pointer.chunk_id for c in retry] == ids[1:], "the second is not taken as processed"

    # Left once the second chunk's events were all read: Lambda retries from the third.
    with fresh() as batch:
        for n, chunk in enumerate(batch):
            list(chunk.events)
            if n == 1:
                break
    assert batch.response == retry_from(2)

    # Without the with block, the response names the record to retry from all the same; read
    # to the end, nothing.
    cases = [
        (False, True, retry_from(0)),
        (True, True, retry_from(1)),
        (True, False, {"batchItemFailures": []}),
    ]
    for read, stop, expected in cases:
        batch = fresh()
        for chunk in batch:
            if read:
                list(chunk.events)
            if stop:
                break
        assert batch.response == expected, (read, stop)


def test_the_example_function(sidecars, s3, capsys, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    _, sent, records = produce(sidecars, "example", "json", "zstd", inline_max="1KiB", chunks=2)
    claimcheck.lambda_.forget()
    monkeypatch.setattr(claimcheck, "_default_client", s3)
    path = Path(__file__).resolve().parents[1] / "examples" / "lambda_function.py"
    spec = importlib.util.spec_from_file_location("lambda_function", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.handler(lambda_event(records), None) == {"batchItemFailures": []}
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Chunks may be published in any order (see check_chunks).
    by_n = lambda r: r["n"]  # noqa: E731
    assert sorted((p["record"] for p in printed), key=by_n) == sorted((r for _, _, r in sent), key=by_n)
