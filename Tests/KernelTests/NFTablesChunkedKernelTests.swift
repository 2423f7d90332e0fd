// Real-kernel tests, nftables mode with the full sync cut into transactions of one service
// port each (SLUICE_NFT_CHUNK_SERVICES=1): the table sluice builds equals `nft -f` of the
// one-transaction full sync, traffic passes, and a deleted table is rebuilt the same way.

import Foundation
import IPTables
import KernelKit
import SluiceTesting
import Testing

@Suite("Kernel (nftables): chunked full sync", .serialized, .requiresRoot, .timeLimit(.minutes(3)))
struct NFTablesChunkedKernelTests {
    @Test("A cold start cut into one-port transactions: the table equals the one-transaction full sync; ClusterIP, affinity and NodePort traffic pass; a deleted table is rebuilt in chunks")
    func chunkedColdStart() async throws {
        try await TestBed.with(.init(label: "nftchunk")) { bed in
            var web = webService()
            web.type = "NodePort"
            web.ports = [.http(nodePort: 30080), .dns(nodePort: 30053)]
            var sticky = webService(name: "sticky", clusterIP: "10.96.0.11")
            sticky.clientIPAffinitySeconds = 10800
            try bed.writeManifest("svc.yaml", web.yaml + "---\n" + sticky.yaml)
            try bed.writeManifest("local.yaml", localPolicyService())
            let sluice = try bed.startNFTablesSluice(environment: ["SLUICE_NFT_CHUNK_SERVICES": "1"])
            let names = [web.portName("http"), web.portName("dns"), sticky.portName("http"), "kt/local:http"]
            try await bed.waitForNFTablesServices(names)
            // The reference is `sluice compile` without the variable: 4 service ports, one transaction.
            try await expectTableEqualsFullSync(bed, "after the chunked first sync")
            let log = (try? String(contentsOfFile: sluice.logPath, encoding: .utf8)) ?? ""
            #expect(log.contains("full sync sent as"), "the first sync was chunked:\n\(log.suffix(2000))")

            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 20)
            expectAnswered(tcp, count: 20, backends: ["backend-1", "backend-2"], "ClusterIP TCP after a chunked sync", bed)
            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 10)
            expectAnswered(udp, count: 10, "ClusterIP UDP after a chunked sync", bed)
            let pinned = try await bed.request(from: bed.clientNS, .tcp, sticky.clusterTarget("http"), count: 10)
            expectAnswered(pinned, count: 10, "the affinity Service", bed)
            #expect(pinned.backends.count == 1, context("affinity: one backend", pinned, bed))
            let ext = try await bed.request(from: bed.extNS, .tcp, "\(TestNet.nodeIP):30080", count: 10)
            expectAnswered(ext, count: 10, backends: ["backend-1", "backend-2"], "the NodePort from outside", bed)

            // A deleted table: the canary notices, the full sync into the absent table is chunked again.
            try await bed.exec(checked: bed.nodeNS, ["nft", "delete", "table", "ip", "kube-proxy"])
            try await expectTableEqualsFullSync(bed, "after `nft delete table ip kube-proxy`", timeout: .seconds(20))
            let after = (try? String(contentsOfFile: sluice.logPath, encoding: .utf8)) ?? ""
            #expect(after.components(separatedBy: "full sync sent as").count - 1 >= 2, "the rebuild was chunked too")
            let again = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 10)
            expectAnswered(again, count: 10, backends: ["backend-1", "backend-2"], "web after the chunked rebuild", bed)
        }
    }
}
