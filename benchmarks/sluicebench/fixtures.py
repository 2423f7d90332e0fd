"""Deterministic benchmark fixtures: S Services x E endpoints as a manifest directory.

Everything here is a pure function of (S, E, mix): no randomness, no clock. A fixture is
written once into a cache directory and reused (a stamp file records the generator version).

Layout of a fixture directory (what `sluice --manifests DIR` reads):

    one-00000.yaml ...  the first K = min(50, S) Services, one file each (Service plus
                        EndpointSlice), so a scenario that changes one of them rewrites a small
                        file, as one API event would carry one object.
    svc-0000.yaml ...   the other Services, about 5 000 endpoints per file (500 Services at
                        E = 10). Files sort in Service order, so a prefix of them is a
                        smaller fixture: the harness grows a proxy's state file by file.

Every Service has one TCP port and E endpoints, addresses nobody answers on (they only have
to be in the rules), except Service 0, the probe: it has ONE endpoint, a real address in
the backend namespace, and a UDP port besides the TCP one, so a UDP probe tells at once
which version of the rules the kernel holds, and the data-path benchmark has a target.

Scenario files (added and removed by the harness, never part of the cached fixture):

    zz-added.yaml       the Service "add one service" creates (and "delete one service" removes).
    zz-last.yaml        svc-last, present only while the data path is measured.
"""

import ipaddress
import os

GENERATOR_VERSION = "5"

NAMESPACE = "bench"
NODE_NAME = "bench-node"
REMOTE_NODE = "bench-node-2"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/12"
NODE_IP = "192.168.50.1"

# Address plan of the test network (see netns.py).
CLIENT_IP = "10.244.1.10"
CLIENT_GW = "10.244.1.1"
BACKEND_GW = "10.244.16.1"
BACKEND_PREFIX = 20                     # the backend link is 10.244.16.0/20
ADDED_BACKEND = "10.244.18.10"          # the endpoint of the added Service
SINK_GW, SINK_IP = "10.250.0.1", "10.250.0.2"   # where the node routes the service CIDR

UDP_PORT, UDP_TARGET = 53, 5353         # the probe Service's UDP port
TCP_PORT, TCP_TARGET = 80, 8080         # every Service's TCP port; the data path uses the probe's

CHURN_SERVICES = 50                     # Services in files of their own (fewer when S is smaller)
CHUNK_ENDPOINTS = 5000                  # endpoints per file of the other Services

MIXES = ("clusterip", "mixed")

_SVC_BASE = int(ipaddress.IPv4Address("10.96.0.16"))
_EP_BASE = int(ipaddress.IPv4Address("10.128.0.1"))
_LB_BASE = int(ipaddress.IPv4Address("172.20.0.1"))
_ALT_BASE = int(ipaddress.IPv4Address("10.192.0.1"))
ADDED_CLUSTER_IP = "10.111.0.10"
LAST_CLUSTER_IP = "10.111.0.11"         # the data path's "last rule" Service (svc-last)


def single_file_count(s):
    """How many Services of an S-Service fixture have a file of their own."""
    return max(1, min(CHURN_SERVICES, s))


def cluster_ip(i):
    return str(ipaddress.IPv4Address(_SVC_BASE + i))


def probe_backend(generation):
    """The probe Service's endpoint in generation 0 or 1 (the endpoint change toggles it)."""
    return f"10.244.{16 + generation}.10"


def backend_addresses():
    """Every address the backend namespace must answer on."""
    return [probe_backend(0), probe_backend(1), ADDED_BACKEND]


def service_name(i):
    return f"svc-{i:05d}"


def service_type(i, mix):
    """ClusterIP for every Service in `clusterip`; in `mixed` 60 % ClusterIP, 25 % NodePort,
    15 % LoadBalancer (with an ingress IP), by index modulo 20. The probe is a ClusterIP."""
    if mix == "clusterip" or i == 0:
        return "ClusterIP"
    r = i % 20
    if r < 12:
        return "ClusterIP"
    if r < 17:
        return "NodePort"
    return "LoadBalancer"


def _service_yaml(name, ip, ports, stype="ClusterIP", lb_ip=None):
    lines = [
        "apiVersion: v1",
        "kind: Service",
        "metadata:",
        f"  name: {name}",
        f"  namespace: {NAMESPACE}",
        "spec:",
        f"  type: {stype}",
        f"  clusterIP: {ip}",
        "  clusterIPs:",
        f"    - {ip}",
        "  ports:",
    ]
    for pname, proto, port, target, node_port in ports:
        lines += [
            f"    - name: {pname}",
            f"      protocol: {proto}",
            f"      port: {port}",
            f"      targetPort: {target}",
        ]
        if node_port:
            lines.append(f"      nodePort: {node_port}")
    if lb_ip:
        lines += ["status:", "  loadBalancer:", "    ingress:", f"      - ip: {lb_ip}"]
    return "\n".join(lines) + "\n"


def _slice_yaml(name, ports, addresses, node):
    lines = [
        "apiVersion: discovery.k8s.io/v1",
        "kind: EndpointSlice",
        "metadata:",
        f"  name: {name}-bench",
        f"  namespace: {NAMESPACE}",
        "  labels:",
        f"    kubernetes.io/service-name: {name}",
        "addressType: IPv4",
        "ports:",
    ]
    for pname, proto, _, target, _ in ports:
        lines += [f"  - name: {pname}", f"    port: {target}", f"    protocol: {proto}"]
    lines.append("endpoints:")
    for a in addresses:
        lines += [
            "  - addresses:",
            f"      - {a}",
            "    conditions:",
            "      ready: true",
            f"    nodeName: {node}",
        ]
    return "\n".join(lines) + "\n"


def probe_service_yaml(generation):
    """The probe Service (index 0) with its single endpoint in `generation` (0 or 1)."""
    name = service_name(0)
    ports = [("dns", "UDP", UDP_PORT, UDP_TARGET, 0), ("http", "TCP", TCP_PORT, TCP_TARGET, 0)]
    return _service_yaml(name, cluster_ip(0), ports) + "---\n" + _slice_yaml(name, ports, [probe_backend(generation)], REMOTE_NODE)


def service_yaml(i, e, mix, generation=0):
    """Service i of a fixture. Generation 1 moves the first endpoint to another address."""
    return probe_service_yaml(generation) if i == 0 else cold_service_yaml(i, e, mix, generation)


def added_service_yaml():
    """The Service that "add one service" writes (one UDP port, one real endpoint)."""
    name = "svc-added"
    ports = [("dns", "UDP", UDP_PORT, UDP_TARGET, 0)]
    return _service_yaml(name, ADDED_CLUSTER_IP, ports) + "---\n" + _slice_yaml(name, ports, [ADDED_BACKEND], REMOTE_NODE)


def last_service_yaml():
    """svc-last: a TCP Service whose rules sort after every fixture Service's (names compare
    after "svc-NNNNN"), so a new connection to it walks the whole KUBE-SERVICES chain."""
    name = "svc-last"
    ports = [("http", "TCP", TCP_PORT, TCP_TARGET, 0), ("dns", "UDP", UDP_PORT, UDP_TARGET, 0)]
    return _service_yaml(name, LAST_CLUSTER_IP, ports) + "---\n" + _slice_yaml(name, ports, [ADDED_BACKEND], REMOTE_NODE)


def cold_service_yaml(i, e, mix, generation=0):
    name = service_name(i)
    stype = service_type(i, mix)
    node_port = 30000 + (i % 35000) if stype != "ClusterIP" else 0
    ports = [("http", "TCP", TCP_PORT, TCP_TARGET, node_port)]
    lb_ip = str(ipaddress.IPv4Address(_LB_BASE + i)) if stype == "LoadBalancer" else None
    addrs = [str(ipaddress.IPv4Address(_EP_BASE + i * e + j)) for j in range(e)]
    if generation:
        addrs[0] = str(ipaddress.IPv4Address(_ALT_BASE + i))
    return _service_yaml(name, cluster_ip(i), ports, stype, lb_ip) + "---\n" + _slice_yaml(name, ports, addrs, REMOTE_NODE)


def chunk_size(e):
    """Services per file beyond the single-file ones."""
    return max(5, CHUNK_ENDPOINTS // e)


def chunk_files(path):
    """The multi-Service files of a fixture, in Service order."""
    return sorted(f for f in os.listdir(path) if f.startswith("svc-") and f.endswith(".yaml"))


def single_file(i):
    """The file name of a Service that has a file of its own."""
    return f"one-{i:05d}.yaml"


def fixture_name(s, e, mix):
    return f"s{s}-e{e}-{mix}"


def generate(root, s, e, mix):
    """Writes (or reuses) the fixture directory for (s, e, mix) under `root`; returns its path."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}")
    if s < 1 or e < 1:
        raise ValueError("S and E must be at least 1")
    path = os.path.join(root, fixture_name(s, e, mix))
    stamp = os.path.join(path, ".stamp")
    want = f"{GENERATOR_VERSION} {s} {e} {mix}\n"
    if os.path.exists(stamp) and open(stamp).read() == want:
        return path
    os.makedirs(path, exist_ok=True)
    for f in os.listdir(path):
        os.unlink(os.path.join(path, f))
    single = single_file_count(s)
    for i in range(single):
        _write(os.path.join(path, single_file(i)), service_yaml(i, e, mix))
    chunk = chunk_size(e)
    for k, chunk_start in enumerate(range(single, s, chunk)):
        docs = [cold_service_yaml(i, e, mix) for i in range(chunk_start, min(s, chunk_start + chunk))]
        _write(os.path.join(path, f"svc-{k:04d}.yaml"), "---\n".join(docs))
    with open(stamp, "w") as f:
        f.write(want)
    return path


def _write(path, text):
    """Writes a file atomically (rename), so the proxy never reads half of it."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


write_atomic = _write


def expected_counts(s, e, mix):
    """Service ports and endpoints of a fixture (for sanity checks of what sluice reports)."""
    return s + 1, 1 + (s - 1) * e        # the probe has two ports and one endpoint
