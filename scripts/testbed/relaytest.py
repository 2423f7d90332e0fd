#!/usr/bin/python3
"""Stream tests through a proxy for Sluice's kernel tests (stdlib only).

    relaytest.py halfclose  --target IP:PORT [--bytes N] [--timeout SEC]
    relaytest.py concurrent --target IP:PORT [--count N] [--timeout SEC]
    relaytest.py hold       --target IP:PORT --trigger FILE [--timeout SEC]

halfclose: against backend.py's --echo-port. Sends N bytes (default 1 MiB) while
reading, half-closes, reads to EOF. Prints `OK <bytes>` when the echo is exactly
what was sent and the backend's `END <bytes> <sha256>` trailer matches (the
backend saw every byte, then EOF), else `FAIL <reason>`.

concurrent: against backend.py's HTTP port. Opens N connections at once (every
one connected before any sends), then each sends a request, half-closes and
reads the reply. Prints `ok=<n> failed=<m>`, then `<backend> <count>` lines,
then one `FAIL <reason>` line per failed connection.

hold: against an echo port. Connects, checks one echo, prints `connected`, waits
until FILE exists, then checks another echo and prints `alive` or `closed`.

Exit status 0 whatever the outcome (the caller reads the output); 2 for bad
arguments. No name lookups: targets are IP address literals.
"""

import argparse
import hashlib
import os
import socket
import sys
import threading
import time


def parse_target(text):
    ip, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError("want IP:PORT")
    return ip, int(port)


def halfclose(target, size, timeout):
    payload = bytes((i * 31 + (i >> 8)) & 0xFF for i in range(size))
    s = socket.create_connection(target, timeout=timeout)
    errors = []

    def writer():
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(f"send: {e}")

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    received = bytearray()
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    except OSError as e:
        errors.append(f"recv after {len(received)} bytes: {e}")
    t.join(timeout)
    s.close()
    if errors:
        return "FAIL " + "; ".join(errors)
    trailer = f"END {size} {hashlib.sha256(payload).hexdigest()}\n".encode()
    if bytes(received[:size]) != payload:
        return f"FAIL echo differs ({len(received)} bytes received)"
    if bytes(received[size:]) != trailer:
        return f"FAIL trailer {bytes(received[size:])[:200]!r}, want {trailer!r}"
    return f"OK {size}"


def concurrent(target, count, timeout):
    barrier = threading.Barrier(count, timeout=timeout)
    results = [None] * count

    def one(i):
        s = None
        try:
            s = socket.create_connection(target, timeout=timeout)
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass  # someone failed to connect: carry on regardless
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            _, _, body = data.partition(b"\r\n\r\n")
            words = body.split()
            results[i] = ("ok", words[0].decode()) if words else ("fail", "empty reply")
        except OSError as e:
            results[i] = ("fail", str(e))
            barrier.abort()
        finally:
            if s is not None:
                s.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r[1] for r in results if r and r[0] == "ok"]
    failed = [r[1] if r else "no result" for r in results if not r or r[0] != "ok"]
    lines = [f"ok={len(ok)} failed={len(failed)}"]
    for name in sorted(set(ok)):
        lines.append(f"{name} {ok.count(name)}")
    lines += [f"FAIL {f}" for f in failed]
    return "\n".join(lines)


def echo_once(s, byte):
    s.sendall(byte)
    return s.recv(1) == byte


def hold(target, trigger, timeout):
    s = socket.create_connection(target, timeout=timeout)
    if not echo_once(s, b"a"):
        print("FAIL first echo", flush=True)
        return
    print("connected", flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(trigger) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        print("alive" if echo_once(s, b"b") else "closed", flush=True)
    except OSError:
        print("closed", flush=True)
    s.close()


def main():
    p = argparse.ArgumentParser(description="Stream tests through a proxy.")
    p.add_argument("mode", choices=("halfclose", "concurrent", "hold"))
    p.add_argument("--target", required=True, type=parse_target, help="IP:PORT")
    p.add_argument("--bytes", type=int, default=1 << 20, help="halfclose: bytes to send (default 1 MiB)")
    p.add_argument("--count", type=int, default=200, help="concurrent: connections (default 200)")
    p.add_argument("--trigger", help="hold: file whose appearance ends the wait")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per socket operation (default 20)")
    args = p.parse_args()
    try:
        if args.mode == "halfclose":
            print(halfclose(args.target, args.bytes, args.timeout), flush=True)
        elif args.mode == "concurrent":
            print(concurrent(args.target, args.count, args.timeout), flush=True)
        else:
            if not args.trigger:
                p.error("hold needs --trigger")
            hold(args.target, args.trigger, args.timeout)
    except OSError as e:
        print(f"FAIL {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
