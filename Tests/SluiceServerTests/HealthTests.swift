// Proxy health: kube-proxy's /healthz and /livez state machine on a manual clock, the exact
// JSON bodies, node eligibility, and the endpoints over real HTTP.

import Logging
import SluiceCore
import SluiceServer
import SluiceTesting
import Testing

/// 2020-06-03 23:59:53.688063083 UTC, the wall time the test clocks start at.
let testWallStart: Duration = .seconds(1_591_228_793) + .nanoseconds(688_063_083)

private func makeHealth(syncPeriod: Duration = .seconds(30)) -> (ProxyHealth, ManualClock) {
    let clock = ManualClock()
    return (ProxyHealth(syncPeriod: syncPeriod, clock: HealthClock(clock, wallTimeAtStart: testWallStart)), clock)
}

@Suite struct ProxyHealthStateTests {
    @Test func theTimeoutIsTwiceTheSyncPeriod() {
        let (health, _) = makeHealth(syncPeriod: .seconds(7))
        #expect(health.healthTimeout == .seconds(14))
    }

    @Test func healthyWhileStartingAndWhileQueuedUpdatesAreYoungerThanTheTimeout() {
        let (health, clock) = makeHealth()
        #expect(health.isHealthy)  // nothing recorded yet
        health.record(.started(.ipv4))
        health.record(.queued(.ipv4))
        clock.advance(by: .seconds(59))
        #expect(health.isHealthy)
        clock.advance(by: .seconds(1))  // 60 s = 2 × 30 s: not younger than the timeout
        #expect(!health.isHealthy)
        #expect(health.livez().status == 503)
        #expect(health.healthz().status == 503)
        health.record(.synced(SyncAttempt(family: .ipv4, kind: .partial(changed: []), duration: .zero, report: SyncReport(full: false))))
        #expect(health.isHealthy)
        #expect(health.healthz().status == 200)
    }

    @Test func onlyTheOldestQueuedUpdateCounts() {
        let (health, clock) = makeHealth()
        health.updated(.ipv4)
        health.queuedUpdate(.ipv4)
        clock.advance(by: .seconds(40))
        health.queuedUpdate(.ipv4)  // does not restart the timer
        clock.advance(by: .seconds(20))
        #expect(!health.isHealthy)
    }

    @Test func aFailedSyncDoesNotClearTheQueuedUpdate() {
        let (health, clock) = makeHealth()
        health.record(.started(.ipv4))
        health.record(.queued(.ipv4))
        clock.advance(by: .seconds(30))
        health.record(.synced(SyncAttempt(family: .ipv4, kind: .full, duration: .zero, report: nil, error: SyncErrorRecord(StubSyncError()))))
        clock.advance(by: .seconds(30))
        #expect(!health.isHealthy)
    }

    @Test func eachFamilyIsJudgedOnItsOwn() {
        let (health, clock) = makeHealth()
        health.record(.started(.ipv4))
        health.record(.started(.ipv6))
        health.record(.queued(.ipv6))
        clock.advance(by: .seconds(60))
        #expect(!health.isHealthy)
        health.updated(.ipv4)
        #expect(!health.isHealthy)  // IPv6 is still stuck
        health.updated(.ipv6)
        #expect(health.isHealthy)
    }

    @Test func aFamilyNeverUpdatedIsNotJudged() {
        // kube-proxy only looks at families that have reported an update (SyncLoop does at start).
        let (health, clock) = makeHealth()
        health.queuedUpdate(.ipv4)
        clock.advance(by: .seconds(600))
        #expect(health.isHealthy)
    }

    @Test func bodiesAreKubeProxysByteForByte() {
        let (health, clock) = makeHealth()
        health.record(.started(.ipv4))
        clock.advance(by: .seconds(2))
        let now = "2020-06-03 23:59:55.688063083 +0000 UTC m=+2.000000000"
        #expect(health.healthz() == HealthResponse(
            status: 200, body: #"{"lastUpdated": "\#(now)","currentTime": "\#(now)", "nodeEligible": true}"#))
        #expect(health.livez() == HealthResponse(status: 200, body: #"{"lastUpdated": "\#(now)","currentTime": "\#(now)"}"#))

        // Unhealthy: lastUpdated is the stuck family's last update (t = 0).
        health.record(.queued(.ipv4))
        clock.advance(by: .milliseconds(60_500))
        let then = "2020-06-03 23:59:53.688063083 +0000 UTC m=+0.000000000"
        let later = "2020-06-04 00:00:56.188063083 +0000 UTC m=+62.500000000"
        #expect(health.livez() == HealthResponse(status: 503, body: #"{"lastUpdated": "\#(then)","currentTime": "\#(later)"}"#))
        #expect(health.healthz().body == #"{"lastUpdated": "\#(then)","currentTime": "\#(later)", "nodeEligible": true}"#)
    }

    @Test func aTimeNeverSetPrintsAsGosZeroTime() {
        let (health, _) = makeHealth()
        health.syncNode(nil)
        let now = "2020-06-03 23:59:53.688063083 +0000 UTC m=+0.000000000"
        #expect(health.healthz() == HealthResponse(
            status: 503,
            body: #"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","currentTime": "\#(now)", "nodeEligible": false}"#))
    }

    @Test func goTimeTextTrimsTrailingZeros() {
        #expect(HealthInstant(monotonic: .seconds(202) + .nanoseconds(631_797_660), wall: .seconds(946_681_200)).goDescription
            == "1999-12-31 23:00:00 +0000 UTC m=+202.631797660")
        #expect(HealthInstant(monotonic: .milliseconds(1500), wall: .seconds(946_681_200) + .milliseconds(500)).goDescription
            == "1999-12-31 23:00:00.5 +0000 UTC m=+1.500000000")
    }

    @Test func nodeEligibilityFollowsDeletionAndTheAutoscalerTaint() {
        let (health, _) = makeHealth()
        health.record(.started(.ipv4))
        #expect(health.nodeEligible)  // eligible until a Node says otherwise
        health.record(.node(Node(name: "n", taints: [NodeTaint(key: ProxyHealth.toBeDeletedTaint, value: "1700000000", effect: "NoSchedule")])))
        #expect(!health.nodeEligible)
        #expect(health.healthz().status == 503)
        #expect(health.livez().status == 200)  // /livez ignores the node
        health.record(.node(Node(name: "n", taints: [NodeTaint(key: "node.kubernetes.io/unschedulable", effect: "NoSchedule")])))
        #expect(health.nodeEligible)
        #expect(health.healthz().status == 200)
        health.record(.node(Node(name: "n", deletionTimestamp: "2024-05-01T12:00:00Z")))
        #expect(health.healthz().status == 503)
        health.record(.node(Node(name: "n")))
        #expect(health.healthz().status == 200)
        health.record(.node(nil))
        #expect(health.healthz().status == 503)
    }
}

@Suite struct HealthServerHTTPTests {
    private let logger = Logger(label: "test")

    @Test func healthzAndLivezOverHTTP() async throws {
        let (health, clock) = makeHealth()
        let metrics = ProxyMetrics(nodeName: "n")
        let server = try await HealthServer.start(address: BindAddress(host: IPAddress("127.0.0.1")!, port: 0),
                                                  health: health, metrics: metrics, logger: logger)
        defer { Task { await server.close() } }
        #expect(server.port != 0)
        health.record(.started(.ipv4))

        let ok = try await httpGet(port: server.port, path: "/healthz")
        #expect(ok.status == 200)
        #expect(ok.headers["content-type"] == "application/json")
        #expect(ok.headers["x-content-type-options"] == "nosniff")
        #expect(ok.body == health.healthz().body)
        #expect(ok.body.hasSuffix(#", "nodeEligible": true}"#))
        let live = try await httpGet(port: server.port, path: "/livez?verbose=1")
        #expect(live.status == 200)
        #expect(live.body == health.livez().body)

        // A tainted node fails /healthz only.
        health.record(.node(Node(name: "n", taints: [NodeTaint(key: ProxyHealth.toBeDeletedTaint)])))
        let draining = try await httpGet(port: server.port, path: "/healthz")
        #expect(draining.status == 503)
        #expect(draining.body.hasSuffix(#", "nodeEligible": false}"#))
        #expect(try await httpGet(port: server.port, path: "/livez").status == 200)

        // A stalled sync fails both.
        health.record(.node(Node(name: "n")))
        health.record(.queued(.ipv4))
        clock.advance(by: .seconds(61))
        #expect(try await httpGet(port: server.port, path: "/healthz").status == 503)
        #expect(try await httpGet(port: server.port, path: "/livez").status == 503)

        let missing = try await httpGet(port: server.port, path: "/metrics")
        #expect(missing.status == 404)
        #expect(missing.body == "404 page not found\n")

        let scrape = Scrape(metrics.render())
        #expect(scrape.types["kubeproxy_proxy_healthz_total"] == "counter")
        #expect(scrape.value("kubeproxy_proxy_healthz_total", ["code": "200"]) == 1)
        #expect(scrape.value("kubeproxy_proxy_healthz_total", ["code": "503"]) == 2)
        #expect(scrape.value("kubeproxy_proxy_livez_total", ["code": "200"]) == 2)
        #expect(scrape.value("kubeproxy_proxy_livez_total", ["code": "503"]) == 1)
    }

    @Test func headRequestsGetHeadersOnly() async throws {
        let (health, _) = makeHealth()
        let server = try await HealthServer.start(address: BindAddress(host: IPAddress("127.0.0.1")!, port: 0),
                                                  health: health, metrics: nil, logger: logger)
        defer { Task { await server.close() } }
        let r = try await httpGet(port: server.port, path: "/healthz", method: "HEAD")
        #expect(r.status == 200)
        #expect(r.body.isEmpty)
        #expect(Int(r.headers["content-length"] ?? "") == health.healthz().body.utf8.count)
    }

    @Test func bindAddressesParseLikeKubeProxys() throws {
        #expect(try BindAddress.parse("", field: "--healthz-bind-address") == nil)
        #expect(try BindAddress.parse("0.0.0.0:10256", field: "f") == BindAddress(host: IPAddress("0.0.0.0")!, port: 10256))
        #expect(try BindAddress.parse("[::1]:10249", field: "f") == BindAddress(host: IPAddress("::1")!, port: 10249))
        for bad in ["10256", "0.0.0.0", "::1:10249", "host:10256", "1.2.3.4:http", "1.2.3.4:70000", "[1.2.3.4]:80"] {
            #expect(throws: ConfigError.self, "\(bad)") { try BindAddress.parse(bad, field: "--healthz-bind-address") }
        }
    }

    @Test func anUnspecifiedAddressListensOnLoopbackToo() async throws {
        let (health, _) = makeHealth()
        let server = try await HealthServer.start(address: BindAddress(host: IPAddress("0.0.0.0")!, port: 0),
                                                  health: health, metrics: nil, logger: logger)
        defer { Task { await server.close() } }
        #expect(try await httpGet(port: server.port, path: "/livez").status == 200)
    }
}
