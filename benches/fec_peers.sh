#!/usr/bin/env bash
# FEC against the peers' FEC, on one namespace bed (shared/tools/peerbed.sh), in one run
# (issue 19, item 6): one random title of FECP_SIZE_MB to FECP_N receivers on a bridge with
# IGMP snooping and the bridge as querier, every receiver behind its own independent random
# loss (peerbed --loss: an nftables numgen drop on its bridge port, towards it only), no rate
# limits on the bed. For each loss level in FECP_LOSSES (the live bed is re-shaped between
# levels with `peerbed.sh shape`), in this order:
#
#   mcast fec    the title packed with `--fec-overhead FECP_MCAST_FEC` (0.1): Reed-Solomon
#                repair symbols pre-encoded in the archive, NAK repair for what FEC missed
#   mcast plain  the title packed with `--fec-overhead 0` (no FEC: NAK repair only)
#   udpcast      `peerbed.sh udpcast` without FEC (per-slice ACK/retransmit)
#   udpcast fec  the same with `--fec FECP_UDPC_FEC` (8x8/64: 8 interleaved stripes of 64
#                data blocks, 8 FEC blocks each = 12.5 % redundancy, the closest of udpcast's
#                settings to mcast's 10 %; the stripe is half the man page's 8x8/128 example,
#                which is only 6 %), and at loss levels >= FECP_STRONG_FROM (10) % again with
#                `--fec FECP_UDPC_FEC_STRONG` (8x24/64: 37.5 %, enough that a 20 %-lossy
#                stripe of 88 blocks decodes without retransmission ~95 % of the time)
#   flute        a FLUTE (RFC 6726) carousel on the `flute` crate (benches/flute-peer, its
#                own workspace, built here on first use; skipped with the reason printed when
#                it does not build): Reed-Solomon GF(2^8) (RFC 5510, under-specified scheme:
#                the fully-specified one caps a file at 255 blocks), 60 source +
#                FECP_FLUTE_FEC_PCT (10) % repair symbols per block, paced at FECP_FLUTE_MBPS
#                (the mcast rate); no feedback, so it loops until the last receiver decoded
#                the file, and is then stopped
#
# mcastd runs in the server namespace (control and multicast_iface on the server's bed address,
# rate_mbps = FECP_RATE_MBPS with the server's default tier ladder, a fresh server per run),
# one `mcast-recv get --json` per receiver, all started together; the server's counters come
# from `mcast-recv stats` before it stops (as benches/mixed.sh). udpcast runs at its own pace
# (no --max-bitrate: its ACKs clock it).
# Prints one table: per loss level and tool, whether every receiver's output is byte-identical
# to the reference (sha256 of the archive for mcast, of the source file for the peers), the
# completion time of the slowest receiver (mcast: the largest `seconds` of the receivers' done
# reports, from their own start; udpcast: the sender's wall time, which ends when the last
# receiver has acknowledged the file; flute: the last receiver's completion from the sender's
# start), MB/s (title bytes / that time), wire/title (the server's eth0 transmit bytes during
# the run / title bytes: loops, repairs, FEC and headers), and repairs / NAKs (mcast: the
# server's repairs_sent and naks_received; udpcast: its sender's re-xmits; flute has no
# feedback). Exit 1 only on a broken run (an mcast receiver without the archive's exact bytes,
# or any receiver that reported done with other bytes), never on a figure; a peer that drops or
# times out a receiver is shown in the intact column and a note, not counted as broken.
#
#   sudo benches/fec_peers.sh                               # 100 MB, 4 receivers, 5 % and 20 %
#   FECP_SIZE_MB=20 FECP_LOSSES=5 FECP_FLUTE=0 benches/fec_peers.sh   # quick
#
# Knobs (defaults in brackets): FECP_SIZE_MB [100] (10^6 bytes, random), FECP_N [4],
# FECP_LOSSES ["5 20"] (%), FECP_TOOLS ["mcast udpcast flute"] (which to run), FECP_RATE_MBPS [900], FECP_MCAST_FEC [0.1], FECP_UDPC_FEC
# [8x8/64], FECP_UDPC_FEC_STRONG [8x24/64] ("" = none), FECP_STRONG_FROM [10] (%), FECP_FLUTE [1],
# FECP_FLUTE_FEC_PCT [10], FECP_FLUTE_MBPS [FECP_RATE_MBPS], FECP_UDPC_BITRATE [""] (udp-sender
# --max-bitrate, e.g. 900m; "" = unthrottled, as peerbed and benches/e2e.sh), FECP_TIMEOUT [300] (s, per run:
# mcast-recv --timeout, peerbed's PB_TIMEOUT, the FLUTE receivers), FECP_WIRE_SEGMENT [1] (cut
# the server's UDP GSO bursts into datagrams as they leave it, as a NIC does, so loss acts per
# datagram), FECP_BUILD [1] (0 = use the binaries already built), FECP_DIR [/tmp/mcast-fecpeers]
# (raw logs: <dir>/loss<P>/<run>/), PEERBED [/work/shared/tools/peerbed.sh], CARGO_TARGET_DIR
# [<repo>/target] (flute-peer builds in <it>/flute-peer). The bed uses its own peerbed prefix
# (PB_PREFIX=fecpeers, PB_DIR under FECP_DIR) so it never touches another bed; `peerbed.sh
# down` runs on any exit. Needs root, iproute2, nftables, python3, udpcast (installed if
# missing). On a small host the server, every receiver and the bridge share the CPUs: the
# figures carry that noise.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
size_mb=${FECP_SIZE_MB:-100}
n=${FECP_N:-4}
losses=${FECP_LOSSES:-5 20}
rate=${FECP_RATE_MBPS:-900}
mfec=${FECP_MCAST_FEC:-0.1}
ufec=${FECP_UDPC_FEC:-8x8/64}
ufec_strong=${FECP_UDPC_FEC_STRONG-8x24/64}
strong_from=${FECP_STRONG_FROM:-10}
with_flute=${FECP_FLUTE:-1}
tools=${FECP_TOOLS:-mcast udpcast flute}
flute_pct=${FECP_FLUTE_FEC_PCT:-10}
flute_mbps=${FECP_FLUTE_MBPS:-$rate}
limit=${FECP_TIMEOUT:-300}
segment=${FECP_WIRE_SEGMENT:-1}
build=${FECP_BUILD:-1}
work=${FECP_DIR:-/tmp/mcast-fecpeers}
peerbed=${PEERBED:-/work/shared/tools/peerbed.sh}
target=${CARGO_TARGET_DIR:-$repo/target}
bin=$target/release
# make_store, wait_filtering
. "$repo/benches/common/bed.sh"
export PB_PREFIX=fecpeers PB_DIR=$work/peerbed PB_TIMEOUT=$limit
export PB_UDPCAST_BITRATE=${FECP_UDPC_BITRATE:-}
net=${PB_NET:-198.18.0}
flute_grp=239.255.48.1:3400

[[ $(id -u) == 0 ]] || { echo "fec_peers.sh: needs root (network namespaces)" >&2; exit 2; }
if ! command -v udp-sender >/dev/null || ! command -v nft >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq udpcast nftables iproute2 time >/dev/null
fi
for t in ip tc nft python3 udp-sender udp-receiver sha256sum "$peerbed"; do
  command -v "$t" >/dev/null || { echo "fec_peers.sh: missing $t" >&2; exit 2; }
done
[[ $build == 1 ]] && nice -n 10 cargo build --release --workspace --bins --quiet --manifest-path "$repo/Cargo.toml"

trap '"$peerbed" down >/dev/null 2>&1 || true' EXIT
"$peerbed" down >/dev/null 2>&1 || true
rm -rf "${work:?}"/loss* "$work/results" "$work/flute-build.log"
mkdir -p "$work/pack"

# The FLUTE peer: its own crate and workspace; a failed build skips it with the reason.
flute_bin="" flute_why=""
if [[ $with_flute == 1 ]]; then
  if nice -n 10 cargo build --release --quiet --manifest-path "$repo/benches/flute-peer/Cargo.toml" \
       --target-dir "$target/flute-peer" > "$work/flute-build.log" 2>&1; then
    flute_bin=$target/flute-peer/release/flute-peer
  else
    flute_why="flute-peer did not build: $(grep -m1 -E '^error' "$work/flute-build.log" || tail -1 "$work/flute-build.log")"
    echo "fec_peers.sh: $flute_why (full log: $work/flute-build.log); FLUTE skipped" >&2
  fi
else
  flute_why="FECP_FLUTE=0"
fi

# The title: random bytes, packed twice (with and without FEC) with a fresh key store.
src=$work/title.bin
bytes=$((size_mb * 1000000))
if [[ ! -f $src || $(stat -c %s "$src") != "$bytes" ]]; then
  head -c "$bytes" /dev/urandom > "$src"
fi
src_sum=$(sha256sum "$src" | cut -d' ' -f1)
pack=$work/pack
key=$(make_store "$pack")
"$bin/mcastd" -c "$pack/store.toml" pack "$src" --title fec --compress none --fec-overhead "$mfec" \
  > "$pack/pack-fec.log" 2>&1
"$bin/mcastd" -c "$pack/store.toml" pack "$src" --title plain --compress none --fec-overhead 0 \
  > "$pack/pack-plain.log" 2>&1
declare -A asum abytes
for t in fec plain; do
  asum[$t]=$(sha256sum "$pack/archives/$t.mca" | cut -d' ' -f1)
  abytes[$t]=$(stat -c %s "$pack/archives/$t.mca")
done
sync

field() { sed -nE "s/.*\"$2\":([^,}]*).*/\1/p" "$1" | tail -1 | tr -d '"'; }
txb() { "$peerbed" exec srv cat /sys/class/net/eth0/statistics/tx_bytes; }
now() { date +%s.%N; }
# results: loss|tool|setting|intact/N|slowest_s|wire_bytes|repairs|naks|note|corrupt
# (corrupt: receivers that ended as done but without the exact bytes: a broken run)
result() { local IFS='|'; echo "$*" >> "$work/results"; }


run_mcast() {  # LOSS TITLE(fec|plain) DIR
  local loss=$1 t=$2 m=$3 i ok=0 worst=0 s rc w0 w1 spid rb maxrb=0
  mkdir -p "$m"
  printf '[store]\narchive_dir = "%s"\nkey_dir = "%s"\n[server]\n' "$pack/archives" "$pack/keys" > "$m/mcastd.toml"
  printf 'control = "%s.1:7600"\nmulticast_iface = "%s.1"\nrate_mbps = %s\n' "$net" "$net" "$rate" >> "$m/mcastd.toml"
  printf 'admin = ["%s.0/24"]\n' "$net" >> "$m/mcastd.toml"  # stats are read from the bed
  printf '[tickets]\ndb = "%s/tickets.sqlite"\n' "$m" >> "$m/mcastd.toml"
  ip netns exec fecpeers-srv "$bin/mcastd" -c "$m/mcastd.toml" > "$m/server.log" 2>&1 &
  spid=$!
  sleep 0.5
  w0=$(txb)
  local -a pids=()
  for i in $(seq "$n"); do
    ( ip netns exec "fecpeers-c$i" timeout $((limit + 30)) "$bin/mcast-recv" get "$t" --server "$net.1:7600" \
        --iface "$net.$((10 + i))" --server-key "$key" --dir "$m/r$i" --json --timeout "${limit}s" \
        > "$m/r$i.log" 2> "$m/r$i.err"
      echo $? > "$m/r$i.rc" ) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  w1=$(txb)
  ip netns exec fecpeers-srv "$bin/mcast-recv" stats --server "$net.1:7600" > "$m/stats.json" 2>/dev/null || true
  kill -TERM "$spid" 2>/dev/null || true
  wait "$spid" || true
  for i in $(seq "$n"); do
    rc=$(cat "$m/r$i.rc" 2>/dev/null || echo "?")
    if [[ $rc == 0 && -f $m/r$i/$t.mca && $(sha256sum "$m/r$i/$t.mca" | cut -d' ' -f1) == "${asum[$t]}" ]]; then
      ok=$((ok + 1))
    fi
    s=$(field "$m/r$i.log" seconds)
    if [[ -z $s || $worst == nan ]]; then worst=nan
    else worst=$(awk -v a="$worst" -v b="$s" 'BEGIN{ print (b + 0 > a + 0) ? b : a }'); fi
    rb=$(field "$m/r$i.log" received_bytes); (( ${rb:-0} > maxrb )) && maxrb=$rb
    rm -rf "$m/r$i"   # the archive copies: ~$size_mb MB each
  done
  local counters
  counters=$(python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))["counters"]
print(c["repairs_sent"], c["naks_received"])' "$m/stats.json" 2>/dev/null || echo "? ?")
  local rep nak
  read -r rep nak <<< "$counters"
  result "$loss" mcast "$([[ $t == fec ]] && echo "fec-overhead $mfec" || echo "fec-overhead 0")" "$ok/$n" \
    "$worst" "$((w1 - w0))" "$rep" "$nak" "archive ${abytes[$t]} B, max rcv/arc $(awk -v a="$maxrb" -v b="${abytes[$t]}" 'BEGIN{ printf "%.2f", a / b }')" "$((n - ok))"
}

run_udpcast() {  # LOSS DIR SETTING [udp-sender args]
  local loss=$1 d=$2 setting=$3; shift 3
  mkdir -p "$d"
  local w0 w1 ok wall rex i bad=0
  w0=$(txb)
  "$peerbed" udpcast "$src" "$@" > "$d/peerbed.log" 2>&1 || true
  w1=$(txb)
  cp "$PB_DIR/udpcast.bed/sender.log" "$d/sender.log" 2>/dev/null || true
  for f in "$PB_DIR"/udpcast.bed/c*/out.log; do
    [[ -f $f ]] && cp "$f" "$d/$(basename "$(dirname "$f")").log"
  done
  # peerbed compares each receiver's file with the source's sha256
  ok=$(grep -c 'receiver [0-9]* sha256=OK' "$d/peerbed.log" || true)
  # a receiver that ended with a whole file of other bytes is broken; one that udpcast dropped
  # ("Dropped by server": it still prints "Transfer complete"), that never connected or that
  # timed out is the peer failing (shown in intact, not a broken run)
  local out note=""
  for i in $(seq "$n"); do
    grep -q "receiver $i sha256=OK" "$d/peerbed.log" && continue
    out=$PB_DIR/udpcast.bed/c$i/$(basename "$src")
    if grep -aq 'Dropped by server' "$d/c$i.log" 2>/dev/null; then note+=" c$i dropped by the sender;"
    elif [[ ! -f $out || $(stat -c %s "$out") != "$bytes" ]]; then
      note+=" c$i $(grep -aoE 'Receiver error|[Tt]imeout[^|]*' "$d/c$i.log" 2>/dev/null | head -1 || true) short;"
    else bad=$((bad + 1)); note+=" c$i whole file, other bytes;"; fi
  done
  wall=$(sed -nE 's/.*sender rc=0 wall=([0-9.]+)s.*/\1/p' "$d/peerbed.log" | tail -1)
  # the sender's last statistics line: "bytes= ... re-xmits=0001234 (  1.2%) ..."
  rex=$(tr '\r' '\n' < "$d/sender.log" | sed -nE 's/.*re-xmits=0*([0-9]+).*/\1/p' | tail -1)
  rm -rf "$PB_DIR/udpcast.bed"   # the receivers' copies
  result "$loss" udpcast "$setting" "$ok/$n" "${wall:-nan}" "$((w1 - w0))" "${rex:-?}" n/a \
    "$(grep -m1 -oE 'sender rc=[0-9]+' "$d/peerbed.log" || echo 'sender rc=?')${note:+;$note}" "$bad"
}

run_flute() {  # LOSS DIR
  local loss=$1 d=$2 i ok=0 bad=0 t0 w0 w1 last=0 e spid
  mkdir -p "$d"
  local -a pids=()
  for i in $(seq "$n"); do
    ip netns exec "fecpeers-c$i" timeout $((limit + 30)) "$flute_bin" recv "$d/r$i.bin" "$flute_grp" \
      "$net.$((10 + i))" "$limit" > "$d/r$i.json" 2> "$d/r$i.err" &
    pids+=($!)
  done
  sleep 1   # joins reach the snooping bridge
  w0=$(txb); t0=$(now)
  ip netns exec fecpeers-srv timeout $((limit + 30)) "$flute_bin" send "$src" "$flute_grp" "$net.1" \
    "$flute_mbps" "$flute_pct" > /dev/null 2> "$d/sender.log" &
  spid=$!
  # wait for every receiver (polled every 50 ms); a sender that ends first (it refused the
  # file, or crashed) ends them too
  local p alive
  while :; do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    (( alive )) || break
    if ! kill -0 "$spid" 2>/dev/null; then
      echo "fec_peers.sh: the FLUTE sender ended early: $(grep -m1 -E 'panicked' -A1 "$d/sender.log" | tail -1)" >&2
      for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
      break
    fi
    sleep 0.05
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  w1=$(txb)
  kill -TERM "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  for i in $(seq "$n"); do
    e=$(field "$d/r$i.json" epoch)
    if [[ -f $d/r$i.bin && $(sha256sum "$d/r$i.bin" | cut -d' ' -f1) == "$src_sum" ]]; then ok=$((ok + 1))
    elif [[ -n $e ]]; then bad=$((bad + 1)); fi   # done, other bytes: broken (a timeout is not)
    if [[ -n $e ]]; then last=$(awk -v a="$last" -v b="$e" 'BEGIN{ print (b > a) ? b : a }')
    else last=nan; fi
    rm -f "$d/r$i.bin"
  done
  local secs=nan
  [[ $last != nan ]] && secs=$(awk -v a="$t0" -v b="$last" 'BEGIN{ printf "%.2f", b - a }')
  result "$loss" flute "RS(60+$(awk -v p="$flute_pct" 'BEGIN{ r = int(60 * p / 100 + 0.5); print (r < 1) ? 1 : r }')) carousel" \
    "$ok/$n" "$secs" "$((w1 - w0))" n/a n/a "paced $flute_mbps Mbit/s, no feedback" "$bad"
}

# One bed for the whole run: every receiver behind its own random loss, re-shaped per level.
first=${losses%% *}
shapes=()
for i in $(seq "$n"); do shapes+=(--loss "$i:$first"); done
"$peerbed" up "$n" "${shapes[@]}" --snoop querier > "$work/up.log" 2>&1
[[ $segment == 1 ]] && "$peerbed" exec srv ip link set dev eth0 gso_max_segs 1
k=$(wait_filtering)
echo "bridge filtering after $k checks" > "$work/bridge-ready.txt"

broken=0
for loss in $losses; do
  d=$work/loss$loss; mkdir -p "$d"
  for i in $(seq "$n"); do "$peerbed" shape "$i" loss "$loss" > /dev/null; done
  "$peerbed" status > "$d/bed-before.txt" 2>&1 || true
  echo "== ${loss} % loss on each of $n receivers, ${size_mb} MB title" >&2
  if [[ " $tools " == *" mcast "* ]]; then
    echo "   mcast fec-overhead $mfec" >&2;  run_mcast "$loss" fec "$d/mcast-fec"
    echo "   mcast fec-overhead 0" >&2;     run_mcast "$loss" plain "$d/mcast-plain"
  fi
  if [[ " $tools " == *" udpcast "* ]]; then
    echo "   udpcast" >&2;                  run_udpcast "$loss" "$d/udpcast" "no FEC"
    echo "   udpcast --fec $ufec" >&2;      run_udpcast "$loss" "$d/udpcast-fec" "--fec $ufec" --fec "$ufec"
    if [[ -n $ufec_strong ]] && awk -v l="$loss" -v s="$strong_from" 'BEGIN{ exit !(l >= s) }'; then
      echo "   udpcast --fec $ufec_strong" >&2
      run_udpcast "$loss" "$d/udpcast-fec-strong" "--fec $ufec_strong" --fec "$ufec_strong"
    fi
  fi
  if [[ " $tools " == *" flute "* ]]; then
    if [[ -n $flute_bin ]]; then
      echo "   flute" >&2; run_flute "$loss" "$d/flute"
    else
      result "$loss" flute "skipped" - - - - - "$flute_why" 0
    fi
  fi
  "$peerbed" status > "$d/bed-after.txt" 2>&1 || true
done

echo
echo "FEC against the peers: ${size_mb} MB random title ($bytes B), $n receivers each behind its own random loss," \
  "no rate limit on the bed; mcastd rate_mbps=$rate (default ladder); archives: fec ${abytes[fec]} B, plain ${abytes[plain]} B;" \
  "bridge querier + snooping; GSO cut at the server: $segment; udpcast --max-bitrate ${PB_UDPCAST_BITRATE:-none};" \
  "FLUTE paced at $flute_mbps Mbit/s"
printf '%-5s %-8s %-22s %-7s %9s %8s %8s %9s %8s  %s\n' loss tool setting intact slowest_s MB/s wire/tit repairs naks note
awk -F'|' -v b="$bytes" '
  { s = $5; mbs = (s ~ /^[0-9.]+$/ && s > 0) ? sprintf("%.1f", b / 1e6 / s) : "n/a"
    ss = (s ~ /^[0-9.]+$/) ? sprintf("%.2f", s) : s
    w = ($6 ~ /^[0-9]+$/) ? sprintf("%.2f", $6 / b) : $6
    printf "%-5s %-8s %-22s %-7s %9s %8s %8s %9s %8s  %s\n", $1 "%", $2, $3, $4, ss, mbs, w, $7, $8, $9 }' "$work/results"
echo "slowest_s: mcast, the largest receiver-reported seconds (from each receiver's own start, all started together);"
echo "  udpcast, the sender's wall time (it ends when the last receiver acknowledged the file); flute, the last"
echo "  receiver's completion from the sender's start. MB/s = title bytes / slowest_s."
echo "wire/tit: bytes the server's eth0 sent during the run (loops, repairs, FEC, headers, control) / title bytes."
echo "repairs/naks: mcast, the server's repairs_sent / naks_received; udpcast, its sender's re-xmits (blocks);"
echo "  flute has no return channel. intact: receivers whose output's sha256 equals the reference's."
echo "raw logs: $work/loss*/"
# broken: an mcast receiver without the archive's exact bytes, or any receiver that ended as
# done with other bytes; a peer that dropped or timed out a receiver is only reported
if awk -F'|' '{ split($4, a, "/") } ($2 == "mcast" && a[1] != a[2]) || $10 + 0 > 0 { bad = 1 } END { exit !bad }' "$work/results"; then
  broken=1
fi
if awk -F'|' '$2 != "mcast" && $3 != "skipped" { split($4, a, "/"); if (a[1] != a[2]) f = 1 } END { exit !f }' "$work/results"; then
  echo "note: a peer did not deliver to every receiver (dropped or timed out; see the intact column): reported, not a broken run"
fi
if [[ $broken == 1 ]]; then
  echo "fec_peers.sh: BROKEN RUN (a receiver ended without the exact bytes; see the intact column and $work)" >&2
  exit 1
fi
