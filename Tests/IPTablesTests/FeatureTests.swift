// Compiler feature tests: one focused case per feature of kube-proxy's iptables layout.

import ChainHashing
import IPTables
import KernelKit
import SluiceCore
import SluiceTesting
import Testing

/// A Service manifest with sensible defaults; `extra` lines are appended under `spec:`.
func serviceYAML(_ ns: String = "ns1", _ name: String = "svc1", ip: String = "172.30.0.41", type: String = "ClusterIP",
                 ports: String = "[{name: p80, port: 80, protocol: TCP}]", spec extra: String = "", status: String = "") -> String {
    """
    apiVersion: v1
    kind: Service
    metadata: {name: \(name), namespace: \(ns)}
    spec:
      type: \(type)
      clusterIP: \(ip)
      ports: \(ports)
    \(extra.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
    \(status)
    """
}

/// An EndpointSlice manifest; `endpoints` is a YAML flow list.
func sliceYAML(_ ns: String = "ns1", _ svc: String = "svc1", name: String? = nil, family: String = "IPv4",
               ports: String = "[{name: p80, port: 80, protocol: TCP}]", endpoints: String) -> String {
    """
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: \(name ?? svc + "-1"), namespace: \(ns), labels: {kubernetes.io/service-name: \(svc)}}
    addressType: \(family)
    ports: \(ports)
    endpoints: \(endpoints)
    """
}

func compileDump(_ docs: [String], options: IPTablesOptions = Fixtures.kubeProxyTestOptions) throws -> (RestoreDump, CompiledRules) {
    let state = try Fixtures.state(docs.joined(separator: "\n---\n"), nodeName: options.node.nodeName, family: options.family)
    let compiled = IPTablesCompiler(options: options).compile(state)
    return (try RestoreDump.parse(compiled.restoreText), compiled)
}

let svc1 = "KUBE-SVC-XPGD46QRK7WJZT7O"
let svl1 = "KUBE-SVL-XPGD46QRK7WJZT7O"
let ext1 = "KUBE-EXT-XPGD46QRK7WJZT7O"

@Suite struct CompilerFeatureTests {
    @Test func masqueradeAllMarksEveryClusterIPPacket() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.node.masqueradeAll = true
        let (d, _) = try compileDump([serviceYAML(), sliceYAML(endpoints: "[{addresses: [10.180.0.1]}]")], options: o)
        #expect(d.rules("nat", svc1).first == "-A \(svc1) -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ")
    }

    @Test func noLocalDetectorMeansNoOffClusterMasquerade() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.node.clusterCIDRs = []
        let (d, _) = try compileDump([serviceYAML(), sliceYAML(endpoints: "[{addresses: [10.180.0.1]}]")], options: o)
        #expect(d.rules("nat", svc1).count == 1)
        #expect(!d.rules("nat", svc1)[0].contains("KUBE-MARK-MASQ"))
    }

    @Test func nodePortAddressesWriteOneRulePerMatchingLocalAddress() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.node.nodePortAddresses = .cidrs([CIDR("192.168.0.0/16")!, CIDR("127.0.0.0/8")!])
        let (d, _) = try compileDump([serviceYAML()], options: o)
        let last = d.rules("nat", "KUBE-SERVICES").suffix(4)
        #expect(Array(last) == [
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 127.0.0.1 -j KUBE-NODEPORTS",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 192.168.0.2 -j KUBE-NODEPORTS",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 192.168.1.2 -j KUBE-NODEPORTS",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 192.168.99.11 -j KUBE-NODEPORTS",
        ])
        o.node.localhostNodePorts = false
        let (d2, _) = try compileDump([serviceYAML()], options: o)
        #expect(!d2.rules("nat", "KUBE-SERVICES").contains { $0.contains("-d 127.0.0.1") })
    }

    @Test func localhostNodePortsOffBlocksLoopbackAndDropsTheFirewallChain() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.node.localhostNodePorts = false
        let (d, _) = try compileDump([serviceYAML()], options: o)
        #expect(d.rules("nat", "KUBE-SERVICES").last?.hasSuffix("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS") == true)
        #expect(!d.chains("filter").contains("KUBE-FIREWALL"))
    }

    @Test func internalTrafficPolicyLocalWithoutLocalEndpointsDrops() throws {
        let (d, c) = try compileDump([
            serviceYAML(spec: "internalTrafficPolicy: Local"),
            sliceYAML(endpoints: "[{addresses: [10.180.0.1], nodeName: other-node}]"),
        ])
        #expect(d.rules("filter", "KUBE-SERVICES") == [
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no local endpoints\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP",
        ])
        #expect(!d.chains("nat").contains(svl1))
        #expect(c.noLocalEndpoints[.internal] == 1)
    }

    @Test func internalTrafficPolicyLocalUsesTheSVLChain() throws {
        let (d, _) = try compileDump([
            serviceYAML(spec: "internalTrafficPolicy: Local"),
            sliceYAML(endpoints: "[{addresses: [10.180.0.1], nodeName: test-node}, {addresses: [10.180.0.2], nodeName: other}]"),
        ])
        #expect(d.rules("nat", "KUBE-SERVICES").first?.hasSuffix("-j \(svl1)") == true)
        #expect(d.rules("nat", svl1).count == 2)  // masquerade + one local endpoint
        #expect(d.rules("nat", svl1).last?.contains("10.180.0.1:80") == true)
        #expect(!d.chains("nat").contains(svc1))
    }

    @Test func externalTrafficPolicyLocalShortCircuitsPodsAndNode() throws {
        let (d, _) = try compileDump([
            serviceYAML(type: "NodePort", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30080}]", spec: "externalTrafficPolicy: Local"),
            sliceYAML(endpoints: "[{addresses: [10.180.0.1], nodeName: test-node}, {addresses: [10.180.0.2], nodeName: other}]"),
        ])
        #expect(d.rules("nat", ext1) == [
            "-A \(ext1) -m comment --comment \"pod traffic for ns1/svc1:p80 external destinations\" -s 10.0.0.0/8 -j \(svc1)",
            "-A \(ext1) -m comment --comment \"masquerade LOCAL traffic for ns1/svc1:p80 external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
            "-A \(ext1) -m comment --comment \"route LOCAL traffic for ns1/svc1:p80 external destinations\" -m addrtype --src-type LOCAL -j \(svc1)",
            "-A \(ext1) -j \(svl1)",
        ])
        #expect(d.rules("nat", svc1).count == 3)  // masquerade + 2 endpoints
        #expect(d.rules("nat", svl1).count == 1)
    }

    @Test func terminatingEndpointsAreUsedOnlyWhenNoneAreReady() throws {
        let eps = "[{addresses: [10.180.0.1], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.180.0.2], conditions: {ready: false, serving: false, terminating: true}}]"
        let (d, _) = try compileDump([serviceYAML(), sliceYAML(endpoints: eps)])
        #expect(d.rules("nat", svc1).last == "-A \(svc1) -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-" + ChainHash.endpoint(ServicePortName(service: .init(namespace: "ns1", name: "svc1"), port: "p80", proto: .tcp), "10.180.0.1:80"))
        #expect(d.rules("nat", svc1).count == 2)
        let withReady = "[{addresses: [10.180.0.1], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.180.0.2], conditions: {ready: true}}]"
        let (d2, _) = try compileDump([serviceYAML(), sliceYAML(endpoints: withReady)])
        #expect(d2.rules("nat", svc1).last?.contains("10.180.0.2:80") == true)
        #expect(d2.rules("nat", svc1).count == 2)
    }

    @Test func noEndpointsRejectsEveryFrontend() throws {
        let (d, _) = try compileDump([serviceYAML(type: "LoadBalancer", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30080}]",
                                                   spec: "externalIPs: [192.168.99.22]", status: "status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}")])
        #expect(d.rules("filter", "KUBE-SERVICES").count == 1)
        #expect(d.rules("filter", "KUBE-EXTERNAL-SERVICES") == [
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j REJECT",
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j REJECT",
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT",
        ])
        #expect(d.chains("nat").count == 4)
    }

    @Test func sourceRangeContainingTheNodeAllowsTheLBIPAsSource() throws {
        let (d, _) = try compileDump([
            serviceYAML(type: "LoadBalancer", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30080}]",
                        spec: "loadBalancerSourceRanges: [192.168.0.0/24, 203.0.113.0/25]", status: "status: {loadBalancer: {ingress: [{ip: 5.6.7.8}]}}"),
            sliceYAML(endpoints: "[{addresses: [10.180.0.1]}]"),
        ])
        let fw = "KUBE-FW-XPGD46QRK7WJZT7O"
        #expect(d.rules("nat", fw) == [
            "-A \(fw) -m comment --comment \"ns1/svc1:p80 loadbalancer IP\" -s 192.168.0.0/24 -j \(ext1)",
            "-A \(fw) -m comment --comment \"ns1/svc1:p80 loadbalancer IP\" -s 203.0.113.0/25 -j \(ext1)",
            "-A \(fw) -m comment --comment \"ns1/svc1:p80 loadbalancer IP\" -s 5.6.7.8 -j \(ext1)",
            "-A \(fw) -m comment --comment \"other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL\"",
        ])
        #expect(d.rules("filter", "KUBE-PROXY-FIREWALL") == [
            "-A KUBE-PROXY-FIREWALL -m comment --comment \"ns1/svc1:p80 traffic not accepted by \(fw)\" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP",
        ])
    }

    @Test func proxyModeLoadBalancerIPsAreNotProgrammed() throws {
        let (d, _) = try compileDump([
            serviceYAML(type: "LoadBalancer", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30080}]",
                        status: "status: {loadBalancer: {ingress: [{ip: 5.6.7.8, ipMode: Proxy}, {ip: 1.2.3.4}]}}"),
            sliceYAML(endpoints: "[{addresses: [10.180.0.1]}]"),
        ])
        let lb = d.rules("nat", "KUBE-SERVICES").filter { $0.contains("loadbalancer IP") }
        #expect(lb.count == 1)
        #expect(lb.first?.contains("-d 1.2.3.4") == true)
    }

    @Test func healthCheckNodePortIsAcceptedForLocalLoadBalancers() throws {
        let (d, _) = try compileDump([serviceYAML(type: "LoadBalancer", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30080}]",
                                                   spec: "externalTrafficPolicy: Local\nhealthCheckNodePort: 31000")])
        #expect(d.rules("filter", "KUBE-NODEPORTS") == [
            "-A KUBE-NODEPORTS -m comment --comment \"ns1/svc1:p80 health check node port\" -m tcp -p tcp --dport 31000 -j ACCEPT",
        ])
    }

    @Test func sessionAffinityUsesRecentWithTheConfiguredTimeout() throws {
        let (d, _) = try compileDump([
            serviceYAML(spec: "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"),
            sliceYAML(endpoints: "[{addresses: [10.180.0.1]}, {addresses: [10.180.0.2]}]"),
        ])
        let rules = d.rules("nat", svc1)
        #expect(rules.count == 5)
        #expect(rules[1].contains("-m recent --name KUBE-SEP-") && rules[1].contains("--rcheck --seconds 60 --reap -j KUBE-SEP-"))
        #expect(rules[3].contains("--probability 0.5000000000"))
        let seps = d.chains("nat").filter { $0.hasPrefix("KUBE-SEP-") }
        for sep in seps {
            #expect(d.rules("nat", sep)[1].contains("-m recent --name \(sep) --set -m tcp -p tcp -j DNAT"))
        }
    }

    @Test func udpAndSCTPUseTheirOwnMatches() throws {
        let ports = "[{name: dns, port: 53, protocol: UDP}, {name: sc, port: 9999, protocol: SCTP}]"
        let (d, _) = try compileDump([
            serviceYAML(ports: ports),
            sliceYAML(ports: "[{name: dns, port: 5353, protocol: UDP}, {name: sc, port: 9999, protocol: SCTP}]", endpoints: "[{addresses: [10.180.0.1]}]"),
        ])
        let top = d.rules("nat", "KUBE-SERVICES")
        #expect(top.contains { $0.contains("\"ns1/svc1:dns cluster IP\" -m udp -p udp -d 172.30.0.41 --dport 53 ") })
        #expect(top.contains { $0.contains("\"ns1/svc1:sc cluster IP\" -m sctp -p sctp -d 172.30.0.41 --dport 9999 ") })
        #expect(d.tables.flatMap { $0.chains }.flatMap(\.rules).contains { $0.hasSuffix("-m udp -p udp -j DNAT --to-destination 10.180.0.1:5353") })
    }

    @Test func largeClusterModeDropsPerEndpointComments() throws {
        let eps = (0..<1001).map { "{addresses: [10.\(180 + $0 / 65536).\($0 / 256 % 256).\($0 % 256)]}" }.joined(separator: ", ")
        let (d, c) = try compileDump([serviceYAML(), sliceYAML(endpoints: "[\(eps)]")])
        #expect(c.largeClusterMode)
        let sep = d.chains("nat").first { $0.hasPrefix("KUBE-SEP-") }!
        #expect(d.rules("nat", sep).allSatisfy { !$0.contains("--comment") })
        #expect(d.rules("nat", svc1).dropFirst().allSatisfy { !$0.contains("--comment") })
        #expect(d.rules("nat", svc1).first?.contains("cluster IP") == true)  // the masquerade rule keeps its comment
        let (d2, c2) = try compileDump([serviceYAML(), sliceYAML(endpoints: "[\(eps.split(separator: ",").prefix(1000).joined(separator: ","))]")])
        #expect(!c2.largeClusterMode)
        #expect(d2.rules("nat", svc1).dropFirst().allSatisfy { $0.contains("--comment") })
    }

    @Test func ipv6FamilyFollowsIP6TablesConventions() throws {
        let opts = IPTablesOptions(node: NodeConfig(nodeName: "test-node", nodeIPs: [IPAddress("2001:db8::1")!], clusterCIDRs: [CIDR("fd00:10::/64")!]),
                                   family: .ipv6, randomFully: false)
        let (d, _) = try compileDump([
            serviceYAML(ip: "fd00:172:30::41"),
            sliceYAML(family: "IPv6", endpoints: "[{addresses: [\"fd00:10::1\"]}]"),
        ], options: opts)
        #expect(d.rules("nat", "KUBE-SERVICES").first == "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d fd00:172:30::41 --dport 80 -j \(svc1)")
        #expect(d.rules("nat", "KUBE-SERVICES").last?.hasSuffix("-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS") == true)
        #expect(!d.chains("filter").contains("KUBE-FIREWALL"))
        let sep = "KUBE-SEP-" + ChainHash.endpoint(ServicePortName(service: .init(namespace: "ns1", name: "svc1"), port: "p80", proto: .tcp), "[fd00:10::1]:80")
        #expect(d.rules("nat", sep).last?.hasSuffix("-j DNAT --to-destination [fd00:10::1]:80") == true)
        #expect(d.rules("nat", svc1).first?.contains("! -s fd00:10::/64") == true)
    }

    @Test func outOfScopeServicesProduceNothing() throws {
        let docs = [
            serviceYAML("ns1", "external", type: "ExternalName"),
            serviceYAML("ns1", "headless", ip: "None"),
            """
            apiVersion: v1
            kind: Service
            metadata: {name: other, namespace: ns1, labels: {service.kubernetes.io/service-proxy-name: someone-else}}
            spec: {clusterIP: 172.30.0.50, ports: [{port: 80}]}
            """,
        ]
        let (d, _) = try compileDump(docs)
        #expect(d.rules("filter", "KUBE-SERVICES").isEmpty)
        #expect(d.rules("nat", "KUBE-SERVICES").count == 1)
    }

    @Test func randomFullyFollowsTheInstalledIPTables() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.randomFully = true
        let (d, _) = try compileDump([serviceYAML()], options: o)
        #expect(d.rules("nat", "KUBE-POSTROUTING").last?.hasSuffix("-j MASQUERADE --random-fully") == true)
        #expect(IPTablesFeatures.parse("iptables v1.8.9 (nf_tables)")?.randomFully == true)
        #expect(IPTablesFeatures.parse("iptables v1.6.1")?.randomFully == false)
        #expect(IPTablesFeatures.parse("iptables v1.8.9 (legacy)")?.mode == .legacy)
    }

    @Test func conntrackLiberalLeavesOutTheInvalidDrop() throws {
        var o = Fixtures.kubeProxyTestOptions
        o.conntrackTCPLiberal = true
        let (d, _) = try compileDump([serviceYAML()], options: o)
        #expect(!d.rules("filter", "KUBE-FORWARD").contains { $0.contains("INVALID") })
    }
}

@Suite struct ProbabilityAndHashTests {
    @Test(arguments: [
        (1, "1.0000000000"), (2, "0.5000000000"), (3, "0.3333333333"), (10, "0.1000000000"), (100, "0.0100000000"),
        (1000, "0.0010000000"), (10000, "0.0001000000"), (100000, "0.0000100000"), (100001, "0.0000099999"),
    ])
    func probabilityMatchesKubeProxy(n: Int, text: String) {
        #expect(probability(n) == text)
    }

    @Test func probabilityIsStrictlyIncreasingAsNShrinks() {
        var prev = probability(100000)
        for n in stride(from: 99999, through: 2, by: -1) {
            let p = probability(n)
            #expect(p > prev, "probability(\(n))")
            if p <= prev { break }
            prev = p
        }
    }

    @Test(arguments: [
        ("ns1/svc1:p80tcp", "XPGD46QRK7WJZT7O"), ("ns2/svc2:p80tcp", "GNZBNJ2PO5MGZ6GT"), ("ns3/svc3:p80tcp", "X27LE4BHSL4DOUIK"),
        ("ns4/svc4:p80tcp", "4SW47YFZTEDKD3PK"), ("ns5/svc5:p80tcp", "NUKIZ6OKUXPJNT4C"), ("ns2/svc2:p8080tcp", "2VJB64SDSIJUP5T6"),
        ("ns1/svc1:p80tcp10.180.0.1:80", "SXIVWICOYRO3J4NJ"), ("ns5/svc5:p80tcp10.180.0.3:80", "I77PXRDZVX7PMWMN"),
        ("ns1/svc1:p80tcp10.0.0.0:80", "DKGQUZGBKLTPAR56"), ("default/mysql-servicetcp", "G4UYIH746YNNDBV2"),
    ])
    func chainHashesMatchKubeProxy(input: String, hash: String) {
        #expect(ChainHash.hash16(input) == hash)
    }
}

@Suite struct DualStackCompileTests {
    /// One dual-stack Service, compiled by two single-family proxiers over one model: each
    /// batch holds only its family's addresses, under the same chain names.
    @Test func eachFamilyCompilesItsOwnAddresses() throws {
        let yaml = [
            serviceYAML(ip: "172.30.0.41", spec: "clusterIPs: [172.30.0.41, \"fd00:172:30::41\"]\nexternalIPs: [192.168.99.22, \"2001:db8::22\"]"),
            sliceYAML(name: "svc1-v4", endpoints: "[{addresses: [10.180.0.1]}]"),
            sliceYAML(name: "svc1-v6", family: "IPv6", endpoints: "[{addresses: [\"fd00:10::1\"]}]"),
        ].joined(separator: "\n---\n")
        var (tracker, rejections) = try Fixtures.tracker(yaml)
        #expect(rejections.isEmpty)
        let node = NodeConfig(nodeName: "test-node", nodeIPs: [IPAddress("192.168.0.2")!, IPAddress("2001:db8::1")!],
                              clusterCIDRs: [CIDR("10.0.0.0/8")!, CIDR("fd00:10::/64")!])
        #expect(node.families == [.ipv4, .ipv6])
        let v4 = IPTablesCompiler(options: IPTablesOptions(node: node, family: .ipv4, randomFully: false)).compile(tracker.snapshot(.ipv4))
        let v6 = IPTablesCompiler(options: IPTablesOptions(node: node, family: .ipv6, randomFully: false)).compile(tracker.snapshot(.ipv6))
        let d4 = try RestoreDump.parse(v4.restoreText), d6 = try RestoreDump.parse(v6.restoreText)
        #expect(d4.rules("nat", "KUBE-SERVICES").prefix(2) == [
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j \(svc1)",
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 external IP\" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j \(ext1)",
        ])
        #expect(d6.rules("nat", "KUBE-SERVICES").prefix(2) == [
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d fd00:172:30::41 --dport 80 -j \(svc1)",
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 external IP\" -m tcp -p tcp -d 2001:db8::22 --dport 80 -j \(ext1)",
        ])
        #expect(!v4.restoreText.contains("fd00:") && !v4.restoreText.contains("2001:db8"))
        #expect(!v6.restoreText.contains("172.30.") && !v6.restoreText.contains("10.180.") && !v6.restoreText.contains("192.168."))
        #expect(d4.rules("nat", svc1).first?.contains("! -s 10.0.0.0/8") == true)
        #expect(d6.rules("nat", svc1).first?.contains("! -s fd00:10::/64") == true)
        #expect(d6.chains("filter").contains("KUBE-FIREWALL") == false)
        #expect(try checkRuleJumps(v4.restoreText) == [] && checkRuleJumps(v6.restoreText) == [])
    }
}
