// Real-kernel tests of `sluice explain` and `sluice diff` in nftables mode: explain's answer
// (compiled and --kernel) for each Service kind -- ClusterIP TCP and UDP, NodePort,
// externalTrafficPolicy Local, external IP, load balancer with source ranges and affinity, no
// endpoints -- checked against real packets (the backends that answer, the source they see,
// REFUSED or TIMEOUT); `diff` checked after hand edits of `table ip kube-proxy` with nft.

import Foundation
import SluiceTesting
import Testing

private let nftMode = ["--proxy-mode", "nftables"]

private func nftArgs(_ bed: TestBed) -> [String] { bed.sluiceArguments() + nftMode }

@Suite("Kernel (nftables): explain and diff", .serialized, .requiresRoot, .timeLimit(.minutes(4)))
struct ExplainNFTablesKernelTests {
    @Test("explain (compiled and --kernel) predicts the endpoints, the NAT and the verdict real packets get, for every Service kind")
    func explainMatchesRealPackets() async throws {
        try await TestBed.with(.init(backends: 3, label: "nexpl")) { bed in
            let fixture = ExplainFixture()
            try bed.writeManifest("svc.yaml", fixture.yaml)
            // Pods here route only the pod and service CIDRs; answers to a source kept by
            // externalTrafficPolicy Local need a route back.
            _ = try await bed.exec(checked: bed.backendNS[2], ["ip", "route", "add", "192.168.50.0/24", "via", TestNet.backendGateway(3)])
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices(fixture.servedPorts)
            try await bed.waitForNFTables("no-endpoint element of \(fixture.empty.portName("http"))") { $0.contains("10.96.0.15 . tcp . 80") }

            let cases = [
                ExplainCase(from: TestNet.clientIP, ns: \.clientNS, dst: "10.96.0.10:80"),
                ExplainCase(from: TestNet.clientIP, ns: \.clientNS, dst: "10.96.0.10:53", proto: .udp),
                ExplainCase(from: TestNet.extIP, ns: \.extNS, dst: "\(TestNet.nodeIP):30080"),
                ExplainCase(from: TestNet.extIP, ns: \.extNS, dst: "\(TestNet.nodeIP):30081"),
                ExplainCase(from: TestNet.extIP, ns: \.extNS, dst: "203.0.113.10:80"),
                ExplainCase(from: TestNet.extIP, ns: \.extNS, dst: "198.51.100.10:80"),
                ExplainCase(from: TestNet.extIP2, ns: \.extNS, dst: "198.51.100.10:80"),
                ExplainCase(from: TestNet.clientIP, ns: \.clientNS, dst: "10.96.0.15:80"),
            ]
            let verdicts = try await expectExplainMatchesRealPackets(bed, mode: nftMode, cases) { c, kernel in
                #expect(!kernel.notes.contains { $0.contains("not understood") || $0.contains("differs") }, "\(c): \(kernel.notes)")
                #expect(kernel.paths.allSatisfy { !$0.steps.isEmpty }, "\(c): a path without steps")
            }
            #expect(verdicts == ["forwarded", "rejected", "dropped"])
            // The steps name the map element and the service chain.
            let cip = try await bed.explain(nftMode, from: TestNet.clientIP, "10.96.0.10:80", kernel: true)
            let steps = cip.paths.first?.steps ?? []
            #expect(steps.contains { $0.action.hasPrefix("element 10.96.0.10 . tcp . 80 of @service-ips: goto service-") }, "\(steps)")
            #expect(steps.contains { $0.location.hasPrefix("service-") && $0.rule.hasPrefix("numgen random mod") }, "\(steps)")
            let lbAllowed = try await bed.explain(nftMode, from: TestNet.extIP, "198.51.100.10:80", kernel: true)
            #expect(lbAllowed.model.hits.first?.kind == "LoadBalancerIP" && lbAllowed.model.hits.first?.servicePort == fixture.lb.portName("http"))
        }
    }

    @Test("diff is clean after a sync and names a removed map element, a foreign rule and a deleted rule; exit status 1")
    func diffReportsHandEdits() async throws {
        try await TestBed.with(.init(label: "ndiff")) { bed in
            let web = webService()
            var np = webService(name: "np", clusterIP: "10.96.0.11")
            np.type = "NodePort"
            np.ports = [.http(nodePort: 30080)]
            try bed.writeManifest("svc.yaml", web.yaml + "---\n" + np.yaml)
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices([web.portName("http"), np.portName("http")])
            func diff(_ extra: [String] = []) async -> CommandOutput { await bed.runSluice(["diff"] + nftArgs(bed) + extra) }
            func nft(_ args: [String]) async throws { _ = try await bed.exec(checked: bed.nodeNS, ["nft"] + args) }

            let clean = await diff()
            #expect(clean.status == 0 && clean.stdout.hasPrefix("nftables ") && clean.stdout.contains("the kernel holds the desired state"), "\(clean)")

            // A removed map element, then put back.
            try await nft(["delete", "element", "ip", "kube-proxy", "service-ips", "{ 10.96.0.11 . tcp . 80 }"])
            var d = await diff()
            #expect(d.status == 1 && d.stdout.contains("1 difference") && d.stdout.contains(np.portName("http"))
                    && d.stdout.contains("missing element of map service-ips: 10.96.0.11 . tcp . 80 : goto service-"), "\(d)")
            let listing = try await bed.nftTable() ?? ""
            let npChain = try #require(listing.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
                .first { $0.hasPrefix("chain service-") && $0.contains("/np/tcp/") }).dropFirst(6).dropLast(2)
            try await nft(["add", "element", "ip", "kube-proxy", "service-ips", "{ 10.96.0.11 . tcp . 80 : goto \(npChain) }"])
            d = await diff()
            #expect(d.status == 0, "\(d)")

            // A foreign rule at the top of the services chain.
            try await nft(["insert", "rule", "ip", "kube-proxy", "services", "ip", "daddr", "10.9.9.9", "tcp", "dport", "9", "drop"])
            d = await diff()
            #expect(d.status == 1 && d.stdout.contains("(not owned by one Service)") && d.stdout.contains("extra   chain services rule: ip daddr 10.9.9.9"), "\(d)")
            let json = await diff(["--output", "json"])
            #expect(json.status == 1 && json.stdout.contains("\"clean\" : false") && json.stdout.contains("\"kind\" : \"extra\""), "\(json)")
            let handles = try await bed.exec(checked: bed.nodeNS, ["nft", "-a", "list", "chain", "ip", "kube-proxy", "services"]).stdout
            let handle = try #require(handles.split(separator: "\n").first { $0.contains("10.9.9.9") }?.split(separator: " ").last)
            try await nft(["delete", "rule", "ip", "kube-proxy", "services", "handle", String(handle)])
            d = await diff()
            #expect(d.status == 0, "\(d)")

            // A deleted rule: the DNAT of one of web's endpoint chains.
            let chains = try await bed.nftTable() ?? ""
            let endpointChain = try #require(chains.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
                .first { $0.hasPrefix("chain endpoint-") && $0.contains("/web/tcp/http__") }).dropFirst(6).dropLast(2)
            let eh = try await bed.exec(checked: bed.nodeNS, ["nft", "-a", "list", "chain", "ip", "kube-proxy", String(endpointChain)]).stdout
            let dnat = try #require(eh.split(separator: "\n").first { $0.contains("dnat to") })
            try await nft(["delete", "rule", "ip", "kube-proxy", String(endpointChain), "handle", String(dnat.split(separator: " ").last!)])
            d = await diff()
            #expect(d.status == 1 && d.stdout.contains(web.portName("http")) && d.stdout.contains("missing chain \(endpointChain) rule: meta l4proto tcp dnat to"), "\(d)")
            // explain --kernel sees the damage: that endpoint is no longer reached.
            let e = try await bed.explain(nftMode, from: TestNet.clientIP, "10.96.0.10:80", kernel: true)
            #expect(e.notes.contains { $0.contains("never send") || $0.contains("differs") }, "\(e.notes)")
        }
    }

    @Test("The running proxy's drift check in nftables mode exports sluice_kernel_drift_objects and logs the difference")
    func daemonDriftCheck() async throws {
        try await TestBed.with(.init(label: "ndrift")) { bed in
            let web = webService()
            try bed.writeManifest("svc.yaml", web.yaml)
            try bed.startNFTablesSluice(extra: ["--drift-check-period", "1s", "--metrics-bind-address", "127.0.0.1:10249"])
            try await bed.waitForNFTablesServices([web.portName("http")])
            func waitForGauge(_ want: Double) async throws -> Bool {
                try await bed.waitForMetric("sluice_kernel_drift_objects", want) { $0.contains("nftables") }
            }
            #expect(try await waitForGauge(0), "gauge never 0; log:\n\(bed.sluiceLog)")
            _ = try await bed.exec(checked: bed.nodeNS, ["nft", "insert", "rule", "ip", "kube-proxy", "services", "ip", "daddr", "10.9.9.9", "tcp", "dport", "9", "drop"])
            #expect(try await waitForGauge(1), "gauge never 1 after a foreign rule; log:\n\(bed.sluiceLog)")
            #expect(bed.sluiceLog.contains("drift check (nftables") && bed.sluiceLog.contains("1 objects differ from the desired state"), "\(bed.sluiceLog)")
            #expect(bed.sluiceLog.contains("10.9.9.9"))
        }
    }

    @Test("IPv6: the kernel's ip6 table reads back as the compiled one (diff clean, explain --kernel agrees); a flushed firewall chain is named and lets the blocked client through")
    func ipv6TableReadsBack() async throws {
        try await TestBed.with(.init(label: "ndiff6")) { bed in
            try bed.writeManifest("svc.yaml", """
                apiVersion: v1
                kind: Service
                metadata: {name: web, namespace: kt}
                spec:
                  type: LoadBalancer
                  clusterIP: fd00:96::10
                  clusterIPs: [fd00:96::10]
                  ipFamilies: [IPv6]
                  ipFamilyPolicy: SingleStack
                  sessionAffinity: ClientIP
                  loadBalancerSourceRanges: [fd00:50::/64, 2001:db8:9::/48]
                  externalIPs: [fd00:203::10]
                  ports:
                    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}
                status:
                  loadBalancer:
                    ingress: [{ip: "fd00:198::10"}]
                ---
                apiVersion: discovery.k8s.io/v1
                kind: EndpointSlice
                metadata:
                  name: web-1
                  namespace: kt
                  labels: {kubernetes.io/service-name: web}
                addressType: IPv6
                ports: [{name: http, port: 8080, protocol: TCP}]
                endpoints:
                  - addresses: ["fd00:244:2::10"]
                    conditions: {ready: true}
                    nodeName: n1
                  - addresses: ["fd00:244:3::10"]
                    conditions: {ready: true}
                    nodeName: n2

                """)
            let scratch = bed.prefix + "n6"
            _ = await Subprocess.run(["ip", "netns", "del", scratch])
            try await Subprocess.check(["ip", "netns", "add", scratch])
            defer { _ = Subprocess.runBlocking(["ip", "netns", "del", scratch], timeout: .seconds(20)) }
            _ = try await bed.exec(checked: scratch, ["ip", "link", "set", "lo", "up"])
            _ = try await bed.exec(checked: scratch, ["ip", "addr", "add", "fd00:1::2/128", "dev", "lo", "nodad"])
            let flags = ["--proxy-mode", "nftables", "--manifests", bed.manifestDir, "--hostname-override", "n1",
                         "--node-ip", "fd00:1::2", "--cluster-cidr", "fd00:244::/48"]
            let compiled = try await bed.exec(checked: scratch, [bed.sluiceBinary, "compile"] + flags)
            let path = bed.tempDir + "/ip6.nft"
            try Data(compiled.stdout.utf8).write(to: URL(fileURLWithPath: path))
            _ = try await bed.exec(checked: scratch, ["nft", "-f", path])
            var d = await bed.exec(scratch, [bed.sluiceBinary, "diff"] + flags)
            #expect(d.status == 0 && d.stdout.contains("nftables IPv6: the kernel holds the desired state"), "\(d)")

            func explain(_ from: String, kernel: Bool) async throws -> ExplainJSON {
                let out = try await bed.exec(checked: scratch, [bed.sluiceBinary, "explain"] + flags
                                             + ["--output", "json", "--from", from] + (kernel ? ["--kernel"] : []) + ["[fd00:198::10]:80"])
                return try ExplainJSON.decode(out)
            }
            for from in ["fd00:50::7", "2001:db8:9::7", "fd00:99::7"] {
                let k = try await explain(from, kernel: true), c = try await explain(from, kernel: false)
                #expect(k.verdict == c.verdict && Set(k.paths.compactMap(\.endpoint)) == Set(c.paths.compactMap(\.endpoint)), "\(from)")
                #expect(k.verdict == (from == "fd00:99::7" ? "dropped" : "forwarded"), "\(from): \(k.verdict)")
            }
            let allowed = try await explain("fd00:50::7", kernel: true)
            #expect(Set(allowed.paths.compactMap(\.endpoint)) == ["[fd00:244:2::10]:8080", "[fd00:244:3::10]:8080"])

            let listing = try await bed.exec(checked: scratch, ["nft", "list", "table", "ip6", "kube-proxy"]).stdout
            let fw = try #require(listing.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
                .first { $0.hasPrefix("chain firewall-") && $0.contains("/") }).dropFirst(6).dropLast(2)
            _ = try await bed.exec(checked: scratch, ["nft", "flush", "chain", "ip6", "kube-proxy", String(fw)])
            d = await bed.exec(scratch, [bed.sluiceBinary, "diff"] + flags)
            #expect(d.status == 1 && d.stdout.contains("kt/web:http") && d.stdout.contains("missing chain \(fw) rule: ip6 saddr != {"), "\(d)")
            let blocked = try await explain("fd00:99::7", kernel: true)
            #expect(blocked.verdict == "forwarded" && blocked.notes.contains { $0.contains("differs") }, "\(blocked.verdict) \(blocked.notes)")
        }
    }
}
