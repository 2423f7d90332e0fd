// Sluice: a per-node Kubernetes service proxy.
// The contract between the model and a mode's kernel backend.

/// What a sync writes: the one encoding of full versus partial, from the sync runner through
/// every backend's plan to its compiler (docs/architecture.md, "The sync contract").
public enum SyncKind: Sendable, Hashable {
    /// Everything is written, whatever was written before.
    case full
    /// Only the objects of these Services are written (the iptables mode's top-level chains
    /// are rewritten as far as they differ from what the last restore wrote).
    case partial(changed: Set<NamespacedName>)

    /// The partial sync of what `state` reports changed.
    public static func partial(of state: ProxyState) -> SyncKind { .partial(changed: state.changedServices) }

    /// True for `.full`.
    public var isFull: Bool { if case .full = self { true } else { false } }

    /// The Services a partial sync writes; `nil` for a full sync (every Service).
    public var changed: Set<NamespacedName>? {
        switch self {
        case .full: nil
        case .partial(let c): c
        }
    }

    /// The Services a sync of this kind writes in `state`: the changed ones, or for a full
    /// sync every Service `state` holds and every changed one (a deleted Service is only in
    /// `state.changedServices`).
    public func services(in state: ProxyState) -> Set<NamespacedName> {
        changed ?? Set(state.servicePorts.keys.map(\.service)).union(state.changedServices)
    }
}

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

/// Which of a Service's traffic policies a count is about: `internalTrafficPolicy` (cluster IP
/// traffic) or `externalTrafficPolicy` (NodePorts, load balancers, external IPs). The
/// metrics' `traffic_policy` label uses the raw values.
public enum TrafficPolicyScope: String, Sendable, Hashable, CaseIterable, Comparable {
    case `internal`
    case external

    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

/// A sync that could not write everything: one item per piece that failed (a service port's
/// listener, an IPVS message, an address), each with its underlying error. The pieces that did
/// not fail are written; the runner retries with a full sync. Every mode's backend throws this
/// one type for partial failures (a refused tool or transaction throws the tool's own error).
public struct SyncFailure: Error, Sendable, CustomStringConvertible {
    /// One failed piece.
    public struct Item: Sendable, CustomStringConvertible {
        /// What was being written ("" when the error names it itself).
        public var what: String
        /// The underlying error.
        public var error: any Error & Sendable
        /// How the error is shown after `what` (the error's description by default).
        public var detail: String

        /// Creates an item.
        public init(what: String, error: any Error & Sendable, detail: String? = nil) {
            self.what = what
            self.error = error
            self.detail = detail ?? "\(error)"
        }

        /// `what: detail`, or the detail alone.
        public var description: String { what.isEmpty ? detail : "\(what): \(detail)" }
    }

    /// The failed pieces, in the order they were met.
    public var items: [Item]

    /// Creates a failure.
    public init(_ items: [Item]) { self.items = items }

    /// One line per failed piece.
    public var failures: [String] { items.map(\.description) }

    /// The first five failures, and how many more there are (a node past its open-file limit
    /// can have thousands).
    public var description: String {
        let shown = items.prefix(5).map(\.description).joined(separator: "; ")
        return items.count > 5 ? "\(shown); and \(items.count - 5) more" : shown
    }
}

/// A mode's kernel side: it makes the kernel hold what a `ProxyState` describes.
///
/// Implementations must leave the previous state in place when a sync fails (a batch is
/// applied whole or not at all); the runner then retries with a full sync.
public protocol ProxyBackend: Actor {
    /// A short name for logs (`iptables`, `ipvs`, ...).
    nonisolated var name: String { get }
    /// Makes the kernel match `state`. A `.partial(changed:)` sync may write only the Services
    /// in `changed`; a backend may make it full (after a failed restore, say) and says so in
    /// the report. See docs/architecture.md, "The sync contract".
    func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport
    /// True when something outside the proxy removed its state (the iptables canary), so the
    /// next sync must be full.
    func externalChangeDetected() async -> Bool
}

extension ProxyBackend {
    /// A partial sync of the Services `state` reports changed (`state.changedServices`), as
    /// the runner asks between full syncs.
    public func syncChanges(_ state: ProxyState) async throws -> SyncReport {
        try await sync(state, kind: .partial(of: state))
    }
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
