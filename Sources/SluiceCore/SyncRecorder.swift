// Sluice: a per-node Kubernetes service proxy.
// What the sync loop tells health and metrics: requests for a sync, changes, each sync's
// outcome and timing, and this node's Node object. SluiceCore defines the events; the
// server module turns them into kube-proxy's /healthz state and `kubeproxy_*` metrics.

/// The kind of object a change came from.
public enum ChangeKind: String, Sendable, Hashable {
    /// A Service was added, changed or deleted.
    case service
    /// An EndpointSlice was added, changed or deleted.
    case endpoints
}

/// One finished sync attempt, successful or not.
public struct SyncAttempt: Sendable {
    /// The family the runner syncs.
    public var family: IPFamily
    /// The kind of sync the runner asked for (a backend may make a partial one full: see ``full``).
    public var kind: SyncKind
    /// How long the attempt took, on the runner's clock.
    public var duration: Duration
    /// The backend's report; nil when the sync failed.
    public var report: SyncReport?
    /// The error the backend threw (typed, with its text as logged) when the sync failed.
    public var error: SyncErrorRecord?
    /// On success: the `last-change-trigger-time` of every EndpointSlice change this sync put in
    /// the kernel, by Service, in seconds since the Unix epoch (those of failed attempts are
    /// carried over to the next success). Empty on failure.
    public var triggerTimes: [NamespacedName: [Double]]
    /// Service changes that arrived while the attempt ran and wait for the next sync.
    public var pendingServiceChanges: Int
    /// EndpointSlice changes that arrived while the attempt ran and wait for the next sync.
    public var pendingEndpointChanges: Int

    /// Creates an attempt record.
    public init(family: IPFamily, kind: SyncKind, duration: Duration, report: SyncReport?, error: SyncErrorRecord? = nil,
                triggerTimes: [NamespacedName: [Double]] = [:], pendingServiceChanges: Int = 0, pendingEndpointChanges: Int = 0) {
        self.family = family
        self.kind = kind
        self.duration = duration
        self.report = report
        self.error = error
        self.triggerTimes = triggerTimes
        self.pendingServiceChanges = pendingServiceChanges
        self.pendingEndpointChanges = pendingEndpointChanges
    }

    /// Whether the kernel now holds the snapshot.
    public var succeeded: Bool { report != nil }

    /// Whether every chain / object was written: the report's word after a successful sync
    /// (the backend may have made a partial sync full), the requested kind after a failed one.
    public var full: Bool { report?.full ?? kind.isFull }
}

/// Something the sync loop reports as it happens.
public enum SyncEvent: Sendable {
    /// The loop started (kube-proxy's `SyncLoop`: health counts from here, and the queued
    /// timestamp is synthesised).
    case started(IPFamily)
    /// A sync was requested because something changed (kube-proxy's `Sync()`: `QueuedUpdate`
    /// and the last-queued timestamp). Sent for changes once the source has delivered its
    /// initial state, for that state itself, and for forced full syncs; not for periodic resyncs.
    case queued(IPFamily)
    /// An event changed the model. The counts are the changes now waiting for a sync.
    case changed(ChangeKind, pendingServices: Int, pendingEndpoints: Int)
    /// A sync attempt finished.
    case synced(SyncAttempt)
    /// This node's Node object arrived or changed; nil when it was deleted.
    case node(Node?)
}

/// Receives the sync loop's events, synchronously and in order, on the runner's actor.
/// Implementations must be quick and must not block (take a lock, update, return).
public protocol SyncRecorder: Sendable {
    /// Records one event.
    func record(_ event: SyncEvent)
}
