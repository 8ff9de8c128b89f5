"""Exceptions, one per error of the Rust crate (``claimcheck_consumer::Error``).

Every exception is a :class:`ClaimcheckError`, and one of

* a :class:`ChunkError`: about one pointer or its object (not a pointer, missing, changed,
  damaged, undecodable). Reading it again fails the same way, whatever reads it: the pointer
  can be skipped (or sent to a dead-letter queue);
* a :class:`ReaderError`: this reader cannot read the chunk (a pointer from a newer sidecar,
  a body over ``max_body_bytes``), a newer reader or a higher limit can. Skipping it would
  lose the chunk: upgrade the consumer or raise the limit, then read it again;
* a :class:`RetryableError`: a call that failed (S3, the network) and may succeed again.

``err.is_chunk_error`` says which, as ``Error::is_chunk_error`` does in Rust. Fields of the
Rust error are attributes (``expected``, ``actual``, ``bucket``, ``key``, ...).
"""

from __future__ import annotations


class ClaimcheckError(Exception):
    """Anything that went wrong between a pointer record and its events."""

    is_chunk_error = False

    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.message = message
        for name, value in fields.items():
            setattr(self, name, value)


class ChunkError(ClaimcheckError):
    """The pointer or its object is bad: retrying will not help; the pointer can be skipped."""

    is_chunk_error = True


class ReaderError(ClaimcheckError):
    """This reader cannot read the chunk, though a newer one, or one with a higher limit, can:
    do not skip it (``is_chunk_error`` is false); upgrade or raise the limit."""


class RetryableError(ClaimcheckError):
    """A call failed (S3, the network, a file object's read): it may succeed when retried."""


class MalformedPointer(ChunkError, ValueError):
    """The record is not a pointer (bad JSON, a missing or ill-typed field)."""


class UnsupportedVersion(ReaderError):
    """The pointer was written by a newer producer than this reader understands
    (``version``)."""


class ObjectMissing(ChunkError):
    """The object the pointer names does not exist (``bucket``, ``key``)."""


class ObjectChanged(ChunkError):
    """The object was replaced between the read that verified it and the read that decoded it
    (``bucket``, ``key``)."""


class ChecksumMismatch(ChunkError):
    """The stored body's CRC32C is not the pointer's (``expected``, ``actual``)."""


class SizeMismatch(ChunkError):
    """A size in the pointer does not match what was read (``what``: ``"stored object
    bytes"``, ``"inline body bytes"``, ``"decompressed body bytes"`` or ``"event count"``;
    ``expected``, ``actual``)."""


class BodyTooLarge(ReaderError):
    """The body (``bytes``, decompressed) is over this reader's ``limit``."""


class DecompressError(ChunkError):
    """The body could not be decompressed."""


class DecodeError(ChunkError):
    """The decompressed body is not valid in its format."""


class S3Error(RetryableError):
    """A call to S3 failed, or reading the object's body did (the boto3 or network exception
    is ``__cause__``)."""


__all__ = [
    "ClaimcheckError",
    "ChunkError",
    "ReaderError",
    "RetryableError",
    "MalformedPointer",
    "UnsupportedVersion",
    "ObjectMissing",
    "ObjectChanged",
    "ChecksumMismatch",
    "SizeMismatch",
    "BodyTooLarge",
    "DecompressError",
    "DecodeError",
    "S3Error",
]
