"""Records what forward clients send, for the fuzz seed corpus.

    capture.py PORT OUTDIR [SHARED_KEY]

Listens on 127.0.0.1:PORT. Every connection's client bytes are written, exactly as received,
to OUTDIR/<n>.bin (empty connections, such as Fluentd's transport heartbeats, are not kept).
Requests with a `chunk` option get `{"ack": chunk}` in one write, as claimcheck answers. With
SHARED_KEY it acts like Fluentd's in_forward with <security>: HELO on connect, checks the
PING's digest, answers PONG. Runs until killed. Needs the msgpack package.
"""

import hashlib
import os
import socket
import sys
import threading

import msgpack

SELF_HOSTNAME = "capture-server"


def sha512_hex(*parts):
    h = hashlib.sha512()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
    return h.hexdigest()


def serve(conn, path, shared_key):
    received = bytearray()
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=1 << 30)
    nonce = os.urandom(16)
    if shared_key is not None:
        helo = ["HELO", {"nonce": nonce, "auth": b"", "keepalive": True}]
        conn.sendall(msgpack.packb(helo, use_bin_type=True))
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            received += data
            unpacker.feed(data)
            for obj in unpacker:
                reply = answer(obj, nonce, shared_key)
                if reply is not None:
                    conn.sendall(reply)
    except OSError:
        pass
    finally:
        conn.close()
        if received:
            with open(path, "wb") as f:
                f.write(received)


def answer(obj, nonce, shared_key):
    if not isinstance(obj, list) or not obj:
        return None
    if obj[0] == b"PING" and shared_key is not None and len(obj) == 6:
        hostname, salt, digest = obj[1], obj[2], obj[3]
        ok = digest.decode() == sha512_hex(salt, hostname, nonce, shared_key)
        pong = ["PONG", ok, "" if ok else "shared_key mismatch", SELF_HOSTNAME if ok else "",
                sha512_hex(salt, SELF_HOSTNAME, nonce, shared_key) if ok else ""]
        return msgpack.packb(pong, use_bin_type=True)
    options = obj[-1] if len(obj) >= 3 and isinstance(obj[-1], dict) else {}
    chunk = options.get(b"chunk")
    if chunk is None:
        return None
    # Always a str, echoed byte for byte.
    return msgpack.packb({"ack": chunk.decode("utf-8", "surrogateescape")},
                         use_bin_type=True, unicode_errors="surrogateescape")


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    shared_key = sys.argv[3] if len(sys.argv) > 3 else None
    os.makedirs(outdir, exist_ok=True)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    n = 0
    while True:
        conn, _ = listener.accept()
        n += 1
        path = os.path.join(outdir, f"{n}.bin")
        threading.Thread(target=serve, args=(conn, path, shared_key), daemon=True).start()


if __name__ == "__main__":
    main()
