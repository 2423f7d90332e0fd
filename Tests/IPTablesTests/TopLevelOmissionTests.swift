// Partial syncs leave unchanged top-level chains out, and the compile memory replays unchanged
// services: both against the stateful fake iptables and against the compiler without memory.

import ChainHashing
@testable import IPTables
import KernelKit
import Logging
import SluiceCore
import SluiceTesting
import Testing

private let logger = Logger(label: "test")

private func backend(_ fake: FakeIPTables) -> IPTablesBackend {
    IPTablesBackend(options: Fixtures.kubeProxyTestOptions, tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake, logger: logger)
}

private func events(_ docs: [String]) throws -> [ObjectEvent] {
    try ManifestEvents.events(docs.joined(separator: "\n---\n"))
}

/// The chains a restore text declares in `table`, or nil when the table is not in it.
private func declared(_ text: String, _ table: String) throws -> [String]? {
    let dump = try RestoreDump.parse(text)
    guard dump.tables.contains(where: { $0.name == table }) else { return nil }
    return dump.chains(table)
}

/// Service `i` of a mixed set: ClusterIP, NodePort, LoadBalancer with source ranges,
/// eTP=Local, iTP=Local and session affinity, in turn.
private func mixedService(_ i: Int) -> String {
    let ns = "ns\(i % 3)", name = "s\(i)", ip = "172.30.1.\(i)"
    let np = "[{name: p80, port: 80, protocol: TCP, nodePort: \(30000 + i)}]"
    switch i % 6 {
    case 0: return serviceYAML(ns, name, ip: ip)
    case 1: return serviceYAML(ns, name, ip: ip, type: "NodePort", ports: np)
    case 2: return serviceYAML(ns, name, ip: ip, type: "LoadBalancer", ports: np,
                               spec: "loadBalancerSourceRanges: [192.168.0.0/24]", status: "status: {loadBalancer: {ingress: [{ip: 5.6.7.\(i)}]}}")
    case 3: return serviceYAML(ns, name, ip: ip, type: "NodePort", ports: np, spec: "externalTrafficPolicy: Local")
    case 4: return serviceYAML(ns, name, ip: ip, spec: "internalTrafficPolicy: Local")
    default: return serviceYAML(ns, name, ip: ip, spec: "sessionAffinity: ClientIP\nsessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}")
    }
}

/// Endpoints of service `i` in round `r`: some local, some remote, some not ready.
private func mixedSlice(_ i: Int, round r: Int) -> String {
    var eps: [String] = []
    for k in 0..<((i + r) % 4) {
        let node = k == 0 ? "test-node" : "other"
        let ready = (i + k + r) % 5 == 0 ? ", conditions: {ready: false, serving: true, terminating: true}" : ""
        eps.append("{addresses: [10.180.\(i).\(k + 1 + r)], nodeName: \(node)\(ready)}")
    }
    return sliceYAML("ns\(i % 3)", "s\(i)", endpoints: "[\(eps.joined(separator: ", "))]")
}

@Suite struct TopLevelOmissionTests {
    let svcA = serviceYAML("ns1", "a", ip: "172.30.0.1", type: "NodePort", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30001}]")
    let sliceA = sliceYAML("ns1", "a", endpoints: "[{addresses: [10.180.0.1]}]")
    let svcB = serviceYAML("ns2", "b", ip: "172.30.0.2", type: "NodePort", ports: "[{name: p80, port: 80, protocol: TCP, nodePort: 30002}]")
    let sliceB = sliceYAML("ns2", "b", endpoints: "[{addresses: [10.180.0.2]}, {addresses: [10.180.0.3]}]")

    /// A backend after a full sync of services a and b, and its tracker.
    private func started() async throws -> (FakeIPTables, IPTablesBackend, ChangeTracker) {
        let fake = FakeIPTables()
        let b = backend(fake)
        var tracker = ChangeTracker(nodeName: "test-node")
        for e in try events([svcA, sliceA, svcB, sliceB]) { tracker.apply(e) }
        let report = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        #expect(report.full)
        return (fake, b, tracker)
    }

    @Test func endpointChangeWritesNoTopLevelChain() async throws {
        let (fake, b, started0) = try await started()
        var tracker = started0
        let servicesBefore = fake.rules("nat", "KUBE-SERVICES")
        let nodePortsBefore = fake.rules("nat", "KUBE-NODEPORTS")
        #expect(nodePortsBefore.count == 2)

        for e in try events([sliceYAML("ns2", "b", endpoints: "[{addresses: [10.180.0.2]}, {addresses: [10.180.0.4]}]")]) { tracker.apply(e) }
        let report = try await b.syncChanges(tracker.snapshot(.ipv4))
        let text = fake.restores.last!
        #expect(!report.full)
        for chain in Chain.natTopLevel {
            #expect(!text.contains(":\(chain) ") && !text.contains("-A \(chain) "), "\(chain) in\n\(text)")
        }
        #expect(try declared(text, "filter") == nil)  // nothing to write in filter: the table is left out
        let nat = try #require(try declared(text, "nat"))
        #expect(nat.allSatisfy { Chain.isServiceChain($0) })
        #expect(report.bytes == text.utf8.count)
        #expect(report.written[.iptablesRules(.filter)] == 0)
        #expect(report.written[.iptablesRules(.nat)] == text.split(separator: "\n").filter { $0.hasPrefix("-A ") }.count)
        #expect(report.total[.iptablesRules(.nat)]! > report.written[.iptablesRules(.nat)]!)
        // The kernel's top-level chains are untouched and the new endpoint is reachable.
        #expect(fake.rules("nat", "KUBE-SERVICES") == servicesBefore)
        #expect(fake.rules("nat", "KUBE-NODEPORTS") == nodePortsBefore)
        #expect(fake.chains("nat").contains { name in fake.rules("nat", name).contains { $0.contains("--to-destination 10.180.0.4:80") } })
        #expect(!fake.chains("nat").contains { name in fake.rules("nat", name).contains { $0.contains("10.180.0.3:80") } })
    }

    /// Adding a Service inserts its KUBE-SERVICES rule at its place (before the NodePort
    /// dispatch, which stays last) and deleting it deletes that rule: KUBE-SERVICES is edited,
    /// not declared and rewritten.
    @Test func addingAndDeletingAServiceEditsKubeServices() async throws {
        let (fake, b, started0) = try await started()
        var tracker = started0
        let before = fake.rules("nat", "KUBE-SERVICES")
        #expect(before.count == 3)  // a, b and the NodePort dispatch
        let svcC = serviceYAML("ns3", "c", ip: "172.30.0.3")
        for e in try events([svcC, sliceYAML("ns3", "c", endpoints: "[{addresses: [10.180.0.9]}]")]) { tracker.apply(e) }
        _ = try await b.syncChanges(tracker.snapshot(.ipv4))
        var text = fake.restores.last!
        let lines = text.split(separator: "\n")
        #expect(!lines.contains { $0.hasPrefix(":KUBE-SERVICES ") || $0.hasPrefix(":KUBE-NODEPORTS ") }, "\(text)")
        // Inserted at the head (no rule lookup), not at kube-proxy's position: the order of the
        // per-service rules is not part of the chain's meaning; the NodePort dispatch stays last.
        let inserts = lines.filter { $0.hasPrefix("-I KUBE-SERVICES ") }
        #expect(inserts.count == 1 && inserts[0].hasPrefix("-I KUBE-SERVICES 1 -m comment --comment \"ns3/c:p80 cluster IP\""), "\(text)")
        let after = fake.rules("nat", "KUBE-SERVICES")
        #expect(after.count == 4)
        #expect(Array(after[1...]) == before)
        #expect(after[0].contains("ns3/c:p80 cluster IP"))
        let cChains = fake.chains("nat").filter { name in Chain.isServiceChain(name) && fake.rules("nat", name).contains { $0.contains("ns3/c") } }
        #expect(cChains.count == 2)

        tracker.apply(.serviceDeleted(NamespacedName(namespace: "ns3", name: "c")))
        _ = try await b.syncChanges(tracker.snapshot(.ipv4))
        text = fake.restores.last!
        #expect(!text.contains(":KUBE-SERVICES "), "\(text)")
        let deletes = text.split(separator: "\n").filter { $0.hasPrefix("-D KUBE-SERVICES ") }.map(String.init)
        #expect(deletes == ["-D KUBE-SERVICES " + after[0]], "\(text)")
        // The rule goes before its chains: -D first, -X after.
        let d = try #require(text.range(of: "-D KUBE-SERVICES ")), x = try #require(text.range(of: "-X "))
        #expect(d.lowerBound < x.lowerBound)
        #expect(fake.rules("nat", "KUBE-SERVICES") == before)
        #expect(fake.chains("nat").isDisjoint(with: cChains))
    }

    /// A chain that changes too much for edits (here: its only rules replaced) is written whole.
    @Test func editsOnlyForSmallChanges() throws {
        let head = "-A KUBE-SERVICES -m comment --comment "
        let old = (0..<8).map { "\(head)r\($0) -j KUBE-SVC-\($0)" } + ["\(head)last -j KUBE-NODEPORTS"]
        var new = old
        new.insert("\(head)r3a -j KUBE-SVC-3A", at: 4)
        new.remove(at: 1)
        let edits = try #require(TopLevelEdits.edits(chain: Chain.services, from: old, to: new))
        #expect(edits == ["-D KUBE-SERVICES -m comment --comment r1 -j KUBE-SVC-1",
                          "-I KUBE-SERVICES 4 -m comment --comment r3a -j KUBE-SVC-3A"])
        // More than a quarter changed, a rule twice, or kept rules reordered: none.
        #expect(TopLevelEdits.edits(chain: Chain.services, from: old, to: Array(old[4...])) == nil)
        #expect(TopLevelEdits.edits(chain: Chain.services, from: old, to: old + [old[0]]) == nil)
        var swapped = old
        swapped.swapAt(0, 1)
        #expect(TopLevelEdits.edits(chain: Chain.services, from: old, to: swapped) == nil)
        // An insertion at the end is an append.
        let appended = try #require(TopLevelEdits.edits(chain: Chain.services, from: Array(old[..<8]), to: Array(old[..<8]) + ["\(head)z -j KUBE-SVC-Z"]))
        #expect(appended == ["\(head)z -j KUBE-SVC-Z"])
    }

    /// nat KUBE-SERVICES is edited without regard to the order of its per-service rules: new
    /// rules go to the head with `-I CHAIN 1`, in their own order; the NodePort dispatch stays
    /// last, and a change to it (or a rule twice, or too many changes) writes the chain whole.
    @Test func kubeServicesEditsIgnoreTheOrderOfServiceRules() throws {
        let head = "-A KUBE-SERVICES -m comment --comment "
        let last = "\(head)\"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
        let old = (0..<16).map { "\(head)r\($0) -j KUBE-SVC-\($0)" } + [last]
        var new = old
        new.insert("\(head)r3a -j KUBE-SVC-3A", at: 4)
        new.insert("\(head)r3b -j KUBE-SVC-3B", at: 5)
        new.remove(at: 1)
        let e = try #require(TopLevelEdits.unordered(chain: Chain.services, from: old, to: new))
        #expect(e.lines == ["-D KUBE-SERVICES -m comment --comment r1 -j KUBE-SVC-1",
                            "-I KUBE-SERVICES 1 -m comment --comment r3b -j KUBE-SVC-3B",
                            "-I KUBE-SERVICES 1 -m comment --comment r3a -j KUBE-SVC-3A"])
        #expect(e.result == [new[3], new[4]] + old.filter { $0 != old[1] })
        #expect(Set(e.result) == Set(new) && e.result.last == last)
        // From the kernel's order to the compiled one: the same rules, nothing to write.
        let same = try #require(TopLevelEdits.unordered(chain: Chain.services, from: e.result, to: new))
        #expect(same.lines.isEmpty && same.result == e.result)
        // The next edit starts from the kernel's order.
        let next = try #require(TopLevelEdits.unordered(chain: Chain.services, from: e.result, to: new.filter { !$0.contains("r3a ") }))
        #expect(next.lines == ["-D KUBE-SERVICES -m comment --comment r3a -j KUBE-SVC-3A"])
        #expect(next.result == e.result.filter { !$0.contains("r3a ") })
        // The dispatch changed, moved or missing; a rule twice; more than a quarter changed: none.
        let otherLast = last.replacingOccurrences(of: "LOCAL", with: "LOCAL ! -d 127.0.0.0/8")
        #expect(TopLevelEdits.unordered(chain: Chain.services, from: old, to: Array(old.dropLast()) + [otherLast]) == nil)
        #expect(TopLevelEdits.unordered(chain: Chain.services, from: old, to: [last] + old.dropLast()) == nil)
        #expect(TopLevelEdits.unordered(chain: Chain.services, from: old, to: Array(old.dropLast())) == nil)
        #expect(TopLevelEdits.unordered(chain: Chain.services, from: old, to: [old[0]] + old) == nil)
        #expect(TopLevelEdits.unordered(chain: Chain.services, from: old, to: Array(old[8...])) == nil)
    }

    @Test func losingEveryEndpointWritesTheFilterChain() async throws {
        let (fake, b, started0) = try await started()
        var tracker = started0
        for e in try events([sliceYAML("ns2", "b", endpoints: "[]")]) { tracker.apply(e) }
        _ = try await b.syncChanges(tracker.snapshot(.ipv4))
        var text = fake.restores.last!
        var dump = try RestoreDump.parse(text)
        #expect(dump.rules("filter", "KUBE-SERVICES").count == 1)
        #expect(dump.rules("filter", "KUBE-SERVICES").first?.contains("ns2/b:p80 has no endpoints") == true)
        #expect(dump.rules("filter", "KUBE-EXTERNAL-SERVICES").count == 1)  // the node port rejects too
        #expect(try declared(text, "filter")?.contains("KUBE-FORWARD") == false)
        #expect(dump.rules("nat", "KUBE-SERVICES").count == 2)  // a and the NodePort dispatch
        #expect(dump.rules("nat", "KUBE-NODEPORTS").count == 1)
        #expect(fake.rules("filter", "KUBE-SERVICES").count == 1)

        // Endpoints back: the filter chains are written again, now empty.
        for e in try events([sliceB]) { tracker.apply(e) }
        _ = try await b.syncChanges(tracker.snapshot(.ipv4))
        text = fake.restores.last!
        dump = try RestoreDump.parse(text)
        #expect(try declared(text, "filter") == ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"])
        #expect(dump.rules("filter", "KUBE-SERVICES").isEmpty)
        #expect(fake.rules("filter", "KUBE-SERVICES").isEmpty)
        #expect(fake.rules("nat", "KUBE-SERVICES").count == 3)
    }

    @Test func failedRestoreMakesTheNextSyncFullEvenWhenAskedPartial() async throws {
        let (fake, b, started0) = try await started()
        var tracker = started0
        for e in try events([sliceYAML("ns2", "b", endpoints: "[{addresses: [10.180.0.7]}]")]) { tracker.apply(e) }
        fake.failRestores(1)
        await #expect(throws: IPTablesError.self) { try await b.syncChanges(tracker.snapshot(.ipv4)) }
        let report = try await b.syncChanges(tracker.snapshot(.ipv4))
        #expect(report.full)
        let text = fake.restores.last!
        for chain in Chain.natTopLevel { #expect(try declared(text, "nat")?.contains(chain) == true, "\(chain)") }
        for chain in Chain.filterTopLevel { #expect(try declared(text, "filter")?.contains(chain) == true, "\(chain)") }
        #expect(fake.chains("nat").contains { name in fake.rules("nat", name).contains { $0.contains("--to-destination 10.180.0.7:80") } })

        // Then partial again, leaving the top-level chains out.
        for e in try events([sliceYAML("ns2", "b", endpoints: "[{addresses: [10.180.0.8]}]")]) { tracker.apply(e) }
        let next = try await b.syncChanges(tracker.snapshot(.ipv4))
        #expect(!next.full)
        #expect(!fake.restores.last!.contains("KUBE-SERVICES"))
    }

    @Test func missingCanaryLeadsToAFullRewrite() async throws {
        let (fake, b, tracker) = try await started()
        let runner = SyncRunner(tracker: tracker, backend: b, clock: ManualClock(), logger: logger)
        await runner.syncOnce()  // the runner's first sync is full
        fake.externalFlush("nat")
        #expect(await b.externalChangeDetected())
        await runner.syncOnce()
        #expect(await runner.counters.fullSyncs == 2)
        let text = fake.restores.last!
        for chain in Chain.natTopLevel { #expect(try declared(text, "nat")?.contains(chain) == true, "\(chain)") }
        #expect(fake.rules("nat", "KUBE-SERVICES").count == 3)
        #expect(fake.rules("nat", "KUBE-NODEPORTS").count == 2)
    }

    @Test func cleanupForgetsWhatWasApplied() async throws {
        let (fake, b, tracker) = try await started()
        try await b.cleanup()
        var t = tracker
        let report = try await b.syncChanges(t.snapshot(.ipv4))  // asked partial, made full
        #expect(report.full)
        #expect(fake.rules("nat", "KUBE-SERVICES").count == 3)
    }

    /// The memory's replay gives the same batch, deletions, counts and chains as compiling
    /// every service port, over rounds of endpoint changes, deletions and additions.
    @Test func compileMemoryMatchesCompilingEverything() throws {
        let compiler = IPTablesCompiler(options: Fixtures.kubeProxyTestOptions)
        var tracker = ChangeTracker(nodeName: "test-node")
        for i in 0..<36 { for e in try events([mixedService(i), mixedSlice(i, round: 0)]) { tracker.apply(e) } }
        var memory = IPTablesCompileMemory()
        var state = tracker.snapshot(.ipv4)
        let full = compiler.compile(state, kind: .full, memory: &memory)
        #expect(full.restoreText == compiler.compile(state).restoreText)
        #expect(memory.isValid)
        var previous = full.activeNATChains

        for round in 1...4 {
            for i in stride(from: round, to: 36, by: 3) { for e in try events([mixedSlice(i, round: round)]) { tracker.apply(e) } }
            tracker.apply(.serviceDeleted(NamespacedName(namespace: "ns\(round % 3)", name: "s\(round)")))
            for e in try events([mixedService(40 + round), mixedSlice(40 + round, round: round)]) { tracker.apply(e) }
            if round > 1 { for e in try events([mixedService(round - 1)]) { tracker.apply(e) } }
            state = tracker.snapshot(.ipv4)
            let kind = SyncKind.partial(changed: state.changedServices)
            let replayed = compiler.compile(state, kind: kind, existingChains: [], memory: &memory)
            let direct = compiler.compile(state, kind: kind, existingChains: previous)
            #expect(replayed.restoreText == direct.restoreText, "round \(round)")
            #expect(replayed.deletedChains == direct.deletedChains, "round \(round)")
            #expect(!replayed.deletedChains.isEmpty, "round \(round)")
            #expect(replayed.totalRules == direct.totalRules, "round \(round)")
            #expect(replayed.noLocalEndpoints == direct.noLocalEndpoints, "round \(round)")
            #expect(replayed.activeNATChains == direct.activeNATChains, "round \(round)")
            #expect(replayed.totalRules == compiler.compile(state).totalRules, "round \(round)")
            previous = direct.activeNATChains
        }

        // The remembered chain names are kube-proxy's hashes.
        var checked = 0
        for (name, info) in state.servicePorts {
            let names = try #require(memory.chainNames(for: name))
            #expect(names.service == ChainHash.servicePort(name))
            for (ep, sep) in names.endpoints {
                #expect(sep == "KUBE-SEP-" + ChainHash.endpoint(name, ep))
                checked += 1
            }
            _ = info
        }
        #expect(checked > 20)

        // An invalidated memory compiles everything again, with the same result.
        memory.invalidate()
        let again = compiler.compile(state, kind: .partial(changed: []), existingChains: previous, memory: &memory)
        #expect(again.restoreText == compiler.compile(state, kind: .partial(changed: []), existingChains: previous).restoreText)
        #expect(memory.isValid)
    }

    @Test func omittingNeedsEqualRules() throws {
        let state = try Fixtures.state([svcA, sliceA].joined(separator: "\n---\n"))
        let compiled = IPTablesCompiler(options: Fixtures.kubeProxyTestOptions).compile(state)
        // Nothing applied yet: nothing left out.
        let (same, none, top) = compiled.omittingUnchangedTopLevelChains(TopLevelRules())
        #expect(none.isEmpty && same.restoreText == compiled.restoreText)
        #expect(top == compiled.topLevelRules())
        // Everything applied: every top-level chain left out, the service chains kept.
        let applied = compiled.topLevelRules()
        let (rest, omitted, _) = compiled.omittingUnchangedTopLevelChains(applied)
        #expect(Set(omitted) == Set(Chain.natTopLevel.map { "nat/" + $0 } + (Chain.filterTopLevel + [Chain.kubeletFirewall]).map { "filter/" + $0 }))
        #expect(try declared(rest.restoreText, "filter") == nil)
        #expect(try declared(rest.restoreText, "nat")?.allSatisfy { Chain.isServiceChain($0) } == true)
        // One rule different: that chain alone is written.
        var changed = applied
        changed.chains[.nat]?["KUBE-NODEPORTS"]?.append("-A KUBE-NODEPORTS -j RETURN")
        let (one, omittedOne, _) = compiled.omittingUnchangedTopLevelChains(changed)
        #expect(omittedOne.count == omitted.count - 1)
        #expect(try declared(one.restoreText, "nat")?.contains("KUBE-NODEPORTS") == true)
    }
}
