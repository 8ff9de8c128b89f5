"""AWS Lambda: the chunks of a Kinesis event source mapping's batch.

::

    import claimcheck.lambda_

    def handler(event, context):
        with claimcheck.lambda_.chunks(event) as batch:
            for chunk in batch:
                for e in chunk.events:
                    print(e.tag, e.time, e.record)
        return batch.response

Chunks come in record order (Lambda delivers one shard per batch). When a pointer cannot be
resolved, or the loop's body raises inside the ``with`` block, the batch stops there and
``batch.response`` names that record (``{"batchItemFailures": [{"itemIdentifier":
sequenceNumber}]}``), so that Lambda retries from it; the exception is logged and not raised.
This needs ``FunctionResponseTypes: ["ReportBatchItemFailures"]`` on the event source mapping.
Without the ``with`` block an exception from the loop fails the invocation, and Lambda retries
the whole batch.

Duplicates (a pointer re-published after a sidecar crash, or a batch retried) are dropped when
their chunk id is among the last ``DEDUP_WINDOW`` chunks processed in this execution
environment: the window lives in module memory, carries over between invocations of a warm
environment and starts empty in a new one. A chunk counts as processed when the loop asks for
the next one (or ends) without an exception. A loop left early (``break``) counts the chunk
it was on as processed only if its events were read to the end (``chunk.events.done``);
``batch.response`` then names the record Lambda must retry from, with or without the ``with``
block.

This mirrors the Rust crate's ``lambda::Consumer``.
"""

from __future__ import annotations

import base64
import logging
from collections import OrderedDict
from typing import Any, Callable, Iterator, List, Optional

from . import Events, Pointer, errors, resolve

__all__ = ["chunks", "Batch", "Chunk", "DEDUP_WINDOW", "forget"]

log = logging.getLogger("claimcheck")

#: How many processed chunk ids are remembered to drop duplicates (as the Rust crate's
#: default dedup window).
DEDUP_WINDOW = 10_000

_recent: "OrderedDict[str, None]" = OrderedDict()


def _seen(chunk_id: str) -> bool:
    return chunk_id in _recent


def _remember(chunk_id: str) -> None:
    if DEDUP_WINDOW <= 0:
        return
    _recent[chunk_id] = None
    _recent.move_to_end(chunk_id)
    while len(_recent) > DEDUP_WINDOW:
        _recent.popitem(last=False)


def forget() -> None:
    """Empties the dedup window (as a new execution environment starts)."""
    _recent.clear()


class Chunk:
    """One pointer record of the batch and its events.

    ``events`` is a lazy iterator of :class:`claimcheck.Event`, verified before the first
    one; ``pointer``, ``sequence_number``, ``shard_id``.
    """

    __slots__ = ("pointer", "events", "sequence_number", "shard_id")

    def __init__(self, pointer: Pointer, events: Events, sequence_number: str, shard_id: str):
        self.pointer = pointer
        self.events = events
        self.sequence_number = sequence_number
        self.shard_id = shard_id

    def __repr__(self) -> str:
        return f"Chunk({self.pointer!r}, sequence_number={self.sequence_number!r})"


class Batch:
    """The chunks of one invocation's Kinesis event; see the module documentation.

    Iterate once. ``response`` is what the handler returns; ``failed`` is the record that
    stopped the batch (its sequence number) or ``None``, and ``error`` why.
    """

    def __init__(
        self,
        event: dict,
        s3_client: Any = None,
        *,
        skip: Optional[Callable[[errors.ClaimcheckError], bool]] = None,
        **resolve_options: Any,
    ):
        self._records = event.get("Records", [])
        self._s3 = s3_client
        self._skip = skip
        self._options = resolve_options
        self._current: Optional[Chunk] = None
        self.failed: Optional[str] = None
        self.error: Optional[BaseException] = None
        self._started = False
        self._done = False
        self._index = 0

    @property
    def response(self) -> dict:
        """``{"batchItemFailures": [...]}``: empty, or the record Lambda must retry from."""
        if self.failed is None and self._started and not self._done:
            self._left_early()
        items: List[dict] = []
        if self.failed is not None:
            items.append({"itemIdentifier": self.failed})
        return {"batchItemFailures": items}

    def _left_early(self) -> None:
        """The loop stopped before the batch's end without an exception: Lambda retries from
        the chunk it was on, unless its events were read to the end, then from the next
        record, which nobody saw."""
        chunk = self._current
        self._current = None
        if chunk is not None and not chunk.events.done:
            chunk.events.close()
            self.failed = chunk.sequence_number
        else:
            if chunk is not None:
                _remember(chunk.pointer.chunk_id)
            self._retry_from_next()
            if self.failed is None:
                return
        self._done = True
        log.warning("loop left early; Lambda will retry from %s", self.failed)

    def _retry_from_next(self) -> None:
        """Lambda retries from the record after the current one, which nobody saw; none left:
        the batch is done."""
        rest = self._records[self._index + 1 :]
        if rest:
            self.failed = rest[0].get("kinesis", {}).get("sequenceNumber", "")
        self._done = True

    def __iter__(self) -> Iterator[Chunk]:
        if self._started:
            raise RuntimeError("a batch is iterated once")
        self._started = True
        return self._chunks()

    def _chunks(self) -> Iterator[Chunk]:
        in_batch = set()
        for index, record in enumerate(self._records):
            self._index = index
            kinesis = record.get("kinesis", {})
            sequence = kinesis.get("sequenceNumber", "")
            shard = (record.get("eventID") or "").split(":", 1)[0]
            try:
                pointer = Pointer.parse(base64.b64decode(kinesis.get("data", "")))
                if _seen(pointer.chunk_id) or pointer.chunk_id in in_batch:
                    log.debug("duplicate pointer dropped: %s", sequence)
                    continue
                in_batch.add(pointer.chunk_id)
                events = resolve(pointer, self._s3, **self._options)
            except errors.ClaimcheckError as e:
                if self._skip is not None and self._skip(e):
                    log.warning("skipping pointer at %s: %s", sequence, e)
                    continue
                self._fail(sequence, e)
                return
            chunk = Chunk(pointer, events, sequence, shard)
            self._current = chunk
            yield chunk
            # The loop asked for the next chunk: this one was processed.
            self._current = None
            _remember(pointer.chunk_id)
        self._done = True

    def _fail(self, sequence: str, error: BaseException) -> None:
        self.failed = sequence
        self.error = error
        log.error(
            "batch stopped at %s; Lambda will retry from this record: %s", sequence, error
        )

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        if error is None:
            if self._started and not self._done and self.failed is None:
                self._left_early()
            return False
        chunk = self._current
        self._current = None
        if chunk is None or not isinstance(error, Exception):
            return False
        chunk.events.close()
        if (
            isinstance(error, errors.ClaimcheckError)
            and self._skip is not None
            and self._skip(error)
        ):
            # Its events failed as they were read (not checked first): skipped as a pointer
            # that fails before its events is; the loop is over, so Lambda retries from the
            # next record, which nobody saw.
            log.warning("skipping pointer at %s: %s", chunk.sequence_number, error)
            self.error = error
            self._retry_from_next()
            return True
        self._fail(chunk.sequence_number, error)
        return True


def chunks(
    event: dict,
    s3_client: Any = None,
    *,
    skip: Optional[Callable[[errors.ClaimcheckError], bool]] = None,
    **resolve_options: Any,
) -> Batch:
    """The chunks of a Lambda Kinesis ``event``, in order: a :class:`Batch` to iterate (use it
    in a ``with`` block and return its ``response``).

    ``s3_client``: a boto3 S3 client (default ``boto3.client("s3")``). ``skip``: errors for
    which it returns true are logged and the record skipped instead of stopping the batch;
    ``skip=lambda e: e.is_chunk_error`` skips pointers whose objects are missing or damaged
    (which a retry would not mend). Other keywords go to :func:`claimcheck.resolve`.
    """
    return Batch(event, s3_client, skip=skip, **resolve_options)
