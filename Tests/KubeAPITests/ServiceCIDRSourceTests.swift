// ServiceCIDR objects (networking.k8s.io/v1) from manifests and from the API: decoded, watched
// without holding the first sync back, and a server that does not serve them is no error.

import Foundation
import KubeAPI
import SluiceCore
import SluiceTesting
import Synchronization
import Testing

@Suite struct ServiceCIDRSourceTests {
    @Test func aManifestServiceCIDRDecodes() throws {
        let tree: [String: Any] = ["apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                                   "metadata": ["name": "kubernetes"], "spec": ["cidrs": ["10.96.0.0/16", "fd00:10:96::/112"]]]
        let objs = try #require(try ObjectDecoder.decode(tree))
        #expect(objs == [.serviceCIDR(ServiceCIDR(name: "kubernetes", cidrs: ["10.96.0.0/16", "fd00:10:96::/112"]))])
        #expect(objs[0].upsertEvent == .serviceCIDRUpserted(ServiceCIDR(name: "kubernetes", cidrs: ["10.96.0.0/16", "fd00:10:96::/112"])))
        #expect(objs[0].deleteEvent == .serviceCIDRDeleted("kubernetes"))
        var bad = tree
        bad["spec"] = ["cidrs": "10.96.0.0/16"]
        #expect(throws: DecodeError.self) { try ObjectDecoder.decode(bad) }
    }

    @Test func theAPISourceWatchesServiceCIDRsBesideTheOthers() async throws {
        try await withHarness(configure: { s in
            s.apply(.services, FakeObjects.service("web", clusterIP: "10.96.0.10"))
            s.apply(.servicecidrs, FakeObjects.serviceCIDR("kubernetes", ["10.96.0.0/16"]))
        }) { h in
            try await h.recorder.wait("the ServiceCIDR") { $0.serviceCIDRs["kubernetes"] != nil }
            #expect(h.recorder.serviceCIDRs["kubernetes"]?.cidrs == ["10.96.0.0/16"])
            #expect(h.server.requests.contains { $0.resource == .servicecidrs && $0.path == "/apis/networking.k8s.io/v1/servicecidrs" })
            h.server.apply(.servicecidrs, FakeObjects.serviceCIDR("extra", ["10.100.0.0/16"]))
            try await h.recorder.wait("a second ServiceCIDR") { $0.serviceCIDRs["extra"] != nil }
            #expect(h.server.delete(.servicecidrs, name: "kubernetes"))
            try await h.recorder.wait("the first one deleted") { $0.serviceCIDRs["kubernetes"] == nil }
            #expect(h.recorder.events.last == .serviceCIDRDeleted("kubernetes"))
        }
    }

    @Test func aServerWithoutServiceCIDRsIsNoErrorAndIsAskedAgainLater() async throws {
        let waits = WaitLog()
        var settings = Harness.settings
        settings.sleep = { d in
            waits.add(d)
            try await Task.sleep(for: .milliseconds(20))
        }
        try await withHarness(settings: settings, configure: { s in
            s.apply(.services, FakeObjects.service("web", clusterIP: "10.96.0.10"))
            s.apply(.servicecidrs, FakeObjects.serviceCIDR("kubernetes", ["10.96.0.0/16"]))
            s.failNext(3, status: 404, kind: .list, resource: .servicecidrs)
        }) { h in
            // The first sync does not wait for ServiceCIDRs.
            try await h.recorder.wait("synced") { $0.synced }
            try await h.recorder.wait("the ServiceCIDR once the server serves it") { $0.serviceCIDRs["kubernetes"] != nil }
            #expect(waits.all.filter { $0 == .seconds(300) }.count == 3)
            #expect(h.logs.lines.filter { $0.contains("ServiceCIDR objects are not available") }.count == 1)
            #expect(h.source.counters.failures == 0)
        }
    }
}

/// Durations passed to an injected sleep.
final class WaitLog: Sendable {
    private let value = Mutex<[Duration]>([])
    func add(_ d: Duration) { value.withLock { $0.append(d) } }
    var all: [Duration] { value.withLock { $0 } }
}
