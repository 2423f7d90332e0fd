// The IPVS mode's pure plan (IPVSPlanner): from a desired state and what the kernel holds (a
// view the backend read, or the image a partial sync remembers), the writes of one sync,
// without any kernel or fake.

import IPTables
import IPVS
import KernelKit
import SluiceCore
import SluiceTesting
import Testing

private let planNode = NodeConfig(nodeName: "node-a", nodeIPs: [IPAddress("192.168.0.2")!], clusterCIDRs: [CIDR("10.244.0.0/16")!])
private let nodeAddress = InterfaceAddress(index: 1, address: IPAddress("192.168.0.2")!, prefixLength: 24)
private let dummyIndex: UInt32 = 7

/// demo/web (a NodePort) with `webEndpoints`, and demo/dns.
private func services(webEndpoints: [String]) -> String {
    ipvsWebManifest(endpoints: webEndpoints, extra: ipvsDNSManifest)
}

private let web = NamespacedName(namespace: "demo", name: "web")
private let webVIP = VirtualServerKey(address: IPAddress("10.96.0.10")!, proto: .tcp, port: 80)
private let webNodePort = VirtualServerKey(address: IPAddress("192.168.0.2")!, proto: .tcp, port: 30080)

private func planner(exclude: [CIDR] = []) -> IPVSPlanner {
    IPVSPlanner(options: IPVSOptions(node: planNode, family: .ipv4, scheduler: "rr", excludeCIDRs: exclude, randomFully: true))
}

/// A kernel that holds exactly `desired`: its virtual and real servers, sets and members,
/// kube-ipvs0 addresses and the jump rules.
private func kernelHolding(_ desired: IPVSDesiredState) -> IPVSKernelView {
    var view = IPVSKernelView(dummyIndex: dummyIndex,
                              addresses: [nodeAddress] + desired.boundAddresses.map { InterfaceAddress(index: dummyIndex, address: $0, prefixLength: 32) })
    view.virtualServers = desired.sortedVirtualServers.map(\.server)
    for d in desired.sortedVirtualServers { view.destinations[d.server.key] = d.destinations }
    view.sets = desired.sets.map { IPSetInfo(name: $0.name, typeName: $0.type.rawValue, revision: 0, family: 2, entries: Array(desired.entries[$0.name] ?? [])) }
    for table in [Table.nat, .filter] {
        view.saves[table] = "*\(table.rawValue)\n" + ipvsJumpRules.filter { $0.table == table }.map { JumpInstaller.saveLine($0) + "\n" }.joined() + "COMMIT\n"
    }
    return view
}

@Suite struct IPVSPlanTests {
    @Test func aNodeThatHoldsNothingGetsEverything() throws {
        let state = try Fixtures.state(services(webEndpoints: ["10.244.1.2", "10.244.2.2"]), nodeName: "node-a")
        let plan = planner().planFromScratch(state, nodeAddresses: [nodeAddress.address])
        let desired = plan.desired
        #expect(desired.virtualServers.count == 3)  // web's ClusterIP and NodePort, dns's ClusterIP
        #expect(plan.createSets.map(\.name) == desired.sets.map(\.name))
        #expect(plan.operations.filter { if case .addService = $0 { true } else { false } }.count == 3)
        #expect(plan.operations.filter { if case .addDestination = $0 { true } else { false } }.count == 5)
        #expect(plan.operations.count == 8)
        #expect(plan.bind == desired.boundAddresses.sorted())
        #expect(plan.bind.contains(IPAddress("10.96.0.10")!) && plan.bind.contains(IPAddress("10.96.0.53")!))
        #expect(plan.unbind.isEmpty && plan.drains.isEmpty)
        // Full: the rule set, with every jump rule inserted (the kernel holds none).
        let restore = try #require(plan.restore)
        #expect(restore.rules == desired.restoreText)
        #expect(restore.batch.split(separator: "\n").filter { $0.hasPrefix("-I ") }.count == ipvsJumpRules.count)
        #expect(!plan.writesNothing)
    }

    @Test func aRestartWithUnchangedStateWritesNothingButTheFullSyncsRuleSet() throws {
        let state = try Fixtures.state(services(webEndpoints: ["10.244.1.2", "10.244.2.2"]), nodeName: "node-a")
        let p = planner()
        let (desired, options) = p.desired(state, nodeAddresses: [nodeAddress.address])
        let kernel = kernelHolding(desired)
        #expect(IPVSPlanner.destinationsToRead(desired: desired, kernel: kernel.virtualServers, kind: .full).count == 3)

        // A new process's first (full) sync: nothing but the rule set, and no jump rule again.
        let full = p.plan(desired, options: options, kind: .full, kernel: kernel, lastRestore: nil, draining: [])
        #expect(full.operations.isEmpty)
        #expect(full.createSets.isEmpty && full.setChanges.isEmpty)
        #expect(full.bind.isEmpty && full.unbind.isEmpty && full.drains.isEmpty)
        #expect(full.restore == IPVSRestore(rules: desired.restoreText, batch: desired.restoreText))

        // Then a partial one that reads the kernel, with the rule set written: nothing at all.
        let partial = p.plan(desired, options: options, kind: .partial(changed: [web]), kernel: kernel,
                             lastRestore: desired.restoreText, draining: [])
        #expect(partial.writesNothing)

        // And one from memory with no change.
        var image = desired
        let changes = IPVSCompiler(options: options).update(&image, to: state, changed: [])
        #expect(IPVSPlanner.destinationsToRead(update: image, changes: changes).isEmpty)
        let fromMemory = p.plan(update: image, changes: changes, options: options, dummyIndex: dummyIndex, inKernel: [:],
                                lastRestore: desired.restoreText, draining: [])
        #expect(fromMemory.writesNothing)
        #expect(fromMemory.drains.isEmpty)
    }

    @Test func aFullSyncRepairsEveryDriftAndLeavesWhatIsNotItsOwn() throws {
        let state = try Fixtures.state(services(webEndpoints: ["10.244.1.2", "10.244.2.2"]), nodeName: "node-a")
        let p = planner(exclude: [CIDR("10.200.0.0/16")!])
        let (desired, options) = p.desired(state, nodeAddresses: [nodeAddress.address])
        var kernel = kernelHolding(desired)
        let wantVIP = try #require(desired.virtualServers[webVIP])

        // web's ClusterIP: another scheduler, 10.244.1.2 left at weight 0, 10.244.2.2 missing,
        // two extra real servers (one idle, one with connections) and one already draining.
        var changedVS = wantVIP.server
        changedVS.scheduler = "wrr"
        kernel.virtualServers = kernel.virtualServers.map { $0.key == webVIP ? changedVS : $0 }
        let ep1 = wantVIP.destinations[0]
        let ep2 = wantVIP.destinations[1]
        var drained = ep1
        drained.weight = 0
        let idle = RealServer(address: IPAddress("10.244.9.9")!, port: 8080)
        let busy = RealServer(address: IPAddress("10.244.9.8")!, port: 8080, activeConnections: 3)
        let alreadyDraining = RealServer(address: IPAddress("10.244.9.7")!, port: 8080, weight: 0, activeConnections: 1)
        kernel.destinations[webVIP] = [drained, idle, busy, alreadyDraining]
        // Virtual servers that are not desired: this family's (deleted), one in an excluded
        // range and an IPv6 one (kept).
        let stray = VirtualServer(key: VirtualServerKey(address: IPAddress("10.96.0.99")!, proto: .tcp, port: 80), scheduler: "rr")
        let excluded = VirtualServer(key: VirtualServerKey(address: IPAddress("10.200.0.1")!, proto: .tcp, port: 80), scheduler: "rr")
        let v6 = VirtualServer(key: VirtualServerKey(address: IPAddress("fd00::1")!, proto: .tcp, port: 80), scheduler: "rr")
        kernel.virtualServers += [stray, excluded, v6]
        // A set member missing, one extra; a set missing altogether.
        let clusterSet = KubeIPSet.clusterIP
        let members = Set(kernel.sets.first { $0.name == clusterSet }?.entries ?? [])
        let lost = try #require(members.sorted().first)
        let extra = IPSetEntry(ip: IPAddress("10.96.0.99")!, proto: .tcp, port: 80)
        kernel.sets = kernel.sets.map { s in
            guard s.name == clusterSet else { return s }
            var s = s
            s.entries = Array(members.subtracting([lost]).union([extra]))
            return s
        }
        let missingSet = try #require(desired.sets.last)
        kernel.sets.removeAll { $0.name == missingSet.name }
        // kube-ipvs0: one address lost, one extra.
        kernel.addresses.removeAll { $0.address == IPAddress("10.96.0.53")! }
        kernel.addresses.append(InterfaceAddress(index: dummyIndex, address: IPAddress("10.96.0.99")!, prefixLength: 32))

        let draining: Set<IPVSDrainKey> = [IPVSDrainKey(service: webVIP, endpoint: alreadyDraining.endpoint)]
        let plan = p.plan(desired, options: options, kind: .full, kernel: kernel, lastRestore: desired.restoreText, draining: draining)

        var zeroBusy = busy
        zeroBusy.weight = 0
        #expect(plan.operations == [
            .updateService(wantVIP.server),
            .updateDestination(webVIP, ep1),
            .addDestination(webVIP, ep2),
            .updateDestination(webVIP, zeroBusy),
            .deleteDestination(webVIP, idle),
            .deleteService(stray.key),
        ])
        #expect(plan.drains == [.start(webVIP, busy)])
        #expect(plan.createSets.map(\.name) == [missingSet.name])
        let clusterChange = try #require(plan.setChanges.first { $0.set == clusterSet })
        #expect(clusterChange.add == [lost] && clusterChange.delete == [extra])
        if let wantMissing = desired.entries[missingSet.name], !wantMissing.isEmpty {
            #expect(plan.setChanges.first { $0.set == missingSet.name }?.add == wantMissing.sorted())
        }
        #expect(plan.bind == [IPAddress("10.96.0.53")!])
        #expect(plan.unbind == [IPAddress("10.96.0.99")!])
        // A full sync rewrites the rule set even when unchanged.
        #expect(plan.restore?.rules == desired.restoreText)
    }

    @Test func aPartialSyncComparesOnlyTheChangedServices() throws {
        let state = try Fixtures.state(services(webEndpoints: ["10.244.1.2", "10.244.2.2"]), nodeName: "node-a")
        let p = planner()
        let (desired, options) = p.desired(state, nodeAddresses: [nodeAddress.address])
        var kernel = kernelHolding(desired)
        let dnsKey = VirtualServerKey(address: IPAddress("10.96.0.53")!, proto: .udp, port: 53)
        kernel.destinations[dnsKey] = []  // dns lost its real server, but only web changed
        let kind = SyncKind.partial(changed: [web])
        #expect(IPVSPlanner.destinationsToRead(desired: desired, kernel: kernel.virtualServers, kind: kind) == [webNodePort, webVIP].sorted())
        let plan = p.plan(desired, options: options, kind: kind, kernel: kernel, lastRestore: desired.restoreText, draining: [])
        #expect(plan.operations.isEmpty)
        #expect(plan.restore == nil)
    }

    @Test func aPartialSyncFromMemoryDrainsOnlyTCPRealServersWithConnections() throws {
        let before = try Fixtures.state(services(webEndpoints: ["10.244.1.2", "10.244.2.2"]), nodeName: "node-a")
        let after = try Fixtures.state(services(webEndpoints: ["10.244.1.2"]), nodeName: "node-a")
        let p = planner()
        let (desired, options) = p.desired(before, nodeAddresses: [nodeAddress.address])
        var image = desired
        let changes = IPVSCompiler(options: options).update(&image, to: after, changed: [web])
        // Only the TCP virtual servers losing a real server are read.
        #expect(IPVSPlanner.destinationsToRead(update: image, changes: changes) == [webNodePort, webVIP].sorted())
        let gone = RealServer(address: IPAddress("10.244.2.2")!, port: 8080)
        var busy = gone
        busy.activeConnections = 2
        let plan = p.plan(update: image, changes: changes, options: options, dummyIndex: dummyIndex,
                          inKernel: [webVIP: [busy], webNodePort: [gone]], lastRestore: desired.restoreText, draining: [])
        var zero = busy
        zero.weight = 0
        #expect(Set(plan.operations) == [.updateDestination(webVIP, zero), .deleteDestination(webNodePort, gone)])
        #expect(plan.drains == [.start(webVIP, busy)])
        #expect(plan.bind.isEmpty && plan.unbind.isEmpty && plan.createSets.isEmpty)
        #expect(plan.restore == nil)

        // The endpoint comes back while it drains: back to weight 1, and no longer draining.
        var back = image
        let again = IPVSCompiler(options: options).update(&back, to: before, changed: [web])
        let dk = IPVSDrainKey(service: webVIP, endpoint: gone.endpoint)
        let restored = p.plan(update: back, changes: again, options: options, dummyIndex: dummyIndex, inKernel: [:],
                              lastRestore: desired.restoreText, draining: [dk])
        #expect(restored.operations.contains(.updateDestination(webVIP, gone)))
        #expect(restored.operations.contains(.addDestination(webNodePort, gone)))
        #expect(restored.drains == [.stop(dk)])
    }
}
