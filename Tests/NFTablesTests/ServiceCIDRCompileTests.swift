// The ServiceCIDR objects' ranges (carried by the snapshot) join cluster-ips-check's drop rule,
// and a change of them is a change of the fixed part: the ruleset cannot be reused, so the
// backend sends a full transaction.

import NFTables
import SluiceCore
import SluiceTesting
import Testing

@Suite struct NFTablesServiceCIDRTests {
    private func checkRules(_ rs: NFTRuleset) -> [String] {
        rs.fixed.chains.first { $0.name == "cluster-ips-check" }!.rules
    }

    /// The fake's options without their own ServiceCIDRs (kube-proxy's test sets one).
    private func options(_ family: IPFamily = .ipv4) -> NFTablesOptions {
        var o = KubeProxyFake.options(family)
        o.serviceCIDRs = []
        return o
    }

    @Test func theSnapshotsRangesJoinTheDropRuleOfTheirFamily() {
        let compiler = NFTablesCompiler(options: options())
        var state = ProxyState(family: .ipv4)
        state.serviceCIDRs = [CIDR("10.96.0.0/16")!, CIDR("10.100.0.0/24")!, CIDR("fd00:10:96::/112")!]
        #expect(checkRules(compiler.compile(state)) == [
            "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
            "ip daddr { 10.96.0.0/16,10.100.0.0/24 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
        ])
        let v6 = NFTablesCompiler(options: options(.ipv6))
        var state6 = ProxyState(family: .ipv6)
        state6.serviceCIDRs = state.serviceCIDRs
        #expect(checkRules(v6.compile(state6)).last == "ip6 daddr { fd00:10:96::/112 } drop comment \"Drop traffic to unallocated ClusterIPs\"")
        #expect(checkRules(compiler.compile(ProxyState(family: .ipv4))).count == 1)
    }

    @Test func aChangedRangeListCannotReuseThePreviousRuleset() {
        let compiler = NFTablesCompiler(options: options())
        var state = ProxyState(family: .ipv4)
        state.serviceCIDRs = [CIDR("10.96.0.0/16")!]
        var rs = compiler.compile(state)
        #expect(compiler.update(&rs, to: state, changed: []) != nil)
        state.serviceCIDRs.append(CIDR("10.100.0.0/24")!)
        #expect(compiler.update(&rs, to: state, changed: []) == nil)
    }
}
