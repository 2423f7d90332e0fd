// Sluice: a per-node Kubernetes service proxy.
// Generic netlink: the 4-byte genlmsghdr and family resolution through the "nlctrl" family.
// Layout: include/uapi/linux/genetlink.h.

/// `struct genlmsghdr`: command, version, two reserved bytes.
public struct GenericNetlinkHeader: Hashable, Sendable {
    /// `cmd`.
    public var command: UInt8
    /// `version`.
    public var version: UInt8

    /// Creates a header.
    public init(command: UInt8, version: UInt8) {
        self.command = command
        self.version = version
    }

    /// The four header bytes.
    public var encoded: [UInt8] { [command, version, 0, 0] }

    /// Reads the header at the start of a generic-netlink payload.
    public init(parsing payload: [UInt8]) throws(NetlinkDecodeError) {
        guard payload.count >= 4 else { throw NetlinkDecodeError("generic netlink payload of \(payload.count) bytes has no genlmsghdr") }
        command = payload[0]
        version = payload[1]
    }

    /// The attributes after the header of a generic-netlink message.
    public static func attributes(of message: NetlinkMessage) throws(NetlinkDecodeError) -> NetlinkAttributes {
        guard message.payload.count >= 4 else { throw NetlinkDecodeError("generic netlink message without genlmsghdr") }
        return try NetlinkAttributes(parsing: Array(message.payload[4...]))
    }
}

/// The generic-netlink controller (`nlctrl`), which maps family names to ids.
public enum GenericNetlinkControl {
    /// The controller's fixed family id. The corresponding C constant is `GENL_ID_CTRL`.
    public static let familyID: UInt16 = 0x10
    /// Look a family up. The corresponding C constant is `CTRL_CMD_GETFAMILY`.
    public static let getFamilyCommand: UInt8 = 3
    /// The reply command. The corresponding C constant is `CTRL_CMD_NEWFAMILY`.
    public static let newFamilyCommand: UInt8 = 1
    /// Family id (u16). The corresponding C constant is `CTRL_ATTR_FAMILY_ID`.
    public static let attributeFamilyID: UInt16 = 1
    /// Family name (string). The corresponding C constant is `CTRL_ATTR_FAMILY_NAME`.
    public static let attributeFamilyName: UInt16 = 2
    /// Family version (u32). The corresponding C constant is `CTRL_ATTR_VERSION`.
    public static let attributeVersion: UInt16 = 3
    /// Highest attribute number (u32). The corresponding C constant is `CTRL_ATTR_MAXATTR`.
    public static let attributeMaxAttribute: UInt16 = 5

    /// `CTRL_CMD_GETFAMILY` for `name`, with `NLM_F_REQUEST|NLM_F_ACK`.
    public static func getFamily(_ name: String) -> NetlinkRequest {
        let payload = GenericNetlinkHeader(command: getFamilyCommand, version: 1).encoded
            + [NetlinkAttribute.string(attributeFamilyName, name)].encoded()
        return NetlinkRequest(type: familyID, flags: [.request, .ack], payload: payload, operation: "CTRL_CMD_GETFAMILY \(name)")
    }
}

/// A resolved generic-netlink family.
public struct GenericNetlinkFamily: Hashable, Sendable {
    /// The family name, e.g. `IPVS`.
    public var name: String
    /// The id to use as `nlmsg_type`.
    public var id: UInt16
    /// The family's version.
    public var version: UInt32
    /// The highest attribute number it accepts.
    public var maxAttribute: UInt32

    /// Creates a family description.
    public init(name: String, id: UInt16, version: UInt32, maxAttribute: UInt32) {
        self.name = name
        self.id = id
        self.version = version
        self.maxAttribute = maxAttribute
    }

    /// Parses the controller's `CTRL_CMD_NEWFAMILY` reply.
    public init(parsing reply: NetlinkMessage) throws(NetlinkDecodeError) {
        let attrs = try GenericNetlinkHeader.attributes(of: reply)
        guard let id = try attrs.u16(GenericNetlinkControl.attributeFamilyID) else {
            throw NetlinkDecodeError("CTRL_CMD_NEWFAMILY without CTRL_ATTR_FAMILY_ID")
        }
        self.id = id
        name = try attrs.string(GenericNetlinkControl.attributeFamilyName) ?? ""
        version = try attrs.u32(GenericNetlinkControl.attributeVersion) ?? 0
        maxAttribute = try attrs.u32(GenericNetlinkControl.attributeMaxAttribute) ?? 0
    }
}

extension NetlinkExecutor {
    /// Resolves a generic-netlink family by name. Asking for a family whose module is not
    /// loaded makes the kernel try `modprobe` (on-demand loading) first.
    /// - Returns: the family, or nil when the kernel does not know it (`ENOENT`).
    public func resolveFamily(_ name: String) async throws -> GenericNetlinkFamily? {
        let replies: [NetlinkMessage]
        do {
            replies = try await execute(GenericNetlinkControl.getFamily(name))
        } catch let e as NetlinkError where e.errno == .noSuchFileOrDirectory {
            return nil
        }
        guard let first = replies.first else {
            throw NetlinkError(errno: .badMessage, message: "no CTRL_CMD_NEWFAMILY reply", operation: "CTRL_CMD_GETFAMILY \(name)")
        }
        do {
            return try GenericNetlinkFamily(parsing: first)
        } catch {
            throw NetlinkError(errno: .badMessage, message: error.description, operation: "CTRL_CMD_GETFAMILY \(name)")
        }
    }
}
