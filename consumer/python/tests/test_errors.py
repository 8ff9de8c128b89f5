"""Bad input raises the crate's errors as typed exceptions; a failing read is retryable."""

import io
import json

import pytest

import claimcheck
from conftest import VECTORS


def good():
    pointer = claimcheck.Pointer.parse((VECTORS / "msgpack-zstd.pointer.json").read_bytes())
    return pointer, (VECTORS / "msgpack-zstd.object").read_bytes()


def test_pointer_fields():
    pointer, body = good()
    assert pointer.v == 1
    assert pointer.bucket and pointer.key
    assert (pointer.format, pointer.compression) == ("msgpack", "zstd")
    assert pointer.stored_bytes == len(body)
    assert not pointer.is_inline
    assert pointer.location == f"s3://{pointer.bucket}/{pointer.key}"
    assert claimcheck.Pointer.parse(pointer.to_record()) == pointer
    assert claimcheck.Pointer.parse(pointer.to_json()) == pointer


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"{}", b'{"v":1}', b"[1,2]", "{\"v\": \"one\"}"]
)
def test_garbage_is_a_malformed_pointer(data):
    with pytest.raises(claimcheck.MalformedPointer) as raised:
        claimcheck.Pointer.parse(data)
    assert raised.value.is_chunk_error
    assert isinstance(raised.value, ValueError)


def test_unknown_version():
    pointer, _ = good()
    doc = json.loads(pointer.to_json())
    doc["v"] = 99
    with pytest.raises(claimcheck.UnsupportedVersion) as raised:
        claimcheck.Pointer.parse(json.dumps(doc).encode())
    assert raised.value.version == 99
    # A newer reader reads it: not one to skip.
    assert isinstance(raised.value, claimcheck.ReaderError)
    assert not raised.value.is_chunk_error


@pytest.mark.parametrize("source", [bytes, io.BytesIO])
@pytest.mark.parametrize("check", ["verify", "one-pass"])
@pytest.mark.parametrize("change", [-1, +1])
def test_truncated_or_longer_object(source, check, change):
    pointer, body = good()
    changed = body[:-1] if change < 0 else body + b"\x00"
    with pytest.raises(claimcheck.SizeMismatch) as raised:
        if check == "verify":
            claimcheck.verify(pointer, source(changed))
        else:
            claimcheck.decode(pointer, source(changed), verify_first=True)
    assert (raised.value.expected, raised.value.actual) == (len(body), len(body) + change)


def test_wrong_checksum_is_raised_after_the_events_when_not_verified_first():
    pointer, body = good()
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0x10
    with pytest.raises(claimcheck.ChecksumMismatch) as raised:
        claimcheck.verify(pointer, bytes(damaged))
    assert raised.value.expected == pointer.crc32c
    assert raised.value.actual != pointer.crc32c
    events = claimcheck.decode(pointer, bytes(damaged))
    with pytest.raises((claimcheck.ChecksumMismatch,)):
        for _ in events:
            pass
    # Iterated again after the error: nothing more, and not done (it was not checked).
    assert list(events) == []
    assert not events.done
    closed = claimcheck.decode(pointer, body)
    next(closed)
    closed.close()
    assert list(closed) == [] and not closed.done
    # Checked in one pass: raised before any event.
    for source in (bytes(damaged), io.BytesIO(damaged)):
        with pytest.raises(claimcheck.ChecksumMismatch):
            claimcheck.decode(pointer, source, verify_first=True)


def test_a_pointer_to_s3_needs_a_body():
    pointer, _ = good()
    with pytest.raises(ValueError):
        claimcheck.verify(pointer)


class Failing(io.RawIOBase):
    """Hands out half of the body, then fails as a dropped connection does."""

    def __init__(self, data):
        self.data = data[: len(data) // 2]

    def read(self, n=-1):
        if not self.data:
            raise ConnectionResetError("connection reset by peer")
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_a_failing_read_is_a_retryable_s3_error_with_its_cause():
    pointer, body = good()
    for check in (claimcheck.verify, lambda p, b: claimcheck.decode(p, b, verify_first=True)):
        with pytest.raises(claimcheck.S3Error) as raised:
            check(pointer, Failing(body))
        assert not raised.value.is_chunk_error
        assert isinstance(raised.value, claimcheck.RetryableError)
        assert isinstance(raised.value.__cause__, ConnectionResetError)


class Recording(io.RawIOBase):
    def __init__(self, data):
        self.file = io.BytesIO(data)
        self.asked = []

    def read(self, n=-1):
        self.asked.append(n)
        return self.file.read(n)


def test_file_objects_are_read_in_blocks():
    """A 4 MiB body is read 64 KiB at a time, never whole."""
    pointer, body = good()
    big = (VECTORS / "msgpack-none.object").read_bytes()
    p = claimcheck.Pointer.parse((VECTORS / "msgpack-none.pointer.json").read_bytes())
    # Many copies of the same body under one pointer: the checks fail at the end, but the
    # reads show how the body is pulled.
    data = big * (4 * 1024 * 1024 // len(big))
    source = Recording(data)
    with pytest.raises(claimcheck.ClaimcheckError):
        claimcheck.verify(p, source)
    assert len(source.asked) > 60
    assert all(0 < n <= 64 * 1024 for n in source.asked), set(source.asked)


def test_events_can_be_stopped_early():
    pointer, body = good()
    events = claimcheck.decode(pointer, body)
    first = next(events)
    assert first.record["msg"] == "hello"
    events.close()
    assert list(events) == []


class Body(io.BytesIO):
    """A boto3 StreamingBody stand-in that counts its closes."""

    closes = 0

    def close(self):
        self.closes += 1
        super().close()


class FakeS3:
    """get_object of one object, whose bodies it keeps."""

    def __init__(self, data):
        self.data = data
        self.bodies = []

    def get_object(self, Bucket, Key, IfMatch=None):  # noqa: N803 - boto3's names
        self.bodies.append(Body(self.data))
        return {"Body": self.bodies[-1], "ContentLength": len(self.data), "ETag": '"e"'}


class ReplacedOnce(FakeS3):
    """Its object is uploaded again (same bytes, a new ETag, as a retried upload under SSE-KMS)
    between the first two reads."""

    def __init__(self, data):
        super().__init__(data)
        self.if_match = []

    def get_object(self, Bucket, Key, IfMatch=None):  # noqa: N803 - boto3's names
        import botocore.exceptions

        self.if_match.append(IfMatch)
        if IfMatch is not None and len(self.if_match) == 2:
            raise botocore.exceptions.ClientError(
                {
                    "Error": {"Code": "PreconditionFailed"},
                    "ResponseMetadata": {"HTTPStatusCode": 412},
                },
                "GetObject",
            )
        return super().get_object(Bucket, Key, IfMatch)


def test_an_object_uploaded_again_between_its_two_reads_is_read_again():
    pointer, body = good()
    s3 = ReplacedOnce(body)
    events = claimcheck.resolve(pointer, s3, in_memory_body_bytes=0, in_memory_object_bytes=0)
    assert len(list(events)) == pointer.records
    assert s3.if_match == [None, '"e"', None, '"e"']
    assert all(b.closes == 1 for b in s3.bodies)


@pytest.mark.parametrize("how", ["end", "close", "with", "error"])
def test_the_s3_body_is_closed_when_the_events_end(how):
    pointer, body = good()
    if how == "error":
        body = body[:-1] + bytes([body[-1] ^ 1])
    s3 = FakeS3(body)
    events = claimcheck.resolve(pointer, s3, verify_first=False)
    assert isinstance(events, claimcheck.Events)
    assert events.pointer == pointer
    assert repr(events) == f"Events({pointer!r})"
    (streamed,) = s3.bodies
    assert streamed.closes == 0
    if how == "end":
        assert len(list(events)) == pointer.records
    elif how == "close":
        next(events)
        events.close()
        events.close()
    elif how == "with":
        with events as same:
            assert same is events
            next(events)
    else:
        with pytest.raises(claimcheck.ChecksumMismatch):
            list(events)
    assert streamed.closes == 1
    assert list(events) == []


def test_objects_verified_first_are_read_once_and_closed():
    pointer, body = good()
    s3 = FakeS3(body)
    events = claimcheck.resolve(pointer, s3)
    assert [b.closes for b in s3.bodies] == [1]
    assert len(list(events)) == pointer.records
    # Above in_memory_body_bytes: read once, held compressed.
    s3 = FakeS3(body)
    events = claimcheck.resolve(pointer, s3, in_memory_body_bytes=0)
    assert [b.closes for b in s3.bodies] == [1]
    assert len(list(events)) == pointer.records
    # Above in_memory_object_bytes too: read twice, the second time streamed.
    s3 = FakeS3(body)
    events = claimcheck.resolve(pointer, s3, in_memory_body_bytes=0, in_memory_object_bytes=0)
    assert [b.closes for b in s3.bodies] == [1, 0]
    assert len(list(events)) == pointer.records
    assert [b.closes for b in s3.bodies] == [1, 1]
