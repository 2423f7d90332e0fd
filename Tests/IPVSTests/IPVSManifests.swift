// The manifests the IPVS unit suites share: demo/web (port 80 -> 8080, endpoints on node-b)
// and demo/dns (UDP 53, one endpoint).

/// demo/web at 10.96.0.10: port `p` 80 -> 8080 over `proto`, a NodePort (30080) unless
/// `nodePort` is false, ClientIP affinity when `sticky`; its endpoints on node-b; `extra`
/// (further YAML documents, starting with `---`) follows.
func ipvsWebManifest(endpoints: [String], proto: String = "TCP", sticky: Bool = false, nodePort: Bool = true,
                     extra: String = "") -> String {
    var spec = nodePort ? "  type: NodePort\n" : ""
    spec += "  clusterIP: 10.96.0.10\n"
    if sticky { spec += "  sessionAffinity: ClientIP\n" }
    spec += "  ports: [{name: p, port: 80, protocol: \(proto)\(nodePort ? ", nodePort: 30080" : "")}]\n"
    let addresses = endpoints.map { "{addresses: [\($0)], nodeName: node-b}" }.joined(separator: ", ")
    return """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: demo}
        spec:
        \(spec)---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
        addressType: IPv4
        ports: [{name: p, port: 8080, protocol: \(proto)}]
        endpoints: [\(addresses)]
        \(extra)
        """
}

/// demo/dns at 10.96.0.53: UDP port `d` 53, one endpoint (10.244.1.3 on node-b); a document
/// to follow another (it starts with `---`).
let ipvsDNSManifest = """
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: dns, namespace: demo}
    spec:
      clusterIP: 10.96.0.53
      ports: [{name: d, port: 53, protocol: UDP}]
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: dns-1, namespace: demo, labels: {kubernetes.io/service-name: dns}}
    addressType: IPv4
    ports: [{name: d, port: 53, protocol: UDP}]
    endpoints: [{addresses: [10.244.1.3], nodeName: node-b}]
    """
