"""Servers for the tests: a moto S3+Kinesis emulator and real claimcheck sidecars.

The sidecar binary is $CLAIMCHECK_BIN, or target/debug/claimcheck of this repository
(`cargo build --bin claimcheck`). moto_server comes from the venv pytest runs in
(scripts/install-deps). Everything listens on 127.0.0.1, on free ports.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest

ROOT = Path(__file__).resolve().parents[3]
VECTORS = ROOT / "consumer" / "tests" / "vectors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, timeout: float = 30.0, proc=None, log=None):
    """Polls `condition` until it returns something true; fails with `what` after
    `timeout` seconds or as soon as `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            text = Path(log).read_text()[-3000:] if log else ""
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{text}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def workdir():
    d = tempfile.mkdtemp(prefix="claimcheck-py-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def moto(workdir):
    """The endpoint URL of a moto server; AWS settings in the environment point at it."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.fail(f"moto_server is not beside {sys.executable}: run scripts/install-deps")
    port = free_port()
    log = workdir / "moto.log"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(workdir)},
    )
    try:
        wait_until(lambda: listening(port), "moto to listen", proc=proc, log=log)
        url = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ENDPOINT_URL=url,
            AWS_REGION="us-east-1",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_EC2_METADATA_DISABLED="true",
        )
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def s3(moto):
    return boto3.client("s3")


@pytest.fixture(scope="session")
def kinesis(moto):
    return boto3.client("kinesis")


def sidecar_binary() -> Path:
    path = Path(os.environ.get("CLAIMCHECK_BIN") or ROOT / "target" / "debug" / "claimcheck")
    if not path.exists():
        pytest.fail(
            f"no claimcheck binary at {path}: build it (cargo build --bin claimcheck) "
            "or set CLAIMCHECK_BIN"
        )
    return path


class Sidecar:
    """A running `claimcheck serve` writing to its own bucket and stream."""

    def __init__(self, workdir: Path, s3, kinesis, name: str, *args: str):
        self.bucket = f"logs-{name}"
        self.stream = f"pointers-{name}"
        s3.create_bucket(Bucket=self.bucket)
        kinesis.create_stream(StreamName=self.stream, ShardCount=1)
        wait_until(
            lambda: kinesis.describe_stream_summary(StreamName=self.stream)[
                "StreamDescriptionSummary"
            ]["StreamStatus"]
            == "ACTIVE",
            "the stream to be active",
        )
        self.kinesis = kinesis
        self.port = free_port()
        self.log = workdir / f"sidecar-{name}.log"
        self.proc = subprocess.Popen(
            [
                str(sidecar_binary()),
                "serve",
                "--listen", f"127.0.0.1:{self.port}",
                "--metrics-listen", f"127.0.0.1:{free_port()}",
                "--buffer-dir", str(workdir / f"buffer-{name}"),
                "--s3-bucket", self.bucket,
                "--kinesis-stream", self.stream,
                "--flush-interval", "1s",
                *args,
            ],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: listening(self.port), "the sidecar to listen", proc=self.proc, log=self.log)

    def send(self, events) -> None:
        """Sends (tag, (secs, nanos), record) events with the Python fluent-logger."""
        from fluent import sender

        client = sender.FluentSender(
            None, host="127.0.0.1", port=self.port, nanosecond_precision=True, timeout=30
        )
        try:
            for tag, (secs, nanos), record in events:
                if not client.emit_with_time(tag, sender.EventTime(secs, nanos), record):
                    pytest.fail(f"send failed: {client.last_error}")
        finally:
            client.close()

    def records(self, count: int) -> list:
        """The first `count` Kinesis records of the stream, waiting for them."""
        shard = self.kinesis.list_shards(StreamName=self.stream)["Shards"][0]["ShardId"]
        iterator = self.kinesis.get_shard_iterator(
            StreamName=self.stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        got = []

        def more():
            nonlocal iterator
            out = self.kinesis.get_records(ShardIterator=iterator)
            iterator = out["NextShardIterator"]
            got.extend(out["Records"])
            return len(got) >= count

        wait_until(more, f"{count} pointer records", timeout=60, proc=self.proc, log=self.log)
        return got[:count]

    def stop(self) -> None:
        stop(self.proc)


@pytest.fixture(scope="session")
def sidecars(workdir, s3, kinesis):
    """Starts sidecars by name and settings, once each; stops them all at the end."""
    running = {}

    def start(name: str, *args: str) -> Sidecar:
        if name not in running:
            running[name] = Sidecar(workdir, s3, kinesis, name, *args)
        return running[name]

    yield start
    for s in running.values():
        s.stop()
