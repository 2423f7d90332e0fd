// `sluice explain` and `sluice diff`, pure parts: destination parsing, the model's endpoint
// reasons, the iptables tracer over the golden fixture's compiled rules (checked against the
// model, an independent implementation), rule canonicalisation and the drift comparison.

import Foundation
import IPTables
import SluiceCore
import SluiceTesting
import Testing

private func overallYAML() throws -> String {
    try Fixtures.read("../IPTablesTests/Fixtures/kube-proxy-overall/services.yaml", beside: #filePath) + "\n---\n"
        + Fixtures.read("../IPTablesTests/Fixtures/kube-proxy-overall/endpointslices.yaml", beside: #filePath)
}

private let options = Fixtures.kubeProxyTestOptions
private let local = Set(options.localAddresses)
private let nodeIP = IPAddress("192.168.0.2")!

private func packet(_ src: String?, _ dst: String) throws -> ProbePacket {
    try probePacket(from: src, to: dst, nodeIP: nodeIP, localAddresses: local)
}

@Suite struct DestinationParsingTests {
    @Test func acceptsTheDocumentedForms() throws {
        let a = try ProbePacket.parseDestination("10.96.0.10:80")
        #expect(a.0 == IPAddress("10.96.0.10") && a.1 == 80 && a.2 == .tcp)
        let b = try ProbePacket.parseDestination("[fd00::1]:53/udp")
        #expect(b.0 == IPAddress("fd00::1") && b.1 == 53 && b.2 == .udp)
        let c = try ProbePacket.parseDestination("10.0.0.1:3868/SCTP")
        #expect(c.2 == .sctp)
    }

    @Test(arguments: ["10.96.0.10", "10.96.0.10:0", "10.96.0.10:70000", "10.96.0.10:80/icmp", "host:80", "[fd00::1]/tcp"])
    func rejectsBadDestinations(_ text: String) {
        #expect(throws: ConfigError.self) { try ProbePacket.parseDestination(text) }
    }

    @Test func packetJSONRoundTrips() throws {
        let p = try packet("10.0.0.5", "172.30.0.41:80/tcp")
        let data = try JSONEncoder().encode(p)
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.contains("\"protocol\":\"TCP\"") && text.contains("\"destination\":\"172.30.0.41\""))
        #expect(try JSONDecoder().decode(ProbePacket.self, from: data) == p)
    }
}

@Suite struct TracerTests {
    let state: ProxyState
    let tracer: IPTablesTracer

    init() throws {
        state = try Fixtures.state(overallYAML())
        tracer = IPTablesTracer(compiled: IPTablesCompiler(options: options).compile(state), localAddresses: local)
    }

    /// Every address of every Service port of the golden fixture, from a pod, from outside
    /// (inside and outside svc5's source range) and from the node: the tracer's walk of the
    /// compiled rules must reach exactly the endpoints the model selects, each with 1/n, and
    /// masquerade exactly when the model says so.
    @Test func compiledRulesAgreeWithTheModelForEveryServiceKind() throws {
        let agreement = try TracerModelAgreement.check(tracer, state: state, node: options.node, localAddresses: local, nodeIP: nodeIP)
        #expect(agreement.problems.isEmpty, "\(agreement.problems.joined(separator: "\n"))")
        #expect(agreement.checked >= 20)
        #expect(agreement.verdicts == [.forwarded, .rejected, .dropped])
    }

    @Test func clusterIPFromAPodWalksServiceChainsAndKeepsTheSource() throws {
        let trace = tracer.trace(try packet("10.0.0.5", "172.30.0.41:80"))
        #expect(trace.paths.count == 1)
        let path = try #require(trace.paths.first)
        #expect(path.verdict == .forwarded && path.endpoint == "10.180.0.1:80" && !path.masquerade)
        let locations = path.steps.map(\.location)
        #expect(locations.prefix(4) == ["nat PREROUTING", "nat KUBE-SERVICES", "nat KUBE-SVC-XPGD46QRK7WJZT7O", "nat KUBE-SEP-SXIVWICOYRO3J4NJ"])
        #expect(path.steps.last?.action.hasPrefix("DNAT to 10.180.0.1:80") == true || path.steps.contains { $0.action.hasPrefix("DNAT to 10.180.0.1:80") })
    }

    @Test func loadBalancerSourceRangesAndAffinity() throws {
        let allowed = tracer.trace(try packet("203.0.113.9", "5.6.7.8:80"))
        #expect(allowed.paths.map(\.verdict) == [.forwarded])
        #expect(allowed.paths.first?.masquerade == true)
        #expect(allowed.notes.contains { $0.hasPrefix("session affinity") })
        let denied = tracer.trace(try packet("198.51.100.7", "5.6.7.8:80"))
        #expect(denied.paths.map(\.verdict) == [.dropped])
        #expect(denied.paths.first?.steps.last?.location == "filter KUBE-PROXY-FIREWALL")
    }

    @Test func noEndpointsIsRejectedAndUnknownDestinationsAreUnchanged() throws {
        let rejected = tracer.trace(try packet("10.0.0.5", "172.30.0.46:80"))
        #expect(rejected.paths.map(\.verdict) == [.rejected])
        #expect(rejected.paths.first?.steps.last?.rule.contains("has no endpoints") == true)
        let p = try packet("10.0.0.5", "172.30.0.99:80")
        #expect(tracer.trace(p).paths.map(\.verdict) == [.unchanged])
        let model = explainModel(p, state: state, node: options.node, localAddresses: local)
        #expect(model.hits.isEmpty && model.noMatch != nil)
    }

    @Test func twoEndpointsSplitEvenlyAndLocalPolicyReasonsAreGiven() throws {
        let trace = tracer.trace(try packet("10.0.0.5", "172.30.0.44:80"))
        #expect(trace.endpointProbabilities.count == 2)
        #expect(trace.paths.allSatisfy { abs($0.probability - 0.5) < 1e-9 })
        // svc2: eTP Local, its only endpoint is on another node: external traffic is dropped,
        // and the endpoint's reasons say why.
        let p = try packet("198.51.100.7", "192.168.99.22:80")
        let model = explainModel(p, state: state, node: options.node, localAddresses: local)
        #expect(model.trafficPolicy == "Local")
        #expect(model.noEndpointsAction?.hasPrefix("DROP") == true)
        #expect(model.endpoints.first?.reasons.contains { $0.contains("traffic policy Local") } == true)
        #expect(tracer.trace(p).paths.map(\.verdict) == [.dropped])
    }
}

@Suite struct TopologyReasonTests {
    @Test func endpointsLeftOutByTopologyOrReadinessSayWhy() throws {
        let yaml = """
            apiVersion: v1
            kind: Service
            metadata: {name: t, namespace: ns, annotations: {service.kubernetes.io/topology-mode: Auto}}
            spec: {clusterIP: 10.96.1.1, ports: [{name: p, port: 80}]}
            ---
            apiVersion: discovery.k8s.io/v1
            kind: EndpointSlice
            metadata: {name: t-1, namespace: ns, labels: {kubernetes.io/service-name: t}}
            addressType: IPv4
            ports: [{name: p, port: 8080}]
            endpoints:
            - {addresses: [10.1.0.1], conditions: {ready: true}, zone: a, hints: {forZones: [{name: a}]}}
            - {addresses: [10.1.0.2], conditions: {ready: true}, zone: b, hints: {forZones: [{name: b}]}}
            - {addresses: [10.1.0.3], conditions: {ready: false}, zone: a, hints: {forZones: [{name: a}]}}
            ---
            apiVersion: v1
            kind: Node
            metadata: {name: test-node, labels: {topology.kubernetes.io/zone: a}}
            """
        let state = try Fixtures.state(yaml)
        let p = try packet("10.0.0.5", "10.96.1.1:80")
        let model = explainModel(p, state: state, node: options.node, localAddresses: local)
        let byAddr = Dictionary(uniqueKeysWithValues: model.endpoints.map { ($0.address, $0) })
        #expect(byAddr["10.1.0.1:8080"]?.selected == true)
        #expect(byAddr["10.1.0.2:8080"]?.selected == false)
        #expect(byAddr["10.1.0.2:8080"]?.reasons.contains { $0.hasPrefix("left out by topology") } == true)
        #expect(byAddr["10.1.0.3:8080"]?.reasons.first == "not ready")
        #expect(model.topology?.hasPrefix("used") == true)
        let trace = IPTablesTracer(compiled: IPTablesCompiler(options: options).compile(state), localAddresses: local).trace(p)
        #expect(Set(trace.endpointProbabilities.keys) == ["10.1.0.1:8080"])

        // kube-proxy 1.34 follows hints whatever the Service asks; the reason says so either way.
        let unannotated = try Fixtures.state(yaml.replacingOccurrences(of: ", annotations: {service.kubernetes.io/topology-mode: Auto}", with: ""))
        let m2 = explainModel(p, state: unannotated, node: options.node, localAddresses: local)
        let selected2 = Set(m2.endpoints.filter(\.selected).map(\.address))
        let traced2 = Set(IPTablesTracer(compiled: IPTablesCompiler(options: options).compile(unannotated), localAddresses: local).trace(p).endpointProbabilities.keys)
        #expect(selected2 == traced2)
        #expect((m2.topology?.hasPrefix("used") == true) == (selected2.count == 1), "\(String(describing: m2.topology)) \(selected2)")
    }
}

@Suite struct CanonicalRuleTests {
    private func rule(_ line: String) -> ParsedRule {
        ParsedRuleSet.parse("*nat\n\(line)\nCOMMIT\n").tables["nat"]!.rules.values.first!.first!
    }

    @Test(arguments: [
        ("-A KUBE-SVC-X -m comment --comment \"ns/s:p -> 10.0.0.1:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-A",
         "-A KUBE-SVC-X -m comment --comment \"ns/s:p -> 10.0.0.1:80\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-A"),
        ("-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000", "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"),
        ("-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000", "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0"),
        ("-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN", "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"),
        ("-A KUBE-SEP-A -m comment --comment ns/s:p -m recent --name KUBE-SEP-A --set -m tcp -p tcp -j DNAT --to-destination 10.0.0.1:80",
         "-A KUBE-SEP-A -p tcp -m comment --comment ns/s:p -m recent --set --name KUBE-SEP-A --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.0.0.1:80"),
        ("-A KUBE-SERVICES -m comment --comment \"ns/s:p cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j KUBE-SVC-X",
         "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"ns/s:p cluster IP\" -m tcp --dport 80 -j KUBE-SVC-X"),
        ("-A KUBE-SERVICES -m comment --comment \"ns/s:p has no endpoints\" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j REJECT",
         "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"ns/s:p has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable"),
        ("-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "-A KUBE-FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
    ])
    func restoreInputAndSaveOutputAreEqual(_ pair: (String, String)) {
        #expect(rule(pair.0).canonical == rule(pair.1).canonical)
    }

    @Test func differentRulesStayDifferent() {
        let a = rule("-A KUBE-SVC-X -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-A")
        let b = rule("-A KUBE-SVC-X -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-A")
        #expect(a.canonical != b.canonical)
        #expect(rule("-A C -s 10.0.0.0/8 -j X").canonical != rule("-A C ! -s 10.0.0.0/8 -j X").canonical)
        #expect(rule("-A C -m mark --mark 0x4000/0x4000 -j X").canonical != rule("-A C -m mark --mark 0x8000/0x8000 -j X").canonical)
    }
}

@Suite struct DriftCompareTests {
    let compiled: CompiledRules

    init() throws {
        compiled = IPTablesCompiler(options: options).compile(try Fixtures.state(overallYAML()))
    }

    /// The desired rule set as restore text with the base chains (what a synced kernel holds).
    private var kernelText: String {
        var s = ""
        let d = IPTablesDrift.desired(compiled)
        for t in ["filter", "nat"] {
            let table = d.tables[t]!
            s += "*\(t)\n"
            for c in table.chainOrder { s += ":\(c) \(table.policies[c]!) [0:0]\n" }
            for c in table.chainOrder { for r in table.rules[c]! { s += r.text + "\n" } }
            s += "COMMIT\n"
        }
        return s
    }

    private func compare(_ edit: (String) -> String) -> [DriftItem] {
        IPTablesDrift.compare(desired: IPTablesDrift.desired(compiled), actual: ParsedRuleSet.parse(edit(kernelText)))
    }

    @Test func identicalIsClean() {
        #expect(compare { $0 } == [])
    }

    @Test func deletedRuleIsMissingAndOwnedByItsService() throws {
        let line = try #require(kernelText.split(separator: "\n").first { $0.hasPrefix("-A KUBE-SERVICES") && $0.contains("ns3/svc3:p80 cluster IP") })
        let items = compare { $0.replacingOccurrences(of: line + "\n", with: "") }
        #expect(items == [DriftItem(kind: .missing, owner: "ns3/svc3:p80", object: "nat KUBE-SERVICES rule", want: String(line), have: nil)])
    }

    @Test func kubeServicesOrderMattersOnlyForTheNodePortJump() throws {
        // The nat table's KUBE-SERVICES (the filter table has a chain of the same name).
        let natStart = try #require(kernelText.range(of: "*nat\n")).upperBound
        let nat = kernelText[natStart...].split(separator: "\n").map(String.init)
        let services = nat.filter { $0.hasPrefix("-A KUBE-SERVICES ") && !$0.hasSuffix("-j KUBE-NODEPORTS") }
        let nodePorts = try #require(nat.first { $0.hasPrefix("-A KUBE-SERVICES ") && $0.hasSuffix("-j KUBE-NODEPORTS") })
        try #require(services.count >= 2)
        func editNat(_ text: String, _ edit: (String) -> String) -> String {
            let i = text.range(of: "*nat\n")!.upperBound
            return String(text[..<i]) + edit(String(text[i...]))
        }
        // A partial sync inserts a new Service's rules at the head: no drift.
        let moved = services.last!
        let headFirst = compare { text in
            editNat(text) { nat in
                nat.replacingOccurrences(of: moved + "\n", with: "")
                    .replacingOccurrences(of: services.first! + "\n", with: moved + "\n" + services.first! + "\n")
            }
        }
        #expect(headFirst == [])
        // A Service rule after the NodePort jump, or the jump first, is drift.
        for edit in [{ (nat: String) in nat.replacingOccurrences(of: moved + "\n", with: "")
                                        .replacingOccurrences(of: nodePorts + "\n", with: nodePorts + "\n" + moved + "\n") },
                     { (nat: String) in nat.replacingOccurrences(of: nodePorts + "\n", with: "")
                                        .replacingOccurrences(of: services.first! + "\n", with: nodePorts + "\n" + services.first! + "\n") }] {
            let items = compare { editNat($0, edit) }
            #expect(items.map(\.object) == ["nat chain KUBE-SERVICES rule order"])
        }
    }

    @Test func changedProbabilityIsOneDifferentRule() throws {
        let line = try #require(kernelText.split(separator: "\n").first { $0.contains("--probability 0.5000000000") })
        let edited = line.replacingOccurrences(of: "0.5000000000", with: "0.9000000000")
        let items = compare { $0.replacingOccurrences(of: line, with: edited) }
        #expect(items.count == 1)
        #expect(items.first?.kind == .different && items.first?.owner == "ns4/svc4:p80" && items.first?.have == edited)
    }

    @Test func foreignRuleInKubeServicesIsExtra() {
        let foreign = "-A KUBE-SERVICES -d 10.9.9.9/32 -p tcp -m tcp --dport 9 -j ACCEPT"
        let items = compare { $0.replacingOccurrences(of: "COMMIT\n", with: "").replacingOccurrences(of: "*nat\n", with: "COMMIT\n*nat\n") + foreign + "\nCOMMIT\n" }
        #expect(items.map(\.kind) == [.extra])
        #expect(items.first?.have == foreign && items.first?.owner == "")
    }

    @Test func missingAndStaleChainsAndJumpRules() throws {
        let sep = try #require(IPTablesDrift.desired(compiled).tables["nat"]!.chainOrder.first { $0.hasPrefix("KUBE-SEP-") })
        let items = compare { text in
            text.split(separator: "\n", omittingEmptySubsequences: false)
                .filter { !$0.contains(sep) || $0.hasPrefix("-A KUBE-SVC") }
                .filter { !$0.hasPrefix("-A POSTROUTING") }
                .joined(separator: "\n")
                .replacingOccurrences(of: "*nat\n", with: "*nat\n:KUBE-SVC-STALE0000000000 - [0:0]\n")
        }
        #expect(items.contains { $0.kind == .missing && $0.object == "nat chain \(sep)" })
        #expect(items.contains { $0.kind == .extra && $0.object == "nat chain KUBE-SVC-STALE0000000000" })
        #expect(items.contains { $0.kind == .missing && $0.object == "nat POSTROUTING jump rule" })
        #expect(items.count == 3)
    }
}

@Suite struct InterfaceDetectionTests {
    /// With --detect-local-mode BridgeInterface the rules tell pods by `-i cbr0`: the tracer
    /// evaluates it from --in-interface, and agrees with the model on masquerade.
    @Test func bridgeInterfaceDecidesMasquerade() throws {
        var node = Fixtures.kubeProxyTestNode
        node.localInterface = .bridge("cbr0")
        var o = options
        o.node = node
        let state = try Fixtures.state(overallYAML())
        let tracer = IPTablesTracer(compiled: IPTablesCompiler(options: o).compile(state), localAddresses: local)
        for (iface, masq) in [("cbr0", false), ("eth0", true)] {
            let p = ProbePacket(source: IPAddress("10.0.0.5")!, fromNode: false, destination: IPAddress("172.30.0.41")!, port: 80,
                                proto: .tcp, inInterface: iface)
            let trace = tracer.trace(p)
            let model = explainModel(p, state: state, node: node, localAddresses: local)
            #expect(trace.paths.map(\.masquerade) == [masq], "\(iface): \(trace.paths) \(trace.notes)")
            #expect(model.masquerade == masq, "\(iface): \(model.masqueradeReasons)")
        }
        // Unknown arrival interface: said, not guessed silently.
        let p = ProbePacket(source: IPAddress("10.0.0.5")!, fromNode: false, destination: IPAddress("172.30.0.41")!, port: 80, proto: .tcp)
        #expect(tracer.trace(p).notes.contains { $0.contains("--in-interface") })
    }
}

/// nfacct on: explain, diff and the drift check compile with the nfacct objects that exist,
/// as the running proxy does, so its counting rules are part of the desired state.
@Suite struct NFAcctDriftAndTraceTests {
    let state: ProxyState
    let plain: CompiledRules
    let counted: CompiledRules

    init() throws {
        state = try Fixtures.state(overallYAML())
        var o = options
        o.nfacctCounters = Set(NFAcctCounterName.all)
        plain = IPTablesCompiler(options: options).compile(state)
        counted = IPTablesCompiler(options: o).compile(state)
    }

    /// What iptables-save prints for a kernel synced with `compiled` (the nfacct match's
    /// option is printed with two spaces, as iptables 1.8 does).
    private func saved(_ compiled: CompiledRules) -> String {
        var s = ""
        let d = IPTablesDrift.desired(compiled)
        for t in ["filter", "nat"] {
            let table = d.tables[t]!
            s += "*\(t)\n"
            for c in table.chainOrder { s += ":\(c) \(table.policies[c]!) [0:0]\n" }
            for c in table.chainOrder { for r in table.rules[c]! { s += r.text.replacingOccurrences(of: "--nfacct-name ", with: "--nfacct-name  ") + "\n" } }
            s += "COMMIT\n"
        }
        return s
    }

    @Test func aKernelWithTheCountingRulesHasNoDriftWhenTheSameObjectsAreCompiled() {
        let kernel = ParsedRuleSet.parse(saved(counted))
        #expect(saved(counted).contains("--nfacct-name  localhost_nps_accepted_pkts"))
        #expect(IPTablesDrift.compare(desired: IPTablesDrift.desired(counted), actual: kernel) == [])
        // Compiled without nfacct (what diff did before), the counting rules are drift.
        let items = IPTablesDrift.compare(desired: IPTablesDrift.desired(plain), actual: kernel)
        #expect(!items.isEmpty)
        #expect(items.allSatisfy { ($0.have ?? "").contains("nfacct") || ($0.want ?? "").contains("INVALID") }, "\(items)")
        #expect(items.contains { $0.kind == .extra && $0.object == "nat KUBE-NODEPORTS rule" }, "\(items)")
    }

    @Test func theTracerWalksThroughTheCountingRuleWithoutANote() throws {
        let p = try packet(nil, "127.0.0.1:3003")
        let withCounting = IPTablesTracer(compiled: counted, localAddresses: local).trace(p)
        let without = IPTablesTracer(compiled: plain, localAddresses: local).trace(p)
        #expect(!withCounting.endpointProbabilities.isEmpty)
        #expect(withCounting.endpointProbabilities == without.endpointProbabilities)
        #expect(!withCounting.notes.contains { $0.contains("nfacct") }, "\(withCounting.notes)")
    }
}
