// Sluice: a per-node Kubernetes service proxy.
// The contract between the model and a mode's kernel backend.

/// What one successful sync did.
public struct SyncReport: Sendable, Hashable {
    /// Whether every chain / object was written.
    public var full: Bool
    /// Rules (or entries) written, by table or kind.
    public var written: [String: Int]
    /// Rules (or entries) the full state holds, by table or kind.
    public var total: [String: Int]
    /// Bytes sent to the kernel tools.
    public var bytes: Int
    /// Failed clean-up steps since the last report (the nftables mode's stale-chain deletion,
    /// `kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total`).
    public var cleanupFailures: Int = 0

    /// Creates a report.
    public init(full: Bool, written: [String: Int] = [:], total: [String: Int] = [:], bytes: Int = 0) {
        self.full = full
        self.written = written
        self.total = total
        self.bytes = bytes
    }
}

/// A mode's kernel side: it makes the kernel hold what a `ProxyState` describes.
///
/// Implementations must leave the previous state in place when a sync fails (a batch is
/// applied whole or not at all); the runner then retries with a full sync.
public protocol ProxyBackend: Actor {
    /// A short name for logs (`iptables`, `ipvs`, ...).
    nonisolated var name: String { get }
    /// Makes the kernel match `state`. A partial sync may write only `state.changedServices`.
    func sync(_ state: ProxyState, full: Bool) async throws -> SyncReport
    /// True when something outside the proxy removed its state (the iptables canary), so the
    /// next sync must be full.
    func externalChangeDetected() async -> Bool
}

/// Work that follows every successful sync, in every mode (conntrack cleanup, health-check
/// servers, metrics). Observers run in order; an observer's failure is logged, never fatal.
public protocol SyncObserver: Sendable {
    /// Called after the kernel holds `state`.
    /// - Parameters:
    ///   - state: the state just applied.
    ///   - previous: always nil from `SyncRunner`, which keeps no copy of the previously
    ///     applied state (holding one made every snapshot copy the whole model); an observer
    ///     that compares syncs keeps what it needs itself.
    ///   - report: what the backend did.
    func didSync(state: ProxyState, previous: ProxyState?, report: SyncReport) async
}
