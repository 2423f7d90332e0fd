"""UDP probes from the client namespace: what does a Service address do right now?

Each probe is one datagram from a fresh socket (a new flow, so it goes through the proxy's
rules rather than an existing conntrack entry). netbench in the backend namespace answers
with the address the datagram reached, so a probe tells which endpoint the rules chose.
Without a rule for the address, the datagram reaches the sink namespace, whose netbench
answers with the Service address itself.
"""

import errno
import socket
import time

from .netns import entered

UNREACHABLE = "unreachable"
TIMEOUT = "timeout"


def probe_once(ip, port, timeout=0.2):
    """One probe; returns the answering endpoint address, UNREACHABLE or TIMEOUT."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.connect((ip, port))
        s.send(b"probe\n")
        data = s.recv(256)
        return data.decode("ascii", "replace").strip()
    except socket.timeout:
        return TIMEOUT
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM):
            return UNREACHABLE
        return f"error:{e.errno}"
    finally:
        s.close()


def wait_for(ns, ip, port, done, timeout, t0=None, confirm=1, abort=None):
    """Probes `ip:port` from namespace `ns` until `done(answer)` holds for `confirm` probes in
    a row. Returns the CLOCK_MONOTONIC time of the first of those probes, or None on timeout.
    `abort`, called about twice a second, may return a reason to give up (raised).

    Probes are spaced 2 ms apart at first and then by 1 % of the time already waited, so
    the resolution stays within about 1 % of what is measured while a long wait (a full
    sync of 20 000 Services) does not add a steady load of probe packets to the machine.
    Entering the namespace is one setns() call each way, per probe.
    """
    t0 = time.monotonic() if t0 is None else t0
    deadline = time.monotonic() + timeout
    first = None
    streak = 0
    checked = time.monotonic()
    while True:
        if abort is not None and time.monotonic() - checked > 0.5:
            checked = time.monotonic()
            why = abort()           # outside the client namespace: it may talk to the node's
            if why:
                raise RuntimeError(why)
        sent = time.monotonic()
        with entered(ns):
            answer = probe_once(ip, port)
        if done(answer):
            if streak == 0:
                first = sent
            streak += 1
            if streak >= confirm:
                return first
            continue
        streak = 0
        now = time.monotonic()
        if now > deadline:
            return None
        time.sleep(max(0.002, (now - t0) * 0.01))


def answer_is(value):
    return lambda a: a == value


def not_served(ip):
    """No rule for `ip`: the sink answered (with `ip`). A timeout does not count (on a busy
    machine a slow answer is not a missing rule)."""
    return lambda a: a == ip
