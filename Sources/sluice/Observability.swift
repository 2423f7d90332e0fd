// Sluice: a per-node Kubernetes service proxy.
// Health and metrics as the executable runs them: the proxy health server, the per-service
// health-check node ports, and the metrics server, fed by the sync loop.

import Conntrack
import Foundation
import IPTables
import KernelKit
import KubeAPI
import Logging
import Netlink
import ServiceLifecycle
import SluiceCore
import SluiceServer

/// What health and metrics add to the runner and to the service group.
struct Observability {
    /// Run after every successful sync (service health-check listeners, state-derived metrics).
    var observers: [any SyncObserver]
    /// Told about every request, change and sync attempt (health, metrics).
    var recorders: [any SyncRecorder]
    /// Long-running services: the HTTP servers and the health-check listeners' shutdown.
    var services: [any ServiceLifecycle.Service]
    /// The metrics registry the observers feed.
    var metrics: ProxyMetrics

    /// A mode's observers with the conntrack reconciler's outcomes recorded as
    /// kube-proxy's `kubeproxy_conntrack_reconciler_*` metrics.
    func instrument(_ observers: [any SyncObserver]) -> [any SyncObserver] {
        observers.map { observer in
            guard let reconciler = observer as? ConntrackReconciler else { return observer }
            return InstrumentedReconciler(reconciler: reconciler, metrics: metrics)
        }
    }
}

/// Runs the conntrack reconciler after each sync and records what it did (a reconcile the
/// reconciler skips because no UDP/SCTP frontend changed is not recorded).
struct InstrumentedReconciler: SyncObserver {
    let reconciler: ConntrackReconciler
    let metrics: ProxyMetrics

    func didSync(state: ProxyState, previous: ProxyState?, report: SyncReport) async {
        let r = await reconciler.reconcile(state)
        guard r.trigger != .skipped else { return }
        metrics.recordConntrackReconcile(family: state.family, duration: r.duration, deleted: r.deleted)
    }
}

/// Builds health and metrics for the selected mode and flags. An empty bind address disables
/// that server; the service health-check node ports are always served, as kube-proxy does.
func makeObservability(options: ProxyOptions, node: NodeConfig, document: ConfigDocument? = nil,
                       logger: Logger) throws -> Observability {
    let (healthzAddress, metricsAddress) = try options.bindAddresses()
    let health = ProxyHealth(syncPeriod: options.timing.syncPeriod)
    let families = options.proxyMode == .userspace ? [IPFamily.ipv4] : node.families
    let metrics = ProxyMetrics(nodeName: node.nodeName, tables: options.proxyMode == .iptables ? ["filter", "nat"] : [],
                               families: families, nftables: options.proxyMode == .nftables)
    let configz = ConfigFile.json(options, document: document).map { MetricsServer.configzBody(configurationJSON: $0) }
    metrics.bootstrapMetricsSystem()
    let serviceHealth = ServiceHealthServers(health: health, nodePortAddresses: node.nodePortAddresses,
                                             localAddresses: LocalAddresses.current(), logger: logger)
    var services: [any ServiceLifecycle.Service] = [ServiceHealthService(servers: serviceHealth)]
    if let address = healthzAddress {
        services.append(HTTPService(logger: logger, hardFail: options.bindAddressHardFail) {
            try await HealthServer.start(address: address, health: health, metrics: metrics, logger: logger)
        })
    } else {
        logger.info("--healthz-bind-address is empty: no /healthz server")
    }
    if let address = metricsAddress {
        let mode = options.proxyMode.rawValue
        services.append(HTTPService(logger: logger, hardFail: options.bindAddressHardFail) {
            try await MetricsServer.start(address: address, metrics: metrics, proxyMode: mode, configz: configz, logger: logger)
        })
    } else {
        logger.info("--metrics-bind-address is empty: no /metrics server")
    }
    return Observability(observers: [metrics, serviceHealth], recorders: [health, metrics], services: services, metrics: metrics)
}

/// Runs one HTTP server until shutdown. A failure to listen is logged and retried every 5 s
/// (kube-proxy's behaviour without `--bind-address-hard-fail`); the proxy keeps running.
/// With `hardFail` the failure ends the process instead.
struct HTTPService: ServiceLifecycle.Service {
    let logger: Logger
    var hardFail = false
    let start: @Sendable () async throws -> HTTPServer

    func run() async throws {
        try await untilShutdown {
            while !Task.isCancelled {
                let server: HTTPServer
                do {
                    server = try await start()
                } catch {
                    if hardFail {
                        logger.error("\(error); exiting (--bind-address-hard-fail)")
                        throw SluiceExit("\(error) (--bind-address-hard-fail)")
                    }
                    logger.error("\(error); retrying in 5s")
                    try await Task.sleep(for: .seconds(5))
                    continue
                }
                await server.serveUntilCancelled()
                if !Task.isCancelled {
                    // The listener closed by itself: open it again rather than stop the proxy.
                    logger.error("the \(server.purpose) listener on \(server.boundAddress) closed; reopening in 5s")
                    try await Task.sleep(for: .seconds(5))
                }
            }
        }
    }
}

/// Closes the service health-check listeners at shutdown.
struct ServiceHealthService: ServiceLifecycle.Service {
    let servers: ServiceHealthServers

    func run() async throws {
        try? await gracefulShutdown()
        await servers.closeAll()
    }
}

/// The Kubernetes Event kube-proxy records when it starts (reason `Starting`, action
/// `StartKubeProxy`, regarding this Node), posted once to events.k8s.io/v1 in the `default`
/// namespace, where events about cluster-scoped objects go. A failure is logged once.
struct StartupEvent: Sendable {
    var nodeName: String
    var mode: String
    var now: Date = Date()

    /// The Event object as JSON.
    func json() -> [UInt8] {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        formatter.timeZone = TimeZone(identifier: "UTC")
        // MicroTime: RFC 3339 with six fractional digits.
        let millis = formatter.string(from: now)
        let micro = millis.replacingOccurrences(of: "Z", with: "000Z")
        let suffix = String(UInt64(now.timeIntervalSince1970 * 1e9), radix: 16)
        let object: [String: Any] = [
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": ["name": "\(nodeName).\(suffix)", "namespace": "default"],
            "eventTime": micro,
            "reportingController": "sluice", "reportingInstance": "sluice-\(nodeName)",
            "action": "StartKubeProxy", "reason": "Starting", "type": "Normal",
            "regarding": ["kind": "Node", "name": nodeName, "uid": nodeName],
            "note": "Starting sluice \(sluiceVersion) (\(mode) mode)",
        ]
        return Array((try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data())
    }

    func post(client: KubeClient, logger: Logger) async {
        do {
            try await client.create(path: "/apis/events.k8s.io/v1/namespaces/default/events", json: json(),
                                    what: "POST start-up event")
            logger.debug("recorded the start-up event for node \(nodeName)")
        } catch {
            logger.warning("cannot record the start-up event: \(error)")
        }
    }
}

/// kube-proxy's nfacct counters (iptables mode, where the kernel has nfnetlink_acct): the
/// objects are made sure to exist so the rules can count into them, and a poller copies their
/// packet counts to `kubeproxy_iptables_ct_state_invalid_dropped_packets_total` and
/// `kubeproxy_iptables_localhost_nodeports_accepted_packets_total` every 2 s.
/// - Returns: the objects that exist (empty when nfacct is unavailable: no nfacct rules and no
///   series), and the poller to run.
func makeNFAcct(metrics: ProxyMetrics?, logger: Logger) async -> (names: Set<String>, poller: NFAcctPoller?) {
    let counters: NFAcctCounters
    do {
        counters = try NFAcctCounters()
    } catch {
        logger.info("nfacct is not available (\(error)): no nfacct counters")
        return ([], nil)
    }
    var names = Set<String>()
    for name in NFAcctCounterName.all {
        do {
            try await counters.ensure(name)
            names.insert(name)
        } catch {
            logger.info("nfacct object \(name) is not available (\(error)): no rule counts into it")
        }
    }
    guard let metrics, !names.isEmpty else { return (names, nil) }
    return (names, NFAcctPoller(counters: counters, names: names, metrics: metrics, logger: logger))
}

/// The nfacct objects of kube-proxy's that exist in this network namespace (read-only; empty
/// when nfnetlink_acct is unavailable). explain, diff, compile and the drift check compile
/// with them, as the running proxy does after `makeNFAcct`.
func existingNFAcctCounters() async -> Set<String> {
    guard let counters = try? NFAcctCounters() else { return [] }
    var names = Set<String>()
    for name in NFAcctCounterName.all where await counters.exists(name) { names.insert(name) }
    return names
}

/// Copies the nfacct packet counts to their metrics.
struct NFAcctPoller: ServiceLifecycle.Service {
    let counters: NFAcctCounters
    let names: Set<String>
    let metrics: ProxyMetrics
    let logger: Logger
    var interval: Duration = .seconds(2)

    /// The metric of each nfacct object (kube-proxy's names).
    static let metricOf: [String: ProxyMetrics.NFAcctMetric] = [
        NFAcctCounterName.ctStateInvalidDropped: .ctStateInvalidDropped,
        NFAcctCounterName.localhostNodePortsAccepted: .localhostNodePortsAccepted,
    ]

    func run() async throws {
        let tracked = names.sorted().compactMap { name in Self.metricOf[name].map { (name, $0) } }
        for (_, metric) in tracked { metrics.addNFAcctPackets(metric, 0) }
        let (counters, interval, logger, metrics) = (self.counters, self.interval, self.logger, self.metrics)
        try await untilShutdown {
            // The objects outlive the process: the first read adds their whole count, so the
            // series carries the object's value, as kube-proxy's collector does.
            var seen: [String: UInt64] = [:]
            var failing = Set<String>()
            while !Task.isCancelled {
                for (name, metric) in tracked {
                    do {
                        let packets = try await counters.packets(name)
                        let last = seen[name, default: 0]
                        // A smaller count: the object was deleted and made again.
                        metrics.addNFAcctPackets(metric, packets >= last ? packets - last : packets)
                        seen[name] = packets
                        if failing.remove(name) != nil { logger.info("reading nfacct object \(name) works again") }
                    } catch {
                        if failing.insert(name).inserted { logger.warning("reading nfacct object \(name): \(error)") }
                    }
                }
                try await Task.sleep(for: interval)
            }
        }
    }
}
