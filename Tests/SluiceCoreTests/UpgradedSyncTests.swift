// A backend may make an asked-for partial sync full (the nftables mode when its fixed part
// changed, the iptables mode after a lost canary), or answer a periodic resync with only the
// differences (the nftables mode between its hourly full syncs): the runner counts and reports
// what was written, and a resync served either way restarts the period.

import Logging
import SluiceCore
import SluiceTesting
import Synchronization
import Testing

/// Reports every sync as `writes` says, whatever it is asked; records what it was asked.
private actor FixedBackend: ProxyBackend {
    nonisolated let name = "fixed"
    let writesFull: Bool
    private(set) var asked: [Bool] = []
    init(writesFull: Bool) { self.writesFull = writesFull }
    func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        let full = kind.isFull
        asked.append(full)
        return SyncReport(full: writesFull)
    }
    func externalChangeDetected() async -> Bool { false }
}

private func service(_ name: String) -> ObjectEvent {
    .serviceUpserted(Service(namespace: "ns", name: name, clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)]))
}

private final class Attempts: SyncRecorder {
    private let fulls = Mutex<[Bool]>([])
    func record(_ event: SyncEvent) {
        if case .synced(let a) = event { fulls.withLock { $0.append(a.full) } }
    }
    var all: [Bool] { fulls.withLock { $0 } }
}

@Suite struct UpgradedSyncTests {
    private func runner(_ backend: FixedBackend, _ attempts: Attempts, _ clock: ManualClock) -> SyncRunner<ManualClock> {
        SyncRunner(tracker: ChangeTracker(nodeName: "n"), backend: backend,
                   timing: SyncTiming(minSyncPeriod: .zero, syncPeriod: .seconds(30)), clock: clock,
                   logger: Logger(label: "test"), recorders: [attempts])
    }

    @Test func aPartialSyncTheBackendMadeFullCountsAsFull() async {
        let attempts = Attempts()
        let backend = FixedBackend(writesFull: true)
        let runner = runner(backend, attempts, ManualClock())
        await runner.handle(.synced)
        await runner.syncOnce()  // the first sync: full anyway
        await runner.handle(service("a"))
        await runner.syncOnce()  // asked as partial, written in full
        #expect(await backend.asked == [true, false])
        #expect(attempts.all == [true, true])
        #expect(await runner.counters.fullSyncs == 2)
    }

    @Test func aResyncAnsweredWithDifferencesCountsAsPartialAndRestartsThePeriod() async {
        let attempts = Attempts()
        let clock = ManualClock()
        let backend = FixedBackend(writesFull: false)
        let runner = runner(backend, attempts, clock)
        await runner.handle(.synced)
        await runner.syncOnce()  // asked full (the first)
        clock.advance(by: .seconds(31))
        await runner.syncOnce()  // the periodic resync: asked full
        await runner.handle(service("a"))
        await runner.syncOnce()  // within the period again: asked partial
        #expect(await backend.asked == [true, true, false])
        #expect(attempts.all == [false, false, false])
        #expect(await runner.counters.fullSyncs == 0)
    }
}
