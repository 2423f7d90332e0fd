// The nftables mode's two failure counters: registered only in that mode, a failed sync
// counts there (not in the iptables restore failures), and the stale-chain deletion failures
// a backend reports with a successful sync are added up. The nftables counters carry no
// ip_family label (one per process); the per-proxier series do.

import SluiceCore
import SluiceServer
import Testing

@Suite struct NFTablesMetricsTests {
    private func attempt(_ report: SyncReport?, full: Bool = false) -> SyncEvent {
        .synced(SyncAttempt(family: .ipv4, kind: full ? .full : .partial(changed: []), duration: .milliseconds(3), report: report,
                            error: report == nil ? SyncErrorRecord(StubSyncError()) : nil))
    }

    @Test func failuresCountInTheNFTablesCounters() {
        let metrics = ProxyMetrics(nodeName: "n", nftables: true)
        var s = Scrape(metrics.render())
        #expect(s.types["kubeproxy_sync_proxy_rules_nftables_sync_failures_total"] == "counter")
        #expect(s.types["kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total"] == "counter")
        #expect(s.help["kubeproxy_sync_proxy_rules_nftables_sync_failures_total"] == "[ALPHA] Cumulative proxy nftables sync failures")
        #expect(s.help["kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total"] == "[ALPHA] Cumulative proxy nftables cleanup failures")

        metrics.record(attempt(nil))
        metrics.record(attempt(nil, full: true))
        var withCleanup = SyncReport(full: true)
        withCleanup.cleanupFailures = 2
        metrics.record(attempt(withCleanup, full: true))
        metrics.record(attempt(SyncReport(full: false)))
        s = Scrape(metrics.render())
        #expect(s.value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total") == 2)
        #expect(s.value("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total") == 2)
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ["ip_family": "IPv4"]) == 0)
        #expect(s.value("kubeproxy_sync_proxy_rules_duration_seconds_count", ["ip_family": "IPv4"]) == 4)
    }

    @Test func otherModesDoNotRegisterThem() {
        let metrics = ProxyMetrics(nodeName: "n", tables: ["filter", "nat"])
        metrics.record(attempt(nil))
        let s = Scrape(metrics.render())
        #expect(s.types["kubeproxy_sync_proxy_rules_nftables_sync_failures_total"] == nil)
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ["ip_family": "IPv4"]) == 1)
    }
}

/// A backend's error in a recorded failed attempt.
struct StubSyncError: Error, CustomStringConvertible {
    var description: String { "failed" }
}
