#!/usr/bin/env bash
# mcast demo: one real delivery on this machine, on built-in defaults.
#
# Packs a 64 MB sample, starts mcastd on loopback (127.0.0.1:7600, multicast 239.255.77.1
# via 127.0.0.1: no network set-up needed), starts three receivers at staggered moments of the
# loop, shows their progress, then checks every received archive is byte-identical and that
# receiver 3 plays its archive to the exact sample with a single-use play ticket (and a second
# play is refused).
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd)
size_mb=${DEMO_SIZE_MB:-64}

echo "== building (release)"
cargo build --release --workspace --quiet --manifest-path "$repo/Cargo.toml"
bin="$repo/target/release"

work=$(mktemp -d "${TMPDIR:-/tmp}/mcast-demo.XXXXXX")
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  jobs -p | xargs -r kill 2>/dev/null || true
}
trap cleanup EXIT
cd "$work"
echo "== working in $work"

head -c "${size_mb}M" /dev/urandom > sample.bin
key=$("$bin/mcastd" keygen | awk '{print $3}')
"$bin/mcastd" pack sample.bin --title sample
"$bin/mcastd" catalog

"$bin/mcastd" > server.log 2>&1 &
server_pid=$!
sleep 0.5
kill -0 "$server_pid" 2>/dev/null || { echo "mcastd failed to start:"; cat server.log; exit 1; }

pids=()
for i in 1 2 3; do
  "$bin/mcast-recv" get sample --server-key "$key" --dir "recv$i" --json --timeout 300s \
    > "recv$i.log" 2> "recv$i.err" &
  pids+=($!)
  echo "== receiver $i started"
  [[ $i -lt 3 ]] && sleep 1
done

# Progress of all three on one line until they finish.
while :; do
  line=""
  running=0
  for i in 1 2 3; do
    kill -0 "${pids[$((i-1))]}" 2>/dev/null && running=1
    pct=$(tail -n 1 "recv$i.log" 2>/dev/null | sed -n 's/.*"percent":\([0-9.]*\).*/\1/p')
    [[ -z $pct ]] && grep -q '"event":"done"' "recv$i.log" 2>/dev/null && pct=100
    line+=$(printf "  recv%d %5.1f%%" "$i" "${pct:-0}")
  done
  printf "\r%s" "$line"
  [[ $running -eq 0 ]] && break
  sleep 0.3
done
echo

status=0
for i in 1 2 3; do
  if wait "${pids[$((i-1))]}"; then
    report=$(grep '"event":"done"' "recv$i.log")
    ratio=$(python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f\"{r['received_bytes']/r['loop_bytes']:.3f} loops received, {r['seconds']:.1f}s\")" "$report" 2>/dev/null || echo "")
    if cmp -s "recv$i/sample.mca" mcast-data/archives/sample.mca; then
      echo "receiver $i: archive byte-identical ($ratio)"
    else
      echo "receiver $i: archive DIFFERS"; status=1
    fi
  else
    echo "receiver $i failed:"; cat "recv$i.err"; status=1
  fi
done

# Playback: the archive on the receiver's disk is useless without a play ticket; the server
# checks the ticket and releases its half of the key, once.
"$bin/mcastd" ticket issue sample --holder demo-viewer --plays 1 -o viewer.ticket > /dev/null
if "$bin/mcast-recv" play sample --ticket viewer.ticket --dir recv3 -o played.bin 2> play.err \
   && cmp -s played.bin sample.bin; then
  echo "receiver 3 played its archive with a single-use ticket: plaintext identical to the sample"
else
  echo "play FAILED:"; cat play.err; status=1
fi
if "$bin/mcast-recv" play sample --ticket viewer.ticket --dir recv3 -o again.bin 2> again.err; then
  echo "a second play of the single-use ticket was ACCEPTED"; status=1
else
  echo "second play refused: $(tail -n 1 again.err | sed 's/^mcast-recv: error: //')"
fi
"$bin/mcast-recv" stats | python3 -c "import json,sys; c=json.load(sys.stdin)['counters']; print('server: channels opened', c['channels_opened'], 'closed', c['channels_closed'], '| completions', c['completions'], '| packets sent', c['packets_sent'])" || true
[[ $status -eq 0 ]] && echo "== demo OK (files in $work)" || echo "== demo FAILED (files in $work)"
exit $status
