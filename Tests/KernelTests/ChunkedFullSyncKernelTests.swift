// Real-kernel test, iptables mode: a full sync cut into many small batches (as the nft back
// end does at scale), on top of foreign rules and of the rules a previous sluice left behind.
// Traffic is served, the foreign chain and rules keep their content and their positions, and
// the chains of the Services that went away are deleted.

import Foundation
import IPTables
import KernelKit
import SluiceTesting
import Testing

@Suite("Kernel (iptables): chunked full sync", .serialized, .requiresRoot, .timeLimit(.minutes(2)))
struct ChunkedFullSyncKernelTests {
    /// Filler Services `range` (two ports, the usual two backends each: six chains).
    private func fillers(_ range: Range<Int>) -> String {
        range.map { webService(name: "filler-\($0)", clusterIP: "10.96.1.\($0 + 1)").yaml }.joined(separator: "\n---\n")
    }

    @Test("A restart's full sync in batches of 3 chains keeps foreign rules in place and serves traffic",
          arguments: [IPTablesVariant.nft, .legacy])
    func chunkedRestartKeepsForeignRules(_ variant: IPTablesVariant) async throws {
        try await TestBed.with(.init(ext: false, label: "chunk-\(variant.rawValue)")) { bed in
            // Foreign rules in nat PREROUTING around where our jump goes, and a foreign chain.
            for args in [["-t", "nat", "-N", "FOREIGN-PRE"],
                         ["-t", "nat", "-A", "FOREIGN-PRE", "-p", "tcp", "--dport", "9999", "-j", "RETURN"],
                         ["-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", "foreign-last", "-j", "FOREIGN-PRE"]] {
                let r = await bed.iptables(args, variant: variant)
                #expect(r.succeeded, "\(args): \(r)")
            }
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.writeManifest("fillers.yaml", fillers(0..<20))
            try bed.startSluice(variant: variant)
            try await bed.waitForServices([web.portName("http"), "kt/filler-19:http"])
            // One more foreign rule, in front of our jump.
            let first = await bed.iptables(["-t", "nat", "-I", "PREROUTING", "1", "-m", "comment", "--comment", "foreign-first",
                                             "-j", "FOREIGN-PRE"], variant: variant)
            #expect(first.succeeded, "\(first)")
            #expect(await bed.stopSluice() == 0)
            let prerouting = await bed.iptables(["-t", "nat", "-S", "PREROUTING"], variant: variant).stdout
            let foreign = await bed.iptables(["-t", "nat", "-S", "FOREIGN-PRE"], variant: variant).stdout
            #expect(prerouting.contains("foreign-first") && prerouting.contains("KUBE-SERVICES"), "\(prerouting)")
            let before = try await bed.save(.nat, variant: variant)
            let goneChain = try #require(jumpTarget(in: before, chain: "KUBE-SERVICES", comment: "kt/filler-3:http cluster IP"))

            // The next sluice sees 10 fillers fewer and 10 new ones, and syncs in batches of 3 chains.
            try bed.writeManifest("fillers.yaml", fillers(10..<30))
            let second = try bed.startBackground(in: bed.nodeNS, name: "sluice-chunked",
                                                 ["env", "SLUICE_IPTABLES_BATCH_CHAINS=3", bed.sluiceBinary]
                                                     + bed.sluiceArguments(variant: variant))
            defer { if second.isRunning { second.send(SIGTERM) } }
            // Until its first sync is logged as done (TestBed.waitForRules watches the sluice it
            // started, which has exited; and the rules alone do not tell when the last batch is in).
            let deadline = ContinuousClock.now + .seconds(30)
            while ContinuousClock.now < deadline && second.isRunning && !second.log().contains("full sync: ") {
                try await Task.sleep(for: .milliseconds(100))
            }
            let after = try await bed.save(.nat, variant: variant)
            #expect(after.contains("--comment \"kt/filler-29:http cluster IP\"") && !after.contains(":\(goneChain) "),
                    "\(second.logTail(20))\n\(after)")
            #expect(second.log().contains("full sync batches of 3 chains"), "\(second.logTail(20))")

            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 20)
            expectAnswered(tcp, count: 20, backends: ["backend-1", "backend-2"], "20 TCP requests (\(variant.rawValue))", bed)
            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 20)
            expectAnswered(udp, count: 20, backends: ["backend-1", "backend-2"], "20 UDP requests (\(variant.rawValue))", bed)
            let filler = try await bed.request(from: bed.clientNS, .tcp, "10.96.1.30:80", count: 5)
            expectAnswered(filler, count: 5, "5 TCP requests to filler-29 (\(variant.rawValue))", bed)

            // The foreign rules are where they were, in the same order around our jump.
            #expect(await bed.iptables(["-t", "nat", "-S", "PREROUTING"], variant: variant).stdout == prerouting)
            #expect(await bed.iptables(["-t", "nat", "-S", "FOREIGN-PRE"], variant: variant).stdout == foreign)
            // No chain of a Service that went away is left; the NodePort jump is last in KUBE-SERVICES.
            let services = after.split(separator: "\n").filter { $0.hasPrefix("-A KUBE-SERVICES ") }
            #expect(services.count == 2 * 21 + 1, "\(services.count) KUBE-SERVICES rules")
            #expect(services.last?.contains("-j KUBE-NODEPORTS") == true)
            let svcChains = after.split(separator: "\n").filter { $0.hasPrefix(":KUBE-SVC-") }
            #expect(svcChains.count == 2 * 21, "\(svcChains.count) KUBE-SVC chains")
            #expect(!after.contains("kt/filler-3:"))

            // One Service more, then one fewer: partial syncs that edit KUBE-SERVICES in place
            // (-I at its head, -D), through the real restore tool.
            let added = webService(name: "filler-30", clusterIP: "10.96.1.31")
            try bed.writeManifest("added.yaml", added.yaml)
            var edited = ""
            let addDeadline = ContinuousClock.now + .seconds(20)
            while ContinuousClock.now < addDeadline {
                edited = try await bed.save(.nat, variant: variant)
                if edited.contains("--comment \"kt/filler-30:dns cluster IP\"") && edited.contains("--comment \"kt/filler-30:http cluster IP\"") { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            let rules = edited.split(separator: "\n").filter { $0.hasPrefix("-A KUBE-SERVICES ") }.map(String.init)
            #expect(rules.count == services.count + 2)
            #expect(rules.last?.contains("-j KUBE-NODEPORTS") == true, "\(rules.suffix(4))")
            // The new rules head the chain (their order among the per-service rules carries no
            // meaning: docs/iptables-sync.md); the others are as they were, the NodePort jump last.
            #expect(rules.prefix(2).allSatisfy { $0.contains("--comment \"kt/filler-30:") }, "\(rules.prefix(4))")
            #expect(Array(rules.dropFirst(2)) == services.map(String.init))
            let toAdded = try await bed.request(from: bed.clientNS, .tcp, added.clusterTarget("http"), count: 5)
            expectAnswered(toAdded, count: 5, "5 TCP requests to the added filler-30 (\(variant.rawValue))", bed)
            try bed.removeManifest("added.yaml")
            var removed = ""
            let removeDeadline = ContinuousClock.now + .seconds(20)
            while ContinuousClock.now < removeDeadline {
                removed = try await bed.save(.nat, variant: variant)
                if !removed.contains("kt/filler-30:") { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            let left: [String] = removed.split(separator: "\n").filter { $0.hasPrefix("-A KUBE-SERVICES ") }.map(String.init)
            let servicesBefore: [String] = services.map(String.init)
            #expect(left == servicesBefore)

            // A third sluice writes its full sync as one batch compiled in pieces of 3 chains (the
            // legacy back end's form at scale), onto the second one's rules, 5 fillers fewer.
            second.send(SIGTERM)
            #expect(await second.waitForExit(timeout: .seconds(10)) == 0)
            try bed.writeManifest("fillers.yaml", fillers(15..<30))
            let third = try bed.startBackground(in: bed.nodeNS, name: "sluice-pieces",
                                                ["env", "SLUICE_IPTABLES_BATCH_CHAINS=0", "SLUICE_IPTABLES_PIECE_CHAINS=3",
                                                 bed.sluiceBinary] + bed.sluiceArguments(variant: variant))
            defer { third.send(SIGTERM) }
            let thirdDeadline = ContinuousClock.now + .seconds(30)
            while ContinuousClock.now < thirdDeadline && third.isRunning && !third.log().contains("full sync: ") {
                try await Task.sleep(for: .milliseconds(100))
            }
            let last = try await bed.save(.nat, variant: variant)
            #expect(third.log().contains("full sync batches of 0 chains"), "\(third.logTail(20))")
            let lastServices = last.split(separator: "\n").filter { $0.hasPrefix("-A KUBE-SERVICES ") }
            #expect(lastServices.count == 2 * 16 + 1, "\(lastServices.count) KUBE-SERVICES rules")
            #expect(last.split(separator: "\n").filter { $0.hasPrefix(":KUBE-SVC-") }.count == 2 * 16)
            #expect(!last.contains("kt/filler-14:"))
            let again = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 10)
            expectAnswered(again, count: 10, backends: ["backend-1", "backend-2"], "10 TCP requests after the third start (\(variant.rawValue))", bed)
            #expect(await bed.iptables(["-t", "nat", "-S", "PREROUTING"], variant: variant).stdout == prerouting)
            #expect(await bed.iptables(["-t", "nat", "-S", "FOREIGN-PRE"], variant: variant).stdout == foreign)
        }
    }
}
