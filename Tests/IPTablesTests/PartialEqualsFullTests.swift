// The invariant of partial syncs that leave unchanged top-level chains out and replay unchanged
// Services from the compile memory: after every partial sync, the (fake) kernel holds exactly
// what a full sync of the same state into an empty kernel leaves there. Walked through the
// benchmark smoke run's sequence of changes (benchmarks/sluicebench/run.py: add, delete and
// change of the probe Service's endpoint, repeated, then the churn storm in one sync).

import IPTables
import KernelKit
import Logging
import SluiceCore
import SluiceTesting
import Testing

private let logger = Logger(label: "test")

/// table -> chain -> rules, of the tables a backend writes.
private typealias KernelRules = [String: [String: [String]]]

private func kernel(_ fake: FakeIPTables) -> KernelRules {
    var out: KernelRules = [:]
    for t in ["filter", "nat", "mangle"] {
        var chains: [String: [String]] = [:]
        for c in fake.chains(t) { chains[c] = fake.rules(t, c) }
        out[t] = chains
    }
    return out
}

/// A backend whose full syncs go in batches of `batching` chains; with 0, in one batch compiled
/// in pieces of 25 chains (the legacy back end at scale); with nil, in one batch compiled whole.
private func newBackend(_ fake: FakeIPTables, batching: Int? = 0) -> IPTablesBackend {
    IPTablesBackend(options: Fixtures.kubeProxyTestOptions, tools: IPTablesTools(variant: .auto, family: .ipv4),
                    runner: fake, logger: logger,
                    batching: batching.map { FullSyncBatching(chainsPerBatch: $0, compileInPiecesAbove: 25) } ?? .classic)
}

/// What a full sync of `state` leaves in an empty kernel.
private func fullSyncKernel(_ state: ProxyState) async throws -> KernelRules {
    let fake = FakeIPTables()
    _ = try await newBackend(fake, batching: nil).sync(state, kind: .full)
    return kernel(fake)
}

/// A chain's rules in the order that carries meaning: as they are, except nat KUBE-SERVICES,
/// whose per-service rules (each on its own destination, in any order: partial syncs insert at
/// the head) are sorted, while the trailing NodePort dispatch must stay the trailing rules.
private func meaningful(_ table: String, _ chain: String, _ rules: [String]) -> [String] {
    guard table == "nat" && chain == "KUBE-SERVICES" else { return rules }
    var k = rules.count
    while k > 0 && rules[k - 1].hasSuffix(" -j KUBE-NODEPORTS") { k -= 1 }
    // A NodePort jump before other rules is out of place: keep the order as it is.
    if rules[..<k].contains(where: { $0.hasSuffix(" -j KUBE-NODEPORTS") }) { return rules }
    return rules[..<k].sorted() + rules[k...]
}

/// The differences between two kernels, one line each (empty when equal).
private func differences(_ got: KernelRules, _ want: KernelRules) -> [String] {
    var out: [String] = []
    for t in Set(got.keys).union(want.keys).sorted() {
        let g = got[t] ?? [:], w = want[t] ?? [:]
        for c in Set(g.keys).union(w.keys).sorted() {
            switch (g[c].map { meaningful(t, c, $0) }, w[c].map { meaningful(t, c, $0) }) {
            case (nil, _): out.append("\(t)/\(c): missing")
            case (_, nil): out.append("\(t)/\(c): should not exist")
            case let (a?, b?) where a != b:
                out.append("\(t)/\(c): has \(a.count) rules, a full sync \(b.count): -\(b.filter { !a.contains($0) }) +\(a.filter { !b.contains($0) })")
            default: break
            }
        }
    }
    return out
}

// The benchmark's fixture (benchmarks/sluicebench/fixtures.py), in YAML the tracker reads.
private let remoteNode = "bench-node-2"

private func benchService(_ name: String, ip: String, ports: [(String, String, Int, Int)]) -> String {
    let p = ports.map { "{name: \($0.0), protocol: \($0.1), port: \($0.2), targetPort: \($0.3)}" }.joined(separator: ", ")
    return serviceYAML("bench", name, ip: ip, ports: "[\(p)]")
}

private func benchSlice(_ name: String, ports: [(String, String, Int, Int)], addresses: [String]) -> String {
    let p = ports.map { "{name: \($0.0), port: \($0.3), protocol: \($0.1)}" }.joined(separator: ", ")
    let eps = addresses.map { "{addresses: [\($0)], conditions: {ready: true}, nodeName: \(remoteNode)}" }.joined(separator: ", ")
    return sliceYAML("bench", name, name: name + "-bench", ports: "[\(p)]", endpoints: "[\(eps)]")
}

private let probePorts = [("dns", "UDP", 53, 5353), ("http", "TCP", 80, 8080)]

/// The probe Service (svc-00000) with its one endpoint in `generation`.
private func probe(generation: Int) -> [String] {
    [benchService("svc-00000", ip: "10.96.0.16", ports: probePorts),
     benchSlice("svc-00000", ports: probePorts, addresses: ["10.244.\(16 + generation).10"])]
}

/// Service `i` > 0 with `e` endpoints; generation 1 moves the first one.
private func coldService(_ i: Int, e: Int, generation: Int) -> [String] {
    let ports = [("http", "TCP", 80, 8080)]
    var addrs = (0..<e).map { j -> String in
        let n = 0x0A80_0001 + i * e + j  // 10.128.0.1 + i*e + j
        return "\(n >> 24).\((n >> 16) & 255).\((n >> 8) & 255).\(n & 255)"
    }
    if generation == 1 { addrs[0] = "10.192.\(i >> 8).\((i & 255) + 1)" }
    let name = "svc-" + String(repeating: "0", count: 5 - String(i).count) + String(i)
    let n = 0x0A60_0010 + i  // 10.96.0.16 + i
    return [benchService(name, ip: "\(n >> 24).\((n >> 16) & 255).\((n >> 8) & 255).\(n & 255)", ports: ports),
            benchSlice(name, ports: ports, addresses: addrs)]
}

private let added = [benchService("svc-added", ip: "10.111.0.10", ports: [("dns", "UDP", 53, 5353)]),
                     benchSlice("svc-added", ports: [("dns", "UDP", 53, 5353)], addresses: ["10.244.18.10"])]

/// Every per-service chain reachable from `chain`, with its rules.
private func reachable(_ k: KernelRules, from chain: String) -> [String: [String]] {
    var out: [String: [String]] = [:]
    var todo = [chain]
    while let c = todo.popLast() {
        guard out[c] == nil, let rules = k["nat"]?[c] else { continue }
        out[c] = rules
        for r in rules {
            if let t = r.split(separator: " ").last.map(String.init), Chain.isServiceChain(t) { todo.append(t) }
        }
    }
    return out
}

/// For every KUBE-SERVICES and KUBE-NODEPORTS rule of `k`: the chains it leads to are exactly
/// what they were in `before` or what they are in `after` (never missing, half written or
/// mixed). Returns the rules for which that does not hold.
private func halfWritten(_ k: KernelRules, before: KernelRules, after: KernelRules) -> [String] {
    var bad: [String] = []
    for top in [Chain.services, Chain.nodePorts] {
        for r in k["nat"]?[top] ?? [] {
            guard let t = r.split(separator: " ").last.map(String.init), Chain.isServiceChain(t) else { continue }
            let now = reachable(k, from: t)
            if now != reachable(before, from: t) && now != reachable(after, from: t) { bad.append("\(top): \(r)") }
        }
    }
    return bad
}

/// The kernel tables recorded after each restore, as `KernelRules`.
private func recorded(_ fake: FakeIPTables) -> [KernelRules] { fake.statesAfterRestores }

@Suite struct PartialEqualsFullTests {
    /// The smoke run's sequence for S Services: after every partial sync the fake kernel equals
    /// a full sync of the same state, and the probe Service's cluster IP leads to its endpoint
    /// of the current generation. With `batching` > 0 the full syncs (the first and a periodic
    /// one in the middle) are cut into batches of that many chains, as on the nft back end; with
    /// 0 they are one batch, as on the legacy one. Adding and deleting a Service edit
    /// KUBE-SERVICES (`-I`/`-D`) instead of rewriting it once it holds enough rules.
    @Test(arguments: [1, 100], [nil, 0, 25])
    func benchSequenceKeepsTheKernelEqualToAFullSync(services s: Int, batching: Int?) async throws {
        let fake = FakeIPTables()
        let backend = newBackend(fake, batching: batching)
        var tracker = ChangeTracker(nodeName: "test-node")
        func apply(_ docs: [String]) throws {
            for e in try ManifestEvents.events(docs.joined(separator: "\n---\n")) { tracker.apply(e) }
        }
        var generation = 0, churnGeneration = 0
        try apply(probe(generation: 0))
        for i in 1..<s { try apply(coldService(i, e: 10, generation: 0)) }
        let first = tracker.snapshot(.ipv4)
        _ = try await backend.sync(first, kind: .full)
        #expect(differences(kernel(fake), try await fullSyncKernel(first)).isEmpty)
        // 99 Services of 11 chains and the probe's 4, in batches of at least 25 chains (3 Services):
        // 34 batches of service chains and the top-level one. Otherwise one batch.
        #expect(fake.restores.count == (s == 100 && (batching ?? 0) > 0 ? 35 : 1), "\(fake.restores.count) restores")

        var step = 0
        func partialSync(_ what: String) async throws {
            step += 1
            let state = tracker.snapshot(.ipv4)
            let report = try await backend.syncChanges(state)
            #expect(!report.full, "\(what)")
            let diff = differences(kernel(fake), try await fullSyncKernel(state))
            #expect(diff.isEmpty, "step \(step) (\(what)), S=\(s):\n\(diff.joined(separator: "\n"))\npayload:\n\(fake.restores.last!)")
            // The probe's UDP cluster IP rule leads to a chain that DNATs to the current endpoint.
            let udp = fake.rules("nat", "KUBE-SERVICES").first { $0.contains("bench/svc-00000:dns cluster IP") }
            let svcChain = try #require(udp?.split(separator: " ").last.map(String.init), "step \(step) (\(what)): no probe rule")
            let seps = fake.rules("nat", svcChain).compactMap { r in r.split(separator: " ").last.map(String.init) }.filter { $0.hasPrefix("KUBE-SEP-") }
            #expect(seps.count == 1, "step \(step) (\(what))")
            #expect(seps.allSatisfy { sep in fake.rules("nat", sep).contains { $0.hasSuffix("--to-destination 10.244.\(16 + generation).10:5353") } },
                    "step \(step) (\(what))")
        }

        // smoke: change_reps = 2, full plan: 5.
        for rep in 0..<5 {
            try apply(added)
            try await partialSync("add")
            if s == 100 {
                // One rule more in KUBE-SERVICES: inserted at its head, not rewritten.
                let payload = fake.restores.last!
                #expect(!payload.contains(":KUBE-SERVICES "), "\(payload)")
                #expect(payload.contains("-I KUBE-SERVICES 1 -m comment --comment \"bench/svc-added:dns cluster IP\""), "\(payload)")
                #expect(fake.rules("nat", "KUBE-SERVICES").last?.hasSuffix("-j KUBE-NODEPORTS") == true)
            }
            tracker.apply(.serviceDeleted(NamespacedName(namespace: "bench", name: "svc-added")))
            try await partialSync("delete")
            if s == 100 {
                let payload = fake.restores.last!
                #expect(!payload.contains(":KUBE-SERVICES "), "\(payload)")
                #expect(payload.contains("-D KUBE-SERVICES -m comment --comment \"bench/svc-added:dns cluster IP\""), "\(payload)")
            }
            generation ^= 1
            try apply(probe(generation: generation))
            try await partialSync("change")
            if rep == 2 {
                // A periodic full sync over the rules in place, then partial syncs go on from it.
                _ = try await backend.sync(tracker.snapshot(.ipv4), kind: .full)
                #expect(differences(kernel(fake), try await fullSyncKernel(tracker.snapshot(.ipv4))).isEmpty)
            }
        }
        // The churn storm: every single-file Service (up to 50), the probe last, in one sync.
        for _ in 0..<2 {
            churnGeneration ^= 1
            generation ^= 1
            for i in 1..<min(50, s) { try apply(coldService(i, e: 10, generation: churnGeneration)) }
            try apply(probe(generation: generation))
            try await partialSync("churn")
        }
        // And the same storm split over two syncs.
        churnGeneration ^= 1
        for i in 1..<min(50, s) where i % 2 == 1 { try apply(coldService(i, e: 10, generation: churnGeneration)) }
        try await partialSync("churn, first half")
        for i in 1..<min(50, s) where i % 2 == 0 { try apply(coldService(i, e: 10, generation: churnGeneration)) }
        generation ^= 1
        try apply(probe(generation: generation))
        try await partialSync("churn, second half")
    }
}

/// The full sync cut into batches, over the rules of another state (a restart with a changed
/// cluster): it ends equal to a single-batch full sync, and at no point between two batches does
/// a top-level rule lead to a chain that is neither its old nor its new version.
@Suite struct ChunkedFullSyncTests {
    /// Services `range`, the odd ones of `generation` 1 (their first endpoint moved).
    private func state(_ range: Range<Int>, generation: Int) throws -> ProxyState {
        var tracker = ChangeTracker(nodeName: "test-node")
        var docs = probe(generation: 0)
        for i in range where i > 0 { docs += coldService(i, e: 10, generation: i % 2 == 1 ? generation : 0) }
        for e in try ManifestEvents.events(docs.joined(separator: "\n---\n")) { tracker.apply(e) }
        return tracker.snapshot(.ipv4)
    }

    @Test(arguments: [7, 25, 1000])
    func restartOntoAnotherStateNeverExposesAHalfWrittenChain(batching: Int) async throws {
        let fake = FakeIPTables()
        let old = try state(0..<100, generation: 0)
        _ = try await newBackend(fake).sync(old, kind: .full)
        let before = kernel(fake)
        fake.recordStatesAfterRestores()
        // A new process: Services 0..<40 gone but the probe, 40..<140, the odd ones changed.
        let new = try state(40..<140, generation: 1)
        let restoresBefore = fake.restores.count
        let report = try await newBackend(fake, batching: batching).sync(new, kind: .full)
        #expect(report.full)
        let after = try await fullSyncKernel(new)
        #expect(differences(kernel(fake), after).isEmpty)
        let batches = fake.restores.count - restoresBefore
        // 1 104 chains in batches of 1 000: two of service chains and the top-level one, which
        // deletes the 459 stale chains (Services 1..<40, and the moved endpoints of 30). Smaller
        // batches: dozens of service batches, then the stale chains emptied and deleted in batches.
        #expect(batching == 1000 ? batches == 3 : batches > 40, "\(batches) batches")
        for (i, k) in recorded(fake).enumerated() {
            let bad = halfWritten(k, before: before, after: after)
            #expect(bad.isEmpty, "after batch \(i + 1): \(bad.prefix(3))")
        }
        // The foreign-free kernel holds no chain that a full sync would not.
        #expect(Set(kernel(fake)["nat"]!.keys) == Set(after["nat"]!.keys))
    }

    /// A batch in the middle fails: the kernel is consistent (every top-level rule leads to the
    /// old or the new version of its chains), the sync reports the failure, and the next sync,
    /// asked for as partial, is full and ends equal to a full sync.
    @Test(arguments: [0, 3, 20])
    func failedMiddleBatchLeavesAConsistentKernelAndTheRetryIsFull(failAfter: Int) async throws {
        let fake = FakeIPTables()
        let old = try state(0..<60, generation: 0)
        _ = try await newBackend(fake).sync(old, kind: .full)
        let before = kernel(fake)
        let backend = newBackend(fake, batching: 30)
        let new = try state(0..<80, generation: 1)
        fake.failRestore(after: failAfter)
        await #expect(throws: IPTablesError.self) { _ = try await backend.sync(new, kind: .full) }
        let after = try await fullSyncKernel(new)
        let bad = halfWritten(kernel(fake), before: before, after: after)
        #expect(bad.isEmpty, "\(bad.prefix(3))")
        // The top-level chains are still the old ones: the failure came before their batch.
        #expect(kernel(fake)["nat"]?[Chain.services] == before["nat"]?[Chain.services])
        let report = try await backend.syncChanges(new)
        #expect(report.full)
        #expect(differences(kernel(fake), after).isEmpty)
    }
}
