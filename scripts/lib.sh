# Helpers shared by the scripts in this folder; sourced (`. scripts/lib.sh`), not run.
# Ports on 127.0.0.1, waiting for a listener, /metrics, a process's CPU time and peak RSS,
# and the --fluent-bit and --fluentd arguments of the benchmark scripts.

# N free TCP ports on 127.0.0.1, on one line (bound together, so they differ).
free_ports() {
  python3 -c 'import socket, sys
s = [socket.socket() for _ in range(int(sys.argv[1]))]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))' "$1"
}
free_port() { free_ports 1; }

# Waits (up to 20 s) until something listens on 127.0.0.1:PORT. With PID, gives up as soon as
# that process is gone. Fails saying so, and with the last lines of LOG when given.
#   wait_port PORT [PID [LOG]]
wait_port() {
  local port=$1 pid=${2:-} log=${3:-}
  for _ in $(seq 400); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.05
  done
  echo "$(basename "$0"): nothing listens on port $port" >&2
  if [ -n "$log" ]; then echo "the log ends with:" >&2; tail -5 "$log" >&2; fi
  return 1
}

# The text of http://127.0.0.1:PORT/metrics.
metrics_text() {
  exec 3<>"/dev/tcp/127.0.0.1/$1"
  printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  sed '1,/^\r\{0,1\}$/d' <&3
  exec 3<&-
}
# The sum of a metric over its label sets, as an integer: metric PORT NAME.
metric() { metrics_text "$1" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%d\n", s }'; }

# CPU seconds (user + system) of a process, and its peak RSS in MiB.
cpu_seconds() { awk '{ printf "%.2f\n", ($14 + $15) / 100 }' "/proc/$1/stat"; }
peak_rss_mib() { awk '/^VmHWM:/ { printf "%.1f\n", $2 / 1024 }' "/proc/$1/status"; }

# Splits the --fluentd argument CMD into the array fluentd_cmd (empty without one), and exits
# (status 2) unless `CMD --version` runs.
fluentd_command() {
  fluentd_cmd=()
  [ -n "$1" ] || return 0
  read -r -a fluentd_cmd <<<"$1"
  if ! "${fluentd_cmd[@]}" --version >/dev/null 2>&1; then
    echo "$(basename "$0"): --fluentd '$1' does not run ('$1 --version' failed)" >&2; exit 2
  fi
}

# Exits (status 2) unless the --fluent-bit argument is empty or an executable.
fluent_bit_binary() {
  if [ -n "$1" ] && ! [ -x "$1" ]; then
    echo "$(basename "$0"): --fluent-bit $1 is not an executable" >&2; exit 2
  fi
}
