// The manifest source remembers each file's objects by key and fingerprint, not whole: a
// changed file's events come from that, objects defined in two files keep their losing copies,
// and a change that would need a copy its file no longer holds waits instead of losing events.

import Foundation
@testable import KubeAPI
import Logging
import SluiceCore
import Testing

private let logger = Logger(label: "test")

private func tempDir() throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-diff-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

private func service(_ name: String, port: Int = 80, ip: Int = 10) -> String {
    """
    apiVersion: v1
    kind: Service
    metadata:
      name: \(name)
      namespace: ns
    spec:
      clusterIP: 10.96.0.\(ip)
      ports:
      - port: \(port)
    """
}

private func slice(_ service: String, address: String = "10.1.0.1") -> String {
    """
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: \(service)-1
      namespace: ns
      labels:
        kubernetes.io/service-name: \(service)
    addressType: IPv4
    ports:
    - port: 8080
    endpoints:
    - addresses:
      - \(address)
    """
}

private func write(_ docs: [String], _ path: String) throws {
    try docs.joined(separator: "\n---\n").write(toFile: path, atomically: true, encoding: .utf8)
}

private func upserted(_ events: [ObjectEvent]) -> [String] {
    events.compactMap {
        switch $0 {
        case .serviceUpserted(let s): return "Service \(s.name) \(s.ports.first?.port ?? 0)"
        case .sliceUpserted(let e): return "EndpointSlice \(e.name) \(e.endpoints.first?.addresses.first ?? "")"
        default: return nil
        }
    }
}

@Suite struct ManifestDiffTests {
    @Test func aChangedFileMakesEventsForItsChangedObjectsOnly() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = ManifestDirectorySource(directory: dir, settle: .zero, logger: logger)
        try write([service("a", ip: 1), slice("a"), service("b", ip: 2), slice("b"), service("c", ip: 3)], dir + "/many.yaml")
        try write([service("d", ip: 4)], dir + "/other.yaml")
        var (snap, events) = try src.scan(from: .init())
        #expect(events.count == 6)
        #expect(snap.objectCount == 6)
        #expect(snap.keptObjectCount == 0, "no object is defined twice, so none is kept whole")

        // One endpoint moves, one Service goes, one port changes; the rest is as it was.
        try write([service("a", ip: 1), slice("a", address: "10.1.0.9"), service("b", ip: 2), service("c", port: 81, ip: 3)],
                  dir + "/many.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events.first == .sliceDeleted(NamespacedName(namespace: "ns", name: "b-1")))
        #expect(upserted(events) == ["EndpointSlice a-1 10.1.0.9", "Service c 81"])
        #expect(events.count == 3)
        #expect(snap.objectCount == 5)

        // The same objects written again, in another order: nothing to do.
        try write([service("c", port: 81, ip: 3), service("b", ip: 2), slice("a", address: "10.1.0.9"), service("a", ip: 1)],
                  dir + "/many.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty, "events: \(events)")

        // An object moved from one file to another, unchanged, in one scan: nothing either.
        try write([service("c", port: 81, ip: 3), service("b", ip: 2), slice("a", address: "10.1.0.9")], dir + "/many.yaml")
        try write([service("d", ip: 4), service("a", ip: 1)], dir + "/other.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty, "events: \(events)")

        try FileManager.default.removeItem(atPath: dir + "/other.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events == [.serviceDeleted(NamespacedName(namespace: "ns", name: "a")),
                           .serviceDeleted(NamespacedName(namespace: "ns", name: "d"))])
        #expect(snap.identities == ["EndpointSlice ns/a-1", "Service ns/b", "Service ns/c"])
    }

    @Test func anObjectInTwoFilesFallsBackToTheEarlierFilesCopy() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = ManifestDirectorySource(directory: dir, settle: .zero, logger: logger)
        try write([service("web", port: 80), service("other", ip: 11)], dir + "/a.yaml")
        var (snap, events) = try src.scan(from: .init())
        #expect(upserted(events) == ["Service other 80", "Service web 80"])

        // b.yaml sorts later: its copy wins; a.yaml's (not parsed again) is read back and kept.
        try write([service("web", port: 81)], dir + "/b.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(upserted(events) == ["Service web 81"])
        #expect(events.count == 1)
        #expect(snap.keptObjectCount == 1)
        #expect(snap.objectCount == 2)

        // The losing copy changes: nothing changes in effect.
        try write([service("web", port: 82), service("other", ip: 11)], dir + "/a.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty, "events: \(events)")

        // The winning copy goes: the losing one, as last applied, takes over.
        try FileManager.default.removeItem(atPath: dir + "/b.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(upserted(events) == ["Service web 82"])
        #expect(events.count == 1)
        #expect(snap.keptObjectCount == 0)

        try write([service("other", ip: 11)], dir + "/a.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events == [.serviceDeleted(NamespacedName(namespace: "ns", name: "web"))])
    }

    @Test func twoCopiesThatAreEqualMakeNoEventWhenOneGoes() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = ManifestDirectorySource(directory: dir, settle: .zero, logger: logger)
        try write([service("web")], dir + "/a.yaml")
        try write([service("web")], dir + "/b.yaml")
        var (snap, events) = try src.scan(from: .init())
        #expect(events.count == 1)
        try FileManager.default.removeItem(atPath: dir + "/b.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty, "events: \(events)")
        try FileManager.default.removeItem(atPath: dir + "/a.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events == [.serviceDeleted(NamespacedName(namespace: "ns", name: "web"))])
    }

    @Test func aCopyThatCannotBeReadBackHoldsTheChangeBackUntilItCan() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = ManifestDirectorySource(directory: dir, settle: .zero, logger: logger)
        try write([service("web", port: 80)], dir + "/a.yaml")
        try write([service("other", ip: 11)], dir + "/b.yaml")
        var (snap, events) = try src.scan(from: .init())
        #expect(events.count == 2)

        // a.yaml breaks: its objects stay in effect, but they are no longer in the file.
        try "apiVersion: v1\nkind: Service\nmetadata: {name: web\n".write(toFile: dir + "/a.yaml", atomically: true, encoding: .utf8)
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty)

        // b.yaml now defines web too: its copy would win, and a.yaml's could not be kept.
        try write([service("other", ip: 11), service("web", port: 81)], dir + "/b.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty, "events: \(events)")
        #expect(snap.waiting == ["b.yaml"])
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty, "events: \(events)")
        #expect(snap.waiting == ["b.yaml"])

        // a.yaml is fixed (with another port): both are applied, b.yaml's copy wins.
        try write([service("web", port: 83)], dir + "/a.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(upserted(events) == ["Service web 81"])
        #expect(events.count == 1)
        #expect(snap.waiting.isEmpty)

        try FileManager.default.removeItem(atPath: dir + "/b.yaml")
        (snap, events) = try src.scan(from: snap)
        #expect(upserted(events) == ["Service web 83"])
        #expect(events.contains(.serviceDeleted(NamespacedName(namespace: "ns", name: "other"))))
        #expect(events.count == 2)
    }
}
