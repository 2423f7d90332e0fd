// Sluice: a per-node Kubernetes service proxy.
// kube-proxy's nftables chain names: `service-HASH8-ns/name/proto/port` and
// `endpoint-HASH8-ns/name/proto/port__ip/port`, hashed and truncated as upstream does.

import ChainHashing
import SluiceCore

/// Chain and set names of kube-proxy's nftables mode.
public enum NFTChainNames {
    /// knftables' name limit (256) less the longest prefix kube-proxy puts in front (16).
    public static let baseLengthMax = 240

    /// `HASH8-name`: the first 8 characters of base32(sha256(`name`)), a dash, and `name`; cut
    /// to 237 characters plus `...` when longer than 240 (only endpoint names can be).
    public static func hashAndTruncate(_ name: String) -> String {
        let full = String(ChainHash.hash16(name).prefix(8)) + "-" + name
        let bytes = Array(full.utf8)
        guard bytes.count > baseLengthMax else { return full }
        return String(decoding: bytes.prefix(baseLengthMax - 3), as: UTF8.self) + "..."
    }

    /// The base of a service port's chains: `HASH8-ns/name/proto/portName`.
    public static func servicePortBase(_ name: ServicePortName) -> String {
        hashAndTruncate("\(name.service.namespace)/\(name.service.name)/\(name.proto.lowercased)/\(name.port)")
    }

    /// The base of an endpoint's chain and affinity set: `HASH8-ns/name/proto/portName__ip/port`,
    /// IPv6 colons replaced by dots.
    public static func endpointBase(_ name: ServicePortName, ip: IPAddress, port: Int) -> String {
        endpointBase(name, ipText: ip.description, port: port)
    }

    /// The same from the address text as written (kube-proxy hashes the endpoint string it
    /// holds; the model's addresses are canonical, so both give the same name in practice).
    public static func endpointBase(_ name: ServicePortName, ipText: String, port: Int) -> String {
        let ip = ipText.replacingColons()
        return hashAndTruncate("\(name.service.namespace)/\(name.service.name)/\(name.proto.lowercased)/\(name.port)__\(ip)/\(port)")
    }

    /// The 8 hash characters of an endpoint's names.
    static func endpointHash(portPath: String, ipText: String, port: Int) -> String {
        String(ChainHash.hash16("\(portPath)__\(ipText.replacingColons())/\(port)").prefix(8))
    }

    /// Per-service chains contain a `/`; no fixed chain does (kube-proxy's `isServiceChainName`).
    public static func isServiceChain(_ name: String) -> Bool { name.utf8.contains(UInt8(ascii: "/")) }

    /// Affinity sets start with `affinity-` (kube-proxy's `isAffinitySetName`).
    public static func isAffinitySet(_ name: String) -> Bool { name.hasPrefix("affinity-") }
}

extension String {
    fileprivate func replacingColons() -> String {
        String(decoding: utf8.map { $0 == UInt8(ascii: ":") ? UInt8(ascii: ".") : $0 }, as: UTF8.self)
    }
}
