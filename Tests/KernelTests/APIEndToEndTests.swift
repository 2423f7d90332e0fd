// End to end: the real `sluice --proxy-mode iptables --kubeconfig FILE` in a throw-away network
// namespace, following the fake API server through every fault it can produce, checked in
// the namespace's nat table with iptables-save.
//
// The fake server runs in this test process but listens on a socket created inside the
// namespace, so sluice reaches it at 127.0.0.1 on the namespace's own loopback; the host's
// network and iptables are never touched.

import Foundation
import Glibc
import SluiceTesting
import Testing

/// One running sluice process inside a namespace.
private final class SluiceProcess: @unchecked Sendable {
    let process = Process()
    let logPath: String

    init(binary: String, namespace: NetworkNamespace, arguments: [String], logPath: String) throws {
        self.logPath = logPath
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.executableURL = URL(fileURLWithPath: ToolRunner.which("ip") ?? "/usr/sbin/ip")
        // `ip netns exec` execs the command: the process we hold is sluice itself.
        process.arguments = ["netns", "exec", namespace.name, binary] + arguments
        process.standardOutput = log
        process.standardError = log
        try process.run()
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    var isRunning: Bool { process.isRunning }

    /// SIGTERM, then SIGKILL after 10 s; returns the exit status.
    @discardableResult
    func stop() async -> Int32 {
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            for _ in 0..<100 where process.isRunning { try? await Task.sleep(for: .milliseconds(100)) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        process.waitUntilExit()
        return process.terminationStatus
    }
}

@Suite(.serialized) struct APIEndToEndTests {
    private static let node = "e2e-node"

    private static var binary: String {
        if let b = ProcessInfo.processInfo.environment["SLUICE_BIN"], !b.isEmpty { return b }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/sluice").path
    }

    /// The nat table inside the namespace.
    private func nat(_ ns: NetworkNamespace) throws -> String {
        try ns.run(["iptables-save", "-t", "nat"]).stdout
    }

    /// DNAT targets of a service port, sorted (`ip:port`).
    private func targets(_ nat: String, _ servicePort: String) -> [String] {
        nat.split(separator: "\n").filter { $0.contains("--comment \"\(servicePort)\"") && $0.contains("-j DNAT") }
            .compactMap { line in line.range(of: "--to-destination ").map { String(line[$0.upperBound...].prefix { $0 != " " }) } }
            .sorted()
    }

    private func hasClusterIPRule(_ nat: String, _ servicePort: String) -> Bool {
        nat.contains("--comment \"\(servicePort) cluster IP\"")
    }

    /// Polls the nat table until `condition` holds; returns how long it took.
    @discardableResult
    private func waitForRules(_ what: String, _ ns: NetworkNamespace, sluice: SluiceProcess, timeout: Duration = .seconds(10),
                              _ condition: @escaping @Sendable (String) -> Bool) async throws -> Duration {
        let clock = ContinuousClock()
        let start = clock.now
        do {
            try await Eventually.wait(what, timeout: timeout, interval: .milliseconds(20)) {
                condition(try self.nat(ns))
            }
        } catch {
            print("---- sluice log ----\n\(sluice.log.suffix(4000))\n---- nat table ----\n\((try? nat(ns)) ?? "")")
            throw error
        }
        let took = start.duration(to: clock.now)
        print("e2e: \(what): \(took)")
        return took
    }

    @Test func rulesFollowTheAPIServerThroughFaults() async throws {
        if let why = NetworkNamespace.unavailableReason {
            print("skipping rulesFollowTheAPIServerThroughFaults: \(why)")
            return
        }
        let binary = Self.binary
        try #require(FileManager.default.isExecutableFile(atPath: binary), "sluice binary \(binary) missing: run swift build first")
        let ns = try NetworkNamespace(prefix: "sluice-e2e")
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-e2e-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let server = try FakeAPIServer(listener: .socket({ port in try ns.listeningSocket(port: port) }))
        var processes: [SluiceProcess] = []
        do {
            try await run(ns: ns, server: server, work: work, binary: binary, processes: &processes)
        } catch {
            for p in processes { await p.stop() }
            await server.stop()
            ns.delete()
            throw error
        }
        for p in processes { await p.stop() }
        await server.stop()
        ns.delete()
        try? FileManager.default.removeItem(atPath: work)
    }

    private func run(ns: NetworkNamespace, server: FakeAPIServer, work: String, binary: String,
                     processes: inout [SluiceProcess]) async throws {
        try await server.start()
        let tokenFile = work + "/token"
        try "first-token\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        server.requireToken("first-token")
        let kubeconfig = work + "/kubeconfig"
        try """
            apiVersion: v1
            kind: Config
            current-context: e2e
            clusters: [{name: fake, cluster: {server: "http://127.0.0.1:\(server.port)"}}]
            contexts: [{name: e2e, context: {cluster: fake, user: sluice}}]
            users: [{name: sluice, user: {tokenFile: token}}]
            """.write(toFile: kubeconfig, atomically: true, encoding: .utf8)

        server.apply(.nodes, FakeObjects.node(Self.node, internalIP: "192.168.77.1", podCIDRs: ["10.244.7.0/24"],
                                              labels: ["topology.kubernetes.io/zone": "z1"]))
        server.apply(.services, FakeObjects.service("web", clusterIP: "10.96.0.10"))
        server.apply(.endpointslices, FakeObjects.endpointSlice("web-1", service: "web", addresses: ["10.244.7.5"], nodeName: Self.node))
        server.apply(.endpointslices, FakeObjects.endpointSlice("web-2", service: "web", addresses: ["10.244.8.5", "10.244.7.5"]))
        // Another proxy's and a headless service's objects never show up.
        server.apply(.services, FakeObjects.service("theirs", clusterIP: "10.96.0.99", labels: ["service.kubernetes.io/service-proxy-name": "other"]))

        let args = ["--proxy-mode", "iptables", "--kubeconfig", kubeconfig, "--hostname-override", Self.node,
                    "--detect-local-mode", "NodeCIDR", "--min-sync-period", "100ms", "--sync-period", "30s"]
        var sluice = try SluiceProcess(binary: binary, namespace: ns, arguments: args, logPath: work + "/sluice-1.log")
        processes.append(sluice)

        // 1. Initial state: slices of one Service merge, the duplicate endpoint counts once,
        //    local detection uses the Node's podCIDR, the node IP comes from the Node.
        try await waitForRules("initial rules", ns, sluice: sluice) { nat in
            self.targets(nat, "default/web:http") == ["10.244.7.5:8080", "10.244.8.5:8080"]
        }
        var table = try nat(ns)
        #expect(table.contains("! -s 10.244.7.0/24 -d 10.96.0.10/32"))
        #expect(!table.contains("10.96.0.99"))
        #expect(sluice.log.contains("node IPs 192.168.77.1"))
        #expect(!sluice.log.contains("first-token"))

        // 2. A restart must not program an empty rule set while the API is only half listed.
        #expect(await sluice.stop() == 0)
        server.failNext(1000, status: 503, kind: .list, resource: .endpointslices)
        let second = try SluiceProcess(binary: binary, namespace: ns, arguments: args, logPath: work + "/sluice-2.log")
        sluice = second
        processes.append(second)
        try await Eventually.wait("the new sluice lists services", timeout: .seconds(10)) {
            server.requests.contains { $0.verb == "watch" && $0.resource == .services }
        }
        try await Task.sleep(for: .milliseconds(1500))
        #expect(!sluice.log.contains(" sync: "), "synced before EndpointSlices were listed")
        #expect(targets(try nat(ns), "default/web:http") == ["10.244.7.5:8080", "10.244.8.5:8080"])
        server.clearFailures()
        try await Eventually.wait("first sync after the listing", timeout: .seconds(30)) { second.log.contains(" sync: ") }
        #expect(targets(try nat(ns), "default/web:http") == ["10.244.7.5:8080", "10.244.8.5:8080"])

        // 3. Create, change and delete.
        server.apply(.services, FakeObjects.service("api", clusterIP: "10.96.0.11", ports: [("grpc", 9000)]))
        server.apply(.endpointslices, FakeObjects.endpointSlice("api-1", service: "api", addresses: ["10.244.9.1"], portName: "grpc", port: 9001))
        try await waitForRules("created service", ns, sluice: sluice) { self.targets($0, "default/api:grpc") == ["10.244.9.1:9001"] }
        server.apply(.endpointslices, FakeObjects.endpointSlice("api-1", service: "api", addresses: ["10.244.9.1", "10.244.9.2"],
                                                               portName: "grpc", port: 9001))
        try await waitForRules("changed endpoints", ns, sluice: sluice) {
            self.targets($0, "default/api:grpc") == ["10.244.9.1:9001", "10.244.9.2:9001"]
        }
        server.delete(.services, name: "api")
        try await waitForRules("deleted service", ns, sluice: sluice) { !self.hasClusterIPRule($0, "default/api:grpc") }

        // 4. 410 Gone mid-stream after a delete the watch never saw: the re-list finds it.
        try await Eventually.wait("watching") { server.watchCount(.services) == 1 }
        server.delete(.services, name: "web", silently: true)
        server.expireWatches()
        try await waitForRules("silent delete found by the re-list", ns, sluice: sluice) { !self.hasClusterIPRule($0, "default/web:http") }

        // 5. Dropped connections.
        try await Eventually.wait("watching") { server.watchCount() == 4 }
        server.dropConnections()
        server.apply(.services, FakeObjects.service("web", clusterIP: "10.96.0.10"))
        try await waitForRules("after dropped connections", ns, sluice: sluice) {
            self.targets($0, "default/web:http") == ["10.244.7.5:8080", "10.244.8.5:8080"]
        }

        // 6. Server restart that lost its watch history, with changes while it was down.
        await server.stop()
        server.apply(.services, FakeObjects.service("restarted", clusterIP: "10.96.0.12"))
        server.apply(.endpointslices, FakeObjects.endpointSlice("restarted-1", service: "restarted", addresses: ["10.244.7.12"]))
        try await Task.sleep(for: .milliseconds(300))
        try await server.restart(losingHistory: true)
        try await waitForRules("after a server restart", ns, sluice: sluice) { self.targets($0, "default/restarted:http") == ["10.244.7.12:8080"] }

        // 7. A slow server writing every event in 5-byte chunks.
        try await Eventually.wait("watching") { server.watchCount() == 4 }
        server.setSlow(.milliseconds(200))
        server.splitWatchWrites(into: 5, delay: .milliseconds(2))
        server.dropConnections()
        server.apply(.services, FakeObjects.service("slow", clusterIP: "10.96.0.13"))
        server.apply(.endpointslices, FakeObjects.endpointSlice("slow-1", service: "slow", addresses: ["10.244.7.13"]))
        try await waitForRules("through a slow, chunked server", ns, sluice: sluice, timeout: .seconds(20)) {
            self.targets($0, "default/slow:http") == ["10.244.7.13:8080"]
        }
        server.setSlow(.zero)
        server.splitWatchWrites(into: nil)

        // 8. A malformed event in the stream: skipped, the next one applies.
        try await Eventually.wait("watching") { server.watchCount(.services) == 1 }
        server.injectRaw("{\"type\":\"ADDED\",\"object\":{\"broken\n", into: .services)
        server.apply(.services, FakeObjects.service("after-garbage", clusterIP: "10.96.0.14"))
        server.apply(.endpointslices, FakeObjects.endpointSlice("after-garbage-1", service: "after-garbage", addresses: ["10.244.7.14"]))
        try await waitForRules("after a malformed event", ns, sluice: sluice) { self.targets($0, "default/after-garbage:http") == ["10.244.7.14:8080"] }
        #expect(sluice.log.contains("malformed"))

        // 9. The token expires and rotates: 401 until the file has the new token.
        server.requireToken("second-token")
        server.dropConnections()
        try await Eventually.wait("refused with the old token") { server.requests.contains { $0.status == 401 } }
        try "second-token\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        server.apply(.services, FakeObjects.service("rotated", clusterIP: "10.96.0.15"))
        server.apply(.endpointslices, FakeObjects.endpointSlice("rotated-1", service: "rotated", addresses: ["10.244.7.15"]))
        try await waitForRules("after token rotation", ns, sluice: sluice, timeout: .seconds(40)) {
            self.targets($0, "default/rotated:http") == ["10.244.7.15:8080"]
        }

        // 10. 403 and 500 answers on reconnect.
        server.failNext(2, status: 403, kind: .watch)
        server.failNext(2, status: 500, kind: .list)
        server.dropConnections()
        server.apply(.services, FakeObjects.service("after-errors", clusterIP: "10.96.0.16"))
        server.apply(.endpointslices, FakeObjects.endpointSlice("after-errors-1", service: "after-errors", addresses: ["10.244.7.16"]))
        try await waitForRules("after 403 and 500", ns, sluice: sluice, timeout: .seconds(40)) {
            self.targets($0, "default/after-errors:http") == ["10.244.7.16:8080"]
        }
        table = try nat(ns)
        #expect(targets(table, "default/web:http") == ["10.244.7.5:8080", "10.244.8.5:8080"])
        #expect(!sluice.log.contains("first-token") && !sluice.log.contains("second-token"))

        // 11. The Node's podCIDR changes: the rules were compiled with the old one, so sluice exits
        //     non-zero for its DaemonSet to restart it.
        server.apply(.nodes, FakeObjects.node(Self.node, internalIP: "192.168.77.1", podCIDRs: ["10.244.70.0/24"]))
        try await Eventually.wait("sluice exits", timeout: .seconds(20)) { !second.isRunning }
        let status = await sluice.stop()
        #expect(status != 0)
        #expect(sluice.log.contains("podCIDRs changed"))
    }

    @Test func aBrokenKubeconfigIsOneLineAndANonZeroExit() throws {
        let binary = Self.binary
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            Issue.record("sluice binary \(binary) missing: run swift build first")
            return
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-badcfg-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "apiVersion: v1\nkind: Config\ncurrent-context: gone\ncontexts: []\n".write(toFile: dir + "/broken", atomically: true, encoding: .utf8)
        for (file, problem) in [(dir + "/missing", "no such file"), (dir + "/broken", "context \"gone\" is not defined")] {
            let r = try ToolRunner.run([binary, "--kubeconfig", file, "--hostname-override", "n1"])
            #expect(r.status != 0)
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.count == 1, "\(r.stderr)")
            #expect(lines.first?.contains(file) == true)
            #expect(lines.first?.contains(problem) == true, "\(r.stderr)")
        }
    }
}
