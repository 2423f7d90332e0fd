// The IPVS backend's diff logic against in-memory kernels: it writes only the difference,
// drains removed TCP real servers, survives restarts without rewriting anything, and names
// missing kernel support at start-up.

import Foundation
import IPTables
import IPVS
import KernelKit
import Logging
import Netlink
import SluiceCore
import SluiceTesting
import Synchronization
import Testing

/// A fake iptables for IPVS mode: answers `iptables-save -t T` with the jump rules inserted
/// so far, and records every restore.
final class RecordingIPTables: CommandRunner, @unchecked Sendable {
    private let lock = NSLock()
    private var jumps: [String: [String]] = ["nat": [], "filter": []]
    private(set) var restores: [String] = []
    var failRestores = false

    func run(_ executable: String, _ arguments: [String], input: String?) async -> Result<CommandResult, CommandError> {
        lock.withLock {
            if executable.hasSuffix("-save"), let t = arguments.last {
                return .success(CommandResult(status: 0, stdout: "*\(t)\n" + (jumps[t] ?? []).map { $0 + "\n" }.joined() + "COMMIT\n", stderr: ""))
            }
            if executable.hasSuffix("-restore") {
                restores.append(input ?? "")
                if failRestores { return .success(CommandResult(status: 1, stdout: "", stderr: "iptables-restore: line 3 failed")) }
                var table = ""
                for line in (input ?? "").split(separator: "\n") {
                    if line.hasPrefix("*") { table = String(line.dropFirst()) }
                    if line.hasPrefix("-I ") {
                        // "-I CHAIN 1 args" -> "-A CHAIN args", as iptables-save prints it.
                        let parts = line.split(separator: " ", maxSplits: 3)
                        jumps[table, default: []].append("-A \(parts[1]) \(parts[3])")
                    }
                    if line.hasPrefix("-D "), let i = jumps[table]?.firstIndex(of: "-A" + line.dropFirst(2)) {
                        jumps[table]?.remove(at: i)
                    }
                }
                return .success(CommandResult(status: 0, stdout: "", stderr: ""))
            }
            return .success(CommandResult(status: 0, stdout: "", stderr: ""))
        }
    }

    var jumpCount: Int { lock.withLock { jumps.values.reduce(0) { $0 + $1.count } } }
}

/// A settable monotonic clock.
final class TestClock: Sendable {
    private let value = Mutex<Duration>(.zero)
    func advance(_ d: Duration) { value.withLock { $0 += d } }
    var now: Duration { value.withLock { $0 } }
}

private let node = NodeConfig(nodeName: "node-a", nodeIPs: [IPAddress("192.168.0.2")!], clusterCIDRs: [CIDR("10.244.0.0/16")!])

private struct Bed {
    let ipvs = FakeIPVS()
    let links = FakeLinks(nodeAddresses: [IPAddress("192.168.0.2")!])
    let ipsets = FakeIPSets()
    let iptables = RecordingIPTables()
    let clock = TestClock()

    func backend(scheduler: String = "rr", exclude: [CIDR] = [], graceful: Duration = .seconds(30)) -> IPVSBackend {
        let o = IPVSOptions(node: node, family: .ipv4, scheduler: scheduler, excludeCIDRs: exclude, randomFully: true)
        let config = IPVSBackendConfig(options: o, gracefulPeriod: graceful, tools: IPTablesTools(variant: .legacy, family: .ipv4))
        let clock = self.clock
        return IPVSBackend(config: config, ipvs: ipvs, links: links, ipsets: ipsets, runner: iptables,
                           logger: quietLogger, now: { clock.now })
    }
}

private let vipKey = VirtualServerKey(address: IPAddress("10.96.0.10")!, proto: .tcp, port: 80)
private let ep1 = RealServerEndpoint(address: IPAddress("10.244.1.2")!, port: 8080)
private let ep2 = RealServerEndpoint(address: IPAddress("10.244.2.2")!, port: 8080)

private func state(_ yaml: String) throws -> ProxyState { try Fixtures.state(yaml, nodeName: "node-a") }

@Suite struct IPVSBackendTests {
    @Test func firstSyncProgramsEverythingAndTheSecondWritesNothing() async throws {
        let bed = Bed()
        let b = bed.backend()
        let s = try state(ipvsWebManifest(endpoints: ["10.244.1.2", "10.244.2.2"]))
        let report = try await b.sync(s, kind: .full)

        #expect(await bed.ipvs.save() == """
            -A -t 10.96.0.10:80 -s rr
            -a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 1
            -a -t 10.96.0.10:80 -r 10.244.2.2:8080 -m -w 1
            -A -t 192.168.0.2:30080 -s rr
            -a -t 192.168.0.2:30080 -r 10.244.1.2:8080 -m -w 1
            -a -t 192.168.0.2:30080 -r 10.244.2.2:8080 -m -w 1

            """)
        #expect(await bed.links.addresses(of: "kube-ipvs0") == [IPAddress("10.96.0.10")!])
        #expect(await bed.ipsets.members("KUBE-CLUSTER-IP") == ["10.96.0.10,tcp:80"])
        #expect(await bed.ipsets.members("KUBE-NODE-PORT-TCP") == ["30080"])
        #expect(await bed.ipsets.members("KUBE-IPVS-IPS") == ["10.96.0.10"])
        #expect(await bed.ipsets.sets.count == 17)
        #expect(report.written[.ipvsMessages] == 6)
        #expect(bed.iptables.restores.count == 1)
        #expect(bed.iptables.restores[0].contains("-I OUTPUT 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"))
        #expect(bed.iptables.jumpCount == 9)

        // Unchanged state, full sync: no IPVS, ipset or address write; the restore runs, without jumps.
        await bed.ipvs.clearLog()
        _ = try await b.sync(s, kind: .full)
        let w = await b.lastSyncWrites
        #expect(w.ipvsMessages == 0)
        #expect(w.ipsetAdds + w.ipsetDeletes + w.ipsetCreates == 0)
        #expect(w.addressAdds + w.addressDeletes == 0)
        #expect(await bed.ipvs.log.isEmpty)
        #expect(bed.iptables.restores.count == 2)
        #expect(!bed.iptables.restores[1].contains("-I "))

        // Partial sync of an unchanged state: not even a restore.
        _ = try await b.syncChanges(s)
        #expect(bed.iptables.restores.count == 2)
        #expect(await b.lastSyncWrites.ipvsMessages == 0)
    }

    @Test func aRestartChangesNothingThatIsRight() async throws {
        let bed = Bed()
        let s = try state(ipvsWebManifest(endpoints: ["10.244.1.2", "10.244.2.2"]))
        _ = try await bed.backend().sync(s, kind: .full)
        await bed.ipvs.clearLog()

        let restarted = bed.backend()
        _ = try await restarted.sync(s, kind: .full)
        #expect(await restarted.lastSyncWrites.ipvsMessages == 0)
        #expect(await bed.ipvs.flushes == 0)
        #expect(await bed.ipvs.log.isEmpty)
    }

    @Test func aRestartPutsADrainedButDesiredRealServerBackToWeightOne() async throws {
        let bed = Bed()
        let s = try state(ipvsWebManifest(endpoints: ["10.244.1.2", "10.244.2.2"]))
        _ = try await bed.backend().sync(s, kind: .full)
        // A previous run was killed while ep1 drained, and ep1 is desired again.
        var zero = RealServer(address: ep1.address, port: ep1.port, weight: 0)
        _ = try await bed.ipvs.apply([.updateDestination(vipKey, zero)])
        await bed.ipvs.clearLog()

        let restarted = bed.backend()
        _ = try await restarted.sync(s, kind: .full)
        zero.weight = 1
        #expect(await bed.ipvs.log == [.updateDestination(vipKey, zero)])
        #expect(await bed.ipvs.save().contains("-a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 1\n"))
    }

    @Test func aRemovedTCPEndpointDrainsUntilItsConnectionsEnd() async throws {
        let bed = Bed()
        let b = bed.backend()
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2", "10.244.2.2"])), kind: .full)
        await bed.ipvs.setConnections(vipKey, ep1, active: 3)
        await bed.ipvs.clearLog()

        var s = try state(ipvsWebManifest(endpoints: ["10.244.2.2"]))
        s.changedServices = [NamespacedName(namespace: "demo", name: "web")]
        _ = try await b.syncChanges(s)
        // ClusterIP real server with connections: weight 0 and draining. The NodePort one has
        // none: deleted at once.
        let log = await bed.ipvs.log
        #expect(log.contains(.updateDestination(vipKey, RealServer(address: ep1.address, port: ep1.port, weight: 0, activeConnections: 3))))
        #expect(log.contains { if case .deleteDestination(let k, let rs) = $0 { return k.port == 30080 && rs.endpoint == ep1 }; return false })
        #expect(await b.drainingServers == ["10.96.0.10:80/TCP -> 10.244.1.2:8080"])
        #expect(await bed.ipvs.save().contains("-a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 0\n"))

        // Still connected: the reaper leaves it.
        #expect(try await b.reapDraining() == 0)
        // Inactive (closing) connections do not hold it: only established ones do.
        await bed.ipvs.setConnections(vipKey, ep1, active: 0, inactive: 2)
        #expect(try await b.reapDraining() == 1)
        #expect(await b.drainingServers.isEmpty)
        #expect(!(await bed.ipvs.save().contains("10.244.1.2:8080 -m -w 0")))
    }

    @Test func aDrainingRealServerIsDeletedAfterTheGracefulPeriod() async throws {
        let bed = Bed()
        let b = bed.backend(graceful: .seconds(5))
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2", "10.244.2.2"])), kind: .full)
        await bed.ipvs.setConnections(vipKey, ep1, active: 1)
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.2.2"])), kind: .full)
        bed.clock.advance(.seconds(4))
        #expect(try await b.reapDraining() == 0)
        bed.clock.advance(.seconds(1))
        #expect(try await b.reapDraining() == 1)
        #expect(await bed.ipvs.save().components(separatedBy: "10.244.1.2").count == 1)
    }

    @Test func aDrainingEndpointThatComesBackIsRestored() async throws {
        let bed = Bed()
        let b = bed.backend()
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2", "10.244.2.2"])), kind: .full)
        await bed.ipvs.setConnections(vipKey, ep1, active: 1)
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.2.2"])), kind: .full)
        #expect(await b.drainingServers.count == 1)
        await bed.ipvs.clearLog()
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2", "10.244.2.2"])), kind: .full)
        #expect(await b.drainingServers.isEmpty)
        // The ClusterIP real server goes back to weight 1; the NodePort one, deleted at once
        // for lack of connections, is added again.
        let nodePortKey = VirtualServerKey(address: IPAddress("192.168.0.2")!, proto: .tcp, port: 30080)
        #expect(await bed.ipvs.log == [.updateDestination(vipKey, RealServer(address: ep1.address, port: ep1.port, weight: 1)),
                                       .addDestination(nodePortKey, RealServer(address: ep1.address, port: ep1.port, weight: 1))])
    }

    @Test func udpRealServersAreDeletedAtOnce() async throws {
        let bed = Bed()
        let b = bed.backend()
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2", "10.244.2.2"], proto: "UDP")), kind: .full)
        let udpKey = VirtualServerKey(address: vipKey.address, proto: .udp, port: 80)
        await bed.ipvs.setConnections(udpKey, ep1, active: 0, inactive: 4)
        await bed.ipvs.clearLog()
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.2.2"], proto: "UDP")), kind: .full)
        #expect(await bed.ipvs.log.contains(.deleteDestination(udpKey, RealServer(address: ep1.address, port: ep1.port, weight: 1, inactiveConnections: 4))))
        #expect(await b.drainingServers.isEmpty)
    }

    @Test func aDeletedServiceLosesItsVirtualServersAddressAndSetMembers() async throws {
        let bed = Bed()
        let b = bed.backend()
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2"])), kind: .full)
        await bed.ipvs.clearLog()
        _ = try await b.sync(try state(""), kind: .full)
        #expect(Set(await bed.ipvs.log) == [.deleteService(vipKey),
                                           .deleteService(VirtualServerKey(address: IPAddress("192.168.0.2")!, proto: .tcp, port: 30080))])
        #expect(await bed.ipvs.save().isEmpty)
        #expect(await bed.links.addresses(of: "kube-ipvs0").isEmpty)
        #expect(await bed.ipsets.members("KUBE-CLUSTER-IP").isEmpty)
        #expect(await bed.ipsets.members("KUBE-IPVS-IPS").isEmpty)
        #expect(await bed.ipsets.sets.count == 17)
    }

    @Test func excludedRangesAndOtherFamiliesAreLeftAlone() async throws {
        let bed = Bed()
        let foreignKept = VirtualServer(key: VirtualServerKey(address: IPAddress("172.16.5.5")!, proto: .tcp, port: 443), scheduler: "wlc")
        let foreignV6 = VirtualServer(key: VirtualServerKey(address: IPAddress("fd00::5")!, proto: .tcp, port: 443), scheduler: "rr")
        let stale = VirtualServer(key: VirtualServerKey(address: IPAddress("10.96.9.9")!, proto: .udp, port: 53), scheduler: "rr")
        await bed.ipvs.preload(foreignKept)
        await bed.ipvs.preload(foreignV6)
        await bed.ipvs.preload(stale)
        let b = bed.backend(exclude: [CIDR("172.16.0.0/12")!])
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2"])), kind: .full)
        let keys = Set(await bed.ipvs.table.keys)
        #expect(keys.contains(foreignKept.key))
        #expect(keys.contains(foreignV6.key))
        #expect(!keys.contains(stale.key))
    }

    @Test func configurationChangesEditTheService() async throws {
        let bed = Bed()
        _ = try await bed.backend().sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2"])), kind: .full)
        await bed.ipvs.clearLog()
        let b = bed.backend(scheduler: "wrr")
        _ = try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2"], sticky: true)), kind: .full)
        let log = await bed.ipvs.log
        #expect(log.count == 2)
        #expect(log.allSatisfy { if case .updateService(let vs) = $0 { return vs.scheduler == "wrr" && vs.flags == .persistent && vs.timeout == 10800 }; return false })
        #expect(await bed.ipvs.save().contains("-A -t 10.96.0.10:80 -s wrr -p 10800\n"))
    }

    @Test func aFailedWriteFailsTheSyncSoTheRunnerRetries() async throws {
        let bed = Bed()
        let b = bed.backend()
        let rs = RealServer(address: ep1.address, port: ep1.port, weight: 1)
        await bed.ipvs.fail(.addDestination(vipKey, rs), with: .invalidArgument)
        await #expect(throws: SyncFailure.self) { try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2"])), kind: .full) }
        bed.iptables.failRestores = true
        await #expect(throws: IPTablesError.self) { try await b.sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2"])), kind: .full) }
    }

    @Test func startupNamesWhatTheKernelLacks() async throws {
        let bed = Bed()
        await bed.links.setDummyUnsupported(true)
        let o = IPVSOptions(node: node)
        let config = IPVSBackendConfig(options: o, tools: IPTablesTools(variant: .legacy, family: .ipv4))
        let sysctls = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-sysctl-\(getpid())").path
        do {
            _ = try await IPVSBackend.prepare(config: config, ipvs: nil, links: bed.links, ipsets: bed.ipsets, timeouts: IPVSTimeouts(),
                                              strictARP: false, sysctlRoot: sysctls, logger: quietLogger)
            Issue.record("prepare should fail without IPVS")
        } catch let e as SluiceIPVSUnavailable {
            #expect(e.description.hasPrefix("cannot use --proxy-mode ipvs: the kernel has no IPVS"))
            #expect(e.description.contains("ip_vs"))
            #expect(e.description.contains("dummy"))
            #expect(!e.description.contains("\n"))
        }
    }

    @Test func startupWithEverythingSetsTimeoutsAndCreatesTheDevice() async throws {
        let bed = Bed()
        let config = IPVSBackendConfig(options: IPVSOptions(node: node), tools: IPTablesTools(variant: .legacy, family: .ipv4))
        let support = try await IPVSBackend.prepare(config: config, ipvs: bed.ipvs, links: bed.links, ipsets: bed.ipsets,
                                                    timeouts: IPVSTimeouts(tcp: 900, tcpFin: 0, udp: 30), strictARP: false,
                                                    sysctlRoot: "/nonexistent", logger: quietLogger)
        #expect(support.dummyIndex > 0)
        #expect(await bed.ipvs.timeoutsSet == IPVSTimeouts(tcp: 900, tcpFin: 0, udp: 30))
        // The scheduler probe service was created and removed again.
        #expect(await bed.ipvs.log.count == 2)
        #expect(await bed.ipvs.table.isEmpty)
        #expect(try await bed.links.link(named: "kube-ipvs0") != nil)
    }

    @Test func cleanupRemovesEverything() async throws {
        let bed = Bed()
        _ = try await bed.backend().sync(try state(ipvsWebManifest(endpoints: ["10.244.1.2"])), kind: .full)
        let failures = await IPVSBackend.cleanup(ipvs: bed.ipvs, links: bed.links, ipsets: bed.ipsets,
                                                 tools: [IPTablesTools(variant: .legacy, family: .ipv4)], runner: bed.iptables,
                                                 logger: quietLogger)
        #expect(failures.isEmpty)
        #expect(bed.iptables.jumpCount == 0)
        #expect(await bed.ipvs.table.isEmpty)
        #expect(await bed.ipsets.sets.isEmpty)
        #expect(try await bed.links.link(named: "kube-ipvs0") == nil)
    }
}

// MARK: Partial syncs from memory

private func service(_ name: String, ip: String, proto: String = "TCP", port: Int = 80, nodePort: Int? = nil,
                     externalIPs: [String] = [], endpoints: [String]) -> String {
    """
    apiVersion: v1
    kind: Service
    metadata: {name: \(name), namespace: demo}
    spec:
      type: \(nodePort == nil ? "ClusterIP" : "NodePort")
      clusterIP: \(ip)
      externalIPs: [\(externalIPs.joined(separator: ", "))]
      ports: [{name: p, port: \(port), protocol: \(proto)\(nodePort.map { ", nodePort: \($0)" } ?? "")}]
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: \(name)-1, namespace: demo, labels: {kubernetes.io/service-name: \(name)}}
    addressType: IPv4
    ports: [{name: p, port: 8080, protocol: \(proto)}]
    endpoints: [\(endpoints.map { "{addresses: [\($0)], nodeName: node-b}" }.joined(separator: ", "))]

    """
}

/// Everything the fake kernel holds, as text.
private func kernelText(_ bed: Bed) async -> String {
    var out = await bed.ipvs.save()
    for name in await bed.ipsets.sets.keys.sorted() {
        out += "set \(name): " + (await bed.ipsets.members(name)).joined(separator: " ") + "\n"
    }
    out += "kube-ipvs0: " + (await bed.links.addresses(of: "kube-ipvs0")).map(\.description).joined(separator: " ") + "\n"
    // The last rule set written, without the jump rules a full sync inserts.
    out += "restore: " + (bed.iptables.restores.last ?? "").split(separator: "\n").filter { !$0.hasPrefix("-I ") }.joined(separator: "\n") + "\n"
    return out
}

/// Reads of the fake kernel so far: table dumps, destination reads, set listings, address dumps.
private func reads(_ bed: Bed) async -> (dumps: Int, destinations: Int, listings: Int, addresses: Int) {
    (await bed.ipvs.serviceDumps, await bed.ipvs.destinationReads.values.reduce(0, +), await bed.ipsets.listings,
     await bed.links.addressDumps)
}

@Suite struct IPVSPartialSyncTests {
    static let base = service("web", ip: "10.96.0.10", nodePort: 30080, endpoints: ["10.244.1.2", "10.244.2.2"])
        + "---\n" + service("dns", ip: "10.96.0.53", proto: "UDP", port: 53, endpoints: ["10.244.1.3"])
        + "---\n" + service("ext-a", ip: "10.96.0.20", externalIPs: ["203.0.113.7"], endpoints: ["10.244.1.4"])
        + "---\n" + service("ext-b", ip: "10.96.0.21", port: 81, externalIPs: ["203.0.113.7"], endpoints: ["10.244.1.5"])

    /// Each step's events; after each, a partial sync from memory must leave the kernel as a
    /// full sync of the same state leaves an empty one.
    static let steps: [(String, [ObjectEvent])] = {
        func up(_ y: String) -> [ObjectEvent] { (try? ModelEvents.upserts(y)) ?? [] }
        func down(_ y: String) -> [ObjectEvent] { (try? ModelEvents.deletes(y)) ?? [] }
        return [
            ("endpoint added", up(service("web", ip: "10.96.0.10", nodePort: 30080, endpoints: ["10.244.1.2", "10.244.2.2", "10.244.3.2"]))),
            ("endpoint removed", up(service("web", ip: "10.96.0.10", nodePort: 30080, endpoints: ["10.244.2.2", "10.244.3.2"]))),
            ("service added", up(service("new", ip: "10.96.0.30", endpoints: ["10.244.1.9"]))),
            ("service deleted", down(service("dns", ip: "10.96.0.53", proto: "UDP", port: 53, endpoints: ["10.244.1.3"]))),
            ("shared external IP dropped by one", up(service("ext-a", ip: "10.96.0.20", endpoints: ["10.244.1.4"]))),
            ("port and node port changed", up(service("web", ip: "10.96.0.10", port: 8000, nodePort: 30081, endpoints: ["10.244.2.2"]))),
            ("shared external IP dropped by the other", up(service("ext-b", ip: "10.96.0.21", port: 81, endpoints: ["10.244.1.5"]))),
        ]
    }()

    @Test func aSequenceOfPartialSyncsLeavesTheKernelAsAFullSyncDoesAndReadsNothing() async throws {
        var (tracker, rejections) = try Fixtures.tracker(Self.base, nodeName: "node-a")
        #expect(rejections.isEmpty)
        let bed = Bed()
        let b = bed.backend()
        _ = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        #expect(await b.holdsKernelImage)
        let start = await reads(bed)

        for (step, events) in Self.steps {
            #expect(!events.isEmpty, "\(step)")
            for e in events { tracker.apply(e) }
            let s = tracker.snapshot(.ipv4)
            #expect(!s.changedServices.isEmpty, "\(step)")
            _ = try await b.syncChanges(s)

            let fresh = Bed()
            let f = fresh.backend()
            _ = try await f.sync(s, kind: .full)
            #expect(await kernelText(bed) == kernelText(fresh), "\(step)")
            // The image is what a compile of the whole state gives.
            #expect(await b.lastDesired?.dryRunText == f.lastDesired?.dryRunText, "\(step)")
        }
        let end = await reads(bed)
        // No table dump, no set listing, no address dump. Destinations were read once: for
        // the TCP virtual servers losing a real server (ClusterIP and NodePort of "web", in
        // "endpoint removed"); "port and node port changed" replaces whole virtual servers.
        #expect(end.dumps == start.dumps)
        #expect(end.listings == start.listings)
        #expect(end.addresses == start.addresses)
        #expect(end.destinations - start.destinations == 2)
    }

    @Test func anEndpointChangeWritesOnlyItsMessages() async throws {
        var (tracker, _) = try Fixtures.tracker(Self.base, nodeName: "node-a")
        let bed = Bed()
        let b = bed.backend()
        _ = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        await bed.ipvs.clearLog()
        await bed.ipsets.clearLog()
        await bed.links.clearLog()
        let restores = bed.iptables.restores.count
        for e in try ModelEvents.upserts(service("web", ip: "10.96.0.10", nodePort: 30080, endpoints: ["10.244.1.2", "10.244.2.7"])) {
            tracker.apply(e)
        }
        _ = try await b.syncChanges(tracker.snapshot(.ipv4))
        let old = RealServer(address: IPAddress("10.244.2.2")!, port: 8080)
        let new = RealServer(address: IPAddress("10.244.2.7")!, port: 8080)
        let nodePortKey = VirtualServerKey(address: IPAddress("192.168.0.2")!, proto: .tcp, port: 30080)
        // One add and one delete per virtual server (ClusterIP, NodePort): four messages.
        #expect(Set(await bed.ipvs.log) == [.addDestination(vipKey, new), .addDestination(nodePortKey, new),
                                           .deleteDestination(vipKey, old), .deleteDestination(nodePortKey, old)])
        #expect(await bed.ipsets.log.isEmpty)
        #expect(await bed.links.log.isEmpty)
        #expect(bed.iptables.restores.count == restores)
    }

    @Test func aFailedPartialSyncForgetsTheImageSoTheNextSyncReadsTheKernel() async throws {
        var (tracker, _) = try Fixtures.tracker(Self.base, nodeName: "node-a")
        let bed = Bed()
        let b = bed.backend()
        _ = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        let added = RealServer(address: IPAddress("10.244.3.2")!, port: 8080)
        await bed.ipvs.fail(.addDestination(vipKey, added), with: .invalidArgument)
        for e in try ModelEvents.upserts(service("web", ip: "10.96.0.10", nodePort: 30080, endpoints: ["10.244.1.2", "10.244.2.2", "10.244.3.2"])) {
            tracker.apply(e)
        }
        let s = tracker.snapshot(.ipv4)
        await #expect(throws: SyncFailure.self) { try await b.syncChanges(s) }
        #expect(await !b.holdsKernelImage)
        #expect(await b.lastDesired == nil)

        // Even a partial sync now reads the kernel (the runner makes it full anyway).
        let dumps = await bed.ipvs.serviceDumps
        _ = try? await b.syncChanges(s)
        #expect(await bed.ipvs.serviceDumps == dumps + 1)
    }

    @Test func aRestartWithUnchangedStateWritesNothingAndThenSyncsPartiallyFromMemory() async throws {
        var (tracker, _) = try Fixtures.tracker(Self.base, nodeName: "node-a")
        let bed = Bed()
        let s = tracker.snapshot(.ipv4)
        _ = try await bed.backend().sync(s, kind: .full)
        await bed.ipvs.clearLog()
        await bed.ipsets.clearLog()
        await bed.links.clearLog()

        let restarted = bed.backend()
        _ = try await restarted.sync(s, kind: .full)
        #expect(await restarted.lastSyncWrites.ipvsMessages == 0)
        #expect(await bed.ipvs.log.isEmpty)
        #expect(await bed.ipsets.log.isEmpty)
        #expect(await bed.links.log.isEmpty)

        for e in try ModelEvents.deletes(service("ext-b", ip: "10.96.0.21", port: 81, externalIPs: ["203.0.113.7"], endpoints: ["10.244.1.5"])) {
            tracker.apply(e)
        }
        let dumps = await bed.ipvs.serviceDumps
        _ = try await restarted.syncChanges(tracker.snapshot(.ipv4))
        #expect(await bed.ipvs.serviceDumps == dumps)
        // ext-b's ClusterIP and external-IP virtual servers go; the shared external IP stays bound for ext-a.
        #expect(await bed.ipvs.log.count == 2)
        #expect(await bed.links.log == ["-10.96.0.21"])
        #expect(await bed.ipsets.members("KUBE-IPVS-IPS").contains("203.0.113.7"))
    }
}
