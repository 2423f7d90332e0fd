// Sluice: a per-node Kubernetes service proxy.
// The IPVS generic-netlink protocol: commands, attributes, flags, and the messages Sluice
// sends and parses. Constants mirror include/uapi/linux/ip_vs.h.
//
// Three traps (see docs/ipvs.md):
//   - ports (IPVS_SVC_ATTR_PORT, IPVS_DEST_ATTR_PORT) are big-endian although the kernel's
//     policy calls them u16, and carry no NLA_F_NET_BYTEORDER flag;
//   - NEW_SERVICE / SET_SERVICE fail with EINVAL unless SCHED_NAME, FLAGS, TIMEOUT and NETMASK
//     are all present, and NEW_DEST / SET_DEST unless FWD_METHOD, WEIGHT, U_THRESH, L_THRESH are;
//   - addresses are `union nf_inet_addr`: Sluice sends 16 bytes, and replies always carry 16
//     bytes with an IPv4 address in the first four.

import Netlink
import SluiceCore

/// The generic-netlink family name. The corresponding C constant is `IPVS_GENL_NAME`.
public let ipvsFamilyName = "IPVS"
/// The family version sent in `genlmsghdr.version`. The corresponding C constant is `IPVS_GENL_VERSION`.
public let ipvsFamilyVersion: UInt8 = 1

/// IPVS commands (`enum` in `ip_vs.h`).
public enum IPVSCommand: UInt8, Sendable, CaseIterable {
    /// Add a service. The corresponding C constant is `IPVS_CMD_NEW_SERVICE`.
    case newService = 1
    /// Modify a service. The corresponding C constant is `IPVS_CMD_SET_SERVICE`.
    case setService = 2
    /// Delete a service. The corresponding C constant is `IPVS_CMD_DEL_SERVICE`.
    case deleteService = 3
    /// Get one service, or dump all. The corresponding C constant is `IPVS_CMD_GET_SERVICE`.
    case getService = 4
    /// Add a destination. The corresponding C constant is `IPVS_CMD_NEW_DEST`.
    case newDestination = 5
    /// Modify a destination. The corresponding C constant is `IPVS_CMD_SET_DEST`.
    case setDestination = 6
    /// Delete a destination. The corresponding C constant is `IPVS_CMD_DEL_DEST`.
    case deleteDestination = 7
    /// Dump the destinations of a service. The corresponding C constant is `IPVS_CMD_GET_DEST`.
    case getDestination = 8
    /// Start a sync daemon. The corresponding C constant is `IPVS_CMD_NEW_DAEMON`.
    case newDaemon = 9
    /// Stop a sync daemon. The corresponding C constant is `IPVS_CMD_DEL_DAEMON`.
    case deleteDaemon = 10
    /// Get sync daemon status. The corresponding C constant is `IPVS_CMD_GET_DAEMON`.
    case getDaemon = 11
    /// Set the TCP / TCP FIN / UDP timeouts. The corresponding C constant is `IPVS_CMD_SET_CONFIG`.
    case setConfig = 12
    /// Get the timeouts. The corresponding C constant is `IPVS_CMD_GET_CONFIG`.
    case getConfig = 13
    /// Reply to `getInfo`. The corresponding C constant is `IPVS_CMD_SET_INFO`.
    case setInfo = 14
    /// Get version and connection-table size. The corresponding C constant is `IPVS_CMD_GET_INFO`.
    case getInfo = 15
    /// Zero counters. The corresponding C constant is `IPVS_CMD_ZERO`.
    case zero = 16
    /// Delete every service. The corresponding C constant is `IPVS_CMD_FLUSH`.
    case flush = 17

    /// The C name, for errors and logs.
    public var cName: String {
        switch self {
        case .newService: return "IPVS_CMD_NEW_SERVICE"
        case .setService: return "IPVS_CMD_SET_SERVICE"
        case .deleteService: return "IPVS_CMD_DEL_SERVICE"
        case .getService: return "IPVS_CMD_GET_SERVICE"
        case .newDestination: return "IPVS_CMD_NEW_DEST"
        case .setDestination: return "IPVS_CMD_SET_DEST"
        case .deleteDestination: return "IPVS_CMD_DEL_DEST"
        case .getDestination: return "IPVS_CMD_GET_DEST"
        case .newDaemon: return "IPVS_CMD_NEW_DAEMON"
        case .deleteDaemon: return "IPVS_CMD_DEL_DAEMON"
        case .getDaemon: return "IPVS_CMD_GET_DAEMON"
        case .setConfig: return "IPVS_CMD_SET_CONFIG"
        case .getConfig: return "IPVS_CMD_GET_CONFIG"
        case .setInfo: return "IPVS_CMD_SET_INFO"
        case .getInfo: return "IPVS_CMD_GET_INFO"
        case .zero: return "IPVS_CMD_ZERO"
        case .flush: return "IPVS_CMD_FLUSH"
        }
    }
}

/// Top-level IPVS attributes (`IPVS_CMD_ATTR_*`).
public enum IPVSCommandAttribute {
    /// Nested service attributes. The corresponding C constant is `IPVS_CMD_ATTR_SERVICE`.
    public static let service: UInt16 = 1
    /// Nested destination attributes. The corresponding C constant is `IPVS_CMD_ATTR_DEST`.
    public static let destination: UInt16 = 2
    /// Nested sync-daemon attributes. The corresponding C constant is `IPVS_CMD_ATTR_DAEMON`.
    public static let daemon: UInt16 = 3
    /// TCP established timeout, u32 seconds. The corresponding C constant is `IPVS_CMD_ATTR_TIMEOUT_TCP`.
    public static let timeoutTCP: UInt16 = 4
    /// TCP FIN-wait timeout, u32 seconds. The corresponding C constant is `IPVS_CMD_ATTR_TIMEOUT_TCP_FIN`.
    public static let timeoutTCPFin: UInt16 = 5
    /// UDP timeout, u32 seconds. The corresponding C constant is `IPVS_CMD_ATTR_TIMEOUT_UDP`.
    public static let timeoutUDP: UInt16 = 6
}

/// Service attributes, nested in `IPVS_CMD_ATTR_SERVICE` (`IPVS_SVC_ATTR_*`).
public enum IPVSServiceAttribute {
    /// u16 `AF_INET`/`AF_INET6`. The corresponding C constant is `IPVS_SVC_ATTR_AF`.
    public static let addressFamily: UInt16 = 1
    /// u16 IP protocol. The corresponding C constant is `IPVS_SVC_ATTR_PROTOCOL`.
    public static let proto: UInt16 = 2
    /// `union nf_inet_addr`. The corresponding C constant is `IPVS_SVC_ATTR_ADDR`.
    public static let address: UInt16 = 3
    /// Port, big-endian. The corresponding C constant is `IPVS_SVC_ATTR_PORT`.
    public static let port: UInt16 = 4
    /// u32 firewall mark. The corresponding C constant is `IPVS_SVC_ATTR_FWMARK`.
    public static let firewallMark: UInt16 = 5
    /// Scheduler name, NUL-terminated, at most 16 bytes. The corresponding C constant is `IPVS_SVC_ATTR_SCHED_NAME`.
    public static let schedulerName: UInt16 = 6
    /// `struct ip_vs_flags { u32 flags; u32 mask; }`. The corresponding C constant is `IPVS_SVC_ATTR_FLAGS`.
    public static let flags: UInt16 = 7
    /// u32 persistence timeout. The corresponding C constant is `IPVS_SVC_ATTR_TIMEOUT`.
    public static let timeout: UInt16 = 8
    /// u32 persistence netmask. The corresponding C constant is `IPVS_SVC_ATTR_NETMASK`.
    public static let netmask: UInt16 = 9
    /// Nested 32-bit statistics. The corresponding C constant is `IPVS_SVC_ATTR_STATS`.
    public static let stats: UInt16 = 10
    /// Persistence engine name. The corresponding C constant is `IPVS_SVC_ATTR_PE_NAME`.
    public static let persistenceEngine: UInt16 = 11
    /// Nested 64-bit statistics. The corresponding C constant is `IPVS_SVC_ATTR_STATS64`.
    public static let stats64: UInt16 = 12
}

/// Destination attributes, nested in `IPVS_CMD_ATTR_DEST` (`IPVS_DEST_ATTR_*`).
public enum IPVSDestinationAttribute {
    /// `union nf_inet_addr`. The corresponding C constant is `IPVS_DEST_ATTR_ADDR`.
    public static let address: UInt16 = 1
    /// Port, big-endian. The corresponding C constant is `IPVS_DEST_ATTR_PORT`.
    public static let port: UInt16 = 2
    /// u32 forwarding method. The corresponding C constant is `IPVS_DEST_ATTR_FWD_METHOD`.
    public static let forwardingMethod: UInt16 = 3
    /// u32 weight. The corresponding C constant is `IPVS_DEST_ATTR_WEIGHT`.
    public static let weight: UInt16 = 4
    /// u32 upper connection threshold. The corresponding C constant is `IPVS_DEST_ATTR_U_THRESH`.
    public static let upperThreshold: UInt16 = 5
    /// u32 lower connection threshold. The corresponding C constant is `IPVS_DEST_ATTR_L_THRESH`.
    public static let lowerThreshold: UInt16 = 6
    /// u32 active connections (reply). The corresponding C constant is `IPVS_DEST_ATTR_ACTIVE_CONNS`.
    public static let activeConnections: UInt16 = 7
    /// u32 inactive connections (reply). The corresponding C constant is `IPVS_DEST_ATTR_INACT_CONNS`.
    public static let inactiveConnections: UInt16 = 8
    /// u32 persistence templates (reply). The corresponding C constant is `IPVS_DEST_ATTR_PERSIST_CONNS`.
    public static let persistentConnections: UInt16 = 9
    /// Nested 32-bit statistics. The corresponding C constant is `IPVS_DEST_ATTR_STATS`.
    public static let stats: UInt16 = 10
    /// u16 address family of the destination. The corresponding C constant is `IPVS_DEST_ATTR_ADDR_FAMILY`.
    public static let addressFamily: UInt16 = 11
    /// Nested 64-bit statistics. The corresponding C constant is `IPVS_DEST_ATTR_STATS64`.
    public static let stats64: UInt16 = 12
}

/// `IPVS_CMD_GET_INFO` reply attributes (`IPVS_INFO_ATTR_*`).
public enum IPVSInfoAttribute {
    /// u32 version, e.g. 0x010201. The corresponding C constant is `IPVS_INFO_ATTR_VERSION`.
    public static let version: UInt16 = 1
    /// u32 connection-table size. The corresponding C constant is `IPVS_INFO_ATTR_CONN_TAB_SIZE`.
    public static let connectionTableSize: UInt16 = 2
}

/// Service flags (`IP_VS_SVC_F_*`).
public struct IPVSServiceFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Persistent (ClientIP affinity). The corresponding C constant is `IP_VS_SVC_F_PERSISTENT`.
    public static let persistent = IPVSServiceFlags(rawValue: 0x0001)
    /// Set by the kernel on every service. The corresponding C constant is `IP_VS_SVC_F_HASHED`.
    public static let hashed = IPVSServiceFlags(rawValue: 0x0002)
    /// One-packet scheduling. The corresponding C constant is `IP_VS_SVC_F_ONEPACKET`.
    public static let onePacket = IPVSServiceFlags(rawValue: 0x0004)
    /// Scheduler flag 1 (`sh-fallback`, `mh-fallback`). The corresponding C constant is `IP_VS_SVC_F_SCHED1`.
    public static let scheduler1 = IPVSServiceFlags(rawValue: 0x0008)
    /// Scheduler flag 2 (`sh-port`, `mh-port`; kube-proxy's FlagSourceHash for `mh`). The corresponding C constant is `IP_VS_SVC_F_SCHED2`.
    public static let scheduler2 = IPVSServiceFlags(rawValue: 0x0010)
    /// Scheduler flag 3. The corresponding C constant is `IP_VS_SVC_F_SCHED3`.
    public static let scheduler3 = IPVSServiceFlags(rawValue: 0x0020)
}

/// Destination forwarding methods (`IP_VS_CONN_F_*` under `IP_VS_CONN_F_FWD_MASK`).
public enum IPVSForwardingMethod: UInt32, Hashable, Sendable {
    /// NAT. The corresponding C constant is `IP_VS_CONN_F_MASQ`.
    case masquerade = 0
    /// Local node. The corresponding C constant is `IP_VS_CONN_F_LOCALNODE`.
    case localNode = 1
    /// IP-in-IP tunnel. The corresponding C constant is `IP_VS_CONN_F_TUNNEL`.
    case tunnel = 2
    /// Direct routing. The corresponding C constant is `IP_VS_CONN_F_DROUTE`.
    case directRoute = 3
    /// Cache bypass. The corresponding C constant is `IP_VS_CONN_F_BYPASS`.
    case bypass = 4
}

/// The schedulers `--ipvs-scheduler` accepts (each is a kernel module `ip_vs_<name>`).
public let ipvsSchedulers = ["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh"]

/// IPVS version and connection-table size (`IPVS_CMD_GET_INFO`).
public struct IPVSInfo: Hashable, Sendable, CustomStringConvertible {
    /// e.g. 0x010201.
    public var version: UInt32
    /// Connection hash table size.
    public var connectionTableSize: UInt32

    /// Creates an info value.
    public init(version: UInt32, connectionTableSize: UInt32) {
        self.version = version
        self.connectionTableSize = connectionTableSize
    }

    /// `1.2.1 (size=4096)`.
    public var description: String {
        "\(version >> 16).\(version >> 8 & 0xff).\(version & 0xff) (size=\(connectionTableSize))"
    }
}

/// The three timeouts `ipvsadm --set` sets, in seconds; 0 leaves one unchanged.
public struct IPVSTimeouts: Hashable, Sendable {
    public var tcp: UInt32
    public var tcpFin: UInt32
    public var udp: UInt32

    /// Creates timeouts.
    public init(tcp: UInt32 = 0, tcpFin: UInt32 = 0, udp: UInt32 = 0) {
        self.tcp = tcp
        self.tcpFin = tcpFin
        self.udp = udp
    }
}

/// Builds and parses IPVS messages for one resolved family id.
public struct IPVSMessages: Sendable {
    /// The generic-netlink family id of `IPVS` in this network namespace.
    public var familyID: UInt16

    /// Creates a builder.
    public init(familyID: UInt16) { self.familyID = familyID }

    private func request(_ cmd: IPVSCommand, _ attrs: [NetlinkAttribute], dump: Bool = false, detail: String = "") -> NetlinkRequest {
        let payload = GenericNetlinkHeader(command: cmd.rawValue, version: ipvsFamilyVersion).encoded + attrs.encoded()
        var flags: NetlinkMessageFlags = [.request, .ack]
        if dump { flags.formUnion(.dump) }
        return NetlinkRequest(type: familyID, flags: flags, payload: payload,
                              operation: detail.isEmpty ? cmd.cName : "\(cmd.cName) \(detail)")
    }

    /// The identity of a service: AF, PROTOCOL, ADDR (16 bytes), PORT (big-endian).
    public static func serviceIdentity(_ key: VirtualServerKey) -> [NetlinkAttribute] {
        [
            .u16(IPVSServiceAttribute.addressFamily, key.address.addressFamilyNumber),
            .u16(IPVSServiceAttribute.proto, UInt16(key.proto.protocolNumber)),
            .bytes(IPVSServiceAttribute.address, key.address.inetAddrUnion),
            .be16(IPVSServiceAttribute.port, key.port),
        ]
    }

    /// A full service: the identity plus the four attributes the kernel requires for
    /// NEW/SET (SCHED_NAME, FLAGS with mask 0xFFFFFFFF, TIMEOUT, NETMASK).
    public static func serviceFull(_ vs: VirtualServer) -> [NetlinkAttribute] {
        var flags: [UInt8] = []
        flags.appendHost(vs.flags.subtracting(.hashed).rawValue)
        flags.appendHost(UInt32.max)
        return serviceIdentity(vs.key) + [
            .string(IPVSServiceAttribute.schedulerName, vs.scheduler),
            .bytes(IPVSServiceAttribute.flags, flags),
            .u32(IPVSServiceAttribute.timeout, vs.timeout),
            .u32(IPVSServiceAttribute.netmask, vs.netmask),
        ]
    }

    /// The identity of a destination: ADDR (16 bytes), PORT (big-endian), ADDR_FAMILY.
    public static func destinationIdentity(_ rs: RealServer) -> [NetlinkAttribute] {
        [
            .bytes(IPVSDestinationAttribute.address, rs.address.inetAddrUnion),
            .be16(IPVSDestinationAttribute.port, rs.port),
            .u16(IPVSDestinationAttribute.addressFamily, rs.address.addressFamilyNumber),
        ]
    }

    /// A full destination: the identity plus FWD_METHOD, WEIGHT, U_THRESH 0, L_THRESH 0.
    public static func destinationFull(_ rs: RealServer) -> [NetlinkAttribute] {
        [
            .bytes(IPVSDestinationAttribute.address, rs.address.inetAddrUnion),
            .be16(IPVSDestinationAttribute.port, rs.port),
            .u32(IPVSDestinationAttribute.forwardingMethod, rs.forwarding.rawValue),
            .u32(IPVSDestinationAttribute.weight, rs.weight),
            .u32(IPVSDestinationAttribute.upperThreshold, 0),
            .u32(IPVSDestinationAttribute.lowerThreshold, 0),
            .u16(IPVSDestinationAttribute.addressFamily, rs.address.addressFamilyNumber),
        ]
    }

    /// `IPVS_CMD_GET_INFO`.
    public func getInfo() -> NetlinkRequest { request(.getInfo, []) }

    /// `IPVS_CMD_GET_SERVICE` as a dump, with the empty service nest moby/ipvs also sends.
    public func dumpServices() -> NetlinkRequest {
        request(.getService, [.nested(IPVSCommandAttribute.service, [])], dump: true)
    }

    /// `IPVS_CMD_NEW_SERVICE`.
    public func newService(_ vs: VirtualServer) -> NetlinkRequest {
        request(.newService, [.nested(IPVSCommandAttribute.service, IPVSMessages.serviceFull(vs))], detail: vs.key.description)
    }

    /// `IPVS_CMD_SET_SERVICE`.
    public func setService(_ vs: VirtualServer) -> NetlinkRequest {
        request(.setService, [.nested(IPVSCommandAttribute.service, IPVSMessages.serviceFull(vs))], detail: vs.key.description)
    }

    /// `IPVS_CMD_DEL_SERVICE`.
    public func deleteService(_ key: VirtualServerKey) -> NetlinkRequest {
        request(.deleteService, [.nested(IPVSCommandAttribute.service, IPVSMessages.serviceIdentity(key))], detail: key.description)
    }

    /// `IPVS_CMD_GET_DEST` dump for one service.
    public func dumpDestinations(_ key: VirtualServerKey) -> NetlinkRequest {
        request(.getDestination, [.nested(IPVSCommandAttribute.service, IPVSMessages.serviceIdentity(key))], dump: true,
                detail: key.description)
    }

    /// `IPVS_CMD_NEW_DEST`.
    public func newDestination(_ key: VirtualServerKey, _ rs: RealServer) -> NetlinkRequest {
        request(.newDestination, [
            .nested(IPVSCommandAttribute.service, IPVSMessages.serviceIdentity(key)),
            .nested(IPVSCommandAttribute.destination, IPVSMessages.destinationFull(rs)),
        ], detail: "\(key) -> \(rs)")
    }

    /// `IPVS_CMD_SET_DEST` (e.g. weight 0 to drain).
    public func setDestination(_ key: VirtualServerKey, _ rs: RealServer) -> NetlinkRequest {
        request(.setDestination, [
            .nested(IPVSCommandAttribute.service, IPVSMessages.serviceIdentity(key)),
            .nested(IPVSCommandAttribute.destination, IPVSMessages.destinationFull(rs)),
        ], detail: "\(key) -> \(rs) weight \(rs.weight)")
    }

    /// `IPVS_CMD_DEL_DEST`.
    public func deleteDestination(_ key: VirtualServerKey, _ rs: RealServer) -> NetlinkRequest {
        request(.deleteDestination, [
            .nested(IPVSCommandAttribute.service, IPVSMessages.serviceIdentity(key)),
            .nested(IPVSCommandAttribute.destination, IPVSMessages.destinationIdentity(rs)),
        ], detail: "\(key) -> \(rs)")
    }

    /// `IPVS_CMD_FLUSH`.
    public func flush() -> NetlinkRequest { request(.flush, []) }

    /// `IPVS_CMD_SET_CONFIG` with the non-zero timeouts.
    public func setConfig(_ t: IPVSTimeouts) -> NetlinkRequest {
        var attrs: [NetlinkAttribute] = []
        if t.tcp > 0 { attrs.append(.u32(IPVSCommandAttribute.timeoutTCP, t.tcp)) }
        if t.tcpFin > 0 { attrs.append(.u32(IPVSCommandAttribute.timeoutTCPFin, t.tcpFin)) }
        if t.udp > 0 { attrs.append(.u32(IPVSCommandAttribute.timeoutUDP, t.udp)) }
        return request(.setConfig, attrs)
    }

    /// `IPVS_CMD_GET_CONFIG`.
    public func getConfig() -> NetlinkRequest { request(.getConfig, []) }

    // MARK: Parsing

    /// Parses a `IPVS_CMD_NEW_SERVICE` reply (one dump entry). Returns nil for services
    /// Sluice never manages: firewall-mark services and protocols other than TCP/UDP/SCTP.
    public static func parseService(_ m: NetlinkMessage) throws(NetlinkDecodeError) -> VirtualServer? {
        let top = try GenericNetlinkHeader.attributes(of: m)
        guard let s = try top.nested(IPVSCommandAttribute.service) else {
            throw NetlinkDecodeError("service reply without IPVS_CMD_ATTR_SERVICE")
        }
        if try s.u32(IPVSServiceAttribute.firewallMark) != nil, s[IPVSServiceAttribute.address] == nil { return nil }
        guard let af = try s.u16(IPVSServiceAttribute.addressFamily) else {
            throw NetlinkDecodeError("service without IPVS_SVC_ATTR_AF")
        }
        guard let family = IPFamily(addressFamilyNumber: Int(af)) else { return nil }
        guard let protoNumber = try s.u16(IPVSServiceAttribute.proto) else { return nil }
        guard let proto = TransportProtocol(protocolNumber: Int(protoNumber)) else { return nil }
        guard let addrBytes = s.bytes(IPVSServiceAttribute.address), let address = IPAddress(family: family, bytes: addrBytes) else {
            throw NetlinkDecodeError("service with a missing or short IPVS_SVC_ATTR_ADDR")
        }
        guard let port = try s.be16(IPVSServiceAttribute.port) else {
            throw NetlinkDecodeError("service without IPVS_SVC_ATTR_PORT")
        }
        var flags: IPVSServiceFlags = []
        if let f = s.bytes(IPVSServiceAttribute.flags) {
            guard f.count >= 4 else { throw NetlinkDecodeError("IPVS_SVC_ATTR_FLAGS of \(f.count) bytes") }
            flags = IPVSServiceFlags(rawValue: f.readHost(UInt32.self, at: 0))
        }
        return VirtualServer(
            key: VirtualServerKey(address: address, proto: proto, port: port),
            scheduler: try s.string(IPVSServiceAttribute.schedulerName) ?? "",
            flags: flags,
            timeout: try s.u32(IPVSServiceAttribute.timeout) ?? 0,
            netmask: try s.u32(IPVSServiceAttribute.netmask))
    }

    /// Parses a `IPVS_CMD_NEW_DEST` reply (one dump entry). The address family is the
    /// destination's own (`IPVS_DEST_ATTR_ADDR_FAMILY`) when present, else the service's.
    public static func parseDestination(_ m: NetlinkMessage, serviceFamily: IPFamily) throws(NetlinkDecodeError) -> RealServer {
        let top = try GenericNetlinkHeader.attributes(of: m)
        guard let d = try top.nested(IPVSCommandAttribute.destination) else {
            throw NetlinkDecodeError("destination reply without IPVS_CMD_ATTR_DEST")
        }
        var family = serviceFamily
        if let af = try d.u16(IPVSDestinationAttribute.addressFamily), let f = IPFamily(addressFamilyNumber: Int(af)) { family = f }
        guard let addrBytes = d.bytes(IPVSDestinationAttribute.address), let address = IPAddress(family: family, bytes: addrBytes) else {
            throw NetlinkDecodeError("destination with a missing or short IPVS_DEST_ATTR_ADDR")
        }
        guard let port = try d.be16(IPVSDestinationAttribute.port) else {
            throw NetlinkDecodeError("destination without IPVS_DEST_ATTR_PORT")
        }
        let fwd = (try d.u32(IPVSDestinationAttribute.forwardingMethod) ?? 0) & 0x7
        return RealServer(
            address: address, port: port,
            weight: try d.u32(IPVSDestinationAttribute.weight) ?? 0,
            forwarding: IPVSForwardingMethod(rawValue: fwd) ?? .masquerade,
            activeConnections: try d.u32(IPVSDestinationAttribute.activeConnections) ?? 0,
            inactiveConnections: try d.u32(IPVSDestinationAttribute.inactiveConnections) ?? 0,
            persistentConnections: try d.u32(IPVSDestinationAttribute.persistentConnections) ?? 0)
    }

    /// Parses the `IPVS_CMD_SET_INFO` reply to `getInfo`.
    public static func parseInfo(_ m: NetlinkMessage) throws(NetlinkDecodeError) -> IPVSInfo {
        let a = try GenericNetlinkHeader.attributes(of: m)
        guard let v = try a.u32(IPVSInfoAttribute.version) else { throw NetlinkDecodeError("GET_INFO reply without IPVS_INFO_ATTR_VERSION") }
        return IPVSInfo(version: v, connectionTableSize: try a.u32(IPVSInfoAttribute.connectionTableSize) ?? 0)
    }

    /// Parses the reply to `getConfig`.
    public static func parseConfig(_ m: NetlinkMessage) throws(NetlinkDecodeError) -> IPVSTimeouts {
        let a = try GenericNetlinkHeader.attributes(of: m)
        return IPVSTimeouts(tcp: try a.u32(IPVSCommandAttribute.timeoutTCP) ?? 0,
                            tcpFin: try a.u32(IPVSCommandAttribute.timeoutTCPFin) ?? 0,
                            udp: try a.u32(IPVSCommandAttribute.timeoutUDP) ?? 0)
    }
}
