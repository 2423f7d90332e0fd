// Actor reentrancy in the sync loop: requests that arrive while the backend is inside a sync
// must be served by the next sync, never cleared by the one in flight.

import Logging
import SluiceCore
import SluiceTesting
import Testing

/// A backend whose sync suspends until the test opens the gate, so the test can act while a
/// sync is in flight.
actor GatedBackend: ProxyBackend {
    nonisolated let name = "gated"
    private(set) var syncs: [Bool] = []
    private(set) var inside = 0
    private var holding = false
    private var gate: CheckedContinuation<Void, Never>?

    /// The next sync waits inside the backend until `open()`.
    func holdNext() { holding = true }

    func open() {
        holding = false
        gate?.resume()
        gate = nil
    }

    func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        let full = kind.isFull
        if holding {
            inside += 1
            await withCheckedContinuation { gate = $0 }
        }
        syncs.append(full)
        return SyncReport(full: full)
    }

    func externalChangeDetected() async -> Bool { false }
}

private func yieldUntil(_ condition: () async -> Bool) async {
    for _ in 0..<20_000 where !(await condition()) { await Task.yield() }
}

@Suite(.serialized) struct ReentrancyTests {
    private func make() -> (SyncRunner<ManualClock>, GatedBackend) {
        let backend = GatedBackend()
        let runner = SyncRunner(tracker: ChangeTracker(nodeName: "node-a"), backend: backend,
                                timing: SyncTiming(minSyncPeriod: .seconds(1), syncPeriod: .seconds(30), retryBase: .seconds(1)),
                                clock: ManualClock(), logger: Logger(label: "test"))
        return (runner, backend)
    }

    private func svc(_ name: String) -> ObjectEvent {
        .serviceUpserted(Service(namespace: "ns", name: name, clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)]))
    }

    @Test func aFullSyncRequestedDuringASyncMakesTheNextSyncFull() async {
        let (runner, backend) = make()
        await runner.handle(.synced)
        await runner.syncOnce()  // the first sync is full; later ones partial
        await runner.handle(svc("a"))
        await backend.holdNext()
        let inFlight = Task { await runner.syncOnce() }
        await yieldUntil { await backend.inside == 1 }
        #expect(await backend.inside == 1)
        await runner.requestFullSync()  // e.g. the canary noticed a flush mid-sync
        await backend.open()
        await inFlight.value
        await runner.syncOnce()
        let syncs = await backend.syncs
        #expect(syncs == [true, false, true])
    }

    @Test func aNodeLabelChangeDuringASyncMakesTheNextSyncFull() async {
        let (runner, backend) = make()
        await runner.handle(.nodeUpserted(Node(name: "node-a", labels: ["topology.kubernetes.io/zone": "z1"])))
        await runner.handle(.synced)
        await runner.syncOnce()
        await runner.handle(svc("a"))
        await backend.holdNext()
        let inFlight = Task { await runner.syncOnce() }
        await yieldUntil { await backend.inside == 1 }
        await runner.handle(.nodeUpserted(Node(name: "node-a", labels: ["topology.kubernetes.io/zone": "z2"])))
        await backend.open()
        await inFlight.value
        await runner.syncOnce()
        let syncs = await backend.syncs
        #expect(syncs == [true, false, true])
    }

    @Test func aFullSyncRequestedDuringAFullSyncIsNotConsumedByIt() async {
        let (runner, backend) = make()
        await runner.handle(.synced)
        await backend.holdNext()
        let inFlight = Task { await runner.syncOnce() }  // the first sync: full
        await yieldUntil { await backend.inside == 1 }
        await runner.requestFullSync()
        await backend.open()
        await inFlight.value
        await runner.syncOnce()
        let syncs = await backend.syncs
        #expect(syncs == [true, true])
    }

    @Test func aSyncThatRunsLongLogsAWarningUntilItEnds() async {
        let backend = GatedBackend()
        let clock = ManualClock()
        let capture = LogCapture()
        let runner = SyncRunner(tracker: ChangeTracker(nodeName: "node-a"), backend: backend,
                                timing: SyncTiming(slowSyncWarning: .seconds(10)), clock: clock, logger: capture.logger())
        await runner.handle(.synced)
        await backend.holdNext()
        let inFlight = Task { await runner.syncOnce() }
        await yieldUntil { await backend.inside == 1 }
        await yieldUntil { clock.sleeperCount == 1 }
        #expect(!capture.contains("still running"))
        clock.advance(by: .seconds(10))
        for _ in 0..<20_000 where !capture.contains("still running after 10s") { await Task.yield() }
        #expect(capture.contains("full gated sync still running after 10s"))
        await yieldUntil { clock.sleeperCount == 1 }
        clock.advance(by: .seconds(10))
        for _ in 0..<20_000 where !capture.contains("still running after 20s") { await Task.yield() }
        #expect(capture.contains("still running after 20s"))
        await backend.open()
        await inFlight.value
        // Ended: the watchdog is gone and says nothing more.
        await yieldUntil { clock.sleeperCount == 0 }
        #expect(clock.sleeperCount == 0)
        clock.advance(by: .seconds(30))
        for _ in 0..<300 { await Task.yield() }
        #expect(!capture.contains("still running after 30s"))
    }
}
