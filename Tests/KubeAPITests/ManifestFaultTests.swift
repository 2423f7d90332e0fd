// Hostile and half-written manifest files: a YAML alias bomb, deep nesting, too many aliases
// (each file rejected by name, the rest served), a file rewritten in place (no deletion
// synced in between), and JSON from the API nested too deep.

import Foundation
@testable import KubeAPI
import Logging
import SluiceCore
import Synchronization
import Testing

private let logger = Logger(label: "test")

/// A settable monotonic clock for the settle interval.
private final class StepClock: Sendable {
    private let value = Mutex<Duration>(.zero)
    func set(_ d: Duration) { value.withLock { $0 = d } }
    var now: Duration { value.withLock { $0 } }
}

private func tempDir() throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-faults-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

private func service(_ name: String, port: Int = 80) -> String {
    """
    apiVersion: v1
    kind: Service
    metadata: {name: \(name), namespace: ns}
    spec: {clusterIP: 10.96.0.10, ports: [{port: \(port)}]}
    """
}

private let slice = """
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
    addressType: IPv4
    ports: [{port: 8080}]
    endpoints: [{addresses: [10.244.1.2]}]
    """

/// The "billion laughs": each level refers nine times to the one before.
private func aliasBomb(levels: Int = 9) -> String {
    var lines = ["apiVersion: v1", "kind: ConfigMap", "metadata: {name: lol, namespace: ns}", "data:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in 1..<levels {
        lines.append("  l\(i): &l\(i) [" + Array(repeating: "*l\(i - 1)", count: 9).joined(separator: ", ") + "]")
    }
    return lines.joined(separator: "\n") + "\n"
}

private func isDelete(_ e: ObjectEvent) -> Bool {
    switch e {
    case .serviceDeleted, .sliceDeleted: return true
    default: return false
    }
}

@Suite struct ManifestLimitTests {
    @Test func anAliasBombIsRejectedBeforeItExpands() throws {
        #expect(throws: ManifestLimitError.self) { _ = try ManifestParser.parse(aliasBomb(), file: "bomb.yaml") }
        do {
            _ = try ManifestParser.parse(aliasBomb(), file: "bomb.yaml")
        } catch {
            #expect("\(error)".contains("YAML nodes"))
        }
    }

    @Test func aFewAliasesAreFine() throws {
        let yaml = service("web") + "\n---\n" + aliasBomb(levels: 2)
        let parsed = try ManifestParser.parse(yaml, file: "ok.yaml")
        #expect(parsed.objects.count == 1)
    }

    @Test func tooManyAliasesAreRejected() {
        let yaml = "a: &a x\nb: [" + Array(repeating: "*a", count: 200).joined(separator: ", ") + "]\n"
        #expect(throws: ManifestLimitError.self) {
            _ = try ManifestParser.parse(yaml, file: "many.yaml", limits: ManifestLimits(maximumAliases: 100))
        }
        #expect(ManifestParser.countAliases(yaml) == 200)
        #expect(ManifestParser.countAliases("a: \"x * y\"\nb: 2*3\n") == 0)
    }

    @Test func deepNestingIsRejected() {
        let deep = "a: " + String(repeating: "[", count: 150) + String(repeating: "]", count: 150) + "\n"
        #expect(throws: ManifestLimitError.self) { _ = try ManifestParser.parse(deep, file: "deep.yaml") }
        let fine = "a: " + String(repeating: "[", count: 20) + String(repeating: "]", count: 20) + "\n"
        #expect(throws: Never.self) { _ = try ManifestParser.parse(fine, file: "fine.yaml") }
    }

    @Test func theBombFileIsRejectedByNameAndTheOtherFilesAreServed() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let rejected = RejectionLog()
        let src = ManifestDirectorySource(directory: dir, logger: logger) { rejected.add($0) }
        try aliasBomb().write(toFile: dir + "/bomb.yaml", atomically: true, encoding: .utf8)
        try service("web").write(toFile: dir + "/web.yaml", atomically: true, encoding: .utf8)
        let (_, events) = try src.scan(from: .init())
        #expect(events.count == 1)
        guard case .serviceUpserted(let s) = events.first else { Issue.record("web not served"); return }
        #expect(s.name == "web")
        #expect(rejected.all.count == 1)
        #expect(rejected.all.first?.kind == "file")
        #expect(rejected.all.first?.key == "bomb.yaml")
        #expect(src.rejectionCount == 1)
    }

    @Test func jsonNestedTooDeepIsRefusedBeforeParsing() {
        let deep = Array(("{\"a\":" + String(repeating: "[", count: 200) + String(repeating: "]", count: 200) + "}").utf8)
        #expect(throws: JSONShapeError.self) { _ = try JSONTree.parse(deep) }
        // Brackets inside strings do not count.
        let quoted = Array(("{\"a\":\"" + String(repeating: "[", count: 200) + "\"}").utf8)
        #expect((try? JSONTree.parseObject(quoted))?["a"] as? String == String(repeating: "[", count: 200))
    }
}

@Suite struct ManifestSettleTests {
    private func make(_ dir: String, _ clock: StepClock) -> ManifestDirectorySource {
        ManifestDirectorySource(directory: dir, interval: .milliseconds(250), settle: .milliseconds(250), now: { clock.now }, logger: logger)
    }

    @Test func truncatedThenRewrittenWithinTheIntervalSyncsNoDeletion() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let clock = StepClock()
        let src = make(dir, clock)
        let path = dir + "/web.yaml"
        let full = service("web") + "\n---\n" + slice
        try full.write(toFile: path, atomically: false, encoding: .utf8)
        var (snap, events) = try src.scan(from: .init())
        #expect(events.count == 2)
        var all: [ObjectEvent] = []

        // `: > web.yaml`: the scan sees an empty file, a candidate only.
        try "".write(toFile: path, atomically: false, encoding: .utf8)
        clock.set(.milliseconds(250))
        (snap, events) = try src.scan(from: snap)
        all += events
        #expect(snap.unsettled == ["web.yaml"])
        // A write cut at a document boundary: the Service only.
        try service("web").write(toFile: path, atomically: false, encoding: .utf8)
        clock.set(.milliseconds(500))
        (snap, events) = try src.scan(from: snap)
        all += events
        // `cat full > web.yaml` completes.
        try full.write(toFile: path, atomically: false, encoding: .utf8)
        clock.set(.milliseconds(750))
        (snap, events) = try src.scan(from: snap)
        all += events
        clock.set(.seconds(2))
        (snap, events) = try src.scan(from: snap)
        all += events
        #expect(all.isEmpty, "events: \(all)")
        #expect(!all.contains(where: isDelete))
        #expect(snap.unsettled.isEmpty)
        #expect(snap.objectCount == 2)
    }

    @Test func anEmptyFileThatSettlesIsARealDeletion() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let clock = StepClock()
        let src = make(dir, clock)
        let path = dir + "/web.yaml"
        try service("web").write(toFile: path, atomically: false, encoding: .utf8)
        var (snap, events) = try src.scan(from: .init())
        try "".write(toFile: path, atomically: false, encoding: .utf8)
        clock.set(.milliseconds(250))
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty)
        clock.set(.milliseconds(400))  // read again, but not yet `settle` after the first sight
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty)
        clock.set(.milliseconds(500))
        (snap, events) = try src.scan(from: snap)
        #expect(events == [.serviceDeleted(NamespacedName(namespace: "ns", name: "web"))])
    }

    @Test func aChangeIsAppliedOnceSettledAndAChangeThatKeepsChangingWaits() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let clock = StepClock()
        let src = make(dir, clock)
        let path = dir + "/web.yaml"
        try service("web").write(toFile: path, atomically: false, encoding: .utf8)
        var (snap, events) = try src.scan(from: .init())
        for (i, port) in [81, 82, 83].enumerated() {
            try service("web", port: port).write(toFile: path, atomically: false, encoding: .utf8)
            clock.set(.milliseconds(250 * (i + 1)))
            (snap, events) = try src.scan(from: snap)
            #expect(events.isEmpty)
        }
        clock.set(.seconds(1))
        (snap, events) = try src.scan(from: snap)
        guard case .serviceUpserted(let s) = events.first, events.count == 1 else { Issue.record("no settled update: \(events)"); return }
        #expect(s.ports.first?.port == 83)
    }

    @Test func aFileRemovedAndPutBackIsNoDeletionButOneThatStaysGoneIs() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let clock = StepClock()
        let src = make(dir, clock)
        let path = dir + "/web.yaml"
        try service("web").write(toFile: path, atomically: false, encoding: .utf8)
        var (snap, events) = try src.scan(from: .init())
        try FileManager.default.removeItem(atPath: path)
        clock.set(.milliseconds(250))
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty)
        try service("web").write(toFile: path, atomically: false, encoding: .utf8)
        clock.set(.milliseconds(500))
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty)
        try FileManager.default.removeItem(atPath: path)
        clock.set(.milliseconds(750))
        (snap, events) = try src.scan(from: snap)
        #expect(events.isEmpty)
        clock.set(.seconds(1))
        (snap, events) = try src.scan(from: snap)
        #expect(events == [.serviceDeleted(NamespacedName(namespace: "ns", name: "web"))])
    }
}
