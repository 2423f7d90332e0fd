#!/usr/bin/python3
"""Tiny test backend for Sluice's demo and kernel tests (stdlib only).

    backend.py --name NAME --bind IP [--tcp-port P] [--udp-port Q] [--echo-port E]

TCP: answers any request -- an HTTP request, or a raw line followed by a
half-close -- with

    HTTP/1.1 200 OK ... \r\n\r\nNAME <client-ip>\n

and closes the connection. UDP: answers every datagram with `NAME <client-ip>\n`.
Echo (TCP, --echo-port): sends back every byte received; when the client
half-closes, adds `END <bytes> <sha256-hex>\n` for everything it received, then
closes -- a check that a proxy delivers a whole stream, its EOF, and a reply
sent after the client's half-close.
<client-ip> is the peer address as the backend sees it, so a test can tell
whether the proxy masqueraded the traffic.

Prints `ready` on stdout (flushed) once every socket is listening. A port of 0
or an absent port switches that protocol off; at least one must be on.

No name lookups are made anywhere (no getfqdn, no reverse DNS): test network
namespaces have no resolver route, and a lookup would stall or leak packets.
Run it with /usr/bin/python3 (a pyenv shim costs seconds per start).
"""

import argparse
import hashlib
import ipaddress
import signal
import socket
import sys
import threading

# How long a TCP connection may take to deliver its request before we answer
# anyway (a client that connects and sends nothing still gets a reply).
REQUEST_WAIT_SECONDS = 2.0
# Cap on how much of a request we read; the content does not matter.
MAX_REQUEST_BYTES = 64 * 1024

VERBOSE = False


def log(msg):
    if VERBOSE:
        print(msg, file=sys.stderr, flush=True)


def family_of(ip):
    """AF_INET or AF_INET6 for a literal address (never resolves names)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    except ValueError:
        sys.exit(f"backend.py: --bind wants an IP address literal, got {ip!r}")


def peer_ip(addr):
    """Client IP from a socket address; strips the IPv4-mapped IPv6 prefix."""
    ip = addr[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[len("::ffff:"):]
    return ip


def request_complete(data):
    """True once `data` holds a whole request.

    An HTTP request ends with an empty line. Anything else (a raw test line)
    is complete at its first newline. Answering before the whole request has
    arrived would leave unread bytes behind, and closing a socket with unread
    input makes the kernel send a RST that can destroy our reply.
    """
    if b"\r\n\r\n" in data or b"\n\n" in data:
        return True
    first, sep, _ = data.partition(b"\n")
    if not sep:
        return False
    return not first.rstrip(b"\r").split(b" ")[-1].startswith(b"HTTP/")


def handle_tcp(conn, addr, name):
    client = peer_ip(addr)
    try:
        conn.settimeout(REQUEST_WAIT_SECONDS)
        data = b""
        try:
            while len(data) < MAX_REQUEST_BYTES and not request_complete(data):
                chunk = conn.recv(4096)
                if not chunk:  # client half-closed: the request is complete
                    break
                data += chunk
        except socket.timeout:
            pass  # answer whatever we have
        body = f"{name} {client}\n".encode()
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
            "\r\n"
        ).encode()
        conn.sendall(head + body)
        log(f"tcp {client}:{addr[1]} -> {name}")
        # Half-close, then drain until the client closes too (briefly), so the
        # close below never turns into a RST while the reply is in flight.
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
    except OSError as e:
        log(f"tcp {client}: {e}")
    finally:
        conn.close()


def handle_echo(conn, addr):
    client = peer_ip(addr)
    digest = hashlib.sha256()
    total = 0
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:  # the client half-closed: report what arrived
                break
            digest.update(chunk)
            total += len(chunk)
            conn.sendall(chunk)
        conn.sendall(f"END {total} {digest.hexdigest()}\n".encode())
        log(f"echo {client}:{addr[1]} {total} bytes")
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
    except OSError as e:
        log(f"echo {client}: {e}")
    finally:
        conn.close()


def serve_echo(sock):
    while True:
        try:
            conn, addr = sock.accept()
        except OSError as e:
            log(f"echo accept: {e}")
            continue
        threading.Thread(target=handle_echo, args=(conn, addr), daemon=True).start()


def serve_tcp(sock, name):
    while True:
        try:
            conn, addr = sock.accept()
        except OSError as e:
            log(f"tcp accept: {e}")
            continue
        threading.Thread(target=handle_tcp, args=(conn, addr, name), daemon=True).start()


def serve_udp(sock, name):
    while True:
        try:
            _, addr = sock.recvfrom(65535)
            sock.sendto(f"{name} {peer_ip(addr)}\n".encode(), addr)
            log(f"udp {peer_ip(addr)}:{addr[1]} -> {name}")
        except OSError as e:  # e.g. ICMP errors reported on the socket
            log(f"udp: {e}")


def open_socket(kind, bind_ip, port):
    fam = family_of(bind_ip)
    s = socket.socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6 and bind_ip == "::":
        # Dual-stack when bound to the wildcard, so IPv4 clients work too.
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((bind_ip, port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    return s


def main():
    global VERBOSE
    p = argparse.ArgumentParser(description="Tiny TCP/UDP test backend: replies 'NAME <client-ip>'.")
    p.add_argument("--name", required=True, help="name put in every reply")
    p.add_argument("--bind", default="0.0.0.0", help="IP address literal to listen on (default 0.0.0.0)")
    p.add_argument("--tcp-port", type=int, default=0, help="TCP port (0 or absent: no TCP)")
    p.add_argument("--udp-port", type=int, default=0, help="UDP port (0 or absent: no UDP)")
    p.add_argument("--echo-port", type=int, default=0, help="TCP echo port (0 or absent: none)")
    p.add_argument("--verbose", action="store_true", help="log each request on stderr")
    args = p.parse_args()
    VERBOSE = args.verbose
    if not args.tcp_port and not args.udp_port:
        p.error("give --tcp-port and/or --udp-port")
    for port in (args.tcp_port, args.udp_port, args.echo_port):
        if not 0 <= port <= 65535:
            p.error(f"bad port {port}")
    if any(c.isspace() for c in args.name) or not args.name:
        p.error("--name must be one non-empty word")

    # Exit quietly on SIGTERM (callers stop us with kill) and on SIGINT,
    # unless SIGINT was ignored when we started (a background job of a script:
    # the script's own Ctrl-C handling stops us then).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, lambda *_: sys.exit(0))

    threads = []
    try:
        if args.tcp_port:
            s = open_socket(socket.SOCK_STREAM, args.bind, args.tcp_port)
            threads.append(threading.Thread(target=serve_tcp, args=(s, args.name), daemon=True))
        if args.udp_port:
            s = open_socket(socket.SOCK_DGRAM, args.bind, args.udp_port)
            threads.append(threading.Thread(target=serve_udp, args=(s, args.name), daemon=True))
        if args.echo_port:
            s = open_socket(socket.SOCK_STREAM, args.bind, args.echo_port)
            threads.append(threading.Thread(target=serve_echo, args=(s,), daemon=True))
    except OSError as e:
        sys.exit(f"backend.py: cannot listen on {args.bind}: {e}")
    for t in threads:
        t.start()
    print("ready", flush=True)
    # The main thread only waits for signals; the workers are daemons.
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
