// The desired nftables ruleset for one address family (kube-proxy's nftables layout).
// The compiler that fills it lives in Compiler.swift.

/// The address family of one `kube-proxy` table: `ip` (IPv4) or `ip6` (IPv6).
public enum NFTFamily: String, Sendable, Hashable, CaseIterable {
    case ip
    case ip6
}
