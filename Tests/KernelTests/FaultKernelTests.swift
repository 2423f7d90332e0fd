// Faults against the real process in network namespaces: a flush of the nat rules (the
// canary chains survive it).

import Foundation
import IPTables
import SluiceTesting
import Testing

@Suite(.serialized, .requiresRoot) struct FaultKernelTests {
    @Test("A flush of the nat rules alone (chains kept) is repaired by the canary check")
    func natRuleFlushIsRepaired() async throws {
        try await TestBed.with(.init(label: "nf")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            // A long sync period: only the canary check can repair the flush in time.
            let sluice = try bed.startSluice(syncPeriod: "10m")
            try await bed.waitForServices([web.portName(), web.portName("dns")])
            expectAnswered(try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 5), count: 5, "before the flush", bed)

            sluice.send(SIGSTOP)
            var resumed = false
            defer { if !resumed { sluice.send(SIGCONT) } }
            let r = await bed.iptables(["-w", "5", "-t", "nat", "-F"])
            try #require(r.succeeded, "\(r)")
            // The flush kept every chain, the canary included: only its rules are gone.
            let canary = await bed.iptables(["-w", "5", "-t", "nat", "-S", "KUBE-PROXY-CANARY"])
            #expect(canary.succeeded, "the nat canary chain should survive a rule flush")
            let broken = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 1, timeout: 1)
            #expect(broken.answered == 0, context("the ClusterIP must be broken by the flush", broken, bed))

            sluice.send(SIGCONT)
            resumed = true
            // The canary period is 5 s; the bound only keeps a broken build from hanging.
            let took = try await bed.waitUntilAnswered(from: bed.clientNS, .tcp, web.clusterTarget(), within: .seconds(20))
            #expect(took != nil, "the ClusterIP did not answer again after the nat flush\n\(bed.sluice?.logTail() ?? "")")
            if let took { print("nat rule flush repaired after \(took)") }
            #expect(bed.sluiceLog.contains("jump rule PREROUTING -> KUBE-SERVICES missing from the nat table"))
            let nat = try await bed.save(.nat)
            #expect(nat.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"), "\(nat)")
            expectAnswered(try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 10), count: 10, "after the repair", bed)
        }
    }
}
