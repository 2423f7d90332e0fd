// Sync-loop timing with a manual clock: coalescing, the minimum interval, periodic full
// resyncs and retry backoff. No wall-clock time is asserted.

import Logging
import SluiceCore
import SluiceTesting
import Testing

/// A backend that records syncs and can be told to fail.
actor RecordingBackend: ProxyBackend {
    nonisolated let name = "recording"
    private(set) var syncs: [(full: Bool, changed: Set<NamespacedName>, ports: Int)] = []
    var failuresLeft = 0

    func failNext(_ n: Int) { failuresLeft = n }

    func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        let full = kind.isFull
        if failuresLeft > 0 {
            failuresLeft -= 1
            struct Injected: Error {}
            throw Injected()
        }
        syncs.append((full, kind.services(in: state), state.servicePorts.count))
        return SyncReport(full: full)
    }

    func externalChangeDetected() async -> Bool { false }
}

private func service(_ name: String) -> ObjectEvent {
    .serviceUpserted(Service(namespace: "ns", name: name, clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)]))
}

/// Lets the runner task reach its next suspension point (for "nothing happened" checks).
private func settle() async {
    for _ in 0..<300 { await Task.yield() }
}

/// Yields until `condition` holds (bounded by a yield count, not by time).
private func eventually(_ condition: () async -> Bool) async {
    for _ in 0..<20_000 where !(await condition()) { await Task.yield() }
}

@Suite(.serialized) struct SyncRunnerTests {
    private func make(_ timing: SyncTiming = SyncTiming(minSyncPeriod: .seconds(1), syncPeriod: .seconds(30), retryBase: .seconds(1)))
        -> (SyncRunner<ManualClock>, RecordingBackend, ManualClock) {
        let clock = ManualClock()
        let backend = RecordingBackend()
        let runner = SyncRunner(tracker: ChangeTracker(nodeName: "n"), backend: backend, timing: timing, clock: clock,
                                logger: Logger(label: "test"))
        return (runner, backend, clock)
    }

    @Test func nothingSyncsBeforeTheSourceHasSynced() async {
        let (runner, backend, clock) = make()
        let task = Task { await runner.run() }
        defer { task.cancel() }
        await runner.handle(service("a"))
        await settle()
        clock.advance(by: .seconds(60))
        await settle()
        #expect(await backend.syncs.isEmpty)
        await runner.handle(.synced)
        await eventually { await backend.syncs.count == 1 }
        let syncs = await backend.syncs
        #expect(syncs.count == 1)
        #expect(syncs.first?.full == true)
        #expect(syncs.first?.ports == 1)
    }

    @Test func burstsAreCoalescedAndSpacedByTheMinimumInterval() async {
        let (runner, backend, clock) = make()
        let task = Task { await runner.run() }
        defer { task.cancel() }
        await runner.handle(.synced)
        await eventually { await backend.syncs.count == 1 }
        await settle()
        #expect(await backend.syncs.count == 1)
        for i in 0..<5 { await runner.handle(service("s\(i)")) }
        await settle()
        #expect(await backend.syncs.count == 1)  // within the minimum interval: wait
        clock.advance(by: .milliseconds(999))
        await settle()
        #expect(await backend.syncs.count == 1)
        clock.advance(by: .milliseconds(1))
        await eventually { await backend.syncs.count == 2 }
        let syncs = await backend.syncs
        #expect(syncs.count == 2)  // the five changes in one partial sync
        #expect(syncs.last?.full == false)
        #expect(syncs.last?.changed.count == 5)
    }

    @Test func aFullResyncHappensEverySyncPeriod() async {
        let (runner, backend, clock) = make()
        let task = Task { await runner.run() }
        defer { task.cancel() }
        await runner.handle(.synced)
        await eventually { await backend.syncs.count == 1 }
        await settle()
        clock.advance(by: .seconds(29))
        await settle()
        #expect(await backend.syncs.count == 1)
        clock.advance(by: .seconds(1))
        await eventually { await backend.syncs.count == 2 }
        let syncs = await backend.syncs
        #expect(syncs.count == 2)
        #expect(syncs.last?.full == true)
    }

    @Test func failuresRetryWithExponentialBackoffAsFullSyncs() async {
        let (runner, backend, clock) = make()
        let task = Task { await runner.run() }
        defer { task.cancel() }
        await backend.failNext(3)
        await runner.handle(.synced)
        await eventually { await runner.counters.failures == 1 }
        #expect(await runner.counters.failures == 1)
        await settle()
        clock.advance(by: .seconds(1))  // retry 1 after 1 s
        await eventually { await runner.counters.failures == 2 }
        #expect(await runner.counters.failures == 2)
        clock.advance(by: .seconds(1))  // retry 2 comes after 2 s, not 1
        await settle()
        #expect(await runner.counters.failures == 2)
        clock.advance(by: .seconds(1))
        await eventually { await runner.counters.failures == 3 }
        #expect(await runner.counters.failures == 3)
        await settle()
        clock.advance(by: .seconds(4))  // retry 3 after 4 s succeeds
        await eventually { await backend.syncs.count == 1 }
        let syncs = await backend.syncs
        #expect(syncs.count == 1)
        #expect(syncs.first?.full == true)
        #expect(await runner.counters.lastError == nil)
    }

    @Test func rejectedObjectsAreCountedAndDoNotTriggerSyncs() async {
        let (runner, backend, _) = make()
        await runner.handle(.synced)
        await runner.handle(.serviceUpserted(Service(namespace: "ns", name: "bad", clusterIPs: ["nope"], ports: [ServicePort(port: 80)])))
        #expect(await runner.counters.rejectedObjects == 1)
        await runner.syncOnce()
        #expect(await backend.syncs.first?.ports == 0)
    }
}
