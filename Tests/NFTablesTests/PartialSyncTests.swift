// Partial syncs: the minimal transaction between two rulesets, kube-proxy's delayed deletion
// of stale chains, and the invariant that full(prev) + partial(prev -> next) leaves the same
// table as full(next).

import NFTables
import SluiceCore
import Testing

/// A backend in miniature: it keeps the applied ruleset and the stale-chain record, runs the
/// deletion transaction first, then a partial transaction when it can and a full one otherwise.
struct Driver {
    var options: NFTablesOptions
    var model: NFTModel
    var applied: NFTRuleset?
    var stale = NFTStaleChains()
    var now = ContinuousClock.now
    var lastTransaction: NFTTransaction?
    var lastDeletion: NFTTransaction?
    var lastWasPartial = false

    init(options: NFTablesOptions = KubeProxyFake.options()) {
        self.options = options
        self.model = NFTModel(family: NFTFamily(options.family).rawValue)
    }

    mutating func sync(_ state: ProxyState, forceFull: Bool = false) throws {
        lastDeletion = stale.takeDeletionTransaction(family: NFTFamily(options.family), now: now)
        if let d = lastDeletion { try model.apply(d.text) }
        let compiler = NFTablesCompiler(options: options)
        var tx: NFTTransaction?
        var next: NFTRuleset?
        if !forceFull, let previous = applied {
            // The backend's path: update in place and render from the delta; cross-checked
            // against the diff of the two rulesets.
            var rs = previous
            if let delta = compiler.update(&rs, to: state, changed: state.changedServices) {
                let fromDelta = rs.partialTransaction(delta)
                let fromDiff = rs.partialTransaction(from: previous, changedPorts: delta.changedPorts)
                if fromDiff?.text != fromDelta.text { throw ModelError("delta and diff transactions differ") }
                tx = fromDelta
            }
            if tx != nil { next = rs }
        }
        if next == nil { next = compiler.compile(state) }
        lastWasPartial = tx != nil
        if tx == nil {
            let existing = NFTExistingObjects(chains: Set(model.chains.keys), sets: Set(model.containers.keys))
            tx = next!.fullTransaction(recreateBaseChains: applied == nil, existing: existing)
        }
        try model.apply(tx!.text)
        stale.record(tx!, at: now)
        applied = next!
        lastTransaction = tx
    }

    /// Makes the stale chains old enough to be deleted by the next sync.
    mutating func age() { now = now + .seconds(2) }

    /// The model with every stale chain deleted (checks they are deletable).
    func settled() throws -> NFTModel {
        var m = model
        var s = stale
        if let d = s.takeDeletionTransaction(family: NFTFamily(options.family), now: now + .seconds(60)) { try m.apply(d.text) }
        return m
    }
}

private let ns1 = spn("ns1", "svc1"), ns2 = spn("ns2", "svc2", "p8080"), ns3 = spn("ns3", "svc3"), ns4 = spn("ns4", "svc4")

/// TestSyncProxyRulesRepeated, step by step.
@Suite struct SyncRepeatedTests {
    @Test func kubeProxySequence() throws {
        var d = Driver()
        var ports: [ServicePortName: (ServicePortInfo, [EndpointInfo])] = [
            ns1: (svc(ns1, "172.30.0.41"), [ep("10.0.1.1")]),
            ns2: (svc(ns2, "172.30.0.42", port: 8080), [ep("10.0.2.1", 8080)]),
        ]
        func state(_ changed: [ServicePortName]) -> ProxyState {
            makeState(Array(ports.values), changed: Set(changed.map(\.service)))
        }
        try d.sync(state([]))
        #expect(!d.lastWasPartial)
        #expect(d.model.chains["service-ULMVA6XW-ns1/svc1/tcp/p80"]?.rules.count == 2)
        #expect(d.model.chains["endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080"]?.rules.count == 2)

        // Add a service and its endpoints: 2 elements, 2 chains with 2 rules each.
        ports[ns3] = (svc(ns3, "172.30.0.43"), [ep("10.0.3.1")])
        try d.sync(state([ns3]))
        #expect(d.lastWasPartial)
        #expect(d.lastTransaction?.operationCount == 10)
        #expect(d.model.containers["service-ips"]?.values["172.30.0.43 . tcp . 80"] == "goto service-4AT6LBPK-ns3/svc3/tcp/p80")

        // Delete a service: its chains are flushed, not deleted (2 elements + 2 flushes).
        ports[ns2] = nil
        try d.sync(state([ns2]))
        #expect(d.lastTransaction?.operationCount == 4)
        #expect(d.model.chains["service-MHHHYRWA-ns2/svc2/tcp/p8080"] == NFTModel.Chain(suffix: "", rules: []))
        #expect(d.model.chains["endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080"]?.rules == [])
        #expect(d.stale.count == 2)

        // Time passes: the stale chains go in their own transaction; the main one is empty.
        d.age()
        try d.sync(state([]))
        #expect(d.lastDeletion?.commands == [
            "delete chain ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080",
            "delete chain ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080",
        ])
        #expect(d.lastTransaction?.operationCount == 0)
        #expect(d.model.chains["service-MHHHYRWA-ns2/svc2/tcp/p8080"] == nil)

        // A service without endpoints: cluster-ips and no-endpoint-services only.
        ports[ns4] = (svc(ns4, "172.30.0.44"), [])
        try d.sync(state([ns4]))
        #expect(d.lastTransaction?.operationCount == 2)
        #expect(d.model.containers["no-endpoint-services"]?.elements["172.30.0.44 . tcp . 80"]
            == "172.30.0.44 . tcp . 80 comment \"ns4/svc4:p80\" : goto reject-chain")

        // Its endpoints arrive: 2 element changes + 2 chains.
        ports[ns4] = (svc(ns4, "172.30.0.44"), [ep("10.0.4.1")])
        try d.sync(state([ns4]))
        #expect(d.lastTransaction?.operationCount == 10)
        #expect(d.model.containers["no-endpoint-services"]?.elements.isEmpty == true)

        // An endpoint changes: service chain + new endpoint chain rewritten, old one flushed.
        ports[ns3] = (svc(ns3, "172.30.0.43"), [ep("10.0.3.2")])
        try d.sync(state([ns3]))
        #expect(d.lastTransaction?.operationCount == 9)
        #expect(d.model.chains["endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80"]?.rules == [])
        #expect(d.model.chains["service-4AT6LBPK-ns3/svc3/tcp/p80"]?.rules.last
            == "numgen random mod 1 vmap { 0 : goto endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 }")
        d.age()

        // An endpoint is added. kube-proxy rewrites all three chains (12 operations); only the
        // service chain and the new endpoint chain change (8).
        ports[ns3] = (svc(ns3, "172.30.0.43"), [ep("10.0.3.2"), ep("10.0.3.3")])
        try d.sync(state([ns3]))
        #expect(d.lastDeletion?.commands == ["delete chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80"])
        #expect(d.lastTransaction?.operationCount == 8)
        #expect(d.model.chains["service-4AT6LBPK-ns3/svc3/tcp/p80"]?.rules.last
            == "numgen random mod 2 vmap { 0 : goto endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 , 1 : goto endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80 }")

        // Endpoints emptied: 2 element changes, 3 chains flushed and stale.
        ports[ns3] = (svc(ns3, "172.30.0.43"), [])
        try d.sync(state([ns3]))
        #expect(d.lastTransaction?.operationCount == 5)
        #expect(Set(d.stale.flushedAt.keys) == [
            "service-4AT6LBPK-ns3/svc3/tcp/p80", "endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80",
            "endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80",
        ])

        // Restored at once: the chains are written again and no longer stale (14 operations).
        ports[ns3] = (svc(ns3, "172.30.0.43"), [ep("10.0.3.2"), ep("10.0.3.3")])
        try d.sync(state([ns3]))
        #expect(d.lastTransaction?.operationCount == 14)
        #expect(d.stale.count == 0)
        let restored = d.model

        // Emptied and restored after the stale chains aged: deleted first, then recreated.
        ports[ns3] = (svc(ns3, "172.30.0.43"), [])
        try d.sync(state([ns3]))
        d.age()
        ports[ns3] = (svc(ns3, "172.30.0.43"), [ep("10.0.3.2"), ep("10.0.3.3")])
        try d.sync(state([ns3]))
        #expect(d.lastDeletion?.operationCount == 3)
        #expect(d.model == restored)

        // No change: nothing to send.
        try d.sync(state([]))
        #expect(d.lastTransaction?.operationCount == 0)
        #expect(d.model == restored)
        #expect(try d.settled() == fullModel(state([]), options: d.options))
    }
}

/// full(prev) then partial(prev -> next) equals full(next), over a sequence of changes.
@Suite struct PartialEqualsFullTests {
    typealias Ports = [ServicePortName: (ServicePortInfo, [EndpointInfo])]

    static let a = spn("default", "a"), b = spn("default", "b"), c = spn("other", "c", "dns", .udp)
    static let m1 = spn("multi", "m", "http"), m2 = spn("multi", "m", "https")
    static let x = spn("default", "x"), y = spn("default", "y")

    /// Each step: a mutation of the ports and the Services it touches.
    static func steps() -> [(String, (inout Ports) -> Void, [ServicePortName])] {
        [
            ("add service", { $0[b] = (svc(b, "172.30.0.2"), [ep("10.0.0.5"), ep("10.0.0.6")]) }, [b]),
            ("endpoint change", { $0[a] = (svc(a, "172.30.0.1"), [ep("10.0.0.2"), ep("10.0.0.9")]) }, [a]),
            ("affinity on", { $0[b] = (svc(b, "172.30.0.2", affinity: 10800), $0[b]!.1) }, [b]),
            ("affinity timeout", { $0[b] = (svc(b, "172.30.0.2", affinity: 60), $0[b]!.1) }, [b]),
            ("affinity endpoint change", { $0[b] = ($0[b]!.0, [ep("10.0.0.6"), ep("10.0.0.7")]) }, [b]),
            ("affinity off", { $0[b] = (svc(b, "172.30.0.2"), $0[b]!.1) }, [b]),
            ("make LB", { $0[a] = (svc(a, "172.30.0.1", nodePort: 30001, lb: ["1.2.3.4"], sourceRanges: ["203.0.113.0/25"]), $0[a]!.1) }, [a]),
            ("eTP local, no local endpoints", { $0[a] = (svc(a, "172.30.0.1", nodePort: 30001, lb: ["1.2.3.4"], eTPLocal: true), $0[a]!.1) }, [a]),
            ("local endpoint", { $0[a] = ($0[a]!.0, [ep("10.0.0.2"), ep("10.0.0.9", local: true)]) }, [a]),
            ("terminating fallback", { $0[a] = ($0[a]!.0, [ep("10.0.0.2"), ep("10.0.0.9", local: true, ready: false, terminating: true)]) }, [a]),
            ("eTP cluster", { $0[a] = (svc(a, "172.30.0.1", nodePort: 30001, lb: ["1.2.3.4"]), $0[a]!.1) }, [a]),
            ("iTP local", { $0[b] = (svc(b, "172.30.0.2", iTPLocal: true), $0[b]!.1) }, [b]),
            ("external IP", { $0[c] = (svc(c, "172.30.0.3", port: 53, externalIPs: ["192.168.99.33"]), [ep("10.0.1.1", 53)]) }, [c]),
            ("endpoints emptied", { $0[c] = ($0[c]!.0, []) }, [c]),
            ("multi-port service", {
                $0[m1] = (svc(m1, "172.30.0.9", port: 80), [ep("10.0.2.1", 8080)])
                $0[m2] = (svc(m2, "172.30.0.9", port: 443), [ep("10.0.2.1", 8443)])
            }, [m1]),
            ("one port removed", { $0[m1] = nil }, [m1]),
            ("conflicting external IPs", {
                $0[x] = (svc(x, "172.30.0.20", externalIPs: ["192.168.99.50"]), [ep("10.0.3.1")])
                $0[y] = (svc(y, "172.30.0.21", externalIPs: ["192.168.99.50"]), [ep("10.0.3.2")])
            }, [x, y]),
            ("conflict winner removed", { $0[x] = nil }, [x]),
            ("delete service", { $0[a] = nil }, [a]),
            ("delete all", { $0 = [:] }, [b, c, m2, y]),
        ]
    }

    @Test func sequence() throws {
        var ports: Ports = [Self.a: (svc(Self.a, "172.30.0.1"), [ep("10.0.0.2")])]
        var d = Driver()
        try d.sync(makeState(Array(ports.values)))
        for (i, (name, mutate, touched)) in Self.steps().enumerated() {
            mutate(&ports)
            let state = makeState(Array(ports.values), changed: Set(touched.map(\.service)))
            try d.sync(state)
            #expect(d.lastWasPartial, "\(name)")
            let want = try fullModel(state, options: d.options)
            let got = try d.settled()
            #expect(got == want, "\(name)")
            if got != want, let diff = firstDifference(sortNFT(got.dump()), sortNFT(want.dump())) {
                Issue.record("\(name): \(diff)")
            }
            // Stale chains are deleted by the next sync on every other step only, so some
            // stale chains are revived before deletion.
            if i % 2 == 1 { d.age() }
        }
    }

    /// A full sync over a table that holds an older ruleset leaves the same table as a full
    /// sync into an empty one, once the stale chains are deleted.
    @Test func fullOverExistingTable() throws {
        var ports: Ports = [Self.a: (svc(Self.a, "172.30.0.1", affinity: 100), [ep("10.0.0.2"), ep("10.0.0.3")]),
                            Self.b: (svc(Self.b, "172.30.0.2"), [ep("10.0.0.5")])]
        var d = Driver()
        try d.sync(makeState(Array(ports.values)))
        ports[Self.a] = (svc(Self.a, "172.30.0.1"), [ep("10.0.0.4")])
        ports[Self.b] = nil
        let state = makeState(Array(ports.values))
        try d.sync(state, forceFull: true)
        #expect(!d.lastWasPartial)
        #expect(d.lastTransaction!.flushedStaleChains.count == 4)
        #expect(!d.model.containers.keys.contains { $0.hasPrefix("affinity-") })
        #expect(try d.settled() == fullModel(state, options: d.options))
    }

    /// A table left by kube-proxy v1.33 (base chains `filter-prerouting` at -110 and
    /// `filter-output-post-dnat` at -90): a full sync removes the old hooks.
    @Test func fullOverOlderKubeProxyLayout() throws {
        var m = NFTModel()
        try m.apply("""
            add table ip kube-proxy { comment "rules for kube-proxy" ; }
            add chain ip kube-proxy firewall-check
            add chain ip kube-proxy cluster-ips-check
            add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }
            add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }
            add rule ip kube-proxy filter-prerouting ct state new jump firewall-check
            add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check
            add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
            """)
        let state = makeState([(svc(Self.a, "172.30.0.1"), [ep("10.0.0.2")])])
        let rs = NFTablesCompiler(options: KubeProxyFake.options()).compile(state)
        let tx = rs.fullTransaction(recreateBaseChains: true, existing: NFTExistingObjects(chains: Set(m.chains.keys), sets: []))
        try m.apply(tx.text)
        #expect(m.chains["filter-prerouting"] == nil)
        #expect(m.chains["filter-output-post-dnat"] == nil)
        #expect(tx.flushedStaleChains == ["service-ULMVA6XW-ns1/svc1/tcp/p80"])
        m.chains["service-ULMVA6XW-ns1/svc1/tcp/p80"] = nil
        #expect(m == (try fullModel(state, options: KubeProxyFake.options())))
    }

    /// Changing the fixed part (the node's NodePort addresses) needs a full sync.
    @Test func fixedPartChangeRefusesPartial() {
        let state = makeState([(svc(Self.a, "172.30.0.1"), [ep("10.0.0.2")])])
        let old = NFTablesCompiler(options: KubeProxyFake.options()).compile(state)
        let newCompiler = NFTablesCompiler(options: KubeProxyFake.options(nodePortAddresses: .all))
        let result = newCompiler.compile(state, previous: old, changed: [])
        #expect(!result.incremental)
        #expect(result.ruleset.partialTransaction(from: old, changedPorts: result.changedPorts) == nil)
    }

    /// The incremental compile gives the same ruleset as a compile from scratch.
    @Test func incrementalCompileEqualsScratch() {
        let compiler = NFTablesCompiler(options: KubeProxyFake.options())
        var ports: Ports = [:]
        for i in 0..<50 {
            let n = spn("ns\(i % 5)", "s\(i)")
            ports[n] = (svc(n, "172.30.1.\(i)", nodePort: i % 3 == 0 ? 30000 + i : 0), (0..<(i % 4)).map { ep("10.1.\(i).\($0)") })
        }
        var rs = compiler.compile(makeState(Array(ports.values)))
        let changedName = spn("ns2", "s7")
        ports[changedName] = (ports[changedName]!.0, [ep("10.9.9.9")])
        let removed = spn("ns1", "s11")
        ports[removed] = nil
        let state = makeState(Array(ports.values), changed: [changedName.service, removed.service])
        let result = compiler.compile(state, previous: rs, changed: state.changedServices)
        #expect(result.incremental)
        #expect(result.changedPorts == [changedName, removed])
        rs = result.ruleset
        let scratch = compiler.compile(state)
        #expect(rs.fullTransaction().text == scratch.fullTransaction().text)
    }
}

/// kube-proxy's delayed deletion: a chain flushed at t is deleted by the first sync after
/// t + 1 s, in its own transaction; a chain written again in between is forgotten.
@Suite struct StaleChainTests {
    @Test func graceAndRevival() throws {
        let t0 = ContinuousClock.now
        var stale = NFTStaleChains()
        let rs = NFTablesCompiler(options: KubeProxyFake.options()).compile(makeState([(svc(spn("a", "b"), "172.30.0.1"), [ep("10.0.0.1")])]))
        let old = NFTablesCompiler(options: KubeProxyFake.options()).compile(
            makeState([(svc(spn("a", "b"), "172.30.0.1"), [ep("10.0.0.1"), ep("10.0.0.2")]),
                       (svc(spn("c", "d"), "172.30.0.2"), [ep("10.0.0.3")])]))
        let tx = rs.partialTransaction(from: old, changedPorts: [spn("a", "b"), spn("c", "d")])!
        #expect(tx.flushedStaleChains.count == 3)  // endpoint 10.0.0.2, c/d's service and endpoint chains
        stale.record(tx, at: t0)
        let early = stale.takeDeletionTransaction(family: .ip, now: t0 + .milliseconds(900))
        #expect(early == nil)
        #expect(stale.count == 3)
        // c/d comes back before the grace period is over: its chains are written again.
        let back = old.partialTransaction(from: rs, changedPorts: [spn("c", "d")])!
        stale.record(back, at: t0 + .milliseconds(950))
        #expect(stale.count == 1)
        let due = stale.takeDeletionTransaction(family: .ip, now: t0 + .milliseconds(1500))
        let del = try #require(due)
        #expect(del.commands == ["delete chain ip kube-proxy endpoint-\(NFTChainNames.endpointBase(spn("a", "b"), ip: IPAddress("10.0.0.2")!, port: 80))"])
        #expect(stale.count == 0)
        stale.record(tx, at: t0)
        stale.reset()
        #expect(stale.count == 0)
    }
}
