// The invariant of partial syncs that leave unchanged top-level chains out and replay unchanged
// Services from the compile memory: after every partial sync, the (fake) kernel holds exactly
// what a full sync of the same state into an empty kernel leaves there. Walked through the
// benchmark smoke run's sequence of changes (benchmarks/sluicebench/run.py: add, delete and
// change of the probe Service's endpoint, repeated, then the churn storm in one sync).

import IPTables
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

private func newBackend(_ fake: FakeIPTables) -> IPTablesBackend {
    IPTablesBackend(options: Fixtures.kubeProxyTestOptions, tools: IPTablesTools(variant: .auto, family: .ipv4),
                    runner: fake, logger: logger)
}

/// What a full sync of `state` leaves in an empty kernel.
private func fullSyncKernel(_ state: ProxyState) async throws -> KernelRules {
    let fake = FakeIPTables()
    var s = state
    s.changedServices = Set(state.servicePorts.keys.map(\.service))
    _ = try await newBackend(fake).sync(s, full: true)
    return kernel(fake)
}

/// The differences between two kernels, one line each (empty when equal).
private func differences(_ got: KernelRules, _ want: KernelRules) -> [String] {
    var out: [String] = []
    for t in Set(got.keys).union(want.keys).sorted() {
        let g = got[t] ?? [:], w = want[t] ?? [:]
        for c in Set(g.keys).union(w.keys).sorted() {
            switch (g[c], w[c]) {
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

@Suite struct PartialEqualsFullTests {
    /// The smoke run's sequence for S Services: after every partial sync the fake kernel equals
    /// a full sync of the same state, and the probe Service's cluster IP leads to its endpoint
    /// of the current generation.
    @Test(arguments: [1, 100])
    func benchSequenceKeepsTheKernelEqualToAFullSync(services s: Int) async throws {
        let fake = FakeIPTables()
        let backend = newBackend(fake)
        var tracker = ChangeTracker(nodeName: "test-node")
        func apply(_ docs: [String]) throws {
            for e in try ManifestEvents.events(docs.joined(separator: "\n---\n")) { tracker.apply(e) }
        }
        var generation = 0, churnGeneration = 0
        try apply(probe(generation: 0))
        for i in 1..<s { try apply(coldService(i, e: 10, generation: 0)) }
        var first = tracker.snapshot(.ipv4)
        first.changedServices = Set(first.servicePorts.keys.map(\.service))
        _ = try await backend.sync(first, full: true)
        #expect(differences(kernel(fake), try await fullSyncKernel(first)).isEmpty)

        var step = 0
        func partialSync(_ what: String) async throws {
            step += 1
            let state = tracker.snapshot(.ipv4)
            let report = try await backend.sync(state, full: false)
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
        for _ in 0..<5 {
            try apply(added)
            try await partialSync("add")
            tracker.apply(.serviceDeleted(NamespacedName(namespace: "bench", name: "svc-added")))
            try await partialSync("delete")
            generation ^= 1
            try apply(probe(generation: generation))
            try await partialSync("change")
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
