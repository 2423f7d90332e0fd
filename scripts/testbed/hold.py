#!/usr/bin/python3
"""Long-lived TCP connections for Sluice's kernel tests (stdlib only).

    hold.py serve --name NAME --bind IP --port P
    hold.py connect --target IP:PORT

serve: accepts connections, sends `NAME\\n` at once, then reads until the client
half-closes (or closes) and closes its side. A client that never closes keeps the
connection established for as long as it lives. Prints `ready` once listening.

connect: connects, prints the first line it receives (the backend's name), flushed,
then keeps the connection open until it is killed or the server closes it.
Prints `ERROR <msg>` and exits 1 when it cannot connect.

IPv4 literals only; no name lookups. Run it with /usr/bin/python3.
"""

import argparse
import socket
import sys
import threading


def serve(name, bind, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(64)
    print("ready", flush=True)

    def handle(c):
        try:
            c.sendall((name + "\n").encode())
            while c.recv(4096):
                pass
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def connect(target):
    ip, _, port = target.rpartition(":")
    try:
        c = socket.create_connection((ip, int(port)), timeout=3)
        c.settimeout(None)
        line = c.makefile("r").readline().strip()
    except OSError as e:
        print(f"ERROR {e}", flush=True)
        sys.exit(1)
    print(line or "ERROR empty reply", flush=True)
    try:
        while c.recv(4096):
            pass
    except OSError:
        pass


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("connect")
    c.add_argument("--target", required=True)
    a = p.parse_args()
    if a.mode == "serve":
        serve(a.name, a.bind, a.port)
    else:
        connect(a.target)


if __name__ == "__main__":
    main()
