// Real-kernel tests, iptables mode: what happens to the rules over sluice's life: a Service
// deleted, bad input, an external flush, SIGTERM, and `sluice --cleanup`.

import Foundation
import IPTables
import KernelKit
import SluiceTesting
import Testing

@Suite("Kernel (iptables): rule lifecycle", .serialized, .requiresRoot, .timeLimit(.minutes(2)))
struct LifecycleKernelTests {
    @Test("Deleting a Service's manifest removes its chains, and its ClusterIP stops answering")
    func deletingManifestRemovesRules() async throws {
        try await TestBed.with(.init(label: "del")) { bed in
            let keep = webService()
            let gone = webService(name: "gone", clusterIP: "10.96.0.15")
            try bed.writeManifest("keep.yaml", keep.yaml)
            try bed.writeManifest("gone.yaml", gone.yaml)
            try bed.startSluice()
            let nat = try await bed.waitForServices([keep.portName(), gone.portName("http"), gone.portName("dns")])

            // The chains of the deleted service, read from the kernel.
            var doomed: [String] = []
            for port in ["http", "dns"] {
                let svc = try #require(jumpTarget(in: nat, chain: "KUBE-SERVICES", comment: "\(gone.portName(port)) cluster IP"),
                                       "no cluster IP rule for \(gone.portName(port)):\n\(nat)")
                #expect(svc.hasPrefix("KUBE-SVC-"))
                doomed.append(svc)
                let seps = nat.split(separator: "\n").filter { $0.hasPrefix("-A \(svc) ") }.compactMap { line -> String? in
                    let w = line.split(separator: " ")
                    return w.firstIndex(of: "-j").map { String(w[$0 + 1]) }
                }.filter { $0.hasPrefix("KUBE-SEP-") }
                #expect(seps.count == 2, "endpoint chains of \(svc):\n\(nat)")
                doomed += seps
            }
            let before = try await bed.request(from: bed.clientNS, .tcp, gone.clusterTarget(), count: 5)
            expectAnswered(before, count: 5, "the service before its manifest is deleted", bed)

            try bed.removeManifest("gone.yaml")
            let after = try await bed.waitForRules(.nat, "removal of \(gone.portName())'s chains") { text in
                !text.contains("kt/gone") && !doomed.contains { text.contains($0) }
            }
            #expect(after.contains("--comment \"\(keep.portName()) cluster IP\""), "the other service's rules must stay:\n\(after)")
            let filter = try await bed.save(.filter)
            #expect(!filter.contains("kt/gone"), "filter table still mentions the deleted service:\n\(filter)")

            let dead = try await bed.request(from: bed.clientNS, .tcp, gone.clusterTarget(), count: 2, timeout: 1)
            #expect(dead.answered == 0, context("the deleted service's ClusterIP must no longer answer", dead, bed))
            let alive = try await bed.request(from: bed.clientNS, .tcp, keep.clusterTarget(), count: 10)
            expectAnswered(alive, count: 10, "the remaining service after the deletion", bed)
        }
    }

    @Test("Endpoint changes reach the kernel: a removed endpoint gets no more traffic, a re-added one does")
    func endpointChangesAreApplied() async throws {
        try await TestBed.with(.init(ext: false, label: "ep")) { bed in
            var web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startSluice()
            try await bed.waitForServices([web.portName(), web.portName("dns")])
            let both = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 20)
            expectAnswered(both, count: 20, backends: ["backend-1", "backend-2"], "before the change", bed)

            web.endpoints = [1]
            try bed.writeManifest("web.yaml", web.yaml)
            try await bed.waitForRules(.nat, "backend-2 gone from \(web.portName())") { !$0.contains(TestNet.backendIP(2)) }
            let one = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 20)
            expectAnswered(one, count: 20, backends: ["backend-1"], "TCP after removing backend-2", bed)
            let oneUDP = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 10)
            expectAnswered(oneUDP, count: 10, backends: ["backend-1"], "UDP after removing backend-2", bed)

            web.endpoints = [1, 2]
            try bed.writeManifest("web.yaml", web.yaml)
            try await bed.waitForRules(.nat, "backend-2 back in \(web.portName())") {
                $0.contains("--comment \"\(web.portName()) -> \(TestNet.backendIP(2)):\(TestNet.backendTCPPort)\"")
            }
            let again = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 30)
            expectAnswered(again, count: 30, backends: ["backend-1", "backend-2"], "after re-adding backend-2", bed)
        }
    }

    @Test("Endpoint change among 200 Services: a small partial sync, traffic follows the new endpoint, the others keep working")
    func endpointChangeAtModerateScale() async throws {
        try await TestBed.with(.init(ext: false, label: "ep200")) { bed in
            var many: [TestService] = []
            for i in 0..<199 { many.append(webService(name: "s\(i)", clusterIP: "10.96.\(1 + i / 200).\(1 + i % 200)")) }
            var moving = webService(name: "moving", clusterIP: "10.96.3.1")
            try bed.writeManifest("many.yaml", many.map(\.yaml).joined(separator: "---\n"))
            try bed.writeManifest("moving.yaml", moving.yaml)
            try bed.startSluice()
            let first = try await bed.waitForServices([moving.portName(), many[0].portName(), many[198].portName("dns")], timeout: .seconds(30))
            let clusterIPRules = first.split(separator: "\n").filter { $0.hasPrefix("-A KUBE-SERVICES ") && $0.contains(" cluster IP\"") }
            #expect(clusterIPRules.count == 400)

            for (endpoints, backend) in [([2], "backend-2"), ([1], "backend-1")] {
                let syncsBefore = bed.sluiceLog.components(separatedBy: "partial sync:").count
                moving.endpoints = endpoints
                try bed.writeManifest("moving.yaml", moving.yaml)
                let other = endpoints == [1] ? 2 : 1
                let nat = try await bed.waitForRules(.nat, "\(moving.portName()) only on \(backend)") {
                    !$0.contains("--comment \"\(moving.portName()) -> \(TestNet.backendIP(other)):")
                        && $0.contains("--comment \"\(moving.portName()) -> \(TestNet.backendIP(endpoints[0])):")
                }
                // KUBE-SERVICES was not rewritten, and still holds every Service.
                #expect(nat.split(separator: "\n").filter { $0.hasPrefix("-A KUBE-SERVICES ") && $0.contains(" cluster IP\"") }.count == 400)
                let log = bed.sluiceLog
                #expect(log.components(separatedBy: "partial sync:").count > syncsBefore, "no partial sync logged:\n\(log)")
                let last = log.split(separator: "\n").last { $0.contains("partial sync:") }.map(String.init) ?? ""
                let bytes = last.split(separator: " ").firstIndex(of: "bytes").flatMap { i in Int(last.split(separator: " ")[i - 1]) }
                #expect(bytes.map { $0 < 6000 } == true, "a one-Service change must not rewrite the top-level chains: \(last)")

                let moved = try await bed.request(from: bed.clientNS, .tcp, moving.clusterTarget(), count: 15)
                expectAnswered(moved, count: 15, backends: [backend], "TCP to the changed service", bed)
                let movedUDP = try await bed.request(from: bed.clientNS, .udp, moving.clusterTarget("dns"), count: 6)
                expectAnswered(movedUDP, count: 6, backends: [backend], "UDP to the changed service", bed)
                for svc in [many[0], many[120], many[198]] {
                    let r = try await bed.request(from: bed.clientNS, .tcp, svc.clusterTarget(), count: 20)
                    expectAnswered(r, count: 20, backends: ["backend-1", "backend-2"], "TCP to unchanged \(svc.name)", bed)
                }
            }
        }
    }

    @Test("Bad input: the good Services work, each bad one is logged by name and gets no rule")
    func badInputIsRejected() async throws {
        try await TestBed.with(.init(label: "bad")) { bed in
            let good = webService()
            let good2 = webService(name: "good2", clusterIP: "10.96.0.16")
            try bed.writeManifest("good.yaml", good.yaml)

            // Three broken Services (each with a slice pointing at real backends), and a good
            // one in the same file: one bad document must not spoil its neighbours.
            func bad(_ name: String, clusterIP: String, port: Int) -> String {
                var s = TestService(name: name, clusterIP: clusterIP)
                s.ports = [TestServicePort(name: "http", proto: "TCP", port: port, targetPort: TestNet.backendTCPPort)]
                return s.yaml
            }
            // A name with a quote and a newline (YAML double-quoted escapes), slice included.
            let evil = #"""
            apiVersion: v1
            kind: Service
            metadata:
              name: "evil\"svc\nx-injected"
              namespace: kt
            spec:
              clusterIP: 10.96.0.42
              ports:
                - name: http
                  protocol: TCP
                  port: 80
                  targetPort: 8080
            ---
            apiVersion: discovery.k8s.io/v1
            kind: EndpointSlice
            metadata:
              name: evil-kt001
              namespace: kt
              labels:
                kubernetes.io/service-name: "evil\"svc\nx-injected"
            addressType: IPv4
            ports:
              - name: http
                port: 8080
                protocol: TCP
            endpoints:
              - addresses:
                  - 10.244.2.10
                conditions:
                  ready: true
                nodeName: kt-node

            """#
            let badDocs = [
                bad("bad-ip", clusterIP: "10.96.0.300", port: 80),
                bad("bad-port", clusterIP: "10.96.0.41", port: 70000),
                evil,
                good2.yaml,
            ]
            try bed.writeManifest("mixed.yaml", badDocs.joined(separator: "---\n"))
            try bed.startSluice()
            try await bed.waitForServices([good.portName(), good2.portName()])

            // A log line names each bad Service (on one line: the newline must be escaped).
            let deadline = ContinuousClock.now + .seconds(10)
            var log = ""
            func logged(_ needles: [String]) -> Bool {
                log.split(separator: "\n").contains { line in needles.allSatisfy { line.contains($0) } }
            }
            let expected = [["bad-ip", "10.96.0.300"], ["bad-port", "70000"], ["evil", "x-injected"]]
            repeat {
                log = bed.sluiceLog
                if expected.allSatisfy(logged) { break }
                try await Task.sleep(for: .milliseconds(100))
            } while ContinuousClock.now < deadline
            for needles in expected {
                #expect(logged(needles), "no log line with \(needles):\n\(log)")
            }

            let r = try await bed.request(from: bed.clientNS, .tcp, good.clusterTarget(), count: 10)
            expectAnswered(r, count: 10, backends: ["backend-1", "backend-2"], "the good service next to bad ones", bed)
            let r2 = try await bed.request(from: bed.clientNS, .tcp, good2.clusterTarget(), count: 10)
            expectAnswered(r2, count: 10, "the good service in the same file as the bad ones", bed)

            let rules = try await bed.save(.nat) + bed.save(.filter)
            for needle in ["bad-ip", "bad-port", "evil", "x-injected", "10.96.0.300", "10.96.0.41", "10.96.0.42", "70000"] {
                #expect(!rules.contains(needle), "a rule mentions \(needle):\n\(rules)")
            }
            #expect(bed.sluice?.isRunning == true, "sluice must keep running on bad input")
        }
    }

    @Test("An external flush of the nat table and the canaries is repaired within ~10 s")
    func externalFlushIsRepaired() async throws {
        try await TestBed.with(.init(label: "fl")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            // A long sync period: only the canary monitor can repair the flush in time.
            let sluice = try bed.startSluice(syncPeriod: "10m")
            try await bed.waitForServices([web.portName(), web.portName("dns")])
            let first = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 5)
            expectAnswered(first, count: 5, "before the flush", bed)

            // Freeze sluice while we vandalise, so we can check the damage before it repairs it.
            sluice.send(SIGSTOP)
            var resumed = false
            defer { if !resumed { sluice.send(SIGCONT) } }
            let flush: [[String]] = [["-t", "nat", "-F"]] + ["nat", "filter", "mangle"].flatMap { table in
                [["-t", table, "-F", "KUBE-PROXY-CANARY"], ["-t", table, "-X", "KUBE-PROXY-CANARY"]]
            }
            for args in flush {
                let r = await bed.iptables(["-w", "5"] + args)
                try #require(r.succeeded, "\(r)")
            }
            let flushed = try await bed.save(.nat)
            #expect(!flushed.contains("-A KUBE-"), "nat still has KUBE- rules after the flush:\n\(flushed)")
            for table in ["nat", "filter", "mangle"] {
                let r = await bed.iptables(["-w", "5", "-t", table, "-S", "KUBE-PROXY-CANARY"])
                #expect(!r.succeeded, "the \(table) canary is still there")
            }
            let broken = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 1, timeout: 1)
            #expect(broken.answered == 0, context("the ClusterIP must be broken by the flush", broken, bed))

            sluice.send(SIGCONT)
            resumed = true
            let took = try await bed.waitUntilAnswered(from: bed.clientNS, .tcp, web.clusterTarget(), within: .seconds(12))
            #expect(took != nil, "the ClusterIP did not answer again within 12 s of the flush\n\(bed.sluice?.logTail() ?? "")")
            if let took { print("flush repaired after \(took)") }

            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 20)
            expectAnswered(tcp, count: 20, backends: ["backend-1", "backend-2"], "TCP after the repair", bed)
            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 10)
            expectAnswered(udp, count: 10, "UDP after the repair", bed)
            for table in ["nat", "filter", "mangle"] {
                let r = await bed.iptables(["-w", "5", "-t", table, "-S", "KUBE-PROXY-CANARY"])
                #expect(r.succeeded, "the \(table) canary was not recreated: \(r)")
            }
            let nat = try await bed.save(.nat)
            #expect(nat.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
                    "PREROUTING jump not restored:\n\(nat)")
            #expect(nat.contains("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
                    "POSTROUTING jump not restored:\n\(nat)")
        }
    }

    @Test("SIGTERM: sluice exits 0 and leaves the rules in place; traffic keeps working")
    func sigtermKeepsRules() async throws {
        try await TestBed.with(.init(label: "term")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startSluice()
            let before = try await bed.waitForServices([web.portName(), web.portName("dns")])

            let status = await bed.stopSluice(timeout: .seconds(10))
            #expect(status == 0, "sluice exit status after SIGTERM: \(status.map(String.init) ?? "still running after 10 s")\n\(bed.sluiceLog)")

            let after = try await bed.save(.nat)
            #expect(kubeLines(after) == kubeLines(before), "the nat rules changed when sluice stopped:\n\(after)")
            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 20)
            expectAnswered(tcp, count: 20, backends: ["backend-1", "backend-2"], "TCP after sluice stopped", bed)
            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 10)
            expectAnswered(udp, count: 10, "UDP after sluice stopped", bed)
        }
    }

    @Test("sluice --cleanup removes every KUBE- chain and every jump to one (nat, filter, mangle)")
    func cleanupRemovesEverything() async throws {
        try await TestBed.with(.init(label: "clean")) { bed in
            // One of each kind, so every chain type exists: SVC, SEP, EXT, FW, the filter
            // REJECT and firewall chains, affinity.
            var web = webService()
            web.type = "NodePort"
            web.ports = [.http(nodePort: 30080), .dns()]
            var lb = webService(name: "lb", clusterIP: "10.96.0.30")
            lb.type = "LoadBalancer"
            lb.ports = [.http(nodePort: 30090)]
            lb.loadBalancerIP = "198.51.100.10"
            lb.loadBalancerSourceRanges = ["192.168.50.0/28"]
            var ext = webService(name: "extip", clusterIP: "10.96.0.20")
            ext.externalIPs = ["203.0.113.10"]
            var empty = webService(name: "empty", clusterIP: "10.96.0.12")
            empty.endpoints = []
            var sticky = webService(name: "sticky", clusterIP: "10.96.0.11")
            sticky.clientIPAffinitySeconds = 600
            try bed.writeManifest("all.yaml", [web, lb, ext, empty, sticky].map(\.yaml).joined(separator: "---\n"))
            try bed.startSluice()
            let nat = try await bed.waitForServices([web.portName(), lb.portName(), ext.portName(), sticky.portName()])
            for prefix in [":KUBE-SVC-", ":KUBE-SEP-", ":KUBE-EXT-", ":KUBE-FW-", ":KUBE-SERVICES", ":KUBE-POSTROUTING"] {
                #expect(nat.contains(prefix), "no \(prefix) chain before the cleanup:\n\(nat)")
            }
            let filterBefore = try await bed.save(.filter)
            #expect(filterBefore.contains(":KUBE-PROXY-FIREWALL") && filterBefore.contains("-j REJECT"), "\(filterBefore)")
            #expect(try await bed.save(.mangle).contains(":KUBE-PROXY-CANARY"))

            let status = await bed.stopSluice()
            #expect(status == 0)

            let cleanup = await bed.runSluice(["--cleanup"])
            #expect(cleanup.succeeded, "sluice --cleanup: \(cleanup)\n\(cleanup.stdout)")
            for table in [Table.nat, .filter, .mangle] {
                let text = try await bed.save(table)
                #expect(kubeLines(text).isEmpty, "\(table.rawValue) still holds KUBE- chains or jumps after --cleanup:\n\(text)")
                #expect(!text.contains("KUBE-"), "\(table.rawValue) still mentions KUBE- after --cleanup:\n\(text)")
            }
            // Nothing was written to the other back end either.
            let legacy = try await bed.save(nil, variant: .legacy)
            #expect(!legacy.contains("KUBE-"), "iptables-legacy-save:\n\(legacy)")

            let dead = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 1, timeout: 1)
            #expect(dead.answered == 0, context("no ClusterIP after the cleanup", dead, bed))
        }
    }
}
