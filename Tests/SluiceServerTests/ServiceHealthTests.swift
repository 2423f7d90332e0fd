// Service health-check node ports over real HTTP: listeners open and close as
// externalTrafficPolicy=Local LoadBalancers come and go, answer 200 with local ready
// endpoints and 503 without, with kube-proxy's weight header and JSON body.

import Logging
import SluiceCore
import SluiceServer
import SluiceTesting
import Testing

private func lbService(_ name: String, healthCheckNodePort: Int, local: Bool = true) -> ObjectEvent {
    .serviceUpserted(Service(
        namespace: "shop", name: name, typeName: "LoadBalancer", clusterIPs: ["10.96.0.\(healthCheckNodePort % 250 + 1)"],
        ports: [ServicePort(name: "http", port: 80, nodePort: 30000 + healthCheckNodePort % 2000),
                ServicePort(name: "https", port: 443, nodePort: 32000 + healthCheckNodePort % 700)],
        loadBalancerIngress: [LoadBalancerIngress(ip: "203.0.113.9")],
        externalTrafficPolicy: local ? "Local" : "Cluster", healthCheckNodePort: local ? healthCheckNodePort : 0))
}

/// A slice of `service` with the given endpoints: (address, node, ready).
private func slice(_ service: String, _ endpoints: [(String, String, Bool)]) -> ObjectEvent {
    .sliceUpserted(EndpointSlice(
        namespace: "shop", name: service + "-x", serviceName: service,
        ports: [EndpointPort(name: "http", port: 8080), EndpointPort(name: "https", port: 8443)],
        endpoints: endpoints.map { Endpoint(addresses: [$0.0], ready: $0.2, serving: $0.2, terminating: !$0.2, nodeName: $0.1) }))
}

private func expectedBody(_ name: String, endpoints: Int, healthy: Bool) -> String {
    """
    {
    \t"service": {
    \t\t"namespace": "shop",
    \t\t"name": "\(name)"
    \t},
    \t"localEndpoints": \(endpoints),
    \t"serviceProxyHealthy": \(healthy)
    }
    """
}

@Suite(.serialized) struct ServiceHealthServersTests {
    private let logger = Logger(label: "test")

    private func make() -> (SyncRunner<ManualClock>, ServiceHealthServers, ProxyHealth, ManualClock) {
        let clock = ManualClock()
        let health = ProxyHealth(syncPeriod: .seconds(30), clock: HealthClock(clock, wallTimeAtStart: testWallStart))
        let servers = ServiceHealthServers(health: health, nodePortAddresses: .cidrs([CIDR("127.0.0.0/8")!]),
                                           localAddresses: [IPAddress("127.0.0.1")!, IPAddress("192.0.2.7")!], logger: logger)
        let runner = SyncRunner(tracker: ChangeTracker(nodeName: "node-a"), backend: ScriptedBackend(), clock: clock,
                                logger: logger, observers: [servers], recorders: [health])
        return (runner, servers, health, clock)
    }

    @Test func listenersFollowServicesAndAnswerWithLocalReadyEndpoints() async throws {
        let (runner, servers, _, _) = make()
        defer { Task { await servers.closeAll() } }
        #expect(servers.listenAddresses == [IPAddress("127.0.0.1")!])  // --nodeport-addresses selects loopback only
        let port = try freePort()

        // Two local ready pods (one listed twice through two ports), one remote, one local but
        // terminating: weight 2.
        await runner.handle(lbService("web", healthCheckNodePort: port))
        await runner.handle(slice("web", [("10.244.1.5", "node-a", true), ("10.244.1.6", "node-a", true),
                                          ("10.244.2.5", "node-b", true), ("10.244.1.7", "node-a", false)]))
        await runner.handle(.synced)
        await runner.syncOnce()
        #expect(await servers.openPorts == [NamespacedName(namespace: "shop", name: "web"): port])

        let ok = try await httpGet(port: port, path: "/")
        #expect(ok.status == 200)
        #expect(ok.headers["x-load-balancing-endpoint-weight"] == "2")
        #expect(ok.headers["content-type"] == "application/json")
        #expect(ok.headers["x-content-type-options"] == "nosniff")
        #expect(ok.body == expectedBody("web", endpoints: 2, healthy: true))
        #expect(try await httpGet(port: port, path: "/any/path?at=all").status == 200)

        // Only terminating endpoints left on this node: 503, weight 0.
        await runner.handle(slice("web", [("10.244.2.5", "node-b", true), ("10.244.1.7", "node-a", false)]))
        await runner.syncOnce()
        let none = try await httpGet(port: port, path: "/healthz")
        #expect(none.status == 503)
        #expect(none.headers["x-load-balancing-endpoint-weight"] == "0")
        #expect(none.body == expectedBody("web", endpoints: 0, healthy: true))

        // The Service goes away: the listener closes.
        await runner.handle(.serviceDeleted(NamespacedName(namespace: "shop", name: "web")))
        await runner.syncOnce()
        #expect(await servers.openPorts.isEmpty)
        #expect(await connectionRefused(port: port))
    }

    @Test func servicesComeAndGoAndPortsMove() async throws {
        let (runner, servers, _, _) = make()
        defer { Task { await servers.closeAll() } }
        let ports = try freePorts(3)
        let (p1, p2, p3) = (ports[0], ports[1], ports[2])
        await runner.handle(.synced)
        await runner.syncOnce()
        #expect(await servers.openPorts.isEmpty)

        await runner.handle(lbService("a", healthCheckNodePort: p1))
        await runner.handle(lbService("b", healthCheckNodePort: p2))
        await runner.handle(lbService("c", healthCheckNodePort: 0, local: false))  // Cluster policy: no health check
        await runner.handle(slice("a", [("10.244.1.5", "node-a", true)]))
        await runner.syncOnce()
        #expect(await servers.openPorts.count == 2)
        #expect(try await httpGet(port: p1, path: "/").status == 200)
        let b = try await httpGet(port: p2, path: "/")
        #expect(b.status == 503)  // no endpoints at all
        #expect(b.body == expectedBody("b", endpoints: 0, healthy: true))

        // The health-check node port of "a" changes: the old one closes, the new one opens.
        await runner.handle(lbService("a", healthCheckNodePort: p3))
        await runner.syncOnce()
        #expect(await connectionRefused(port: p1))
        let moved = try await httpGet(port: p3, path: "/")
        #expect(moved.status == 200)
        #expect(moved.headers["x-load-balancing-endpoint-weight"] == "1")

        // "b" switches to Cluster policy: its health check goes away.
        await runner.handle(lbService("b", healthCheckNodePort: p2, local: false))
        await runner.syncOnce()
        #expect(await servers.openPorts == [NamespacedName(namespace: "shop", name: "a"): p3])
        #expect(await connectionRefused(port: p2))
    }

    @Test func anUnhealthyProxyFailsEveryServiceCheck() async throws {
        let (runner, servers, health, clock) = make()
        defer { Task { await servers.closeAll() } }
        let port = try freePort()
        health.record(.started(.ipv4))  // what the runner's loop reports first
        await runner.handle(lbService("web", healthCheckNodePort: port))
        await runner.handle(slice("web", [("10.244.1.5", "node-a", true)]))
        await runner.handle(.synced)
        await runner.syncOnce()
        #expect(try await httpGet(port: port, path: "/").status == 200)

        health.queuedUpdate(.ipv4)
        clock.advance(by: .seconds(61))  // stalled past 2 × sync period
        #expect(!health.isHealthy)
        let r = try await httpGet(port: port, path: "/")
        #expect(r.status == 503)
        #expect(r.headers["x-load-balancing-endpoint-weight"] == "1")
        #expect(r.body == expectedBody("web", endpoints: 1, healthy: false))
    }

    @Test func aPortInUseIsRetriedOnTheNextSync() async throws {
        let (runner, servers, _, _) = make()
        defer { Task { await servers.closeAll() } }
        let blocker = try await HTTPServer.start(purpose: "blocker", address: BindAddress(host: IPAddress("127.0.0.1")!, port: 0),
                                                 logger: logger) { _ in HTTPReply(status: 418, headers: [], body: "") }
        let port = blocker.port
        await runner.handle(lbService("web", healthCheckNodePort: port))
        await runner.handle(.synced)
        await runner.syncOnce()
        #expect(await servers.openPorts.isEmpty)
        await blocker.close()
        await runner.requestFullSync()
        await runner.syncOnce()
        #expect(await servers.openPorts.count == 1)
        #expect(try await httpGet(port: port, path: "/").status == 503)
    }
}
