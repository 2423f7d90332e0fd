// Manifest source tests: decoding, Endpoints conversion, bad input, and the directory watch.

import Foundation
import KubeAPI
import Logging
import SluiceCore
import Testing

private let logger = Logger(label: "test")

@Suite struct ManifestParserTests {
    @Test func multiDocumentFilesDecodeEveryKind() throws {
        let text = """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: demo}
            spec:
              type: LoadBalancer
              clusterIPs: [10.96.0.10]
              ports: [{name: http, port: 80, targetPort: http-port, nodePort: 30080}]
              sessionAffinity: ClientIP
              sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
              loadBalancerSourceRanges: [10.0.0.0/8]
            status: {loadBalancer: {ingress: [{ip: 1.2.3.4, ipMode: VIP}]}}
            ---
            # a comment-only document is fine
            ---
            apiVersion: discovery.k8s.io/v1
            kind: EndpointSlice
            metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
            addressType: IPv4
            ports: [{name: http, port: 8080}]
            endpoints:
            - addresses: [10.244.1.2]
              conditions: {ready: false, serving: true, terminating: true}
              nodeName: n1
              zone: a
              hints: {forZones: [{name: a}]}
            ---
            apiVersion: v1
            kind: Node
            metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}
            spec: {podCIDR: 10.244.1.0/24}
            status: {addresses: [{type: InternalIP, address: 192.168.1.5}]}
            ---
            apiVersion: apps/v1
            kind: Deployment
            metadata: {name: ignored}
            """
        let p = try ManifestParser.parse(text, file: "all.yaml")
        #expect(p.rejections.isEmpty)
        #expect(p.objects.count == 3)
        guard case .service(let s) = p.objects[0], case .endpointSlice(let e) = p.objects[1], case .node(let n) = p.objects[2] else {
            Issue.record("wrong kinds: \(p.objects)")
            return
        }
        #expect(s.typeName == "LoadBalancer" && s.clusterIPs == ["10.96.0.10"] && s.ports[0].nodePort == 30080)
        #expect(s.ports[0].targetPort == "http-port")
        #expect(s.sessionAffinityTimeoutSeconds == 600)
        #expect(s.loadBalancerIngress == [LoadBalancerIngress(ip: "1.2.3.4", ipMode: "VIP")])
        #expect(e.serviceName == "web" && e.endpoints[0].terminating == true && e.endpoints[0].ready == false)
        #expect(e.endpoints[0].zoneHints == ["a"])
        #expect(n.podCIDRs == ["10.244.1.0/24"] && n.addresses.first?.address == "192.168.1.5")
    }

    @Test func endpointsAreConvertedToSlices() throws {
        let text = """
            apiVersion: v1
            kind: Endpoints
            metadata: {name: my-service, namespace: default}
            subsets:
            - addresses: [{ip: 1.2.3.4}]
              notReadyAddresses: [{ip: 1.2.3.5}]
              ports: [{port: 9376}]
            """
        let p = try ManifestParser.parse(text, file: "ep.yaml")
        guard case .endpointSlice(let e) = try #require(p.objects.first) else {
            Issue.record("not a slice")
            return
        }
        #expect(e.serviceName == "my-service")
        #expect(e.ports == [EndpointPort(name: "", port: 9376, protocolName: "TCP")])
        #expect(e.endpoints.map(\.addresses) == [["1.2.3.4"], ["1.2.3.5"]])
        #expect(e.endpoints.map(\.ready) == [true, false])
    }

    @Test func badDocumentsAreRejectedOneByOne() throws {
        let text = """
            apiVersion: v1
            kind: Service
            metadata: {name: good, namespace: ns}
            spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
            ---
            apiVersion: v1
            kind: Service
            metadata: {name: typed-wrong, namespace: ns}
            spec: {clusterIP: 10.96.0.2, ports: [{port: "eighty"}]}
            ---
            - just
            - a list
            ---
            apiVersion: v1
            kind: Service
            metadata: {name: no-spec-list, namespace: ns}
            spec: {ports: 5}
            """
        let p = try ManifestParser.parse(text, file: "mixed.yaml")
        #expect(p.objects.count == 1)
        #expect(p.rejections.count == 3)
        #expect(p.rejections[0].reason.contains("spec.ports[0].port"))
        #expect(p.rejections[1].reason.contains("not a mapping"))
    }

    @Test func hugeListsAreRefused() throws {
        let eps = (0..<(maximumListLength + 1)).map { "- addresses: [10.0.\($0 / 256 % 256).\($0 % 256)]" }.joined(separator: "\n")
        let text = """
            apiVersion: discovery.k8s.io/v1
            kind: EndpointSlice
            metadata: {name: big, namespace: ns, labels: {kubernetes.io/service-name: x}}
            addressType: IPv4
            endpoints:
            \(eps)
            """
        let p = try ManifestParser.parse(text, file: "big.yaml")
        #expect(p.objects.isEmpty)
        #expect(p.rejections.first?.reason.contains("more than") == true)
    }

    @Test func invalidYAMLThrows() {
        #expect(throws: (any Error).self) { try ManifestParser.parse("a: [unclosed", file: "x.yaml") }
    }
}

@Suite struct ManifestDirectoryTests {
    private func tempDir() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-manifests-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    private let svc = """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: ns}
        spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
        """

    @Test func addEditDeleteProduceEvents() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = ManifestDirectorySource(directory: dir, settle: .zero, logger: logger)
        var snap = ManifestDirectorySource.Snapshot()
        var events: [ObjectEvent]

        try svc.write(toFile: dir + "/web.yaml", atomically: true, encoding: .utf8)
        (snap, events) = try src.scan(from: snap)
        #expect(events.count == 1)
        guard case .serviceUpserted(let s) = events.first else { Issue.record("no upsert"); return }
        #expect(s.clusterIPs == ["10.96.0.10"])

        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty)

        try svc.replacingOccurrences(of: "port: 80", with: "port: 8080").write(toFile: dir + "/web.yaml", atomically: true, encoding: .utf8)
        (snap, events) = try src.scan(from: snap)
        guard case .serviceUpserted(let s2) = events.first else { Issue.record("no update"); return }
        #expect(s2.ports[0].port == 8080)

        try FileManager.default.removeItem(atPath: dir + "/web.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events == [.serviceDeleted(NamespacedName(namespace: "ns", name: "web"))])
    }

    @Test func aBrokenEditKeepsThePreviousObjects() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let rejected = RejectionLog()
        let src = ManifestDirectorySource(directory: dir, settle: .zero, logger: logger) { rejected.add($0) }
        var snap = ManifestDirectorySource.Snapshot()
        var events: [ObjectEvent]
        try svc.write(toFile: dir + "/web.yaml", atomically: true, encoding: .utf8)
        (snap, events) = try src.scan(from: snap)
        #expect(events.count == 1)
        try "apiVersion: v1\nkind: Service\nmetadata: {name: web\n".write(toFile: dir + "/web.yaml", atomically: true, encoding: .utf8)
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty)
        #expect(rejected.all.count == 1)
        #expect(rejected.all.first?.reason.contains("keeping its previous objects") == true)
    }

    @Test func aMissingDirectoryIsAnError() {
        let src = ManifestDirectorySource(directory: "/nonexistent/sluice", logger: logger)
        #expect(throws: SourceError.self) { _ = try src.scan(from: .init()) }
    }

    @Test func theStreamDeliversStateThenSyncedThenChanges() async throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try svc.write(toFile: dir + "/web.yaml", atomically: true, encoding: .utf8)
        let src = ManifestDirectorySource(directory: dir, interval: .milliseconds(20), logger: logger)
        var it = src.events().makeAsyncIterator()
        #expect(try await it.next().map { if case .serviceUpserted = $0 { true } else { false } } == true)
        #expect(try await it.next() == .synced)
        try FileManager.default.removeItem(atPath: dir + "/web.yaml")
        #expect(try await it.next() == .serviceDeleted(NamespacedName(namespace: "ns", name: "web")))
    }
}

/// Collects rejections from a @Sendable callback.
final class RejectionLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [ObjectRejection] = []
    func add(_ r: ObjectRejection) { lock.withLock { items.append(r) } }
    var all: [ObjectRejection] { lock.withLock { items } }
}
