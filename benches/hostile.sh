#!/usr/bin/env bash
# The control plane under attack (issue 20), on a namespace bed (shared/tools/peerbed.sh): one
# download of a HOSTILE_SIZE_MB title to c1 under HOSTILE_LOSS_PCT (3) % random loss, alone
# and while each attack runs from c2, another host on the same bridge (benches/common/attack.py):
#
#   syncs      forged SYNCs on the group (2 s GRTT, a crowd, a fake queue; no signature)
#   naks       forged NAKs on the group and to the server (real receiver id, no session MAC)
#   data       forged data packets on the group (real tag and ids, random payloads)
#   garbage    random datagrams to the group and to the control port
#   nakflood   8,192-unit NAKs to the control port
#   joinflood  padded joins from 1,000 spoofed source addresses (a raw socket)
#
# Prints per run: the download time and its ratio to that round's run alone (target ≤ 1.1), the
# server's send rate over the download (payload bytes / time) and its ratio to the run alone
# (target ≥ 0.9), whether the file is byte-identical, and the counters that show each attack
# being refused. The list runs HOSTILE_ROUNDS times, interleaved (one download alone varies by
# ±10 % on this bed), and a last table gives each attack's median time and rate over the rounds
# against the median alone. Exit 1 only on a broken run (a download failing or differing),
# never on a figure.
#
#   sudo benches/hostile.sh
#   HOSTILE_ATTACKS="none naks" HOSTILE_SIZE_MB=20 sudo benches/hostile.sh
#
# Knobs (defaults in brackets): HOSTILE_SIZE_MB [50], HOSTILE_RATE_MBPS [200] (one tier),
# HOSTILE_LOSS_PCT [3], HOSTILE_ATTACKS ["none syncs naks data garbage nakflood joinflood"],
# HOSTILE_ATTACK_RATE [2000] (attack datagrams a second), HOSTILE_ROUNDS [3],
# HOSTILE_DIR [/tmp/mcast-hostile],
# PEERBED [/work/shared/tools/peerbed.sh], CARGO_TARGET_DIR [<repo>/target]. Needs root,
# iproute2, nftables, python3.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
size_mb=${HOSTILE_SIZE_MB:-50}
rate=${HOSTILE_RATE_MBPS:-200}
loss=${HOSTILE_LOSS_PCT:-3}
attacks=${HOSTILE_ATTACKS:-none syncs naks data garbage nakflood joinflood}
arate=${HOSTILE_ATTACK_RATE:-2000}
rounds=${HOSTILE_ROUNDS:-3}
work=${HOSTILE_DIR:-/tmp/mcast-hostile}
peerbed=${PEERBED:-/work/shared/tools/peerbed.sh}
bin=${CARGO_TARGET_DIR:-$repo/target}/release
# make_store, wait_filtering
. "$repo/benches/common/bed.sh"
export PB_PREFIX=hostile PB_DIR=$work/peerbed PB_TIMEOUT=300
net=${PB_NET:-198.18.0}
group=239.255.77.1 gport=7700

[[ $(id -u) == 0 ]] || { echo "hostile.sh: needs root (network namespaces)" >&2; exit 2; }
for t in ip nft python3 "$peerbed"; do
  command -v "$t" >/dev/null || { echo "hostile.sh: missing $t" >&2; exit 2; }
done
nice -n 10 cargo build --release --workspace --quiet --manifest-path "$repo/Cargo.toml"

trap '"$peerbed" down >/dev/null 2>&1 || true' EXIT
"$peerbed" down >/dev/null 2>&1 || true
rm -rf "${work:?}"/run-* "$work/results"
mkdir -p "$work/pack"
src=$work/hostile.bin
if [[ ! -f $src || $(stat -c %s "$src") != $((size_mb * 1000000)) ]]; then
  head -c $((size_mb * 1000000)) /dev/urandom > "$src"
fi
pack=$work/pack
key=$(make_store "$pack")
"$bin/mcastd" -c "$pack/store.toml" pack "$src" --title hostile --compress none > "$pack/pack.log" 2>&1
archive=$pack/archives/hostile.mca
abytes=$(stat -c %s "$archive")

"$peerbed" up 2 --loss "1:$loss" --snoop querier > "$work/up.log" 2>&1
wait_filtering > /dev/null
{
  printf '[store]\narchive_dir = "%s"\nkey_dir = "%s"\n[server]\n' "$pack/archives" "$pack/keys"
  printf 'control = "%s.1:7600"\nmulticast_iface = "%s.1"\nrate_mbps = %s\n' "$net" "$net" "$rate"
  printf 'tiers_mbps = [%s]\ngroup_base = "%s"\nport_base = %s\n' "$rate" "$group" "$gport"
  printf 'admin = ["%s.1", "%s.11"]\n' "$net" "$net"  # stats from the server and c1 only
  printf '[tickets]\ndb = "%s/tickets.sqlite"\n' "$work"
} > "$work/mcastd.toml"
ip netns exec hostile-srv "$bin/mcastd" -c "$work/mcastd.toml" > "$work/server.log" 2>&1 &
spid=$!
sleep 0.5

stats() { ip netns exec hostile-c1 "$bin/mcast-recv" stats --server "$net.1:7600" 2>>"$work/stats.err" || true; }
field() { sed -nE "s/.*\"$2\":([^,}]*).*/\1/p" "$1" | tail -1 | tr -d '"'; }

echo "== $size_mb MB title ($abytes archive bytes), $rate Mbit/s, $loss % loss towards c1, attacks from c2 at $arate datagrams/s" >&2
broken=0
alone_s="" alone_rate=""
printf '%-10s %-6s %8s %7s %10s %7s  %s\n' attack ok seconds /alone srv_Mbit/s /alone "refused (counters)" > "$work/results"
printf 'attack\tround\tok\tseconds\tmbit\n' > "$work/runs.tsv"
for round in $(seq "$rounds"); do
for a in $attacks; do
  d=$work/run-$a-$round; mkdir -p "$d"
  stats > "$d/before.json"
  apid=""
  if [[ $a != none ]]; then
    ip netns exec hostile-c2 python3 -u "$repo/benches/common/attack.py" "$a" "$group:$gport" \
      "$net.1:7600" "$arate" > "$d/attack.log" 2>&1 &
    apid=$!
  fi
  rc=0
  ip netns exec hostile-c1 timeout 300 "$bin/mcast-recv" get hostile --server "$net.1:7600" \
    --iface "$net.11" --server-key "$key" --known-servers none --dir "$d/r" --json --timeout 240s \
    > "$d/recv.log" 2> "$d/recv.err" || rc=$?
  [[ -n $apid ]] && { kill "$apid" 2>/dev/null || true; wait "$apid" 2>/dev/null || true; }
  stats > "$d/after.json"
  ok=OK
  if [[ $rc != 0 ]] || ! cmp -s "$d/r/hostile.mca" "$archive"; then ok=FAILED; broken=1; fi
  # An attack that never started (e.g. attack.py speaking an old wire version) proves nothing.
  if [[ $a != none ]] && ! grep -q "attacking" "$d/attack.log"; then ok=NO-ATTACK; broken=1; fi
  secs=$(field "$d/recv.log" seconds)
  python3 - "$d" "$a" "$ok" "${secs:-0}" "${alone_s:-}" "${alone_rate:-}" >> "$work/results" <<'PY'
import json, sys
d, a, ok, secs, alone_s, alone_rate = sys.argv[1:7]
secs = float(secs)
def load(p):
    try:
        return json.load(open(p))["counters"]
    except Exception:
        return {}
b, e = load(d + "/before.json"), load(d + "/after.json")
# An empty "after": the server did not answer the stats request (it is part of the result).
delta = lambda k: e.get(k, 0) - b.get(k, 0) if e else float("nan")
mbit = delta("payload_bytes_sent") * 8 / secs / 1e6 if secs > 0 else 0.0
rep = {}
for l in open(d + "/recv.log"):
    if '"event":"done"' in l:
        rep = json.loads(l)
refused = {
    "syncs": "syncs_forged %s, syncs_stale %s" % (rep.get("syncs_forged"), rep.get("syncs_stale")),
    "naks": "naks_unauthenticated +%.0f, receiver naks_sent %s" % (delta("naks_unauthenticated"), rep.get("naks_sent")),
    "data": "receiver rejected %s" % rep.get("rejected"),
    "garbage": "control_malformed +%.0f, naks_malformed +%.0f, receiver malformed %s" % (
        delta("control_malformed"), delta("naks_malformed"), rep.get("malformed")),
    "nakflood": "naks_unauthenticated +%.0f, naks_rate_limited +%.0f" % (delta("naks_unauthenticated"), delta("naks_rate_limited")),
    "joinflood": "retries_sent +%.0f, unvalidated_dropped +%.0f, joins +%.0f" % (
        delta("retries_sent"), delta("unvalidated_dropped"), delta("joins")),
}.get(a, "")
ratio = lambda x, y: "%.2f" % (x / float(y)) if y and float(y) > 0 and a != "none" else "-"
if not e:
    refused += " (the server did not answer stats after the run)"
print("%-10s %-6s %8.2f %7s %10.1f %7s  %s" % (a, ok, secs, ratio(secs, alone_s), mbit, ratio(mbit, alone_rate), refused))
if a == "none":
    open(d + "/alone", "w").write("%f %f\n" % (secs, mbit))
PY
  printf '%s\t%s\t%s\t%s\t%s\n' "$a" "$round" "$ok" "${secs:-0}" \
    "$(awk '{print $5}' <(tail -1 "$work/results"))" >> "$work/runs.tsv"
  if [[ $a == none && -f $d/alone ]]; then read -r alone_s alone_rate < "$d/alone" || true; fi
done
done
kill -TERM "$spid" 2>/dev/null || true
wait "$spid" 2>/dev/null || true
cat "$work/results"
echo "== medians over $rounds round(s)"
python3 - "$work/runs.tsv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
order = list(dict.fromkeys(r["attack"] for r in rows))
med = {}
for a in order:
    rs = [r for r in rows if r["attack"] == a]
    med[a] = (statistics.median(float(r["seconds"]) for r in rs),
              statistics.median(float(r["mbit"]) for r in rs),
              all(r["ok"] == "OK" for r in rs), len(rs))
base = med.get("none")
print("%-10s %-6s %8s %7s %10s %7s" % ("attack", "all_ok", "med_s", "/alone", "med_Mbit/s", "/alone"))
for a in order:
    s, m, ok, n = med[a]
    rs = "%.2f" % (s / base[0]) if base and base[0] > 0 and a != "none" else "-"
    rm = "%.2f" % (m / base[1]) if base and base[1] > 0 and a != "none" else "-"
    print("%-10s %-6s %8.2f %7s %10.1f %7s" % (a, "OK" if ok else "NO", s, rs, m, rm))
PY
echo "seconds: the receiver's done report; srv_Mbit/s: the server's payload bytes sent over that time;"
echo "/alone: against the run without an attack (targets: time <= 1.1, send rate >= 0.9). Logs: $work/run-*/"
exit $broken
