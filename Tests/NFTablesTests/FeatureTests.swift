// One test per Service feature: the chains, rules and elements the nftables compiler writes.

import NFTables
import SluiceCore
import SluiceTesting
import Testing

private func compile(_ ports: [(ServicePortInfo, [EndpointInfo])], options: NFTablesOptions = KubeProxyFake.options()) -> NFTRuleset {
    NFTablesCompiler(options: options).compile(makeState(ports, family: options.family))
}

private func chain(_ rs: NFTRuleset, _ name: String) -> [String]? {
    for f in rs.services.values { for c in f.chains where c.name == name { return c.rules } }
    return nil
}

private func element(_ rs: NFTRuleset, _ container: String, _ key: String) -> NFTElement? {
    rs.elements.first { $0.id == NFTElementKey(container: container, key: key) }
}

private let s1 = spn("ns1", "svc1")
private let base1 = "ULMVA6XW-ns1/svc1/tcp/p80"

@Suite struct NFTablesFeatureTests {
    @Test func clusterIP() {
        let rs = compile([(svc(s1, "172.30.0.41"), [ep("10.180.0.1"), ep("10.180.0.2")])])
        #expect(chain(rs, "service-\(base1)") == [
            "ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 , 1 : goto endpoint-\(NFTChainNames.endpointBase(s1, ip: IPAddress("10.180.0.2")!, port: 80)) }",
        ])
        #expect(element(rs, "cluster-ips", "172.30.0.41") != nil)
        #expect(element(rs, "service-ips", "172.30.0.41 . tcp . 80")?.value == "goto service-\(base1)")
        #expect(rs.services[s1]!.chains.map(\.name).filter { $0.hasPrefix("external-") }.isEmpty)
    }

    @Test func nodePort() {
        let rs = compile([(svc(s1, "172.30.0.41", nodePort: 3001), [ep("10.180.0.1")])])
        #expect(element(rs, "service-nodeports", "tcp . 3001")?.value == "goto external-\(base1)")
        #expect(chain(rs, "external-\(base1)") == ["jump mark-for-masquerade", "goto service-\(base1)"])
        #expect(rs.fixed.nodePortIPs == ["192.168.0.2"])
    }

    /// nftables mode has no localhost NodePorts: loopback never enters nodeport-ips, and the
    /// match-all form excludes 127.0.0.0/8 (::1).
    @Test func noLocalhostNodePorts() {
        let lo = compile([], options: KubeProxyFake.options(nodePortAddresses: .cidrs([CIDR("127.0.0.0/8")!, CIDR("192.168.0.0/16")!])))
        #expect(lo.fixed.nodePortIPs == ["192.168.0.2", "192.168.1.2", "192.168.99.11"])
        let all = compile([], options: KubeProxyFake.options(nodePortAddresses: .cidrs([CIDR("0.0.0.0/0")!])))
        #expect(all.fixed.nodePortIPs == nil)
        let services = all.fixed.chains.first { $0.name == "services" }!.rules
        #expect(services.last == "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports")
        let check = all.fixed.chains.first { $0.name == "nodeport-endpoints-check" }!.rules
        #expect(check == ["ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"])
        let tx = all.fullTransaction().commands
        #expect(tx.contains("delete set ip kube-proxy nodeport-ips"))
        #expect(!tx.contains { $0.hasPrefix("add element ip kube-proxy nodeport-ips") })
    }

    @Test func nodePortAddressesDefaultToPrimary() {
        let npa = NFTablesOptions.defaultNodePortAddresses(nodeIPs: [IPAddress("192.168.0.2")!, IPAddress("2001:db8::1")!])
        var o = KubeProxyFake.options()
        o.node.nodePortAddresses = npa
        #expect(compile([], options: o).fixed.nodePortIPs == ["192.168.0.2"])
        o.family = .ipv6
        #expect(compile([], options: o).fixed.nodePortIPs == ["2001:db8::1"])
    }

    @Test func loadBalancerSourceRanges() {
        let rs = compile([(svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4", "5.6.7.8"],
                               sourceRanges: ["192.168.0.0/24", " 203.0.113.0/25"]), [ep("10.180.0.1")])])
        // The node IP is inside a source range: the LB IPs are allowed too.
        #expect(chain(rs, "firewall-\(base1)") == ["ip saddr != { 192.168.0.0/24 , 203.0.113.0/25 , 1.2.3.4 , 5.6.7.8 } drop"])
        #expect(element(rs, "firewall-ips", "1.2.3.4 . tcp . 80")?.value == "goto firewall-\(base1)")
        #expect(element(rs, "firewall-ips", "5.6.7.8 . tcp . 80") != nil)
        #expect(element(rs, "service-ips", "5.6.7.8 . tcp . 80")?.value == "goto external-\(base1)")
        // NodePorts are not subject to source ranges.
        #expect(element(rs, "service-nodeports", "tcp . 3001")?.value == "goto external-\(base1)")
        let other = compile([(svc(s1, "172.30.0.41", lb: ["1.2.3.4"], sourceRanges: ["203.0.113.0/25"]), [ep("10.180.0.1")])])
        #expect(chain(other, "firewall-\(base1)") == ["ip saddr != { 203.0.113.0/25 } drop"])
    }

    @Test func externalIPs() {
        let rs = compile([(svc(s1, "172.30.0.41", externalIPs: ["192.168.99.11"]), [ep("10.180.0.1")])])
        #expect(element(rs, "service-ips", "192.168.99.11 . tcp . 80")?.value == "goto external-\(base1)")
        #expect(chain(rs, "external-\(base1)") != nil)
    }

    @Test func sessionAffinity() {
        let rs = compile([(svc(s1, "172.30.0.41", affinity: 300), [ep("10.180.0.1")])])
        let b = "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        #expect(rs.services[s1]!.affinitySets == [NFTContainer(kind: .set, name: "affinity-\(b)", type: "ipv4_addr",
                                                               flags: ["dynamic", "timeout"], timeoutSeconds: 300)])
        #expect(chain(rs, "service-\(base1)")?[1] == "ip saddr @affinity-\(b) goto endpoint-\(b)")
        #expect(chain(rs, "endpoint-\(b)") == [
            "ip saddr 10.180.0.1 jump mark-for-masquerade",
            "update @affinity-\(b) { ip saddr }",
            "meta l4proto tcp dnat to 10.180.0.1:80",
        ])
        #expect(rs.fullTransaction().commands.contains(
            "add set ip kube-proxy affinity-\(b) { type ipv4_addr ; flags dynamic,timeout ; timeout 300s ; }"))
    }

    @Test func externalTrafficPolicyLocal() {
        let remote = ep("10.180.0.1"), local = ep("10.180.2.1", local: true)
        let rs = compile([(svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4"], eTPLocal: true), [remote, local])])
        let lb = NFTChainNames.endpointBase(s1, ip: local.ip, port: 80)
        #expect(chain(rs, "external-\(base1)") == [
            "ip saddr 10.0.0.0/8 goto service-\(base1) comment \"short-circuit pod traffic\"",
            "fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"",
            "fib saddr type local goto service-\(base1) comment \"short-circuit local traffic\"",
            "goto local-\(base1)",
        ])
        #expect(chain(rs, "local-\(base1)") == ["numgen random mod 1 vmap { 0 : goto endpoint-\(lb) }"])
        #expect(element(rs, "no-endpoint-nodeports", "tcp . 3001") == nil)

        // No local endpoint: external traffic is dropped; pod and node traffic short-circuits.
        let none = compile([(svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4"], eTPLocal: true), [remote])])
        #expect(chain(none, "external-\(base1)")?.count == 3)
        #expect(chain(none, "local-\(base1)") == nil)
        #expect(element(none, "no-endpoint-nodeports", "tcp . 3001") == NFTElement("no-endpoint-nodeports", key: "tcp . 3001", comment: "ns1/svc1:p80", value: "drop"))
        #expect(element(none, "no-endpoint-services", "1.2.3.4 . tcp . 80")?.value == "drop")
        #expect(none.noLocalEndpoints == [.internal: 0, .external: 1])
    }

    @Test func internalTrafficPolicyLocal() {
        let rs = compile([(svc(s1, "172.30.0.41", iTPLocal: true), [ep("10.180.0.1")])])
        #expect(element(rs, "no-endpoint-services", "172.30.0.41 . tcp . 80")?.value == "drop")
        #expect(element(rs, "service-ips", "172.30.0.41 . tcp . 80") == nil)
        #expect(rs.noLocalEndpoints[.internal] == 1)
        let local = compile([(svc(s1, "172.30.0.41", iTPLocal: true), [ep("10.180.0.1", local: true)])])
        #expect(element(local, "service-ips", "172.30.0.41 . tcp . 80")?.value == "goto local-\(base1)")
        #expect(chain(local, "local-\(base1)")?.first == "ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade")
    }

    /// Terminating endpoints serve when no ready one is left (cluster and local sets).
    @Test func terminatingFallback() {
        let t = ep("10.180.0.7", local: true, ready: false, serving: true, terminating: true)
        let rs = compile([(svc(s1, "172.30.0.41", nodePort: 3001, eTPLocal: true), [ep("10.180.0.1"), t])])
        let tb = NFTChainNames.endpointBase(s1, ip: t.ip, port: 80)
        #expect(chain(rs, "local-\(base1)") == ["numgen random mod 1 vmap { 0 : goto endpoint-\(tb) }"])
        #expect(chain(rs, "endpoint-\(tb)") != nil)
        let only = compile([(svc(s1, "172.30.0.41"), [t, ep("10.180.0.8", ready: false, serving: false, terminating: true)])])
        #expect(chain(only, "service-\(base1)")?.last == "numgen random mod 1 vmap { 0 : goto endpoint-\(tb) }")
    }

    @Test func rejectWithoutEndpoints() {
        let rs = compile([(svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4"], externalIPs: ["192.168.99.11"]), [])])
        #expect(rs.services[s1]!.chains.isEmpty)
        for key in ["172.30.0.41 . tcp . 80", "192.168.99.11 . tcp . 80", "1.2.3.4 . tcp . 80"] {
            #expect(element(rs, "no-endpoint-services", key) == NFTElement("no-endpoint-services", key: key, comment: "ns1/svc1:p80", value: "goto reject-chain"))
        }
        #expect(element(rs, "no-endpoint-nodeports", "tcp . 3001")?.value == "goto reject-chain")
        #expect(element(rs, "cluster-ips", "172.30.0.41") != nil)
    }

    @Test func masqueradeAllAndNoDetector() {
        let all = compile([(svc(s1, "172.30.0.41"), [ep("10.180.0.1")])], options: KubeProxyFake.options(masqueradeAll: true))
        #expect(chain(all, "service-\(base1)")?.first == "ip daddr 172.30.0.41 jump mark-for-masquerade")
        let none = compile([(svc(s1, "172.30.0.41", nodePort: 3001, eTPLocal: true), [ep("10.180.0.1", local: true)])],
                           options: KubeProxyFake.options(detector: false))
        #expect(chain(none, "service-\(base1)")?.count == 1)
        #expect(chain(none, "external-\(base1)")?.first == "fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"")
    }

    @Test func clusterIPsCheckWithServiceCIDRs() {
        var o = KubeProxyFake.options()
        o.serviceCIDRs = [CIDR("172.30.0.0/16")!, CIDR("172.50.0.0/16")!, CIDR("fd00:10:96::/112")!]
        let rules = compile([], options: o).fixed.chains.first { $0.name == "cluster-ips-check" }!.rules
        #expect(rules == [
            "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
            "ip daddr { 172.30.0.0/16,172.50.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
        ])
        o.serviceCIDRs = []
        #expect(compile([], options: o).fixed.chains.first { $0.name == "cluster-ips-check" }!.rules.count == 1)
    }

    @Test func ipv6Table() throws {
        let o = KubeProxyFake.options(.ipv6)
        let s = spn("ns1", "svc1")
        let e = ep("fd00:10:180::1")
        let rs = compile([(svc(s, "fd00:172:30::41", nodePort: 3001), [e])], options: o)
        let eb = NFTChainNames.endpointBase(s, ip: e.ip, port: 80)
        #expect(eb.hasSuffix("__fd00.10.180..1/80"))
        #expect(chain(rs, "service-\(base1)")?.first == "ip6 daddr fd00:172:30::41 ip6 saddr != fd00:10::/64 jump mark-for-masquerade")
        #expect(chain(rs, "endpoint-\(eb)") == ["ip6 saddr fd00:10:180::1 jump mark-for-masquerade", "meta l4proto tcp dnat to [fd00:10:180::1]:80"])
        #expect(rs.fixed.nodePortIPs == ["2001:db8::1"])
        let tx = rs.fullTransaction()
        #expect(tx.commands.allSatisfy { $0.contains(" ip6 kube-proxy") })
        #expect(tx.commands.contains("add set ip6 kube-proxy cluster-ips { type ipv6_addr ; comment \"Active ClusterIPs\" ; }"))
        #expect(tx.commands.contains("add rule ip6 kube-proxy cluster-ips-check ip6 daddr { fd00:10:96::/112 } drop comment \"Drop traffic to unallocated ClusterIPs\""))
        var m = NFTModel(family: "ip6")
        try m.apply(tx.text)
        #expect(m.containers["service-ips"]?.values["fd00:172:30::41 . tcp . 80"] == "goto service-\(base1)")
    }

    @Test func sctpAndUDP() {
        let sctp = spn("ns1", "svc1", "dns-sctp", .sctp), udp = spn("ns1", "svc1", "dns-udp", .udp)
        let rs = compile([(svc(sctp, "172.30.0.42", port: 53), [ep("10.180.0.1", 53)]),
                          (svc(udp, "172.30.0.42", port: 53, nodePort: 3053), [ep("10.180.0.1", 53)])])
        let sb = NFTChainNames.servicePortBase(sctp)
        #expect(sb.hasSuffix("-ns1/svc1/sctp/dns-sctp"))
        #expect(element(rs, "service-ips", "172.30.0.42 . sctp . 53")?.value == "goto service-\(sb)")
        #expect(element(rs, "service-nodeports", "udp . 3053") != nil)
        let eb = NFTChainNames.endpointBase(sctp, ip: IPAddress("10.180.0.1")!, port: 53)
        #expect(chain(rs, "endpoint-\(eb)")?.last == "meta l4proto sctp dnat to 10.180.0.1:53")
        // The two ports share one ClusterIP element.
        #expect(rs.elements.filter { $0.id.container == "cluster-ips" }.count == 1)
    }

    /// Names are DNS labels by the time they reach the compiler (the model rejects the rest);
    /// the comment quoting escapes what could end a string anyway.
    @Test func hostileNamesNeverReachRuleText() throws {
        let yaml = """
            apiVersion: v1
            kind: Service
            metadata: {name: "evil\\" ; flush ruleset ; \\"", namespace: default}
            spec:
              clusterIP: 172.30.0.99
              ports: [{name: "p\\"80", port: 80}]
            """
        let (tracker, rejections) = try Fixtures.tracker(yaml)
        _ = tracker
        #expect(!rejections.isEmpty)
        let state = try Fixtures.state(yaml)
        #expect(state.servicePorts.isEmpty)
        #expect(nftQuoted("a\"b\\c;\n") == "\"a\\\"b\\\\c;\\x0a\"")
        let rs = compile([])
        #expect(!rs.fullTransaction().text.contains("flush ruleset"))
    }

    /// Health-check node ports are served by the health server, not by nftables.
    @Test func healthCheckNodePortIsNotInTheTable() {
        let rs = compile([(svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4"], eTPLocal: true, healthCheckNodePort: 30000),
                           [ep("10.180.0.1", local: true)])])
        #expect(!rs.fullTransaction().text.contains("30000"))
    }
}
