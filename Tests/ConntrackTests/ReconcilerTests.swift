// The reconciler against an in-memory table: when it reads the table at all, what it reads,
// and what it deletes over a service's life.

import Conntrack
#if canImport(Glibc)
import Glibc
#endif
import Logging
import SluiceCore
import Testing

private let logger = Logger(label: "test")

private func reconciler(_ table: FakeTable, limit: Int = 8) -> ConntrackReconciler {
    ConntrackReconciler(configuration: .init(nodePortAddresses: .all, localAddresses: { [ip("192.168.0.2")] },
                                             targetedDumpLimit: limit),
                        logger: logger, table: { table })
}

private let dns = TestPort(service: "dns", clusterIP: "172.30.0.10", nodePort: 30053, endpoints: ["10.0.1.1:5353", "10.0.1.2:5353"])
private let other = TestPort(service: "other", clusterIP: "172.30.0.11", endpoints: ["10.0.2.1:5353"])
private let web = TestPort(service: "web", proto: .tcp, clusterIP: "172.30.0.12", port: 80, endpoints: ["10.0.3.1:80"])

/// Flows of a healthy node: every UDP flow points at a current endpoint.
private let healthy = [
    flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.1:5353", id: 1),
    flow("10.0.9.1:4001", "172.30.0.10:53", replyFrom: "10.0.1.2:5353", id: 2),
    flow("203.0.113.5:4000", "192.168.0.2:30053", replyFrom: "10.0.1.2:5353", id: 3),
    flow("10.0.9.2:4000", "172.30.0.11:53", replyFrom: "10.0.2.1:5353", id: 4),
    flow(.tcp, "10.0.9.3:4000", "172.30.0.12:80", replyFrom: "10.0.3.1:80", id: 5),
]

@Suite struct ReconcilerTests {
    @Test("A restart with unchanged state reads the table once and deletes nothing")
    func restartDeletesNothing() async {
        let table = FakeTable(healthy)
        let r = reconciler(table)
        let report = await r.reconcile(snapshot([dns, other, web]))
        #expect(report.trigger == .initial)
        #expect(report.deleted == 0)
        #expect(report.sweep.judged == 4, "every UDP flow was looked at: \(report)")
        #expect(await table.flows == healthy)
        #expect(await r.metrics.deletedEntriesTotal == 0)
    }

    @Test("Syncs that change no UDP frontend do not read the table")
    func unchangedStateSkipsTheDump() async {
        let table = FakeTable(healthy)
        let r = reconciler(table)
        await r.reconcile(snapshot([dns, other, web]))
        let before = await table.sweeps.count
        var tcpOnly = web
        tcpOnly.endpoints = ["10.0.3.2:80"]
        for state in [snapshot([dns, other, web]), snapshot([dns, other, tcpOnly]), snapshot([other, dns, tcpOnly])] {
            let report = await r.reconcile(state)
            #expect(report.trigger == .skipped)
        }
        #expect(await table.sweeps.count == before)
        #expect(await r.metrics.skippedTotal == 3)
    }

    @Test("A replaced endpoint: its flows go, on every frontend of the service, and nothing else")
    func replacedEndpoint() async {
        let table = FakeTable(healthy)
        let r = reconciler(table)
        await r.reconcile(snapshot([dns, other, web]))
        var next = dns
        next.endpoints = ["10.0.1.1:5353", "10.0.1.3:5353"]
        let report = await r.reconcile(snapshot([next, other, web]))
        #expect(report.trigger == .changed)
        #expect(report.frontends == 2)
        #expect(report.deleted == 2, "\(report)")
        #expect(await table.flows.map(\.id) == [1, 4, 5])
        // Only the changed frontends were read, each with a filter of its own.
        let sweeps = await table.sweeps.suffix(2).map(\.description)
        #expect(sweeps == ["ipv4 udp dst 172.30.0.10 dport 53", "ipv4 udp dport 30053"])
        #expect(await r.metrics.deletedEntriesTotal == 2)
    }

    @Test("Scaled to zero, every translated flow goes; scaled back up, untranslated ones go too")
    func scaleToZeroAndBack() async {
        let table = FakeTable(healthy)
        let r = reconciler(table)
        await r.reconcile(snapshot([dns, other]))
        var zero = dns
        zero.endpoints = []
        var report = await r.reconcile(snapshot([zero, other]))
        #expect(report.deleted == 3, "\(report)")
        // While nothing serves, an untranslated flow is left alone (deleting it changes nothing).
        await table.add([flow("10.0.9.1:4100", "172.30.0.10:53", replyFrom: "172.30.0.10:53", id: 10)])
        var up = dns
        up.endpoints = ["10.0.1.7:5353"]
        report = await r.reconcile(snapshot([up, other]))
        #expect(report.sweep.deleted[.neverTranslated] == 1, "\(report)")
        #expect(await table.flows.map(\.id) == [4, 5], "the other service's flow and the TCP flow stay")
    }

    @Test("A deleted service loses its flows")
    func deletedService() async {
        let table = FakeTable(healthy)
        let r = reconciler(table)
        await r.reconcile(snapshot([dns, other, web]))
        let report = await r.reconcile(snapshot([other, web]))
        #expect(report.deleted == 3)
        #expect(await table.flows.map(\.id) == [4, 5])
    }

    @Test("Flows created before the proxy started are judged at the first reconcile")
    func neverTranslatedBeforeStart() async {
        let table = FakeTable(healthy + [flow("10.0.9.1:4100", "172.30.0.10:53", replyFrom: "172.30.0.10:53", id: 10)])
        let r = reconciler(table)
        let report = await r.reconcile(snapshot([dns, other, web]))
        #expect(report.sweep.deleted == [.neverTranslated: 1])
        #expect(await table.flows == healthy)
    }

    @Test("Many changed frontends: one dump per protocol")
    func manyFrontendsOneDump() async {
        let table = FakeTable(healthy)
        let r = reconciler(table, limit: 1)
        let report = await r.reconcile(snapshot([dns, other, web]))
        #expect(report.dumps == 1)
        #expect(await table.sweeps.map(\.description) == ["ipv4 udp"])
    }

    @Test("A kernel that ignores filters is read once for the whole family, then always so")
    func kernelWithoutFilters() async {
        let table = FakeTable(healthy, ignoresFilters: true)
        let r = reconciler(table)
        var report = await r.reconcile(snapshot([dns, other, web]))
        #expect(!report.kernelFiltered)
        #expect(report.deleted == 0)
        #expect(report.dumps == 2, "the first filtered dump showed it, one family-wide read covered the rest: \(report)")
        var next = dns
        next.endpoints = ["10.0.1.1:5353"]
        report = await r.reconcile(snapshot([next, other, web]))
        #expect(report.dumps == 1)
        #expect(!report.kernelFiltered)
        #expect(report.deleted == 2)
        #expect(await table.sweeps.last == DumpFilter(family: .ipv4))
        #expect(await table.flows.map(\.id) == [1, 4, 5])
    }

    @Test("A failed reconcile is retried in full at the next sync, even without changes")
    func failureForcesAFullRetry() async {
        let table = FakeTable(healthy)
        let r = reconciler(table)
        await r.reconcile(snapshot([dns, other]))
        await table.setFailDeletes(EPERM)
        var next = dns
        next.endpoints = ["10.0.1.1:5353"]
        var report = await r.reconcile(snapshot([next, other]))
        #expect(report.errors == 2)
        await table.setFailDeletes(nil)
        report = await r.reconcile(snapshot([next, other]))
        #expect(report.trigger == .forced)
        #expect(report.deleted == 2)
        #expect(await r.metrics.errorsTotal == 2)
        #expect(await r.reconcile(snapshot([next, other])).trigger == .skipped)
    }

    @Test("The table cannot be opened: an error, and a retry at the next sync")
    func openFailure() async {
        let r = ConntrackReconciler(logger: logger, table: { throw ConntrackError(.open, errno: EPERM, context: "test") })
        let report = await r.reconcile(snapshot([dns]))
        #expect(report.setupError?.errno == EPERM)
        #expect(report.errors == 1)
        #expect(await r.reconcile(snapshot([dns])).trigger == .forced)
    }

    @Test("No UDP or SCTP service: the table is never opened")
    func noUDPNoTable() async {
        let r = ConntrackReconciler(logger: logger, table: {
            Issue.record("opened")
            return FakeTable()
        })
        #expect(await r.reconcile(snapshot([web])).trigger == .skipped)
    }

    @Test("One reconciler serves both families' runners, each with its own baseline")
    func bothFamilies() async {
        let v6 = TestPort(service: "dns6", clusterIP: "fd00:30::10", endpoints: ["[fd00:1::1]:5353"])
        let table = FakeTable(healthy + [flow("[fd00:9::1]:4000", "[fd00:30::10]:53", replyFrom: "[fd00:1::1]:5353", id: 60)])
        let r = reconciler(table)
        #expect(await r.reconcile(snapshot([dns, other])).trigger == .initial)
        #expect(await r.reconcile(snapshot([v6], family: .ipv6)).trigger == .initial)
        #expect(await r.reconcile(snapshot([dns, other])).trigger == .skipped)
        #expect(await r.reconcile(snapshot([v6], family: .ipv6)).trigger == .skipped)
        var gone = v6
        gone.endpoints = ["[fd00:1::2]:5353"]
        let report = await r.reconcile(snapshot([gone], family: .ipv6))
        #expect(report.deleted == 1 && report.trigger == .changed)
        #expect(await table.flows.count == healthy.count)
    }

    @Test func invalidateRechecksEverything() async {
        let table = FakeTable(healthy)
        let r = reconciler(table)
        await r.reconcile(snapshot([dns, other]))
        await r.invalidate()
        let report = await r.reconcile(snapshot([dns, other]))
        #expect(report.trigger == .forced)
        #expect(report.frontends == 3)
    }

    @Test func metricsFollowKubeProxyNames() async {
        #expect(ConntrackMetrics.deletedEntriesName == "kubeproxy_conntrack_reconciler_deleted_entries_total")
        #expect(ConntrackMetrics.syncDurationName == "kubeproxy_conntrack_reconciler_sync_duration_seconds")
        #expect(ConntrackMetrics.durationBuckets.first == 0.001 && ConntrackMetrics.durationBuckets.count == 15)
        let table = FakeTable(healthy)
        let r = reconciler(table)
        await r.reconcile(snapshot([dns]))
        let m = await r.metrics
        #expect(m.reconcilesTotal == 1 && m.durationCount == 1 && m.durationBucketCounts.last == 1)
    }
}
