// Sluice: a per-node Kubernetes service proxy.
// kube-proxy's chain-name hashing: base32(sha256(s)) cut to 16 characters. Its own module so
// that only the modes that name chains by hash (iptables, nftables) link swift-crypto.

import Crypto
import SluiceCore

/// Chain-name hashing compatible with kube-proxy.
public enum ChainHash {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567".utf8)

    /// The first 16 characters of the standard base32 encoding of SHA-256(`input`).
    public static func hash16(_ input: String) -> String {
        let digest = Array(SHA256.hash(data: Array(input.utf8)))
        // 16 base32 characters encode exactly the first 10 bytes (80 bits).
        var out = [UInt8]()
        out.reserveCapacity(16)
        var buffer: UInt64 = 0
        var bits = 0
        for byte in digest.prefix(10) {
            buffer = buffer << 8 | UInt64(byte)
            bits += 8
            while bits >= 5 {
                bits -= 5
                out.append(alphabet[Int(buffer >> UInt64(bits) & 31)])
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// `servicePortName + protocol` hash: the suffix of KUBE-SVC/SVL/EXT/FW chains.
    public static func servicePort(_ name: ServicePortName) -> String {
        hash16(name.description + name.proto.lowercased)
    }

    /// `servicePortName + protocol + endpoint` hash: the suffix of a KUBE-SEP chain.
    public static func endpoint(_ name: ServicePortName, _ endpoint: String) -> String {
        hash16(name.description + name.proto.lowercased + endpoint)
    }
}
