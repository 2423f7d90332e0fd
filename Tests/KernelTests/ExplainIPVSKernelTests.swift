// Real-kernel tests of `sluice explain` and `sluice diff` in IPVS mode. The CI host kernel has
// no IPVS: `make test` runs these inside user-mode Linux (scripts/uml-run.sh, UML_TESTS in
// the Makefile); on a host without IPVS they are skipped, saying why.

import Foundation
import IPTables
import SluiceTesting
import Testing

private let ipvsPresent = FileManager.default.fileExists(atPath: "/proc/net/ip_vs")

@Suite("Kernel (IPVS): explain and diff", .serialized, .requiresRoot, .timeLimit(.minutes(3)),
       .enabled(if: ipvsPresent, "needs a kernel with IPVS; make test runs it inside user-mode Linux (scripts/uml-run.sh)"))
struct ExplainIPVSKernelTests {
    @Test("explain --kernel predicts the real servers and NAT real packets get; diff reports hand edits of IPVS, ipsets, kube-ipvs0 and iptables")
    func explainAndDiffInIPVSMode() async throws {
        try await TestBed.with(.init(label: "exipvs")) { bed in
            let web = webService()
            var np = webService(name: "np", clusterIP: "10.96.0.11")
            np.type = "NodePort"
            np.ports = [.http(nodePort: 30080)]
            try bed.writeManifest("svc.yaml", web.yaml + "---\n" + np.yaml)
            try bed.startSluice(extra: ["--proxy-mode", "ipvs"])
            let mode = ["--proxy-mode", "ipvs"]
            func diff() async -> CommandOutput { await bed.runSluice(["diff"] + bed.sluiceArguments() + mode) }
            var d = await diff()
            for _ in 0..<50 where d.status != 0 {
                try await Task.sleep(for: .milliseconds(200))
                d = await diff()
            }
            #expect(d.status == 0 && d.stdout.contains("ipvs IPv4: the kernel holds the desired state"), "\(d.stdout)\n\(bed.sluiceLog)")

            for (from, ns, dst) in [(TestNet.clientIP, bed.clientNS, web.clusterTarget("http")), (TestNet.extIP, bed.extNS, "\(TestNet.nodeIP):30080")] {
                let e = try await bed.explain(mode, from: from, dst, kernel: true)
                #expect(e.verdict == "forwarded" && e.backends == ["backend-1", "backend-2"], "\(e.verdict) \(e.backends)")
                let r = try await bed.request(from: ns, .tcp, dst, count: 16, showSource: true)
                expectAnswered(r, count: 16, backends: e.backends, "ipvs \(from) -> \(dst): explain said \(e.backends)", bed)
                expectSources(r, from: from, masquerade: e.masquerade, "ipvs \(dst)", bed)
            }

            // Hand edits: a real server's weight, a set member, a kube-ipvs0 address, a foreign rule.
            let vip = "\(web.clusterIP):80"
            var r = await bed.exec(bed.nodeNS, ["ipvsadm", "-e", "-t", vip, "-r", "\(TestNet.backendIP(1)):\(TestNet.backendTCPPort)", "-m", "-w", "5"])
            #expect(r.succeeded, "\(r)")
            r = await bed.exec(bed.nodeNS, ["ipset", "del", "KUBE-CLUSTER-IP", "\(web.clusterIP),tcp:80"])
            #expect(r.succeeded, "\(r)")
            r = await bed.exec(bed.nodeNS, ["ip", "addr", "del", "\(np.clusterIP)/32", "dev", "kube-ipvs0"])
            #expect(r.succeeded, "\(r)")
            r = await bed.iptables(["-t", "nat", "-I", "KUBE-SERVICES", "1", "-d", "10.9.9.9/32", "-p", "tcp", "--dport", "9", "-j", "RETURN"])
            #expect(r.succeeded, "\(r)")
            d = await diff()
            #expect(d.status == 1 && d.stdout.contains("4 differences"), "\(d)")
            #expect(d.stdout.contains("changed ipvs real server of \(vip)/TCP") && d.stdout.contains("weight 5"), "\(d.stdout)")
            #expect(d.stdout.contains("missing ipset KUBE-CLUSTER-IP member: \(web.clusterIP),tcp:80"), "\(d.stdout)")
            #expect(d.stdout.contains("missing kube-ipvs0 address: \(np.clusterIP)"), "\(d.stdout)")
            #expect(d.stdout.contains("extra   nat KUBE-SERVICES rule") && d.stdout.contains("10.9.9.9"), "\(d.stdout)")
            // Without its KUBE-CLUSTER-IP member, KUBE-IPVS-FILTER rejects new connections to the
            // cluster IP: explain --kernel says so, and so do real packets.
            func explainKernel() async throws -> (ExplainJSON, String) {
                let out = await bed.runSluice(["explain"] + bed.sluiceArguments() + mode + ["--kernel", "--output", "json", "--from", TestNet.clientIP, web.clusterTarget("http")])
                return (try ExplainJSON.decode(out), out.stdout)
            }
            var (e, text) = try await explainKernel()
            #expect(e.verdict == "rejected", "\(text)")
            let refused = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 2)
            #expect(refused.count("REFUSED") == 2, context("explain said rejected", refused, bed))
            // With the member back, explain --kernel sees the changed weight: 5 to 1.
            r = await bed.exec(bed.nodeNS, ["ipset", "add", "KUBE-CLUSTER-IP", "\(web.clusterIP),tcp:80"])
            #expect(r.succeeded, "\(r)")
            (e, text) = try await explainKernel()
            let share = e.paths.first { $0.endpoint?.hasPrefix(TestNet.backendIP(1) + ":") == true }?.probability ?? 0
            #expect(e.verdict == "forwarded" && abs(share - 5.0 / 6.0) < 1e-6, "\(text)")
        }
    }
}
