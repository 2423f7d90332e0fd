// Real-kernel tests of `sluice explain` and `sluice diff` (iptables mode): explain's answer for
// each Service kind of the golden fixture (ClusterIP, NodePort, external IP, load balancer
// with source ranges and affinity, externalTrafficPolicy Local, no endpoints) is checked
// against real packets: the backends that answer, the source address they see, and REFUSED
// or TIMEOUT. `diff` is checked after hand edits of the kernel's rules.

import Foundation
import IPTables
import SluiceTesting
import Testing

@Suite("Kernel (iptables): explain and diff", .serialized, .requiresRoot, .timeLimit(.minutes(4)))
struct ExplainKernelTests {
    @Test("explain predicts the endpoints, the NAT and the verdict real packets get, for every Service kind")
    func explainMatchesRealPackets() async throws {
        try await TestBed.with(.init(backends: 3, label: "expl")) { bed in
            let fixture = ExplainFixture()
            try bed.writeManifest("svc.yaml", fixture.yaml)
            // Pods here route only the pod and service CIDRs; a real pod has a default route, which
            // answers to sources kept by externalTrafficPolicy Local need.
            _ = try await bed.exec(checked: bed.backendNS[2], ["ip", "route", "add", "192.168.50.0/24", "via", TestNet.backendGateway(3)])
            try bed.startSluice()
            try await bed.waitForServices(fixture.servedPorts)
            try await bed.waitForRules(.filter, "REJECT rule of the Service without endpoints") { $0.contains(fixture.empty.portName("http")) }

            let cases = [
                ExplainCase(from: TestNet.clientIP, ns: \.clientNS, dst: "10.96.0.10:80"),
                ExplainCase(from: TestNet.clientIP, ns: \.clientNS, dst: "10.96.0.10:53", proto: .udp),
                ExplainCase(from: TestNet.extIP, ns: \.extNS, dst: "\(TestNet.nodeIP):30080"),
                ExplainCase(from: TestNet.extIP, ns: \.extNS, dst: "\(TestNet.nodeIP):30081"),
                // The node's address on the client's link (the client routes only pod and service CIDRs).
                ExplainCase(from: TestNet.clientIP, ns: \.clientNS, dst: "\(TestNet.clientGateway):30081"),
                ExplainCase(from: TestNet.extIP, ns: \.extNS, dst: "203.0.113.10:80"),
                ExplainCase(from: TestNet.extIP, ns: \.extNS, dst: "198.51.100.10:80"),
                ExplainCase(from: TestNet.extIP2, ns: \.extNS, dst: "198.51.100.10:80"),
                ExplainCase(from: TestNet.clientIP, ns: \.clientNS, dst: "10.96.0.15:80"),
            ]
            let verdicts = try await expectExplainMatchesRealPackets(bed, cases)
            #expect(verdicts == ["forwarded", "rejected", "dropped"])
            // The explanations name the expected things for a few cases.
            let lbAllowed = try await bed.explain(from: TestNet.extIP, "198.51.100.10:80", kernel: true)
            #expect(lbAllowed.model.hits.first?.kind == "LoadBalancerIP" && lbAllowed.model.hits.first?.servicePort == fixture.lb.portName("http"))
            #expect(lbAllowed.model.endpoints.filter(\.selected).count == 2)
            let localFromExt = try await bed.explain(from: TestNet.extIP, "\(TestNet.nodeIP):30081", kernel: false)
            #expect(localFromExt.backends == ["backend-3"] && localFromExt.masquerade == false)
        }
    }

    @Test("diff is clean after a sync and reports each hand edit with its Service; exit status 1")
    func diffReportsHandEdits() async throws {
        try await TestBed.with(.init(label: "diff")) { bed in
            let web = webService()
            var np = webService(name: "np", clusterIP: "10.96.0.11")
            np.type = "NodePort"
            np.ports = [.http(nodePort: 30080)]
            try bed.writeManifest("svc.yaml", web.yaml + "---\n" + np.yaml)
            try bed.startSluice()
            let nat = try await bed.waitForServices([web.portName("http"), np.portName("http")])
            func diff() async -> CommandOutput { await bed.runSluice(["diff"] + bed.sluiceArguments()) }

            let clean = await diff()
            #expect(clean.status == 0 && clean.stdout.contains("holds the desired state"), "\(clean)\n\(nat)")

            // A deleted rule.
            let rule = try #require(nat.split(separator: "\n").first { $0.hasPrefix("-A KUBE-SERVICES") && $0.contains("\(np.portName("http")) cluster IP") })
            var r = await bed.iptables(["-t", "nat", "-D"] + tokenize(rule.dropFirst(3)))
            #expect(r.succeeded, "\(r)")
            var d = await diff()
            #expect(d.status == 1 && d.stdout.contains("1 difference") && d.stdout.contains(np.portName("http"))
                    && d.stdout.contains("missing nat KUBE-SERVICES rule"), "\(d)")
            // Put back at the end of the chain, after the NodePort jump (which must stay last).
            r = await bed.iptables(["-t", "nat", "-A"] + tokenize(rule.dropFirst(3)))
            #expect(r.succeeded, "\(r)")
            d = await diff()
            #expect(d.status == 1 && d.stdout.contains("changed nat chain KUBE-SERVICES rule order"), "\(d.stdout)")
            // And where it was.
            let rulePosition = try #require(nat.split(separator: "\n").filter { $0.hasPrefix("-A KUBE-SERVICES ") }.firstIndex(of: rule)).advanced(by: 1)
            r = await bed.iptables(["-t", "nat", "-D"] + tokenize(rule.dropFirst(3)))
            #expect(r.succeeded, "\(r)")
            r = await bed.iptables(["-t", "nat", "-I", "KUBE-SERVICES", "\(rulePosition)"] + tokenize(rule.dropFirst(3)).dropFirst())
            #expect(r.succeeded, "\(r)")
            d = await diff()
            #expect(d.status == 0, "\(d.stdout)")

            // A changed weight.
            let natLines = nat.split(separator: "\n")
            let prob = try #require(natLines.first { $0.contains(web.portName("http") + " -> ") && $0.contains("--probability") })
            let words = tokenize(prob.dropFirst(3))
            let position = try #require(natLines.filter { $0.hasPrefix("-A \(words[0]) ") }.firstIndex(of: prob)).advanced(by: 1)
            r = await bed.iptables(["-t", "nat", "-R", words[0], "\(position)"] + words.dropFirst().map { $0.hasPrefix("0.5") ? "0.9" : $0 })
            #expect(r.succeeded, "\(r)")
            d = await diff()
            #expect(d.status == 1 && d.stdout.contains("changed nat \(words[0]) rule") && d.stdout.contains(web.portName("http")), "\(d)")
            r = await bed.iptables(["-t", "nat", "-R", words[0], "\(position)"] + words.dropFirst())
            #expect(r.succeeded, "\(r)")
            let restored = await diff()
            #expect(restored.status == 0, "\(restored.stdout)")

            // A foreign rule at the top of KUBE-SERVICES.
            r = await bed.iptables(["-t", "nat", "-I", "KUBE-SERVICES", "1", "-d", "10.9.9.9/32", "-p", "tcp", "--dport", "9", "-j", "RETURN"])
            #expect(r.succeeded, "\(r)")
            d = await diff()
            #expect(d.status == 1 && d.stdout.contains("extra   nat KUBE-SERVICES rule") && d.stdout.contains("10.9.9.9"), "\(d)")
            let json = await bed.runSluice(["diff"] + bed.sluiceArguments() + ["--output", "json"])
            #expect(json.status == 1 && json.stdout.contains("\"clean\" : false") && json.stdout.contains("\"kind\" : \"extra\""), "\(json)")
            r = await bed.iptables(["-t", "nat", "-D", "KUBE-SERVICES", "-d", "10.9.9.9/32", "-p", "tcp", "--dport", "9", "-j", "RETURN"])
            #expect(r.succeeded, "\(r)")

            // A deleted jump rule from a built-in chain.
            r = await bed.iptables(["-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING"])
            #expect(r.succeeded, "\(r)")
            d = await diff()
            #expect(d.status == 1 && d.stdout.contains("missing nat POSTROUTING jump rule"), "\(d)")
        }
    }

    @Test("userspace mode: explain --kernel follows the portal rule to the running relay, and real connections reach its endpoints from the node")
    func explainUserspaceMatchesRealPackets() async throws {
        try await TestBed.with(.init(label: "exus")) { bed in
            let web = webService()
            var np = webService(name: "np", clusterIP: "10.96.0.11")
            np.type = "NodePort"
            np.ports = [.http(nodePort: 30080)]
            try bed.writeManifest("svc.yaml", web.yaml + "---\n" + np.yaml)
            try bed.startUserspaceSluice()
            let nat = try await bed.waitForPortals([web.portName("http"), np.portName("http")])
            let relay = try #require(TestBed.relayPort(in: nat, for: web.portName("http")))
            for (from, ns, dst) in [(TestNet.clientIP, bed.clientNS, web.clusterTarget("http")), (TestNet.extIP, bed.extNS, "\(TestNet.nodeIP):30080")] {
                let out = await bed.runSluice(["explain"] + bed.sluiceArguments() + ["--proxy-mode", "userspace", "--kernel", "--output", "json", "--from", from, dst])
                let e = try ExplainJSON.decode(out)
                #expect(e.verdict == "relayed" && e.masquerade == true, "\(out.stdout)")
                let backends = e.reached
                #expect(backends == ["backend-1", "backend-2"], "\(out.stdout)")
                if dst == web.clusterTarget("http") { #expect(out.stdout.contains("port \(relay)"), "the running relay's port \(relay) in the path:\n\(out.stdout)") }
                let r = try await bed.request(from: ns, .tcp, dst, count: 12, showSource: true)
                expectAnswered(r, count: 12, backends: backends, "userspace \(from) -> \(dst): explain said \(backends)", bed)
                // The relay connects from the node: backends see the node's address on their link.
                #expect(r.sources.compactMap { $0 }.allSatisfy { $0 != from && $0.hasSuffix(".1") }, context("userspace: explain said the node's address", r, bed))
            }
        }
    }

    @Test("userspace mode: diff is clean with the running relays' ports and reports a deleted portal rule and a foreign one")
    func diffUserspace() async throws {
        try await TestBed.with(.init(label: "dfus")) { bed in
            let web = webService()
            try bed.writeManifest("svc.yaml", web.yaml)
            try bed.startUserspaceSluice()
            let nat = try await bed.waitForPortals([web.portName("http"), web.portName("dns")])
            func diff() async -> CommandOutput { await bed.runSluice(["diff"] + bed.sluiceArguments() + ["--proxy-mode", "userspace"]) }
            var d = await diff()
            #expect(d.status == 0 && d.stdout.contains("userspace IPv4: the kernel holds the desired state"), "\(d.stdout)\n\(nat)")
            let portal = try #require(nat.split(separator: "\n").first { $0.hasPrefix("-A KUBE-PORTALS-CONTAINER") && $0.contains(web.portName("http")) })
            var r = await bed.iptables(["-t", "nat", "-D"] + tokenize(portal.dropFirst(3)))
            #expect(r.succeeded, "\(r)")
            r = await bed.iptables(["-t", "nat", "-A", "KUBE-PORTALS-CONTAINER", "-d", "10.96.9.9/32", "-p", "tcp", "--dport", "9", "-j", "REDIRECT", "--to-ports", "9"])
            #expect(r.succeeded, "\(r)")
            d = await diff()
            #expect(d.status == 1 && d.stdout.contains("2 differences") && d.stdout.contains("missing nat KUBE-PORTALS-CONTAINER rule")
                    && d.stdout.contains("extra   nat KUBE-PORTALS-CONTAINER rule") && d.stdout.contains(web.portName("http")), "\(d.stdout)")
        }
    }

    @Test("With nfacct on (kube-proxy's counting rules written), diff and the running proxy's drift check find no drift; a removed counting rule is reported")
    func diffCleanWithNFAcct() async throws {
        try await TestBed.with(.init(label: "nfacct-diff")) { bed in
            var np = webService(name: "np", clusterIP: "10.96.0.11")
            np.type = "NodePort"
            np.ports = [.http(nodePort: 30080)]
            try bed.writeManifest("svc.yaml", np.yaml)
            try bed.startSluice(extra: ["--drift-check-period", "1s", "--metrics-bind-address", "127.0.0.1:10249"])
            let nat = try await bed.waitForServices([np.portName("http")])
            // nfacct is on: the localhost NodePort rule counts into kube-proxy's object, and so
            // does the INVALID drop.
            let counting = try #require(nat.split(separator: "\n").first { $0.hasPrefix("-A KUBE-NODEPORTS ") && $0.contains("localhost_nps_accepted_pkts") },
                                        "no nfacct rule in\n\(nat)\nlog:\n\(bed.sluiceLog)")
            let filter = await bed.iptables(["-S", "KUBE-FORWARD"])
            #expect(filter.stdout.contains("--ctstate INVALID -m nfacct --nfacct-name"), "\(filter)")

            let clean = await bed.runSluice(["diff"] + bed.sluiceArguments())
            #expect(clean.status == 0 && clean.stdout.contains("holds the desired state"), "\(clean)\n\(nat)")

            func waitForDrift(_ want: Double) async throws -> Bool { try await bed.waitForMetric("sluice_kernel_drift_objects", want) }
            // The gauge reads 0 before the first check: a foreign rule first shows that the check
            // runs (1, not 3 with the counting rules), and its removal brings it back to 0.
            let foreign = ["KUBE-SERVICES", "-d", "10.9.9.9/32", "-p", "tcp", "--dport", "9", "-j", "RETURN"]
            var r = await bed.iptables(["-t", "nat", "-I"] + foreign)
            #expect(r.succeeded, "\(r)")
            #expect(try await waitForDrift(1), "drift gauge never 1 after a foreign rule; log:\n\(bed.sluiceLog)")
            r = await bed.iptables(["-t", "nat", "-D"] + foreign)
            #expect(r.succeeded, "\(r)")
            #expect(try await waitForDrift(0), "drift gauge never 0 with nfacct on; log:\n\(bed.sluiceLog)")
            #expect(await bed.metric("kubeproxy_iptables_localhost_nodeports_accepted_packets_total") != nil)

            // The counting rule removed by hand: both report it.
            r = await bed.iptables(["-t", "nat", "-D"] + tokenize(counting.dropFirst(3)))
            #expect(r.succeeded, "\(r)")
            let d = await bed.runSluice(["diff"] + bed.sluiceArguments())
            #expect(d.status == 1 && d.stdout.contains("missing nat KUBE-NODEPORTS rule") && d.stdout.contains("localhost_nps_accepted_pkts"), "\(d)")
            #expect(try await waitForDrift(1), "drift gauge never 1 after the counting rule was removed; log:\n\(bed.sluiceLog)")
        }
    }

    @Test("nfacct: real conntrack-INVALID packets forwarded through the node are dropped and counted in kubeproxy_iptables_ct_state_invalid_dropped_packets_total")
    func invalidDropsAreCounted() async throws {
        try await TestBed.with(.init(label: "nfacct-invalid")) { bed in
            let web = webService()
            try bed.writeManifest("svc.yaml", web.yaml)
            try bed.startSluice(extra: ["--metrics-bind-address", "127.0.0.1:10249"])
            _ = try await bed.waitForServices([web.portName("http")])
            let forward = await bed.iptables(["-S", "KUBE-FORWARD"])
            #expect(forward.stdout.contains("--ctstate INVALID -m nfacct --nfacct-name"), "\(forward)")
            func counted() async -> Double? { await bed.metric("kubeproxy_iptables_ct_state_invalid_dropped_packets_total") }
            var before: Double?
            for _ in 0..<50 where before == nil {
                before = await counted()
                if before == nil { try await Task.sleep(for: .milliseconds(200)) }
            }
            let start = try #require(before, "no ct_state_invalid series; log:\n\(bed.sluiceLog)")
            // Five TCP segments with SYN and FIN both set (a flag combination conntrack marks
            // INVALID) from the client pod to a backend pod: the node forwards them, and
            // KUBE-FORWARD drops and counts each.
            let py = """
                import socket, struct
                src, dst = socket.inet_aton('\(TestNet.clientIP)'), socket.inet_aton('\(TestNet.backendIP(1))')
                def csum(b):
                    if len(b) % 2: b += b'\\0'
                    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
                    s = (s >> 16) + (s & 0xffff); s += s >> 16
                    return ~s & 0xffff
                s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
                for i in range(5):
                    h = struct.pack('!HHIIBBHHH', 40000 + i, 8080, 1000, 0, 5 << 4, 0x03, 65535, 0, 0)
                    c = csum(src + dst + struct.pack('!BBH', 0, 6, len(h)) + h)
                    s.sendto(h[:16] + struct.pack('!H', c) + h[18:], ('\(TestNet.backendIP(1))', 0))
                """
            let sent = await bed.exec(bed.clientNS, [bed.python, "-c", py])
            #expect(sent.succeeded, "\(sent)")
            var last = start
            for _ in 0..<50 where last < start + 5 {
                try await Task.sleep(for: .milliseconds(200))
                last = await counted() ?? last
            }
            #expect(last >= start + 5, "counter went from \(start) to \(last); log:\n\(bed.sluiceLog)")
        }
    }

    @Test("The running proxy's drift check exports sluice_kernel_drift_objects and logs the difference")
    func daemonDriftCheck() async throws {
        try await TestBed.with(.init(label: "drift")) { bed in
            let web = webService()
            try bed.writeManifest("svc.yaml", web.yaml)
            try bed.startSluice(extra: ["--drift-check-period", "1s", "--metrics-bind-address", "127.0.0.1:10249"])
            _ = try await bed.waitForServices([web.portName("http")])
            func waitForGauge(_ want: Double) async throws -> Bool { try await bed.waitForMetric("sluice_kernel_drift_objects", want) }
            #expect(try await waitForGauge(0), "gauge never 0; log:\n\(bed.sluiceLog)")
            let r = await bed.iptables(["-t", "nat", "-I", "KUBE-SERVICES", "1", "-d", "10.9.9.9/32", "-p", "tcp", "--dport", "9", "-j", "RETURN"])
            #expect(r.succeeded, "\(r)")
            #expect(try await waitForGauge(1), "gauge never 1 after a foreign rule; log:\n\(bed.sluiceLog)")
            #expect(bed.sluiceLog.contains("1 objects differ from the desired state"), "\(bed.sluiceLog)")
            #expect(bed.sluiceLog.contains("10.9.9.9"))
        }
    }
}

/// `sluice explain --output json` and `sluice diff --output json` keep the fields
/// docs/explain-diff.md documents (a rename breaks this test, not a user's script).
@Suite("explain and diff JSON")
struct ExplainJSONFormatTests {
    private var root: String { TestBed.findPackageRoot(from: #filePath) ?? "." }

    private func sluice(_ args: [String]) async -> CommandOutput {
        let bin = ProcessInfo.processInfo.environment["SLUICE_BIN"].flatMap { $0.isEmpty ? nil : $0 } ?? "\(root)/.build/debug/sluice"
        return await Subprocess.run([bin] + args)
    }

    @Test func explainJSONHasTheDocumentedFields() async throws {
        let out = await sluice(["explain", "--manifests", "\(root)/examples", "--hostname-override", "demo-node", "--node-ip", "192.168.50.1",
                                "--cluster-cidr", "10.244.0.0/16", "--output", "json", "--from", "10.244.1.10", "10.96.0.10:80"])
        #expect(out.succeeded, "\(out)")
        let doc = try #require(try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any])
        #expect(Set(doc.keys) == ["version", "packet", "mode", "rules", "model", "verdict", "masquerade", "paths", "notes"], "\(doc.keys)")
        #expect(doc["version"] as? Int == 1 && doc["verdict"] as? String == "forwarded" && doc["rules"] as? String == "compiled")
        let packet = try #require(doc["packet"] as? [String: Any])
        #expect(Set(packet.keys) == ["source", "fromNode", "destination", "port", "protocol"])
        let model = try #require(doc["model"] as? [String: Any])
        let hit = try #require((model["hits"] as? [[String: Any]])?.first)
        #expect(Set(hit.keys) == ["servicePort", "kind", "address", "servicePortNumber", "protocol"])
        let endpoint = try #require((model["endpoints"] as? [[String: Any]])?.first)
        #expect(Set(endpoint.keys) == ["address", "local", "ready", "serving", "terminating", "selected", "reasons", "probability"])
        let path = try #require((doc["paths"] as? [[String: Any]])?.first)
        #expect(Set(path.keys) == ["probability", "verdict", "endpoint", "masquerade", "steps"])
        let step = try #require((path["steps"] as? [[String: Any]])?.first)
        #expect(Set(step.keys) == ["location", "rule", "action"])

        let docs = try String(contentsOfFile: "\(root)/docs/explain-diff.md", encoding: .utf8)
        for key in Set(doc.keys).union(packet.keys).union(model.keys).union(hit.keys).union(endpoint.keys).union(path.keys).union(step.keys) {
            let forms = ["`\(key)`", "`\(key)[]`", "`model.\(key)`", "`model.\(key)[]`", "`\(key).", "(`\(key)`"]
            #expect(forms.contains { docs.contains($0) }, "docs/explain-diff.md does not document \(key)")
        }
    }
}
