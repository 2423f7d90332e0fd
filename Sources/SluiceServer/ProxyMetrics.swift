// Sluice: a per-node Kubernetes service proxy.
// kube-proxy's `kubeproxy_*` metrics (pkg/proxy/metrics/metrics.go: names, types, buckets and
// help texts) on a swift-prometheus registry, fed by the sync loop, with kube-proxy 1.33's
// `ip_family` label (PR #129173) on the per-proxier series: each IP family's proxier of a
// dual-stack node has its own series. The conntrack reconciler's two metrics (1.33, PRs
// #130200 and #130204) and the process_* metrics of a Go program are here too.

import Prometheus
import SluiceCore

/// The kube-proxy metrics of one process, recorded from the sync loop (`SyncRecorder`), from
/// the state after each sync (`SyncObserver`) and from the health server.
public final class ProxyMetrics: Sendable {
    /// The registry `/metrics` renders.
    public let registry: PrometheusCollectorRegistry
    /// This node's name (local endpoints).
    public let nodeName: String
    private let wallClock: @Sendable () -> Duration
    /// Trigger times older than this (the process start) are not latencies of this process.
    private let startWallTime: Duration

    let endpointChangesPending: Gauge
    let endpointChangesTotal: Counter
    let serviceChangesPending: Gauge
    let serviceChangesTotal: Counter
    /// nftables mode only: failed main transactions and failed stale-chain deletions.
    let nftablesSyncFailures: Counter?
    let nftablesCleanupFailures: Counter?
    /// The process collector (`process_*`), refreshed at every render.
    let process: ProcessMetrics

    /// The series one IP family's proxier writes (labelled `ip_family`).
    struct FamilySeries: Sendable {
        let syncDuration: DurationHistogram
        let syncFullDuration: DurationHistogram
        let syncPartialDuration: DurationHistogram
        let lastTimestamp: Gauge
        let lastQueuedTimestamp: Gauge
        let networkProgrammingDuration: DurationHistogram
        let restoreFailures: Counter
        let partialRestoreFailures: Counter
        let noLocalEndpointsInternal: Gauge
        let noLocalEndpointsExternal: Gauge
        let conntrackDuration: DurationHistogram
        let conntrackDeleted: Counter
    }

    /// `sync_proxy_rules_duration_seconds` and its full/partial variants:
    /// `0.001 × 2^k` seconds for k = 0…14 (Go's `ExponentialBuckets(0.001, 2, 15)`).
    public static let syncDurationBuckets: [Duration] = (0...14).map { .milliseconds(1 << $0) }

    /// `network_programming_duration_seconds`: Go's `MergeBuckets` (which starts with a 0 bucket),
    /// then 0.25 and 0.5 s, 1…59 s, 60…115 s by 5, 120…300 s by 30.
    public static let networkProgrammingBuckets: [Duration] =
        [.zero, .milliseconds(250), .milliseconds(500)]
        + (1...59).map { .seconds($0) }
        + stride(from: 60, through: 115, by: 5).map { .seconds($0) }
        + stride(from: 120, through: 300, by: 30).map { .seconds($0) }

    /// Metric names, for `/metrics` tests and the documentation.
    public enum Name {
        public static let syncDuration = "kubeproxy_sync_proxy_rules_duration_seconds"
        public static let syncFullDuration = "kubeproxy_sync_full_proxy_rules_duration_seconds"
        public static let syncPartialDuration = "kubeproxy_sync_partial_proxy_rules_duration_seconds"
        public static let lastTimestamp = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
        public static let lastQueuedTimestamp = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
        public static let networkProgrammingDuration = "kubeproxy_network_programming_duration_seconds"
        public static let endpointChangesPending = "kubeproxy_sync_proxy_rules_endpoint_changes_pending"
        public static let endpointChangesTotal = "kubeproxy_sync_proxy_rules_endpoint_changes_total"
        public static let serviceChangesPending = "kubeproxy_sync_proxy_rules_service_changes_pending"
        public static let serviceChangesTotal = "kubeproxy_sync_proxy_rules_service_changes_total"
        public static let restoreFailures = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
        public static let partialRestoreFailures = "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total"
        public static let iptablesTotal = "kubeproxy_sync_proxy_rules_iptables_total"
        public static let iptablesLast = "kubeproxy_sync_proxy_rules_iptables_last"
        public static let noLocalEndpoints = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
        public static let nftablesSyncFailures = "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"
        public static let nftablesCleanupFailures = "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total"
        public static let healthzTotal = "kubeproxy_proxy_healthz_total"
        public static let livezTotal = "kubeproxy_proxy_livez_total"
        public static let conntrackDuration = "kubeproxy_conntrack_reconciler_sync_duration_seconds"
        public static let conntrackDeleted = "kubeproxy_conntrack_reconciler_deleted_entries_total"
        public static let ctStateInvalidDropped = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total"
        public static let localhostNodePortsAccepted = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total"
    }

    /// kube-proxy's nfacct-backed packet counters (iptables mode). They exist only where the
    /// nfacct object they read exists: without nfacct, no series (as kube-proxy).
    public enum NFAcctMetric: Sendable, CaseIterable {
        /// Packets the INVALID-state rule of KUBE-FORWARD dropped.
        case ctStateInvalidDropped
        /// Packets accepted on NodePorts of 127.0.0.0/8.
        case localhostNodePortsAccepted

        /// The exported name.
        public var name: String {
            switch self {
            case .ctStateInvalidDropped: Name.ctStateInvalidDropped
            case .localhostNodePortsAccepted: Name.localhostNodePortsAccepted
            }
        }

        var help: String {
            switch self {
            case .ctStateInvalidDropped: "packets dropped by iptables to work around conntrack problems"
            case .localhostNodePortsAccepted: "Number of packets accepted on nodeports of loopback interface"
            }
        }
    }

    private static func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
        // The whole name goes in `metricName` so the exported name is exactly kube-proxy's;
        // the help text carries kube-proxy's stability prefix.
        MetricNameDescriptor(metricName: name, unitName: "", helpText: "[ALPHA] " + help)
    }

    private static var iptablesTotalHelp: MetricNameDescriptor {
        descriptor(Name.iptablesTotal, "Total number of iptables rules owned by kube-proxy")
    }
    private static var iptablesLastHelp: MetricNameDescriptor {
        descriptor(Name.iptablesLast, "Number of iptables rules written by kube-proxy in last sync")
    }
    /// Sluice's own: what the last sync wrote, by kind, in every mode.
    private static var writtenHelp: MetricNameDescriptor {
        MetricNameDescriptor(metricName: "sluice_sync_last_written_objects", unitName: "",
                             helpText: "Objects written to the kernel by the last sync, by kind (rules, IPVS messages, set entries, addresses)")
    }
    private static var healthzHelp: MetricNameDescriptor { descriptor(Name.healthzTotal, "Cumulative proxy healthz HTTP status") }
    private static var livezHelp: MetricNameDescriptor { descriptor(Name.livezTotal, "Cumulative proxy livez HTTP status") }

    /// Registers every metric.
    /// - Parameters:
    ///   - nodeName: this node (for `no_local_endpoints_total`).
    ///   - tables: rule tables whose counts start at 0 before the first sync (`filter`, `nat` in
    ///     iptables mode); others appear when a backend reports them.
    ///   - families: the IP families whose series exist before their first sync (the node's).
    ///   - nftables: register the nftables mode's two failure counters; a failed sync then counts
    ///     there instead of in the iptables restore failures (kube-proxy registers per mode).
    ///   - registry: where to register; a fresh one by default, so instances never collide.
    ///   - wallClock: time since the Unix epoch, for timestamps and programming latency
    ///     (`CLOCK_REALTIME` when nil).
    public init(nodeName: String, tables: [String] = [], families: [IPFamily] = [.ipv4], nftables: Bool = false,
                registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
                wallClock: (@Sendable () -> Duration)? = nil) {
        let wallClock = wallClock ?? { wallClockNow() }
        self.registry = registry
        self.nodeName = nodeName
        self.wallClock = wallClock
        self.startWallTime = wallClock()
        let d = ProxyMetrics.descriptor
        endpointChangesPending = registry.makeGauge(descriptor: d(Name.endpointChangesPending, "Pending proxy rules Endpoint changes"))
        endpointChangesTotal = registry.makeCounter(descriptor: d(Name.endpointChangesTotal, "Cumulative proxy rules Endpoint changes"))
        serviceChangesPending = registry.makeGauge(descriptor: d(Name.serviceChangesPending, "Pending proxy rules Service changes"))
        serviceChangesTotal = registry.makeCounter(descriptor: d(Name.serviceChangesTotal, "Cumulative proxy rules Service changes"))
        nftablesSyncFailures = nftables
            ? registry.makeCounter(descriptor: d(Name.nftablesSyncFailures, "Cumulative proxy nftables sync failures")) : nil
        nftablesCleanupFailures = nftables
            ? registry.makeCounter(descriptor: d(Name.nftablesCleanupFailures, "Cumulative proxy nftables cleanup failures")) : nil
        process = ProcessMetrics(registry: registry)
        for family in families {
            _ = ProxyMetrics.series(family, in: registry)
            for table in tables {
                _ = registry.makeGauge(descriptor: ProxyMetrics.iptablesTotalHelp, labels: [("table", table), ("ip_family", family.rawValue)])
                _ = registry.makeGauge(descriptor: ProxyMetrics.iptablesLastHelp, labels: [("table", table), ("ip_family", family.rawValue)])
            }
        }
    }

    /// The series of `family` (the registry hands back the same ones for the same labels).
    static func series(_ family: IPFamily, in registry: PrometheusCollectorRegistry) -> FamilySeries {
        let d = ProxyMetrics.descriptor
        let f = [("ip_family", family.rawValue)]
        let noLocal = d(Name.noLocalEndpoints, "Number of services with a Local traffic policy and no endpoints")
        return FamilySeries(
            syncDuration: registry.makeDurationHistogram(
                descriptor: d(Name.syncDuration, "SyncProxyRules latency in seconds"), labels: f, buckets: syncDurationBuckets),
            syncFullDuration: registry.makeDurationHistogram(
                descriptor: d(Name.syncFullDuration, "SyncProxyRules latency in seconds for full resyncs"), labels: f,
                buckets: syncDurationBuckets),
            syncPartialDuration: registry.makeDurationHistogram(
                descriptor: d(Name.syncPartialDuration, "SyncProxyRules latency in seconds for partial resyncs"), labels: f,
                buckets: syncDurationBuckets),
            lastTimestamp: registry.makeGauge(descriptor: d(Name.lastTimestamp, "The last time proxy rules were successfully synced"), labels: f),
            lastQueuedTimestamp: registry.makeGauge(
                descriptor: d(Name.lastQueuedTimestamp, "The last time a sync of proxy rules was queued"), labels: f),
            networkProgrammingDuration: registry.makeDurationHistogram(
                descriptor: d(Name.networkProgrammingDuration, "In Cluster Network Programming Latency in seconds"), labels: f,
                buckets: networkProgrammingBuckets),
            restoreFailures: registry.makeCounter(descriptor: d(Name.restoreFailures, "Cumulative proxy iptables restore failures"), labels: f),
            partialRestoreFailures: registry.makeCounter(
                descriptor: d(Name.partialRestoreFailures, "Cumulative proxy iptables partial restore failures"), labels: f),
            noLocalEndpointsInternal: registry.makeGauge(descriptor: noLocal, labels: [("traffic_policy", "internal")] + f),
            noLocalEndpointsExternal: registry.makeGauge(descriptor: noLocal, labels: [("traffic_policy", "external")] + f),
            conntrackDuration: registry.makeDurationHistogram(
                descriptor: d(Name.conntrackDuration, "ReconcileConntrackFlowsLatency latency in seconds"), labels: f,
                buckets: syncDurationBuckets),
            conntrackDeleted: registry.makeCounter(
                descriptor: d(Name.conntrackDeleted, "Cumulative conntrack flows deleted by conntrack reconciler"), labels: f))
    }

    private func series(_ family: IPFamily) -> FamilySeries { ProxyMetrics.series(family, in: registry) }

    /// Records one conntrack reconcile of `family`: how long it took and how many flows it deleted.
    public func recordConntrackReconcile(family: IPFamily, duration: Duration, deleted: Int) {
        let s = series(family)
        s.conntrackDuration.record(duration)
        if deleted > 0 { s.conntrackDeleted.increment(by: Int64(deleted)) }
    }

    /// Adds `packets` to the nfacct-backed counter `metric` (0 registers the series).
    public func addNFAcctPackets(_ metric: NFAcctMetric, _ packets: UInt64) {
        let counter = registry.makeCounter(descriptor: ProxyMetrics.descriptor(metric.name, metric.help))
        if packets > 0 { counter.increment(by: Int64(clamping: packets)) }
    }

    /// The metrics in Prometheus text format (version 0.0.4), with fresh `process_*` values.
    public func render() -> String {
        process.refresh()
        return registry.emitToString()
    }

    /// Counts one `/healthz` answer.
    public func countHealthz(code: Int) {
        registry.makeCounter(descriptor: ProxyMetrics.healthzHelp, labels: [("code", String(code))]).increment()
    }

    /// Counts one `/livez` answer.
    public func countLivez(code: Int) {
        registry.makeCounter(descriptor: ProxyMetrics.livezHelp, labels: [("code", String(code))]).increment()
    }

    private func nowSeconds() -> Double { seconds(wallClock()) }

    private func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }
}

extension ProxyMetrics: SyncRecorder {
    /// Records one event of the sync loop, as kube-proxy's proxier records it.
    public func record(_ event: SyncEvent) {
        switch event {
        case .started(let family), .queued(let family):
            // kube-proxy's SyncLoop synthesises the queued time; Sync() sets it on every request.
            series(family).lastQueuedTimestamp.set(to: nowSeconds())
        case .changed(let kind, let pendingServices, let pendingEndpoints):
            switch kind {
            case .service: serviceChangesTotal.increment()
            case .endpoints: endpointChangesTotal.increment()
            }
            serviceChangesPending.set(to: Double(pendingServices))
            endpointChangesPending.set(to: Double(pendingEndpoints))
        case .synced(let attempt):
            recordSync(attempt)
        case .node:
            break
        }
    }

    private func recordSync(_ attempt: SyncAttempt) {
        let s = series(attempt.family)
        let f = ("ip_family", attempt.family.rawValue)
        // Observed for failed syncs too (kube-proxy observes in a defer).
        s.syncDuration.record(attempt.duration)
        (attempt.full ? s.syncFullDuration : s.syncPartialDuration).record(attempt.duration)
        serviceChangesPending.set(to: Double(attempt.pendingServiceChanges))
        endpointChangesPending.set(to: Double(attempt.pendingEndpointChanges))
        if let nftablesSyncFailures {
            guard let report = attempt.report else {
                nftablesSyncFailures.increment()
                return
            }
            if report.cleanupFailures > 0 { nftablesCleanupFailures?.increment(by: Int64(report.cleanupFailures)) }
        }
        guard let report = attempt.report else {
            // Every backend failure leaves the previous rules in place, as a failed
            // iptables-restore does: count it as one.
            s.restoreFailures.increment()
            if !attempt.full { s.partialRestoreFailures.increment() }
            return
        }
        let now = wallClock()
        for time in attempt.triggerTimes.values.joined() {
            let trigger = Duration.nanoseconds(Int64((time * 1e9).rounded()))
            // Changes from before this process started are not its latency (kube-proxy ignores
            // trigger times older than its change tracker). A trigger time ahead of this node's
            // clock (skew) counts as 0.
            guard trigger > startWallTime else { continue }
            s.networkProgrammingDuration.record(max(.zero, now - trigger))
        }
        // Only iptables rule counts have kube-proxy's metrics (table="filter"/"nat").
        for (kind, count) in report.total {
            guard case .iptablesRules(let table) = kind else { continue }
            registry.makeGauge(descriptor: ProxyMetrics.iptablesTotalHelp, labels: [("table", table.rawValue), f]).set(to: Double(count))
        }
        for (kind, count) in report.written {
            registry.makeGauge(descriptor: ProxyMetrics.writtenHelp, labels: [("kind", kind.metricLabel), f]).set(to: Double(count))
            guard case .iptablesRules(let table) = kind else { continue }
            registry.makeGauge(descriptor: ProxyMetrics.iptablesLastHelp, labels: [("table", table.rawValue), f]).set(to: Double(count))
        }
        s.lastTimestamp.set(to: seconds(now))
    }
}

extension ProxyMetrics: SyncObserver {
    /// Counts service ports with a Local traffic policy that have endpoints, but none on this
    /// node (`no_local_endpoints_total{traffic_policy}`), as kube-proxy does in each sync.
    public func didSync(state: ProxyState, previous: ProxyState?, report: SyncReport) async {
        var internalCount = 0
        var externalCount = 0
        for (name, info) in state.servicePorts where info.internalPolicyLocal || info.externalPolicyLocal {
            let c = categorizeEndpoints(state.endpoints[name] ?? [], info: info, nodeName: nodeName, nodeLabels: state.nodeLabels)
            guard c.hasAnyEndpoints, c.local.isEmpty else { continue }
            if info.internalPolicyLocal { internalCount += 1 }
            if info.externalPolicyLocal { externalCount += 1 }
        }
        let s = series(state.family)
        s.noLocalEndpointsInternal.set(to: Double(internalCount))
        s.noLocalEndpointsExternal.set(to: Double(externalCount))
    }
}
