// Real-kernel tests, iptables mode: traffic from outside the cluster (the `ext` namespace,
// which knows only its own /24 and routes external and load-balancer IPs to the node) to
// NodePorts, external IPs and load-balancer IPs.

import Foundation
import IPTables
import SluiceTesting
import Testing

@Suite("Kernel (iptables): external traffic", .serialized, .requiresRoot, .timeLimit(.minutes(2)))
struct ExternalKernelTests {
    @Test("NodePort answers from outside (masqueraded) and from the node itself")
    func nodePortFromOutsideAndFromNode() async throws {
        try await TestBed.with(.init(label: "np")) { bed in
            var web = webService()
            web.type = "NodePort"
            web.ports = [.http(nodePort: 30080), .dns(nodePort: 30053)]
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startSluice()
            try await bed.waitForRules(.nat, "NodePort rules") { text in
                let lines = text.split(separator: "\n").filter { $0.hasPrefix("-A KUBE-NODEPORTS ") }
                return lines.contains { $0.contains("--comment \"\(web.portName("http"))\"") && $0.contains("--dport 30080") }
                    && lines.contains { $0.contains("--comment \"\(web.portName("dns"))\"") && $0.contains("--dport 30053") }
            }
            let gateways: Set<String> = [TestNet.backendGateway(1), TestNet.backendGateway(2)]

            let ext = try await bed.request(from: bed.extNS, .tcp, "\(TestNet.nodeIP):30080", count: 20, showSource: true)
            expectAnswered(ext, count: 20, backends: ["backend-1", "backend-2"], "20 TCP requests from ext to the NodePort", bed)
            // ext has no route to the pods: replies only come back through the node's SNAT.
            #expect(Set(ext.sources.compactMap { $0 }).isSubset(of: gateways), context("NodePort sources seen by the backends", ext, bed))

            let extUDP = try await bed.request(from: bed.extNS, .udp, "\(TestNet.nodeIP):30053", count: 10)
            expectAnswered(extUDP, count: 10, "10 UDP requests from ext to the UDP NodePort", bed)

            let node = try await bed.request(from: bed.nodeNS, .tcp, "\(TestNet.nodeIP):30080", count: 10)
            expectAnswered(node, count: 10, "10 TCP requests from the node to its own NodePort", bed)
        }
    }

    @Test("externalIPs: a Service is reached from outside through its external IP")
    func externalIPFromOutside() async throws {
        try await TestBed.with(.init(label: "eip")) { bed in
            let externalIP = "203.0.113.10"
            var svc = webService(name: "extip", clusterIP: "10.96.0.20")
            svc.externalIPs = [externalIP]
            try bed.writeManifest("extip.yaml", svc.yaml)
            try bed.startSluice()
            try await bed.waitForRules(.nat, "external IP rules") { text in
                text.contains("--comment \"\(svc.portName("http")) external IP\"") && text.contains("--comment \"\(svc.portName("dns")) external IP\"")
            }

            let tcp = try await bed.request(from: bed.extNS, .tcp, "\(externalIP):80", count: 20, showSource: true)
            expectAnswered(tcp, count: 20, backends: ["backend-1", "backend-2"], "20 TCP requests from ext to the external IP", bed)
            #expect(!tcp.sources.contains(TestNet.extIP), context("external-IP traffic must be masqueraded", tcp, bed))

            let udp = try await bed.request(from: bed.extNS, .udp, "\(externalIP):53", count: 10)
            expectAnswered(udp, count: 10, "10 UDP requests from ext to the external IP", bed)
        }
    }

    @Test("loadBalancerSourceRanges: an allowed source connects, another one is dropped")
    func loadBalancerSourceRanges() async throws {
        try await TestBed.with(.init(label: "lbr")) { bed in
            let lbIP = "198.51.100.10"
            var lb = webService(name: "lb", clusterIP: "10.96.0.30")
            lb.type = "LoadBalancer"
            lb.ports = [.http(nodePort: 30090)]
            lb.loadBalancerIP = lbIP
            // Allows 192.168.50.0-15: ext's 192.168.50.10 is in, its 192.168.50.20 is out.
            lb.loadBalancerSourceRanges = ["192.168.50.0/28"]
            try bed.writeManifest("lb.yaml", lb.yaml)
            try bed.startSluice()
            try await bed.waitForRules(.nat, "load-balancer rules") { $0.contains("--comment \"\(lb.portName("http")) loadbalancer IP\"") }
            try await bed.waitForRules(.filter, "load-balancer firewall rule") { $0.contains("-A KUBE-PROXY-FIREWALL") && $0.contains(lbIP) }

            let allowed = try await bed.request(from: bed.extNS, .tcp, "\(lbIP):80", count: 10, sourceIP: TestNet.extIP)
            expectAnswered(allowed, count: 10, backends: ["backend-1", "backend-2"], "10 TCP requests to the LB IP from an allowed source", bed)

            let before = try await bed.save(.filter, counters: true)
            let denied = try await bed.request(from: bed.extNS, .tcp, "\(lbIP):80", count: 2, timeout: 1.5, sourceIP: TestNet.extIP2)
            #expect(denied.count("TIMEOUT") == 2, context("requests from a source outside loadBalancerSourceRanges must get no answer", denied, bed))
            // And it is sluice's firewall rule that dropped them.
            let after = try await bed.save(.filter, counters: true)
            let needles = ["-A KUBE-PROXY-FIREWALL", "-d \(lbIP)/32", "-j DROP"]
            let dropped = (packetCount(in: after, ruleContaining: needles) ?? 0) - (packetCount(in: before, ruleContaining: needles) ?? 0)
            #expect(dropped >= 2, "KUBE-PROXY-FIREWALL drop rule for \(lbIP) counted \(dropped) packets:\n\(after)")

            // The allowed source still works afterwards (nothing got stuck in conntrack).
            let again = try await bed.request(from: bed.extNS, .tcp, "\(lbIP):80", count: 3, sourceIP: TestNet.extIP)
            expectAnswered(again, count: 3, "allowed source after the denied attempts", bed)
        }
    }
}
