// Sluice: a per-node Kubernetes service proxy.
// Endpoint categorisation: which endpoints serve cluster-policy and local-policy traffic,
// with topology hints and the terminating-endpoint fallback (kube-proxy's CategorizeEndpoints).

/// The outcome of categorising one service port's endpoints.
public struct CategorizedEndpoints: Sendable, Hashable {
    /// Endpoints for traffic under a Cluster policy (empty when no traffic uses it).
    public var cluster: [EndpointInfo]
    /// Node-local endpoints for traffic under a Local policy (empty when no traffic uses it).
    public var local: [EndpointInfo]
    /// Every endpoint some traffic can reach: the union of the two, sorted.
    public var allReachable: [EndpointInfo]
    /// Whether any usable endpoint exists anywhere (decides REJECT vs DROP).
    public var hasAnyEndpoints: Bool
}

/// The label holding a node's zone.
public let topologyZoneLabel = "topology.kubernetes.io/zone"

/// Which topology hints restrict the cluster set (kube-proxy's topology mode).
public enum TopologyMode: Sendable, Hashable {
    /// No restriction: every ready endpoint.
    case none
    /// Endpoints hinted for this node (`hints.forNodes`).
    case preferSameNode
    /// Endpoints hinted for this node's zone (`hints.forZones`).
    case preferSameZone
}

/// Splits `endpoints` into cluster and local sets for `info` (kube-proxy 1.34's
/// CategorizeEndpoints).
///
/// - Cluster set: ready endpoints, restricted by topology hints when usable (see
///   `topologyMode`); if there are none, serving-and-terminating endpoints.
/// - Local set: local ready endpoints; if there are none, local serving-and-terminating ones.
public func categorizeEndpoints(_ endpoints: [EndpointInfo], info: ServicePortInfo, nodeName: String,
                                nodeLabels: [String: String]) -> CategorizedEndpoints {
    var cluster: [EndpointInfo] = []
    var local: [EndpointInfo] = []
    var hasAny = false
    var mode = TopologyMode.none
    var useServingTerminating = false
    let zone = nodeLabels[topologyZoneLabel] ?? ""

    if info.usesClusterEndpoints {
        mode = topologyMode(endpoints, nodeName: nodeName, zone: zone)
        cluster = endpoints.filter { $0.ready && availableForTopology($0, mode: mode, nodeName: nodeName, zone: zone) }
        // No ready endpoint for the chosen hints means none anywhere (the mode would have
        // been .none otherwise): fall back to serving-and-terminating endpoints.
        if cluster.isEmpty { cluster = endpoints.filter { $0.serving && $0.terminating } }
        if !cluster.isEmpty { hasAny = true }
    }
    guard info.usesLocalEndpoints else {
        return CategorizedEndpoints(cluster: cluster, local: [], allReachable: cluster, hasAnyEndpoints: hasAny)
    }

    var hasLocalReady = false
    var hasLocalServingTerminating = false
    for ep in endpoints {
        if ep.ready {
            hasAny = true
            if ep.isLocal { hasLocalReady = true }
        } else if ep.serving && ep.terminating {
            hasAny = true
            if ep.isLocal { hasLocalServingTerminating = true }
        }
    }
    if hasLocalReady {
        local = endpoints.filter { $0.isLocal && $0.ready }
    } else if hasLocalServingTerminating {
        useServingTerminating = true
        local = endpoints.filter { $0.isLocal && $0.serving && $0.terminating }
    }
    guard info.usesClusterEndpoints else {
        return CategorizedEndpoints(cluster: [], local: local, allReachable: local, hasAnyEndpoints: hasAny)
    }
    if mode == .none && !useServingTerminating {
        // The cluster set holds every ready endpoint, so it contains the local set.
        return CategorizedEndpoints(cluster: cluster, local: local, allReachable: cluster, hasAnyEndpoints: hasAny)
    }
    var merged: [String: EndpointInfo] = [:]
    for ep in cluster + local { merged[ep.description] = ep }
    return CategorizedEndpoints(cluster: cluster, local: local, allReachable: merged.values.sorted(), hasAnyEndpoints: hasAny)
}

/// The hints to follow, decided from the ready endpoints alone (whatever the Service's
/// annotation or trafficDistribution: the EndpointSlice controller writes hints only when
/// the Service asks for them):
/// - every ready endpoint has a node hint and one is for this node: `.preferSameNode`;
/// - else every ready endpoint has a zone hint and one is for this node's zone: `.preferSameZone`;
/// - else `.none` (every ready endpoint).
public func topologyMode(_ endpoints: [EndpointInfo], nodeName: String, zone: String) -> TopologyMode {
    var hasReady = false
    var allNodeHints = true, forNode = false
    var allZoneHints = true, forZone = false
    for ep in endpoints where ep.ready {
        hasReady = true
        if ep.nodeHints.isEmpty { allNodeHints = false } else if ep.nodeHints.contains(nodeName) { forNode = true }
        if ep.zoneHints.isEmpty { allZoneHints = false } else if ep.zoneHints.contains(zone) { forZone = true }
    }
    guard hasReady else { return .none }
    if allNodeHints && forNode { return .preferSameNode }
    if allZoneHints && forZone { return .preferSameZone }
    return .none
}

private func availableForTopology(_ ep: EndpointInfo, mode: TopologyMode, nodeName: String, zone: String) -> Bool {
    switch mode {
    case .none: return true
    case .preferSameNode: return ep.nodeHints.contains(nodeName)
    case .preferSameZone: return ep.zoneHints.contains(zone)
    }
}

/// kube-proxy's routing decisions for one service port, shared by the iptables and nftables
/// compilers: which traffic-policy chains it needs, where internal and external traffic go,
/// and whether each kind of traffic has endpoints (else REJECT or DROP).
public struct PolicyRouting: Sendable, Hashable {
    /// The categorised endpoints.
    public let endpoints: CategorizedEndpoints
    /// Whether any usable endpoint exists anywhere.
    public var hasEndpoints: Bool { endpoints.hasAnyEndpoints }
    /// The Cluster policy chain (KUBE-SVC / `service-`) is written.
    public let usesClusterPolicyChain: Bool
    /// The Local policy chain (KUBE-SVL / `local-`) is written.
    public let usesLocalPolicyChain: Bool
    /// Internal traffic goes to the Local policy chain (`internalTrafficPolicy: Local`).
    public let internalGoesLocal: Bool
    /// Internal traffic has somewhere to go.
    public let hasInternalEndpoints: Bool
    /// External traffic goes to the Local policy chain (`externalTrafficPolicy: Local`).
    public let externalGoesLocal: Bool
    /// External traffic has somewhere to go.
    public let hasExternalEndpoints: Bool
    /// The external-traffic chain (KUBE-EXT / `external-`) is written.
    public let usesExternalTrafficChain: Bool

    /// Categorises `endpoints` for `info` on this node and derives the decisions.
    public init(_ info: ServicePortInfo, endpoints: [EndpointInfo], nodeName: String, nodeLabels: [String: String]) {
        let cat = categorizeEndpoints(endpoints, info: info, nodeName: nodeName, nodeLabels: nodeLabels)
        self.endpoints = cat
        usesClusterPolicyChain = !cat.cluster.isEmpty && info.usesClusterEndpoints
        usesLocalPolicyChain = !cat.local.isEmpty && info.usesLocalEndpoints
        internalGoesLocal = info.internalPolicyLocal
        hasInternalEndpoints = cat.hasAnyEndpoints && !(info.internalPolicyLocal && cat.local.isEmpty)
        externalGoesLocal = info.externalPolicyLocal
        hasExternalEndpoints = cat.hasAnyEndpoints && !(info.externalPolicyLocal && cat.local.isEmpty)
        usesExternalTrafficChain = cat.hasAnyEndpoints && info.externallyAccessible
    }
}
