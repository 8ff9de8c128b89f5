// Sends events with @fluent-org/logger and reports which were acknowledged.
//
// Reads a JSON spec on stdin:
//   {"host": "127.0.0.1", "port": 24224, "mode": "PackedForward", "ack": true,
//    "ackTimeoutMs": 30000, "events": [{"tag": "app.web", "secs": 1763740801, "nanos": 5,
//    "record": {...}}, ...]}
// "nanos": null sends an integer time instead of an EventTime. Optional:
//   "security": {"clientHostname", "sharedKey", "username", "password"} (the handshake),
//   "tlsCaFile": "ca.pem" (TLS, verifying the server's certificate for "localhost"),
//   "tlsClientCertFile"/"tlsClientKeyFile" (a client certificate),
//   "sequential": true (each event sent once the one before it is acknowledged: one request
//   at a time, as a sender that flushes one chunk and waits).
// Prints {"acked": [indexes], "failed": [{"index", "error"}]} on stdout.
"use strict";
const fs = require("fs");
const { FluentClient, EventTime } = require("@fluent-org/logger");

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const spec = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  let tls;
  if (spec.tlsCaFile) {
    tls = { ca: fs.readFileSync(spec.tlsCaFile), servername: "localhost" };
    if (spec.tlsClientCertFile) {
      tls.cert = fs.readFileSync(spec.tlsClientCertFile);
      tls.key = fs.readFileSync(spec.tlsClientKeyFile);
    }
  }
  const client = new FluentClient(null, {
    eventMode: spec.mode || "PackedForward",
    socket: { host: spec.host, port: spec.port, timeout: 60000, disableReconnect: false, tls },
    security: spec.security,
    ack: spec.ack === false ? undefined : { ackTimeout: spec.ackTimeoutMs || 30000 },
    flushInterval: spec.flushIntervalMs || 0,
  });
  const emit = (e, index) => {
    // The library takes a plain number as milliseconds and sends whole seconds.
    const time = e.nanos === null ? e.secs * 1000 : new EventTime(e.secs, e.nanos || 0);
    return client.emit(e.tag, e.record, time).then(
      () => ({ index, ok: true }),
      (err) => ({ index, ok: false, error: String(err && err.message ? err.message : err) }),
    );
  };
  let settled = [];
  if (spec.sequential) {
    for (const [index, e] of spec.events.entries()) settled.push(await emit(e, index));
  } else {
    settled = await Promise.all(spec.events.map(emit));
  }
  await client.shutdown().catch(() => {});
  const acked = settled.filter((r) => r.ok).map((r) => r.index);
  const failed = settled.filter((r) => !r.ok).map((r) => ({ index: r.index, error: r.error }));
  process.stdout.write(JSON.stringify({ acked, failed }) + "\n");
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + "\n");
  process.exit(2);
});
