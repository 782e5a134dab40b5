#!/usr/bin/env bash
# End-to-end benchmark: one file of E2E_SIZE_MB (default 1024 MiB) over loopback multicast,
# mcastd -> mcast-recv (1 receiver), then the real peers on the same loopback bed
# (UFTP without and with AES-256-GCM, udpcast; via shared/tools/peerbed.sh), then
# optionally (E2E_BED=1) the namespace bed with 1 and 3 receivers.
# E2E_V6=1 (default) adds IPv4 and IPv6 runs on one veth link in a private namespace (Linux
# cannot loop IPv6 multicast through lo; the veth's peer is down, so packets reach the
# receiver by multicast loopback as on lo): the IPv6 pool ff15::7701 against the IPv4 pool
# on the same link, and the ratio of the two.
# E2E_RECV_ARGS adds mcast-recv arguments (e.g. --direct-io) to the loopback run.
# E2E_SRV_WRAP / E2E_RCV_WRAP prefix the loopback mcastd / mcast-recv commands (e.g.
# "perf record -g -o /tmp/srv.perf --") to profile them.
#
#   sudo benches/e2e.sh                 # everything (installs uftp/udpcast if missing)
#   E2E_PEERS=0 benches/e2e.sh          # mcast only
#   E2E_SIZE_MB=4096 E2E_PEERS=0 benches/e2e.sh    # memory check on a 4 GiB file
#   E2E_OLD_BIN=/path/to/old/target/release E2E_PEERS=0 E2E_REPEAT=3 benches/e2e.sh
#                                       # old and new binaries in one run, alternating
#
# mcastd loops at E2E_RATE_MBPS (default 4000 Mbit/s of payload; 0 = unlimited, which on a
# 2-core host overruns the receiver and ends in NAK/repair rounds). UFTP runs at -R E2E_UFTP_R
# (Kbit/s; default -1 = as fast as possible), udpcast unthrottled.
# The receiver asks for a 64 MiB receive buffer (E2E_RCVBUF; forced past rmem_max as root).
# Prints, for each run: wall seconds, MB/s (10^6 bytes of the source file / wall), CPU seconds
# per GiB for server and receiver (user+sys from /usr/bin/time), peak RSS, and the ratio to
# the best peer. mcast runs in a private network namespace with only `lo` (multicast on,
# 224.0.0.0/4 routed to lo), so nothing leaves the host. Needs root (unshare -n, ip netns).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
size_mb=${E2E_SIZE_MB:-1024}
peers=${E2E_PEERS:-1}
bed=${E2E_BED:-0}
rate=${E2E_RATE_MBPS:-4000}
peerbed=${PEERBED:-/work/shared/tools/peerbed.sh}
work=${E2E_DIR:-/tmp/mcast-e2e}
bin=${E2E_RUN_BIN:-$repo/target/release}
label=${E2E_LABEL:-mcast}

if [[ ${1:-} != --inside ]]; then
  cargo build --release --workspace --quiet --manifest-path "$repo/Cargo.toml"
  mkdir -p "$work"
  src=$work/src.bin
  if [[ ! -f $src || $(stat -c %s "$src") != $((size_mb << 20)) ]]; then
    head -c "${size_mb}M" /dev/urandom > "$src"
  fi
  sync
  if [[ $peers == 1 ]] && ! { command -v uftp && command -v udp-sender; } >/dev/null; then
    apt-get install -y uftp udpcast nftables iproute2 time >/dev/null
  fi
  rm -f "$work/results"
  # mcast on the namespace bed: mcastd in <P>-srv, one mcast-recv per client namespace.
  bed_mcast() {
    local n=$1 run=$work/bed$n-mcast i
    rm -rf "$run"; mkdir -p "$run"
    cat > "$run/mcastd.toml" <<TOML
[store]
archive_dir = "$work/mcast/archives"
key_dir = "$work/mcast/keys"
[server]
control = "${PB_NET:-198.18.0}.1:7600"
multicast_iface = "${PB_NET:-198.18.0}.1"
rate_mbps = ${E2E_BED_RATE_MBPS:-$rate}
[tickets]
db = "$run/tickets.sqlite"
TOML
    ip netns exec pb-srv /usr/bin/time -f '%e %U %S %M' -o "$run/srv.time" "$bin/mcastd" -c "$run/mcastd.toml" > "$run/srv.log" 2>&1 &
    local spid=$!; sleep 0.5
    local -a pids=()
    for i in $(seq "$n"); do
      ip netns exec "pb-c$i" /usr/bin/time -f '%e %U %S %M' -o "$run/rcv$i.time" "$bin/mcast-recv" get bench \
        --server "${PB_NET:-198.18.0}.1:7600" --iface "${PB_NET:-198.18.0}.$((10 + i))" --dir "$run/out$i" \
        --recv-buffer "${E2E_RCVBUF:-67108864}" --json --timeout 600s > "$run/rcv$i.json" 2> "$run/rcv$i.log" &
      pids+=($!)
    done
    local ok=0 w=0 c=0 r=0 rw ru rs rr
    for i in $(seq "$n"); do
      wait "${pids[i-1]}" && cmp -s "$run/out$i/bench.mca" "$work/mcast/out/bench.mca" && ok=$((ok + 1))
      read -r rw ru rs rr < "$run/rcv$i.time"
      w=$(awk -v a="$w" -v b="$rw" 'BEGIN{print (b > a) ? b : a}')
      c=$(awk -v a="$c" -v b="$ru" -v d="$rs" -v n="$n" 'BEGIN{print a + (b + d) / n}')
      r=$(( rr > r ? rr : r ))
    done
    kill -TERM "$(pgrep -P "$spid" mcastd || echo "$spid")" 2>/dev/null || true
    wait "$spid" || true
    local sw su ss sr; read -r sw su ss sr < "$run/srv.time"
    echo "mcast-bed-${n}rx $w $(awk -v a="$su" -v b="$ss" 'BEGIN{print a+b}') $sr $c $r $ok" >> "$work/results"
  }
  parse_uftp() {  # LOG NAME
    local w u s r ccpu ok
    read -r w u s r <<< "$(sed -nE 's/.*server rc=[0-9]+ wall=([0-9.]+)s user=([0-9.?]+)s sys=([0-9.?]+)s.*maxrss=([0-9?]+)KB.*/\1 \2 \3 \4/p' "$1")"
    ccpu=$(sed -nE 's/.*uftpd-cpu=([0-9.]+)s.*/\1/p' "$1" | awk '{s += $1; n++} END {if (n) print s / n; else print "nan"}')
    ok=$(sed -nE 's/.*RESULT ([0-9]+)\/[0-9]+ clients intact.*/\1/p' "$1")
    echo "$2 ${w:-0} $(awk -v a="$u" -v b="$s" 'BEGIN{print a+b}') ${r:-0} $ccpu nan ${ok:-0}" >> "$work/results"
  }
  parse_udpcast() {  # MODE LOG NAME N
    local d=/tmp/peerbed/udpcast.$1 w u s r rw ru rs rp rr c=0 m=0 i ok
    read -r w u s _ r <<< "$(tail -1 "$d/time" 2>/dev/null)"
    for i in $(seq "$4"); do
      read -r rw ru rs rp rr <<< "$(tail -1 "$d/c$i/time" 2>/dev/null)"
      c=$(awk -v a="$c" -v b="$ru" -v e="$rs" -v n="$4" 'BEGIN{print a + (b + e) / n}')
      m=$(( ${rr:-0} > m ? ${rr:-0} : m ))
    done
    ok=$(sed -nE 's/.*RESULT ([0-9]+)\/[0-9]+ receivers intact.*/\1/p' "$2")
    echo "$3 ${w:-0} $(awk -v a="$u" -v b="$s" 'BEGIN{print a+b}') ${r:-0} $c $m ${ok:-0}" >> "$work/results"
  }
  # mcast: in a private net namespace with only lo (and, with E2E_OLD_BIN, the old binaries
  # too, alternating with the new, E2E_REPEAT times each).
  for _ in $(seq "${E2E_REPEAT:-1}"); do
    unshare -n "$0" --inside mcast-lo
    if [[ -n ${E2E_OLD_BIN:-} ]]; then
      E2E_RUN_BIN=$E2E_OLD_BIN E2E_LABEL=mcast-old unshare -n "$0" --inside mcast-lo
    fi
    if [[ ${E2E_V6:-1} == 1 ]]; then
      E2E_NET=v4 E2E_LABEL=mcast-veth-v4 unshare -n "$0" --inside
      E2E_NET=v6 E2E_LABEL=mcast-veth-v6 unshare -n "$0" --inside
    fi
  done
  if [[ $peers == 1 ]]; then
    for enc in none aes256-gcm; do
      # shellcheck disable=SC2086 # E2E_UFTP_ARGS: extra uftp arguments, e.g. "-b 8800"
      PB_ENC=$enc PB_R=${E2E_UFTP_R:--1} PB_TIMEOUT=600 "$peerbed" lo-uftp "$src" ${E2E_UFTP_ARGS:-} > "$work/uftp-$enc.log" 2>&1 || true
      parse_uftp "$work/uftp-$enc.log" "uftp-lo-$enc"
    done
    PB_TIMEOUT=600 "$peerbed" lo-udpcast "$src" > "$work/udpcast.log" 2>&1 || true
    parse_udpcast lo "$work/udpcast.log" udpcast-lo 1
    "$peerbed" down >/dev/null 2>&1 || true
  fi
  if [[ $bed == 1 ]]; then
    # Namespace bed: server and N clients on veth + bridge (no shaping), 1 and 3 receivers.
    for n in 1 3; do
      "$peerbed" down >/dev/null 2>&1 || true
      "$peerbed" up "$n" > "$work/bed$n-up.log" 2>&1
      bed_mcast "$n"
      PB_R=${E2E_UFTP_R:--1} PB_TIMEOUT=600 "$peerbed" uftp "$src" > "$work/bed$n-uftp.log" 2>&1 || true
      parse_uftp "$work/bed$n-uftp.log" "uftp-bed-${n}rx-none"
      PB_TIMEOUT=600 "$peerbed" udpcast "$src" > "$work/bed$n-udpcast.log" 2>&1 || true
      parse_udpcast bed "$work/bed$n-udpcast.log" "udpcast-bed-${n}rx" "$n"
      "$peerbed" down >/dev/null 2>&1 || true
    done
  fi
  echo
  printf '%-22s %8s %9s %12s %12s %12s %12s %8s %4s\n' run wall_s MB/s srv_cpu_s/GiB rcv_cpu_s/GiB srv_rss_MiB rcv_rss_MiB vs_best ok
  awk -v bytes=$((size_mb << 20)) '
    { name[NR]=$1; wall[NR]=$2; scpu[NR]=$3; srss[NR]=$4; rcpu[NR]=$5; rrss[NR]=$6; ok[NR]=$7
      mbs[NR] = (wall[NR] > 0) ? bytes / 1e6 / wall[NR] : 0
      # ratio to the best peer of the same bed (loopback, or the namespace bed with N receivers)
      grp[NR] = match($1, /bed-[0-9]+rx/) ? substr($1, RSTART, RLENGTH) : "lo"
      if ($1 !~ /^mcast/ && ok[NR] > 0 && mbs[NR] > best[grp[NR]]) best[grp[NR]] = mbs[NR] }
    END { gib = bytes / 2^30
      for (i = 1; i <= NR; i++)
        printf "%-22s %8.2f %9.1f %12.2f %12s %12.1f %12s %8s %4s\n", name[i], wall[i], mbs[i], scpu[i] / gib,
          (rcpu[i] == "nan") ? "n/a" : sprintf("%.2f", rcpu[i] / gib), srss[i] / 1024,
          (rrss[i] == "nan") ? "n/a" : sprintf("%.1f", rrss[i] / 1024),
          (best[grp[i]] > 0) ? sprintf("%.2f", mbs[i] / best[grp[i]]) : "n/a", ok[i] }' "$work/results"
  awk '$1 == "mcast-veth-v4-1rx" && $7 == 1 { v4 += $2; n4++ } $1 == "mcast-veth-v6-1rx" && $7 == 1 { v6 += $2; n6++ }
    END { if (n4 && n6) printf "IPv6 (ff15::7701) vs IPv4 (239.255.77.1) on the same veth link: %.3f of the IPv4 MB/s (mean wall %.2f s vs %.2f s, %d run(s) each)\n", (v4 / n4) / (v6 / n6), v6 / n6, v4 / n4, n6 }' "$work/results"
  [[ -s $work/mcast/srv.vmrss ]] && echo "mcastd resident memory after serving the loopback run: $(cat "$work/mcast/srv.vmrss") KiB (VmRSS; srv_rss_MiB above is the peak)"
  echo "(uftp receiver CPU is uftpd's from /proc ticks; its RSS is not measured; vs_best: against the best peer on the same bed; logs in $work)"
  exit 0
fi

# --- inside the private namespace -----------------------------------------------------------
ip link set lo up
ctl=127.0.0.1:7600 net_conf=""
case ${E2E_NET:-lo} in
  lo)
    ip link set lo multicast on
    ip route add 224.0.0.0/4 dev lo
    ;;
  v4 | v6)
    ip link add v0 type veth peer name v1
    ip link set v0 up
    ip addr add 198.18.99.1/24 dev v0
    ip -6 addr add fd00::1/64 dev v0 nodad
    ip route add 224.0.0.0/4 dev v0
    if [[ $E2E_NET == v4 ]]; then
      ctl=198.18.99.1:7600 net_conf='multicast_iface = "v0"'
    else
      ctl='[fd00::1]:7600' net_conf='multicast_iface = "v0"
group_base = "ff15::7701"
admin = ["fd00::1"]'
    fi
    ;;
esac
run=$work/$label; rm -rf "$run"; mkdir -p "$run"; cd "$run"
cat > mcastd.toml <<TOML
[store]
archive_dir = "$run/archives"
key_dir = "$run/keys"
[pack]
symbol_size = ${E2E_SYMBOL:-1280}
compress = "none"
[server]
rate_mbps = $rate
control = "$ctl"
$net_conf
[tickets]
db = "$run/tickets.sqlite"
TOML
key=$("$bin/mcastd" -c mcastd.toml keygen | awk '{print $3}')
"$bin/mcastd" -c mcastd.toml pack "$work/src.bin" --title bench > pack.log 2>&1
sync  # no writeback of the fresh archive competing with the transfer
${E2E_SRV_WRAP:-} /usr/bin/time -f '%e %U %S %M' -o srv.time "$bin/mcastd" -c mcastd.toml > srv.log 2>&1 &
spid=$!
sleep 0.5
${E2E_RCV_WRAP:-} /usr/bin/time -f '%e %U %S %M' -o rcv.time "$bin/mcast-recv" get bench --server "$ctl" --server-key "$key" --dir "$run/out" --recv-buffer "${E2E_RCVBUF:-67108864}" \
  --json --timeout 600s ${E2E_RECV_ARGS:-} > rcv.json 2> rcv.log
rc=$?
grep -A1 '^Udp:' /proc/net/snmp > udp-snmp.txt  # drops (RcvbufErrors) in this namespace
# The mcastd process under /usr/bin/time (and E2E_SRV_WRAP, e.g. a profiler).
mpid=$spid; for _ in 1 2 3; do c=$(pgrep -P "$mpid" | head -1 || true); if [[ -n $c ]]; then mpid=$c; fi; done
# Resident memory while serving (the peak from /usr/bin/time includes start-up, when each
# archive's signed head is read and verified once).
awk '/^VmRSS/ {print $2}' "/proc/$mpid/status" > srv.vmrss 2>/dev/null || true
kill -TERM "$mpid" 2>/dev/null || true
wait $spid || true
ok=0
[[ $rc == 0 ]] && "$bin/mcastd" -c mcastd.toml unpack "$run/out/bench.mca" -o "$run/restored.bin" > unpack.log 2>&1 \
  && cmp -s "$run/restored.bin" "$work/src.bin" && ok=1
read -r rw ru rs rr < rcv.time
read -r sw su ss sr < srv.time
echo "$label-$([[ ${E2E_NET:-lo} == lo ]] && echo lo-)1rx $rw $(awk -v a="$su" -v b="$ss" 'BEGIN{print a+b}') $sr $(awk -v a="$ru" -v b="$rs" 'BEGIN{print a+b}') $rr $ok" >> "$work/results"
tail -1 rcv.json > report.json
