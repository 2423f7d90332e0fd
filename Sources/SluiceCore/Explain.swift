// Sluice: a per-node Kubernetes service proxy.
// `sluice explain` and `sluice diff`, the mode-neutral half: the packet to explain, which
// Service port it hits and which endpoints serve it (and why), and the seams every mode's
// tracer and drift checker plug into (iptables, ipvs, userspace, nftables).

/// One packet to explain: the first packet of a new connection.
public struct ProbePacket: Sendable, Hashable, Codable {
    /// The source address; nil means "sent by the node itself" (its first node IP).
    public var source: IPAddress?
    /// Whether the source is an address of this node (the packet takes the OUTPUT path).
    public var fromNode: Bool
    /// The destination address.
    public var destination: IPAddress
    /// The destination port.
    public var port: Int
    /// The transport protocol.
    public var proto: TransportProtocol
    /// The interface the packet arrives on (for interface-based local-traffic detection); nil: unknown.
    public var inInterface: String?

    /// Creates a packet.
    public init(source: IPAddress?, fromNode: Bool, destination: IPAddress, port: Int, proto: TransportProtocol,
                inInterface: String? = nil) {
        self.source = source
        self.fromNode = fromNode
        self.destination = destination
        self.port = port
        self.proto = proto
        self.inInterface = inInterface
    }

    /// Whether an iptables interface argument (`cbr0`, `veth+`) matches the arrival interface
    /// (nil when it is not known).
    public func arrives(on pattern: String) -> Bool? {
        guard let name = inInterface, !fromNode else { return fromNode ? false : nil }
        return pattern.hasSuffix("+") ? name.hasPrefix(String(pattern.dropLast())) : name == pattern
    }

    private enum CodingKeys: String, CodingKey { case source, fromNode, destination, port, proto = "protocol", inInterface }

    /// Encodes addresses as text and the protocol as `TCP`/`UDP`/`SCTP`.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encodeIfPresent(source?.description, forKey: .source)
        try c.encode(fromNode, forKey: .fromNode)
        try c.encode(destination.description, forKey: .destination)
        try c.encode(port, forKey: .port)
        try c.encode(proto.rawValue, forKey: .proto)
        try c.encodeIfPresent(inInterface, forKey: .inInterface)
    }

    /// Decodes what `encode(to:)` writes.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let bad = { (key: CodingKeys) in DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "not valid") }
        if let s = try c.decodeIfPresent(String.self, forKey: .source) {
            guard let ip = IPAddress(s) else { throw bad(.source) }
            source = ip
        }
        fromNode = try c.decode(Bool.self, forKey: .fromNode)
        guard let d = IPAddress(try c.decode(String.self, forKey: .destination)) else { throw bad(.destination) }
        destination = d
        port = try c.decode(Int.self, forKey: .port)
        guard let p = TransportProtocol(rawValue: try c.decode(String.self, forKey: .proto)) else { throw bad(.proto) }
        proto = p
        inInterface = try c.decodeIfPresent(String.self, forKey: .inInterface)
    }

    /// `ADDR:PORT/proto` as the command line takes it.
    public var destinationText: String { destination.joined(port: port) + "/" + proto.lowercased }

    /// Parses `IP:PORT`, `[IPv6]:PORT`, optionally followed by `/tcp`, `/udp` or `/sctp` (TCP when absent).
    public static func parseDestination(_ text: String) throws(ConfigError) -> (IPAddress, Int, TransportProtocol) {
        var rest = Substring(text)
        var proto = TransportProtocol.tcp
        if let slash = rest.lastIndex(of: "/") {
            let p = rest[rest.index(after: slash)...].uppercased()
            guard let tp = TransportProtocol(rawValue: p) else {
                throw ConfigError(field: "destination", value: text, reason: "protocol must be tcp, udp or sctp")
            }
            proto = tp
            rest = rest[..<slash]
        }
        guard let colon = rest.lastIndex(of: ":") else {
            throw ConfigError(field: "destination", value: text, reason: "expected IP:PORT[/tcp|udp|sctp]")
        }
        var host = rest[..<colon]
        if host.hasPrefix("[") && host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        guard let ip = IPAddress(String(host)) else {
            throw ConfigError(field: "destination", value: text, reason: "\"\(host)\" is not an IP address")
        }
        guard let port = Int(rest[rest.index(after: colon)...]), (1...65535).contains(port) else {
            throw ConfigError(field: "destination", value: text, reason: "port must be 1-65535")
        }
        return (ip, port, proto)
    }
}

/// How a packet reaches a Service port.
public enum ServiceAddressKind: String, Sendable, Hashable, Codable {
    case clusterIP = "ClusterIP"
    case nodePort = "NodePort"
    case externalIP = "ExternalIP"
    case loadBalancerIP = "LoadBalancerIP"

    /// Whether traffic to this kind of address follows `externalTrafficPolicy`.
    public var isExternal: Bool { self != .clusterIP }
}

/// A Service port a destination matches.
public struct ServiceHit: Sendable, Hashable, Codable {
    /// `namespace/name:port` (`namespace/name` for an unnamed port).
    public var servicePort: String
    /// The address kind.
    public var kind: ServiceAddressKind
    /// The address and port matched.
    public var address: String
    /// The Service's own port (the ClusterIP port).
    public var servicePortNumber: Int
    /// The protocol (`TCP`, `UDP`, `SCTP`).
    public var proto: String

    private enum CodingKeys: String, CodingKey { case servicePort, kind, address, servicePortNumber, proto = "protocol" }
}

/// One endpoint of the matched Service port, and whether and why this packet may reach it.
public struct EndpointExplanation: Sendable, Hashable, Codable {
    /// `ip:port`.
    public var address: String
    /// On this node.
    public var local: Bool
    public var ready: Bool
    public var serving: Bool
    public var terminating: Bool
    /// In the set this packet is balanced over.
    public var selected: Bool
    /// Why it is in or out, most important first.
    public var reasons: [String]
    /// The share of new connections that reach it (from the traced rules; nil when no tracer ran).
    public var probability: Double?
}

/// The model's side of an explanation: Service, endpoint set and masquerade, with reasons.
public struct ModelExplanation: Sendable, Hashable, Codable {
    /// Every Service port the destination matches (normally one).
    public var hits: [ServiceHit]
    /// Which endpoint set the packet uses: "Cluster" or "Local" (nil when nothing matches).
    public var trafficPolicy: String?
    /// Why that set.
    public var trafficPolicyReason: String?
    /// Topology-aware routing: not requested, used, or why not.
    public var topology: String?
    /// ClientIP affinity, when on.
    public var affinity: String?
    /// The endpoints of the first hit.
    public var endpoints: [EndpointExplanation]
    /// What the proxy does with the packet when no endpoint can take it (REJECT or DROP), else nil.
    public var noEndpointsAction: String?
    /// Whether the packet is masqueraded (SNAT to the node), by the model's rules.
    public var masquerade: Bool?
    /// Why (cluster CIDR / local detection, external traffic, masquerade-all, hairpin).
    public var masqueradeReasons: [String]
    /// loadBalancerSourceRanges verdict for a load-balancer IP hit.
    public var sourceRange: String?
    /// What happens when nothing matches.
    public var noMatch: String?
}

/// Explains, from the model alone, where `packet` goes.
/// - Parameters:
///   - state: the snapshot of the packet's family.
///   - node: the node settings.
///   - localAddresses: this node's addresses (NodePorts answer on them).
///   - localFallsBackToCluster: a Local set without endpoints uses the cluster-wide set instead
///     of dropping (IPVS mode, as kube-proxy's IPVS proxier does, #97081).
public func explainModel(_ packet: ProbePacket, state: ProxyState, node: NodeConfig,
                         localAddresses: Set<IPAddress>, localFallsBackToCluster: Bool = false) -> ModelExplanation {
    var out = ModelExplanation(hits: [], endpoints: [], masqueradeReasons: [])
    var matches: [(ServicePortInfo, ServiceAddressKind)] = []
    for name in state.sortedNames {
        guard let svc = state.servicePorts[name], svc.proto == packet.proto else { continue }
        if svc.clusterIP == packet.destination && svc.port == packet.port { matches.append((svc, .clusterIP)) }
        if svc.externalIPs.contains(packet.destination) && svc.port == packet.port { matches.append((svc, .externalIP)) }
        if svc.loadBalancerVIPs.contains(packet.destination) && svc.port == packet.port { matches.append((svc, .loadBalancerIP)) }
        if svc.nodePort != 0 && svc.nodePort == packet.port
            && nodePortAnswers(on: packet.destination, node: node, localAddresses: localAddresses) {
            matches.append((svc, .nodePort))
        }
    }
    out.hits = matches.map { svc, kind in
        ServiceHit(servicePort: svc.name.description, kind: kind, address: packet.destination.joined(port: packet.port),
                   servicePortNumber: svc.port, proto: svc.proto.rawValue)
    }
    guard let (svc, kind) = matches.first else {
        out.noMatch = "no Service port has \(packet.destinationText) as its cluster IP, external IP, load-balancer IP or node port: "
            + "the proxy's rules do not touch the packet, which goes to \(packet.destination) as addressed"
        return out
    }
    let endpoints = state.endpoints[svc.name] ?? []
    let cat = categorizeEndpoints(endpoints, info: svc, nodeName: node.nodeName, nodeLabels: state.nodeLabels)
    let source = packet.source
    let detector = node.clusterCIDRs.first { $0.family == state.family }
    var fromPod = source.map { s in detector?.contains(s) ?? false } ?? false
    var detectorText = detector.map { "source in \($0)" } ?? ""
    if let iface = node.localInterface {
        // Local pods are told by the arrival interface (BridgeInterface / InterfaceNamePrefix).
        fromPod = packet.arrives(on: iface.iptablesName) ?? false
        detectorText = "arriving on \(iface.iptablesName)"
    }

    // Which set.
    var useLocal: Bool
    if kind == .clusterIP {
        useLocal = svc.internalPolicyLocal
        out.trafficPolicyReason = "internalTrafficPolicy \(svc.internalPolicyLocal ? "Local" : "Cluster") applies to cluster IP traffic"
    } else if !svc.externalPolicyLocal {
        useLocal = false
        out.trafficPolicyReason = "externalTrafficPolicy Cluster applies to \(kind.rawValue) traffic"
    } else if fromPod {
        useLocal = false
        out.trafficPolicyReason = "externalTrafficPolicy Local, but traffic from a pod (\(detectorText)) uses the cluster-wide set"
    } else if packet.fromNode {
        useLocal = false
        out.trafficPolicyReason = "externalTrafficPolicy Local, but traffic from the node itself uses the cluster-wide set"
    } else {
        useLocal = true
        out.trafficPolicyReason = "externalTrafficPolicy Local applies to \(kind.rawValue) traffic from outside the node"
    }
    if useLocal && localFallsBackToCluster && cat.local.isEmpty && !cat.cluster.isEmpty {
        useLocal = false
        out.trafficPolicyReason! += "; no local endpoint, so the virtual server holds the cluster-wide set (IPVS mode)"
    }
    out.trafficPolicy = useLocal ? "Local" : "Cluster"
    let chosen = Set((useLocal ? cat.local : cat.cluster).map(\.description))

    // Topology: hints are followed whenever every ready endpoint has them (kube-proxy 1.34);
    // which endpoints are in comes from categorizeEndpoints, this only says why.
    let zone = state.nodeLabels[topologyZoneLabel]
    let readyEPs = endpoints.filter(\.ready)
    let usable = Set(cat.cluster.map(\.description))
    if readyEPs.isEmpty {
        out.topology = svc.usesTopologyHints ? "requested, not used: no ready endpoint" : "not requested"
    } else if let unhinted = readyEPs.first(where: { $0.zoneHints.isEmpty && $0.nodeHints.isEmpty }) {
        out.topology = svc.usesTopologyHints ? "requested, not used: ready endpoint \(unhinted) has no hints" : "not requested"
    } else if readyEPs.contains(where: { !usable.contains($0.description) }) {
        out.topology = "used: endpoints hinted for node \(node.nodeName)" + (zone.map { " or zone \($0)" } ?? "")
    } else {
        out.topology = "hints on every ready endpoint; all of them are usable from node \(node.nodeName)" + (zone.map { " (zone \($0))" } ?? "")
    }
    if let t = svc.stickyTimeoutSeconds {
        out.affinity = "ClientIP for \(t) s: a client that connected within that time returns to the same endpoint"
    }

    // Endpoints.
    for ep in endpoints {
        var reasons: [String] = []
        let selected = chosen.contains(ep.description)
        if ep.ready {
            reasons.append("ready")
        } else if ep.serving && ep.terminating {
            reasons.append(selected ? "terminating but serving: used because no \(useLocal ? "local " : "")endpoint is ready"
                                    : "terminating but serving: left out while \(useLocal ? "a local" : "an") endpoint is ready")
        } else {
            reasons.append(ep.terminating ? "terminating and not serving" : "not ready")
        }
        reasons.append(ep.isLocal ? "on this node" : "on another node")
        if useLocal && !ep.isLocal && (ep.ready || ep.serving) { reasons.append("left out: traffic policy Local uses only this node's endpoints") }
        if out.topology?.hasPrefix("used") == true && !useLocal && ep.ready {
            let hints = (ep.nodeHints.isEmpty ? "" : "node hints \(ep.nodeHints.sorted())") + (ep.zoneHints.isEmpty ? "" : " zone hints \(ep.zoneHints.sorted())")
            if !selected && cat.cluster.contains(where: \.ready) {
                reasons.append("left out by topology: \(hints.trimmingASCIIWhitespace()) do not include node \(node.nodeName)" + (zone.map { " / zone \($0)" } ?? ""))
            } else if !hints.isEmpty {
                reasons.append("topology: \(hints.trimmingASCIIWhitespace())")
            }
        }
        if svc.stickyTimeoutSeconds != nil && selected { reasons.append("affinity: repeat clients stick to their endpoint") }
        out.endpoints.append(EndpointExplanation(address: ep.description, local: ep.isLocal, ready: ep.ready, serving: ep.serving,
                                                 terminating: ep.terminating, selected: selected, reasons: reasons))
    }
    if !cat.hasAnyEndpoints {
        out.noEndpointsAction = "REJECT: \(svc.name) has no usable endpoints"
    } else if chosen.isEmpty {
        out.noEndpointsAction = "DROP: \(svc.name) has no local endpoints (traffic policy Local)"
    }

    // Source ranges.
    if kind == .loadBalancerIP && !svc.loadBalancerSourceRanges.isEmpty {
        let ranges = svc.loadBalancerSourceRanges.map(\.description).joined(separator: ", ")
        if let s = source ?? node.nodeIPs.first(where: { $0.family == state.family }), let r = svc.loadBalancerSourceRanges.first(where: { $0.contains(s) }) {
            out.sourceRange = "allowed: source \(s) is in loadBalancerSourceRanges entry \(r)"
        } else if packet.fromNode, svc.loadBalancerVIPs.contains(where: { v in svc.loadBalancerSourceRanges.contains { $0.contains(v) } }) {
            out.sourceRange = "allowed: traffic from the node to its own load-balancer IP"
        } else {
            out.sourceRange = "denied: source \(source.map { "\($0)" } ?? "(node)") is outside loadBalancerSourceRanges [\(ranges)]; KUBE-PROXY-FIREWALL drops it"
        }
    }

    // Masquerade.
    guard out.noEndpointsAction == nil else { return out }
    let masq: Bool
    if kind == .clusterIP {
        if node.masqueradeAll {
            masq = true
            out.masqueradeReasons.append("--masquerade-all: every packet to a cluster IP is masqueraded")
        } else if let iface = node.localInterface {
            masq = !fromPod
            if packet.inInterface == nil && !packet.fromNode {
                out.masqueradeReasons.append("local pods are told by interface \(iface.iptablesName) and the arrival interface is unknown (--in-interface): assumed not from a pod, masqueraded")
            } else {
                out.masqueradeReasons.append(masq ? "not arriving on \(iface.iptablesName): masqueraded" : "arriving on \(iface.iptablesName), a local pod: not masqueraded")
            }
        } else if let detector, let s = source {
            masq = !detector.contains(s)
            out.masqueradeReasons.append(masq ? "source \(s) is outside the cluster CIDR \(detector): masqueraded so replies come back through the node"
                                              : "source \(s) is inside the cluster CIDR \(detector): a pod, not masqueraded")
        } else if let detector {
            masq = true
            out.masqueradeReasons.append("sent by the node, outside the cluster CIDR \(detector): masqueraded")
        } else {
            masq = false
            out.masqueradeReasons.append("no --cluster-cidr: no local-traffic detector, cluster IP traffic is not masqueraded")
        }
    } else if !svc.externalPolicyLocal {
        masq = true
        out.masqueradeReasons.append("external traffic (\(kind.rawValue)) with externalTrafficPolicy Cluster is always masqueraded")
    } else if fromPod {
        masq = false
        out.masqueradeReasons.append("externalTrafficPolicy Local, traffic from a pod: not masqueraded")
    } else if packet.fromNode {
        masq = true
        out.masqueradeReasons.append("externalTrafficPolicy Local, traffic from the node itself: masqueraded")
    } else {
        masq = false
        out.masqueradeReasons.append("externalTrafficPolicy Local: the client address is kept")
    }
    if let s = source, endpoints.contains(where: { $0.ip == s && chosen.contains($0.description) }) {
        out.masqueradeReasons.append("hairpin: when \(s) is balanced to itself the packet is masqueraded")
    }
    out.masquerade = masq
    return out
}

/// Whether a NodePort answers on `ip`: every local address, or those in `--nodeport-addresses`.
public func nodePortAnswers(on ip: IPAddress, node: NodeConfig, localAddresses: Set<IPAddress>) -> Bool {
    let local = localAddresses.contains(ip) || ip.isLoopback || node.nodeIPs.contains(ip)
    guard local else { return false }
    switch node.nodePortAddresses.forFamily(ip.family) {
    case .all:
        if ip.isLoopback { return ip.family == .ipv4 && node.localhostNodePorts }
        return true
    case .cidrs(let cidrs):
        if ip.isLoopback && (ip.family == .ipv6 || !node.localhostNodePorts) { return false }
        return cidrs.contains { $0.contains(ip) }
    }
}

// MARK: - Tracing seam

/// One rule (or kernel object) the packet meets on its way.
public struct TraceStep: Sendable, Hashable, Codable {
    /// Where: `nat PREROUTING`, `filter FORWARD`, `ipvs`, `relay`, ...
    public var location: String
    /// The rule or object as the kernel (or the compiled batch) states it.
    public var rule: String
    /// What it does to the packet.
    public var action: String

    /// Creates a step.
    public init(location: String, rule: String, action: String) {
        self.location = location
        self.rule = rule
        self.action = action
    }
}

/// What finally happens to the packet on one path.
public enum TraceVerdict: String, Sendable, Hashable, Codable {
    /// Sent on to an endpoint (destination rewritten).
    case forwarded
    /// Left as addressed: no proxy rule rewrote it.
    case unchanged
    /// Refused (ICMP port unreachable / TCP reset).
    case rejected
    /// Silently dropped.
    case dropped
    /// Taken by a proxy process (userspace relay).
    case relayed
}

/// One way through the rules, with its share of new connections.
public struct TracePath: Sendable, Hashable, Codable {
    /// Share of new connections that take this path (0...1).
    public var probability: Double
    public var verdict: TraceVerdict
    /// `ip:port` the packet is sent to, after DNAT (nil unless forwarded).
    public var endpoint: String?
    /// Whether the source is rewritten to the node's address.
    public var masquerade: Bool
    /// The steps, in order.
    public var steps: [TraceStep]

    /// Creates a path.
    public init(probability: Double, verdict: TraceVerdict, endpoint: String?, masquerade: Bool, steps: [TraceStep]) {
        self.probability = probability
        self.verdict = verdict
        self.endpoint = endpoint
        self.masquerade = masquerade
        self.steps = steps
    }
}

/// A tracer's answer.
public struct TraceResult: Sendable, Hashable, Codable {
    /// The mode traced (`iptables`, ...).
    public var mode: String
    /// The paths, most likely first.
    public var paths: [TracePath]
    /// Things the tracer could not evaluate or wants to point out (affinity, unknown matches).
    public var notes: [String]

    /// Creates a result.
    public init(mode: String, paths: [TracePath], notes: [String]) {
        self.mode = mode
        self.paths = paths
        self.notes = notes
    }

    /// Share of new connections per endpoint (forwarded or relayed to it).
    public var endpointProbabilities: [String: Double] {
        var out: [String: Double] = [:]
        for p in paths where p.verdict == .forwarded || p.verdict == .relayed { if let e = p.endpoint { out[e, default: 0] += p.probability } }
        return out
    }
}

/// A mode's packet tracer: walks one rule set (compiled, or read back from the kernel) for a packet.
/// Each mode implements this and `DriftChecking`.
public protocol PacketTracer: Sendable {
    /// The mode's name.
    var mode: String { get }
    /// Traces the first packet of a new connection.
    func trace(_ packet: ProbePacket) -> TraceResult
}

// MARK: - Drift seam

/// How the kernel differs from the desired state for one object.
public enum DriftKind: String, Sendable, Hashable, Codable {
    /// Desired, not in the kernel.
    case missing
    /// In the kernel, not desired.
    case extra
    /// In both, with different content (order, weight, ...).
    case different
}

/// One difference between the desired state and the kernel.
public struct DriftItem: Sendable, Hashable, Codable, Comparable, CustomStringConvertible {
    public var kind: DriftKind
    /// The owning Service port (`ns/name:port`), or "" for node-wide objects.
    public var owner: String
    /// What: `nat KUBE-SERVICES rule`, `chain nat KUBE-SVC-...`, `ipvs real server`, ...
    public var object: String
    /// The desired text (nil when extra).
    public var want: String?
    /// The kernel's text (nil when missing).
    public var have: String?

    /// Creates an item.
    public init(kind: DriftKind, owner: String, object: String, want: String?, have: String?) {
        self.kind = kind
        self.owner = owner
        self.object = object
        self.want = want
        self.have = have
    }

    public static func < (a: DriftItem, b: DriftItem) -> Bool {
        (a.owner, a.object, a.kind.rawValue, a.want ?? "", a.have ?? "") < (b.owner, b.object, b.kind.rawValue, b.want ?? "", b.have ?? "")
    }

    public var description: String {
        switch kind {
        case .missing: return "missing \(object): \(want ?? "")"
        case .extra: return "extra \(object): \(have ?? "")"
        case .different: return "different \(object): want \(want ?? "") have \(have ?? "")"
        }
    }
}

/// The result of one drift check.
public struct DriftReport: Sendable, Hashable, Codable {
    /// The mode checked.
    public var mode: String
    /// The family checked.
    public var family: IPFamily
    /// Differences, sorted by owner.
    public var items: [DriftItem]

    /// Creates a report.
    public init(mode: String, family: IPFamily, items: [DriftItem]) {
        self.mode = mode
        self.family = family
        self.items = items.sorted()
    }

    /// True when the kernel holds exactly the desired state.
    public var isClean: Bool { items.isEmpty }
}

/// A mode's drift check: reads the kernel (read-only, no lock held longer than one read) and
/// compares it with what a full sync of `state` would write.
public protocol DriftChecking: Sendable {
    /// The mode's name.
    var mode: String { get }
    /// Compares the kernel with `state`.
    func check(_ state: ProxyState) async throws -> DriftReport
}
