// Sluice: a per-node Kubernetes service proxy.
// IPVS virtual servers (services) and real servers (destinations) as values.

import SluiceCore

/// What identifies a virtual server: address, protocol and port (firewall-mark services are
/// never created by Sluice and are left alone).
public struct VirtualServerKey: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The virtual address.
    public var address: IPAddress
    /// TCP, UDP or SCTP.
    public var proto: TransportProtocol
    /// The virtual port.
    public var port: UInt16

    /// Creates a key.
    public init(address: IPAddress, proto: TransportProtocol, port: UInt16) {
        self.address = address
        self.proto = proto
        self.port = port
    }

    /// `10.96.0.10:80/TCP` (`[fd00::1]:80/TCP` for IPv6), as kube-proxy prints a virtual server.
    public var description: String { "\(address.joined(port: Int(port)))/\(proto.rawValue)" }

    public static func < (a: VirtualServerKey, b: VirtualServerKey) -> Bool {
        if a.address != b.address { return a.address < b.address }
        if a.proto != b.proto { return a.proto.protocolNumber < b.proto.protocolNumber }
        return a.port < b.port
    }
}

/// A virtual server (an IPVS service).
public struct VirtualServer: Hashable, Sendable, CustomStringConvertible {
    /// Address, protocol, port.
    public var key: VirtualServerKey
    /// The scheduler name (`rr`, `wrr`, `lc`, ...).
    public var scheduler: String
    /// Service flags; `hashed` is set by the kernel and ignored when comparing.
    public var flags: IPVSServiceFlags
    /// Persistence timeout in seconds (ClientIP affinity); 0 without persistence.
    public var timeout: UInt32
    /// Persistence netmask: `0xFFFFFFFF` for IPv4, the prefix length 128 for IPv6.
    public var netmask: UInt32

    /// Creates a virtual server; the netmask defaults to a single host of the address family.
    public init(key: VirtualServerKey, scheduler: String, flags: IPVSServiceFlags = [], timeout: UInt32 = 0, netmask: UInt32? = nil) {
        self.key = key
        self.scheduler = scheduler
        self.flags = flags
        self.timeout = timeout
        self.netmask = netmask ?? (key.address.family == .ipv4 ? 0xFFFF_FFFF : 128)
    }

    /// Whether `other` (read from the kernel) already has this configuration: scheduler,
    /// flags without `hashed`, and timeout, as kube-proxy's `VirtualServer.Equal` compares.
    public func sameConfiguration(as other: VirtualServer) -> Bool {
        key == other.key && scheduler == other.scheduler
            && flags.subtracting(.hashed) == other.flags.subtracting(.hashed)
            && timeout == other.timeout
    }

    public var description: String { key.description }
}

/// A real server (an IPVS destination) of one virtual server.
public struct RealServer: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The destination address.
    public var address: IPAddress
    /// The destination port.
    public var port: UInt16
    /// The weight; 0 drains (no new connections).
    public var weight: UInt32
    /// The forwarding method; Sluice uses masquerading.
    public var forwarding: IPVSForwardingMethod
    /// Established connections (read from the kernel).
    public var activeConnections: UInt32
    /// Connections in other states (read from the kernel).
    public var inactiveConnections: UInt32
    /// Persistence templates (read from the kernel).
    public var persistentConnections: UInt32

    /// Creates a real server.
    public init(address: IPAddress, port: UInt16, weight: UInt32 = 1, forwarding: IPVSForwardingMethod = .masquerade,
                activeConnections: UInt32 = 0, inactiveConnections: UInt32 = 0, persistentConnections: UInt32 = 0) {
        self.address = address
        self.port = port
        self.weight = weight
        self.forwarding = forwarding
        self.activeConnections = activeConnections
        self.inactiveConnections = inactiveConnections
        self.persistentConnections = persistentConnections
    }

    /// The identity of the destination within its virtual server.
    public var endpoint: RealServerEndpoint { RealServerEndpoint(address: address, port: port) }

    /// `10.244.1.2:8080`.
    public var description: String { address.joined(port: Int(port)) }

    public static func < (a: RealServer, b: RealServer) -> Bool { a.endpoint < b.endpoint }
}

/// Address and port of a real server.
public struct RealServerEndpoint: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var address: IPAddress
    public var port: UInt16

    /// Creates an endpoint.
    public init(address: IPAddress, port: UInt16) {
        self.address = address
        self.port = port
    }

    public var description: String { address.joined(port: Int(port)) }

    public static func < (a: RealServerEndpoint, b: RealServerEndpoint) -> Bool {
        a.address != b.address ? a.address < b.address : a.port < b.port
    }
}

extension TransportProtocol {
    /// The IP protocol number: 6, 17 or 132.
    public var protocolNumber: UInt8 {
        switch self {
        case .tcp: return 6
        case .udp: return 17
        case .sctp: return 132
        }
    }

    /// The protocol for an IP protocol number, nil for any other.
    public init?(protocolNumber: Int) {
        switch protocolNumber {
        case 6: self = .tcp
        case 17: self = .udp
        case 132: self = .sctp
        default: return nil
        }
    }
}

extension IPAddress {
    /// The address as `union nf_inet_addr`: 16 bytes, IPv4 in the first four.
    public var inetAddrUnion: [UInt8] {
        let b = bytes
        return b.count == 16 ? b : b + [UInt8](repeating: 0, count: 16 - b.count)
    }

    /// Reads an address of `family` from the start of `bytes` (4 or 16 bytes needed).
    public init?(family: IPFamily, bytes: [UInt8]) {
        switch family {
        case .ipv4:
            guard bytes.count >= 4 else { return nil }
            self = .v4(UInt32(bytes[0]) << 24 | UInt32(bytes[1]) << 16 | UInt32(bytes[2]) << 8 | UInt32(bytes[3]))
        case .ipv6:
            guard bytes.count >= 16 else { return nil }
            var hi: UInt64 = 0
            var lo: UInt64 = 0
            for i in 0..<8 { hi = hi << 8 | UInt64(bytes[i]) }
            for i in 8..<16 { lo = lo << 8 | UInt64(bytes[i]) }
            self = .v6(hi, lo)
        }
    }

    /// `AF_INET` (2) or `AF_INET6` (10).
    public var addressFamilyNumber: UInt16 { family == .ipv4 ? 2 : 10 }
}

extension IPFamily {
    /// The family for `AF_INET` / `AF_INET6`, nil for any other.
    public init?(addressFamilyNumber: Int) {
        switch addressFamilyNumber {
        case 2: self = .ipv4
        case 10: self = .ipv6
        default: return nil
        }
    }
}
