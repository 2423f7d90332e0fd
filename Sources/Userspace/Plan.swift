// Sluice: a per-node Kubernetes service proxy.
// What the userspace mode derives from the shared model: one relay per TCP or UDP service
// port, with the endpoints new connections go to and the ones established relays may keep.

import SluiceCore

/// Everything the relays need to know about one service port.
public struct RelaySpec: Sendable, Hashable {
    /// The service port.
    public var name: ServicePortName
    /// TCP or UDP.
    public var proto: TransportProtocol
    /// The NodePort to hold open (and serve), 0 for none.
    public var nodePort: Int
    /// Where new connections go, in round-robin order: the ready endpoints (kube-proxy's
    /// cluster set, or the node-local set under internalTrafficPolicy Local).
    public var endpoints: [EndpointInfo]
    /// `ip:port` of the endpoints whose established relays stay open: every endpoint still
    /// listed that is ready or serving (a terminating pod finishes its connections). Relays to
    /// any other endpoint are closed.
    public var keep: Set<String>
    /// ClientIP affinity timeout; nil when affinity is off.
    public var affinityTimeout: Duration?

    /// Creates a spec.
    public init(name: ServicePortName, proto: TransportProtocol, nodePort: Int = 0, endpoints: [EndpointInfo],
                keep: Set<String>? = nil, affinityTimeout: Duration? = nil) {
        self.name = name
        self.proto = proto
        self.nodePort = nodePort
        self.endpoints = endpoints
        self.keep = keep ?? Set(endpoints.map(\.description))
        self.affinityTimeout = affinityTimeout
    }
}

/// The userspace mode's reading of one `ProxyState`.
public struct UserspacePlan: Sendable {
    /// One relay per TCP/UDP service port.
    public var relays: [ServicePortName: RelaySpec] = [:]
    /// The service ports the portal rules cover, sorted (same keys as `relays`).
    public var names: [ServicePortName] = []
    /// Service ports this mode cannot relay (SCTP), sorted.
    public var skipped: [ServicePortName] = []
    /// The model's view of each relayed port (addresses for the portal rules).
    public var servicePorts: [ServicePortName: ServicePortInfo] = [:]

    /// Derives the plan.
    /// - Parameters:
    ///   - state: the model snapshot (IPv4: the relays and portal rules are IPv4 only).
    ///   - nodeName: this node (which endpoints are local).
    public init(state: ProxyState, nodeName: String) {
        for name in state.sortedNames {
            switch UserspacePlan.derive(name, state: state, nodeName: nodeName) {
            case .relayed(let spec, let svc):
                relays[name] = spec
                servicePorts[name] = svc
                names.append(name)
            case .skipped:
                skipped.append(name)
            case .absent:
                break
            }
        }
    }

    private enum Derived {
        case relayed(RelaySpec, ServicePortInfo)
        case skipped
        case absent
    }

    private static func derive(_ name: ServicePortName, state: ProxyState, nodeName: String) -> Derived {
        guard let svc = state.servicePorts[name] else { return .absent }
        guard svc.proto == .tcp || svc.proto == .udp else { return .skipped }
        let all = state.endpoints[name] ?? []
        let cat = categorizeEndpoints(all, info: svc, nodeName: nodeName, nodeLabels: state.nodeLabels)
        var chosen = svc.internalPolicyLocal ? cat.local : cat.cluster
        // Usually every endpoint is chosen: the model's own array is then kept (it is a
        // filtered copy otherwise, one more array per service port for as long as the relay lives).
        if chosen.count == all.count && chosen == all { chosen = all }
        let keep = Set(all.filter { $0.ready || $0.serving }.map(\.description)).union(chosen.map(\.description))
        let spec = RelaySpec(name: name, proto: svc.proto, nodePort: svc.nodePort, endpoints: chosen, keep: keep,
                             affinityTimeout: svc.stickyTimeoutSeconds.map { .seconds($0) })
        return .relayed(spec, svc)
    }

    /// Re-derives the given service ports from `state` (a name `state` no longer has is
    /// removed): after it, the plan is what `init(state:nodeName:)` gives when every other
    /// service port is unchanged. Costs the names given, not the number of service ports.
    public mutating func update(_ changed: some Sequence<ServicePortName>, state: ProxyState, nodeName: String) {
        for name in changed {
            let wasRelayed = relays.removeValue(forKey: name) != nil
            servicePorts[name] = nil
            if wasRelayed { UserspacePlan.remove(name, from: &names) }
            UserspacePlan.remove(name, from: &skipped)
            switch UserspacePlan.derive(name, state: state, nodeName: nodeName) {
            case .relayed(let spec, let svc):
                relays[name] = spec
                servicePorts[name] = svc
                UserspacePlan.insert(name, into: &names)
            case .skipped:
                UserspacePlan.insert(name, into: &skipped)
            case .absent:
                break
            }
        }
    }

    /// The index of the first element of sorted `list` not below `name`.
    private static func lowerBound(_ name: ServicePortName, in list: [ServicePortName]) -> Int {
        var (lo, hi) = (0, list.count)
        while lo < hi {
            let mid = (lo + hi) / 2
            if list[mid] < name { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    private static func insert(_ name: ServicePortName, into list: inout [ServicePortName]) {
        let i = lowerBound(name, in: list)
        if i < list.count && list[i] == name { return }
        list.insert(name, at: i)
    }

    private static func remove(_ name: ServicePortName, from list: inout [ServicePortName]) {
        let i = lowerBound(name, in: list)
        if i < list.count && list[i] == name { list.remove(at: i) }
    }
}
