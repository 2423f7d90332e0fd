// The IPVS compiler: golden `sluice compile --proxy-mode ipvs` output and focused checks.

import Foundation
import IPTables
import IPVS
import SluiceCore
import SluiceTesting
import Testing

private func golden(_ name: String) throws -> String {
    try Fixtures.read("Golden/\(name)", beside: #filePath)
}

private let featuresNode = NodeConfig(nodeName: "node-a", nodeIPs: [IPAddress("192.168.0.2")!], clusterCIDRs: [CIDR("10.244.0.0/16")!])

private func compileFeatures(_ mutate: (inout IPVSOptions) -> Void = { _ in }) throws -> IPVSDesiredState {
    let state = try Fixtures.state(try golden("features.yaml"), nodeName: "node-a")
    var o = IPVSOptions(node: featuresNode, family: .ipv4, scheduler: "rr", randomFully: true,
                        nodePortAddresses: [IPAddress("192.168.0.2")!], localAddresses: [IPAddress("192.168.0.2")!])
    mutate(&o)
    return IPVSCompiler(options: o).compile(state)
}

/// Runs the sluice binary and returns its standard output.
private func runSluice(_ args: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: sluiceBinary)
    p.arguments = args
    p.currentDirectoryURL = repositoryRoot
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}

@Suite struct IPVSCompilerTests {
    @Test func goldenCompileOfTheExamples() throws {
        let r = try runSluice(["compile", "--proxy-mode", "ipvs", "--manifests", "examples", "--hostname-override", "demo-node",
                               "--node-ip", "192.168.50.1", "--cluster-cidr", "10.244.0.0/16", "--random-fully", "true"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == (try golden("examples-web.txt")))
    }

    @Test func goldenCompileOfEveryFeature() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-ipvs-golden-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try (try golden("features.yaml")).write(to: dir.appendingPathComponent("features.yaml"), atomically: true, encoding: .utf8)
        let r = try runSluice(["compile", "--proxy-mode", "ipvs", "--manifests", dir.path, "--hostname-override", "node-a",
                               "--node-ip", "192.168.0.2", "--cluster-cidr", "10.244.0.0/16", "--random-fully", "true"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == (try golden("features.txt")))
        // The pure compiler gives the same text.
        #expect(try compileFeatures().dryRunText == (try golden("features.txt")))
    }

    @Test func localPoliciesAndFallbacks() throws {
        let d = try compileFeatures()
        func dests(_ ip: String, _ port: UInt16, _ proto: TransportProtocol = .tcp) -> [String] {
            d.virtualServers[VirtualServerKey(address: IPAddress(ip)!, proto: proto, port: port)]?.destinations.map(\.description) ?? ["<none>"]
        }
        // eTP=Local: external addresses get the local endpoint only; the ClusterIP gets both.
        #expect(dests("10.96.2.1", 80) == ["10.244.1.3:8080", "10.244.2.3:8080"])
        #expect(dests("198.51.100.7", 80) == ["10.244.1.3:8080"])
        #expect(dests("192.168.0.2", 30080) == ["10.244.1.3:8080"])
        // iTP=Local: the local endpoint only.
        #expect(dests("10.96.4.1", 80) == ["10.244.1.5:8080"])
        // Only a serving-terminating endpoint: it is used.
        #expect(dests("10.96.5.1", 80) == ["10.244.2.6:8080"])
        // No endpoints: the virtual server exists without real servers.
        #expect(dests("10.96.6.1", 80).isEmpty)
        // An external IP that is a node address is not bound to kube-ipvs0; others are.
        #expect(!d.boundAddresses.contains(IPAddress("192.168.0.2")!))
        #expect(d.boundAddresses.contains(IPAddress("203.0.113.9")!))
        #expect(d.boundAddresses.contains(IPAddress("198.51.100.7")!))
        // ClientIP affinity: persistent with the timeout.
        let sticky = try #require(d.virtualServers[VirtualServerKey(address: IPAddress("10.96.1.1")!, proto: .tcp, port: 80)])
        #expect(sticky.server.flags == .persistent)
        #expect(sticky.server.timeout == 600)
    }

    @Test func theIPTablesRuleCountDoesNotGrowWithServices() throws {
        func state(_ n: Int) throws -> ProxyState {
            var docs: [String] = []
            for i in 0..<n {
                docs.append("""
                apiVersion: v1
                kind: Service
                metadata: {name: s\(i), namespace: ns}
                spec:
                  type: NodePort
                  clusterIP: 10.96.\(i / 250).\(i % 250 + 1)
                  ports: [{name: p, port: 80, protocol: TCP, nodePort: \(30000 + i)}]
                ---
                apiVersion: discovery.k8s.io/v1
                kind: EndpointSlice
                metadata: {name: s\(i)-1, namespace: ns, labels: {kubernetes.io/service-name: s\(i)}}
                addressType: IPv4
                ports: [{name: p, port: 8080, protocol: TCP}]
                endpoints: [{addresses: [10.244.\(i / 250).\(i % 250 + 1)], nodeName: other}]
                """)
            }
            return try Fixtures.state(docs.joined(separator: "\n---\n"), nodeName: "node-a")
        }
        let o = IPVSOptions(node: featuresNode, nodePortAddresses: [IPAddress("192.168.0.2")!])
        let one = IPVSCompiler(options: o).compile(try state(1))
        let many = IPVSCompiler(options: o).compile(try state(400))
        #expect(one.ruleCounts == many.ruleCounts)
        #expect(many.virtualServers.count == 800)
        #expect(many.entries["KUBE-CLUSTER-IP"]?.count == 400)
        #expect(many.entries["KUBE-NODE-PORT-TCP"]?.count == 400)
    }

    @Test func maglevSetsTheSourceHashFlag() throws {
        let d = try compileFeatures { $0.scheduler = "mh" }
        #expect(d.virtualServers.values.allSatisfy { $0.server.flags.contains(.scheduler2) && $0.server.scheduler == "mh" })
        #expect(d.ipvsadmSave.contains("-A -t 10.96.6.1:80 -s mh -b mh-port\n"))
    }

    @Test func masqueradeVariantsOfTheClusterIPRule() throws {
        let all = try compileFeatures { $0.node.masqueradeAll = true }
        #expect(all.nat.rules.contains { $0.hasSuffix("--match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ") })
        let noCIDR = try compileFeatures { $0.node.clusterCIDRs = [] }
        #expect(noCIDR.nat.rules.contains { $0.hasSuffix("--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ") })
        let noRandom = try compileFeatures { $0.randomFully = false }
        #expect(noRandom.nat.rules.contains("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"))
    }

    @Test func ipv6Proxier() throws {
        let yaml = """
        apiVersion: v1
        kind: Service
        metadata: {name: v6, namespace: ns}
        spec:
          clusterIP: fd00::10
          clusterIPs: [fd00::10]
          ipFamilies: [IPv6]
          ports: [{name: p, port: 80, protocol: TCP}]
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: v6-1, namespace: ns, labels: {kubernetes.io/service-name: v6}}
        addressType: IPv6
        ports: [{name: p, port: 8080, protocol: TCP}]
        endpoints: [{addresses: ["fd00:1::2"], nodeName: node-a}]
        """
        let state = try Fixtures.state(yaml, nodeName: "node-a", family: .ipv6)
        let d = IPVSCompiler(options: IPVSOptions(node: featuresNode, family: .ipv6)).compile(state)
        #expect(d.ipvsadmSave == "-A -t [fd00::10]:80 -s rr\n-a -t [fd00::10]:80 -r [fd00:1::2]:8080 -m -w 1\n")
        #expect(d.sets.map(\.name).contains("KUBE-6-CLUSTER-IP"))
        #expect(d.entries["KUBE-6-CLUSTER-IP"].map { $0.map(\.description) } == ["fd00::10,tcp:80"])
        #expect(d.ipsetSave.contains("create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536\n"))
        #expect(d.nat.rules.first == "-A KUBE-SERVICES -s ::1/128 -j RETURN")
        #expect(d.virtualServers.values.first?.server.netmask == 128)
    }

    @Test func nodePortAddressSelection() {
        let candidates = ["127.0.0.1", "192.168.0.2", "10.0.0.5", "169.254.1.1", "fd00::1"].compactMap(IPAddress.init)
        var node = featuresNode
        #expect(IPVSOptions.nodePortAddresses(from: candidates, node: node, family: .ipv4).map(\.description) == ["10.0.0.5", "192.168.0.2"])
        node.nodePortAddresses = .cidrs([CIDR("192.168.0.0/16")!, CIDR("127.0.0.0/8")!])
        #expect(IPVSOptions.nodePortAddresses(from: candidates, node: node, family: .ipv4).map(\.description) == ["192.168.0.2"])
    }
}
