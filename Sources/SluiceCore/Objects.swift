// Sluice: a per-node Kubernetes service proxy.
// The Kubernetes objects the proxy consumes, reduced to the fields it reads.
// Sources (manifest directory, API server) decode their wire forms into these.

/// A namespace/name pair identifying a namespaced object.
public struct NamespacedName: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The namespace ("" for cluster-scoped objects).
    public var namespace: String
    /// The object name.
    public var name: String

    /// Creates a key.
    public init(namespace: String, name: String) {
        self.namespace = namespace
        self.name = name
    }

    /// `namespace/name`, or `name` alone when cluster-scoped.
    public var description: String { namespace.isEmpty ? name : "\(namespace)/\(name)" }

    public static func < (a: NamespacedName, b: NamespacedName) -> Bool {
        (a.namespace, a.name) < (b.namespace, b.name)
    }
}

/// An L4 protocol a Service port can carry.
public enum TransportProtocol: String, Sendable, Hashable, CaseIterable {
    /// TCP, the API default.
    case tcp = "TCP"
    /// UDP.
    case udp = "UDP"
    /// SCTP.
    case sctp = "SCTP"

    /// Lower-case name as iptables and the chain hash use it (`tcp`, `udp`, `sctp`).
    public var lowercased: String {
        switch self {
        case .tcp: return "tcp"
        case .udp: return "udp"
        case .sctp: return "sctp"
        }
    }
}

/// `spec.type` of a Service.
public enum ServiceType: String, Sendable, Hashable {
    case clusterIP = "ClusterIP"
    case nodePort = "NodePort"
    case loadBalancer = "LoadBalancer"
    case externalName = "ExternalName"
}

/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy`.
public enum TrafficPolicy: String, Sendable, Hashable {
    case cluster = "Cluster"
    case local = "Local"
}

/// One entry of `spec.ports`. Values are kept as given so validation can name bad ones.
public struct ServicePort: Sendable, Hashable {
    /// Port name; empty when the Service has a single unnamed port.
    public var name: String
    /// Protocol text as given (`TCP` when absent).
    public var protocolName: String
    /// The service port.
    public var port: Int
    /// The node port, 0 when none.
    public var nodePort: Int
    /// `targetPort` as given (number or name); informational, endpoints carry the real port.
    public var targetPort: String

    /// Creates a port.
    public init(name: String = "", protocolName: String = "TCP", port: Int, nodePort: Int = 0, targetPort: String = "") {
        self.name = name
        self.protocolName = protocolName
        self.port = port
        self.nodePort = nodePort
        self.targetPort = targetPort
    }
}

/// One `status.loadBalancer.ingress` entry.
public struct LoadBalancerIngress: Sendable, Hashable {
    /// The ingress IP ("" for hostname-only ingress, which proxies ignore).
    public var ip: String
    /// `ipMode`: `VIP` (default) or `Proxy`; Proxy addresses are not programmed.
    public var ipMode: String?

    /// Creates an ingress entry.
    public init(ip: String, ipMode: String? = nil) {
        self.ip = ip
        self.ipMode = ipMode
    }
}

/// A v1 Service, reduced to the fields a service proxy reads.
public struct Service: Sendable, Hashable {
    public var namespace: String
    public var name: String
    public var labels: [String: String]
    public var annotations: [String: String]
    /// `spec.type` as given ("ClusterIP" when absent).
    public var typeName: String
    /// `spec.clusterIPs` (or `[spec.clusterIP]`); "None" marks a headless Service.
    public var clusterIPs: [String]
    public var ports: [ServicePort]
    public var externalIPs: [String]
    public var loadBalancerIngress: [LoadBalancerIngress]
    public var loadBalancerSourceRanges: [String]
    /// `spec.sessionAffinity` ("None" or "ClientIP").
    public var sessionAffinity: String
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`, nil when unset.
    public var sessionAffinityTimeoutSeconds: Int?
    public var externalTrafficPolicy: String
    public var internalTrafficPolicy: String
    public var healthCheckNodePort: Int
    /// `spec.trafficDistribution`, nil when unset.
    public var trafficDistribution: String?

    /// Creates a Service; every field but the key has a neutral default.
    public init(
        namespace: String, name: String, labels: [String: String] = [:], annotations: [String: String] = [:],
        typeName: String = "ClusterIP", clusterIPs: [String] = [], ports: [ServicePort] = [],
        externalIPs: [String] = [], loadBalancerIngress: [LoadBalancerIngress] = [],
        loadBalancerSourceRanges: [String] = [], sessionAffinity: String = "None",
        sessionAffinityTimeoutSeconds: Int? = nil, externalTrafficPolicy: String = "Cluster",
        internalTrafficPolicy: String = "Cluster", healthCheckNodePort: Int = 0, trafficDistribution: String? = nil
    ) {
        self.namespace = namespace
        self.name = name
        self.labels = labels
        self.annotations = annotations
        self.typeName = typeName
        self.clusterIPs = clusterIPs
        self.ports = ports
        self.externalIPs = externalIPs
        self.loadBalancerIngress = loadBalancerIngress
        self.loadBalancerSourceRanges = loadBalancerSourceRanges
        self.sessionAffinity = sessionAffinity
        self.sessionAffinityTimeoutSeconds = sessionAffinityTimeoutSeconds
        self.externalTrafficPolicy = externalTrafficPolicy
        self.internalTrafficPolicy = internalTrafficPolicy
        self.healthCheckNodePort = healthCheckNodePort
        self.trafficDistribution = trafficDistribution
    }

    /// The object key.
    public var key: NamespacedName { NamespacedName(namespace: namespace, name: name) }
}

/// One endpoint of an EndpointSlice.
public struct Endpoint: Sendable, Hashable {
    /// `addresses`; only the first is used, as kube-proxy does.
    public var addresses: [String]
    /// `conditions.ready`; nil means ready (API semantics).
    public var ready: Bool?
    /// `conditions.serving`; nil means "same as ready".
    public var serving: Bool?
    /// `conditions.terminating`; nil means false.
    public var terminating: Bool?
    /// `nodeName`, nil when unset.
    public var nodeName: String?
    /// `zone`, nil when unset.
    public var zone: String?
    /// `hints.forZones[].name`.
    public var zoneHints: [String]
    /// `hints.forNodes[].name`.
    public var nodeHints: [String]

    /// Creates an endpoint.
    public init(
        addresses: [String], ready: Bool? = nil, serving: Bool? = nil, terminating: Bool? = nil,
        nodeName: String? = nil, zone: String? = nil, zoneHints: [String] = [], nodeHints: [String] = []
    ) {
        self.addresses = addresses
        self.ready = ready
        self.serving = serving
        self.terminating = terminating
        self.nodeName = nodeName
        self.zone = zone
        self.zoneHints = zoneHints
        self.nodeHints = nodeHints
    }
}

/// One entry of an EndpointSlice's `ports`.
public struct EndpointPort: Sendable, Hashable {
    /// Port name; must equal the Service port's name.
    public var name: String
    /// Port number on the endpoints.
    public var port: Int
    /// Protocol text ("TCP" when absent).
    public var protocolName: String

    /// Creates a port.
    public init(name: String = "", port: Int, protocolName: String = "TCP") {
        self.name = name
        self.port = port
        self.protocolName = protocolName
    }
}

/// A discovery.k8s.io/v1 EndpointSlice.
public struct EndpointSlice: Sendable, Hashable {
    public var namespace: String
    public var name: String
    /// The owning Service: label `kubernetes.io/service-name`.
    public var serviceName: String
    /// `addressType`: IPv4, IPv6 or FQDN (FQDN slices are ignored).
    public var addressType: String
    public var ports: [EndpointPort]
    public var endpoints: [Endpoint]
    public var annotations: [String: String]

    /// Creates a slice.
    public init(
        namespace: String, name: String, serviceName: String, addressType: String = "IPv4",
        ports: [EndpointPort] = [], endpoints: [Endpoint] = [], annotations: [String: String] = [:]
    ) {
        self.namespace = namespace
        self.name = name
        self.serviceName = serviceName
        self.addressType = addressType
        self.ports = ports
        self.endpoints = endpoints
        self.annotations = annotations
    }

    /// The object key.
    public var key: NamespacedName { NamespacedName(namespace: namespace, name: name) }
    /// The Service this slice belongs to.
    public var serviceKey: NamespacedName { NamespacedName(namespace: namespace, name: serviceName) }
}

/// One `spec.taints` entry of a Node.
public struct NodeTaint: Sendable, Hashable {
    /// The taint key, e.g. `ToBeDeletedByClusterAutoscaler`.
    public var key: String
    /// The taint value ("" when unset).
    public var value: String
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute` ("" when unset).
    public var effect: String

    /// Creates a taint.
    public init(key: String, value: String = "", effect: String = "") {
        self.key = key
        self.value = value
        self.effect = effect
    }
}

/// A v1 Node, reduced to what a proxy reads.
public struct Node: Sendable, Hashable {
    public var name: String
    public var labels: [String: String]
    /// `status.addresses` as (type, address) pairs, e.g. ("InternalIP", "10.0.0.5").
    public var addresses: [(type: String, address: String)]
    /// `spec.podCIDRs` (or `[spec.podCIDR]`).
    public var podCIDRs: [String]
    /// `metadata.deletionTimestamp` as given (RFC 3339); nil while the Node is not being deleted.
    public var deletionTimestamp: String?
    /// `spec.taints`.
    public var taints: [NodeTaint]

    /// Creates a node.
    public init(name: String, labels: [String: String] = [:], addresses: [(type: String, address: String)] = [], podCIDRs: [String] = [],
                deletionTimestamp: String? = nil, taints: [NodeTaint] = []) {
        self.name = name
        self.labels = labels
        self.addresses = addresses
        self.podCIDRs = podCIDRs
        self.deletionTimestamp = deletionTimestamp
        self.taints = taints
    }

    public static func == (a: Node, b: Node) -> Bool {
        a.name == b.name && a.labels == b.labels && a.podCIDRs == b.podCIDRs
            && a.addresses.map { "\($0.type)=\($0.address)" } == b.addresses.map { "\($0.type)=\($0.address)" }
            && a.deletionTimestamp == b.deletionTimestamp && a.taints == b.taints
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(name)
        hasher.combine(labels)
        hasher.combine(podCIDRs)
    }
}

/// A networking.k8s.io/v1 ServiceCIDR, reduced to what a proxy reads: the ranges ClusterIPs
/// are allocated from (`spec.cidrs`, at most one per family). kube-proxy's nftables mode drops
/// traffic to an address of these ranges that is no ClusterIP.
public struct ServiceCIDR: Sendable, Hashable {
    /// The object's name (ServiceCIDRs are cluster-scoped).
    public var name: String
    /// `spec.cidrs` as given.
    public var cidrs: [String]

    /// Creates a ServiceCIDR.
    public init(name: String, cidrs: [String]) {
        self.name = name
        self.cidrs = cidrs
    }
}

/// A change delivered by a source.
public enum ObjectEvent: Sendable, Hashable {
    /// A Service was added or changed.
    case serviceUpserted(Service)
    /// A Service was deleted.
    case serviceDeleted(NamespacedName)
    /// An EndpointSlice was added or changed.
    case sliceUpserted(EndpointSlice)
    /// An EndpointSlice was deleted.
    case sliceDeleted(NamespacedName)
    /// The proxy's own Node was added or changed.
    case nodeUpserted(Node)
    /// A Node was deleted.
    case nodeDeleted(String)
    /// A ServiceCIDR was added or changed.
    case serviceCIDRUpserted(ServiceCIDR)
    /// A ServiceCIDR was deleted (by name).
    case serviceCIDRDeleted(String)
    /// The source has delivered its initial state (services and slices listed once).
    case synced
}
