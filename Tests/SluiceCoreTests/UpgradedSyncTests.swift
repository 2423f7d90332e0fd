// A backend may make an asked-for partial sync full (the nftables mode when its fixed part
// changed, the iptables mode after a lost canary); the runner counts and reports it as full.

import Logging
import SluiceCore
import SluiceTesting
import Synchronization
import Testing

/// Always writes everything, whatever it is asked.
private actor AlwaysFullBackend: ProxyBackend {
    nonisolated let name = "always-full"
    func sync(_ state: ProxyState, full: Bool) async throws -> SyncReport { SyncReport(full: true) }
    func externalChangeDetected() async -> Bool { false }
}

private final class Attempts: SyncRecorder {
    private let fulls = Mutex<[Bool]>([])
    func record(_ event: SyncEvent) {
        if case .synced(let a) = event { fulls.withLock { $0.append(a.full) } }
    }
    var all: [Bool] { fulls.withLock { $0 } }
}

@Suite struct UpgradedSyncTests {
    @Test func aPartialSyncTheBackendMadeFullCountsAsFull() async {
        let attempts = Attempts()
        let runner = SyncRunner(tracker: ChangeTracker(nodeName: "n"), backend: AlwaysFullBackend(),
                                timing: SyncTiming(minSyncPeriod: .zero, syncPeriod: .seconds(3600)), clock: ManualClock(),
                                logger: Logger(label: "test"), recorders: [attempts])
        await runner.handle(.synced)
        await runner.syncOnce()  // the first sync: full anyway
        await runner.handle(.serviceUpserted(Service(namespace: "ns", name: "a", clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)])))
        await runner.syncOnce()  // asked as partial, written in full
        #expect(attempts.all == [true, true])
        #expect(await runner.counters.fullSyncs == 2)
    }
}
