// Sluice: a per-node Kubernetes service proxy.
// Health and metrics as the executable runs them: the proxy health server, the per-service
// health-check node ports, and the metrics server, fed by the sync loop.

import IPTables
import Logging
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
}

/// Builds health and metrics for the selected mode and flags. An empty bind address disables
/// that server; the service health-check node ports are always served, as kube-proxy does.
func makeObservability(options: ProxyOptions, node: NodeConfig, logger: Logger) throws -> Observability {
    let (healthzAddress, metricsAddress) = try options.bindAddresses()
    let health = ProxyHealth(syncPeriod: options.timing.syncPeriod)
    let metrics = ProxyMetrics(nodeName: node.nodeName, tables: options.proxyMode == .iptables ? ["filter", "nat"] : [],
                               nftables: options.proxyMode == .nftables)
    metrics.bootstrapMetricsSystem()
    let serviceHealth = ServiceHealthServers(health: health, nodePortAddresses: node.nodePortAddresses,
                                             localAddresses: LocalAddresses.current(), logger: logger)
    var services: [any ServiceLifecycle.Service] = [ServiceHealthService(servers: serviceHealth)]
    if let address = healthzAddress {
        services.append(HTTPService(logger: logger) {
            try await HealthServer.start(address: address, health: health, metrics: metrics, logger: logger)
        })
    } else {
        logger.info("--healthz-bind-address is empty: no /healthz server")
    }
    if let address = metricsAddress {
        let mode = options.proxyMode.rawValue
        services.append(HTTPService(logger: logger) {
            try await MetricsServer.start(address: address, metrics: metrics, proxyMode: mode, logger: logger)
        })
    } else {
        logger.info("--metrics-bind-address is empty: no /metrics server")
    }
    return Observability(observers: [metrics, serviceHealth], recorders: [health, metrics], services: services)
}

/// Runs one HTTP server until shutdown. A failure to listen is logged and retried every 5 s
/// (kube-proxy's behaviour without `--bind-address-hard-fail`); the proxy keeps running.
struct HTTPService: ServiceLifecycle.Service {
    let logger: Logger
    let start: @Sendable () async throws -> HTTPServer

    func run() async throws {
        try await untilShutdown {
            while !Task.isCancelled {
                let server: HTTPServer
                do {
                    server = try await start()
                } catch {
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
