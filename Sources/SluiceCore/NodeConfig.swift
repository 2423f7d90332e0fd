// Sluice: a per-node Kubernetes service proxy.
// Node-level settings every mode compiles with (kube-proxy's proxier options).

/// How NodePorts select node addresses (`--nodeport-addresses`).
public enum NodePortAddresses: Sendable, Hashable {
    /// Every local address (kube-proxy's default): one `addrtype LOCAL` rule.
    case all
    /// Only node addresses inside these CIDRs.
    case cidrs([CIDR])

    /// Parses the flag value: empty means all; otherwise comma-separated CIDRs, or `primary`
    /// for the node IP's own /32 (/128).
    public static func parse(_ text: String, nodeIPs: [IPAddress]) throws(ConfigError) -> NodePortAddresses {
        let items = text.split(separator: ",").map { String($0).trimmingASCIIWhitespace() }.filter { !$0.isEmpty }
        if items.isEmpty { return .all }
        var cidrs: [CIDR] = []
        for item in items {
            if item == "primary" {
                cidrs += nodeIPs.map(CIDR.init(host:))
            } else if let c = CIDR(item) {
                cidrs.append(c)
            } else {
                throw ConfigError(field: "--nodeport-addresses", value: item, reason: "not a CIDR or \"primary\"")
            }
        }
        return .cidrs(cidrs)
    }

    /// The subset of `cidrs` for one family; `.all` stays `.all`.
    public func forFamily(_ family: IPFamily) -> NodePortAddresses {
        switch self {
        case .all: return .all
        case .cidrs(let c): return .cidrs(c.filter { $0.family == family })
        }
    }

    /// Whether the loopback address of `family` is covered.
    public func containsLoopback(_ family: IPFamily) -> Bool {
        switch self {
        case .all: return true
        case .cidrs(let c):
            let lo = family == .ipv4 ? IPAddress("127.0.0.1")! : IPAddress("::1")!
            return c.contains { $0.contains(lo) }
        }
    }
}

/// A bad configuration value: which one and why.
public struct ConfigError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The flag or config field.
    public var field: String
    /// The offending value.
    public var value: String
    /// Why it is rejected.
    public var reason: String

    /// Creates an error.
    public init(field: String, value: String, reason: String) {
        self.field = field
        self.value = value
        self.reason = reason
    }

    public var description: String { "invalid \(field) \"\(Validation.printable(value))\": \(reason)" }
}

/// Local-pod traffic told by the interface it arrives on (kube-proxy's `--detect-local-mode`
/// BridgeInterface and InterfaceNamePrefix) instead of by source CIDR.
public enum LocalInterfaceMatch: Sendable, Hashable {
    /// Traffic from this bridge (`-i cbr0`).
    case bridge(String)
    /// Traffic from interfaces whose names start with this (`-i veth+`).
    case namePrefix(String)

    /// The iptables interface argument: the name, or the prefix with iptables' `+` wildcard.
    public var iptablesName: String {
        switch self {
        case .bridge(let name): return name
        case .namePrefix(let prefix): return prefix + "+"
        }
    }
}

/// Node-level settings shared by the compilers.
public struct NodeConfig: Sendable, Hashable {
    /// This node's name; endpoints whose `nodeName` matches are local.
    public var nodeName: String
    /// This node's addresses (`--node-ip`, or from the Node object).
    public var nodeIPs: [IPAddress]
    /// Pod CIDRs for local-traffic detection (`--cluster-cidr`); empty disables the detector.
    public var clusterCIDRs: [CIDR]
    /// `--masquerade-all`.
    public var masqueradeAll: Bool
    /// `--iptables-masquerade-bit` (default 14, mark 0x4000).
    public var masqueradeBit: Int
    /// `--nodeport-addresses`.
    public var nodePortAddresses: NodePortAddresses
    /// `--iptables-localhost-nodeports` (default true; IPv4 only).
    public var localhostNodePorts: Bool
    /// When set, local pods are told by their interface, not by `clusterCIDRs`.
    public var localInterface: LocalInterfaceMatch? = nil

    /// Creates a configuration.
    public init(nodeName: String, nodeIPs: [IPAddress] = [], clusterCIDRs: [CIDR] = [], masqueradeAll: Bool = false,
                masqueradeBit: Int = 14, nodePortAddresses: NodePortAddresses = .all, localhostNodePorts: Bool = true) {
        self.nodeName = nodeName
        self.nodeIPs = nodeIPs
        self.clusterCIDRs = clusterCIDRs
        self.masqueradeAll = masqueradeAll
        self.masqueradeBit = masqueradeBit
        self.nodePortAddresses = nodePortAddresses
        self.localhostNodePorts = localhostNodePorts
    }

    /// The IP families this node proxies: those of its node IPs, primary first (IPv4 when
    /// none is known). Two families make a dual-stack node: one proxier per family.
    public var families: [IPFamily] {
        var out: [IPFamily] = []
        for ip in nodeIPs where !out.contains(ip.family) { out.append(ip.family) }
        return out.isEmpty ? [.ipv4] : out
    }

    /// The masquerade mark as kube-proxy writes it: Go's `%#08x`, eight hex digits after
    /// `0x` (`0x00004000` for bit 14; iptables-save shows it as `0x4000`).
    public var masqueradeMark: String {
        let hex = String(UInt32(1) << UInt32(masqueradeBit), radix: 16)
        return "0x" + String(repeating: "0", count: max(0, 8 - hex.count)) + hex
    }
}
