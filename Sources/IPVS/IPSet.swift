// Sluice: a per-node Kubernetes service proxy.
// ipset over nfnetlink (NFNL_SUBSYS_IPSET, protocol 7), in pure Swift: kube-proxy's sets,
// their entries, the messages, and a client that lists, creates, adds, deletes, destroys.
// Constants mirror include/uapi/linux/netfilter/ipset/ip_set.h and nfnetlink.h.

import Netlink
import SluiceCore

/// The nfnetlink subsystem of ipset. The corresponding C constant is `NFNL_SUBSYS_IPSET`.
public let ipsetSubsystem: UInt16 = 6
/// The protocol version Sluice speaks. The corresponding C constant is `IPSET_PROTOCOL`.
public let ipsetProtocolVersion: UInt8 = 7

/// ipset commands (`enum ipset_cmd`), the low byte of `nlmsg_type`.
public enum IPSetCommand: UInt8, Sendable {
    /// The corresponding C constant is `IPSET_CMD_PROTOCOL`.
    case protocolVersion = 1
    /// The corresponding C constant is `IPSET_CMD_CREATE`.
    case create = 2
    /// The corresponding C constant is `IPSET_CMD_DESTROY`.
    case destroy = 3
    /// The corresponding C constant is `IPSET_CMD_FLUSH`.
    case flush = 4
    /// The corresponding C constant is `IPSET_CMD_LIST`.
    case list = 7
    /// The corresponding C constant is `IPSET_CMD_ADD`.
    case add = 9
    /// The corresponding C constant is `IPSET_CMD_DEL`.
    case delete = 10
    /// The corresponding C constant is `IPSET_CMD_TEST`.
    case test = 11
    /// The corresponding C constant is `IPSET_CMD_TYPE`.
    case type = 13

    /// The C name.
    public var cName: String {
        switch self {
        case .protocolVersion: return "IPSET_CMD_PROTOCOL"
        case .create: return "IPSET_CMD_CREATE"
        case .destroy: return "IPSET_CMD_DESTROY"
        case .flush: return "IPSET_CMD_FLUSH"
        case .list: return "IPSET_CMD_LIST"
        case .add: return "IPSET_CMD_ADD"
        case .delete: return "IPSET_CMD_DEL"
        case .test: return "IPSET_CMD_TEST"
        case .type: return "IPSET_CMD_TYPE"
        }
    }
}

/// Command-level attributes (`IPSET_ATTR_*`).
public enum IPSetAttribute {
    /// u8. The corresponding C constant is `IPSET_ATTR_PROTOCOL`.
    public static let proto: UInt16 = 1
    /// The corresponding C constant is `IPSET_ATTR_SETNAME`.
    public static let setName: UInt16 = 2
    /// The corresponding C constant is `IPSET_ATTR_TYPENAME`.
    public static let typeName: UInt16 = 3
    /// u8. The corresponding C constant is `IPSET_ATTR_REVISION`.
    public static let revision: UInt16 = 4
    /// u8 `NFPROTO_*`. The corresponding C constant is `IPSET_ATTR_FAMILY`.
    public static let family: UInt16 = 5
    /// The corresponding C constant is `IPSET_ATTR_FLAGS`.
    public static let flags: UInt16 = 6
    /// Nested data. The corresponding C constant is `IPSET_ATTR_DATA`.
    public static let data: UInt16 = 7
    /// Nested list of `IPSET_ATTR_DATA`. The corresponding C constant is `IPSET_ATTR_ADT`.
    public static let adt: UInt16 = 8
    /// u32 line number; the kernel requires it with `IPSET_ATTR_ADT`. The corresponding C constant is `IPSET_ATTR_LINENO`.
    public static let lineNumber: UInt16 = 9
    /// u8 minimum revision in `IPSET_CMD_TYPE` replies. The corresponding C constant is `IPSET_ATTR_REVISION_MIN`.
    public static let revisionMin: UInt16 = 10
}

/// Data attributes (inside `IPSET_ATTR_DATA`): CADT, create-specific and ADT-specific.
public enum IPSetDataAttribute {
    /// Nested address. The corresponding C constant is `IPSET_ATTR_IP`.
    public static let ip: UInt16 = 1
    /// u8. The corresponding C constant is `IPSET_ATTR_CIDR`.
    public static let cidr: UInt16 = 3
    /// be16. The corresponding C constant is `IPSET_ATTR_PORT`.
    public static let port: UInt16 = 4
    /// be16. The corresponding C constant is `IPSET_ATTR_PORT_TO`.
    public static let portTo: UInt16 = 5
    /// u8 IP protocol. The corresponding C constant is `IPSET_ATTR_PROTO`.
    public static let proto: UInt16 = 7
    /// be32. The corresponding C constant is `IPSET_ATTR_HASHSIZE`.
    public static let hashSize: UInt16 = 18
    /// be32. The corresponding C constant is `IPSET_ATTR_MAXELEM`.
    public static let maxElements: UInt16 = 19
    /// be32 (reply). The corresponding C constant is `IPSET_ATTR_REFERENCES`.
    public static let references: UInt16 = 25
    /// Nested second address. The corresponding C constant is `IPSET_ATTR_IP2`.
    public static let ip2: UInt16 = 20
    /// u8. The corresponding C constant is `IPSET_ATTR_CIDR2`.
    public static let cidr2: UInt16 = 21
}

/// Address attributes inside `IPSET_ATTR_IP` / `IPSET_ATTR_IP2`.
public enum IPSetAddressAttribute {
    /// 4 bytes, network order. The corresponding C constant is `IPSET_ATTR_IPADDR_IPV4`.
    public static let ipv4: UInt16 = 1
    /// 16 bytes. The corresponding C constant is `IPSET_ATTR_IPADDR_IPV6`.
    public static let ipv6: UInt16 = 2
}

/// The set types kube-proxy uses.
public enum IPSetType: String, Hashable, Sendable, CaseIterable {
    case hashIP = "hash:ip"
    case hashIPPort = "hash:ip,port"
    case hashIPPortIP = "hash:ip,port,ip"
    case hashIPPortNet = "hash:ip,port,net"
    case bitmapPort = "bitmap:port"

    /// Whether sets of this type carry `family`, `hashsize` and `maxelem`.
    public var isHash: Bool { self != .bitmapPort }
}

/// One set Sluice manages: name, type, family, and the comment its iptables rules carry.
public struct IPSetDefinition: Hashable, Sendable {
    /// The set name (`KUBE-6-` prefixed and cut to 31 characters for IPv6).
    public var name: String
    public var type: IPSetType
    public var family: IPFamily
    /// kube-proxy's comment for the set, used as the iptables rule comment.
    public var comment: String

    /// `hashsize` of hash sets (kube-proxy: 1024).
    public static let hashSize: UInt32 = 1024
    /// `maxelem` of hash sets (kube-proxy: 65536).
    public static let maxElements: UInt32 = 65536

    /// Creates a definition; `baseName` is the IPv4 name (`KUBE-...`).
    public init(baseName: String, type: IPSetType, family: IPFamily, comment: String) {
        self.type = type
        self.family = family
        self.comment = comment
        if family == .ipv6 && baseName.hasPrefix("KUBE-") {
            name = String(("KUBE-6-" + baseName.dropFirst(5)).prefix(31))
        } else {
            name = baseName
        }
    }

    /// The `ipset create` options, as `ipset save` prints them (kube-proxy's values).
    public var createOptions: String {
        type.isHash
            ? "family \(family == .ipv4 ? "inet" : "inet6") hashsize \(IPSetDefinition.hashSize) maxelem \(IPSetDefinition.maxElements)"
            : "range 0-65535"
    }
}

/// The names of kube-proxy's sets (IPv4 spelling).
public enum KubeIPSet {
    public static let loopBack = "KUBE-LOOP-BACK"
    public static let clusterIP = "KUBE-CLUSTER-IP"
    public static let externalIP = "KUBE-EXTERNAL-IP"
    public static let externalIPLocal = "KUBE-EXTERNAL-IP-LOCAL"
    public static let loadBalancer = "KUBE-LOAD-BALANCER"
    public static let loadBalancerFW = "KUBE-LOAD-BALANCER-FW"
    public static let loadBalancerLocal = "KUBE-LOAD-BALANCER-LOCAL"
    public static let loadBalancerSourceIP = "KUBE-LOAD-BALANCER-SOURCE-IP"
    public static let loadBalancerSourceCIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
    public static let nodePortTCP = "KUBE-NODE-PORT-TCP"
    public static let nodePortLocalTCP = "KUBE-NODE-PORT-LOCAL-TCP"
    public static let nodePortUDP = "KUBE-NODE-PORT-UDP"
    public static let nodePortLocalUDP = "KUBE-NODE-PORT-LOCAL-UDP"
    public static let nodePortSCTP = "KUBE-NODE-PORT-SCTP-HASH"
    public static let nodePortLocalSCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
    public static let healthCheckNodePort = "KUBE-HEALTH-CHECK-NODE-PORT"
    public static let ipvsIPs = "KUBE-IPVS-IPS"

    /// kube-proxy's 17 sets for `family`, in its `ipsetInfo` order.
    public static func all(_ family: IPFamily) -> [IPSetDefinition] {
        let table: [(String, IPSetType, String)] = [
            (loopBack, .hashIPPortIP, "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
            (clusterIP, .hashIPPort, "Kubernetes service cluster ip + port for masquerade purpose"),
            (externalIP, .hashIPPort, "Kubernetes service external ip + port for masquerade and filter purpose"),
            (externalIPLocal, .hashIPPort, "Kubernetes service external ip + port with externalTrafficPolicy=local"),
            (loadBalancer, .hashIPPort, "Kubernetes service lb portal"),
            (loadBalancerFW, .hashIPPort, "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
            (loadBalancerLocal, .hashIPPort, "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
            (loadBalancerSourceIP, .hashIPPortIP, "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
            (loadBalancerSourceCIDR, .hashIPPortNet, "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
            (nodePortTCP, .bitmapPort, "Kubernetes nodeport TCP port for masquerade purpose"),
            (nodePortLocalTCP, .bitmapPort, "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
            (nodePortUDP, .bitmapPort, "Kubernetes nodeport UDP port for masquerade purpose"),
            (nodePortLocalUDP, .bitmapPort, "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
            (nodePortSCTP, .hashIPPort, "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
            (nodePortLocalSCTP, .hashIPPort, "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
            (healthCheckNodePort, .bitmapPort, "Kubernetes health check node port"),
            (ipvsIPs, .hashIP, "Addresses on the ipvs interface"),
        ]
        return table.map { IPSetDefinition(baseName: $0.0, type: $0.1, family: family, comment: $0.2) }
    }

    /// The definition of one set by its IPv4 name.
    public static func definition(_ baseName: String, _ family: IPFamily) -> IPSetDefinition {
        all(family).first { $0.name == IPSetDefinition(baseName: baseName, type: .hashIP, family: family, comment: "").name }
            ?? IPSetDefinition(baseName: baseName, type: .hashIP, family: family, comment: "")
    }
}

/// One member of a set, in the forms kube-proxy's `Entry.String()` and `ipset list` print:
/// `10.0.0.1` (hash:ip), `10.0.0.1,tcp:80` (hash:ip,port), `10.0.0.1,tcp:80,10.0.0.2`
/// (hash:ip,port,ip), `10.0.0.1,tcp:80,10.0.0.0/8` (hash:ip,port,net), `30080` (bitmap:port).
public struct IPSetEntry: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var ip: IPAddress?
    public var proto: TransportProtocol?
    public var port: UInt16?
    public var ip2: IPAddress?
    public var net: CIDR?

    /// Creates an entry with the fields its set type uses.
    public init(ip: IPAddress? = nil, proto: TransportProtocol? = nil, port: UInt16? = nil, ip2: IPAddress? = nil, net: CIDR? = nil) {
        self.ip = ip
        self.proto = proto
        self.port = port
        self.ip2 = ip2
        self.net = net
    }

    /// `ip`.
    public static func ip(_ ip: IPAddress) -> IPSetEntry { IPSetEntry(ip: ip) }
    /// `ip,proto:port`.
    public static func ipPort(_ ip: IPAddress, _ proto: TransportProtocol, _ port: Int) -> IPSetEntry {
        IPSetEntry(ip: ip, proto: proto, port: UInt16(clamping: port))
    }
    /// `ip,proto:port,ip2`.
    public static func ipPortIP(_ ip: IPAddress, _ proto: TransportProtocol, _ port: Int, _ ip2: IPAddress) -> IPSetEntry {
        IPSetEntry(ip: ip, proto: proto, port: UInt16(clamping: port), ip2: ip2)
    }
    /// `ip,proto:port,net`.
    public static func ipPortNet(_ ip: IPAddress, _ proto: TransportProtocol, _ port: Int, _ net: CIDR) -> IPSetEntry {
        IPSetEntry(ip: ip, proto: proto, port: UInt16(clamping: port), net: net)
    }
    /// `port`.
    public static func port(_ port: Int) -> IPSetEntry { IPSetEntry(port: UInt16(clamping: port)) }

    public var description: String {
        var out = ""
        if let ip { out += ip.description }
        if let port {
            if let proto {
                out += ",\(proto.lowercased):\(port)"
            } else {
                out += out.isEmpty ? "\(port)" : ",\(port)"
            }
        }
        if let ip2 { out += ",\(ip2)" }
        if let net { out += ",\(net)" }
        return out
    }

    public static func < (a: IPSetEntry, b: IPSetEntry) -> Bool {
        if a.ip != b.ip { return (a.ip.map { [$0] } ?? []).lexicographicallyPrecedes(b.ip.map { [$0] } ?? []) }
        if a.proto != b.proto { return (a.proto?.protocolNumber ?? 0) < (b.proto?.protocolNumber ?? 0) }
        if a.port != b.port { return (a.port ?? 0) < (b.port ?? 0) }
        return a.description < b.description
    }
}

/// A set as listed from the kernel.
public struct IPSetInfo: Hashable, Sendable {
    public var name: String
    /// The type name, e.g. `hash:ip,port`.
    public var typeName: String
    public var revision: UInt8
    /// `NFPROTO_IPV4` (2), `NFPROTO_IPV6` (10), or 0.
    public var family: UInt8
    public var entries: [IPSetEntry]

    /// Creates a set description.
    public init(name: String, typeName: String, revision: UInt8, family: UInt8, entries: [IPSetEntry]) {
        self.name = name
        self.typeName = typeName
        self.revision = revision
        self.family = family
        self.entries = entries
    }
}

/// Builds and parses ipset messages.
public enum IPSetMessages {
    /// The NFPROTO family number for a definition: 2 or 10 for hash types, 0 (unspecified) for bitmap:port.
    static func nfproto(_ d: IPSetDefinition) -> UInt8 {
        d.type.isHash ? (d.family == .ipv4 ? 2 : 10) : 0
    }

    private static func request(_ cmd: IPSetCommand, _ attrs: [NetlinkAttribute], flags: NetlinkMessageFlags, detail: String) -> NetlinkRequest {
        // struct nfgenmsg: family AF_INET (libipset always sends it), version NFNETLINK_V0, res_id 0.
        let payload: [UInt8] = [2, 0, 0, 0] + ([NetlinkAttribute.u8(IPSetAttribute.proto, ipsetProtocolVersion)] + attrs).encoded()
        return NetlinkRequest(type: ipsetSubsystem << 8 | UInt16(cmd.rawValue), flags: flags, payload: payload,
                              operation: detail.isEmpty ? cmd.cName : "\(cmd.cName) \(detail)")
    }

    /// `IPSET_CMD_TYPE`: ask which revisions of a type the kernel has.
    public static func type(_ type: IPSetType, family: UInt8) -> NetlinkRequest {
        request(.type, [.string(IPSetAttribute.typeName, type.rawValue), .u8(IPSetAttribute.family, family)],
                flags: [.request, .ack], detail: type.rawValue)
    }

    /// `IPSET_CMD_CREATE` with kube-proxy's options, without `NLM_F_EXCL` (like `-exist`).
    public static func create(_ d: IPSetDefinition, revision: UInt8) -> NetlinkRequest {
        var data: [NetlinkAttribute]
        if d.type.isHash {
            data = [
                .be32(IPSetDataAttribute.hashSize, IPSetDefinition.hashSize, flagged: true),
                .be32(IPSetDataAttribute.maxElements, IPSetDefinition.maxElements, flagged: true),
            ]
        } else {
            data = [.be16(IPSetDataAttribute.port, 0, flagged: true), .be16(IPSetDataAttribute.portTo, 65535, flagged: true)]
        }
        return request(.create, [
            .string(IPSetAttribute.setName, d.name),
            .string(IPSetAttribute.typeName, d.type.rawValue),
            .u8(IPSetAttribute.revision, revision),
            .u8(IPSetAttribute.family, nfproto(d)),
            .nested(IPSetAttribute.data, data),
        ], flags: [.request, .ack, .create], detail: "\(d.name) \(d.type.rawValue)")
    }

    /// `IPSET_CMD_DESTROY`.
    public static func destroy(_ name: String) -> NetlinkRequest {
        request(.destroy, [.string(IPSetAttribute.setName, name)], flags: [.request, .ack], detail: name)
    }

    /// `IPSET_CMD_FLUSH`.
    public static func flush(_ name: String) -> NetlinkRequest {
        request(.flush, [.string(IPSetAttribute.setName, name)], flags: [.request, .ack], detail: name)
    }

    /// `IPSET_CMD_LIST` dump of one set, or of every set when `name` is nil.
    public static func list(_ name: String?) -> NetlinkRequest {
        request(.list, name.map { [.string(IPSetAttribute.setName, $0)] } ?? [], flags: [.request, .ack, .dump], detail: name ?? "")
    }

    static func address(_ type: UInt16, _ ip: IPAddress) -> NetlinkAttribute {
        .nested(type, [.bytes(ip.family == .ipv4 ? IPSetAddressAttribute.ipv4 : IPSetAddressAttribute.ipv6, ip.bytes, flagged: true)])
    }

    /// The `IPSET_ATTR_DATA` nest of one entry.
    public static func entryData(_ e: IPSetEntry) -> NetlinkAttribute {
        var a: [NetlinkAttribute] = []
        if let ip = e.ip { a.append(address(IPSetDataAttribute.ip, ip)) }
        if let port = e.port { a.append(.be16(IPSetDataAttribute.port, port, flagged: true)) }
        if let proto = e.proto { a.append(.u8(IPSetDataAttribute.proto, proto.protocolNumber)) }
        if let ip2 = e.ip2 { a.append(address(IPSetDataAttribute.ip2, ip2)) }
        if let net = e.net {
            a.append(address(IPSetDataAttribute.ip2, net.address))
            a.append(.u8(IPSetDataAttribute.cidr2, UInt8(net.prefixLength)))
        }
        return .nested(IPSetAttribute.data, a)
    }

    /// `IPSET_CMD_ADD` of several entries in one `IPSET_ATTR_ADT` list (which the kernel
    /// accepts only with an `IPSET_ATTR_LINENO`), without `NLM_F_EXCL` (an entry already
    /// present is not an error).
    public static func add(_ name: String, _ entries: [IPSetEntry]) -> NetlinkRequest {
        request(.add, [.string(IPSetAttribute.setName, name), .u32(IPSetAttribute.lineNumber, 0),
                       .nested(IPSetAttribute.adt, entries.map(entryData))],
                flags: [.request, .ack], detail: "\(name) \(entries.count == 1 ? entries[0].description : "\(entries.count) entries")")
    }

    /// `IPSET_CMD_DEL` of several entries, without `NLM_F_EXCL` (a missing entry is not an error).
    public static func delete(_ name: String, _ entries: [IPSetEntry]) -> NetlinkRequest {
        request(.delete, [.string(IPSetAttribute.setName, name), .u32(IPSetAttribute.lineNumber, 0),
                          .nested(IPSetAttribute.adt, entries.map(entryData))],
                flags: [.request, .ack], detail: "\(name) \(entries.count == 1 ? entries[0].description : "\(entries.count) entries")")
    }

    static func parseAddress(_ a: NetlinkAttributes?) throws(NetlinkDecodeError) -> IPAddress? {
        guard let a else { return nil }
        if let b = a.bytes(IPSetAddressAttribute.ipv4) { return IPAddress(family: .ipv4, bytes: b) }
        if let b = a.bytes(IPSetAddressAttribute.ipv6) { return IPAddress(family: .ipv6, bytes: b) }
        return nil
    }

    /// Parses one entry's `IPSET_ATTR_DATA` nest.
    public static func parseEntry(_ d: NetlinkAttributes) throws(NetlinkDecodeError) -> IPSetEntry {
        var e = IPSetEntry()
        e.ip = try parseAddress(try d.nested(IPSetDataAttribute.ip))
        e.port = try d.be16(IPSetDataAttribute.port)
        if let p = try d.u8(IPSetDataAttribute.proto) { e.proto = TransportProtocol(protocolNumber: Int(p)) }
        let second = try parseAddress(try d.nested(IPSetDataAttribute.ip2))
        if let cidr = try d.u8(IPSetDataAttribute.cidr2), let second {
            e.net = CIDR(second.description + "/\(cidr)")
        } else {
            e.ip2 = second
        }
        return e
    }

    /// Parses the messages of an `IPSET_CMD_LIST` dump; a set spread over several messages
    /// is merged.
    public static func parseList(_ messages: [NetlinkMessage]) throws(NetlinkDecodeError) -> [IPSetInfo] {
        var order: [String] = []
        var sets: [String: IPSetInfo] = [:]
        for m in messages where m.type == ipsetSubsystem << 8 | UInt16(IPSetCommand.list.rawValue) {
            guard m.payload.count >= 4 else { throw NetlinkDecodeError("ipset reply without nfgenmsg") }
            let a = try NetlinkAttributes(parsing: Array(m.payload[4...]))
            guard let name = try a.string(IPSetAttribute.setName) else { continue }
            if sets[name] == nil {
                order.append(name)
                sets[name] = IPSetInfo(name: name, typeName: try a.string(IPSetAttribute.typeName) ?? "",
                                       revision: try a.u8(IPSetAttribute.revision) ?? 0,
                                       family: try a.u8(IPSetAttribute.family) ?? 0, entries: [])
            }
            if let adt = try a.nested(IPSetAttribute.adt) {
                for item in adt.every(IPSetAttribute.data) {
                    sets[name]?.entries.append(try parseEntry(try NetlinkAttributes(parsing: item.payload)))
                }
            }
        }
        return order.compactMap { sets[$0] }
    }

    /// Parses an `IPSET_CMD_TYPE` reply: (maximum revision, minimum revision).
    public static func parseType(_ m: NetlinkMessage) throws(NetlinkDecodeError) -> (max: UInt8, min: UInt8) {
        guard m.payload.count >= 4 else { throw NetlinkDecodeError("ipset reply without nfgenmsg") }
        let a = try NetlinkAttributes(parsing: Array(m.payload[4...]))
        guard let max = try a.u8(IPSetAttribute.revision) else { throw NetlinkDecodeError("IPSET_CMD_TYPE reply without IPSET_ATTR_REVISION") }
        return (max, try a.u8(IPSetAttribute.revisionMin) ?? max)
    }
}

/// ipset's own error numbers (4096 and up) spelled out.
public func ipsetErrorText(_ errno: Errno) -> String? {
    switch errno.rawValue {
    case 4097: return "kernel/userspace protocol mismatch (IPSET_ERR_PROTOCOL)"
    case 4098: return "set type not supported by the kernel (IPSET_ERR_FIND_TYPE)"
    case 4099: return "too many sets (IPSET_ERR_MAX_SETS)"
    case 4100: return "set in use (IPSET_ERR_BUSY)"
    case 4101: return "second set missing (IPSET_ERR_EXIST_SETNAME2)"
    case 4102: return "set types differ (IPSET_ERR_TYPE_MISMATCH)"
    case 4103: return "set with the same name and different type exists (IPSET_ERR_EXIST)"
    case 4108: return "set referenced by iptables (IPSET_ERR_REFERENCED)"
    default: return nil
    }
}

/// The kernel's ipsets, as the backend needs them. The real one speaks nfnetlink; tests use
/// an in-memory fake.
public protocol IPSetClient: Sendable {
    /// Every set whose name is in `names`, with members (absent sets are left out).
    func list(_ names: Set<String>) async throws -> [IPSetInfo]
    /// Creates sets (existing ones with the same type are kept as they are).
    func create(_ sets: [IPSetDefinition]) async throws
    /// Adds and removes members; `changes` maps a set name to (add, delete).
    func update(_ changes: [(set: String, add: [IPSetEntry], delete: [IPSetEntry])]) async throws
    /// Destroys sets; missing ones are ignored.
    func destroy(_ names: [String]) async throws
}

/// `IPSetClient` over nfnetlink.
public actor NetfilterIPSetClient: IPSetClient {
    /// The socket (or a scripted fake).
    public let executor: any NetlinkExecutor
    private var revisions: [String: UInt8] = [:]
    /// Entries per add/del message.
    public static let entriesPerMessage = 256

    /// Wraps an executor.
    public init(executor: any NetlinkExecutor) { self.executor = executor }

    /// Opens a `NETLINK_NETFILTER` socket.
    public static func connect() throws -> NetfilterIPSetClient {
        NetfilterIPSetClient(executor: try NetlinkConnection(protocol: NetlinkProtocol.netfilter))
    }

    private func annotate(_ e: NetlinkError) -> NetlinkError {
        var e = e
        if e.message == nil, let text = ipsetErrorText(e.errno) { e.message = text }
        return e
    }

    public func list(_ names: Set<String>) async throws -> [IPSetInfo] {
        let replies: [NetlinkMessage]
        do {
            replies = try await executor.execute(IPSetMessages.list(nil))
        } catch let e as NetlinkError {
            throw annotate(e)
        }
        do {
            return try IPSetMessages.parseList(replies).filter { names.contains($0.name) }
        } catch {
            throw NetlinkError(errno: .badMessage, message: error.description, operation: "IPSET_CMD_LIST")
        }
    }

    /// The highest revision of `type` this kernel has (asked once per type and family).
    public func revision(of type: IPSetType, family: UInt8) async throws -> UInt8 {
        let key = "\(type.rawValue)/\(family)"
        if let r = revisions[key] { return r }
        let replies: [NetlinkMessage]
        do {
            replies = try await executor.execute(IPSetMessages.type(type, family: family))
        } catch let e as NetlinkError {
            throw annotate(e)
        }
        guard let m = replies.first else {
            throw NetlinkError(errno: .badMessage, message: "no reply", operation: "IPSET_CMD_TYPE \(type.rawValue)")
        }
        do {
            let r = try IPSetMessages.parseType(m).max
            revisions[key] = r
            return r
        } catch {
            throw NetlinkError(errno: .badMessage, message: error.description, operation: "IPSET_CMD_TYPE \(type.rawValue)")
        }
    }

    public func create(_ sets: [IPSetDefinition]) async throws {
        var requests: [NetlinkRequest] = []
        for d in sets {
            requests.append(IPSetMessages.create(d, revision: try await revision(of: d.type, family: IPSetMessages.nfproto(d))))
        }
        for r in try await executor.executeBatch(requests) {
            if case .failure(let e) = r { throw annotate(e) }
        }
    }

    public func update(_ changes: [(set: String, add: [IPSetEntry], delete: [IPSetEntry])]) async throws {
        var requests: [NetlinkRequest] = []
        let n = NetfilterIPSetClient.entriesPerMessage
        for c in changes {
            for start in stride(from: 0, to: c.delete.count, by: n) {
                requests.append(IPSetMessages.delete(c.set, Array(c.delete[start..<min(start + n, c.delete.count)])))
            }
            for start in stride(from: 0, to: c.add.count, by: n) {
                requests.append(IPSetMessages.add(c.set, Array(c.add[start..<min(start + n, c.add.count)])))
            }
        }
        guard !requests.isEmpty else { return }
        for r in try await executor.executeBatch(requests) {
            if case .failure(let e) = r { throw annotate(e) }
        }
    }

    public func destroy(_ names: [String]) async throws {
        guard !names.isEmpty else { return }
        for r in try await executor.executeBatch(names.map(IPSetMessages.destroy)) {
            if case .failure(let e) = r, e.errno != .noSuchFileOrDirectory { throw annotate(e) }
        }
    }
}
