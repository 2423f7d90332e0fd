// IPVS-mode drift: the checker reads the (fake) kernel clients the backend uses and reports
// each hand edit: a removed real server, a changed weight, a removed set member, an address
// removed from kube-ipvs0, a foreign rule in KUBE-SERVICES. Draining real servers and
// virtual servers in --ipvs-exclude-cidrs are not drift.

import Foundation
import IPTables
import IPVS
import KernelKit
import Userspace
import SluiceCore
import SluiceTesting
import Testing

@Suite struct IPVSDriftTests {
    let state: ProxyState
    let config: IPVSBackendConfig
    let ipvs = FakeIPVS()
    let links = FakeLinks(nodeAddresses: [IPAddress("192.168.0.2")!])
    let ipsets = FakeIPSets()
    let iptables = FakeIPTables()

    init() throws {
        state = try Fixtures.state(
            Fixtures.read("../IPTablesTests/Fixtures/kube-proxy-overall/services.yaml", beside: #filePath) + "\n---\n"
                + Fixtures.read("../IPTablesTests/Fixtures/kube-proxy-overall/endpointslices.yaml", beside: #filePath))
        let o = IPVSOptions(node: Fixtures.kubeProxyTestNode, family: .ipv4, scheduler: "rr",
                            excludeCIDRs: [CIDR("10.99.0.0/16")!], randomFully: true)
        config = IPVSBackendConfig(options: o, tools: IPTablesTools(variant: .legacy, family: .ipv4))
    }

    var checker: IPVSDriftChecker { IPVSDriftChecker(config: config, ipvs: ipvs, links: links, ipsets: ipsets, runner: iptables) }

    /// Loads the fakes with exactly what a sync of `state` holds (as the compiler computes it
    /// with the fakes' node address).
    func loadSyncedKernel() async throws -> IPVSDesiredState {
        var o = config.options
        o.localAddresses = [IPAddress("192.168.0.2")!]
        o.nodePortAddresses = [IPAddress("192.168.0.2")!]
        let desired = IPVSCompiler(options: o).compile(state)
        for vs in desired.virtualServers.values { await ipvs.preload(vs.server, vs.destinations) }
        try await ipsets.create(desired.sets)
        try await ipsets.update(desired.entries.map { (set: $0.key, add: Array($0.value), delete: []) })
        _ = try await links.createDummy(named: "kube-ipvs0")
        for ip in desired.boundAddresses { await links.preloadAddress(ip, on: "kube-ipvs0") }
        var text = ""
        for t in ["nat", "filter"] {
            text += "*\(t)\n"
            for b in t == "nat" ? ["PREROUTING", "OUTPUT", "POSTROUTING"] : ["INPUT", "FORWARD", "OUTPUT"] { text += ":\(b) ACCEPT [0:0]\n" }
            text += "COMMIT\n"
        }
        _ = try await iptables.check("iptables-legacy-restore", ["--noflush"], input: text + desired.restoreText)
        for rule in ipvsJumpRules {
            _ = try await iptables.check("iptables-legacy", ["-t", rule.table.rawValue, "-A", rule.source] + rule.ruleArgs)
        }
        return desired
    }

    @Test func aSyncedKernelIsCleanAndEveryHandEditIsReported() async throws {
        let desired = try await loadSyncedKernel()
        #expect(desired.virtualServers.count > 5 && !desired.boundAddresses.isEmpty)
        let clean = try await checker.check(state)
        #expect(clean.items == [], "\(clean.items.map(\.description))")

        // svc4 has two real servers: remove one, change the other's weight.
        let vs = try #require(desired.virtualServers.values.first { $0.servicePort.service.name == "svc4" && $0.destinations.count == 2 })
        _ = try await ipvs.apply([.deleteDestination(vs.server.key, vs.destinations[0])])
        var heavier = vs.destinations[1]
        heavier.weight = 5
        _ = try await ipvs.apply([.updateDestination(vs.server.key, heavier)])
        // A member of the cluster-IP set, an address of kube-ipvs0, a foreign rule.
        let setName = try #require(desired.entries.first { $0.key == "KUBE-CLUSTER-IP" && !$0.value.isEmpty }?.key)
        let member = try #require(desired.entries[setName]?.sorted().first)
        try await ipsets.update([(set: setName, add: [], delete: [member])])
        let link = try #require(try await links.link(named: "kube-ipvs0"))
        let address = try #require(desired.boundAddresses.sorted().first)
        _ = try await links.deleteAddresses([address], index: UInt32(bitPattern: link.index))
        _ = try await iptables.check("iptables-legacy", ["-t", "nat", "-I", "KUBE-SERVICES", "-d", "10.9.9.9/32", "-j", "RETURN"])

        let items = try await checker.check(state).items
        let byObject = Dictionary(grouping: items, by: \.object)
        let rsObject = "ipvs real server of \(vs.server.key)"
        #expect(byObject[rsObject]?.map(\.kind).sorted { $0.rawValue < $1.rawValue } == [.different, .missing], "\(items.map(\.description))")
        #expect(byObject[rsObject]?.allSatisfy { $0.owner == "ns4/svc4:p80" } == true)
        #expect(byObject["ipset \(setName) member"]?.map(\.want) == [member.description])
        #expect(byObject["kube-ipvs0 address"]?.map(\.want) == [address.description])
        #expect(byObject["nat KUBE-SERVICES rule"]?.map(\.kind) == [.extra])
        #expect(items.count == 5, "\(items.map(\.description))")
    }

    @Test func drainingRealServersAndExcludedVirtualServersAreNotDrift() async throws {
        let desired = try await loadSyncedKernel()
        let vs = try #require(desired.virtualServers.values.first { !$0.destinations.isEmpty })
        // A removed endpoint draining at weight 0, a virtual server in --ipvs-exclude-cidrs.
        _ = try await ipvs.apply([.addDestination(vs.server.key, RealServer(address: IPAddress("10.180.9.9")!, port: 80, weight: 0))])
        await ipvs.preload(VirtualServer(key: VirtualServerKey(address: IPAddress("10.99.0.1")!, proto: .tcp, port: 80), scheduler: "rr"))
        #expect(try await checker.check(state).items == [])
        // Outside the excluded range, a foreign virtual server is extra.
        await ipvs.preload(VirtualServer(key: VirtualServerKey(address: IPAddress("10.98.0.1")!, proto: .tcp, port: 80), scheduler: "rr"))
        let items = try await checker.check(state).items
        #expect(items.map(\.kind) == [.extra] && items.first?.object == "ipvs virtual server", "\(items.map(\.description))")
    }
}

@Suite struct IPVSTracerTests {
    /// Every address of every Service port of the golden fixture, through IPVS mode's compiled
    /// rules, sets and virtual servers: the real servers reached are the endpoints the model
    /// selects, each with 1/n, and REJECT/DROP where the model says so.
    @Test func compiledIPVSAgreesWithTheModel() throws {
        let state = try Fixtures.state(
            Fixtures.read("../IPTablesTests/Fixtures/kube-proxy-overall/services.yaml", beside: #filePath) + "\n---\n"
                + Fixtures.read("../IPTablesTests/Fixtures/kube-proxy-overall/endpointslices.yaml", beside: #filePath))
        let nodeIP = IPAddress("192.168.0.2")!
        let node = Fixtures.kubeProxyTestNode
        var o = IPVSOptions(node: node, family: .ipv4, scheduler: "rr")
        o.nodePortAddresses = [nodeIP]
        o.localAddresses = [nodeIP]
        let tracer = IPVSTracer.compiled(IPVSCompiler(options: o).compile(state), localAddresses: [nodeIP])
        var checked = 0
        for name in state.sortedNames {
            let svc = state.servicePorts[name]!
            var dsts = [(svc.clusterIP, svc.port)] + svc.externalIPs.map { ($0, svc.port) } + svc.loadBalancerVIPs.map { ($0, svc.port) }
            if svc.nodePort != 0 { dsts.append((nodeIP, svc.nodePort)) }
            for (ip, port) in dsts {
                for src in ["10.0.0.5", "203.0.113.9", "198.51.100.7"] {
                    let p = ProbePacket(source: IPAddress(src)!, fromNode: false, destination: ip, port: port, proto: .tcp)
                    let model = explainModel(p, state: state, node: node, localAddresses: [nodeIP], localFallsBackToCluster: true)
                    let trace = tracer.trace(p)
                    let what = "\(src) -> \(ip):\(port) (\(name)): \(trace.paths.map { "\($0.verdict) \($0.endpoint ?? "")" }) notes \(trace.notes)"
                    if model.noEndpointsAction != nil || model.sourceRange?.hasPrefix("denied") == true {
                        #expect(trace.paths.allSatisfy { $0.verdict != .forwarded }, "\(what)")
                        continue
                    }
                    let selected = Set(model.endpoints.filter(\.selected).map(\.address))
                    let probs = trace.endpointProbabilities
                    #expect(Set(probs.keys) == selected, "\(what): model \(selected)")
                    for (_, pr) in probs { #expect(abs(pr - 1 / Double(selected.count)) < 1e-9, "\(what)") }
                    #expect(trace.paths.allSatisfy { $0.masquerade == model.masquerade }, "\(what): model masquerade \(String(describing: model.masquerade))")
                    checked += 1
                }
            }
        }
        #expect(checked >= 15)
    }
}

@Suite struct UserspaceTracerTests {
    /// Cluster IPs and NodePorts of the golden fixture through the portal rules and relays: the
    /// relay reaches the endpoints the model selects, each 1/n, always from the node's address.
    @Test func portalRulesReachTheRelayAndItsEndpoints() throws {
        let state = try Fixtures.state(
            Fixtures.read("../IPTablesTests/Fixtures/kube-proxy-overall/services.yaml", beside: #filePath) + "\n---\n"
                + Fixtures.read("../IPTablesTests/Fixtures/kube-proxy-overall/endpointslices.yaml", beside: #filePath))
        let nodeIP = IPAddress("192.168.0.2")!
        let node = Fixtures.kubeProxyTestNode
        let tracer = UserspaceTracer.compiled(state: state, nodeName: node.nodeName, nodeIP: nodeIP, localAddresses: [nodeIP])
        var checked = 0
        for name in state.sortedNames {
            let svc = state.servicePorts[name]!
            var dsts = [(svc.clusterIP, svc.port)]
            if svc.nodePort != 0 { dsts.append((nodeIP, svc.nodePort)) }
            for (ip, port) in dsts {
                for (src, fromNode) in [(IPAddress("10.0.0.5")!, false), (nodeIP, true)] {
                    let p = ProbePacket(source: src, fromNode: fromNode, destination: ip, port: port, proto: .tcp)
                    let trace = tracer.trace(p)
                    let what = "\(src) -> \(ip):\(port) (\(name)): \(trace.paths.map { "\($0.verdict) \($0.endpoint ?? "")" }) \(trace.notes)"
                    let plan = UserspacePlan(state: state, nodeName: node.nodeName)
                    let want = Set(plan.relays[name]!.endpoints.map(\.description))
                    if want.isEmpty {
                        #expect(trace.paths.allSatisfy { $0.verdict == .rejected }, "\(what)")
                        continue
                    }
                    #expect(Set(trace.endpointProbabilities.keys) == want && trace.paths.allSatisfy { $0.verdict == .relayed && $0.masquerade }, "\(what)")
                    #expect(trace.paths.allSatisfy { abs($0.probability - 1 / Double(want.count)) < 1e-9 }, "\(what)")
                    #expect(trace.paths.first?.steps.contains { $0.location == "relay" } == true, "\(what)")
                    checked += 1
                }
            }
        }
        #expect(checked >= 8)
    }
}
