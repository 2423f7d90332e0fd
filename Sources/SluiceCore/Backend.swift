// Sluice: a per-node Kubernetes service proxy.
// The contract between the model and a mode's kernel backend.

/// What one successful sync did.
public struct SyncReport: Sendable, Hashable {
    /// Whether every chain / object was written.
    public var full: Bool
    /// Rules (or entries) written, by kind.
    public var written: [SyncCount: Int]
    /// Rules (or entries) the full state holds, by kind.
    public var total: [SyncCount: Int]
    /// Bytes sent to the kernel tools.
    public var bytes: Int
    /// Failed clean-up steps since the last report (the nftables mode's stale-chain deletion,
    /// `kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total`).
    public var cleanupFailures: Int = 0

    /// Creates a report.
    public init(full: Bool, written: [SyncCount: Int] = [:], total: [SyncCount: Int] = [:], bytes: Int = 0) {
        self.full = full
        self.written = written
        self.total = total
        self.bytes = bytes
    }
}

/// What a count in a ``SyncReport`` counts.
public enum SyncCount: Sendable, Hashable, CustomStringConvertible {
    /// iptables rules of one table (`kubeproxy_sync_proxy_rules_iptables_total` and
    /// `…_iptables_last{table}`).
    case iptablesRules(RuleTable)
    /// IPVS netlink messages (virtual and real servers added, changed or deleted).
    case ipvsMessages
    /// ipset entries added or deleted.
    case ipsetEntries
    /// Service addresses added to or removed from `kube-ipvs0`.
    case serviceAddresses
    /// IPVS virtual servers.
    case virtualServers
    /// IPVS real servers.
    case realServers
    /// Userspace relays (one per service port).
    case relays
    /// NodePorts held open by the userspace mode.
    case nodePorts

    /// An iptables table whose rules a ``SyncCount`` counts.
    public enum RuleTable: String, Sendable, Hashable, CaseIterable {
        case filter, nat
    }

    /// The `kind` label of `sluice_sync_last_written_objects`.
    public var metricLabel: String {
        switch self {
        case .iptablesRules(let t): return "\(t.rawValue)_rules"
        case .ipvsMessages: return "ipvs_messages"
        case .ipsetEntries: return "ipset_entries"
        case .serviceAddresses: return "service_addresses"
        case .virtualServers: return "virtual_servers"
        case .realServers: return "real_servers"
        case .relays: return "relays"
        case .nodePorts: return "node_ports"
        }
    }

    public var description: String {
        switch self {
        case .iptablesRules(let t): return "\(t.rawValue) rules"
        case .ipvsMessages: return "ipvs messages"
        case .ipsetEntries: return "ipset entries"
        case .serviceAddresses: return "service addresses"
        case .virtualServers: return "virtual servers"
        case .realServers: return "real servers"
        case .relays: return "relays"
        case .nodePorts: return "node ports"
        }
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
