// docs/operations-health-metrics.md against the code: the metrics table lists exactly the
// metrics the code registers, with their types, and the flag defaults are the code's.

import Foundation
import Logging
import SluiceCore
import SluiceServer
import SluiceTesting
import Testing

@Suite struct OperationsDocumentTests {
    private func document() throws -> String {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../docs/operations-health-metrics.md").standardized.path
        return try String(contentsOfFile: path, encoding: .utf8)
    }

    /// `| `name` | type | ...` rows of the metrics table.
    private func documentedMetrics(_ doc: String) -> [String: String] {
        var out: [String: String] = [:]
        for line in doc.split(separator: "\n") where line.hasPrefix("| `kubeproxy_") {
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            guard cells.count >= 2 else { continue }
            out[cells[0].trimmingCharacters(in: CharacterSet(charactersIn: "`"))] = cells[1]
        }
        return out
    }

    @Test func theMetricsTableMatchesWhatTheCodeRegisters() async throws {
        // Every family the code can export: a sync, a failure, and one probe of each kind.
        let metrics = ProxyMetrics(nodeName: "n", tables: ["filter", "nat"])
        metrics.record(.synced(SyncAttempt(family: .ipv4, kind: .full, duration: .milliseconds(1), report: SyncReport(full: true))))
        await metrics.didSync(state: ProxyState(), previous: nil, report: SyncReport(full: true))
        metrics.countHealthz(code: 200)
        metrics.countLivez(code: 200)
        // The nfacct counters exist where nfacct does.
        for m in ProxyMetrics.NFAcctMetric.allCases { metrics.addNFAcctPackets(m, 1) }
        let all = Scrape(metrics.render()).types
        let registered = all.filter { $0.key.hasPrefix("kubeproxy_") }
        // The process collector's metrics are named in the text below the table.
        let doc = try document()
        for name in all.keys where !name.hasPrefix("kubeproxy_") {
            #expect(name.hasPrefix("process_") && doc.contains("`\(name)`"), "\(name) is not documented")
        }

        let documented = documentedMetrics(try document())
        #expect(documented.count == 21)
        #expect(documented == registered)
        for name in Set(registered.keys).subtracting(documented.keys) { Issue.record("\(name) is not documented") }
        for name in Set(documented.keys).subtracting(registered.keys) { Issue.record("\(name) is documented but not exported") }
    }

    @Test func theFlagDefaultsAreTheCodes() throws {
        let doc = try document()
        #expect(doc.contains("| `--healthz-bind-address` | `\(HealthServer.defaultAddress)` |"))
        #expect(doc.contains("| `--metrics-bind-address` | `\(MetricsServer.defaultAddress)` |"))
        #expect(doc.contains("`ToBeDeletedByClusterAutoscaler`") && ProxyHealth.toBeDeletedTaint == "ToBeDeletedByClusterAutoscaler")
        #expect(doc.contains("most \(ChangeTracker.maximumTriggerTimesPerService) times per Service"))
    }
}
