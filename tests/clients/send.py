"""Sends events with the Python fluent-logger (Message mode, no acks; the library has none).

Reads a JSON spec on stdin:
  {"host": "127.0.0.1", "port": 24224, "events": [{"tag": "app.py", "secs": 1763740801,
   "nanos": 5, "record": {...}}, ...]}
"nanos": null sends an integer time; otherwise an EventTime. Prints {"sent": N}.
"""

import json
import sys

from fluent import sender


def main():
    spec = json.load(sys.stdin)
    client = sender.FluentSender(None, host=spec["host"], port=spec["port"], nanosecond_precision=True, timeout=30)
    sent = 0
    for e in spec["events"]:
        if e.get("nanos") is None:
            ok = client.emit_with_time(e["tag"], int(e["secs"]), e["record"])
        else:
            ok = client.emit_with_time(e["tag"], sender.EventTime(e["secs"], e["nanos"]), e["record"])
        if not ok:
            print(f"send failed: {client.last_error}", file=sys.stderr)
            sys.exit(1)
        sent += 1
    client.close()
    print(json.dumps({"sent": sent}))


if __name__ == "__main__":
    main()
