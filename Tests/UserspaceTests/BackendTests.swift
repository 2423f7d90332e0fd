// The userspace backend against the fake iptables: what each sync writes, relay-port
// stability, ordering of listeners and rules, failures, and --cleanup.

import IPTables
import Logging
import SluiceCore
import SluiceTesting
import Testing
import Userspace

private func backend(_ fake: FakeIPTables) -> UserspaceBackend {
    UserspaceBackend(nodeName: "node-a", nodeIP: IPAddress("10.0.0.5")!,
                     commands: IPTablesCommands(tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake),
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
        let report = try await b.sync(try state(sshService1), full: true)
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
        #expect(report.total["relays"] == 1)
        #expect(report.written["nat"] == 4)
        // Nothing of the iptables mode is created.
        #expect(!fake.chains("nat").contains("KUBE-SERVICES"))
        #expect(fake.chains("filter").isEmpty)
        await b.shutdown()
    }

    @Test func relayPortsAreStableAndUnchangedRulesAreNotRewritten() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        _ = try await b.sync(try state(web), full: true)
        let port = try #require(await b.relays.relayPort(webName))
        #expect(b.relayPort(of: webName) == UInt16(port))
        let restores = fake.restores.count
        // An endpoint change: same relay port, same rules, no restore.
        let moved = web.replacingOccurrences(of: "[{addresses: [10.244.1.10]}]", with: "[{addresses: [10.244.1.10]}, {addresses: [10.244.2.10]}]")
        let report = try await b.sync(try state(moved), full: false)
        #expect(await b.relays.relayPort(webName) == port)
        #expect(fake.restores.count == restores)
        #expect(report.written["nat"] == 0)
        // A full resync writes again, with the same port.
        _ = try await b.sync(try state(moved), full: true)
        #expect(fake.restores.count == restores + 1)
        #expect(fake.rules("nat", "KUBE-PORTALS-CONTAINER").first?.hasSuffix("--to-ports \(port)") == true)
        // Jumps are not duplicated by a second full sync.
        #expect(fake.rules("nat", "PREROUTING").count == 2)
        await b.shutdown()
    }

    @Test func removedServicePortLosesRulesThenListener() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        _ = try await b.sync(try state(web + "\n---\n" + sshService1), full: true)
        #expect(await b.relays.serviceCount == 2)
        _ = try await b.sync(try state(web), full: false)
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
                                 commands: IPTablesCommands(tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake),
                                 relays: RelayManager(config: testConfig(maxListeners: 1), logger: testLogger), logger: testLogger)
        // Sorted, default/ssh-service1 takes the one listener; ns/web gets none.
        let error = await #expect(throws: UserspaceError.self) { try await b.sync(try state(web + "\n---\n" + sshService1), full: true) }
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
        _ = try await b.sync(try state(web + "\n---\n" + sshService1), full: true)
        let sshPort = try #require(await b.relays.relayPort(sshName))
        fake.failRestores(1)
        await #expect(throws: IPTablesError.self) { try await b.sync(try state(web), full: false) }
        // The rules still point at ssh-service1's relay, so its listener must still be open.
        #expect(await b.relays.relayPort(sshName) == sshPort)
        #expect(fake.rules("nat", "KUBE-NODEPORT-CONTAINER").count == 1)
        // The retry (full) succeeds and then closes it.
        _ = try await b.sync(try state(web), full: true)
        #expect(await b.relays.relayPort(sshName) == nil)
        await b.shutdown()
    }

    @Test func flushedJumpsAreDetectedAndRestored() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        #expect(await b.externalChangeDetected() == false)
        _ = try await b.sync(try state(web), full: true)
        #expect(await b.externalChangeDetected() == false)
        fake.externalFlush("nat")
        #expect(await b.externalChangeDetected() == true)
        _ = try await b.sync(try state(web), full: true)
        #expect(await b.externalChangeDetected() == false)
        #expect(fake.rules("nat", "KUBE-PORTALS-CONTAINER").count == 1)
        await b.shutdown()
    }

    @Test func cleanupRemovesTheUserspaceChainsAndJumps() async throws {
        let fake = FakeIPTables()
        let b = backend(fake)
        _ = try await b.sync(try state(sshService1), full: true)
        await b.shutdown()
        let ipt = IPTablesBackend(options: IPTablesOptions(node: NodeConfig(nodeName: "node-a")),
                                  tools: IPTablesTools(variant: .auto, family: .ipv4), runner: fake, logger: testLogger)
        try await ipt.cleanup()
        for chain in Chain.userspaceNAT { #expect(!fake.chains("nat").contains(chain)) }
        #expect(fake.rules("nat", "PREROUTING").isEmpty)
        #expect(fake.rules("nat", "OUTPUT").isEmpty)
    }
}
