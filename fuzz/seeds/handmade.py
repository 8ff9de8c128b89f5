"""Writes the seed corpus: hand-encoded requests, plus captures made with capture.py.

    handmade.py SEEDS_DIR [CAPTURE.bin ...]

Each seed is a byte stream as a client sends it. SEEDS_DIR/frame/<name> gets the stream as is;
SEEDS_DIR/connection/<name> gets the connection target's two control bytes (largest write,
write-size seed) and then the stream, whole and in small writes. Captures are named after
their file names. The msgpack here is encoded by hand, so every header width
and type choice is deliberate; only the standard library and the `zstd` command are used.
"""

import gzip
import hashlib
import os
import struct
import subprocess
import sys


# --- msgpack, by hand -------------------------------------------------------------------------

def fixarray(n):
    return bytes([0x90 | n])


def array32(n):
    return b"\xdd" + struct.pack(">I", n)


def fixmap(n):
    return bytes([0x80 | n])


def map32(n):
    return b"\xdf" + struct.pack(">I", n)


def s(text):
    """Shortest str header."""
    b = text.encode() if isinstance(text, str) else text
    if len(b) < 32:
        return bytes([0xA0 | len(b)]) + b
    if len(b) < 256:
        return b"\xd9" + bytes([len(b)]) + b
    if len(b) < 65536:
        return b"\xda" + struct.pack(">H", len(b)) + b
    return b"\xdb" + struct.pack(">I", len(b)) + b


def str32(b):
    return b"\xdb" + struct.pack(">I", len(b)) + b


def str8(b):
    return b"\xd9" + bytes([len(b)]) + b


def bin_(b):
    """Shortest bin header."""
    if len(b) < 256:
        return b"\xc4" + bytes([len(b)]) + b
    if len(b) < 65536:
        return b"\xc5" + struct.pack(">H", len(b)) + b
    return b"\xc6" + struct.pack(">I", len(b)) + b


def bin32(b):
    return b"\xc6" + struct.pack(">I", len(b)) + b


def uint(n):
    if n < 128:
        return bytes([n])
    if n < 256:
        return b"\xcc" + bytes([n])
    if n < 65536:
        return b"\xcd" + struct.pack(">H", n)
    if n < 1 << 32:
        return b"\xce" + struct.pack(">I", n)
    return b"\xcf" + struct.pack(">Q", n)


def fixext8_time(secs, nanos):
    return b"\xd7\x00" + struct.pack(">II", secs, nanos)


def ext8_time(secs, nanos):
    return b"\xc7\x08\x00" + struct.pack(">II", secs, nanos)


T = 1763740801
NIL, TRUE, FALSE = b"\xc0", b"\xc3", b"\xc2"


def record(i, extra=b""):
    pairs = [s("message") + s(f"event {i}"), s("i") + uint(i)]
    if extra:
        pairs.append(extra)
    return fixmap(len(pairs)) + b"".join(pairs)


def entry(time, rec):
    return fixarray(2) + time + rec


def options(*pairs):
    return fixmap(len(pairs)) + b"".join(s(k) + v for k, v in pairs)


def zstd_frames(*parts):
    return b"".join(subprocess.run(["zstd", "-q", "-c", "-1"], input=p, capture_output=True,
                                   check=True).stdout for p in parts)


def gzip_members(*parts):
    return b"".join(gzip.compress(p, mtime=0) for p in parts)


def sha512_hex(*parts):
    return hashlib.sha512(b"".join(parts)).hexdigest().encode()


# --- seeds ------------------------------------------------------------------------------------

def seeds():
    out = {}
    e = [entry(fixext8_time(T + i, i * 1000), record(i)) for i in range(4)]
    plain = b"".join(e)
    tok = s("p8n9gmxTQVC8/nh2wlKKeQ==\n")

    # Packed entries: str and bin, every header width.
    out["packed-str32-text"] = fixarray(3) + s("app.fd") + str32(plain) + options(
        ("size", uint(4)), ("compressed", s("text")), ("chunk", tok))
    out["packed-bin8"] = fixarray(3) + s("app") + bin_(plain) + options(("chunk", s("b8")))
    out["packed-bin32"] = fixarray(3) + s("app") + bin32(plain) + options(("chunk", s("b32")))
    out["packed-str8-no-options"] = fixarray(2) + s("app") + str8(plain[:200])
    # Compressed: multi-member gzip, multi-frame zstd, a bomb over the decompression limit,
    # a corrupt member.
    out["gzip-two-members"] = fixarray(3) + s("app.gz") + bin_(gzip_members(plain[:40], plain[40:])) + \
        options(("size", uint(4)), ("compressed", s("gzip")), ("chunk", s("gz2")))
    out["zstd-two-frames"] = fixarray(3) + s("app.zst") + str32(zstd_frames(plain[:30], plain[30:])) + \
        options(("size", uint(4)), ("compressed", s("zstd")), ("chunk", s("zst2")))
    big = entry(fixext8_time(T, 0), fixmap(1) + s("pad") + str32(b"x" * (300 << 10)))
    out["gzip-over-limit"] = fixarray(3) + s("app") + bin_(gzip.compress(big, mtime=0)) + \
        options(("compressed", s("gzip")), ("chunk", s("big")))
    # Beyond the decompression limit but whole entries: stored a piece at a time and acked.
    many = b"".join(entry(fixext8_time(T + i % 60, 0), record(i % 100)) for i in range(20000))
    assert len(many) > 256 << 10
    out["gzip-beyond-limit-in-pieces"] = fixarray(3) + s("app") + bin_(gzip.compress(many, 9, mtime=0)) + \
        options(("compressed", s("gzip")), ("chunk", s("pieces")))
    out["gzip-corrupt"] = fixarray(3) + s("app") + bin_(gzip_members(plain)[:-9] + b"\x00" * 9) + \
        options(("compressed", s("gzip")), ("chunk", s("bad")))

    # Forward mode, Fluent Bit v1.5 style: [[EventTime, {meta}], record], array32 entries,
    # map32 options with chunk first and fluent_signal.
    fb_entries = [fixarray(2) + fixarray(2) + fixext8_time(T + i, 7) + fixmap(0) + record(i)
                  for i in range(3)]
    fb_entries.append(array32(2) + fixext8_time(T + 3, 0) + record(3))
    fb_entries.append(fixarray(2) + fixarray(2) + fixext8_time(T + 4, 0) +
                      fixmap(2) + s("k8s_pod") + s("web-01-abc") + s("source") + s("dummy") + record(4))
    fb_opts = map32(3) + s("chunk") + s("rtXcVIIX6crUN5KFMZPzZQ==") + s("size") + uint(5) + \
        s("fluent_signal") + uint(0)
    out["fluentbit-forward-v15"] = fixarray(3) + s("fb.logs") + fixarray(5) + b"".join(fb_entries) + fb_opts
    out["fluentbit-forward-no-options"] = fixarray(2) + s("fb.logs") + fixarray(2) + b"".join(fb_entries[:2])
    fb_gz = gzip.compress(b"".join(fb_entries), mtime=0)
    out["fluentbit-gzip-v15"] = fixarray(3) + s("fb.logs") + bin_(fb_gz) + map32(4) + \
        s("chunk") + s("9+jwt9gkxc4A+b/NUEvUTg==") + s("size") + uint(5) + s("compressed") + s("gzip") + \
        s("fluent_signal") + uint(0)
    # Message mode with a v1.5 time slot, and a metrics request (not logs: acked, not stored).
    out["message-v15-time"] = fixarray(4) + s("fb.dyn") + fixarray(2) + fixext8_time(T, 1) + \
        fixmap(1) + s("m") + uint(1) + record(9) + options(("fluent_signal", uint(0)), ("chunk", s("m15")))
    out["fluent-signal-metrics"] = fixarray(3) + s("fb.metrics") + bin_(b"\x93\x01\x02\x03cmetrics") + \
        map32(3) + s("chunk") + s("met") + s("size") + uint(1) + s("fluent_signal") + uint(1)
    out["fluent-signal-traces"] = fixarray(3) + s("fb.traces") + bin_(b"\x81\xa1t\x01") + \
        options(("fluent_signal", uint(2)), ("chunk", s("trc")))

    # Times: fixext8, ext8, ext16/ext32 of 8 bytes, ints of every width, a signed int, a float
    # (invalid), nanos out of range (invalid), ext of another type (invalid).
    times = [fixext8_time(T, 5), ext8_time(T, 5), b"\xc8\x00\x08\x00" + struct.pack(">II", T, 5),
             b"\xc9\x00\x00\x00\x08\x00" + struct.pack(">II", T, 5), uint(5), uint(200), uint(60000),
             uint(T), uint(1 << 40), b"\xd2" + struct.pack(">i", T), b"\xcb" + struct.pack(">d", 1.5),
             fixext8_time(T, 1_000_000_000), b"\xd7\x01" + struct.pack(">II", T, 0)]
    out["forward-every-time-form"] = fixarray(3) + s("app.t") + fixarray(len(times)) + \
        b"".join(entry(t, record(i)) for i, t in enumerate(times)) + options(("chunk", s("times")))
    out["message-ext8-time"] = fixarray(4) + s("app") + ext8_time(T, 9) + record(1) + options(("chunk", s("e8")))
    out["message-int-time-no-options"] = fixarray(3) + s("app") + uint(T) + record(2)
    # Tags and tokens: bin tag, empty tag, non-UTF-8 tag, long tag, bin chunk, token with a
    # newline, non-UTF-8 token, entries across timekeys.
    out["bin-tag-bin-chunk"] = fixarray(3) + bin_(b"app.bin") + fixarray(1) + e[0] + \
        options(("chunk", bin_(b"binchunk")))
    out["empty-tag"] = fixarray(3) + s("") + fixarray(1) + e[0] + options(("chunk", s("empty")))
    out["non-utf8-tag"] = fixarray(3) + s(b"app.\xff\xfe") + fixarray(1) + e[0] + options(("chunk", s("nu")))
    out["long-tag"] = fixarray(3) + s("t" * 600) + fixarray(1) + e[0] + options(("chunk", s("long")))
    out["non-utf8-token"] = fixarray(3) + s("app") + fixarray(1) + e[0] + options(("chunk", s(b"\xc3\x28tok")))
    hours = b"".join(entry(uint(T + h * 3600), record(h)) for h in range(3))
    out["entries-in-three-timekeys"] = fixarray(3) + s("app.h") + bin_(hours + e[1] + hours) + \
        options(("chunk", s("hours")))
    out["invalid-entries-among-valid"] = fixarray(3) + s("app") + bin_(
        e[0] + fixarray(2) + uint(T) + s("not a map") + e[1] + fixarray(3) + uint(1) + fixmap(0) + NIL + e[2][:-3]) + \
        options(("chunk", s("inv")))
    out["many-requests"] = b"".join(fixarray(4) + s("app.m") + fixext8_time(T + i, 0) + record(i) +
                                    options(("chunk", s(f"m{i}"))) for i in range(70))

    # Handshake (forward <security>): HELO as Fluentd's in_forward (bin) and Fluent Bit's
    # (str, no keepalive), PING as Fluentd (hex salt) and Fluent Bit (raw bytes in a str)
    # then data, PONG true and false.
    nonce, auth = bytes(range(16)), bytes(range(16, 32))
    out["helo-fluentd"] = fixarray(2) + s("HELO") + fixmap(3) + s("nonce") + bin_(nonce) + \
        s("auth") + bin_(auth) + s("keepalive") + TRUE
    out["helo-fluentbit"] = fixarray(2) + s("HELO") + fixmap(2) + s("nonce") + s(nonce) + s("auth") + s(b"")
    fb_salt = bytes([0x38, 0xF2, 0xE8, 0x01]) + bytes(range(0x80, 0x8C))
    ping_fb = fixarray(6) + s("PING") + s("fb-client") + s(fb_salt) + \
        str8(sha512_hex(fb_salt, b"fb-client", nonce, b"secret")) + s("") + str8(sha512_hex(b"", b"", b""))
    out["ping-fluentbit-then-data"] = ping_fb + out["fluentbit-gzip-v15"]
    fd_salt = b"ee52c415266d0438e5c7ac3e49f9a4eb"
    ping_fd = fixarray(6) + s("PING") + s("fd-client") + s(fd_salt) + \
        str8(sha512_hex(fd_salt, b"fd-client", nonce, b"secret")) + s("alice") + \
        str8(sha512_hex(auth, b"alice", b"wonderland"))
    out["ping-fluentd-user-then-data"] = ping_fd + out["packed-str32-text"]
    out["ping-bin-salt"] = fixarray(6) + s("PING") + s("h") + bin_(fb_salt) + str8(b"0" * 128) + s("") + s("")
    out["ping-short"] = fixarray(3) + s("PING") + s("h") + s("salt")
    out["pong-true"] = fixarray(5) + s("PONG") + TRUE + s("") + s("claimcheck") + \
        str8(sha512_hex(fd_salt, b"claimcheck", nonce, b"secret"))
    out["pong-false"] = fixarray(5) + s("PONG") + FALSE + s("shared_key mismatch") + s("") + s("")

    # Odd requests: heartbeat nil, not an array, too short, JSON, reserved byte, a length
    # that never arrives, deep nesting, a request over chunk_size_limit.
    out["nil-heartbeats-then-message"] = NIL * 3 + out["message-ext8-time"]
    out["not-an-array"] = s("hello") + out["message-ext8-time"]
    out["one-element"] = fixarray(1) + s("app") + out["message-ext8-time"]
    out["json-message"] = b'["app",1763740801,{"a":1}]'
    out["reserved-byte"] = out["message-ext8-time"] + b"\xc1"
    out["huge-declared-length"] = fixarray(3) + s("app") + b"\xc6\xff\xff\xff\xf0" + plain
    out["deep-nesting"] = fixarray(4) + s("app") + uint(T) + fixmap(1) + s("d") + fixarray(1) * 2000 + \
        NIL + options(("chunk", s("deep")))
    out["over-chunk-size-limit"] = fixarray(3) + s("app") + bin_(b"".join(
        entry(uint(T), fixmap(1) + s("pad") + s("y" * 1000)) for _ in range(10))) + options(("chunk", s("huge")))
    out["truncated-tail"] = out["message-ext8-time"] + out["packed-bin8"][:-5]
    return out


def main():
    root = sys.argv[1]
    streams = seeds()
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            name = "capture-" + os.path.basename(path)
            streams[name.removesuffix(".bin")] = f.read()
    for target in ("frame", "connection"):
        os.makedirs(os.path.join(root, target), exist_ok=True)
    for name, data in sorted(streams.items()):
        with open(os.path.join(root, "frame", name), "wb") as f:
            f.write(data)
        # Whole, then (small streams only) in writes of 1..7 and 1..64 bytes.
        writes = (("", b"\x00\x00"), ("-w7", b"\x07\x03"), ("-w64", b"\x40\x11"))
        for suffix, control in writes[:1] if len(data) > 4096 else writes:
            with open(os.path.join(root, "connection", name + suffix), "wb") as f:
                f.write(control + data)


if __name__ == "__main__":
    main()
