// Endpoint categorisation as kube-proxy 1.34 does it (pkg/proxy/topology.go): the cases of
// kube-proxy's TestCategorizeEndpoints, restated for 1.34, where hints are followed whenever
// every ready endpoint carries them (the Service's annotation is not consulted: the
// EndpointSlice controller only writes hints when the Service asks), node hints first, then
// zone hints, then every endpoint.

import SluiceCore
import Testing

/// One endpoint of a case: "10.1.2.3" plus its flags and hints.
struct TopoEP: Sendable, CustomStringConvertible {
    var ip: String
    var ready = true
    var serving = true
    var terminating = false
    var local = false
    var zones: Set<String> = []
    var nodes: Set<String> = []

    var endpoint: EndpointInfo {
        EndpointInfo(ip: IPAddress(ip)!, port: 80, isLocal: local, ready: ready, serving: serving, terminating: terminating,
                     zoneHints: zones, nodeHints: nodes)
    }
    var description: String { ip }
}

/// A case: the node, the Service's policies and the expected sets (nil: the set is unused).
struct TopoCase: Sendable, CustomStringConvertible {
    var name: String
    var zone: String? = "zone-a"
    var node = "node-a"
    var iTPLocal = false
    var eTPLocal = false
    var nodePort = 0
    var endpoints: [TopoEP]
    var cluster: Set<String>?
    var local: Set<String>? = nil
    /// Defaults to whichever of cluster/local is used, when only one is.
    var all: Set<String>? = nil
    var onlyRemote = false

    var description: String { name }
}

private func ep(_ last: Int, _ zones: Set<String> = [], nodes: Set<String> = [], ready: Bool = true, serving: Bool = true,
                terminating: Bool = false, local: Bool = false, net: String = "10.1.2.") -> TopoEP {
    TopoEP(ip: "\(net)\(last)", ready: ready, serving: serving, terminating: terminating, local: local, zones: zones, nodes: nodes)
}

private func ip(_ last: Int..., net: String = "10.1.2.") -> Set<String> { Set(last.map { "\(net)\($0)" }) }

let topologyCases: [TopoCase] = [
    TopoCase(name: "zone hints: only this zone's endpoints",
             endpoints: [ep(3, ["zone-a"]), ep(4, ["zone-b"]), ep(5, ["zone-c"]), ep(6, ["zone-a"])], cluster: ip(3, 6)),
    TopoCase(name: "eTP Local: topology ignored for the local set",
             eTPLocal: true, nodePort: 8080,
             endpoints: [ep(3, ["zone-a"], local: true), ep(4, ["zone-b"], local: true), ep(5, ["zone-c"]), ep(6, ["zone-a"])],
             cluster: ip(3, 6), local: ip(3, 4), all: ip(3, 4, 6)),
    TopoCase(name: "iTP Local: topology ignored for the local set",
             iTPLocal: true, nodePort: 8080,
             endpoints: [ep(3, ["zone-a"], local: true), ep(4, ["zone-b"], local: true), ep(5, ["zone-c"]), ep(6, ["zone-a"])],
             cluster: ip(3, 6), local: ip(3, 4), all: ip(3, 4, 6)),
    TopoCase(name: "no zone label on the node: hints ignored", zone: nil, endpoints: [ep(3, ["zone-a"])], cluster: ip(3)),
    TopoCase(name: "empty zone label: hints ignored", zone: "", endpoints: [ep(3, ["zone-a"])], cluster: ip(3)),
    TopoCase(name: "node in another zone: no filtering", zone: "zone-b", endpoints: [ep(3, ["zone-a"])], cluster: ip(3)),
    TopoCase(name: "an unready endpoint in the zone is not used",
             endpoints: [ep(3, ["zone-a"]), ep(4, ["zone-b"]), ep(5, ["zone-c"]), ep(6, ["zone-a"], ready: false)], cluster: ip(3)),
    TopoCase(name: "only unready endpoints in the zone: no filtering",
             endpoints: [ep(3, ["zone-a"], ready: false), ep(4, ["zone-b"]), ep(5, ["zone-c"]), ep(6, ["zone-a"], ready: false)],
             cluster: ip(4, 5)),
    TopoCase(name: "a ready endpoint without hints: no filtering",
             endpoints: [ep(3, ["zone-a"]), ep(4, ["zone-b"]), ep(5), ep(6, ["zone-a"])], cluster: ip(3, 4, 5, 6)),
    TopoCase(name: "several zone hints per endpoint", zone: "zone-c",
             endpoints: [ep(3, ["zone-a", "zone-b", "zone-c"]), ep(4, ["zone-b", "zone-c"]), ep(5, ["zone-b", "zone-d"]), ep(6, ["zone-c"])],
             cluster: ip(3, 4, 6)),
    TopoCase(name: "topology and locality disagree: the reachable set is merged",
             eTPLocal: true, nodePort: 8080,
             endpoints: [ep(0, ["zone-a"], local: true, net: "10.0.0."), ep(1, ["zone-b"], local: true, net: "10.0.0."),
                         ep(2, ["zone-a"], net: "10.0.0."), ep(3, ["zone-b"], net: "10.0.0.")],
             cluster: ip(0, 2, net: "10.0.0."), local: ip(0, 1, net: "10.0.0."), all: ip(0, 1, 2, net: "10.0.0.")),
    // Node hints (PreferSameNode), kube-proxy 1.34 with PreferSameTrafficDistribution on (its default).
    TopoCase(name: "node hints for this node: only those endpoints",
             endpoints: [ep(1, ["zone-a"], nodes: ["node-a"]), ep(2, ["zone-a"], nodes: ["node-b"]), ep(3, ["zone-b"], nodes: ["node-c"])],
             cluster: ip(1)),
    TopoCase(name: "node hints, none for this node: the zone's hints", node: "node-x",
             endpoints: [ep(1, ["zone-a"], nodes: ["node-a"]), ep(2, ["zone-a"], nodes: ["node-b"]), ep(3, ["zone-b"], nodes: ["node-c"])],
             cluster: ip(1, 2)),
    TopoCase(name: "a ready endpoint without a node hint: the zone's hints",
             endpoints: [ep(1, ["zone-a"], nodes: ["node-a"]), ep(2, ["zone-a"]), ep(3, ["zone-b"], nodes: ["node-c"])],
             cluster: ip(1, 2)),
    TopoCase(name: "node hints without zone hints, none for this node: every endpoint", node: "node-x",
             endpoints: [ep(1, nodes: ["node-a"]), ep(2, nodes: ["node-b"])], cluster: ip(1, 2)),
    TopoCase(name: "neither node nor zone hints match: every endpoint", zone: "zone-z", node: "node-x",
             endpoints: [ep(1, ["zone-a"], nodes: ["node-a"]), ep(2, ["zone-b"], nodes: ["node-b"])], cluster: ip(1, 2)),
    TopoCase(name: "an unready node-hinted endpoint does not decide the mode", node: "node-a",
             endpoints: [ep(1, ["zone-a"], nodes: ["node-a"], ready: false), ep(2, ["zone-a"], nodes: ["node-b"]), ep(3, ["zone-b"], nodes: ["node-c"])],
             cluster: ip(2)),
    // Traffic policies and terminating endpoints (no hints).
    TopoCase(name: "iTP Local, no endpoints", iTPLocal: true, endpoints: [], cluster: nil, local: []),
    TopoCase(name: "iTP Local, every endpoint remote", iTPLocal: true,
             endpoints: [ep(0, net: "10.0.0."), ep(1, net: "10.0.0.")], cluster: nil, local: [], onlyRemote: true),
    TopoCase(name: "iTP Local, every endpoint local", iTPLocal: true,
             endpoints: [ep(0, local: true, net: "10.0.0."), ep(1, local: true, net: "10.0.0.")], cluster: nil, local: ip(0, 1, net: "10.0.0.")),
    TopoCase(name: "Cluster policy, no endpoint ready", endpoints: [ep(0, ready: false, serving: false, net: "10.0.0."), ep(1, ready: false, serving: false, net: "10.0.0.")],
             cluster: []),
    TopoCase(name: "Cluster policy, every endpoint terminating and serving",
             endpoints: [ep(0, ready: false, terminating: true, local: true, net: "10.0.0."), ep(1, ready: false, terminating: true, net: "10.0.0.")],
             cluster: ip(0, 1, net: "10.0.0.")),
    TopoCase(name: "iTP Local, eTP Cluster, some endpoints local", iTPLocal: true, nodePort: 8080,
             endpoints: [ep(0, local: true, net: "10.0.0."), ep(1, net: "10.0.0.")],
             cluster: ip(0, 1, net: "10.0.0."), local: ip(0, net: "10.0.0."), all: ip(0, 1, net: "10.0.0.")),
    TopoCase(name: "iTP Local, eTP Local, every endpoint remote", iTPLocal: true, eTPLocal: true, nodePort: 8080,
             endpoints: [ep(0, net: "10.0.0."), ep(1, net: "10.0.0.")],
             cluster: ip(0, 1, net: "10.0.0."), local: [], all: ip(0, 1, net: "10.0.0.")),
    TopoCase(name: "iTP Local, eTP Local, every endpoint remote and terminating", iTPLocal: true, eTPLocal: true, nodePort: 8080,
             endpoints: [ep(0, ready: false, terminating: true, net: "10.0.0."), ep(1, ready: false, terminating: true, net: "10.0.0.")],
             cluster: ip(0, 1, net: "10.0.0."), local: [], all: ip(0, 1, net: "10.0.0."), onlyRemote: true),
    TopoCase(name: "eTP Local with a local terminating endpoint", eTPLocal: true, nodePort: 8080,
             endpoints: [ep(0, net: "10.0.0."), ep(1, ready: false, serving: false, local: true, net: "10.0.0."),
                         ep(2, ready: false, terminating: true, local: true, net: "10.0.0."), ep(3, ready: false, terminating: true, net: "10.0.0.")],
             cluster: ip(0, net: "10.0.0."), local: ip(2, net: "10.0.0."), all: ip(0, 2, net: "10.0.0.")),
    TopoCase(name: "eTP Local ignored when not externally accessible", eTPLocal: true,
             endpoints: [ep(0, net: "10.0.0."), ep(1, local: true, net: "10.0.0.")], cluster: ip(0, 1, net: "10.0.0.")),
    TopoCase(name: "iTP Local internal-only: no cluster set", iTPLocal: true,
             endpoints: [ep(0, net: "10.0.0."), ep(1, local: true, net: "10.0.0.")], cluster: nil, local: ip(1, net: "10.0.0.")),
]

@Suite struct TopologyTests {
    @Test(arguments: topologyCases)
    func categorizeEndpointsAsKubeProxy(_ c: TopoCase) {
        let info = ServicePortInfo(name: ServicePortName(service: .init(namespace: "ns", name: "s"), port: "", proto: .tcp),
                                   clusterIP: IPAddress("10.96.0.1")!, port: 80, proto: .tcp, nodePort: c.nodePort, loadBalancerVIPs: [],
                                   loadBalancerSourceRanges: [], externalIPs: [], stickyTimeoutSeconds: nil,
                                   externalPolicyLocal: c.eTPLocal, internalPolicyLocal: c.iTPLocal, healthCheckNodePort: 0)
        let labels = c.zone.map { [topologyZoneLabel: $0] } ?? [:]
        let got = categorizeEndpoints(c.endpoints.map(\.endpoint), info: info, nodeName: c.node, nodeLabels: labels)
        func set(_ e: [EndpointInfo]) -> Set<String> { Set(e.map { $0.ip.description }) }
        #expect(info.usesClusterEndpoints == (c.cluster != nil))
        #expect(info.usesLocalEndpoints == (c.local != nil))
        #expect(set(got.cluster) == (c.cluster ?? []), "cluster")
        #expect(set(got.local) == (c.local ?? []), "local")
        let all = c.all ?? (c.local == nil ? c.cluster : c.local) ?? []
        #expect(set(got.allReachable) == all, "allReachable")
        #expect(got.allReachable.count == all.count, "no duplicates in allReachable")
        #expect(got.hasAnyEndpoints == (!all.isEmpty || c.onlyRemote), "hasAnyEndpoints")
    }

    @Test func theModeFollowsNodeThenZoneHints() {
        let a = EndpointInfo(ip: IPAddress("10.0.0.1")!, port: 80, isLocal: false, ready: true, serving: true, terminating: false,
                             zoneHints: ["zone-a"], nodeHints: ["node-a"])
        let b = EndpointInfo(ip: IPAddress("10.0.0.2")!, port: 80, isLocal: false, ready: true, serving: true, terminating: false,
                             zoneHints: ["zone-b"], nodeHints: ["node-b"])
        #expect(topologyMode([a, b], nodeName: "node-a", zone: "zone-a") == .preferSameNode)
        #expect(topologyMode([a, b], nodeName: "node-c", zone: "zone-b") == .preferSameZone)
        #expect(topologyMode([a, b], nodeName: "node-c", zone: "zone-c") == .none)
        #expect(topologyMode([], nodeName: "node-a", zone: "zone-a") == .none)
    }
}
