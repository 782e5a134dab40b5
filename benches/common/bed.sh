# Shared by the namespace-bed benches (benches/mixed.sh, benches/fec_peers.sh); sourced, not run.
# Needs $bin (mcastd's directory), $peerbed (shared/tools/peerbed.sh) and $net (the bed's /24
# prefix, PB_NET).

# A fresh key store under DIR (DIR/store.toml, archives and keys below it) and a new server
# identity; prints the identity's public key (what `mcast-recv --server-key` pins).
make_store() {
  local dir=$1
  mkdir -p "$dir"
  rm -rf "$dir/archives" "$dir/keys"
  cat > "$dir/store.toml" <<TOML
[store]
archive_dir = "$dir/archives"
key_dir = "$dir/keys"
TOML
  "$bin/mcastd" -c "$dir/store.toml" keygen 2> "$dir/keygen.log" | awk '{print $3}'
}

# Wait until the bridge stops flooding a group nobody joined (it floods for a while after it
# comes up, until its querier counts as present). Prints the tries it took; fails after 30 s.
wait_filtering() {
  local k before after
  txp() { "$peerbed" exec sw ip -s link show c1 | awk '/TX:/{getline; print $2}'; }
  for k in $(seq 1 60); do
    before=$(txp)
    "$peerbed" exec srv python3 -c "
import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_IF,socket.inet_aton('$net.1'))
[s.sendto(b'x',('239.255.1.1',5000)) for i in range(20)]"
    sleep 0.1
    after=$(txp)
    if (( after - before < 10 )); then echo "$k"; return 0; fi
    sleep 0.4
  done
  echo "$(basename "$0"): the bridge still floods multicast after 30 s" >&2
  return 1
}
