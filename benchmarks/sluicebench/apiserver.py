"""An API double for the API source: the fixture's Services and EndpointSlices served as the
Kubernetes API serves them to kube-proxy's reflectors.

- LIST `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes` in
  pages: `limit` items and a `continue` token, as client-go's reflector asks (Sluice asks
  for 500), the last page without one; selectors are accepted and ignored (no fixture object
  carries the labels Sluice excludes).
- WATCH (`watch=true`): one BOOKMARK event at the list's resourceVersion, then the stream stays
  open, sending nothing, until `timeoutSeconds` or shutdown; `events` can be pushed to every
  open watch of a resource (`push`).

The objects are the fixture's (fixtures.py), built as dicts with the same fields as the YAML
files, so the two sources hold the same model. Python standard library only.
"""

import ipaddress
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import fixtures as fx

RESOURCE_VERSION = "1000"


def _service(name, ip, ports, stype="ClusterIP", lb_ip=None):
    spec = {"type": stype, "clusterIP": ip, "clusterIPs": [ip], "ports": []}
    for pname, proto, port, target, node_port in ports:
        p = {"name": pname, "protocol": proto, "port": port, "targetPort": target}
        if node_port:
            p["nodePort"] = node_port
        spec["ports"].append(p)
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": fx.NAMESPACE,
                                                                 "resourceVersion": RESOURCE_VERSION},
           "spec": spec}
    if lb_ip:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    return obj


def _slice(name, ports, addresses, node):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-bench", "namespace": fx.NAMESPACE, "resourceVersion": RESOURCE_VERSION,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": pname, "port": target, "protocol": proto} for pname, proto, _, target, _ in ports],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "nodeName": node} for a in addresses]}


def objects(s, e, mix):
    """(services, slices) of the (s, e, mix) fixture, as the YAML files describe them."""
    services, slices = [], []
    name = fx.service_name(0)
    ports = [("dns", "UDP", fx.UDP_PORT, fx.UDP_TARGET, 0), ("http", "TCP", fx.TCP_PORT, fx.TCP_TARGET, 0)]
    services.append(_service(name, fx.cluster_ip(0), ports))
    slices.append(_slice(name, ports, [fx.probe_backend(0)], fx.REMOTE_NODE))
    for i in range(1, s):
        name = fx.service_name(i)
        stype = fx.service_type(i, mix)
        node_port = 30000 + (i % 35000) if stype != "ClusterIP" else 0
        ports = [("http", "TCP", fx.TCP_PORT, fx.TCP_TARGET, node_port)]
        lb_ip = str(ipaddress.IPv4Address(fx._LB_BASE + i)) if stype == "LoadBalancer" else None
        addrs = [str(ipaddress.IPv4Address(fx._EP_BASE + i * e + j)) for j in range(e)]
        services.append(_service(name, fx.cluster_ip(i), ports, stype, lb_ip))
        slices.append(_slice(name, ports, addrs, fx.REMOTE_NODE))
    return services, slices


class APIDouble:
    """The double's HTTP server on 127.0.0.1 (create it inside the namespace it must serve)."""

    PATHS = {
        "/api/v1/services": ("ServiceList", "v1"),
        "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSliceList", "discovery.k8s.io/v1"),
        "/api/v1/nodes": ("NodeList", "v1"),
    }

    def __init__(self, s, e, mix, port=0):
        services, slices = objects(s, e, mix)
        # Each item pre-encoded once: a page is a join of its items.
        self.items = {"/api/v1/services": [json.dumps(o, separators=(",", ":")) for o in services],
                      "/apis/discovery.k8s.io/v1/endpointslices": [json.dumps(o, separators=(",", ":")) for o in slices],
                      "/api/v1/nodes": []}
        self.requests = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                double.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def kubeconfig(self, path):
        """Writes a kubeconfig naming the double (plain HTTP, no credentials)."""
        with open(path, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: double
  cluster: {{server: "http://127.0.0.1:{self.port}"}}
contexts:
- name: double
  context: {{cluster: double, user: nobody}}
current-context: double
users:
- name: nobody
  user: {{}}
""")
        return path

    def handle(self, h):
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        with self.lock:
            self.requests.append(h.path)
        if url.path not in self.PATHS:
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).encode()
            h.send_response(404)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        kind, api_version = self.PATHS[url.path]
        if query.get("watch") == "true":
            self.watch(h, kind, api_version, int(query.get("timeoutSeconds", "300")))
            return
        items = self.items[url.path]
        start = int(query.get("continue", "0") or "0")
        limit = int(query.get("limit", "0") or "0")
        end = len(items) if limit <= 0 else min(len(items), start + limit)
        meta = {"resourceVersion": RESOURCE_VERSION}
        if end < len(items):
            meta["continue"] = str(end)
            meta["remainingItemCount"] = len(items) - end
        body = ('{"kind":"%s","apiVersion":"%s","metadata":%s,"items":[' % (kind, api_version, json.dumps(meta))
                + ",".join(items[start:end]) + "]}").encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def watch(self, h, kind, api_version, timeout):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        obj_kind = kind[:-len("List")]

        def chunk(data):
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        try:
            bookmark = {"type": "BOOKMARK", "object": {"kind": obj_kind, "apiVersion": api_version,
                                                        "metadata": {"resourceVersion": RESOURCE_VERSION}}}
            chunk(json.dumps(bookmark).encode() + b"\n")
            deadline = time.monotonic() + timeout
            while not self.stopping.is_set() and time.monotonic() < deadline:
                self.stopping.wait(1.0)
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:
            pass

    def list_requests(self):
        """The LIST requests received so far (paths with their queries)."""
        with self.lock:
            return [r for r in self.requests if "watch=true" not in r]

    def close(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
