// Sluice: a per-node Kubernetes service proxy.
// Records a source's event stream and folds it into the state a consumer would hold, so tests
// can wait for "the client now sees what the server holds".

import SluiceCore
import Synchronization

/// Records object events and the state they add up to.
public final class EventRecorder: Sendable {
    private struct State {
        var events: [ObjectEvent] = []
        var services: [NamespacedName: Service] = [:]
        var slices: [NamespacedName: EndpointSlice] = [:]
        var node: Node?
        var serviceCIDRs: [String: ServiceCIDR] = [:]
        var finished: String?
    }

    private let state = Mutex(State())

    /// Creates an empty recorder.
    public init() {}

    /// Consumes `stream` in a task (cancel it to stop).
    public func record(_ stream: AsyncThrowingStream<ObjectEvent, Error>) -> Task<Void, Never> {
        Task {
            do {
                for try await e in stream { self.add(e) }
                state.withLock { $0.finished = "finished" }
            } catch {
                state.withLock { $0.finished = "failed: \(error)" }
            }
        }
    }

    /// Folds one event in.
    public func add(_ e: ObjectEvent) {
        state.withLock { s in
            s.events.append(e)
            switch e {
            case .serviceUpserted(let x): s.services[x.key] = x
            case .serviceDeleted(let k): s.services[k] = nil
            case .sliceUpserted(let x): s.slices[x.key] = x
            case .sliceDeleted(let k): s.slices[k] = nil
            case .nodeUpserted(let n): s.node = n
            case .nodeDeleted(let name): if s.node?.name == name { s.node = nil }
            case .serviceCIDRUpserted(let c): s.serviceCIDRs[c.name] = c
            case .serviceCIDRDeleted(let name): s.serviceCIDRs[name] = nil
            case .synced: break
            }
        }
    }

    /// ServiceCIDRs now held, by name.
    public var serviceCIDRs: [String: ServiceCIDR] { state.withLock { $0.serviceCIDRs } }
    /// Every event so far, in order.
    public var events: [ObjectEvent] { state.withLock { $0.events } }
    /// Services now held, by key.
    public var services: [NamespacedName: Service] { state.withLock { $0.services } }
    /// Service keys now held, as `namespace/name`, sorted.
    public var serviceNames: [String] { state.withLock { $0.services.keys.map(\.description).sorted() } }
    /// EndpointSlices now held.
    public var slices: [NamespacedName: EndpointSlice] { state.withLock { $0.slices } }
    /// Slice keys now held, sorted.
    public var sliceNames: [String] { state.withLock { $0.slices.keys.map(\.description).sorted() } }
    /// The node, when one was delivered.
    public var node: Node? { state.withLock { $0.node } }
    /// Whether `.synced` arrived.
    public var synced: Bool { state.withLock { $0.events.contains(.synced) } }
    /// How the stream ended, nil while it runs.
    public var finished: String? { state.withLock { $0.finished } }

    /// Waits until `condition` holds, polling; fails with `what` after `timeout` (a bound against
    /// hangs, not a performance assertion; see ``Eventually/hangBound``).
    public func wait(_ what: String, timeout: Duration = Eventually.hangBound, until condition: @Sendable (EventRecorder) -> Bool) async throws {
        try await Eventually.wait(what, timeout: timeout) { condition(self) }
    }
}

/// Polling with a bound, for tests.
public enum Eventually {
    /// A condition that did not come true in time.
    public struct Timeout: Error, CustomStringConvertible {
        public var description: String
    }

    /// The default bound: long, because it only catches hangs. The host suites run hundreds of
    /// tests at once on as few as two cores, and the cooperative thread pool runs a CPU-bound
    /// test to its end before a waiting one gets its turn again: in CI a healthy API-source
    /// test once needed 35 s of wall-clock time to see its first list.
    public static let hangBound: Duration = .seconds(120)

    /// Polls `condition` every `interval` until it holds; throws after `timeout`.
    public static func wait(_ what: String, timeout: Duration = hangBound, interval: Duration = .milliseconds(10),
                            _ condition: @Sendable () async throws -> Bool) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now.advanced(by: timeout)
        while true {
            if try await condition() { return }
            if clock.now >= deadline { throw Timeout(description: "timed out after \(timeout) waiting for: \(what)") }
            try await Task.sleep(for: interval)
        }
    }
}
