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

/// Splits `endpoints` into cluster and local sets for `info`.
///
/// - Cluster set: ready endpoints (restricted by topology hints when usable); if there are none,
///   serving-and-terminating endpoints.
/// - Local set: local ready endpoints; if there are none, local serving-and-terminating ones.
public func categorizeEndpoints(_ endpoints: [EndpointInfo], info: ServicePortInfo, nodeName: String,
                                nodeLabels: [String: String]) -> CategorizedEndpoints {
    var cluster: [EndpointInfo] = []
    var local: [EndpointInfo] = []
    var hasAny = false
    var useTopology = false
    var useServingTerminating = false

    if info.usesClusterEndpoints {
        useTopology = canUseTopology(endpoints, info: info, nodeName: nodeName, nodeLabels: nodeLabels)
        cluster = endpoints.filter { ep in
            ep.ready && (!useTopology || availableForTopology(ep, nodeName: nodeName, nodeLabels: nodeLabels))
        }
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
    if !useTopology && !useServingTerminating {
        // The cluster set holds every ready endpoint, so it contains the local set.
        return CategorizedEndpoints(cluster: cluster, local: local, allReachable: cluster, hasAnyEndpoints: hasAny)
    }
    var merged: [String: EndpointInfo] = [:]
    for ep in cluster + local { merged[ep.description] = ep }
    return CategorizedEndpoints(cluster: cluster, local: local, allReachable: merged.values.sorted(), hasAnyEndpoints: hasAny)
}

/// Hints are used only when the Service asks for them, every ready endpoint carries one, and
/// at least one matches this node (by node hint or by zone).
private func canUseTopology(_ endpoints: [EndpointInfo], info: ServicePortInfo, nodeName: String, nodeLabels: [String: String]) -> Bool {
    guard info.usesTopologyHints else { return false }
    let zone = nodeLabels[topologyZoneLabel]
    var hasMatch = false
    for ep in endpoints where ep.ready {
        if ep.zoneHints.isEmpty && ep.nodeHints.isEmpty { return false }
        if ep.nodeHints.contains(nodeName) { hasMatch = true }
        if let zone, ep.zoneHints.contains(zone) { hasMatch = true }
    }
    return hasMatch
}

private func availableForTopology(_ ep: EndpointInfo, nodeName: String, nodeLabels: [String: String]) -> Bool {
    if !ep.nodeHints.isEmpty { return ep.nodeHints.contains(nodeName) }
    guard let zone = nodeLabels[topologyZoneLabel] else { return true }
    return ep.zoneHints.contains(zone)
}
