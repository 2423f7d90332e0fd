// What the sync loop reports to health and metrics: RFC 3339 trigger times, the change
// tracker remembering them, and the runner's event sequence with clock-measured durations.

import Logging
import SluiceCore
import SluiceTesting
import Synchronization
import Testing

@Suite struct RFC3339Tests {
    @Test func parsesTheFormsTheAPIServerWrites() {
        #expect(RFC3339.parse("2024-05-01T12:00:00Z") == 1_714_564_800)
        #expect(RFC3339.parse("2024-05-01T12:00:00.25Z") == 1_714_564_800.25)
        #expect(RFC3339.parse("2024-05-01T14:00:00+02:00") == 1_714_564_800)
        #expect(RFC3339.parse("2024-05-01T11:30:00.5-00:30") == 1_714_564_800.5)
        #expect(RFC3339.parse("1970-01-01T00:00:00Z") == 0)
        #expect(RFC3339.parse("2000-02-29T00:00:00Z") == 951_782_400)
    }

    @Test func rejectsAnythingElse() {
        for bad in ["", "2024-05-01", "2024-05-01 12:00:00Z", "2024-05-01T12:00:00", "2024-13-01T12:00:00Z",
                    "2023-02-29T00:00:00Z", "2024-05-01T24:00:00Z", "2024-05-01T12:00:00.Z", "2024-05-01T12:00:00+0200",
                    "2024-05-01T12:00:00Zjunk", "2024-05-01T12:00:00.1234567891Z", "yesterday"] {
            #expect(RFC3339.parse(bad) == nil, "\(bad)")
        }
    }
}

private func slice(_ name: String, service: String, family: String = "IPv4", trigger: String?, ip: String = "10.244.0.5") -> ObjectEvent {
    .sliceUpserted(EndpointSlice(
        namespace: "ns", name: name, serviceName: service, addressType: family, ports: [EndpointPort(port: 80)],
        endpoints: [Endpoint(addresses: [ip])],
        annotations: trigger.map { [lastChangeTriggerTimeAnnotation: $0] } ?? [:]))
}

@Suite struct TriggerTimeTrackingTests {
    private let svc = NamespacedName(namespace: "ns", name: "web")

    @Test func changedSlicesLeaveTheirTriggerTimesUntilTaken() {
        var t = ChangeTracker(nodeName: "n")
        t.apply(slice("web-1", service: "web", trigger: "2024-05-01T12:00:00Z"))  // before any snapshot: initial state
        _ = t.snapshot(.ipv4)
        #expect(t.takeTriggerTimes(.ipv4).isEmpty)

        t.apply(slice("web-1", service: "web", trigger: "2024-05-01T12:00:01Z", ip: "10.244.0.6"))
        t.apply(slice("web-2", service: "web", trigger: "2024-05-01T12:00:02.5Z"))
        t.apply(slice("web-2", service: "web", trigger: "2024-05-01T12:00:02.5Z"))  // identical: ignored
        t.apply(slice("web-3", service: "web", trigger: "not a time"))
        #expect(t.takeTriggerTimes(.ipv4) == [svc: [1_714_564_801, 1_714_564_802.5]])
        #expect(t.takeTriggerTimes(.ipv4).isEmpty)  // taken once
    }

    @Test func aDeletedSliceDropsItsServicesTimes() {
        var t = ChangeTracker(nodeName: "n")
        _ = t.snapshot(.ipv4)
        t.apply(slice("web-1", service: "web", trigger: "2024-05-01T12:00:01Z"))
        t.apply(.sliceDeleted(NamespacedName(namespace: "ns", name: "web-1")))
        #expect(t.takeTriggerTimes(.ipv4).isEmpty)
    }

    @Test func timesBelongToTheSlicesFamilyAndOnlyToFamiliesBeingSynced() {
        var t = ChangeTracker(nodeName: "n")
        _ = t.snapshot(.ipv4)
        t.apply(slice("web-6", service: "web", family: "IPv6", trigger: "2024-05-01T12:00:01Z", ip: "fd00::5"))
        t.apply(slice("web-4", service: "web", trigger: "2024-05-01T12:00:02Z"))
        #expect(t.takeTriggerTimes(.ipv6).isEmpty)  // nobody syncs IPv6: nothing accumulates
        #expect(t.takeTriggerTimes(.ipv4) == [svc: [1_714_564_802]])
    }

    @Test func aServiceKeepsABoundedNumberOfTimes() {
        var t = ChangeTracker(nodeName: "n")
        _ = t.snapshot(.ipv4)
        for i in 0..<(ChangeTracker.maximumTriggerTimesPerService + 10) {
            t.apply(slice("web-1", service: "web", trigger: "2024-05-01T12:00:00Z", ip: "10.244.1.\(i % 250 + 1)"))
        }
        #expect(t.takeTriggerTimes(.ipv4)[svc]?.count == ChangeTracker.maximumTriggerTimesPerService)
    }
}

/// Collects every event.
final class EventLog: SyncRecorder {
    private let events = Mutex<[SyncEvent]>([])
    func record(_ event: SyncEvent) { events.withLock { $0.append(event) } }
    var all: [SyncEvent] { events.withLock { $0 } }
    var attempts: [SyncAttempt] { all.compactMap { if case .synced(let a) = $0 { a } else { nil } } }
    var queued: Int { all.filter { if case .queued = $0 { true } else { false } }.count }
}

/// A backend that takes `cost` on the manual clock per sync and can fail.
actor TimedBackend: ProxyBackend {
    nonisolated let name = "timed"
    let clock: ManualClock
    let cost: Duration
    var failuresLeft = 0

    init(clock: ManualClock, cost: Duration) {
        self.clock = clock
        self.cost = cost
    }

    func failNext(_ n: Int) { failuresLeft = n }

    func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        let full = kind.isFull
        clock.advance(by: cost)
        if failuresLeft > 0 {
            failuresLeft -= 1
            throw Broken()
        }
        return SyncReport(full: full, written: [.iptablesRules(.nat): state.servicePorts.count])
    }

    func externalChangeDetected() async -> Bool { false }
}

/// `TimedBackend`'s failure.
struct Broken: Error, CustomStringConvertible {
    var description: String { "broken on purpose" }
}

@Suite struct SyncRecorderEventTests {
    @Test func theRunnerReportsQueuesChangesAndTimedAttempts() async {
        let clock = ManualClock()
        let backend = TimedBackend(clock: clock, cost: .milliseconds(40))
        let log = EventLog()
        let runner = SyncRunner(tracker: ChangeTracker(nodeName: "n"), backend: backend, clock: clock, logger: Logger(label: "t"),
                                recorders: [log])
        await runner.handle(.serviceUpserted(Service(namespace: "ns", name: "web", clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)])))
        #expect(log.queued == 0)  // before the initial state is complete, nothing is queued
        await runner.handle(.synced)
        #expect(log.queued == 1)  // the initial state itself asks for a sync
        await runner.syncOnce()
        var attempt = log.attempts.last
        #expect(attempt?.succeeded == true)
        #expect(attempt?.full == true)
        #expect(attempt?.kind == .full)
        #expect(attempt?.error == nil)
        #expect(attempt?.duration == .milliseconds(40))
        #expect(attempt?.report?.written == [.iptablesRules(.nat): 1])

        await runner.handle(slice("web-1", service: "web", trigger: "2024-05-01T12:00:01Z"))
        #expect(log.queued == 2)
        guard case .changed(.endpoints, pendingServices: 0, pendingEndpoints: 1)? = log.all.dropLast().last else {
            Issue.record("expected an endpoints change before the queue event, got \(log.all.suffix(2))")
            return
        }
        await backend.failNext(1)
        await runner.syncOnce()
        attempt = log.attempts.last
        #expect(attempt?.succeeded == false)
        #expect(attempt?.full == false)
        #expect(attempt?.kind == .partial(changed: [NamespacedName(namespace: "ns", name: "web")]))
        // The backend's error itself, typed, and its text.
        #expect(attempt?.error?.error is Broken)
        #expect(attempt?.error?.description == "broken on purpose")
        #expect(attempt?.triggerTimes.isEmpty == true)
        await runner.syncOnce()
        attempt = log.attempts.last
        #expect(attempt?.succeeded == true)
        #expect(attempt?.full == true)  // retried as a full sync
        #expect(attempt?.triggerTimes == [NamespacedName(namespace: "ns", name: "web"): [1_714_564_801]])  // carried over

        await runner.handle(.nodeUpserted(Node(name: "n", taints: [NodeTaint(key: "ToBeDeletedByClusterAutoscaler")])))
        await runner.handle(.nodeUpserted(Node(name: "other")))  // not this node: ignored
        let nodes = log.all.compactMap { if case .node(let n) = $0 { n } else { nil } }
        #expect(nodes.map(\.name) == ["n"])
        await runner.requestFullSync()
        #expect(log.queued == 4)
    }
}
