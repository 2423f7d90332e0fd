"""Network namespaces, the benchmark's test network, and the processes running in it.

Every namespace and process the harness makes is recorded before it is made and removed on
exit (normal, exception, SIGINT/SIGTERM); names carry a per-run prefix so parallel runs
never collide, and the host's own namespace is never changed.

The test network (one per proxy instance), all addresses from fixtures.py:

    client  eth0 10.244.1.10/24  --- vcl 10.244.1.1/24 + node IP 192.168.50.1/24 ---  node
    backend eth0 10.244.16.10/20 ... --- vbe 10.244.16.1/20 ------------------------  node

    sink    eth0 10.250.0.2/30            --- vsk 10.250.0.1/30 -------------------  node

The node namespace runs the proxy. It routes the service CIDR to the sink, which accepts
every address in it (a `local` route) and answers UDP probes with the address they were sent
to: a packet to a Service address the proxy has not (or no longer) programmed comes back at
once from the sink instead of timing out, so probes see both states quickly. (An
`unreachable` route would answer with ICMP errors, but the kernel rate-limits those per
sender outside any namespace's control: net.ipv4.route.error_cost.)
"""

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import time

from . import fixtures as fx

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

_PREFIX = f"sb{os.getpid() % 100000}"
_namespaces = []      # created by us, in order
_processes = []       # Popen objects we started
_counter = [0]


def run(args, input=None, check=True, capture=True, timeout=None):
    """Runs a command; returns CompletedProcess (text)."""
    r = subprocess.run(args, input=input, text=True, timeout=timeout,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.PIPE if capture else None)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {(r.stderr or '').strip()[:2000]}")
    return r


class Namespace:
    """One network namespace we own."""

    def __init__(self, role):
        _counter[0] += 1
        self.name = f"{_PREFIX}-{_counter[0]}{role}"
        if os.path.exists(f"/run/netns/{self.name}"):
            raise RuntimeError(f"network namespace {self.name} already exists")
        _namespaces.append(self)
        run(["ip", "netns", "add", self.name])
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        self.alive = True

    def cmd(self, args):
        """argv that runs `args` inside this namespace (exec, so a Popen pid is the process)."""
        return ["ip", "netns", "exec", self.name] + list(args)

    def run(self, args, **kw):
        return run(self.cmd(args), **kw)

    def sysctl(self, key, value, check=True):
        path = "/proc/sys/" + key.replace(".", "/")
        with entered(self):
            try:
                with open(path, "w") as f:
                    f.write(str(value))
            except OSError:
                if check:
                    raise

    def delete(self):
        if not self.alive:
            return
        self.alive = False
        for pid in _ns_pids(self.name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ns_pids(name):
    r = subprocess.run(["ip", "netns", "pids", name], text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


class entered:
    """Context manager: the calling thread works inside `ns` (sockets made here stay there)."""

    def __init__(self, ns):
        self.ns = ns

    def __enter__(self):
        self.home = os.open(f"/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.ns.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        try:
            if _libc.setns(self.home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(self.home)


def start(args, log_path=None, stdin=None, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=False):
    """Starts a process we own (killed at exit). With `log_path`, stdout and stderr go there."""
    if log_path:
        stdout = open(log_path, "w")
        stderr = subprocess.STDOUT
    p = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, text=text)
    if log_path:
        stdout.close()
    _processes.append(p)
    return p


def stop(p, timeout=10):
    """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit status."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in _processes:
        _processes.remove(p)
    return p.returncode


def cleanup():
    for p in list(_processes):
        if p.poll() is None:
            p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
    _processes.clear()
    for ns in reversed(_namespaces):
        ns.delete()
    _namespaces.clear()


def _on_signal(signum, frame):
    print(f"bench: signal {signum}, cleaning up", file=sys.stderr)
    cleanup()
    sys.exit(128 + signum)


def install_cleanup():
    atexit.register(cleanup)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


class TestNetwork:
    """node + client + backend namespaces wired as in the module comment, with netbench
    serving UDP (probes) and TCP (data path) in the backend namespace."""

    def __init__(self, netbench, tmpdir):
        self.node = Namespace("n")
        self.client = Namespace("c")
        self.backend = Namespace("b")
        self.sink = Namespace("s")
        batch = [
            f"link add vcl netns {self.node.name} type veth peer name eth0 netns {self.client.name}",
            f"link add vbe netns {self.node.name} type veth peer name eth0 netns {self.backend.name}",
            f"link add vsk netns {self.node.name} type veth peer name eth0 netns {self.sink.name}",
        ]
        run(["ip", "-batch", "-"], input="\n".join(batch) + "\n")
        node = [
            f"addr add {fx.CLIENT_GW}/24 dev vcl",
            f"addr add {fx.NODE_IP}/24 dev vcl",
            "link set vcl up",
            f"addr add {fx.BACKEND_GW}/{fx.BACKEND_PREFIX} dev vbe",
            "link set vbe up",
            f"addr add {fx.SINK_GW}/30 dev vsk",
            "link set vsk up",
            f"route add {fx.SERVICE_CIDR} via {fx.SINK_IP}",
        ]
        run(["ip", "-n", self.node.name, "-batch", "-"], input="\n".join(node) + "\n")
        client = [
            f"addr add {fx.CLIENT_IP}/24 dev eth0",
            "link set eth0 up",
            f"route add 10.244.0.0/16 via {fx.CLIENT_GW}",
            f"route add {fx.SERVICE_CIDR} via {fx.CLIENT_GW}",
        ]
        run(["ip", "-n", self.client.name, "-batch", "-"], input="\n".join(client) + "\n")
        backend = [f"addr add {a}/{fx.BACKEND_PREFIX} dev eth0" for a in fx.backend_addresses()]
        backend += ["link set eth0 up", f"route add 10.244.0.0/16 via {fx.BACKEND_GW}"]
        run(["ip", "-n", self.backend.name, "-batch", "-"], input="\n".join(backend) + "\n")
        sink = [
            f"addr add {fx.SINK_IP}/30 dev eth0",
            "link set eth0 up",
            f"route add local {fx.SERVICE_CIDR} dev lo",
            f"route add 10.244.0.0/16 via {fx.SINK_GW}",
        ]
        run(["ip", "-n", self.sink.name, "-batch", "-"], input="\n".join(sink) + "\n")
        self.node.sysctl("net.ipv4.ip_forward", 1)
        self.client.sysctl("net.ipv4.ip_local_port_range", "1024 65000", check=False)
        self.backend.sysctl("net.core.somaxconn", 4096, check=False)
        self.server = start(self.backend.cmd([netbench, "serve", "--tcp", str(fx.TCP_TARGET), "--udp", str(fx.UDP_TARGET),
                                              "--threads", "4"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.server.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"netbench serve did not start: {line!r}")
        self.sink_server = start(self.sink.cmd([netbench, "serve", "--udp", str(fx.UDP_PORT), "--threads", "1"]),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.sink_server.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"netbench serve (sink) did not start: {line!r}")

    def close(self):
        stop(self.server, timeout=2)
        stop(self.sink_server, timeout=2)
        for ns in (self.client, self.backend, self.sink, self.node):
            ns.delete()


def vm_hwm(pid):
    """Peak resident set size of a process (VmHWM), in bytes; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def wait_until(pred, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return None
