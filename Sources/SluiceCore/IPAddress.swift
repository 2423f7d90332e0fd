// Sluice: a per-node Kubernetes service proxy.
// IP addresses and CIDR blocks, parsed strictly (as the API server validates them).

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The IP family of an address, a Service or a proxier.
public enum IPFamily: String, Sendable, Hashable, CaseIterable, Codable {
    /// IPv4 (`AF_INET`).
    case ipv4 = "IPv4"
    /// IPv6 (`AF_INET6`).
    case ipv6 = "IPv6"
}

/// An IPv4 or IPv6 address.
///
/// Parsing is strict: IPv4 must be four decimal octets without leading zeros, IPv6 must be
/// accepted by `inet_pton`. The description is the canonical text form (RFC 5952 for IPv6),
/// which is what kube-proxy writes into rules and hashes into chain names.
public enum IPAddress: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// An IPv4 address in host byte order.
    case v4(UInt32)
    /// An IPv6 address as 16 bytes, network order.
    case v6(UInt64, UInt64)

    /// Parses an address; returns nil when `text` is not exactly one valid address.
    public init?(_ text: String) {
        if let v4 = IPAddress.parseV4(text) {
            self = .v4(v4)
            return
        }
        guard text.contains(":"), !text.contains("%"), text.utf8.count <= 45 else { return nil }
        var storage = in6_addr()
        let rc = text.withCString { inet_pton(AF_INET6, $0, &storage) }
        guard rc == 1 else { return nil }
        let bytes = withUnsafeBytes(of: &storage) { Array($0) }
        var hi: UInt64 = 0
        var lo: UInt64 = 0
        for i in 0..<8 { hi = hi << 8 | UInt64(bytes[i]) }
        for i in 8..<16 { lo = lo << 8 | UInt64(bytes[i]) }
        self = .v6(hi, lo)
    }

    private static func parseV4(_ text: String) -> UInt32? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
            if part.count > 1 && part.first == "0" { return nil }
            guard let octet = UInt32(part), octet <= 255 else { return nil }
            value = value << 8 | octet
        }
        return value
    }

    /// The address family.
    public var family: IPFamily {
        switch self {
        case .v4: return .ipv4
        case .v6: return .ipv6
        }
    }

    /// The address bytes in network order (4 or 16 bytes).
    public var bytes: [UInt8] {
        switch self {
        case .v4(let v):
            return [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)]
        case .v6(let hi, let lo):
            return (0..<8).map { UInt8(hi >> (56 - 8 * UInt64($0)) & 0xff) }
                + (0..<8).map { UInt8(lo >> (56 - 8 * UInt64($0)) & 0xff) }
        }
    }

    /// The canonical text form.
    public var description: String {
        switch self {
        case .v4(let v):
            return "\(v >> 24).\(v >> 16 & 0xff).\(v >> 8 & 0xff).\(v & 0xff)"
        case .v6:
            var storage = in6_addr()
            let b = bytes
            withUnsafeMutableBytes(of: &storage) { raw in
                for i in 0..<16 { raw[i] = b[i] }
            }
            var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            _ = inet_ntop(AF_INET6, &storage, &buffer, socklen_t(buffer.count))
            return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    /// `ip:port`, with brackets around IPv6 addresses (Go's `net.JoinHostPort`).
    public func joined(port: Int) -> String {
        switch self {
        case .v4: return "\(self):\(port)"
        case .v6: return "[\(self)]:\(port)"
        }
    }

    /// True for 127.0.0.0/8 and ::1.
    public var isLoopback: Bool {
        switch self {
        case .v4(let v): return v >> 24 == 127
        case .v6(let hi, let lo): return hi == 0 && lo == 1
        }
    }

    /// True for the unspecified address (0.0.0.0 or ::).
    public var isUnspecified: Bool {
        switch self {
        case .v4(let v): return v == 0
        case .v6(let hi, let lo): return hi == 0 && lo == 0
        }
    }

    /// True for link-local unicast (169.254.0.0/16, fe80::/10).
    public var isLinkLocalUnicast: Bool {
        switch self {
        case .v4(let v): return v >> 16 == 0xA9FE
        case .v6(let hi, _): return hi >> 54 == 0x3FA
        }
    }

    /// True for link-local multicast (224.0.0.0/24, ff02::/16).
    public var isLinkLocalMulticast: Bool {
        switch self {
        case .v4(let v): return v >> 8 == 0xE00000
        case .v6(let hi, _): return hi >> 48 == 0xFF02
        }
    }

    public static func < (lhs: IPAddress, rhs: IPAddress) -> Bool {
        switch (lhs, rhs) {
        case (.v4(let a), .v4(let b)): return a < b
        case (.v4, .v6): return true
        case (.v6, .v4): return false
        case (.v6(let ah, let al), .v6(let bh, let bl)): return (ah, al) < (bh, bl)
        }
    }
}

/// A CIDR block such as `10.0.0.0/8` or `fd00::/64`.
public struct CIDR: Sendable, Hashable, CustomStringConvertible {
    /// The network address (host bits cleared).
    public let address: IPAddress
    /// The prefix length.
    public let prefixLength: Int

    /// Parses `a.b.c.d/n` or `x::/n`. Host bits are tolerated and cleared, as Go's
    /// `net.ParseCIDR` does; surrounding white space is trimmed (kube-proxy tolerates it
    /// in `loadBalancerSourceRanges`).
    public init?(_ text: String) {
        let trimmed = text.trimmingASCIIWhitespace()
        let parts = trimmed.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let ip = IPAddress(String(parts[0])),
            parts[1].allSatisfy({ $0.isASCII && $0.isNumber }), !parts[1].isEmpty, parts[1].count <= 3,
            let bits = Int(parts[1])
        else { return nil }
        let maxBits = ip.family == .ipv4 ? 32 : 128
        guard bits <= maxBits else { return nil }
        self.prefixLength = bits
        self.address = CIDR.mask(ip, bits)
    }

    /// A CIDR holding exactly one address (/32 or /128).
    public init(host: IPAddress) {
        self.address = host
        self.prefixLength = host.family == .ipv4 ? 32 : 128
    }

    private static func mask(_ ip: IPAddress, _ bits: Int) -> IPAddress {
        switch ip {
        case .v4(let v):
            let m: UInt32 = bits == 0 ? 0 : ~UInt32(0) << UInt32(32 - bits)
            return .v4(v & m)
        case .v6(let hi, let lo):
            let mhi: UInt64 = bits >= 64 ? ~0 : (bits == 0 ? 0 : ~UInt64(0) << UInt64(64 - bits))
            let mlo: UInt64 = bits <= 64 ? 0 : (bits == 128 ? ~0 : ~UInt64(0) << UInt64(128 - bits))
            return .v6(hi & mhi, lo & mlo)
        }
    }

    /// The family of the block.
    public var family: IPFamily { address.family }

    /// True when `ip` lies inside the block.
    public func contains(_ ip: IPAddress) -> Bool {
        guard ip.family == family else { return false }
        return CIDR.mask(ip, prefixLength) == address
    }

    /// `address/prefix`.
    public var description: String { "\(address)/\(prefixLength)" }
}

extension String {
    /// The string without leading and trailing ASCII white space.
    public func trimmingASCIIWhitespace() -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let start = firstIndex(where: { !isSpace($0) }) else { return "" }
        let end = lastIndex(where: { !isSpace($0) })!
        return String(self[start...end])
    }
}
