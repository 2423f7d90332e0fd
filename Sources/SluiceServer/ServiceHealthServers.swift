// Sluice: a per-node Kubernetes service proxy.
// Per-service health checks (kube-proxy's pkg/proxy/healthcheck/service_health.go): one HTTP
// listener per `healthCheckNodePort` of an externalTrafficPolicy=Local LoadBalancer, answering
// any path with the number of ready endpoints on this node, so the cloud load balancer sends
// traffic only to nodes that can serve it locally.

import Logging
import SluiceCore
import Synchronization

/// Local ready endpoint counts shared between the listener lifecycle and the request handlers.
private final class LocalEndpointCounts: Sendable {
    private let counts = Mutex<[NamespacedName: Int]>([:])

    func set(_ new: [NamespacedName: Int]) { counts.withLock { $0 = new } }
    func get(_ name: NamespacedName) -> Int { counts.withLock { $0[name] ?? 0 } }
}

/// Opens and closes the health-check node port listeners after every successful sync.
public actor ServiceHealthServers: SyncObserver {
    private let health: ProxyHealth
    private let hosts: [IPAddress]
    private let logger: Logger
    private let counts = LocalEndpointCounts()
    private var open: [NamespacedName: (port: Int, servers: [HTTPServer])] = [:]
    /// The latest state of each family: health-check ports and local ready endpoint counts.
    private var families: [IPFamily: (ports: [NamespacedName: Int], endpoints: [NamespacedName: Int])] = [:]

    /// Creates the manager; nothing listens until a sync brings a health-check node port.
    /// - Parameters:
    ///   - health: the proxy health; a service answers 503 while the proxy is unhealthy.
    ///   - nodePortAddresses: `--nodeport-addresses`: listen on the node addresses it selects,
    ///     or on every address (`0.0.0.0`, IPv4 and IPv6) for `.all`.
    ///   - localAddresses: this node's addresses, to apply `nodePortAddresses` to.
    public init(health: ProxyHealth, nodePortAddresses: NodePortAddresses, localAddresses: [IPAddress], logger: Logger) {
        self.health = health
        self.logger = logger
        switch nodePortAddresses {
        case .all:
            hosts = [IPAddress("0.0.0.0")!]
        case .cidrs(let cidrs):
            let selected = localAddresses.filter { ip in cidrs.contains { $0.contains(ip) } }
            if selected.isEmpty {
                logger.error("no node address matches --nodeport-addresses; health check node ports listen on every address")
                hosts = [IPAddress("0.0.0.0")!]
            } else {
                hosts = selected
            }
        }
    }

    /// The open listeners: Service and health-check node port.
    public var openPorts: [NamespacedName: Int] { open.mapValues(\.port) }

    /// The addresses each listener binds.
    public nonisolated var listenAddresses: [IPAddress] { hosts }

    /// kube-proxy's `SyncServices` and `SyncEndpoints`, from the state just applied.
    public func didSync(state: ProxyState, previous: ProxyState?, report: SyncReport) async {
        var ports: [NamespacedName: Int] = [:]
        for (name, info) in state.servicePorts where info.healthCheckNodePort != 0 {
            ports[name.service] = info.healthCheckNodePort
        }
        families[state.family] = (ports, ServiceHealthServers.localReadyEndpoints(state, services: Set(ports.keys)))
        await reconcile()
    }

    /// Ready endpoints on this node per Service, counted by IP (a pod serving two ports counts
    /// once): kube-proxy's `EndpointsMap.LocalReadyEndpoints`, for `services` only. Terminating
    /// endpoints do not count, so a node whose only endpoints are terminating fails the check.
    public static func localReadyEndpoints(_ state: ProxyState, services: Set<NamespacedName>) -> [NamespacedName: Int] {
        var ips: [NamespacedName: Set<IPAddress>] = [:]
        for name in state.servicePorts.keys where services.contains(name.service) {
            for ep in state.endpoints[name] ?? [] where ep.isLocal && ep.ready {
                ips[name.service, default: []].insert(ep.ip)
            }
        }
        return ips.mapValues(\.count)
    }

    private func reconcile() async {
        // Families see the same Services; a dual-stack pod has one address per family, so the
        // larger count is the number of local pods.
        var wanted: [NamespacedName: Int] = [:]
        var endpointCounts: [NamespacedName: Int] = [:]
        for (_, f) in families {
            wanted.merge(f.ports) { a, _ in a }
            endpointCounts.merge(f.endpoints) { max($0, $1) }
        }
        counts.set(endpointCounts.filter { wanted[$0.key] != nil })
        for (name, listener) in open where wanted[name] != listener.port {
            logger.info("closing health check for \(name) on port \(listener.port)")
            for s in listener.servers { await s.close() }
            open[name] = nil
        }
        for (name, port) in wanted.sorted(by: { $0.key < $1.key }) where open[name] == nil {
            if let servers = await listen(name, port: port) {
                open[name] = (port, servers)
                logger.info("opened health check for \(name) on port \(port)")
            }
        }
    }

    /// Opens the listeners of one Service, or none: a failure closes what was opened, and the
    /// next sync tries again (kube-proxy does the same and records a Warning event).
    private func listen(_ name: NamespacedName, port: Int) async -> [HTTPServer]? {
        var servers: [HTTPServer] = []
        let (health, counts) = (self.health, self.counts)
        for host in hosts {
            do {
                let s = try await HTTPServer.start(purpose: "health check of \(name)", address: BindAddress(host: host, port: port),
                                                   logger: logger) { _ in
                    ServiceHealthServers.reply(service: name, localEndpoints: counts.get(name), proxyHealthy: health.isHealthy)
                }
                servers.append(s)
            } catch {
                logger.error("failed to start the health check of \(name) on port \(port): \(error)")
                for s in servers { await s.close() }
                return nil
            }
        }
        return servers
    }

    /// Closes every listener (shutdown).
    public func closeAll() async {
        for (_, listener) in open {
            for s in listener.servers { await s.close() }
        }
        open = [:]
    }

    /// kube-proxy's answer: 200 when the node has ready endpoints and the proxy is healthy, else
    /// 503; the weight header carries the endpoint count; the body is kube-proxy's indented JSON.
    public static func reply(service: NamespacedName, localEndpoints: Int, proxyHealthy: Bool) -> HTTPReply {
        let body = "{\n\t\"service\": {\n\t\t\"namespace\": \(jsonString(service.namespace)),\n\t\t\"name\": \(jsonString(service.name))\n\t},\n"
            + "\t\"localEndpoints\": \(localEndpoints),\n\t\"serviceProxyHealthy\": \(proxyHealthy)\n}"
        return HTTPReply(
            status: localEndpoints > 0 && proxyHealthy ? 200 : 503,
            headers: HealthServer.jsonHeaders + [("X-Load-Balancing-Endpoint-Weight", String(localEndpoints))],
            body: body)
    }

    /// A JSON string literal (Kubernetes names need no escaping; anything else is escaped).
    static func jsonString(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case _ where u.value < 0x20:
                let hex = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }
}
