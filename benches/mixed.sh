#!/usr/bin/env bash
# The mixed audience, mcast against UFTP on one namespace bed (shared/tools/peerbed.sh):
# one title of MIXED_SIZE_MB to five receivers on a bridge with IGMP snooping and the bridge
# as querier, run once per IGMP version in MIXED_IGMP (querier and hosts forced to it):
#
#   c1  clean
#   c2  MIXED_LOSS_PCT (5) % random loss towards it (peerbed --loss: nftables numgen drop)
#   c3  behind a MIXED_SLOW_RATE (200mbit) tc tbf link (peerbed --rate)
#   c4  clean, started MIXED_LATE_S (3) s after the others
#   c5  "unicast fallback": every multicast datagram towards it dropped (an nftables rule on
#       its bridge port, in the switch namespace) behind a MIXED_UNICAST_RATE (50mbit) link;
#       MIXED_UNICAST=0 leaves it out. UFTP is multicast-only: it cannot serve c5.
#
# The title is packed with the built-in `[pack]` defaults (FEC 5 %), or `--fec-overhead
# MIXED_FEC` when set (0 = no FEC).
# On each bed: mcastd in the server namespace (control and multicast_iface on the server's bed
# address, rate_mbps = MIXED_RATE_MBPS, tiers_mbps = [MIXED_TIERS] when set, else the
# server's default), one `mcast-recv get --json` per receiver; then UFTP on the same bed via
# `peerbed.sh uftp` at peerbed's own rate setting (PB_R, Kbit/s; peerbed's default unless set).
# Prints one table: per receiver its completion time from its own start (the report's
# `seconds`), MB/s (archive bytes / seconds), bytes received / archive bytes, settled tier,
# tier changes, silent re-joins, the longest progress stall (the longest time between two
# increases of the units held, from the first unit held to the done report, read from the
# `--json` progress lines stamped on arrival: they come every 250 ms, so ±0.25 s), UFTP's
# time for that client (its STATS line: the data phase, without UFTP's announce), the ratio
# mcast / UFTP, the link time (archive bits / link rate: the tbf rate, else MIXED_LINK_MBPS)
# and the ratio to it. Exit 1 only on a broken run (an mcast receiver failing or its archive
# differing from the server's, a UFTP client other than c5 not intact), never on a figure.
#
#   sudo benches/mixed.sh                                 # 200 MB, IGMPv3 then IGMPv2
#   MIXED_SIZE_MB=50 MIXED_IGMP=2 MIXED_UFTP=0 benches/mixed.sh   # quick, mcast only
#   MIXED_TIERS="40,180,900" benches/mixed.sh             # explicit tiers
#
# Knobs (defaults in brackets): MIXED_SIZE_MB [200] (10^6 bytes, random), MIXED_RATE_MBPS
# [900], MIXED_TIERS [""], MIXED_IGMP ["3 2"], MIXED_UNICAST [1], MIXED_LATE_S [3],
# MIXED_LOSS_PCT [5], MIXED_SLOW_RATE [200mbit], MIXED_UNICAST_RATE [50mbit],
# MIXED_LINK_MBPS [1000] (the unshaped ports' nominal rate, for the link time), MIXED_UFTP [1],
# MIXED_TIMEOUT [600] (mcast-recv --timeout and UFTP's PB_TIMEOUT, s), MIXED_DIR
# [/tmp/mcast-mixed] (raw logs: <dir>/igmpv<V>/{mcast,uftp.log,peerbed/...}),
# MIXED_WIRE_SEGMENT [1] (cut the server's UDP GSO bursts into datagrams as they leave it, as a
# NIC does, so loss and tbf act per datagram; 0 = the bridge forwards whole 64 KB bursts),
# PEERBED [/work/shared/tools/peerbed.sh], CARGO_TARGET_DIR [<repo>/target]. The bed uses its
# own peerbed prefix (PB_PREFIX=mixed) so it never touches another bed; `peerbed.sh down` runs
# on any exit. Needs root, iproute2, nftables, python3, uftp (apt-get install uftp).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
size_mb=${MIXED_SIZE_MB:-200}
rate=${MIXED_RATE_MBPS:-900}
tiers=${MIXED_TIERS:-}
igmps=${MIXED_IGMP:-3 2}
unicast=${MIXED_UNICAST:-1}
late=${MIXED_LATE_S:-3}
loss=${MIXED_LOSS_PCT:-5}
slow=${MIXED_SLOW_RATE:-200mbit}
uc_rate=${MIXED_UNICAST_RATE:-50mbit}
link_mbps=${MIXED_LINK_MBPS:-1000}
with_uftp=${MIXED_UFTP:-1}
limit=${MIXED_TIMEOUT:-600}
segment=${MIXED_WIRE_SEGMENT:-1}
work=${MIXED_DIR:-/tmp/mcast-mixed}
peerbed=${PEERBED:-/work/shared/tools/peerbed.sh}
bin=${CARGO_TARGET_DIR:-$repo/target}/release
# make_store, wait_filtering
. "$repo/benches/common/bed.sh"
export PB_PREFIX=mixed PB_DIR=$work/peerbed PB_TIMEOUT=$limit
net=${PB_NET:-198.18.0}

[[ $(id -u) == 0 ]] || { echo "mixed.sh: needs root (network namespaces)" >&2; exit 2; }
for t in ip tc nft python3 "$peerbed"; do
  command -v "$t" >/dev/null || { echo "mixed.sh: missing $t" >&2; exit 2; }
done
if [[ $with_uftp == 1 ]] && ! command -v uftp >/dev/null; then
  apt-get install -y uftp >/dev/null
fi
nice -n 10 cargo build --release --workspace --quiet --manifest-path "$repo/Cargo.toml"

trap '"$peerbed" down >/dev/null 2>&1 || true' EXIT
"$peerbed" down >/dev/null 2>&1 || true
rm -rf "${work:?}"/igmpv* "$work/results" "$work/uftp-summary" "$work/mcast-summary"
mkdir -p "$work/pack"

# The title: random bytes, packed once with a fresh key store.
src=$work/mixed.bin
if [[ ! -f $src || $(stat -c %s "$src") != $((size_mb * 1000000)) ]]; then
  head -c $((size_mb * 1000000)) /dev/urandom > "$src"
fi
pack=$work/pack
key=$(make_store "$pack")
fec_args=()
[[ -n ${MIXED_FEC:-} ]] && fec_args=(--fec-overhead "$MIXED_FEC")
"$bin/mcastd" -c "$pack/store.toml" pack "$src" --title mixed --compress none "${fec_args[@]}" \
  > "$pack/pack.log" 2>&1
archive=$pack/archives/mixed.mca
abytes=$(stat -c %s "$archive")
sync

n=4; [[ $unicast == 1 ]] && n=5
profile() {
  case $1 in
    1) echo clean;; 2) echo "${loss}% loss";; 3) echo "tbf $slow";;
    4) echo "${late}s late";; 5) echo "unicast $uc_rate";;
  esac
}
link_of() {  # I -> Mbit/s of its link
  local r=none
  case $1 in 3) r=$slow;; 5) r=$uc_rate;; esac
  if [[ $r == none ]]; then echo "$link_mbps"; else
    awk -v r="$r" 'BEGIN{ v = r + 0; if (r ~ /gbit/) v *= 1000; else if (r ~ /kbit/) v /= 1000; print v }'
  fi
}
stamp='import sys,time
for l in sys.stdin: print("%.3f %s" % (time.time(), l), end="", flush=True)'
# Longest time between increases of units held, from the first unit held to "done".
stall() {
  awk '{ t = $1; ev = $0; h = -1
         if (ev ~ /"event":"progress"/) { match(ev, /"have":[0-9]+/); h = substr(ev, RSTART + 7, RLENGTH - 7) + 0 }
         grew = 0
         if (h >= 0) { if (h > have) { grew = 1; have = h } }
         else if (ev ~ /"event":"done"/ && last != "") grew = 1
         if (grew) { if (last != "" && t - last > worst) worst = t - last; last = t } }
       END { if (last == "") print "n/a"; else printf "%.2f", worst }' "$1"
}
field() { sed -nE "s/.*\"$2\":([^,}]*).*/\1/p" "$1" | tail -1 | tr -d '"'; }


broken=0
for v in $igmps; do
  d=$work/igmpv$v; mkdir -p "$d/mcast"
  echo "== IGMPv$v bed: $n receivers, ${size_mb} MB title ($abytes archive bytes)" >&2
  shapes=(--loss "2:$loss" --rate "3:$slow")
  [[ $unicast == 1 ]] && shapes+=(--rate "5:$uc_rate")
  "$peerbed" up "$n" "${shapes[@]}" --snoop querier > "$d/up.log" 2>&1
  "$peerbed" exec sw ip link set br0 type bridge mcast_igmp_version "$v"
  "$peerbed" exec srv sysctl -qw "net.ipv4.conf.all.force_igmp_version=$v"
  for i in $(seq "$n"); do "$peerbed" exec "c$i" sysctl -qw "net.ipv4.conf.all.force_igmp_version=$v"; done
  [[ $segment == 1 ]] && "$peerbed" exec srv ip link set dev eth0 gso_max_segs 1
  if [[ $unicast == 1 ]]; then
    "$peerbed" exec sw nft -f - <<'NFT'
table bridge mixed_unicast {
  chain out {
    type filter hook forward priority 0; policy accept;
    oifname "c5" ip daddr 224.0.0.0/4 counter drop comment "c5: no multicast"
  }
}
NFT
  fi
  k=$(wait_filtering)
  echo "bridge filtering after $k checks" > "$d/bridge-ready.txt"

  # --- mcast ---
  m=$d/mcast
  {
    printf '[store]\narchive_dir = "%s"\nkey_dir = "%s"\n[server]\n' "$pack/archives" "$pack/keys"
    printf 'control = "%s.1:7600"\nmulticast_iface = "%s.1"\nrate_mbps = %s\n' "$net" "$net" "$rate"
    printf 'admin = ["%s.0/24"]\n' "$net"  # stats are read from c1's namespace
    [[ -n $tiers ]] && printf 'tiers_mbps = [%s]\n' "$tiers"
    printf '[tickets]\ndb = "%s/tickets.sqlite"\n' "$m"
  } > "$m/mcastd.toml"
  ip netns exec mixed-srv "$bin/mcastd" -c "$m/mcastd.toml" > "$m/server.log" 2>&1 &
  spid=$!
  sleep 0.5
  pids=()
  start() {
    ( ip netns exec "mixed-c$1" timeout $((limit + 30)) "$bin/mcast-recv" get mixed --server "$net.1:7600" \
        --iface "$net.$((10 + $1))" --server-key "$key" --dir "$m/r$1" --json --timeout "${limit}s" 2> "$m/r$1.err"
      echo $? > "$m/r$1.rc" ) | python3 -u -c "$stamp" > "$m/r$1.log" &
    pids+=($!)
  }
  for i in $(seq "$n"); do [[ $i == 4 ]] || start "$i"; done
  sleep "$late"; start 4
  for p in "${pids[@]}"; do wait "$p" || true; done
  ip netns exec mixed-c1 "$bin/mcast-recv" stats --server "$net.1:7600" > "$m/stats.json" 2>/dev/null || true
  python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))["counters"]
print(sys.argv[2], "mcastd:", ", ".join("%s %s" % (k, c[k]) for k in
      ("packets_sent", "repairs_sent", "naks_received", "unicast_started", "channels_opened", "completions")))
' "$m/stats.json" "IGMPv$v" >> "$work/mcast-summary" 2>/dev/null || true
  kill -TERM "$spid" 2>/dev/null || true
  wait "$spid" || true
  { "$peerbed" status; "$peerbed" exec sw nft list table bridge mixed_unicast; } > "$m/bed-status.txt" 2>&1 || true

  # --- UFTP, same bed ---
  if [[ $with_uftp == 1 ]]; then
    "$peerbed" uftp "$src" > "$d/uftp.log" 2>&1 || true
    cp "$PB_DIR/uftp.bed/status" "$d/uftp.status" 2>/dev/null || true
    cp "$PB_DIR/uftp.bed/uftp.log" "$d/uftp.server.log" 2>/dev/null || true
  fi

  for i in $(seq "$n"); do
    rc=$(cat "$m/r$i.rc" 2>/dev/null || echo "?")
    ok=OK
    if [[ $rc != 0 ]] || ! cmp -s "$m/r$i/mixed.mca" "$archive"; then ok=FAILED; broken=1; fi
    secs=$(field "$m/r$i.log" seconds); recv=$(field "$m/r$i.log" received_bytes)
    ut=n/a uok=n/a
    if [[ $with_uftp == 1 ]]; then
      uid=$(printf '0x%02X%02X%02X%02X' ${net//./ } $((10 + i)))
      ut=$(awk -F';' -v u="$uid" '$1 == "STATS" && $2 == u { print $7 }' "$d/uftp.status" 2>/dev/null | tail -1)
      uok=$(sed -nE "s/.*client $i \(.*sha256=([A-Z]+).*/\1/p" "$d/uftp.log")
      if [[ $i == 5 ]]; then ut=n/a; uok=no-mcast
      elif [[ $uok != OK ]]; then broken=1; ut=${ut:-failed}; fi
    fi
    echo "v$v c$i|$(profile "$i")|$ok|${secs:-nan}|${recv:-0}|$(field "$m/r$i.log" settled_tier)|$(field "$m/r$i.log" tier_changes)|$(field "$m/r$i.log" silent_rejoins)|$(stall "$m/r$i.log")|${ut:-n/a}|${uok:-n/a}|$(link_of "$i")|$(field "$m/r$i.log" unicast)" >> "$work/results"
  done
  grep -E 'uftp\[bed\]: (clients=|server rc=|RESULT|.*dropped)' "$d/uftp.log" 2>/dev/null | sed "s/^/IGMPv$v /" >> "$work/uftp-summary" || true
  "$peerbed" down >/dev/null 2>&1 || true
done

echo
echo "mixed audience: ${size_mb} MB title -> archive $abytes B; mcastd rate_mbps=$rate, tiers=${tiers:-server default};" \
  "UFTP -R ${PB_R:-peerbed default 1000000} Kbit/s; bridge querier + snooping; GSO cut at the server: $segment"
printf '%-7s %-18s %-6s %-5s %8s %7s %8s %7s %7s %7s %7s %8s %10s %7s %7s\n' \
  run receiver ok via mcast_s MB/s rcv/arc settled changes rejoins stall_s uftp_s mcast/uftp link_s /link
awk -F'|' -v ab="$abytes" '
  { s = $4 + 0; link = ab * 8 / ($12 * 1e6)
    mbs = (s > 0) ? ab / 1e6 / s : 0
    u = ($10 ~ /^[0-9.]+$/) ? sprintf("%.2f", $10) : $10
    r = ($10 ~ /^[0-9.]+$/ && $10 > 0) ? sprintf("%.2f", s / $10) : "n/a"
    split($1, a, " ")
    printf "%-7s %-18s %-6s %-5s %8.2f %7.1f %8.2f %7s %7s %7s %7s %8s %10s %7.2f %7.2f\n",
      "IGMPv" substr(a[1], 2), a[2] " " $2, $3, ($13 == "true") ? "uni" : "multi", s, mbs, $5 / ab,
      $6, $7, $8, $9, u, r, link, s / link }' "$work/results"
echo "mcast_s: from the receiver's own start (c4 starts ${late} s late; UFTP has no late start: every uftpd is up before its announce);"
echo "stall_s: longest gap between increases of units held (progress lines every 250 ms, ±0.25 s); rcv/arc: bytes received / archive bytes;"
echo "uftp_s: UFTP's STATS time for that client (data phase, without its announce; UFTP sends the ${size_mb} MB file, mcast the archive);"
[[ $unicast == 1 ]] && echo "c5: multicast towards it dropped at its bridge port; UFTP is multicast-only and cannot serve it (n/a)."
echo "link_s: archive bits / link rate (tbf rate, else ${link_mbps} Mbit/s); /link: mcast_s / link_s."
echo "via: how the mcast receiver ended (multicast, or the unicast fallback)."
cat "$work/mcast-summary" "$work/uftp-summary" 2>/dev/null || true
echo "raw logs: $work/igmpv*/"
if [[ $broken == 1 ]]; then
  echo "mixed.sh: BROKEN RUN (a receiver failed or its file differs; see the ok column and $work)" >&2
  exit 1
fi
