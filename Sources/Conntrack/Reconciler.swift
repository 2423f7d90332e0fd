// Sluice: a per-node Kubernetes service proxy.
// The conntrack reconciler: after every successful sync, in every mode, it deletes the UDP
// and SCTP flows whose reply source is not a serving endpoint of the frontend they were
// sent to. See docs/conntrack.md for each case and for the cost model.

import Logging
import SluiceCore

/// What the reconciler needs of a conntrack table (`ConntrackTable` is the real one; tests
/// use a fake).
public protocol FlowSweeping: Actor {
    /// Streams the entries matching `filter` through `decide`, deleting those it condemns.
    func sweep(_ filter: DumpFilter, deciding decide: @Sendable (ConntrackFlow) -> FlowVerdict) async -> SweepResult
    /// nil until known; false when the kernel ignores `CTA_FILTER`.
    var kernelAppliesFilters: Bool? { get async }
}

extension ConntrackTable: FlowSweeping {}

/// Why a reconcile ran (or did not).
public enum ReconcileTrigger: String, Sendable, Hashable {
    /// The first after start (every frontend is checked, nothing is assumed).
    case initial
    /// Some frontend's serving endpoints changed (only those frontends are checked).
    case changed
    /// `invalidate()` was called, or the previous reconcile failed: every frontend is checked.
    case forced
    /// No UDP/SCTP frontend changed: the table was not read.
    case skipped
}

/// What one reconcile did.
public struct ReconcileReport: Sendable, Hashable, CustomStringConvertible {
    /// Why it ran.
    public var trigger: ReconcileTrigger
    /// Frontends whose flows were checked.
    public var frontends = 0
    /// Dumps (kernel reads) made.
    public var dumps = 0
    /// Sum of the sweeps' results.
    public var sweep = SweepResult()
    /// Wall-clock time.
    public var duration: Duration = .zero
    /// Whether the kernel filtered the dumps (false: whole-family reads).
    public var kernelFiltered = true
    /// Failures that were not per-flow (the table could not be opened).
    public var setupError: ConntrackError?

    /// Creates a report.
    public init(trigger: ReconcileTrigger) { self.trigger = trigger }

    /// Deleted flows.
    public var deleted: Int { sweep.deletedTotal }
    /// Failed operations.
    public var errors: Int { (setupError == nil ? 0 : 1) + sweep.dumpErrors + sweep.deleteErrors }

    /// One log line of `key=value` pairs (tests parse it).
    public var description: String {
        let ms = Double(duration.components.seconds) * 1000 + Double(duration.components.attoseconds) / 1e15
        var s = "trigger=\(trigger.rawValue) frontends=\(frontends) dumps=\(dumps) read=\(sweep.received) judged=\(sweep.judged)"
        s += " deleted=\(deleted) endpoint_gone=\(sweep.deleted[.endpointGone] ?? 0)"
        s += " never_translated=\(sweep.deleted[.neverTranslated] ?? 0) already_gone=\(sweep.alreadyGone)"
        s += " errors=\(errors) kernel_filter=\(kernelFiltered ? "yes" : "no")"
        s += " duration_ms=\((ms * 10).rounded() / 10)"
        return s
    }
}

/// Counters for the metrics endpoint, named after kube-proxy's.
public struct ConntrackMetrics: Sendable, Hashable {
    /// `kubeproxy_conntrack_reconciler_deleted_entries_total` (counter).
    public static let deletedEntriesName = "kubeproxy_conntrack_reconciler_deleted_entries_total"
    /// `kubeproxy_conntrack_reconciler_sync_duration_seconds` (histogram).
    public static let syncDurationName = "kubeproxy_conntrack_reconciler_sync_duration_seconds"
    /// `kubeproxy_conntrack_reconciler_errors_total` (counter; kube-proxy has none: it logs).
    public static let errorsName = "kubeproxy_conntrack_reconciler_errors_total"
    /// The histogram's upper bounds: kube-proxy's `ExponentialBuckets(0.001, 2, 15)`.
    public static let durationBuckets: [Double] = (0..<15).map { 0.001 * Double(1 << $0) }

    /// Flows deleted since start.
    public var deletedEntriesTotal = 0
    /// Failed operations since start (table not opened, dump failed, delete failed).
    public var errorsTotal = 0
    /// Reconciles that read the table.
    public var reconcilesTotal = 0
    /// Reconciles skipped because no frontend changed.
    public var skippedTotal = 0
    /// Observations of reconcile duration, in seconds: count, sum, and cumulative counts per
    /// bucket of `durationBuckets` (Prometheus histogram semantics; +Inf = `durationCount`).
    public var durationCount = 0
    public var durationSum = 0.0
    public var durationBucketCounts = [Int](repeating: 0, count: 15)
    /// The last report of a reconcile that read the table.
    public var last: ReconcileReport?

    /// Creates zeroed counters.
    public init() {}

    mutating func observe(_ seconds: Double) {
        durationCount += 1
        durationSum += seconds
        for (i, bound) in Self.durationBuckets.enumerated() where seconds <= bound {
            durationBucketCounts[i] += 1
        }
    }
}

/// Deletes stale UDP and SCTP conntrack flows after every sync; a `SyncObserver`, so every
/// mode gets it by listing it in its observers.
///
/// Cost: the table is read only when some UDP/SCTP frontend's serving set changed since the
/// last complete reconcile (or on the first sync after start, or after a failure), and then
/// only the flows of the changed frontends when there are few of them (one kernel-filtered
/// dump each), else the flows of their protocols. Flows stream through one at a time.
public actor ConntrackReconciler: SyncObserver {
    /// Node-level settings.
    public struct Configuration: Sendable {
        /// `--nodeport-addresses`.
        public var nodePortAddresses: NodePortAddresses
        /// Localhost NodePorts (IPv4, iptables mode).
        public var localhostNodePorts: Bool
        /// The node's addresses now (read before each reconcile that reads the table).
        public var localAddresses: @Sendable () -> [IPAddress]
        /// userspace mode: the relay port of a service port.
        public var relayPort: (@Sendable (ServicePortName) -> UInt16?)?
        /// With at most this many changed frontends, each is read with a dump of its own
        /// (kernel-filtered to its address and port); with more, one dump per protocol.
        public var targetedDumpLimit: Int
        /// The protocols whose flows are reconciled.
        public var protocols: Set<L4Protocol>

        /// Creates a configuration.
        public init(nodePortAddresses: NodePortAddresses = .all, localhostNodePorts: Bool = true,
                    localAddresses: @escaping @Sendable () -> [IPAddress] = { [] },
                    relayPort: (@Sendable (ServicePortName) -> UInt16?)? = nil, targetedDumpLimit: Int = 8,
                    protocols: Set<L4Protocol> = [.udp, .sctp]) {
            self.nodePortAddresses = nodePortAddresses
            self.localhostNodePorts = localhostNodePorts
            self.localAddresses = localAddresses
            self.relayPort = relayPort
            self.targetedDumpLimit = targetedDumpLimit
            self.protocols = protocols
        }
    }

    private let configuration: Configuration
    private let logger: Logger
    private let openTable: @Sendable () throws -> any FlowSweeping
    private var table: (any FlowSweeping)?
    /// Per family, the map as of the last complete reconcile (none yet, or forced: absent).
    /// One reconciler can serve the runners of both families.
    private var reconciled: [IPFamily: FrontendMap] = [:]
    /// Families that had a reconcile (complete or not).
    private var attempted: Set<IPFamily> = []
    /// Counters.
    public private(set) var metrics = ConntrackMetrics()

    /// Creates a reconciler.
    /// - Parameters:
    ///   - table: opens the table; called at the first reconcile that needs it (and again
    ///     after a failure to open). The default opens the process's own network namespace.
    public init(configuration: Configuration = .init(), logger: Logger,
                table: @escaping @Sendable () throws -> any FlowSweeping = { try ConntrackTable() }) {
        self.configuration = configuration
        self.logger = logger
        self.openTable = table
    }

    /// `SyncObserver`: reconciles `state`.
    public func didSync(state: ProxyState, previous: ProxyState?, report: SyncReport) async {
        await reconcile(state)
    }

    /// Makes the next reconcile check every frontend (call it when something outside the
    /// proxy may have let untranslated flows in: rules flushed by another program).
    public func invalidate() {
        reconciled = [:]
    }

    /// Deletes the stale flows of `state`'s frontends that changed since the last complete
    /// reconcile (all of them the first time).
    @discardableResult
    public func reconcile(_ state: ProxyState) async -> ReconcileReport {
        let start = ContinuousClock.now
        let local = configuration.localAddresses()
        let map = FrontendMap.build(
            state, protocols: configuration.protocols,
            nodePortAddresses: FrontendMap.nodePortAddresses(configuration.nodePortAddresses, local: local, family: state.family,
                                                             localhost: configuration.localhostNodePorts),
            localAddresses: Set(local), relayPort: configuration.relayPort)
        let baseline = reconciled[state.family]
        let work = map.changes(since: baseline)
        guard !work.isEmpty else {
            reconciled[state.family] = map
            metrics.skippedTotal += 1
            logger.debug("conntrack reconcile skipped: no UDP/SCTP frontend changed")
            return ReconcileReport(trigger: .skipped)
        }
        var report = ReconcileReport(trigger: baseline == nil ? (attempted.contains(state.family) ? .forced : .initial) : .changed)
        report.frontends = work.frontends.count

        let table: any FlowSweeping
        do {
            table = try self.table ?? openTable()
            self.table = table
        } catch {
            report.setupError = (error as? ConntrackError) ?? ConntrackError(.open, errno: 0, context: "\(error)")
            return finish(report, start: start, family: state.family, map: nil)
        }

        let judge: @Sendable (ConntrackFlow) -> FlowVerdict = { work.verdict(for: $0) }
        if await table.kernelAppliesFilters == false { report.kernelFiltered = false }
        for filter in await plan(work, table: table) {
            let r = await table.sweep(filter, deciding: judge)
            report.dumps += 1
            add(r, to: &report)
            if !r.kernelFiltered {
                report.kernelFiltered = false
                if filter != DumpFilter(family: work.family) {
                    // The kernel ignores CTA_FILTER: one read of the whole family covers the rest.
                    report.dumps += 1
                    add(await table.sweep(DumpFilter(family: work.family), deciding: judge), to: &report)
                }
                break
            }
        }
        return finish(report, start: start, family: state.family, map: report.sweep.complete ? map : nil)
    }

    /// The dumps for `work`: one per frontend when few and the kernel filters, else one per
    /// protocol, else (the kernel ignores filters) one for the whole family.
    private func plan(_ work: FrontendMap, table: any FlowSweeping) async -> [DumpFilter] {
        let filters = await table.kernelAppliesFilters
        if filters == false { return [DumpFilter(family: work.family)] }
        let keys = work.frontends.keys.sorted()
        if keys.count <= configuration.targetedDumpLimit {
            return keys.map { DumpFilter(family: work.family, l4: $0.l4, destination: $0.ip, destinationPort: $0.port) }
        }
        return Set(keys.map(\.l4)).sorted { $0.rawValue < $1.rawValue }.map { DumpFilter(family: work.family, l4: $0) }
    }

    private func add(_ r: SweepResult, to report: inout ReconcileReport) {
        report.sweep.received += r.received
        report.sweep.judged += r.judged
        for (k, v) in r.deleted { report.sweep.deleted[k, default: 0] += v }
        report.sweep.alreadyGone += r.alreadyGone
        report.sweep.deleteErrors += r.deleteErrors
        report.sweep.dumpErrors += r.dumpErrors
        for e in r.errors { report.sweep.record(e) }
        for f in r.sample where report.sweep.sample.count < 5 { report.sweep.sample.append(f) }
    }

    /// Records metrics and logs; `map` (when the reconcile was complete) becomes the baseline.
    private func finish(_ report: ReconcileReport, start: ContinuousClock.Instant, family: IPFamily,
                        map: FrontendMap?) -> ReconcileReport {
        var report = report
        report.duration = ContinuousClock.now - start
        reconciled[family] = map
        attempted.insert(family)
        metrics.reconcilesTotal += 1
        metrics.deletedEntriesTotal += report.deleted
        metrics.errorsTotal += report.errors
        metrics.observe(Double(report.duration.components.seconds) + Double(report.duration.components.attoseconds) / 1e18)
        metrics.last = report
        let line = "conntrack reconcile: \(report) deleted_total=\(metrics.deletedEntriesTotal)"
        if let e = report.setupError {
            logger.error("\(line): cannot open the conntrack table: \(e); stale UDP flows stay until they time out; retrying at the next sync")
        } else if !report.sweep.errors.isEmpty {
            let what = report.sweep.errors.map(\.description).joined(separator: "; ")
            logger.error("\(line): \(what); every frontend is checked again at the next sync")
        } else {
            logger.info("\(line)")
        }
        for f in report.sweep.sample { logger.debug("conntrack: deleted \(f)") }
        return report
    }
}
