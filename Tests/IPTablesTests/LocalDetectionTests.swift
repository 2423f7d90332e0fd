// --detect-local-mode BridgeInterface and InterfaceNamePrefix: kube-proxy's interface
// matches (`-i cbr0` / `! -i cbr0`, `-i veth+` / `! -i veth+`) take the place of the cluster
// CIDR's `-s` / `! -s` in the same rules; and the --iptables-backend auto decision.

import IPTables
import KernelKit
import SluiceCore
import SluiceTesting
import Testing

@Suite struct LocalDetectionTests {
    private func options(_ match: LocalInterfaceMatch?) -> IPTablesOptions {
        var o = Fixtures.kubeProxyTestOptions
        o.node.localInterface = match
        return o
    }

    private let lb = serviceYAML(type: "NodePort", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30080}]",
                                 spec: "externalTrafficPolicy: Local")
    private let eps = sliceYAML(endpoints: "[{addresses: [10.180.0.1], nodeName: test-node}, {addresses: [10.180.0.2], nodeName: other}]")

    @Test(arguments: [(LocalInterfaceMatch.bridge("cbr0"), "cbr0"), (.namePrefix("veth"), "veth+")])
    func interfaceMatchesReplaceTheCIDR(match: LocalInterfaceMatch, name: String) throws {
        let (d, _) = try compileDump([lb, eps], options: options(match))
        #expect(d.rules("nat", svc1).first == "-A \(svc1) -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -i \(name) -j KUBE-MARK-MASQ")
        #expect(d.rules("nat", ext1).first == "-A \(ext1) -m comment --comment \"pod traffic for ns1/svc1:p80 external destinations\" -i \(name) -j \(svc1)")
        let all = d.rules("nat", svc1) + d.rules("nat", ext1)
        #expect(!all.contains { $0.contains("-s 10.0.0.0/8") }, "the cluster CIDR is not used: \(all)")
    }

    @Test func withoutAnInterfaceTheClusterCIDRIsUsed() throws {
        let (d, _) = try compileDump([lb, eps], options: options(nil))
        #expect(d.rules("nat", svc1).first?.hasSuffix("--dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ") == true)
        #expect(d.rules("nat", ext1).first?.contains("-s 10.0.0.0/8 -j \(svc1)") == true)
    }
}

@Suite struct NFAcctRuleTests {
    private let nodePort = serviceYAML(type: "NodePort", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30080}]")
    private let eps = sliceYAML(endpoints: "[{addresses: [10.180.0.1]}]")

    @Test func withNFAcctTheLocalhostNodePortAndInvalidDropRulesCount() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.nfacctCounters = Set(NFAcctCounterName.all)
        let (d, _) = try compileDump([nodePort, eps], options: o)
        #expect(d.rules("nat", "KUBE-NODEPORTS") == [
            "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 30080 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j \(ext1)",
            "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 30080 -j \(ext1)",
        ])
        #expect(d.rules("filter", "KUBE-FORWARD").first == "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP")
    }

    @Test func withoutNFAcctOrLocalhostNodePortsTheRulesAreKubeProxysPlainOnes() throws {
        let (plain, _) = try compileDump([nodePort, eps])
        #expect(plain.rules("nat", "KUBE-NODEPORTS") == ["-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 30080 -j \(ext1)"])
        #expect(plain.rules("filter", "KUBE-FORWARD").first == "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
        var o = Fixtures.kubeProxyTestOptions
        o.nfacctCounters = Set(NFAcctCounterName.all)
        o.node.localhostNodePorts = false
        let (noLocalhost, _) = try compileDump([nodePort, eps], options: o)
        #expect(noLocalhost.rules("nat", "KUBE-NODEPORTS").count == 1)
    }

    @Test func onlyTheObjectsThatExistAreCountedInto() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.nfacctCounters = [NFAcctCounterName.ctStateInvalidDropped]
        let (d, _) = try compileDump([nodePort, eps], options: o)
        #expect(d.rules("nat", "KUBE-NODEPORTS") == ["-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 30080 -j \(ext1)"])
        #expect(d.rules("filter", "KUBE-FORWARD").first == "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP")
        o.nfacctCounters = [NFAcctCounterName.localhostNodePortsAccepted]
        let (l, _) = try compileDump([nodePort, eps], options: o)
        #expect(l.rules("nat", "KUBE-NODEPORTS").count == 2)
        #expect(l.rules("filter", "KUBE-FORWARD").first == "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
    }

    @Test func withBeLiberalThereIsNoInvalidDropToCount() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.nfacctCounters = Set(NFAcctCounterName.all)
        o.conntrackTCPLiberal = true
        let (d, _) = try compileDump([nodePort, eps], options: o)
        #expect(!d.rules("filter", "KUBE-FORWARD").contains { $0.contains("INVALID") })
        #expect(d.rules("nat", "KUBE-NODEPORTS").contains { $0.contains("localhost_nps_accepted_pkts") })
    }
}

@Suite struct BackendDetectionTests {
    private let hint = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
    private let canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"

    @Test func theKubeletsChainsDecide() {
        #expect(IPTablesBackendEvidence(nftMangle: hint, legacyMangle: "", nftRules: 0, legacyRules: 500).decide().variant == .nft)
        #expect(IPTablesBackendEvidence(nftMangle: "", legacyMangle: hint, nftRules: 500, legacyRules: 0).decide().variant == .legacy)
        #expect(IPTablesBackendEvidence(nftMangle: "", legacyMangle: canary, nftRules: 9, legacyRules: 1).decide().variant == .legacy)
    }

    @Test func otherwiseTheBackEndWithMoreRulesWinsATieIsNftAndNoRulesIsTheDefault() {
        #expect(IPTablesBackendEvidence(nftMangle: "", legacyMangle: "", nftRules: 3, legacyRules: 40).decide().variant == .legacy)
        #expect(IPTablesBackendEvidence(nftMangle: "", legacyMangle: "", nftRules: 40, legacyRules: 3).decide().variant == .nft)
        #expect(IPTablesBackendEvidence(nftMangle: "", legacyMangle: "", nftRules: 5, legacyRules: 5).decide().variant == .nft)
        #expect(IPTablesBackendEvidence(nftMangle: "", legacyMangle: "", nftRules: 0, legacyRules: 0).decide().variant == .auto,
                "nothing to go by: the system's default iptables")
    }

    @Test func rulesAreCountedFromSaveOutput() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A FORWARD -j DROP\n# -A comment\nCOMMIT\n"
        #expect(IPTablesBackendEvidence.ruleCount(save) == 2)
    }
}
