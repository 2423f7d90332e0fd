// The iptables planner is the pure half of a sync: what the backend applies, `sluice compile`
// prints and `sluice-bench-compile` times, without a kernel.

@testable import IPTables
import SluiceCore
import SluiceTesting
import Testing

@Suite struct IPTablesPlannerTests {
    private func state(_ docs: [String], into tracker: inout ChangeTracker) throws -> ProxyState {
        for e in try ManifestEvents.events(docs.joined(separator: "\n---\n")) { tracker.apply(e) }
        return tracker.snapshot(.ipv4)
    }

    @Test func aPartialPlanWithoutMemoryIsFullAndEqualsTheCompile() throws {
        var tracker = ChangeTracker(nodeName: "test-node")
        let s = try state([serviceYAML("ns1", "a", ip: "172.30.0.1"), sliceYAML("ns1", "a", endpoints: "[{addresses: [10.180.0.1]}]")],
                          into: &tracker)
        let planner = IPTablesPlanner(options: Fixtures.kubeProxyTestOptions, batching: .classic)
        var memory = IPTablesSyncMemory()
        let plan = planner.plan(s, kind: .partial(of: s), existingChains: [], memory: &memory)
        #expect(plan.kind == .full)
        #expect(plan.restoreCount == 1)
        #expect(plan.restore(at: 0).text == IPTablesCompiler(options: Fixtures.kubeProxyTestOptions).compile(s).restoreText)
        #expect(memory.compile.isValid)
    }

    @Test func anUnchangedPartialPlanWritesNothing() throws {
        var tracker = ChangeTracker(nodeName: "test-node")
        let s = try state([serviceYAML("ns1", "a", ip: "172.30.0.1"), sliceYAML("ns1", "a", endpoints: "[{addresses: [10.180.0.1]}]")],
                          into: &tracker)
        let planner = IPTablesPlanner(options: Fixtures.kubeProxyTestOptions, batching: .classic)
        var memory = IPTablesSyncMemory()
        let full = planner.plan(s, kind: .full, existingChains: [], memory: &memory)
        memory.appliedTopLevel = full.topLevelAfter
        let again = tracker.snapshot(.ipv4)
        #expect(again.changedServices.isEmpty)
        let partial = planner.plan(again, kind: .partial(of: again), existingChains: [], memory: &memory)
        #expect(partial.kind == .partial(changed: []))
        #expect(partial.restore(at: 0).text.isEmpty)
        #expect(!partial.omittedTopLevel.isEmpty)
        #expect(partial.report(bytes: 0).full == false)
    }
}
