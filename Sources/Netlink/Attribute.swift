// Sluice: a per-node Kubernetes service proxy.
// Netlink attributes (`struct nlattr`): type-length-value with 4-byte alignment, nesting,
// and the two flag bits in the type. Layout: include/uapi/linux/netlink.h.

/// One attribute to send. Nested attributes carry their children already encoded.
public struct NetlinkAttribute: Hashable, Sendable {
    /// Bit 15 of `nla_type`: the payload is a list of attributes. The corresponding C constant is `NLA_F_NESTED`.
    public static let nestedFlag: UInt16 = 1 << 15
    /// Bit 14 of `nla_type`: the payload is in network byte order. The corresponding C constant is `NLA_F_NET_BYTEORDER`.
    public static let netByteOrderFlag: UInt16 = 1 << 14
    /// The bits of `nla_type` that hold the type. The corresponding C constant is `NLA_TYPE_MASK`.
    public static let typeMask: UInt16 = 0x3FFF

    /// `nla_type`, flags included.
    public var rawType: UInt16
    /// The value, unpadded.
    public var payload: [UInt8]

    /// Creates an attribute with a raw type (flags included) and payload.
    public init(rawType: UInt16, payload: [UInt8]) {
        self.rawType = rawType
        self.payload = payload
    }

    /// A `u8`.
    public static func u8(_ type: UInt16, _ value: UInt8) -> NetlinkAttribute {
        NetlinkAttribute(rawType: type, payload: [value])
    }

    /// A `u16` in host order.
    public static func u16(_ type: UInt16, _ value: UInt16) -> NetlinkAttribute {
        var p: [UInt8] = []
        p.appendHost(value)
        return NetlinkAttribute(rawType: type, payload: p)
    }

    /// A `u32` in host order.
    public static func u32(_ type: UInt16, _ value: UInt32) -> NetlinkAttribute {
        var p: [UInt8] = []
        p.appendHost(value)
        return NetlinkAttribute(rawType: type, payload: p)
    }

    /// A `__be16`. With `flagged`, the type carries `NLA_F_NET_BYTEORDER` (ipset wants it; IPVS does not).
    public static func be16(_ type: UInt16, _ value: UInt16, flagged: Bool = false) -> NetlinkAttribute {
        var p: [UInt8] = []
        p.appendBigEndian(value)
        return NetlinkAttribute(rawType: flagged ? type | netByteOrderFlag : type, payload: p)
    }

    /// A `__be32`. With `flagged`, the type carries `NLA_F_NET_BYTEORDER`.
    public static func be32(_ type: UInt16, _ value: UInt32, flagged: Bool = false) -> NetlinkAttribute {
        var p: [UInt8] = []
        p.appendBigEndian(value)
        return NetlinkAttribute(rawType: flagged ? type | netByteOrderFlag : type, payload: p)
    }

    /// A NUL-terminated string.
    public static func string(_ type: UInt16, _ value: String) -> NetlinkAttribute {
        NetlinkAttribute(rawType: type, payload: Array(value.utf8) + [0])
    }

    /// Raw bytes. With `flagged`, the type carries `NLA_F_NET_BYTEORDER`.
    public static func bytes(_ type: UInt16, _ value: [UInt8], flagged: Bool = false) -> NetlinkAttribute {
        NetlinkAttribute(rawType: flagged ? type | netByteOrderFlag : type, payload: value)
    }

    /// A nest holding `children`, with `NLA_F_NESTED` set.
    public static func nested(_ type: UInt16, _ children: [NetlinkAttribute]) -> NetlinkAttribute {
        NetlinkAttribute(rawType: type | nestedFlag, payload: children.encoded())
    }

    /// Appends the attribute: `nla_len` (4 + payload, without padding), `nla_type`, the
    /// payload, then padding to 4 bytes.
    public func encode(into out: inout [UInt8]) {
        out.appendHost(UInt16(4 + payload.count))
        out.appendHost(rawType)
        out += payload
        out.padToAlignment()
    }
}

extension Array where Element == NetlinkAttribute {
    /// The attributes one after another, each padded.
    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        for a in self { a.encode(into: &out) }
        return out
    }
}

/// A received attribute.
public struct ParsedAttribute: Hashable, Sendable {
    /// The type without flag bits.
    public var type: UInt16
    /// `NLA_F_NESTED` was set.
    public var isNested: Bool
    /// `NLA_F_NET_BYTEORDER` was set.
    public var isNetByteOrder: Bool
    /// The value, unpadded.
    public var payload: [UInt8]
}

/// A parsed attribute list with typed, bounds-checked accessors. Lookups return the first
/// attribute of a type; accessors return nil when it is absent and throw when its size is wrong.
public struct NetlinkAttributes: Hashable, Sendable {
    /// Every attribute, in order.
    public var all: [ParsedAttribute]

    /// Parses `bytes` as a sequence of attributes. Each `nla_len` is checked: below 4 or past
    /// the end of the buffer is an error. Trailing bytes shorter than a header are ignored
    /// (padding).
    public init(parsing bytes: [UInt8]) throws(NetlinkDecodeError) {
        var out: [ParsedAttribute] = []
        var offset = 0
        while bytes.count - offset >= 4 {
            let length = Int(bytes.readHost(UInt16.self, at: offset))
            let rawType = bytes.readHost(UInt16.self, at: offset + 2)
            guard length >= 4, length <= bytes.count - offset else {
                throw NetlinkDecodeError("attribute type \(rawType & NetlinkAttribute.typeMask) at offset \(offset) claims \(length) bytes; \(bytes.count - offset) remain")
            }
            out.append(ParsedAttribute(
                type: rawType & NetlinkAttribute.typeMask,
                isNested: rawType & NetlinkAttribute.nestedFlag != 0,
                isNetByteOrder: rawType & NetlinkAttribute.netByteOrderFlag != 0,
                payload: Array(bytes[(offset + 4)..<(offset + length)])))
            offset += min(netlinkAlign(length), bytes.count - offset)
        }
        all = out
    }

    /// The first attribute of `type`.
    public subscript(type: UInt16) -> ParsedAttribute? { all.first { $0.type == type } }

    /// Every attribute of `type`, in order.
    public func every(_ type: UInt16) -> [ParsedAttribute] { all.filter { $0.type == type } }

    private func fixed(_ type: UInt16, size: Int) throws(NetlinkDecodeError) -> [UInt8]? {
        guard let a = self[type] else { return nil }
        guard a.payload.count >= size else {
            throw NetlinkDecodeError("attribute type \(type) has \(a.payload.count) bytes; \(size) expected")
        }
        return a.payload
    }

    /// A `u8`.
    public func u8(_ type: UInt16) throws(NetlinkDecodeError) -> UInt8? {
        try fixed(type, size: 1)?[0]
    }

    /// A host-order `u16`.
    public func u16(_ type: UInt16) throws(NetlinkDecodeError) -> UInt16? {
        try fixed(type, size: 2)?.readHost(UInt16.self, at: 0)
    }

    /// A host-order `u32`.
    public func u32(_ type: UInt16) throws(NetlinkDecodeError) -> UInt32? {
        try fixed(type, size: 4)?.readHost(UInt32.self, at: 0)
    }

    /// A host-order `u64`.
    public func u64(_ type: UInt16) throws(NetlinkDecodeError) -> UInt64? {
        try fixed(type, size: 8)?.readHost(UInt64.self, at: 0)
    }

    /// A `__be16`.
    public func be16(_ type: UInt16) throws(NetlinkDecodeError) -> UInt16? {
        try fixed(type, size: 2)?.readBigEndian(UInt16.self, at: 0)
    }

    /// A `__be32`.
    public func be32(_ type: UInt16) throws(NetlinkDecodeError) -> UInt32? {
        try fixed(type, size: 4)?.readBigEndian(UInt32.self, at: 0)
    }

    /// A string, up to the first NUL (or the whole payload when there is none), decoded as
    /// UTF-8 with invalid bytes replaced.
    public func string(_ type: UInt16) throws(NetlinkDecodeError) -> String? {
        guard let a = self[type] else { return nil }
        return String(decoding: a.payload.prefix { $0 != 0 }, as: UTF8.self)
    }

    /// The raw payload.
    public func bytes(_ type: UInt16) -> [UInt8]? { self[type]?.payload }

    /// The attributes nested in `type`.
    public func nested(_ type: UInt16) throws(NetlinkDecodeError) -> NetlinkAttributes? {
        guard let a = self[type] else { return nil }
        return try NetlinkAttributes(parsing: a.payload)
    }
}
