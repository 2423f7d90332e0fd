// Sluice: a per-node Kubernetes service proxy.
// The per-node model every mode compiles from: service ports and their endpoints,
// validated and reduced to one IP family.

/// Identifies one port of one Service: kube-proxy's `ServicePortName`.
public struct ServicePortName: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The Service.
    public var service: NamespacedName
    /// The port's name ("" for a single unnamed port).
    public var port: String
    /// The port's protocol.
    public var proto: TransportProtocol

    /// Creates a name.
    public init(service: NamespacedName, port: String, proto: TransportProtocol) {
        self.service = service
        self.port = port
        self.proto = proto
    }

    /// `ns/name:port`, or `ns/name` when the port is unnamed (kube-proxy v1.31 `String()`).
    public var description: String { port.isEmpty ? service.description : "\(service):\(port)" }

    public static func < (a: ServicePortName, b: ServicePortName) -> Bool {
        let (da, db) = (a.description, b.description)
        return da != db ? da < db : a.proto.rawValue < b.proto.rawValue
    }
}

/// Everything a backend needs about one service port, for one IP family.
public struct ServicePortInfo: Sendable, Hashable {
    public var name: ServicePortName
    /// The ClusterIP of this family.
    public var clusterIP: IPAddress
    public var port: Int
    public var proto: TransportProtocol
    /// 0 when the port has no node port.
    public var nodePort: Int
    /// LoadBalancer ingress IPs of this family in VIP mode.
    public var loadBalancerVIPs: [IPAddress]
    /// `loadBalancerSourceRanges` of this family.
    public var loadBalancerSourceRanges: [CIDR]
    /// `externalIPs` of this family.
    public var externalIPs: [IPAddress]
    /// ClientIP affinity timeout in seconds; nil when affinity is off.
    public var stickyTimeoutSeconds: Int?
    /// externalTrafficPolicy Local (only for externally accessible Services).
    public var externalPolicyLocal: Bool
    /// internalTrafficPolicy Local.
    public var internalPolicyLocal: Bool
    /// The health-check node port of an eTP=Local LoadBalancer, else 0.
    public var healthCheckNodePort: Int
    /// True when the Service asks for topology-aware routing (hints annotation or trafficDistribution).
    public var usesTopologyHints: Bool

    /// Creates a service port.
    public init(name: ServicePortName, clusterIP: IPAddress, port: Int, proto: TransportProtocol, nodePort: Int = 0,
                loadBalancerVIPs: [IPAddress] = [], loadBalancerSourceRanges: [CIDR] = [], externalIPs: [IPAddress] = [],
                stickyTimeoutSeconds: Int? = nil, externalPolicyLocal: Bool = false, internalPolicyLocal: Bool = false,
                healthCheckNodePort: Int = 0, usesTopologyHints: Bool = false) {
        self.name = name
        self.clusterIP = clusterIP
        self.port = port
        self.proto = proto
        self.nodePort = nodePort
        self.loadBalancerVIPs = loadBalancerVIPs
        self.loadBalancerSourceRanges = loadBalancerSourceRanges
        self.externalIPs = externalIPs
        self.stickyTimeoutSeconds = stickyTimeoutSeconds
        self.externalPolicyLocal = externalPolicyLocal
        self.internalPolicyLocal = internalPolicyLocal
        self.healthCheckNodePort = healthCheckNodePort
        self.usesTopologyHints = usesTopologyHints
    }

    /// NodePort, LB VIPs or external IPs exist.
    public var externallyAccessible: Bool { nodePort != 0 || !loadBalancerVIPs.isEmpty || !externalIPs.isEmpty }
    /// Whether any traffic uses the cluster-wide endpoint set. Externally accessible ports
    /// always do, even with eTP=Local: pods and the node short-circuit to the cluster set.
    public var usesClusterEndpoints: Bool { !internalPolicyLocal || externallyAccessible }
    /// Whether any traffic uses the node-local endpoint set.
    public var usesLocalEndpoints: Bool { internalPolicyLocal || (externallyAccessible && externalPolicyLocal) }
}

/// One endpoint of one service port, as the proxy sees it.
public struct EndpointInfo: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var ip: IPAddress
    public var port: Int
    /// On this node.
    public var isLocal: Bool
    public var ready: Bool
    public var serving: Bool
    public var terminating: Bool
    public var zoneHints: Set<String>
    public var nodeHints: Set<String>

    /// Creates an endpoint.
    public init(ip: IPAddress, port: Int, isLocal: Bool = false, ready: Bool = true, serving: Bool = true,
                terminating: Bool = false, zoneHints: Set<String> = [], nodeHints: Set<String> = []) {
        self.ip = ip
        self.port = port
        self.isLocal = isLocal
        self.ready = ready
        self.serving = serving
        self.terminating = terminating
        self.zoneHints = zoneHints
        self.nodeHints = nodeHints
    }

    /// `ip:port` (`[ip]:port` for IPv6), the key kube-proxy hashes and sorts by.
    public var description: String { ip.joined(port: port) }

    public static func < (a: EndpointInfo, b: EndpointInfo) -> Bool { a.description < b.description }
}

/// A snapshot of the node-local model for one IP family: what every backend compiles.
public struct ProxyState: Sendable {
    /// The family this snapshot is for.
    public var family: IPFamily
    /// Service ports by name.
    public var servicePorts: [ServicePortName: ServicePortInfo]
    /// Endpoints by service port, sorted by `ip:port` text.
    public var endpoints: [ServicePortName: [EndpointInfo]]
    /// Services whose Service or EndpointSlices changed since the previous snapshot.
    public var changedServices: Set<NamespacedName>
    /// Labels of this node (topology).
    public var nodeLabels: [String: String]
    /// The service port names of each Service, when the producer of the snapshot keeps them
    /// (the change tracker does); empty otherwise. Read it through `portNames(of:)`.
    public var portNamesByService: [NamespacedName: [ServicePortName]]
    /// The ranges of every ServiceCIDR object (all families, sorted, without duplicates). Only
    /// the nftables mode uses them (`cluster-ips-check`).
    public var serviceCIDRs: [CIDR]

    /// Creates a snapshot.
    public init(family: IPFamily = .ipv4, servicePorts: [ServicePortName: ServicePortInfo] = [:],
                endpoints: [ServicePortName: [EndpointInfo]] = [:], changedServices: Set<NamespacedName> = [],
                nodeLabels: [String: String] = [:], portNamesByService: [NamespacedName: [ServicePortName]] = [:],
                serviceCIDRs: [CIDR] = []) {
        self.serviceCIDRs = serviceCIDRs
        self.family = family
        self.servicePorts = servicePorts
        self.endpoints = endpoints
        self.changedServices = changedServices
        self.nodeLabels = nodeLabels
        self.portNamesByService = portNamesByService
    }

    /// The service ports of one Service, sorted: from the index when the snapshot has one
    /// (constant time in the number of Services), else by a scan of every port.
    public func portNames(of service: NamespacedName) -> [ServicePortName] {
        if !portNamesByService.isEmpty {
            return (portNamesByService[service] ?? []).filter { servicePorts[$0] != nil }.sorted()
        }
        return servicePorts.keys.filter { $0.service == service }.sorted()
    }

    /// Service port names in a stable order.
    public var sortedNames: [ServicePortName] { servicePorts.keys.sorted() }

    /// Total endpoints over all service ports (kube-proxy's large-cluster measure).
    public var totalEndpoints: Int {
        servicePorts.keys.reduce(0) { $0 + (endpoints[$1]?.count ?? 0) }
    }
}
