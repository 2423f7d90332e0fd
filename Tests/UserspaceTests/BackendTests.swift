// The userspace backend against the fake iptables: what each sync writes, relay-port
// stability, ordering of listeners and rules, failures, and --cleanup.

import IPTables
import KernelKit
import Logging
import SluiceCore
import SluiceTesting
import Testing
import Userspace

private func backend(_ fake: FakeIPTables) -> UserspaceBackend {
    UserspaceBackend(nodeName: "node-a", nodeIP: IPAddress("10.0.0.5")!,
                     tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake,
                     relays: RelayManager(config: testConfig(), logger: testLogger), logger: testLogger)
}

private func state(_ yaml: String) throws -> ProxyState { try Fixtures.state(yaml, nodeName: "node-a") }

private let web = """
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: ns}
    spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
    addressType: IPv4
    ports: [{name: http, port: 8080, protocol: TCP}]
    endpoints: [{addresses: [10.244.1.10]}]
    """

private let webName = ServicePortName(service: NamespacedName(namespace: "ns", name: "web"), port: "http", proto: .tcp)
private let sshName = ServicePortName(service: NamespacedName(namespace: "default", name: "ssh-service1"), port: "", proto: .tcp)

@Suite("Userspace backend", .timeLimit(.minutes(1)))
struct BackendTests {
    @Test func firstSyncWritesChainsRulesAndJumps() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        let report = try await b.sync(try state(sshService1), kind: .full)
        let port = try #require(await b.relays.relayPort(sshName))
        #expect(fake.rules("nat", "KUBE-PORTALS-CONTAINER") == [
            "-d 10.254.132.107/32 -p tcp -m comment --comment \"default/ssh-service1:\" -m tcp --dport 2222 -j REDIRECT --to-ports \(port)",
        ])
        #expect(fake.rules("nat", "KUBE-NODEPORT-HOST") == [
            "-p tcp -m comment --comment \"default/ssh-service1:\" -m tcp --dport 30239 -j DNAT --to-destination 10.0.0.5:\(port)",
        ])
        // Portal jumps first, NodePort jumps last, as legacy kube-proxy.
        #expect(fake.rules("nat", "PREROUTING") == [
            "-m comment --comment \"handle ClusterIPs; NOTE: this must be before the NodePort rules\" -j KUBE-PORTALS-CONTAINER",
            "-m addrtype --dst-type LOCAL -m comment --comment \"handle service NodePorts; NOTE: this must be the last rule in the chain\" -j KUBE-NODEPORT-CONTAINER",
        ])
        #expect(fake.rules("nat", "OUTPUT").last?.hasSuffix("-j KUBE-NODEPORT-HOST") == true)
        #expect(fake.rules("nat", "OUTPUT").first?.hasSuffix("-j KUBE-PORTALS-HOST") == true)
        #expect(report.total[.relays] == 1)
        #expect(report.written[.iptablesRules(.nat)] == 4)
        // Nothing of the iptables mode is created.
        #expect(!fake.chains("nat").contains("KUBE-SERVICES"))
        #expect(fake.chains("filter").isEmpty)
        await b.shutdown()
    }

    @Test func relayPortsAreStableAndUnchangedRulesAreNotRewritten() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        _ = try await b.sync(try state(web), kind: .full)
        let port = try #require(await b.relays.relayPort(webName))
        #expect(b.relayPort(of: webName) == UInt16(port))
        let restores = fake.restores.count
        // An endpoint change: same relay port, same rules, no restore.
        let moved = web.replacingOccurrences(of: "[{addresses: [10.244.1.10]}]", with: "[{addresses: [10.244.1.10]}, {addresses: [10.244.2.10]}]")
        let report = try await b.syncChanges(try state(moved))
        #expect(await b.relays.relayPort(webName) == port)
        #expect(fake.restores.count == restores)
        #expect(report.written[.iptablesRules(.nat)] == 0)
        // A full resync writes again, with the same port.
        _ = try await b.sync(try state(moved), kind: .full)
        #expect(fake.restores.count == restores + 1)
        #expect(fake.rules("nat", "KUBE-PORTALS-CONTAINER").first?.hasSuffix("--to-ports \(port)") == true)
        // Jumps are not duplicated by a second full sync.
        #expect(fake.rules("nat", "PREROUTING").count == 2)
        await b.shutdown()
    }

    @Test func removedServicePortLosesRulesThenListener() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        _ = try await b.sync(try state(web + "\n---\n" + sshService1), kind: .full)
        #expect(await b.relays.serviceCount == 2)
        // A partial sync names the Services that changed: the removed one among them.
        var s = try state(web)
        s.changedServices.insert(sshName.service)
        _ = try await b.syncChanges(s)
        #expect(await b.relays.serviceCount == 1)
        #expect(await b.relays.relayPort(sshName) == nil)
        #expect(b.relayPort(of: sshName) == nil)
        #expect(fake.rules("nat", "KUBE-NODEPORT-CONTAINER").isEmpty)
        #expect(fake.rules("nat", "KUBE-PORTALS-CONTAINER").count == 1)
        await b.shutdown()
    }

    @Test("Past the listener budget the other service ports' rules are still written, and the sync reports the rest")
    func listenerBudgetKeepsTheOtherRules() async throws {
        let fake = FakeIPTables()
        let b = UserspaceBackend(nodeName: "node-a", nodeIP: IPAddress("10.0.0.5")!,
                                 tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake,
                                 relays: RelayManager(config: testConfig(maxListeners: 1), logger: testLogger), logger: testLogger)
        // Sorted, default/ssh-service1 takes the one listener; ns/web gets none.
        let error = await #expect(throws: SyncFailure.self) { try await b.sync(try state(web + "\n---\n" + sshService1), kind: .full) }
        #expect(error?.failures.count == 1)
        #expect(error?.failures.first?.hasPrefix("ns/web:http:") == true, "\(String(describing: error))")
        let port = try #require(await b.relays.relayPort(sshName))
        #expect(await b.relays.relayPort(webName) == nil)
        #expect(fake.rules("nat", "KUBE-PORTALS-CONTAINER") == [
            "-d 10.254.132.107/32 -p tcp -m comment --comment \"default/ssh-service1:\" -m tcp --dport 2222 -j REDIRECT --to-ports \(port)",
        ])
    }

    @Test func failedRestoreKeepsOldListenersAndThrows() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        _ = try await b.sync(try state(web + "\n---\n" + sshService1), kind: .full)
        let sshPort = try #require(await b.relays.relayPort(sshName))
        fake.failRestores(1)
        var s = try state(web)
        s.changedServices.insert(sshName.service)
        let partial = s
        await #expect(throws: IPTablesError.self) { try await b.syncChanges(partial) }
        // The rules still point at ssh-service1's relay, so its listener must still be open.
        #expect(await b.relays.relayPort(sshName) == sshPort)
        #expect(fake.rules("nat", "KUBE-NODEPORT-CONTAINER").count == 1)
        // The retry (full) succeeds and then closes it.
        _ = try await b.sync(try state(web), kind: .full)
        #expect(await b.relays.relayPort(sshName) == nil)
        await b.shutdown()
    }

    @Test func flushedJumpsAreDetectedAndRestored() async throws {
        let fake = FakeIPTables()
        let b = UserspaceBackend(nodeName: "node-a", nodeIP: IPAddress("10.0.0.5")!,
                                 tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake,
                                 relays: RelayManager(config: testConfig(), logger: testLogger), logger: testLogger,
                                 jumpCheckValidity: .zero)
        #expect(await b.externalChangeDetected() == false)
        _ = try await b.sync(try state(web), kind: .full)
        #expect(await b.externalChangeDetected() == false)
        fake.externalFlush("nat")
        #expect(await b.externalChangeDetected() == true)
        _ = try await b.sync(try state(web), kind: .full)
        #expect(await b.externalChangeDetected() == false)
        #expect(fake.rules("nat", "KUBE-PORTALS-CONTAINER").count == 1)
        await b.shutdown()
    }

    @Test func aRecentCheckIsTrustedAndAPartialSyncIntoFlushedChainsFailsSoTheRetryIsFull() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        var (tracker, _) = try Fixtures.tracker(web, nodeName: "node-a")
        _ = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        let commands = fake.commands.count
        fake.externalFlush("nat")
        // Within the validity of the full sync's own check: no iptables -C is run.
        #expect(await b.externalChangeDetected() == false)
        #expect(fake.commands.count == commands)
        // The next partial sync deletes the old rule, which the flush removed: the batch fails,
        // the memory is gone, and the runner's retry is full.
        for e in try ModelEvents.upserts(web.replacingOccurrences(of: "port: 80,", with: "port: 81,")) { tracker.apply(e) }
        await #expect(throws: IPTablesError.self) { try await b.syncChanges(tracker.snapshot(.ipv4)) }
        #expect(await !b.holdsImage)
        _ = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        #expect(fake.rules("nat", "PREROUTING").count == 2)
        await b.shutdown()
    }

    @Test func cleanupRemovesTheUserspaceChainsAndJumps() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        _ = try await b.sync(try state(sshService1), kind: .full)
        await b.shutdown()
        let ipt = IPTablesBackend(options: IPTablesOptions(node: NodeConfig(nodeName: "node-a")),
                                  tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake, logger: testLogger)
        // As `sluice --cleanup`: the iptables mode's clean-up, then the userspace mode's own.
        try await ipt.cleanup()
        try await UserspaceBackend.cleanup(tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake, logger: testLogger)
        for chain in Chain.userspaceNAT { #expect(!fake.chains("nat").contains(chain)) }
        #expect(fake.rules("nat", "PREROUTING").isEmpty)
        #expect(fake.rules("nat", "OUTPUT").isEmpty)
    }
}

private func svc(_ name: String, ip: String, port: Int = 80, nodePort: Int? = nil, endpoints: [String]) -> String {
    """
    apiVersion: v1
    kind: Service
    metadata: {name: \(name), namespace: ns}
    spec: {type: \(nodePort == nil ? "ClusterIP" : "NodePort"), clusterIP: \(ip), ports: [{name: http, port: \(port)\(nodePort.map { ", nodePort: \($0)" } ?? "")}]}
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: \(name)-1, namespace: ns, labels: {kubernetes.io/service-name: \(name)}}
    addressType: IPv4
    ports: [{name: http, port: 8080, protocol: TCP}]
    endpoints: [\(endpoints.map { "{addresses: [\($0)]}" }.joined(separator: ", "))]

    """
}

@Suite("Userspace partial syncs from memory", .timeLimit(.minutes(1)))
struct UserspacePartialSyncTests {
    @Test func eachPartialSyncWritesOnlyTheChangedServicesRulesAndLeavesWhatAFullSyncWould() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        var (tracker, _) = try Fixtures.tracker(svc("a", ip: "10.96.0.1", endpoints: ["10.244.1.1"]) + "---\n"
            + svc("b", ip: "10.96.0.2", nodePort: 30002, endpoints: ["10.244.1.2"]), nodeName: "node-a")
        _ = try await b.sync(tracker.snapshot(.ipv4), kind: .full)
        #expect(await b.holdsImage)
        let steps: [(String, [ObjectEvent], Bool)] = [
            ("endpoint changed", try ModelEvents.upserts(svc("a", ip: "10.96.0.1", endpoints: ["10.244.1.9"])), false),
            ("service added", try ModelEvents.upserts(svc("c", ip: "10.96.0.3", endpoints: ["10.244.1.3"])), true),
            ("port changed", try ModelEvents.upserts(svc("b", ip: "10.96.0.2", port: 81, nodePort: 30003, endpoints: ["10.244.1.2"])), true),
            ("service deleted", try ModelEvents.deletes(svc("a", ip: "10.96.0.1", endpoints: [])), true),
        ]
        for (step, events, writes) in steps {
            for e in events { tracker.apply(e) }
            let s = tracker.snapshot(.ipv4)
            let restores = fake.restores.count
            _ = try await b.syncChanges(s)
            #expect(fake.restores.count == restores + (writes ? 1 : 0), "\(step)")
            if writes, let text = fake.restores.last {
                // No chain declared (so none flushed), and only the changed Service's rules.
                #expect(!text.contains("\n:"), "\(step)")
                let changed = s.changedServices.map { "\"\($0):http\"" }
                for line in text.split(separator: "\n") where line.hasPrefix("-") {
                    #expect(changed.contains { line.contains($0) }, "\(step): \(line)")
                }
            }
            // The four chains hold what a full compile with the same relay ports gives.
            let plan = UserspacePlan(state: s, nodeName: "node-a")
            var ports: [ServicePortName: Int] = [:]
            for name in plan.names { ports[name] = await b.relays.relayPort(name) }
            #expect(ports.count == plan.names.count, "\(step)")
            let expected = PortalCompiler(nodeIP: IPAddress("10.0.0.5")!).compile(plan, relayPorts: ports)
            for chain in Chain.userspaceNAT {
                #expect(Set(fake.rules("nat", chain).map { "-A \(chain) " + $0 }) == Set(expected.rules(in: chain)), "\(step) \(chain)")
            }
            #expect(await b.relays.serviceCount == plan.names.count, "\(step)")
        }
        await b.shutdown()
    }
}
