// API source tests: the real client and informers against the fake API server over a real
// socket, through every fault the server can produce.

import Foundation
import KubeAPI
import Logging
import SluiceCore
import SluiceTesting
import Testing

/// A running fake server, client, source and recorder; torn down by `withHarness`.
struct Harness {
    let server: FakeAPIServer
    let client: KubeClient
    let source: APISource
    let recorder: EventRecorder
    let logs: LogCapture

    /// Fast retries so faults heal quickly; deterministic jitter.
    static let settings = InformerSettings(backoff: BackoffPolicy(initial: .milliseconds(20), maximum: .milliseconds(200)),
                                           pageSize: 2, watchTimeoutSeconds: 300...300, idleTimeout: .seconds(60),
                                           random: { 0.5 })

    static let nodeName = "node-1"

    func service(_ name: String, _ ip: String, labels: [String: String] = [:]) {
        server.apply(.services, FakeObjects.service(name, clusterIP: ip, labels: labels))
    }

    func slice(_ name: String, service: String, _ addresses: [String]) {
        server.apply(.endpointslices, FakeObjects.endpointSlice(name, service: service, addresses: addresses))
    }

    /// Waits until the client holds exactly the services the server holds.
    func waitForServicesInStep(_ what: String = "client services match the server") async throws {
        let server = self.server
        try await recorder.wait(what) { r in
            r.serviceNames == server.names(.services)
        }
    }
}

func withHarness(settings: InformerSettings = Harness.settings, serviceProxyName: String? = nil,
                 credentials: Credentials = .none, configure: (FakeAPIServer) throws -> Void = { _ in },
                 _ body: (Harness) async throws -> Void) async throws {
    let server = try FakeAPIServer()
    try configure(server)
    try await server.start()
    let logs = LogCapture()
    let config = KubeConfig(server: server.url, credentials: credentials, origin: "test")
    let client = try KubeClient(config: config, logger: logs.logger(label: "client"), requestTimeout: .seconds(30))
    let source = APISource(client: client, nodeName: Harness.nodeName, serviceProxyName: serviceProxyName, settings: settings,
                           logger: logs.logger(label: "source"))
    let recorder = EventRecorder()
    let task = recorder.record(source.events())
    let h = Harness(server: server, client: client, source: source, recorder: recorder, logs: logs)
    do {
        try await body(h)
    } catch {
        task.cancel()
        await client.shutdown()
        await server.stop()
        for line in logs.lines.suffix(40) { print("  log: \(line)") }
        throw error
    }
    task.cancel()
    _ = await task.value
    await client.shutdown()
    await server.stop()
}

@Suite struct APISourceTests {
    @Test func listsThenSyncsThenWatchesWithKubeProxysSelectors() async throws {
        try await withHarness(configure: { s in
            s.apply(.services, FakeObjects.service("web", clusterIP: "10.96.0.10"))
            s.apply(.services, FakeObjects.service("db", namespace: "data", clusterIP: "10.96.0.11"))
            s.apply(.endpointslices, FakeObjects.endpointSlice("web-abc", service: "web", addresses: ["10.244.1.5"]))
            s.apply(.nodes, FakeObjects.node(Harness.nodeName, internalIP: "192.168.1.10", podCIDRs: ["10.244.1.0/24"],
                                             labels: ["topology.kubernetes.io/zone": "z1"]))
            s.apply(.nodes, FakeObjects.node("other-node", internalIP: "192.168.1.11"))
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            let events = h.recorder.events
            let syncedAt = try #require(events.firstIndex(of: .synced))
            let before = events[..<syncedAt]
            #expect(before.filter { if case .serviceUpserted = $0 { true } else { false } }.count == 2)
            #expect(before.filter { if case .sliceUpserted = $0 { true } else { false } }.count == 1)
            #expect(events.filter { $0 == .synced }.count == 1)
            try await h.recorder.wait("node") { $0.node != nil }
            #expect(h.recorder.node?.name == Harness.nodeName)
            #expect(h.recorder.node?.podCIDRs == ["10.244.1.0/24"])
            #expect(h.recorder.node?.labels["topology.kubernetes.io/zone"] == "z1")

            // The selectors kube-proxy uses (cmd/kube-proxy/app/server.go).
            let reqs = h.server.requests
            let kubeProxySelector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
            #expect(reqs.filter { $0.resource == .services }.allSatisfy { $0.query["labelSelector"] == kubeProxySelector })
            #expect(reqs.filter { $0.resource == .endpointslices }.allSatisfy { $0.query["labelSelector"] == kubeProxySelector })
            #expect(reqs.filter { $0.resource == .nodes }.allSatisfy { $0.query["fieldSelector"] == "metadata.name=node-1" })

            // Watches start from the list's version, with bookmarks allowed.
            // Services, EndpointSlices, the Node and ServiceCIDRs.
            try await Eventually.wait("four watches") { h.server.watchCount() == 4 }
            let watch = try #require(h.server.requests.first { $0.verb == "watch" && $0.resource == .services })
            #expect(watch.query["allowWatchBookmarks"] == "true")
            #expect(Int(watch.query["resourceVersion"] ?? "") != nil)

            h.service("api", "10.96.0.12")
            try await h.waitForServicesInStep()
            #expect(h.server.delete(.services, name: "web"))
            try await h.waitForServicesInStep()
            #expect(h.recorder.events.last == .serviceDeleted(NamespacedName(namespace: "default", name: "web")))
            h.slice("web-abc", service: "web", ["10.244.1.5", "10.244.1.6"])
            try await h.recorder.wait("slice update") { $0.slices.values.first?.endpoints.count == 2 }
            #expect(h.source.counters.relists == 0)
        }
    }

    @Test func paginatesWithContinueTokens() async throws {
        try await withHarness(configure: { s in
            for i in 0..<7 { s.apply(.services, FakeObjects.service("svc-\(i)", clusterIP: "10.96.0.\(20 + i)")) }
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            #expect(h.recorder.serviceNames.count == 7)
            let lists = h.server.requests.filter { $0.verb == "list" && $0.resource == .services }
            #expect(lists.count == 4)
            #expect(lists.allSatisfy { $0.query["limit"] == "2" })
            #expect(lists.first?.query["continue"] == nil)
            #expect(lists.dropFirst().allSatisfy { ($0.query["continue"] ?? "").isEmpty == false })
            #expect(h.source.counters.listPages >= 4)
        }
    }

    @Test func anExpiredContinueTokenRestartsTheList() async throws {
        try await withHarness(configure: { s in
            for i in 0..<5 { s.apply(.services, FakeObjects.service("svc-\(i)", clusterIP: "10.96.0.\(20 + i)")) }
            s.expireNextContinueTokens(1)
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            #expect(h.recorder.serviceNames.count == 5)
            let lists = h.server.requests.filter { $0.verb == "list" && $0.resource == .services }
            // Page 1, page 2 refused (410), then pages 1-3 again.
            #expect(lists.map(\.status) == [200, 410, 200, 200, 200])
            #expect(lists[2].query["continue"] == nil)
            #expect(h.source.counters.gone == 1)
            // Nothing was announced twice.
            let upserts = h.recorder.events.filter { if case .serviceUpserted = $0 { true } else { false } }
            #expect(upserts.count == 5)
        }
    }

    @Test func watchEventsSplitAcrossChunksAndBatchedIntoOne() async throws {
        try await withHarness { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("watches") { h.server.watchCount() == 4 }
            // Every event in 7-byte pieces, each its own HTTP chunk and TCP write.
            h.server.splitWatchWrites(into: 7)
            try await Eventually.wait("watches re-opened with split writes") { h.server.watchCount(.services) == 1 }
            h.server.dropConnections()
            try await Eventually.wait("watch back") { h.server.watchCount(.services) == 1 && h.server.watchCount(.endpointslices) == 1 }
            for i in 0..<5 { h.service("split-\(i)", "10.96.1.\(i)") }
            try await h.waitForServicesInStep("split events arrive whole")
            #expect(h.recorder.services[NamespacedName(namespace: "default", name: "split-4")]?.clusterIPs == ["10.96.1.4"])

            // Several events in one chunk (and, with splitting off, one write).
            h.server.splitWatchWrites(into: nil)
            h.server.batch {
                h.service("batch-a", "10.96.2.1")
                h.service("batch-b", "10.96.2.2")
                h.server.delete(.services, name: "split-0")
                h.slice("batch-a-1", service: "batch-a", ["10.244.2.1"])
            }
            try await h.waitForServicesInStep("batched events all arrive")
            try await h.recorder.wait("batched slice") { $0.sliceNames == ["default/batch-a-1"] }
            #expect(h.source.counters.malformedEvents == 0)
        }
    }

    @Test func goneMidStreamThenRelistFindsADeletedService() async throws {
        try await withHarness(configure: { s in
            s.apply(.services, FakeObjects.service("keep", clusterIP: "10.96.0.10"))
            s.apply(.services, FakeObjects.service("doomed", clusterIP: "10.96.0.11"))
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("watching services") { h.server.watchCount(.services) == 1 }
            // The delete never reaches the watch; the watch then gets ERROR 410.
            #expect(h.server.delete(.services, name: "doomed", silently: true))
            h.service("added-meanwhile", "10.96.0.12")
            h.server.expireWatches(.services)
            try await h.recorder.wait("the re-list notices the delete") {
                $0.serviceNames == ["default/added-meanwhile", "default/keep"]
            }
            #expect(h.recorder.events.contains(.serviceDeleted(NamespacedName(namespace: "default", name: "doomed"))))
            #expect(h.source.counters.gone >= 1)
            #expect(h.source.counters.relists >= 1)
            #expect(h.source.counters.reconciledDeletes >= 1)
            // The unchanged service was not re-announced by the re-list.
            let keepUpserts = h.recorder.events.filter {
                if case .serviceUpserted(let s) = $0 { return s.name == "keep" }
                return false
            }
            #expect(keepUpserts.count == 1)
        }
    }

    @Test func aWatchTooOldIsAnsweredWith410AndRelisted() async throws {
        try await withHarness { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("watching") { h.server.watchCount(.services) == 1 }
            h.service("one", "10.96.0.1")
            try await h.waitForServicesInStep()
            // Dropped connection + lost history: resuming is impossible, listing again works.
            h.server.compactHistory()
            h.server.dropConnections()
            h.service("two", "10.96.0.2")
            try await h.waitForServicesInStep()
            #expect(h.source.counters.relists >= 1)
        }
    }

    @Test func survivesAServerRestart() async throws {
        try await withHarness(configure: { s in
            s.apply(.services, FakeObjects.service("a", clusterIP: "10.96.0.1"))
            s.apply(.services, FakeObjects.service("b", clusterIP: "10.96.0.2"))
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("watching") { h.server.watchCount() == 4 }
            await h.server.stop()
            // Changes while the server is down, and a restart that lost the watch history.
            h.server.delete(.services, name: "a")
            h.service("c", "10.96.0.3")
            try await Task.sleep(for: .milliseconds(100))
            try await h.server.restart(losingHistory: true)
            try await h.recorder.wait("client back in step after the restart") { $0.serviceNames == ["default/b", "default/c"] }
            #expect(h.source.counters.failures >= 1)
            // And it keeps following changes afterwards.
            try await Eventually.wait("watching again") { h.server.watchCount(.services) == 1 }
            h.service("d", "10.96.0.4")
            try await h.waitForServicesInStep()
        }
    }

    @Test func followsASlowServer() async throws {
        try await withHarness(configure: { s in
            s.setSlow(.milliseconds(300))
            s.apply(.services, FakeObjects.service("a", clusterIP: "10.96.0.1"))
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("watching") { h.server.watchCount(.services) == 1 }
            h.service("b", "10.96.0.2")
            h.service("c", "10.96.0.3")
            try await h.waitForServicesInStep()
            #expect(h.source.counters.failures == 0)
            #expect(h.source.counters.relists == 0)
        }
    }

    @Test func aMalformedEventIsLoggedCountedAndSkipped() async throws {
        try await withHarness { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("watching") { h.server.watchCount(.services) == 1 }
            h.service("before", "10.96.0.1")
            try await h.waitForServicesInStep()
            h.server.injectRaw("{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"name\":\"broken\", this is not json\n", into: .services)
            h.server.injectRaw("{\"type\":\"MODIFIED\",\"object\":{\"metadata\":{\"name\":\"odd\",\"namespace\":\"default\",\"resourceVersion\":\"1\"},\"spec\":{\"ports\":7}}}\n",
                               into: .services)
            h.service("after", "10.96.0.2")
            try await h.waitForServicesInStep("the event after the malformed ones arrives")
            #expect(h.recorder.serviceNames == ["default/after", "default/before"])
            let c = h.source.counters
            #expect(c.malformedEvents == 1)
            #expect(c.rejectedObjects == 1)
            #expect(c.relists == 0)
            // The same services watch carried on: no reconnect, no re-list.
            #expect(h.server.requests.filter { $0.verb == "watch" && $0.resource == .services }.count == 1)
            #expect(h.logs.contains("skipped a malformed event"))
        }
    }

    @Test func bookmarksMoveTheResumeVersionAndCleanEndsResumeWithoutAList() async throws {
        var settings = Harness.settings
        settings.watchTimeoutSeconds = 1...1
        try await withHarness(settings: settings) { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("watching") { h.server.watchCount(.services) == 1 }
            // Changes elsewhere move the global version; a bookmark tells the services watch.
            h.slice("x-1", service: "x", ["10.244.0.9"])
            h.slice("x-2", service: "x", ["10.244.0.10"])
            let rv = h.server.resourceVersion
            h.server.sendBookmarks()
            try await Eventually.wait("bookmark received") { h.source.counters.bookmarks >= 1 }
            // The server ends each watch after timeoutSeconds=1; the client watches again from the bookmark.
            try await Eventually.wait("re-watch from the bookmark version", timeout: .seconds(20)) {
                h.server.requests.contains { $0.verb == "watch" && $0.resource == .services && $0.query["resourceVersion"] == String(rv) }
            }
            #expect(h.source.counters.relists == 0)
            #expect(h.server.requests.contains { $0.verb == "watch" && $0.query["timeoutSeconds"] == "1" })
        }
    }

    @Test func errorStatusesAreRetriedWithBackoff() async throws {
        let delays = DelayLog()
        var settings = Harness.settings
        settings.sleep = { d in delays.add(d); try await Task.sleep(for: .milliseconds(5)) }
        try await withHarness(settings: settings, configure: { s in
            s.failNext(1, status: 401, kind: .list, resource: .services)
            s.failNext(1, status: 403, kind: .list, resource: .services)
            s.failNext(1, status: 500, kind: .list, resource: .services)
            s.failNext(1, status: 500, kind: .watch, resource: .endpointslices)
            s.apply(.services, FakeObjects.service("a", clusterIP: "10.96.0.1"))
        }) { h in
            try await h.recorder.wait("synced after the failures") { $0.synced }
            try await h.waitForServicesInStep()
            let c = h.source.counters
            #expect(c.failures >= 4)
            #expect(c.unauthorized == 1)
            // Three list failures in a row for services: 20 ms, 40 ms, 80 ms caps, jitter 0.5 → 15, 30, 60 ms.
            #expect(delays.all.contains(.milliseconds(15)))
            #expect(delays.all.contains(.milliseconds(30)))
            #expect(delays.all.contains(.milliseconds(60)))
            #expect(h.logs.contains("RBAC"))
        }
    }

    @Test func syncedWaitsUntilServicesAndSlicesAreBothListed() async throws {
        try await withHarness(configure: { s in
            s.apply(.services, FakeObjects.service("a", clusterIP: "10.96.0.1"))
            s.apply(.endpointslices, FakeObjects.endpointSlice("a-1", service: "a", addresses: ["10.244.0.1"]))
            s.failNext(5, status: 503, kind: .list, resource: .endpointslices)
        }) { h in
            try await h.recorder.wait("services listed") { $0.serviceNames == ["default/a"] }
            #expect(!h.recorder.synced)
            try await h.recorder.wait("synced") { $0.synced }
            let events = h.recorder.events
            let syncedAt = try #require(events.firstIndex(of: .synced))
            #expect(events[..<syncedAt].contains { if case .sliceUpserted = $0 { true } else { false } })
        }
    }

    @Test func serviceProxyNameSelectsThisProxysServices() async throws {
        try await withHarness(serviceProxyName: "sluice", configure: { s in
            s.apply(.services, FakeObjects.service("plain", clusterIP: "10.96.0.1"))
            s.apply(.services, FakeObjects.service("ours", clusterIP: "10.96.0.2",
                                                   labels: ["service.kubernetes.io/service-proxy-name": "sluice"]))
            s.apply(.services, FakeObjects.service("theirs", clusterIP: "10.96.0.3",
                                                   labels: ["service.kubernetes.io/service-proxy-name": "other"]))
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            #expect(h.recorder.serviceNames == ["default/ours", "default/plain"])
            #expect(h.server.requests.first { $0.resource == .services }?.query["labelSelector"] == "!service.kubernetes.io/headless")
            try await Eventually.wait("watching") { h.server.watchCount(.services) == 1 }
            // Relabelled for another proxy: gone for us.
            h.service("plain", "10.96.0.1", labels: ["service.kubernetes.io/service-proxy-name": "other"])
            try await h.recorder.wait("relabelled service dropped") { $0.serviceNames == ["default/ours"] }
        }
    }

    @Test func kubeProxySelectorDropsLabelledServicesOnTheServer() async throws {
        try await withHarness(configure: { s in
            s.apply(.services, FakeObjects.service("plain", clusterIP: "10.96.0.1"))
            s.apply(.services, FakeObjects.service("theirs", clusterIP: "10.96.0.3",
                                                   labels: ["service.kubernetes.io/service-proxy-name": "other"]))
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            #expect(h.recorder.serviceNames == ["default/plain"])
            try await Eventually.wait("watching") { h.server.watchCount(.services) == 1 }
            // A label change that leaves the selector arrives as DELETED from the server.
            h.service("plain", "10.96.0.1", labels: ["service.kubernetes.io/service-proxy-name": "other"])
            try await h.recorder.wait("dropped") { $0.serviceNames.isEmpty }
        }
    }
}

/// Records the delays a source asked to sleep.
final class DelayLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [Duration] = []
    func add(_ d: Duration) { lock.withLock { items.append(d) } }
    var all: [Duration] { lock.withLock { items } }
}
