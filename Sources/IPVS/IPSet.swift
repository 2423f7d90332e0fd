// Sluice: a per-node Kubernetes service proxy.
// ipset through libipset (the library the `ipset` command is built on; module CIPSet): kube-proxy's
// sets, their entries, and a client that lists, creates, adds, deletes, flushes, swaps and
// destroys them through one libipset session, with `ipset restore`'s batching.

import CIPSet
import Glibc
import Netlink
import SluiceCore
import Synchronization

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

/// The kernel's ipsets, as the backend needs them. The real one is libipset's session
/// (`NetfilterIPSetClient`); tests use an in-memory fake.
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

extension IPSetEntry {
    /// Reads a member as libipset lists it (`ipset list`, `ipset save`) for a set of `type`:
    /// the forms `description` writes; a `hash:ip,port,net` member printed without a prefix
    /// length is a host network (`/32`, `/128`), as the kernel stores it.
    public init?(listed text: Substring, type: IPSetType) {
        // A listing holds tens of thousands of members: dotted quads and the three protocol
        // names are read without building strings.
        func ip(_ t: Substring) -> IPAddress? {
            if let v4 = IPSetEntry.dottedQuad(t.utf8) { return .v4(v4) }
            return IPAddress(String(t))
        }
        func protoPort(_ t: Substring) -> (TransportProtocol, UInt16)? {
            guard let colon = t.firstIndex(of: ":"), let port = UInt16(t[t.index(after: colon)...]) else { return nil }
            switch t[..<colon] {
            case "tcp": return (.tcp, port)
            case "udp": return (.udp, port)
            case "sctp": return (.sctp, port)
            default: return nil
            }
        }
        let fields = text.split(separator: ",", omittingEmptySubsequences: false)
        switch type {
        case .bitmapPort:
            guard fields.count == 1, let port = UInt16(fields[0]) else { return nil }
            self.init(port: port)
        case .hashIP:
            guard fields.count == 1, let a = ip(fields[0]) else { return nil }
            self.init(ip: a)
        case .hashIPPort:
            guard fields.count == 2, let a = ip(fields[0]), let (proto, port) = protoPort(fields[1]) else { return nil }
            self.init(ip: a, proto: proto, port: port)
        case .hashIPPortIP:
            guard fields.count == 3, let a = ip(fields[0]), let (proto, port) = protoPort(fields[1]),
                  let b = ip(fields[2]) else { return nil }
            self.init(ip: a, proto: proto, port: port, ip2: b)
        case .hashIPPortNet:
            guard fields.count == 3, let a = ip(fields[0]), let (proto, port) = protoPort(fields[1]) else { return nil }
            let net: CIDR?
            if fields[2].contains("/") {
                net = CIDR(String(fields[2]))
            } else {
                net = ip(fields[2]).flatMap { CIDR("\($0)/\($0.family == .ipv4 ? 32 : 128)") }
            }
            guard let net else { return nil }
            self.init(ip: a, proto: proto, port: port, net: net)
        }
    }
}

extension IPSetEntry {
    /// `a.b.c.d` (no leading sign, 1 to 3 digits per octet, each at most 255) as a host-order
    /// `UInt32`; nil for anything else (IPv6 included).
    static func dottedQuad(_ text: Substring.UTF8View) -> UInt32? {
        var value: UInt32 = 0
        var octet: UInt32 = 0
        var digits = 0
        var dots = 0
        for b in text {
            if b >= 0x30 && b <= 0x39 {
                octet = octet * 10 + UInt32(b - 0x30)
                digits += 1
                if digits > 3 || octet > 255 { return nil }
            } else if b == 0x2e {
                guard digits > 0, dots < 3 else { return nil }
                value = value << 8 | octet
                (octet, digits, dots) = (0, 0, dots + 1)
            } else {
                return nil
            }
        }
        guard dots == 3, digits > 0 else { return nil }
        return value << 8 | octet
    }
}

/// Reads `ipset list` output (libipset's plain listing): the sets whose name is in `names`,
/// with their members; other sets are skipped unread.
/// - Throws: `IPSetError` (operation `.list`) naming the first line it cannot read.
public func parseIPSetListing(_ text: String, names: Set<String>) throws(IPSetError) -> [IPSetInfo] {
    var out: [IPSetInfo] = []
    var current: IPSetInfo?
    var type: IPSetType?
    var inMembers = false
    func finish() {
        if let c = current { out.append(c) }
        current = nil
        type = nil
        inMembers = false
    }
    for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
        if line.hasPrefix("Name: ") {
            finish()
            let name = String(line.dropFirst(6))
            if names.contains(name) { current = IPSetInfo(name: name, typeName: "", revision: 0, family: 0, entries: []) }
            continue
        }
        guard current != nil else { continue }
        if inMembers {
            if line.isEmpty {
                finish()
                continue
            }
            guard let type, let e = IPSetEntry(listed: line, type: type) else {
                throw IPSetError(operation: .list, set: current?.name, message: "cannot read the member \"\(line)\"")
            }
            current?.entries.append(e)
        } else if line.hasPrefix("Type: ") {
            current?.typeName = String(line.dropFirst(6))
            type = IPSetType(rawValue: current?.typeName ?? "")
        } else if line.hasPrefix("Revision: ") {
            current?.revision = UInt8(line.dropFirst(10)) ?? 0
        } else if line.hasPrefix("Header: ") {
            let words = line.split(separator: " ")
            if let i = words.firstIndex(of: "family"), i + 1 < words.count {
                current?.family = words[i + 1] == "inet6" ? 10 : words[i + 1] == "inet" ? 2 : 0
            }
        } else if line == "Members:" {
            guard type != nil else {
                throw IPSetError(operation: .list, set: current?.name, message: "set type \"\(current?.typeName ?? "")\" is not one Sluice uses")
            }
            inMembers = true
        }
    }
    finish()
    return out
}

/// A libipset call that failed.
public struct IPSetError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What was being done.
    public enum Operation: String, Sendable, Hashable {
        case session, type, create, destroy, flush, swap, list, add, delete
    }
    /// What was being done.
    public var operation: Operation
    /// The set concerned (for a swap, "A B"), when there is one.
    public var set: String?
    /// The member whose line libipset reported, when it names one.
    public var entry: String?
    /// libipset's own report: its text for the kernel's answer (libipset keeps the kernel's
    /// error number to itself) or for a request it refused to build.
    public var message: String
    /// The system error libipset left in `errno` (opening the netlink socket, sending), if any.
    public var errno: Errno?

    /// Creates an error.
    public init(operation: Operation, set: String? = nil, entry: String? = nil, message: String, errno: Errno? = nil) {
        self.operation = operation
        self.set = set
        self.entry = entry
        self.message = message
        self.errno = errno
    }

    public var description: String {
        var out = "ipset \(operation.rawValue)"
        if let set { out += " \(set)" }
        if let entry { out += " \(entry)" }
        out += ": \(message)"
        if let errno { out += " (\(errno))" }
        return out
    }
}

/// libipset keeps process-wide state (its table of set types and its cache of set names and
/// types), so its calls are made one at a time, whatever the session.
private let libipsetLock = Mutex<Void>(())
/// `ipset_load_types`, once per process.
private let libipsetTypesLoaded: Void = ipset_load_types()

/// One libipset session (`struct ipset_session`): its data, its netlink socket (opened on the
/// first command) and its output. Not thread-safe; `NetfilterIPSetClient` owns it and calls it
/// under `libipsetLock`.
final class LibIPSetSession {
    private let session: OpaquePointer
    private let output: UnsafeMutablePointer<sluice_ipset_output>

    init() throws(IPSetError) {
        _ = libipsetTypesLoaded
        output = .allocate(capacity: 1)
        output.initialize(to: sluice_ipset_output(bytes: nil, count: 0, capacity: 0, failed: 0))
        Glibc.errno = 0
        guard let s = sluice_ipset_session_init(output) else {
            let e = Glibc.errno
            output.deallocate()
            throw IPSetError(operation: .session, message: "cannot start an ipset session", errno: e == 0 ? nil : Errno(rawValue: e))
        }
        session = s
        // -exist: creating a set that exists with the same type, adding a member present,
        // deleting one absent and destroying a missing set are not errors.
        ipset_envopt_set(session, IPSET_ENV_EXIST)
    }

    deinit {
        ipset_session_fini(session)
        free(output.pointee.bytes)
        output.deallocate()
    }

    private var data: OpaquePointer { ipset_session_data(session) }

    /// The error of the call that just failed, with libipset's report, and the report cleared.
    private func failure(_ op: IPSetError.Operation, _ set: String?, entry: String? = nil) -> IPSetError {
        let e = Glibc.errno
        var message = ipset_session_report_msg(session).map { String(cString: $0) } ?? ""
        while message.last?.isNewline == true { message.removeLast() }
        if message.isEmpty { message = "libipset failed without a report" }
        ipset_session_report_reset(session)
        ipset_data_reset(data)
        return IPSetError(operation: op, set: set, entry: entry, message: message, errno: e == 0 ? nil : Errno(rawValue: e))
    }

    private func set(_ opt: ipset_opt, _ text: String) -> Bool {
        text.withCString { ipset_data_set(data, opt, $0) } == 0
    }

    private func set<T>(_ opt: ipset_opt, value: T) -> Bool {
        withUnsafePointer(to: value) { ipset_data_set(data, opt, $0) } == 0
    }

    private func set(_ opt: ipset_opt, address: IPAddress) -> Bool {
        var a = nf_inet_addr()
        withUnsafeMutableBytes(of: &a) { raw in
            for (i, b) in address.bytes.enumerated() { raw[i] = b }
        }
        return withUnsafePointer(to: a) { ipset_data_set(data, opt, $0) } == 0
    }

    private static func nfproto(_ family: IPFamily) -> UInt8 {
        UInt8(family == .ipv4 ? NFPROTO_IPV4 : NFPROTO_IPV6)
    }

    /// Runs one command that is not batched and commits it.
    private func run(_ cmd: ipset_cmd, _ op: IPSetError.Operation, _ set: String?) throws(IPSetError) {
        Glibc.errno = 0
        guard ipset_cmd(session, cmd, 0) == 0 else { throw failure(op, set) }
        ipset_session_report_reset(session)
    }

    /// The type libipset would create for `type` in `family` (the highest revision both it
    /// and the kernel have); asks the kernel.
    func type(_ type: IPSetType, family: IPFamily?) throws(IPSetError) -> UnsafePointer<ipset_type> {
        ipset_data_reset(data)
        Glibc.errno = 0
        guard set(IPSET_OPT_TYPENAME, type.rawValue) else { throw failure(.type, nil) }
        if let family, !set(IPSET_OPT_FAMILY, value: Self.nfproto(family)) { throw failure(.type, nil) }
        guard let t = ipset_type_get(session, IPSET_CMD_CREATE) else { throw failure(.type, nil, entry: type.rawValue) }
        return t
    }

    func create(_ d: IPSetDefinition) throws(IPSetError) {
        let t = try type(d.type, family: d.type.isHash ? d.family : nil)
        guard set(IPSET_SETNAME, d.name), ipset_data_set(data, IPSET_OPT_TYPE, UnsafeRawPointer(t)) == 0 else {
            throw failure(.create, d.name)
        }
        let ok = d.type.isHash
            ? set(IPSET_OPT_HASHSIZE, value: IPSetDefinition.hashSize) && set(IPSET_OPT_MAXELEM, value: IPSetDefinition.maxElements)
            : set(IPSET_OPT_PORT_FROM, value: UInt16(0)) && set(IPSET_OPT_PORT_TO, value: UInt16(65535))
        guard ok else { throw failure(.create, d.name) }
        try run(IPSET_CMD_CREATE, .create, d.name)
    }

    /// Destroys, flushes: one set by name (never the empty name, which means every set).
    func named(_ cmd: ipset_cmd, _ op: IPSetError.Operation, _ name: String) throws(IPSetError) {
        guard !name.isEmpty else { throw IPSetError(operation: op, message: "empty set name") }
        ipset_data_reset(data)
        guard set(IPSET_SETNAME, name) else { throw failure(op, name) }
        try run(cmd, op, name)
    }

    func swap(_ a: String, _ b: String) throws(IPSetError) {
        guard !a.isEmpty, !b.isEmpty else { throw IPSetError(operation: .swap, message: "empty set name") }
        ipset_data_reset(data)
        guard set(IPSET_SETNAME, a), set(IPSET_OPT_SETNAME2, b) else { throw failure(.swap, "\(a) \(b)") }
        try run(IPSET_CMD_SWAP, .swap, "\(a) \(b)")
    }

    /// Adds and deletes members as `ipset restore` does: each member is one numbered line,
    /// consecutive lines of one command on one set go to the kernel in one message (libipset
    /// sends when its buffer is full or the command or set changes), and the rest is
    /// committed at the end. Per set, deletions come before additions.
    func update(_ changes: [(set: String, add: [IPSetEntry], delete: [IPSetEntry])]) throws(IPSetError) {
        var lines: [(cmd: IPSetError.Operation, set: String, entry: IPSetEntry)] = []
        lines.reserveCapacity(changes.reduce(0) { $0 + $1.add.count + $1.delete.count })
        func failed(_ op: IPSetError.Operation, _ set: String, _ entry: IPSetEntry) -> IPSetError {
            var e = failure(op, set, entry: entry.description)
            // "Error in line N: ..." names an earlier line when the failing message was sent
            // by a later command.
            if e.message.hasPrefix("Error in line "),
               let n = Int(e.message.dropFirst(14).prefix { $0.isNumber }), n >= 1, n <= lines.count {
                (e.operation, e.set, e.entry) = (lines[n - 1].cmd, lines[n - 1].set, lines[n - 1].entry.description)
            }
            return e
        }
        Glibc.errno = 0
        for c in changes {
            for (op, entries) in [(IPSetError.Operation.delete, c.delete), (.add, c.add)] where !entries.isEmpty {
                let cmd = op == .add ? IPSET_CMD_ADD : IPSET_CMD_DEL
                for entry in entries {
                    lines.append((op, c.set, entry))
                    guard set(IPSET_SETNAME, c.set) else { throw failed(op, c.set, entry) }
                    guard let t = ipset_type_get(session, cmd), ipset_data_set(data, IPSET_OPT_TYPE, UnsafeRawPointer(t)) == 0,
                          fill(entry) else { throw failed(op, c.set, entry) }
                    guard ipset_cmd(session, cmd, UInt32(lines.count)) == 0 else { throw failed(op, c.set, entry) }
                }
            }
        }
        guard let last = lines.last else { return }
        guard ipset_commit(session) == 0 else { throw failed(last.cmd, last.set, last.entry) }
        ipset_session_report_reset(session)
    }

    /// Puts one member into the session's data: the address family first (libipset reads
    /// addresses by it), then the fields the set type has.
    private func fill(_ e: IPSetEntry) -> Bool {
        if let family = (e.ip ?? e.ip2 ?? e.net?.address)?.family {
            guard set(IPSET_OPT_FAMILY, value: Self.nfproto(family)) else { return false }
        }
        if let ip = e.ip, !set(IPSET_OPT_IP, address: ip) { return false }
        if let port = e.port, !set(IPSET_OPT_PORT, value: port) { return false }
        if let proto = e.proto, !set(IPSET_OPT_PROTO, value: proto.protocolNumber) { return false }
        if let ip2 = e.ip2, !set(IPSET_OPT_IP2, address: ip2) { return false }
        if let net = e.net {
            guard set(IPSET_OPT_IP2, address: net.address), set(IPSET_OPT_CIDR2, value: UInt8(net.prefixLength)) else { return false }
        }
        return true
    }

    /// `ipset list` of every set, as libipset prints it.
    func listing() throws(IPSetError) -> String {
        ipset_data_reset(data)
        output.pointee.count = 0
        output.pointee.failed = 0
        guard ipset_session_output(session, IPSET_LIST_PLAIN) == 0 else { throw failure(.list, nil) }
        try run(IPSET_CMD_LIST, .list, nil)
        guard output.pointee.failed == 0 else { throw IPSetError(operation: .list, message: "cannot hold the listing", errno: Errno(rawValue: ENOMEM)) }
        guard let bytes = output.pointee.bytes else { return "" }
        return bytes.withMemoryRebound(to: UInt8.self, capacity: output.pointee.count) {
            String(decoding: UnsafeBufferPointer(start: $0, count: output.pointee.count), as: UTF8.self)
        }
    }
}

/// `IPSetClient` through libipset: one session, opened when the client is made and opened
/// again after a failure (libipset's state after an error is not reused).
public actor NetfilterIPSetClient: IPSetClient {
    private var session: LibIPSetSession?
    private var revisions: [String: UInt8] = [:]

    /// Starts a libipset session (its netlink socket opens on the first command, in the
    /// network namespace of the thread that sends it).
    public init() throws(IPSetError) {
        session = try LibIPSetSession()
    }

    /// Starts a libipset session.
    public static func connect() throws -> NetfilterIPSetClient {
        try NetfilterIPSetClient()
    }

    private func withSession<T: Sendable>(_ body: (LibIPSetSession) throws(IPSetError) -> T) throws(IPSetError) -> T {
        try libipsetLock.withLock { (_: inout Void) throws(IPSetError) -> T in
            let s: LibIPSetSession
            if let existing = session {
                s = existing
            } else {
                s = try LibIPSetSession()
                session = s
            }
            do throws(IPSetError) {
                return try body(s)
            } catch {
                session = nil
                throw error
            }
        }
    }

    public func list(_ names: Set<String>) throws -> [IPSetInfo] {
        let text = try withSession { s throws(IPSetError) in try s.listing() }
        return try parseIPSetListing(text, names: names)
    }

    /// The revision of `type` libipset creates on this kernel (the highest both have), asked
    /// once per type and family; `family` is `NFPROTO_*` (2, 10, or 0 for bitmap:port).
    public func revision(of type: IPSetType, family: UInt8) throws -> UInt8 {
        let key = "\(type.rawValue)/\(family)"
        if let r = revisions[key] { return r }
        let f: IPFamily? = family == 10 ? .ipv6 : family == 2 ? .ipv4 : nil
        let r = try withSession { s throws(IPSetError) in try s.type(type, family: f).pointee.revision }
        revisions[key] = r
        return r
    }

    public func create(_ sets: [IPSetDefinition]) throws {
        try withSession { s throws(IPSetError) in
            for d in sets { try s.create(d) }
        }
    }

    public func update(_ changes: [(set: String, add: [IPSetEntry], delete: [IPSetEntry])]) throws {
        guard changes.contains(where: { !$0.add.isEmpty || !$0.delete.isEmpty }) else { return }
        try withSession { s throws(IPSetError) in try s.update(changes) }
    }

    public func destroy(_ names: [String]) throws {
        try withSession { s throws(IPSetError) in
            for n in names { try s.named(IPSET_CMD_DESTROY, .destroy, n) }
        }
    }

    /// Removes every member of each set.
    public func flush(_ names: [String]) throws {
        try withSession { s throws(IPSetError) in
            for n in names { try s.named(IPSET_CMD_FLUSH, .flush, n) }
        }
    }

    /// Exchanges the contents (and types) of two sets, as `ipset swap` does.
    public func swap(_ a: String, _ b: String) throws {
        try withSession { s throws(IPSetError) in try s.swap(a, b) }
    }
}
