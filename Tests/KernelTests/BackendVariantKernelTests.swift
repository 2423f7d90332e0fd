// Real-kernel tests, iptables mode: the nft and legacy iptables back ends, each in its own
// namespaces: rules land in the chosen one only, traffic flows, and --cleanup empties it.

import Foundation
import IPTables
import KernelKit
import SluiceTesting
import Testing

@Suite("Kernel (iptables): nft and legacy back ends", .serialized, .requiresRoot, .timeLimit(.minutes(2)))
struct BackendVariantKernelTests {
    @Test("ClusterIP TCP and UDP through each iptables back end", arguments: [IPTablesVariant.nft, .legacy])
    func clusterIPThroughBackend(_ variant: IPTablesVariant) async throws {
        let other: IPTablesVariant = variant == .nft ? .legacy : .nft
        try await TestBed.with(.init(ext: false, label: variant.rawValue)) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startSluice(variant: variant)
            try await bed.waitForServices([web.portName("http"), web.portName("dns")])

            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 30)
            expectAnswered(tcp, count: 30, backends: ["backend-1", "backend-2"], "30 TCP requests (\(variant.rawValue))", bed)
            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 30)
            expectAnswered(udp, count: 30, backends: ["backend-1", "backend-2"], "30 UDP requests (\(variant.rawValue))", bed)

            // The rules are in the chosen back end, and nothing of ours is in the other one.
            // (No -t: list only the tables that exist, without creating any.)
            let mine = try await bed.save(nil, variant: variant)
            #expect(mine.contains(":KUBE-SVC-") && mine.contains("-A KUBE-SERVICES"), "\(TestBed.saveTool(variant)):\n\(mine)")
            #expect(mine.contains(":KUBE-PROXY-CANARY"), "no canary in \(TestBed.saveTool(variant)):\n\(mine)")
            let theirs = try await bed.save(nil, variant: other)
            #expect(!theirs.contains("KUBE-"), "\(TestBed.saveTool(other)) shows our rules:\n\(theirs)")

            let status = await bed.stopSluice()
            #expect(status == 0)
            let cleanup = await bed.runSluice(["--cleanup", "--iptables-backend", variant.rawValue])
            #expect(cleanup.succeeded, "sluice --cleanup --iptables-backend \(variant.rawValue): \(cleanup)")
            let left = try await bed.save(nil, variant: variant)
            #expect(!left.contains("KUBE-"), "after --cleanup, \(TestBed.saveTool(variant)):\n\(left)")
        }
    }
}
