// The drain reaper and a sync on the same backend: the reaper must not delete a real server
// that a sync restored while the reaper was suspended at a kernel call.

import IPTables
import IPVS
import KernelKit
import Logging
import Netlink
import SluiceCore
import SluiceTesting
import Testing

/// Wraps a fake IPVS table; once armed, the next `apply` waits for the test before reaching
/// the table (the reaper suspended at its delete).
actor GatedIPVS: IPVSClient {
    let inner: FakeIPVS
    private var armed = false
    private var gate: CheckedContinuation<Void, Never>?
    private(set) var held = 0
    private(set) var applies = 0

    init(_ inner: FakeIPVS) { self.inner = inner }

    func armNextApply() { armed = true }

    func open() {
        gate?.resume()
        gate = nil
    }

    func info() async throws -> IPVSInfo { try await inner.info() }
    func services() async throws -> [VirtualServer] { try await inner.services() }
    func destinations(of key: VirtualServerKey) async throws -> [RealServer] { try await inner.destinations(of: key) }
    func apply(_ operations: [IPVSOperation]) async throws -> [IPVSOperationFailure] {
        applies += 1
        if armed {
            armed = false
            held += 1
            await withCheckedContinuation { gate = $0 }
        }
        return try await inner.apply(operations)
    }
    func flush() async throws { try await inner.flush() }
    func setTimeouts(_ timeouts: IPVSTimeouts) async throws { try await inner.setTimeouts(timeouts) }
    func timeouts() async throws -> IPVSTimeouts { try await inner.timeouts() }
}

/// demo/web as a ClusterIP Service with `endpoints`.
private func webManifest(_ endpoints: [String]) -> String {
    ipvsWebManifest(endpoints: endpoints, nodePort: false)
}

@Suite struct IPVSReaperRaceTests {
    @Test func aReapSuspendedAtItsDeleteDoesNotRemoveARealServerASyncRestores() async throws {
        let table = FakeIPVS()
        let ipvs = GatedIPVS(table)
        let node = NodeConfig(nodeName: "node-a", nodeIPs: [IPAddress("192.168.0.2")!], clusterCIDRs: [CIDR("10.244.0.0/16")!])
        let o = IPVSOptions(node: node, family: .ipv4, scheduler: "rr", excludeCIDRs: [], randomFully: true)
        let config = IPVSBackendConfig(options: o, gracefulPeriod: .seconds(30), tools: IPTablesTools(variant: .legacy, family: .ipv4))
        let b = IPVSBackend(config: config, ipvs: ipvs, links: FakeLinks(nodeAddresses: [IPAddress("192.168.0.2")!]),
                            ipsets: FakeIPSets(), runner: RecordingIPTables(), logger: quietLogger, now: { .zero })
        let vip = VirtualServerKey(address: IPAddress("10.96.0.10")!, proto: .tcp, port: 80)
        let ep1 = RealServerEndpoint(address: IPAddress("10.244.1.2")!, port: 8080)
        let both = try Fixtures.state(webManifest(["10.244.1.2", "10.244.2.2"]), nodeName: "node-a")
        _ = try await b.sync(both, kind: .full)
        await table.setConnections(vip, ep1, active: 2)
        _ = try await b.sync(try Fixtures.state(webManifest(["10.244.2.2"]), nodeName: "node-a"), kind: .full)
        #expect(await b.drainingServers == ["10.96.0.10:80/TCP -> 10.244.1.2:8080"])
        await table.setConnections(vip, ep1, active: 0)

        // The reaper decides to delete ep1 and suspends at the kernel call ...
        await ipvs.armNextApply()
        let reap = Task { try await b.reapDraining() }
        for _ in 0..<20_000 where await ipvs.held == 0 { await Task.yield() }
        #expect(await ipvs.held == 1)
        // ... while ep1 is desired again and a sync runs.
        let sync = Task { try await b.sync(both, kind: .full) }
        for _ in 0..<2_000 { await Task.yield() }
        await ipvs.open()
        _ = try await reap.value
        _ = try await sync.value

        // Whatever order they ran in, the kernel ends with ep1 in service at weight 1.
        let saved = await table.save()
        #expect(saved.contains("-a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 1\n"))
        #expect(await b.drainingServers.isEmpty)
    }
}
