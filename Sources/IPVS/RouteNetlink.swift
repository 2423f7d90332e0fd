// Sluice: a per-node Kubernetes service proxy.
// rtnetlink for kube-ipvs0: the dummy link and the service addresses bound to it.
// Layouts: include/uapi/linux/rtnetlink.h, if_link.h, if_addr.h.

import Netlink
import SluiceCore

/// rtnetlink message types (`RTM_*`).
public enum RouteMessageType {
    /// Create a link. The corresponding C constant is `RTM_NEWLINK`.
    public static let newLink: UInt16 = 16
    /// Delete a link. The corresponding C constant is `RTM_DELLINK`.
    public static let deleteLink: UInt16 = 17
    /// Get a link. The corresponding C constant is `RTM_GETLINK`.
    public static let getLink: UInt16 = 18
    /// Add an address. The corresponding C constant is `RTM_NEWADDR`.
    public static let newAddress: UInt16 = 20
    /// Delete an address. The corresponding C constant is `RTM_DELADDR`.
    public static let deleteAddress: UInt16 = 21
    /// Dump addresses. The corresponding C constant is `RTM_GETADDR`.
    public static let getAddress: UInt16 = 22
}

/// Link attributes (`IFLA_*`).
public enum LinkAttribute {
    /// Interface name. The corresponding C constant is `IFLA_IFNAME`.
    public static let name: UInt16 = 3
    /// Nested link information. The corresponding C constant is `IFLA_LINKINFO`.
    public static let linkInfo: UInt16 = 18
    /// The link kind inside `IFLA_LINKINFO`, e.g. "dummy". The corresponding C constant is `IFLA_INFO_KIND`.
    public static let infoKind: UInt16 = 1
}

/// Address attributes (`IFA_*`).
public enum AddressAttribute {
    /// The (peer) address. The corresponding C constant is `IFA_ADDRESS`.
    public static let address: UInt16 = 1
    /// The local address. The corresponding C constant is `IFA_LOCAL`.
    public static let local: UInt16 = 2
}

/// Interface flags used here (`IFF_*`).
public enum InterfaceFlags {
    /// The link is up. The corresponding C constant is `IFF_UP`.
    public static let up: UInt32 = 0x1
    /// No ARP. The corresponding C constant is `IFF_NOARP`.
    public static let noARP: UInt32 = 0x80
}

/// Address flags used here (`IFA_F_*`).
public enum AddressFlags {
    /// Skip duplicate address detection (IPv6). The corresponding C constant is `IFA_F_NODAD`.
    public static let noDAD: UInt8 = 0x02
}

/// `struct ifinfomsg` (16 bytes).
public struct InterfaceInfoMessage: Hashable, Sendable {
    public var family: UInt8 = 0
    public var type: UInt16 = 0
    public var index: Int32 = 0
    public var flags: UInt32 = 0
    public var change: UInt32 = 0

    /// Creates a header.
    public init(family: UInt8 = 0, type: UInt16 = 0, index: Int32 = 0, flags: UInt32 = 0, change: UInt32 = 0) {
        self.family = family
        self.type = type
        self.index = index
        self.flags = flags
        self.change = change
    }

    /// The 16 header bytes.
    public var encoded: [UInt8] {
        var out: [UInt8] = [family, 0]
        out.appendHost(type)
        out.appendHost(index)
        out.appendHost(flags)
        out.appendHost(change)
        return out
    }

    /// Reads the header at the start of a link message's payload.
    public init(parsing p: [UInt8]) throws(NetlinkDecodeError) {
        guard p.count >= 16 else { throw NetlinkDecodeError("ifinfomsg of \(p.count) bytes") }
        family = p[0]
        type = p.readHost(UInt16.self, at: 2)
        index = p.readHost(Int32.self, at: 4)
        flags = p.readHost(UInt32.self, at: 8)
        change = p.readHost(UInt32.self, at: 12)
    }
}

/// `struct ifaddrmsg` (8 bytes).
public struct InterfaceAddressMessage: Hashable, Sendable {
    public var family: UInt8
    public var prefixLength: UInt8
    public var flags: UInt8
    public var scope: UInt8
    public var index: UInt32

    /// Creates a header.
    public init(family: UInt8, prefixLength: UInt8, flags: UInt8 = 0, scope: UInt8 = 0, index: UInt32) {
        self.family = family
        self.prefixLength = prefixLength
        self.flags = flags
        self.scope = scope
        self.index = index
    }

    /// The 8 header bytes.
    public var encoded: [UInt8] {
        var out: [UInt8] = [family, prefixLength, flags, scope]
        out.appendHost(index)
        return out
    }

    /// Reads the header at the start of an address message's payload.
    public init(parsing p: [UInt8]) throws(NetlinkDecodeError) {
        guard p.count >= 8 else { throw NetlinkDecodeError("ifaddrmsg of \(p.count) bytes") }
        family = p[0]
        prefixLength = p[1]
        flags = p[2]
        scope = p[3]
        index = p.readHost(UInt32.self, at: 4)
    }
}

/// A link as rtnetlink reports it.
public struct LinkInfo: Hashable, Sendable {
    /// The interface index.
    public var index: Int32
    /// The interface name.
    public var name: String
    /// `IFF_*` flags.
    public var flags: UInt32

    /// Creates a link description.
    public init(index: Int32, name: String, flags: UInt32) {
        self.index = index
        self.name = name
        self.flags = flags
    }
}

/// An address as rtnetlink reports it.
public struct InterfaceAddress: Hashable, Sendable {
    /// The interface index.
    public var index: UInt32
    /// The address.
    public var address: IPAddress
    /// The prefix length.
    public var prefixLength: UInt8

    /// Creates an address description.
    public init(index: UInt32, address: IPAddress, prefixLength: UInt8) {
        self.index = index
        self.address = address
        self.prefixLength = prefixLength
    }
}

/// Builders for the rtnetlink messages Sluice sends.
public enum RouteMessages {
    /// `RTM_GETLINK` for one link by name.
    public static func getLink(name: String) -> NetlinkRequest {
        let payload = InterfaceInfoMessage().encoded + [NetlinkAttribute.string(LinkAttribute.name, name)].encoded()
        return NetlinkRequest(type: RouteMessageType.getLink, flags: [.request, .ack], payload: payload, operation: "RTM_GETLINK \(name)")
    }

    /// `RTM_NEWLINK` creating a dummy link that is NOARP and down (`ifi_flags = ifi_change = IFF_NOARP`).
    public static func newDummyLink(name: String) -> NetlinkRequest {
        let header = InterfaceInfoMessage(flags: InterfaceFlags.noARP, change: InterfaceFlags.noARP)
        let payload = header.encoded + [
            NetlinkAttribute.string(LinkAttribute.name, name),
            .nested(LinkAttribute.linkInfo, [.string(LinkAttribute.infoKind, "dummy")]),
        ].encoded()
        return NetlinkRequest(type: RouteMessageType.newLink, flags: [.request, .ack, .create, .exclusive], payload: payload,
                              operation: "RTM_NEWLINK dummy \(name)")
    }

    /// `RTM_DELLINK` by name.
    public static func deleteLink(name: String) -> NetlinkRequest {
        let payload = InterfaceInfoMessage().encoded + [NetlinkAttribute.string(LinkAttribute.name, name)].encoded()
        return NetlinkRequest(type: RouteMessageType.deleteLink, flags: [.request, .ack], payload: payload, operation: "RTM_DELLINK \(name)")
    }

    private static func addressPayload(_ ip: IPAddress, index: UInt32) -> [UInt8] {
        let isV4 = ip.family == .ipv4
        let header = InterfaceAddressMessage(family: isV4 ? 2 : 10, prefixLength: isV4 ? 32 : 128,
                                             flags: isV4 ? 0 : AddressFlags.noDAD, scope: 0, index: index)
        return header.encoded + [
            NetlinkAttribute.bytes(AddressAttribute.local, ip.bytes),
            .bytes(AddressAttribute.address, ip.bytes),
        ].encoded()
    }

    /// `RTM_NEWADDR` binding `ip` as /32 (/128, no DAD) to link `index`, scope global.
    public static func newAddress(_ ip: IPAddress, index: UInt32) -> NetlinkRequest {
        NetlinkRequest(type: RouteMessageType.newAddress, flags: [.request, .ack, .create, .exclusive],
                       payload: addressPayload(ip, index: index), operation: "RTM_NEWADDR \(ip)")
    }

    /// `RTM_DELADDR` removing `ip` from link `index`.
    public static func deleteAddress(_ ip: IPAddress, index: UInt32) -> NetlinkRequest {
        NetlinkRequest(type: RouteMessageType.deleteAddress, flags: [.request, .ack],
                       payload: addressPayload(ip, index: index), operation: "RTM_DELADDR \(ip)")
    }

    /// `RTM_GETADDR` dump of every address of `family` (nil: both).
    public static func dumpAddresses(family: IPFamily?) -> NetlinkRequest {
        let af: UInt8 = family.map { $0 == .ipv4 ? 2 : 10 } ?? 0
        let payload = InterfaceAddressMessage(family: af, prefixLength: 0, index: 0).encoded
        return NetlinkRequest(type: RouteMessageType.getAddress, flags: [.request, .ack, .dump], payload: payload, operation: "RTM_GETADDR")
    }

    /// Parses an `RTM_NEWLINK` reply.
    public static func parseLink(_ m: NetlinkMessage) throws(NetlinkDecodeError) -> LinkInfo {
        let header = try InterfaceInfoMessage(parsing: m.payload)
        let attrs = try NetlinkAttributes(parsing: Array(m.payload[16...]))
        return LinkInfo(index: header.index, name: try attrs.string(LinkAttribute.name) ?? "", flags: header.flags)
    }

    /// Parses an `RTM_NEWADDR` dump entry; nil for families other than IPv4/IPv6.
    public static func parseAddress(_ m: NetlinkMessage) throws(NetlinkDecodeError) -> InterfaceAddress? {
        let header = try InterfaceAddressMessage(parsing: m.payload)
        guard let family = IPFamily(addressFamilyNumber: Int(header.family)) else { return nil }
        let attrs = try NetlinkAttributes(parsing: Array(m.payload[8...]))
        guard let bytes = attrs.bytes(AddressAttribute.local) ?? attrs.bytes(AddressAttribute.address),
              let ip = IPAddress(family: family, bytes: bytes) else { return nil }
        return InterfaceAddress(index: header.index, address: ip, prefixLength: header.prefixLength)
    }
}

/// The links and addresses the IPVS backend manages. The real one speaks rtnetlink; tests
/// use an in-memory fake.
public protocol LinkClient: Sendable {
    /// The link called `name`, nil when there is none.
    func link(named name: String) async throws -> LinkInfo?
    /// Creates a dummy link (NOARP, down) and returns it.
    func createDummy(named name: String) async throws -> LinkInfo
    /// Deletes a link; false when there was none.
    func deleteLink(named name: String) async throws -> Bool
    /// Every IPv4/IPv6 address in this network namespace.
    func addresses() async throws -> [InterfaceAddress]
    /// Binds addresses as /32 or /128 to a link (already bound counts as success) and
    /// returns the ones that failed.
    func addAddresses(_ ips: [IPAddress], index: UInt32) async throws -> [(IPAddress, NetlinkError)]
    /// Removes addresses from a link (already gone counts as success) and returns the ones
    /// that failed.
    func deleteAddresses(_ ips: [IPAddress], index: UInt32) async throws -> [(IPAddress, NetlinkError)]
}

/// `LinkClient` over rtnetlink.
public struct RouteNetlinkClient: LinkClient {
    /// The socket (or a scripted fake).
    public let executor: any NetlinkExecutor

    /// Wraps an executor.
    public init(executor: any NetlinkExecutor) { self.executor = executor }

    /// Opens a `NETLINK_ROUTE` socket.
    public static func connect() throws -> RouteNetlinkClient {
        RouteNetlinkClient(executor: try NetlinkConnection(protocol: NetlinkProtocol.route))
    }

    private func decode<T>(_ op: String, _ body: () throws(NetlinkDecodeError) -> T) throws -> T {
        do { return try body() } catch { throw NetlinkError(errno: .badMessage, message: error.description, operation: op) }
    }

    public func link(named name: String) async throws -> LinkInfo? {
        let replies: [NetlinkMessage]
        do {
            replies = try await executor.execute(RouteMessages.getLink(name: name))
        } catch let e as NetlinkError where e.errno == .noSuchDevice {
            return nil
        }
        guard let m = replies.first(where: { $0.type == RouteMessageType.newLink }) else { return nil }
        return try decode("RTM_GETLINK \(name)") { () throws(NetlinkDecodeError) in try RouteMessages.parseLink(m) }
    }

    public func createDummy(named name: String) async throws -> LinkInfo {
        do {
            _ = try await executor.execute(RouteMessages.newDummyLink(name: name))
        } catch let e as NetlinkError where e.errno == .fileExists {
            // Created concurrently (or by kube-proxy): fine.
        }
        guard let link = try await link(named: name) else {
            throw NetlinkError(errno: .noSuchDevice, message: "created but not found", operation: "RTM_NEWLINK dummy \(name)")
        }
        return link
    }

    public func deleteLink(named name: String) async throws -> Bool {
        do {
            _ = try await executor.execute(RouteMessages.deleteLink(name: name))
            return true
        } catch let e as NetlinkError where e.errno == .noSuchDevice {
            return false
        }
    }

    public func addresses() async throws -> [InterfaceAddress] {
        let replies = try await executor.execute(RouteMessages.dumpAddresses(family: nil))
        return try decode("RTM_GETADDR") { () throws(NetlinkDecodeError) in
            var out: [InterfaceAddress] = []
            for m in replies where m.type == RouteMessageType.newAddress {
                if let a = try RouteMessages.parseAddress(m) { out.append(a) }
            }
            return out
        }
    }

    public func addAddresses(_ ips: [IPAddress], index: UInt32) async throws -> [(IPAddress, NetlinkError)] {
        let results = try await executor.executeBatch(ips.map { RouteMessages.newAddress($0, index: index) })
        return zip(ips, results).compactMap { ip, r in
            if case .failure(let e) = r, e.errno != .fileExists { return (ip, e) }
            return nil
        }
    }

    public func deleteAddresses(_ ips: [IPAddress], index: UInt32) async throws -> [(IPAddress, NetlinkError)] {
        let results = try await executor.executeBatch(ips.map { RouteMessages.deleteAddress($0, index: index) })
        return zip(ips, results).compactMap { ip, r in
            if case .failure(let e) = r, e.errno != .noSuchDeviceOrAddress, e.errno != .addressNotAvailable { return (ip, e) }
            return nil
        }
    }
}
