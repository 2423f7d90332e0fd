// Sluice: a per-node Kubernetes service proxy.
// kube-proxy's proxy health (pkg/proxy/healthcheck/proxy_health.go): per IP family, the
// oldest queued update not yet followed by a successful sync must be younger than the health
// timeout (2 × sync period); /healthz also requires the node to be eligible (not being
// deleted, not tainted ToBeDeletedByClusterAutoscaler, KEP-3836).

import SluiceCore
import Synchronization

/// One response of the health endpoints: status code and body (the headers are fixed).
public struct HealthResponse: Sendable, Hashable {
    /// 200 or 503.
    public var status: Int
    /// kube-proxy's JSON body, byte for byte.
    public var body: String

    /// Creates a response.
    public init(status: Int, body: String) {
        self.status = status
        self.body = body
    }
}

/// The proxy's health, fed by the sync loop (as a `SyncRecorder`) and read by the HTTP servers.
public final class ProxyHealth: Sendable {
    /// The taint Cluster Autoscaler puts on a node it is about to delete.
    public static let toBeDeletedTaint = "ToBeDeletedByClusterAutoscaler"

    /// How old a queued, unsynced update may get before the proxy is unhealthy.
    public let healthTimeout: Duration
    private let clock: HealthClock

    private struct State {
        var lastUpdated: [IPFamily: HealthInstant] = [:]
        var oldestPendingQueued: [IPFamily: HealthInstant] = [:]
        /// Eligible until a Node event says otherwise, as kube-proxy starts.
        var nodeEligible = true
    }

    private let state = Mutex(State())

    /// Creates the health state.
    /// - Parameters:
    ///   - healthTimeout: kube-proxy uses 2 × the sync period; see `init(syncPeriod:clock:)`.
    ///   - clock: where time comes from.
    public init(healthTimeout: Duration, clock: HealthClock = .system()) {
        self.healthTimeout = healthTimeout
        self.clock = clock
    }

    /// Creates the health state with kube-proxy's timeout, 2 × `syncPeriod`.
    public convenience init(syncPeriod: Duration, clock: HealthClock = .system()) {
        self.init(healthTimeout: syncPeriod * 2, clock: clock)
    }

    /// The proxier of `family` has put the current state in the kernel.
    public func updated(_ family: IPFamily) {
        let now = clock.now()
        state.withLock {
            $0.oldestPendingQueued[family] = nil
            $0.lastUpdated[family] = now
        }
    }

    /// The proxier of `family` received a change it has not synced yet. Only the oldest such
    /// change counts, until `updated(_:)`.
    public func queuedUpdate(_ family: IPFamily) {
        let now = clock.now()
        state.withLock {
            if $0.oldestPendingQueued[family] == nil { $0.oldestPendingQueued[family] = now }
        }
    }

    /// Takes this node's Node object into account: ineligible when it is being deleted or is
    /// tainted `ToBeDeletedByClusterAutoscaler`; nil (the Node was deleted) is ineligible too.
    public func syncNode(_ node: Node?) {
        let eligible: Bool
        if let node {
            eligible = (node.deletionTimestamp ?? "").isEmpty && !node.taints.contains { $0.key == ProxyHealth.toBeDeletedTaint }
        } else {
            eligible = false
        }
        state.withLock { $0.nodeEligible = eligible }
    }

    /// Whether the node may receive load-balancer traffic (the `/healthz` node check).
    public var nodeEligible: Bool { state.withLock { $0.nodeEligible } }

    /// The proxier's health alone (what `/livez` and the service health checks use).
    public var isHealthy: Bool { evaluate(now: clock.now()).healthy }

    /// kube-proxy's `isHealthy`: healthy unless some family has had an update queued for at least
    /// the timeout. Returns the time to report as `lastUpdated` (nil: never updated).
    private func evaluate(now: HealthInstant) -> (healthy: Bool, lastUpdated: HealthInstant?) {
        state.withLock { s in
            var latest: HealthInstant?
            for family in IPFamily.allCases {
                guard let updated = s.lastUpdated[family] else { continue }
                if latest.map({ updated > $0 }) ?? true { latest = updated }
                guard let queued = s.oldestPendingQueued[family] else { continue }
                if now.monotonic - queued.monotonic < healthTimeout { continue }
                return (false, updated)
            }
            return (true, latest)
        }
    }

    /// The `/healthz` answer: 200 when healthy and the node is eligible, else 503. When healthy,
    /// `lastUpdated` is the current time (kube-proxy keeps that for backward compatibility).
    public func healthz() -> HealthResponse {
        let eligible = nodeEligible
        let now = clock.now()
        var (healthy, lastUpdated) = evaluate(now: now)
        healthy = healthy && eligible
        if healthy { lastUpdated = now }
        let body = #"{"lastUpdated": "# + quoted(lastUpdated) + #","currentTime": "# + quoted(now)
            + #", "nodeEligible": "# + (eligible ? "true" : "false") + "}"
        return HealthResponse(status: healthy ? 200 : 503, body: body)
    }

    /// The `/livez` answer: the proxier's health without the node check.
    public func livez() -> HealthResponse {
        let now = clock.now()
        var (healthy, lastUpdated) = evaluate(now: now)
        if healthy { lastUpdated = now }
        let body = #"{"lastUpdated": "# + quoted(lastUpdated) + #","currentTime": "# + quoted(now) + "}"
        return HealthResponse(status: healthy ? 200 : 503, body: body)
    }

    private func quoted(_ t: HealthInstant?) -> String { "\"" + (t?.goDescription ?? GoTime.zero) + "\"" }
}

extension ProxyHealth: SyncRecorder {
    /// Maps the sync loop's events onto kube-proxy's calls: `SyncLoop` → `Updated`, `Sync()` →
    /// `QueuedUpdate`, a successful sync → `Updated`, Node events → `SyncNode`.
    public func record(_ event: SyncEvent) {
        switch event {
        case .started(let family): updated(family)
        case .queued(let family): queuedUpdate(family)
        case .synced(let attempt) where attempt.succeeded: updated(attempt.family)
        case .node(let node): syncNode(node)
        case .synced, .changed: break
        }
    }
}
