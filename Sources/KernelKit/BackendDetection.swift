// Sluice: a per-node Kubernetes service proxy.
// `--iptables-backend auto`: which iptables back end (legacy or nft) the host already uses,
// decided as kube-proxy's image decides it (its iptables-wrapper script): the kubelet's
// KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY chain in the mangle table names the back end;
// without it, the back end holding more rules wins, nft on a tie; with no rules anywhere, the
// system's default `iptables`. A host that runs legacy iptables never gets a second rule set
// in nf_tables.

import SluiceCore

/// What the host's rule sets show, per back end.
public struct IPTablesBackendEvidence: Sendable, Hashable {
    /// `iptables-nft-save` plus `ip6tables-nft-save` output (the kubelet's chains are looked
    /// for in it; they live in the mangle table, the canary in nat and filter too).
    public var nftMangle: String
    /// The same with the legacy tools.
    public var legacyMangle: String
    /// Rules (`-A` lines) in `iptables-nft-save` and `ip6tables-nft-save`.
    public var nftRules: Int
    /// Rules in `iptables-legacy-save` and `ip6tables-legacy-save`.
    public var legacyRules: Int

    /// Creates evidence.
    public init(nftMangle: String, legacyMangle: String, nftRules: Int, legacyRules: Int) {
        self.nftMangle = nftMangle
        self.legacyMangle = legacyMangle
        self.nftRules = nftRules
        self.legacyRules = legacyRules
    }

    /// The kubelet's chains, which only exist in the back end the kubelet uses.
    static let kubeletChains = [":KUBE-IPTABLES-HINT ", ":KUBE-KUBELET-CANARY "]

    private static func hasKubeletChain(_ save: String) -> Bool {
        save.split(separator: "\n").contains { line in kubeletChains.contains { line.hasPrefix($0) } }
    }

    /// The back end to use, and why (one log line).
    public func decide() -> (variant: IPTablesVariant, reason: String) {
        if Self.hasKubeletChain(nftMangle) { return (.nft, "the kubelet's chains are in iptables-nft") }
        if Self.hasKubeletChain(legacyMangle) { return (.legacy, "the kubelet's chains are in iptables-legacy") }
        if legacyRules == 0 && nftRules == 0 {
            return (.auto, "neither back end holds rules: the system's default iptables")
        }
        if legacyRules > nftRules {
            return (.legacy, "iptables-legacy holds more rules (\(legacyRules) against \(nftRules))")
        }
        return (.nft, "iptables-nft holds as many rules or more (\(nftRules) against \(legacyRules))")
    }

    /// Counts the rules of an `iptables-save` listing.
    public static func ruleCount(_ save: String) -> Int {
        save.split(separator: "\n").filter { $0.hasPrefix("-A ") }.count
    }

    /// Reads the evidence from the host's tools: one `*-save` of every table per back end and
    /// family (the kubelet's chains and the rules both come from it). Nil when one of the two
    /// back ends is not installed (then there is nothing to choose).
    public static func read(runner: any CommandRunner) async -> IPTablesBackendEvidence? {
        func save(_ tool: String) async -> String? {
            switch await runner.run(tool, [], input: nil) {
            case .success(let r) where r.status == 0: return r.stdout
            case .success: return ""
            case .failure(let e) where e.status == nil: return nil  // not installed
            case .failure: return ""
            }
        }
        guard let nft4 = await save("iptables-nft-save"), let legacy4 = await save("iptables-legacy-save") else { return nil }
        let nft6 = await save("ip6tables-nft-save") ?? ""
        let legacy6 = await save("ip6tables-legacy-save") ?? ""
        return IPTablesBackendEvidence(nftMangle: nft4 + nft6, legacyMangle: legacy4 + legacy6,
                                       nftRules: ruleCount(nft4) + ruleCount(nft6), legacyRules: ruleCount(legacy4) + ruleCount(legacy6))
    }
}
