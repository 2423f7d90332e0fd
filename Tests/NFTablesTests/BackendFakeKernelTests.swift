// The nftables backend's bookkeeping against a fake kernel: full versus partial syncs,
// failed transactions, delayed deletion of stale chains, the canary, clean-up failures.
// (Real packets through the real kernel: Tests/KernelTests/NFTablesKernelTests.swift.)

import Foundation
import Logging
import NFTables
import SluiceCore
import Testing

/// A kernel that records every transaction and can be told to fail.
final class FakeNFTablesKernel: NFTablesKernel, @unchecked Sendable {
    private let lock = NSLock()
    private var _applied: [String] = []
    private var _chains: Set<String> = []
    private var _sets: Set<String> = []
    private var _failNext: [Bool] = []
    private var _servicesChainHasRules = true

    var applied: [String] { lock.withLock { _applied } }
    func setInventory(chains: Set<String>, sets: Set<String>) { lock.withLock { _chains = chains; _sets = sets } }
    /// The next `apply` calls fail (true) or succeed (false), in order.
    func failNext(_ pattern: [Bool]) { lock.withLock { _failNext = pattern } }
    func setServicesChainHasRules(_ value: Bool) { lock.withLock { _servicesChainHasRules = value } }

    func apply(_ text: String, operation: String) async throws {
        let fail = lock.withLock { () -> Bool in
            let f = _failNext.isEmpty ? false : _failNext.removeFirst()
            if !f { _applied.append(text) }
            return f
        }
        if fail { throw NFTablesError(operation: operation, message: "Error: Could not process rule: Invalid argument", status: 1) }
    }

    func inventory() async throws -> (chains: Set<String>, sets: Set<String>) { lock.withLock { (_chains, _sets) } }

    func chainHasRules(_ chain: String) async throws -> Bool { lock.withLock { _servicesChainHasRules } }
}

/// A settable time.
final class TestTime: @unchecked Sendable {
    private let lock = NSLock()
    private var value = ContinuousClock.now
    var now: ContinuousClock.Instant { lock.withLock { value } }
    func advance(_ d: Duration) { lock.withLock { value = value.advanced(by: d) } }
}

/// Services `ns/<name>` (ClusterIP 10.96.0.N, port p80/TCP), each with the endpoints given
/// (10.244.0.X:8080); `changed` are the Services a partial sync is told about.
private func state(_ services: [(String, [Int])], changed: [String] = []) -> ProxyState {
    var ports: [ServicePortName: ServicePortInfo] = [:]
    var endpoints: [ServicePortName: [EndpointInfo]] = [:]
    for (i, (n, eps)) in services.enumerated() {
        let name = ServicePortName(service: NamespacedName(namespace: "ns", name: n), port: "p80", proto: .tcp)
        ports[name] = ServicePortInfo(name: name, clusterIP: IPAddress("10.96.0.\(i + 1)")!, port: 80, proto: .tcp)
        endpoints[name] = eps.map { EndpointInfo(ip: IPAddress("10.244.0.\($0)")!, port: 8080) }
    }
    return ProxyState(servicePorts: ports, endpoints: endpoints,
                      changedServices: Set(changed.map { NamespacedName(namespace: "ns", name: $0) }))
}

/// The lines of a transaction.
private func lines(_ text: String?) -> [String] { (text ?? "").split(separator: "\n").map(String.init) }

@Suite("nftables backend (fake kernel)")
struct NFTablesBackendFakeKernelTests {
    let kernel = FakeNFTablesKernel()
    let time = TestTime()

    func backend(fullSyncPeriod: Duration = .zero) -> NFTablesBackend {
        let time = self.time
        let compiler = NFTablesCompiler(options: NFTablesOptions(node: NodeConfig(nodeName: "node", nodeIPs: [IPAddress("192.168.0.2")!],
                                                                                  clusterCIDRs: [CIDR("10.244.0.0/16")!])))
        return NFTablesBackend(compiler: compiler, kernel: kernel, logger: Logger(label: "test"), fullSyncPeriod: fullSyncPeriod,
                               now: { time.now })
    }

    @Test("The first sync is full and recreates the base chains; a partial sync sends only the changed Service; a later full one does not recreate")
    func fullThenPartial() async throws {
        let b = backend()
        let first = try await b.syncChanges(state([("a", [1, 2]), ("b", [3])]))
        #expect(first.full)
        #expect(lines(kernel.applied.last).contains("delete chain ip kube-proxy nat-prerouting"))
        let second = try await b.syncChanges(state([("a", [1, 2]), ("b", [3, 4])], changed: ["b"]))
        #expect(!second.full)
        let partial = lines(kernel.applied.last)
        #expect(!partial.isEmpty)
        #expect(!partial.contains { $0.hasPrefix("add table") }, "a partial sync leaves the table alone")
        #expect(partial.allSatisfy { !$0.contains("ns/a/") }, "nothing of the unchanged Service: \(partial)")
        #expect(partial.contains { $0.contains("10.244.0.4") }, "the new endpoint is written: \(partial)")
        let third = try await b.sync(state([("a", [1, 2]), ("b", [3, 4])]), kind: .full)
        #expect(third.full)
        #expect(!lines(kernel.applied.last).contains("delete chain ip kube-proxy nat-prerouting"))
        #expect(lines(kernel.applied.last).first?.hasPrefix("add table ip kube-proxy") == true)
    }

    @Test("A failed transaction is counted and the next sync is full even when a partial one is asked for")
    func failureForcesFull() async throws {
        let b = backend()
        _ = try await b.sync(state([("a", [1])]), kind: .full)
        kernel.failNext([true])
        await #expect(throws: NFTablesError.self) { try await b.syncChanges(state([("a", [1]), ("b", [2])], changed: ["b"])) }
        #expect(await b.syncFailures == 1)
        let retry = try await b.syncChanges(state([("a", [1]), ("b", [2])], changed: ["b"]))
        #expect(retry.full)
        #expect(lines(kernel.applied.last).first?.hasPrefix("add table ip kube-proxy") == true)
    }

    @Test("The chains of a deleted Service are flushed, wait a second, then are deleted in a transaction of their own")
    func staleChainsDeletedLater() async throws {
        let b = backend()
        _ = try await b.sync(state([("a", [1]), ("b", [2])]), kind: .full)
        _ = try await b.syncChanges(state([("a", [1])], changed: ["b"]))
        let waiting = await b.pendingStaleChains
        #expect(!waiting.isEmpty && waiting.allSatisfy { $0.contains("ns/b/") }, "\(waiting)")
        #expect(waiting.allSatisfy { lines(kernel.applied.last).contains("flush chain ip kube-proxy \($0)") })
        time.advance(.milliseconds(500))
        _ = try await b.syncChanges(state([("a", [1, 3])], changed: ["a"]))
        #expect(await b.pendingStaleChains == waiting, "not deleted before a second has passed")
        time.advance(.milliseconds(600))
        let before = kernel.applied.count
        _ = try await b.syncChanges(state([("a", [1, 3, 4])], changed: ["a"]))
        let sent = Array(kernel.applied.dropFirst(before))
        #expect(sent.count == 2)
        #expect(Set(lines(sent.first)) == Set(waiting.map { "delete chain ip kube-proxy \($0)" }))
        #expect(await b.pendingStaleChains.isEmpty)
    }

    @Test("A full sync flushes service chains and deletes affinity sets that the kernel has and the ruleset does not")
    func fullSyncFlushesUnknown() async throws {
        kernel.setInventory(chains: ["services", "service-OLD-ns/gone/tcp/p80", "nat-output"],
                            sets: ["cluster-ips", "affinity-OLD-ns/gone/tcp/p80__10.0.0.1/80"])
        let b = backend()
        _ = try await b.sync(state([("a", [1])]), kind: .full)
        let text = lines(kernel.applied.last)
        #expect(text.contains("flush chain ip kube-proxy service-OLD-ns/gone/tcp/p80"))
        #expect(text.contains("delete set ip kube-proxy affinity-OLD-ns/gone/tcp/p80__10.0.0.1/80"))
        #expect(await b.pendingStaleChains == ["service-OLD-ns/gone/tcp/p80"])
    }

    @Test("A failed stale-chain deletion is reported once, and that sync is full")
    func cleanupFailure() async throws {
        let b = backend()
        _ = try await b.sync(state([("a", [1]), ("b", [2])]), kind: .full)
        _ = try await b.syncChanges(state([("a", [1])], changed: ["b"]))
        time.advance(.seconds(2))
        kernel.failNext([true])
        let report = try await b.syncChanges(state([("a", [1, 2])], changed: ["a"]))
        #expect(report.full)
        #expect(report.cleanupFailures == 1)
        #expect(await b.cleanupFailures == 1)
        let next = try await b.syncChanges(state([("a", [1])], changed: ["a"]))
        #expect(next.cleanupFailures == 0)
        #expect(!next.full)
    }

    @Test("An emptied services chain (table deleted or flushed) is noticed and the next sync is full")
    func canary() async throws {
        let b = backend()
        #expect(await b.externalChangeDetected() == false, "nothing to watch before the first sync")
        _ = try await b.sync(state([("a", [1])]), kind: .full)
        #expect(await b.externalChangeDetected() == false)
        kernel.setServicesChainHasRules(false)
        #expect(await b.externalChangeDetected() == true)
        kernel.setServicesChainHasRules(true)
        let next = try await b.syncChanges(state([("a", [1, 2])], changed: ["a"]))
        #expect(next.full)
    }

    @Test("A requested full sync within the full-sync period is a partial one of every Service; after it, a full one")
    func fullSyncPeriod() async throws {
        let b = backend(fullSyncPeriod: .seconds(3600))
        _ = try await b.sync(state([("a", [1]), ("b", [2])]), kind: .full)
        time.advance(.seconds(30))
        let periodic = try await b.sync(state([("a", [1]), ("b", [2, 3])], changed: ["a", "b"]), kind: .full)
        #expect(!periodic.full)
        let sent = lines(kernel.applied.last)
        #expect(!sent.contains { $0.hasPrefix("add table") } && sent.contains { $0.contains("10.244.0.3") }, "\(sent)")
        time.advance(.seconds(3600))
        let hourly = try await b.sync(state([("a", [1]), ("b", [2, 3])], changed: ["a", "b"]), kind: .full)
        #expect(hourly.full)
        kernel.setServicesChainHasRules(false)
        #expect(await b.externalChangeDetected())
        kernel.setServicesChainHasRules(true)
        #expect(try await b.sync(state([("a", [1]), ("b", [2, 3])]), kind: .full).full, "after the canary fired the sync is full")
    }
}
