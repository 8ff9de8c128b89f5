"""Read claimcheck pointer records: the events of each chunk, verified and decompressed.

The sidecar stores each chunk of events as one S3 object (or, when small, inline in the
Kinesis record) and publishes a pointer record to Kinesis. This package turns a pointer record
back into events. The checks and the decoding are the Rust crate ``claimcheck-consumer``'s;
boto3 does the fetching, so credentials, regions, retries and test doubles work as usual.

::

    import claimcheck

    pointer = claimcheck.Pointer.parse(record_data)
    for event in claimcheck.resolve(pointer):
        print(event.tag, event.datetime, event.record)
"""

from __future__ import annotations

from typing import Any, Optional, Union

from . import errors
from ._native import Event, Events, Pointer
from ._native import decode as _decode
from ._native import verified as _verified
from ._native import verify as _verify
from ._native import verify_then_decode as _verify_then_decode
from .errors import *  # noqa: F401,F403

__all__ = [
    "Pointer",
    "Event",
    "Events",
    "resolve",
    "decode",
    "verify",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_IN_MEMORY_BODY_BYTES",
    "DEFAULT_IN_MEMORY_OBJECT_BYTES",
] + errors.__all__

#: Bodies larger than this (decompressed) are refused unless ``max_body_bytes`` is raised.
DEFAULT_MAX_BODY_BYTES = 4 << 30
#: Bodies up to this size (decompressed) are read once, checked and decoded in one pass, and
#: their events held until they are iterated.
DEFAULT_IN_MEMORY_BODY_BYTES = 64 << 20
#: Larger objects up to this size (stored) are read once and held, compressed, while they are
#: verified, then decoded from that copy; larger ones still are read twice, the second time
#: pinned to the first read's ETag.
DEFAULT_IN_MEMORY_OBJECT_BYTES = 16 << 20

PointerLike = Union[Pointer, bytes, bytearray, memoryview, str]


def _pointer(pointer: PointerLike) -> Pointer:
    if isinstance(pointer, Pointer):
        return pointer
    if isinstance(pointer, memoryview):
        pointer = pointer.tobytes()
    return Pointer.parse(pointer)


def _body_arg(body: Any) -> Any:
    return body.tobytes() if isinstance(body, memoryview) else body


def decode(pointer: PointerLike, body: Any = None, *, verify_first: bool = False) -> Events:
    """The events of a stored body you fetched yourself, as they are decoded.

    ``body`` is ``bytes``, a file object (read in 64 KiB blocks) or ``None`` for an inline
    pointer's own body. The checks (sizes, CRC32C, event count) are made when the body ends,
    and a failure is raised then.

    With ``verify_first`` the body is read, checked and decoded in one pass before this
    returns, so a failed check is raised here and no event of a damaged body is handed out;
    the decoded body is held in memory until its events are iterated. For a body too large
    for that, call :func:`verify` on the bytes first and then ``decode`` them again.
    """
    p = _pointer(pointer)
    if verify_first:
        return _verified(p, _body_arg(body))
    return _decode(p, _body_arg(body))


def verify(pointer: PointerLike, body: Any = None) -> None:
    """Reads a stored body to its end and makes every check, keeping no event; raises a
    :class:`ChunkError` (or :class:`S3Error` when ``body.read`` fails) if one fails."""
    p = _pointer(pointer)
    _verify(p, _body_arg(body))


_default_client = None


def _s3(client: Any) -> Any:
    global _default_client
    if client is not None:
        return client
    if _default_client is None:
        import boto3

        _default_client = boto3.client("s3")
    return _default_client


#: How many times an object replaced between its two reads is read again from the start
#: before :class:`ObjectChanged` (as the Rust crate).
_MAX_OBJECT_CHANGES = 2


def _get(s3: Any, p: Pointer, if_match: Optional[str] = None) -> Any:
    import botocore.exceptions

    args = {"Bucket": p.bucket, "Key": p.key}
    if if_match is not None:
        args["IfMatch"] = if_match
    try:
        response = s3.get_object(**args)
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "NotFound", "404"):
            raise errors.ObjectMissing(
                f"object s3://{p.bucket}/{p.key} is missing", bucket=p.bucket, key=p.key
            ) from e
        if code == "PreconditionFailed" or status == 412:
            raise errors.ObjectChanged(
                f"object s3://{p.bucket}/{p.key} changed while it was being read",
                bucket=p.bucket,
                key=p.key,
            ) from e
        hint = ""
        if status == 403:
            # Without s3:ListBucket, S3 answers a missing key with 403.
            hint = (
                " (access denied: a missing object reads so unless the reader has"
                " s3:ListBucket on the bucket)"
            )
        raise errors.S3Error(f"s3 GetObject failed{hint}: {e}", operation="GetObject") from e
    except botocore.exceptions.BotoCoreError as e:
        raise errors.S3Error(f"s3 GetObject failed: {e}", operation="GetObject") from e
    length = response.get("ContentLength")
    if length is not None and length != p.stored_bytes:
        response["Body"].close()
        raise errors.SizeMismatch(
            f"stored object bytes is {length}, the pointer says {p.stored_bytes}",
            what="stored object bytes",
            expected=p.stored_bytes,
            actual=length,
        )
    return response


def resolve(
    pointer: PointerLike,
    s3_client: Any = None,
    *,
    verify_first: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    in_memory_body_bytes: int = DEFAULT_IN_MEMORY_BODY_BYTES,
    in_memory_object_bytes: int = DEFAULT_IN_MEMORY_OBJECT_BYTES,
) -> Events:
    """The events of a pointer's chunk: fetched (from S3 with ``s3_client``, a boto3 S3
    client, by default ``boto3.client("s3")``; or from the record itself for an inline
    pointer), verified, decompressed and decoded, as a lazy iterator.

    With ``verify_first`` (the default) every check is made before this returns, so an error
    about the object is raised here and no event of a damaged object is ever handed out.
    Bodies up to ``in_memory_body_bytes`` (decompressed) are read once and checked and decoded
    in the same pass, their events held until iterated; objects up to
    ``in_memory_object_bytes`` are read once and held compressed while checked, then decoded
    from that copy; larger ones are read twice, the second time only if their ETag is
    unchanged.
    With ``verify_first=False`` the object is read once, events come as they are decoded, and
    a failed check is raised by the iterator at the end: discard what you got before it.

    The object is read in 64 KiB blocks from boto3's ``StreamingBody``; memory stays bounded
    whatever its size. Raises :class:`ChunkError` subclasses for bad pointers and objects and
    :class:`S3Error` for failed calls.
    """
    p = _pointer(pointer)
    if p.bytes > max_body_bytes:
        raise errors.BodyTooLarge(
            f"body of {p.bytes} bytes is over this reader's limit of {max_body_bytes}",
            bytes=p.bytes,
            limit=max_body_bytes,
        )
    if p.is_inline:
        if verify_first and p.bytes <= in_memory_body_bytes:
            return _verified(p, None)
        if verify_first:
            # A large body (an inline one compresses well): checked, then decoded as
            # iterated, rather than all its events held at once.
            _verify(p, None)
        return _decode(p, None)
    s3 = _s3(s3_client)
    response = _get(s3, p)
    body = response["Body"]
    if not verify_first:
        return _decode(p, body, release=body)
    if p.bytes <= in_memory_body_bytes:
        try:
            return _verified(p, body)
        finally:
            body.close()
    if p.stored_bytes <= in_memory_object_bytes:
        try:
            return _verify_then_decode(p, body)
        finally:
            body.close()
    changes = 0
    while True:
        try:
            _verify(p, body)
        finally:
            body.close()
        try:
            second = _get(s3, p, if_match=response.get("ETag"))
        except errors.ObjectChanged:
            # Replaced in between, before any event went out: a retried upload of the same
            # bytes has a new ETag under SSE-KMS. Checked again from the start.
            if changes >= _MAX_OBJECT_CHANGES:
                raise
            changes += 1
            response = _get(s3, p)
            body = response["Body"]
            continue
        return _decode(p, second["Body"], release=second["Body"])
