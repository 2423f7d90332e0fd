#!/usr/bin/python3
"""Test client for Sluice's demo and kernel tests (stdlib only).

    client.py --proto tcp|udp --target IP:PORT [--count N] [--timeout SEC]
              [--source-ip IP] [--same-socket] [--show-source] [--interval SEC]

Sends N requests and prints one line per request, in order:

    NAME          the first word of the backend's reply (backend.py's --name)
    REFUSED       TCP connection refused / ICMP port unreachable on UDP
    TIMEOUT       no answer within --timeout seconds
    ERROR <msg>   anything else (no route, reset, empty reply, ...)

With --show-source a NAME line also carries the client address the backend
saw (`NAME <client-ip>`), to check masquerading.

TCP: a new connection per request, sends `GET / HTTP/1.0\\r\\n\\r\\n`, half-closes,
reads until the server closes. UDP: one datagram per request, each from a fresh
socket, held open until the end so no two share a source port (so each is a new
conntrack flow), unless --same-socket. --interval waits
that long between requests (a long-running client, e.g. a resolver on one socket).

Exits 0 whatever the answers were; 2 for bad arguments.
No name lookups: targets and source must be IP address literals.
"""

import argparse
import errno
import ipaddress
import socket
import sys
import time

REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def parse_target(text):
    """'IP:PORT' or '[IPv6]:PORT' -> (family, ip, port); raises ValueError."""
    if text.startswith("["):
        ip, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("want [IPv6]:PORT")
    else:
        ip, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("want IP:PORT")
    addr = ipaddress.ip_address(ip)
    port = int(port)
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    fam = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    return fam, str(addr), port


def reply_line(data, show_source):
    """The result line for a reply: its body's first word (and the source)."""
    _, sep, body = data.partition(b"\r\n\r\n")
    if not sep:  # not HTTP (UDP): the whole datagram is the body
        body = data
    words = body.decode("utf-8", "replace").split()
    if not words:
        return "ERROR empty reply"
    if show_source:
        return " ".join(words[:2])
    return words[0]


def error_line(exc):
    """Classify an exception as REFUSED / TIMEOUT / ERROR <msg>."""
    if isinstance(exc, socket.timeout):
        return "TIMEOUT"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "REFUSED"
    msg = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"ERROR {msg}"


def new_socket(fam, kind, source_ip, timeout):
    s = socket.socket(fam, kind)
    s.settimeout(timeout)
    if source_ip:
        s.bind((source_ip, 0))
    return s


def tcp_request(fam, target, source_ip, timeout, show_source):
    deadline = time.monotonic() + timeout
    s = None
    try:
        s = new_socket(fam, socket.SOCK_STREAM, source_ip, timeout)
        s.connect(target)
        s.sendall(REQUEST)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            s.settimeout(left)
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return reply_line(data, show_source)
    except OSError as e:
        return error_line(e)
    finally:
        if s is not None:
            s.close()


def udp_request(s, target, show_source):
    try:
        # connect() makes the kernel report ICMP port unreachable as
        # ECONNREFUSED on this socket, and drops datagrams from elsewhere.
        s.connect(target)
        s.send(b"ping\n")
        return reply_line(s.recv(65535), show_source)
    except OSError as e:
        return error_line(e)


def main():
    p = argparse.ArgumentParser(description="Send requests to a test backend and print who answered.")
    p.add_argument("--proto", required=True, choices=("tcp", "udp"))
    p.add_argument("--target", required=True, help="IP:PORT (or [IPv6]:PORT)")
    p.add_argument("--count", type=int, default=1, help="number of requests (default 1)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per request (default 2)")
    p.add_argument("--source-ip", help="bind to this local address first")
    p.add_argument("--same-socket", action="store_true", help="UDP: send every datagram from one socket")
    p.add_argument("--show-source", action="store_true", help="print 'NAME <client-ip-seen-by-backend>'")
    p.add_argument("--interval", type=float, default=0.0, help="seconds to wait between requests (default 0)")
    args = p.parse_args()
    try:
        fam, ip, port = parse_target(args.target)
    except ValueError as e:
        p.error(f"--target {args.target!r}: {e}")
    if args.count < 1:
        p.error("--count must be at least 1")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    if args.interval < 0:
        p.error("--interval must not be negative")
    if args.source_ip:
        try:
            if (ipaddress.ip_address(args.source_ip).version == 6) != (fam == socket.AF_INET6):
                p.error("--source-ip and --target must be the same address family")
        except ValueError:
            p.error(f"--source-ip {args.source_ip!r} is not an IP address")
    target = (ip, port)

    shared = None
    held = []
    try:
        for i in range(args.count):
            if i and args.interval:
                time.sleep(args.interval)
            if args.proto == "tcp":
                line = tcp_request(fam, target, args.source_ip, args.timeout, args.show_source)
            elif args.same_socket:
                if shared is None:
                    try:
                        shared = new_socket(fam, socket.SOCK_DGRAM, args.source_ip, args.timeout)
                    except OSError as e:
                        print(error_line(e), flush=True)
                        continue
                line = udp_request(shared, target, args.show_source)
            else:
                try:
                    s = new_socket(fam, socket.SOCK_DGRAM, args.source_ip, args.timeout)
                except OSError as e:
                    print(error_line(e), flush=True)
                    continue
                # Kept open until the end: a closed socket's port could be handed out again,
                # and the next "new" flow would then be the old one (same 5-tuple).
                held.append(s)
                line = udp_request(s, target, args.show_source)
            print(line, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if shared is not None:
            shared.close()
        for s in held:
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
