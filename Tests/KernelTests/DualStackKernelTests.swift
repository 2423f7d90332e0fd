// Real-kernel test, dual-stack: one sluice process runs an iptables proxier and an ip6tables
// proxier over the same model, and real TCP and UDP traffic reaches both backends through
// the IPv4 and the IPv6 ClusterIP of one Service.

import Foundation
import SluiceTesting
import Testing

@Suite("Kernel (iptables): dual-stack", .serialized, .requiresRoot, .timeLimit(.minutes(2)))
struct DualStackKernelTests {
    static let yaml = """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: kt}
        spec:
          ipFamilyPolicy: RequireDualStack
          ipFamilies: [IPv4, IPv6]
          clusterIPs: [10.96.0.10, "fd00:96::10"]
          ports:
          - {name: http, protocol: TCP, port: 80, targetPort: \(TestNet.backendTCPPort)}
          - {name: dns, protocol: UDP, port: 53, targetPort: \(TestNet.backendUDPPort)}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: web-v4, namespace: kt, labels: {kubernetes.io/service-name: web}}
        addressType: IPv4
        ports: [{name: http, port: \(TestNet.backendTCPPort), protocol: TCP}, {name: dns, port: \(TestNet.backendUDPPort), protocol: UDP}]
        endpoints:
        - {addresses: [\(TestNet.backendIP(1))], conditions: {ready: true}, nodeName: \(TestNet.nodeName)}
        - {addresses: [\(TestNet.backendIP(2))], conditions: {ready: true}, nodeName: \(TestNet.nodeName)}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: web-v6, namespace: kt, labels: {kubernetes.io/service-name: web}}
        addressType: IPv6
        ports: [{name: http, port: \(TestNet.backendTCPPort), protocol: TCP}, {name: dns, port: \(TestNet.backendUDPPort), protocol: UDP}]
        endpoints:
        - {addresses: ["\(TestNet.backendIPv6(1))"], conditions: {ready: true}, nodeName: \(TestNet.nodeName)}
        - {addresses: ["\(TestNet.backendIPv6(2))"], conditions: {ready: true}, nodeName: \(TestNet.nodeName)}
        """

    @Test("An IPv6 ClusterIP carries TCP and UDP to both backends, beside the IPv4 one")
    func ipv6ClusterIPFlow() async throws {
        try await TestBed.with(.init(label: "ds", dualStack: true)) { bed in
            try bed.writeManifest("web.yaml", Self.yaml)
            try bed.startSluice()
            try await bed.waitForServices(["kt/web:http", "kt/web:dns"])
            // The ip6tables proxier programs the IPv6 ClusterIP in its own table.
            var v6 = ""
            for _ in 0..<100 {
                v6 = await bed.exec(bed.nodeNS, ["ip6tables-save", "-t", "nat"]).stdout
                if v6.contains("-d fd00:96::10/128") && v6.contains("--to-destination [\(TestNet.backendIPv6(2))]:\(TestNet.backendTCPPort)") { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(v6.contains("-A KUBE-SERVICES -d fd00:96::10/128 -p tcp -m comment --comment \"kt/web:http cluster IP\""), "\(v6)")
            #expect(!v6.contains("10.96.0.10"), "IPv4 addresses in the ip6tables rules:\n\(v6)")
            let v4 = try await bed.save(.nat)
            #expect(!v4.contains("fd00:"), "IPv6 addresses in the iptables rules:\n\(v4)")

            let tcp6 = try await bed.request(from: bed.clientNS, .tcp, "[fd00:96::10]:80", count: 30, showSource: true)
            expectAnswered(tcp6, count: 30, backends: ["backend-1", "backend-2"], "30 TCP requests to [fd00:96::10]:80", bed)
            // Pod traffic keeps its source: the pod CIDR of the IPv6 proxier is the IPv6 one.
            #expect(Set(tcp6.sources.compactMap { $0 }) == [TestNet.clientIPv6], context("IPv6 TCP sources", tcp6, bed))
            let udp6 = try await bed.request(from: bed.clientNS, .udp, "[fd00:96::10]:53", count: 30)
            expectAnswered(udp6, count: 30, backends: ["backend-1", "backend-2"], "30 UDP requests to [fd00:96::10]:53", bed)
            let tcp4 = try await bed.request(from: bed.clientNS, .tcp, "10.96.0.10:80", count: 10)
            expectAnswered(tcp4, count: 10, "10 TCP requests to the IPv4 ClusterIP of the same Service", bed)
        }
    }
}
