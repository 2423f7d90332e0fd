// Golden tests: kube-proxy's own nftables expectations (pkg/proxy/nftables/proxier_test.go,
// v1.34), compared after the sort kube-proxy's test applies.

import Foundation
import NFTables
import SluiceCore
import SluiceTesting
import Testing

private func fixture(_ name: String) throws -> String {
    try Fixtures.read("Fixtures/\(name)", beside: #filePath)
}

@Suite struct KubeProxyNFTablesGoldenTests {
    /// TestOverallNFTablesRules: the table a full sync leaves equals kube-proxy's.
    @Test func overallRulesMatchKubeProxy() throws {
        let yaml = try fixture("kube-proxy-overall/services.yaml") + "\n---\n" + fixture("kube-proxy-overall/endpointslices.yaml")
        let state = try Fixtures.state(yaml)
        let model = try fullModel(state, options: KubeProxyFake.options())
        let got = sortNFT(fakeMark(model.dump()))
        let want = sortNFT(try fixture("kube-proxy-overall/expected.nft"))
        #expect(got == want)
        if let d = firstDifference(got, want) { Issue.record("first difference at \(d)") }
    }

    /// The transaction text itself, sorted, holds the same objects (plus the flushes).
    @Test func fullTransactionDeclaresWhatTheDumpHolds() throws {
        let yaml = try fixture("kube-proxy-overall/services.yaml") + "\n---\n" + fixture("kube-proxy-overall/endpointslices.yaml")
        let state = try Fixtures.state(yaml)
        let tx = NFTablesCompiler(options: KubeProxyFake.options()).compile(state).fullTransaction()
        let adds = tx.commands.filter { $0.hasPrefix("add ") }.joined(separator: "\n")
        let want = sortNFT(try fixture("kube-proxy-overall/expected.nft"))
        #expect(sortNFT(fakeMark(adds)) == want)
        #expect(tx.commands.first == "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }")
        #expect(tx.commands.contains("flush chain ip kube-proxy services"))
        #expect(tx.commands.contains("flush map ip kube-proxy service-ips"))
    }

    @Test func productionMarkIsGoHashFormatted() throws {
        let rs = NFTablesCompiler(options: KubeProxyFake.options()).compile(ProxyState())
        let text = rs.fullTransaction().text
        #expect(text.contains("add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000\n"))
        #expect(text.contains("add rule ip kube-proxy masquerading mark and 0x00004000 == 0 return\n"))
        #expect(!text.contains(" 0x4000"))
    }

    @Test func emissionIsDeterministic() throws {
        let yaml = try fixture("kube-proxy-overall/services.yaml") + "\n---\n" + fixture("kube-proxy-overall/endpointslices.yaml")
        let a = NFTablesCompiler(options: KubeProxyFake.options()).compile(try Fixtures.state(yaml)).fullTransaction().text
        let reversed = yaml.components(separatedBy: "\n---\n").reversed().joined(separator: "\n---\n")
        let b = NFTablesCompiler(options: KubeProxyFake.options()).compile(try Fixtures.state(reversed)).fullTransaction().text
        #expect(a == b)
    }
}

/// Test_servicePortChainNameBase and Test_servicePortEndpointChainNameBase.
@Suite struct NFTChainNameTests {
    static let longNS = "very-long-namespace-name-abcdefghijklmnopqrstuvwxyz0123456789xx"
    static let longName = "very-long-service-name-why-would-you-even-do-this-i-mean-really"
    static let longPort = "port-443-providing-the-hypertext-transmission-protocol-with-tls"

    @Test func servicePortBases() {
        #expect(NFTChainNames.servicePortBase(spn("testing", "service", "http")) == "P4ZYZVCF-testing/service/tcp/http")
        #expect(NFTChainNames.servicePortBase(spn("testing", "service", "https")) == "LZBRENCP-testing/service/tcp/https")
        #expect(NFTChainNames.servicePortBase(spn(Self.longNS, Self.longName, Self.longPort, .sctp))
            == "KR6NACJP-\(Self.longNS)/\(Self.longName)/sctp/\(Self.longPort)")
    }

    @Test func endpointBases() {
        let s = spn("testing", "service", "http")
        #expect(NFTChainNames.endpointBase(s, ip: IPAddress("10.180.0.1")!, port: 80) == "JO2XBXZR-testing/service/tcp/http__10.180.0.1/80")
        #expect(NFTChainNames.endpointBase(s, ip: IPAddress("10.180.0.2")!, port: 80) == "5S6H3H22-testing/service/tcp/http__10.180.0.2/80")
        // Upstream feeds these as strings, some not in canonical form (`12::a1b2` for one zero group).
        #expect(NFTChainNames.endpointBase(s, ipText: "fd80:abcd:12::a1b2:c3d4:e5f6:9999", port: 80)
            == "U7E2ET36-testing/service/tcp/http__fd80.abcd.12..a1b2.c3d4.e5f6.9999/80")
        let long = spn(Self.longNS, Self.longName, Self.longPort, .sctp)
        let prefix = "\(Self.longNS)/\(Self.longName)/sctp/\(Self.longPort)"
        #expect(NFTChainNames.endpointBase(long, ipText: "1234:5678:9abc:def0::abc:1234", port: 443)
            == "5YS7AFEA-\(prefix)__1234.5678.9abc.def0..abc.1234/443")
        let t1 = NFTChainNames.endpointBase(long, ipText: "1234:5678:9abc:def0::abcd:1234:5678", port: 443)
        #expect(t1 == "CI6C53Q3-\(prefix)__1234.5678.9abc.def0..abcd.1234...")
        #expect(t1.utf8.count == 240)
        #expect(NFTChainNames.endpointBase(long, ipText: "1234:5678:9abc:def0::abcd:1234:8765", port: 443)
            == "2FLXFK6X-\(prefix)__1234.5678.9abc.def0..abcd.1234...")
    }

    /// The model's canonical text is Go's: one zero group is not shortened to `::`.
    @Test func canonicalIPv6Text() {
        let s = spn("testing", "service", "http")
        #expect(NFTChainNames.endpointBase(s, ip: IPAddress("fd80:abcd:12:0:a1b2:c3d4:e5f6:9999")!, port: 80)
            == NFTChainNames.endpointBase(s, ipText: "fd80:abcd:12:0:a1b2:c3d4:e5f6:9999", port: 80))
        #expect(NFTChainNames.endpointBase(s, ip: IPAddress("fd00:10:180::1")!, port: 80).hasSuffix("__fd00.10.180..1/80"))
    }

    @Test func overallNamesReproduce() {
        #expect(NFTChainNames.servicePortBase(spn("ns1", "svc1")) == "ULMVA6XW-ns1/svc1/tcp/p80")
        #expect(NFTChainNames.endpointBase(spn("ns5", "svc5"), ip: IPAddress("10.180.0.3")!, port: 80)
            == "GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80")
        #expect(NFTChainNames.isServiceChain("service-ULMVA6XW-ns1/svc1/tcp/p80"))
        #expect(!NFTChainNames.isServiceChain("mark-for-masquerade"))
    }
}
