// Partial-sync sequences against a fake iptables that keeps state with --noflush semantics.

import IPTables
import KernelKit
import KubeAPI
import Logging
import SluiceCore
import SluiceTesting
import Testing

private let logger = Logger(label: "test")

private func backend(_ fake: FakeIPTables) -> IPTablesBackend {
    IPTablesBackend(options: Fixtures.kubeProxyTestOptions, tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake, logger: logger)
}

/// Upsert events for the objects in a YAML text.
enum ManifestEvents {
    static func events(_ yaml: String) throws -> [ObjectEvent] {
        try ManifestParser.parse(yaml, file: "test").objects.map(\.upsertEvent)
    }
}

private func svcChains(_ fake: FakeIPTables) -> Set<String> {
    fake.chains("nat").filter { Chain.isServiceChain($0) }
}

@Suite struct PartialSyncTests {
    let svcA = serviceYAML("ns1", "a", ip: "172.30.0.1")
    let sliceA = sliceYAML("ns1", "a", endpoints: "[{addresses: [10.180.0.1]}]")
    let svcB = serviceYAML("ns2", "b", ip: "172.30.0.2")
    let sliceB = sliceYAML("ns2", "b", endpoints: "[{addresses: [10.180.0.2]}, {addresses: [10.180.0.3]}]")

    @Test func addChangeDeleteAndNoOp() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        var tracker = ChangeTracker(nodeName: "test-node")
        for e in try ManifestEvents.events([svcA, sliceA].joined(separator: "\n---\n")) { tracker.apply(e) }

        // 1. First sync: full.
        _ = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        let afterFirst = svcChains(fake)
        #expect(afterFirst.count == 2)  // SVC + one SEP
        #expect(fake.rules("nat", "PREROUTING").contains { $0.contains("-j KUBE-SERVICES") })
        #expect(fake.rules("filter", "INPUT").count == 4)  // EXTERNAL-SERVICES, NODEPORTS, PROXY-FIREWALL, FIREWALL

        // 2. Add service b: the partial batch writes b's chains, not a's.
        for e in try ManifestEvents.events([svcB, sliceB].joined(separator: "\n---\n")) { tracker.apply(e) }
        _ = try await b.syncChanges(tracker.snapshot(.ipv4))
        var last = try RestoreDump.parse(fake.restores.last!)
        let aChains = afterFirst
        #expect(Set(last.chains("nat")).isDisjoint(with: aChains))
        #expect(last.chains("nat").filter { Chain.isServiceChain($0) }.count == 3)  // SVC + two SEPs of b
        #expect(last.rules("nat", "KUBE-SERVICES").count == 3, "\(fake.restores.last!)")  // a changed top-level chain is written whole
        #expect(svcChains(fake).count == 5)

        // 3. No-op sync: every top-level chain is unchanged, so there is nothing to restore.
        let restoresBefore = fake.restores.count
        let noop = try await b.syncChanges(tracker.snapshot(.ipv4))
        #expect(fake.restores.count == restoresBefore)
        #expect(noop.bytes == 0 && noop.written == [.iptablesRules(.filter): 0, .iptablesRules(.nat): 0])
        #expect(noop.total[.iptablesRules(.nat)]! > 0)
        #expect(svcChains(fake).count == 5)

        // 4. Endpoint change on b: only b's chains; the removed endpoint's chain is deleted.
        tracker.apply(try ManifestEvents.events(sliceYAML("ns2", "b", endpoints: "[{addresses: [10.180.0.2]}]"))[0])
        _ = try await b.syncChanges(tracker.snapshot(.ipv4))
        last = try RestoreDump.parse(fake.restores.last!)
        #expect(Set(last.chains("nat")).isDisjoint(with: aChains))
        #expect(last.tables.first { $0.name == "nat" }!.chains.filter(\.deleted).count == 1)
        #expect(svcChains(fake).count == 4)

        // 5. Delete b: its chains are flushed and deleted; a untouched.
        tracker.apply(.serviceDeleted(NamespacedName(namespace: "ns2", name: "b")))
        _ = try await b.syncChanges(tracker.snapshot(.ipv4))
        #expect(svcChains(fake) == aChains)
        #expect(!fake.rules("nat", "KUBE-SERVICES").contains { $0.contains("ns2/b") })
    }

    @Test func failedRestoreLeavesStateAndTheRetryIsFull() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        let clock = ManualClock()
        var tracker = ChangeTracker(nodeName: "test-node")
        for e in try ManifestEvents.events([svcA, sliceA].joined(separator: "\n---\n")) { tracker.apply(e) }
        tracker.apply(.synced)
        let runner = SyncRunner(tracker: tracker, backend: b, timing: SyncTiming(minSyncPeriod: .seconds(1), syncPeriod: .seconds(30)),
                                clock: clock, logger: logger)
        await runner.syncOnce()
        #expect(await runner.counters.fullSyncs == 1)
        let before = fake.chains("nat")

        for e in try ManifestEvents.events([svcB, sliceB].joined(separator: "\n---\n")) { await runner.handle(e) }
        fake.failRestores(1)
        await runner.syncOnce()
        #expect(await runner.counters.failures == 1)
        #expect(fake.chains("nat") == before)  // nothing half-applied

        await runner.syncOnce()
        let c = await runner.counters
        #expect(c.fullSyncs == 2)  // the retry was full
        #expect(c.failures == 1)
        #expect(svcChains(fake).count == 5)
        let last = try RestoreDump.parse(fake.restores.last!)
        #expect(last.chains("nat").filter { Chain.isServiceChain($0) }.count == 5)  // every service chain rewritten
    }

    @Test func externalFlushForcesAFullSync() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        var tracker = ChangeTracker(nodeName: "test-node")
        for e in try ManifestEvents.events([svcA, sliceA].joined(separator: "\n---\n")) { tracker.apply(e) }
        tracker.apply(.synced)
        let runner = SyncRunner(tracker: tracker, backend: b, clock: ManualClock(), logger: logger)
        await runner.syncOnce()
        #expect(await b.externalChangeDetected() == false)
        fake.externalFlush("mangle")
        fake.externalFlush("nat")
        #expect(await b.externalChangeDetected() == true)
        await runner.syncOnce()
        #expect(await runner.counters.fullSyncs == 2)
        #expect(svcChains(fake).count == 2)
        #expect(await b.externalChangeDetected() == false)
    }

    @Test func cleanupRemovesEveryChainAndJump() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        var tracker = ChangeTracker(nodeName: "test-node")
        for e in try ManifestEvents.events([svcA, sliceA, svcB, sliceB].joined(separator: "\n---\n")) { tracker.apply(e) }
        _ = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        try await b.cleanup()
        for t in ["nat", "filter", "mangle"] {
            #expect(fake.chains(t).filter { $0.hasPrefix("KUBE-") }.isEmpty, "table \(t)")
            for builtin in ["INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"] {
                #expect(fake.rules(t, builtin).allSatisfy { !$0.contains("KUBE-") }, "\(t) \(builtin)")
            }
        }
    }
}
