// Sluice: a per-node Kubernetes service proxy.
// Conntrack values as Swift sees them: a flow's two tuples, the filters a dump can carry,
// and the errors the kernel can answer with.

#if canImport(Glibc)
import Glibc
#endif
import SluiceCore

/// The layer-4 protocols the conntrack code deals with, by IP protocol number.
public enum L4Protocol: UInt8, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// TCP. The corresponding C constant is `IPPROTO_TCP`.
    case tcp = 6
    /// UDP. The corresponding C constant is `IPPROTO_UDP`.
    case udp = 17
    /// SCTP. The corresponding C constant is `IPPROTO_SCTP`.
    case sctp = 132

    /// The protocol of a Service port.
    public init(_ proto: TransportProtocol) {
        switch proto {
        case .tcp: self = .tcp
        case .udp: self = .udp
        case .sctp: self = .sctp
        }
    }

    /// `tcp`, `udp` or `sctp`, as the `conntrack` tool prints it.
    public var description: String {
        switch self {
        case .tcp: return "tcp"
        case .udp: return "udp"
        case .sctp: return "sctp"
        }
    }
}

/// An address and a port: one side of a conntrack tuple, or an endpoint.
public struct IPPort: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The address.
    public var ip: IPAddress
    /// The port (0 for protocols without ports).
    public var port: UInt16

    /// Creates an address-port pair.
    public init(_ ip: IPAddress, _ port: UInt16) {
        self.ip = ip
        self.port = port
    }

    /// `ip:port`, `[ip]:port` for IPv6.
    public var description: String { ip.joined(port: Int(port)) }

    public static func < (a: IPPort, b: IPPort) -> Bool { (a.ip, a.port) < (b.ip, b.port) }
}

/// One direction of a conntrack entry: source and destination.
public struct FlowTuple: Sendable, Hashable, CustomStringConvertible {
    /// Where the packets of this direction come from.
    public var source: IPPort
    /// Where they go.
    public var destination: IPPort

    /// Creates a tuple.
    public init(source: IPPort, destination: IPPort) {
        self.source = source
        self.destination = destination
    }

    /// `src -> dst`.
    public var description: String { "\(source) -> \(destination)" }
}

/// A conntrack entry, reduced to what the proxy decides on.
///
/// The original tuple is the first packet as the client sent it (destination = the Service
/// address it chose); the reply tuple is what the kernel expects back, so after a DNAT its
/// source is the endpoint the flow was sent to, and without NAT it mirrors the original.
public struct ConntrackFlow: Sendable, Hashable, CustomStringConvertible {
    /// The address family.
    public var family: IPFamily
    /// The layer-4 protocol number (`IPPROTO_*`); see `l4` for the known ones.
    public var protocolNumber: UInt8
    /// The original direction.
    public var original: FlowTuple
    /// The reply direction.
    public var reply: FlowTuple
    /// The kernel's id of the entry (`CTA_ID`): a delete that carries it removes this entry and
    /// no later one with the same tuple. 0 when unknown.
    public var id: UInt32
    /// The conntrack zone (`CTA_ZONE`), 0 for the default zone.
    public var zone: UInt16

    /// Creates a flow.
    public init(family: IPFamily, protocolNumber: UInt8, original: FlowTuple, reply: FlowTuple, id: UInt32 = 0, zone: UInt16 = 0) {
        self.family = family
        self.protocolNumber = protocolNumber
        self.original = original
        self.reply = reply
        self.id = id
        self.zone = zone
    }

    /// Creates a flow of a known protocol.
    public init(_ l4: L4Protocol, original: FlowTuple, reply: FlowTuple, id: UInt32 = 0, zone: UInt16 = 0) {
        self.init(family: original.destination.ip.family, protocolNumber: l4.rawValue, original: original, reply: reply,
                  id: id, zone: zone)
    }

    /// The protocol, when it is one the proxy knows.
    public var l4: L4Protocol? { L4Protocol(rawValue: protocolNumber) }

    /// True when nothing rewrote the destination: the reply comes from where the client sent to.
    public var isUntranslatedDestination: Bool { reply.source == original.destination }

    /// `udp 10.244.1.10:40000 -> 10.96.0.10:53 reply 10.244.2.10:5353 -> 10.244.1.10:40000 id 123`.
    public var description: String {
        let p = l4.map(\.description) ?? "proto-\(protocolNumber)"
        var s = "\(p) \(original) reply \(reply)"
        if id != 0 { s += " id \(id)" }
        if zone != 0 { s += " zone \(zone)" }
        return s
    }
}

/// What a dump asks the kernel for. Every field narrows it; nil matches everything.
///
/// The kernel applies the filter itself (`CTA_FILTER`, Linux 5.8 and later), so only matching
/// entries cross into user space. Older kernels ignore it and send the family's whole table,
/// which is why `ConntrackTable` checks each entry against the filter again.
public struct DumpFilter: Sendable, Hashable, CustomStringConvertible {
    /// The address family (always filtered in the kernel, by every version).
    public var family: IPFamily
    /// The layer-4 protocol of the original direction.
    public var l4: L4Protocol?
    /// The original destination address (the Service address the client chose).
    public var destination: IPAddress?
    /// The original destination port.
    public var destinationPort: UInt16?

    /// Creates a filter.
    public init(family: IPFamily, l4: L4Protocol? = nil, destination: IPAddress? = nil, destinationPort: UInt16? = nil) {
        self.family = family
        self.l4 = l4
        self.destination = destination
        self.destinationPort = destinationPort
    }

    /// Whether `flow` matches (what the kernel should have checked already).
    public func matches(_ flow: ConntrackFlow) -> Bool {
        guard flow.family == family else { return false }
        if let l4, flow.protocolNumber != l4.rawValue { return false }
        if let destination, flow.original.destination.ip != destination { return false }
        if let destinationPort, flow.original.destination.port != destinationPort { return false }
        return true
    }

    /// `ipv4 udp dst 10.96.0.10 dport 53`.
    public var description: String {
        var s = family == .ipv4 ? "ipv4" : "ipv6"
        if let l4 { s += " \(l4)" }
        if let destination { s += " dst \(destination)" }
        if let destinationPort { s += " dport \(destinationPort)" }
        return s
    }
}

/// A failed conntrack operation: what was attempted, on what, and the kernel's errno.
public struct ConntrackError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The operation that failed.
    public enum Operation: String, Sendable, Hashable {
        /// Opening a ctnetlink socket (`nfct_open`).
        case open
        /// Dumping the table (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`).
        case dump
        /// Deleting one entry (`IPCTNL_MSG_CT_DELETE` with a tuple).
        case delete
    }

    /// The operation.
    public var operation: Operation
    /// The errno the library or the kernel reported (0 when none was set).
    public var errno: Int32
    /// What it was applied to (a filter, a flow).
    public var context: String

    /// Creates an error.
    public init(_ operation: Operation, errno: Int32, context: String) {
        self.operation = operation
        self.errno = errno
        self.context = context
    }

    /// The C library's text for `errno`.
    public var reason: String { errno == 0 ? "unknown error" : String(cString: strerror(errno)) }

    /// `conntrack delete udp ...: Operation not permitted (errno 1)`.
    public var description: String { "conntrack \(operation.rawValue) \(context): \(reason) (errno \(errno))" }
}
