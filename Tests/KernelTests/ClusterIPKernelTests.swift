// Real-kernel tests, iptables mode: traffic from pods to ClusterIPs. Each test builds its own
// network namespaces (TestBed), runs sluice in the node namespace and sends real TCP and UDP
// traffic with scripts/testbed/client.py to scripts/testbed/backend.py.

import Foundation
import IPTables
import SluiceTesting
import Testing

@Suite("Kernel (iptables): ClusterIP traffic", .serialized, .requiresRoot, .timeLimit(.minutes(2)))
struct ClusterIPKernelTests {
    @Test("ClusterIP TCP and UDP reach both backends; pod sources are not masqueraded")
    func clusterIPReachesBothBackends() async throws {
        try await TestBed.with(.init(label: "cip")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startSluice()
            try await bed.waitForServices([web.portName("http"), web.portName("dns")])

            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 30, showSource: true)
            expectAnswered(tcp, count: 30, backends: ["backend-1", "backend-2"], "30 TCP requests to \(web.clusterTarget("http"))", bed)
            // Traffic from inside the cluster CIDR keeps its source (no KUBE-MARK-MASQ for it).
            #expect(Set(tcp.sources.compactMap { $0 }) == [TestNet.clientIP], context("TCP sources", tcp, bed))

            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 30, showSource: true)
            expectAnswered(udp, count: 30, backends: ["backend-1", "backend-2"], "30 UDP requests to \(web.clusterTarget("dns"))", bed)
            #expect(Set(udp.sources.compactMap { $0 }) == [TestNet.clientIP], context("UDP sources", udp, bed))
        }
    }

    @Test("sessionAffinity ClientIP pins a client to one backend; without affinity traffic spreads")
    func sessionAffinityPinsClient() async throws {
        try await TestBed.with(.init(label: "aff")) { bed in
            let spread = webService()
            var sticky = webService(name: "sticky", clusterIP: "10.96.0.11")
            sticky.clientIPAffinitySeconds = 10800
            try bed.writeManifest("svc.yaml", spread.yaml + "---\n" + sticky.yaml)
            try bed.startSluice()
            let nat = try await bed.waitForServices([spread.portName("http"), sticky.portName("http"), sticky.portName("dns")])

            // Both endpoints are in the sticky service's chain (so pinning is not just "one endpoint").
            let recentChecks = nat.split(separator: "\n").filter {
                $0.contains("--comment \"\(sticky.portName("http")) -> ") && $0.contains("--rcheck")
            }
            #expect(recentChecks.count == 2, "affinity rules of \(sticky.portName("http")):\n\(nat)")

            let pinned = try await bed.request(from: bed.clientNS, .tcp, sticky.clusterTarget("http"), count: 20)
            expectAnswered(pinned, count: 20, "20 TCP requests to the ClientIP-affinity service", bed)
            #expect(pinned.backends.count == 1, context("affinity: all requests must land on one backend", pinned, bed))

            let pinnedUDP = try await bed.request(from: bed.clientNS, .udp, sticky.clusterTarget("dns"), count: 10)
            expectAnswered(pinnedUDP, count: 10, "10 UDP requests to the ClientIP-affinity service", bed)
            #expect(pinnedUDP.backends.count == 1, context("affinity (UDP): all requests must land on one backend", pinnedUDP, bed))

            let spreadOut = try await bed.request(from: bed.clientNS, .tcp, spread.clusterTarget("http"), count: 30)
            expectAnswered(spreadOut, count: 30, backends: ["backend-1", "backend-2"], "30 TCP requests to the service without affinity", bed)
        }
    }

    @Test("A Service without endpoints is rejected at once: REFUSED, not TIMEOUT (TCP and UDP)")
    func serviceWithoutEndpointsIsRejected() async throws {
        try await TestBed.with(.init(label: "rej")) { bed in
            var empty = webService(name: "empty", clusterIP: "10.96.0.12")
            empty.endpoints = []
            try bed.writeManifest("empty.yaml", empty.yaml)
            try bed.startSluice()
            try await bed.waitForRules(.filter, "REJECT rules for \(empty.portName())") { text in
                text.contains("--comment \"\(empty.portName("http")) has no endpoints\"")
                    && text.contains("--comment \"\(empty.portName("dns")) has no endpoints\"")
            }

            // The client tells an ICMP rejection (REFUSED) from silence (TIMEOUT): a dropped
            // packet would be reported as TIMEOUT after the 3 s timeout.
            let tcp = try await bed.request(from: bed.clientNS, .tcp, empty.clusterTarget("http"), count: 3, timeout: 3)
            #expect(tcp.count("REFUSED") == 3, context("TCP to a service without endpoints", tcp, bed))

            let udp = try await bed.request(from: bed.clientNS, .udp, empty.clusterTarget("dns"), count: 3, timeout: 3)
            #expect(udp.count("REFUSED") == 3, context("UDP to a service without endpoints", udp, bed))
        }
    }

    @Test("Hairpin: a backend reaching its own Service lands on itself, masqueraded, and gets the answer")
    func hairpinReachesItself() async throws {
        try await TestBed.with(.init(backends: 1, ext: false, label: "hp")) { bed in
            var solo = webService(name: "solo", clusterIP: "10.96.0.13")
            solo.endpoints = [1]
            try bed.writeManifest("solo.yaml", solo.yaml)
            try bed.startSluice()
            try await bed.waitForServices([solo.portName("http"), solo.portName("dns")])

            let me = bed.backendNS[0]
            let tcp = try await bed.request(from: me, .tcp, solo.clusterTarget("http"), count: 5, showSource: true)
            expectAnswered(tcp, count: 5, backends: ["backend-1"], "hairpin TCP from backend-1 to its own service", bed)
            // The endpoint's own address must be masqueraded (to the node's address on its
            // link), or its reply would go straight back to itself and never match.
            #expect(Set(tcp.sources.compactMap { $0 }) == [TestNet.backendGateway(1)], context("hairpin TCP sources", tcp, bed))

            let udp = try await bed.request(from: me, .udp, solo.clusterTarget("dns"), count: 5, showSource: true)
            expectAnswered(udp, count: 5, backends: ["backend-1"], "hairpin UDP from backend-1 to its own service", bed)
            #expect(Set(udp.sources.compactMap { $0 }) == [TestNet.backendGateway(1)], context("hairpin UDP sources", udp, bed))
        }
    }
}
