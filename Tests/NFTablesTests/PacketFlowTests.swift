// kube-proxy's nftables packet-flow tests (pkg/proxy/nftables/proxier_test.go, v1.34):
// the same Services and connections, traced through the table a full sync leaves.

import NFTables
import SluiceCore
import Testing

private let testNodeIPs: Set<String> = ["192.168.0.2", "192.168.1.2", "192.168.99.11", "2001:db8::1", "2001:db8:1::2"]
private let externalClient = "203.0.113.2", blockedClient = "203.0.113.130"

private struct Flow {
    var name: String
    var src: String
    var dst: String
    var port: Int
    var proto = "tcp"
    var output: String
    var masq = false
}

private func run(_ ports: [(ServicePortInfo, [EndpointInfo])], _ flows: [Flow], options: NFTablesOptions = KubeProxyFake.options()) throws {
    let model = try fullModel(makeState(ports, family: options.family), options: options)
    let tracer = PacketTracer(model: model, nodeIPs: testNodeIPs)
    for f in flows {
        let got = try tracer.trace(src: f.src, dst: f.dst, port: f.port, proto: f.proto)
        let want = TraceResult(output: f.output, masq: f.output.contains(":") ? f.masq : false)
        #expect(got == want, "\(f.name)")
    }
}

private let s1 = spn("ns1", "svc1")

@Suite struct KubeProxyPacketFlowTests {
    /// TestNoEndpointsReject.
    @Test func noEndpointsReject() throws {
        let svc1 = svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4"], externalIPs: ["192.168.99.11"])
        try run([(svc1, [])], [
            Flow(name: "pod to cluster IP with no endpoints", src: "10.0.0.2", dst: "172.30.0.41", port: 80, output: "REJECT"),
            Flow(name: "external to external IP with no endpoints", src: externalClient, dst: "192.168.99.11", port: 80, output: "REJECT"),
            Flow(name: "pod to NodePort with no endpoints", src: "10.0.0.2", dst: "192.168.0.2", port: 3001, output: "REJECT"),
            Flow(name: "external to NodePort with no endpoints", src: externalClient, dst: "192.168.0.2", port: 3001, output: "REJECT"),
            Flow(name: "pod to LoadBalancer IP with no endpoints", src: "10.0.0.2", dst: "1.2.3.4", port: 80, output: "REJECT"),
            Flow(name: "external to LoadBalancer IP with no endpoints", src: externalClient, dst: "1.2.3.4", port: 80, output: "REJECT"),
        ])
    }

    /// TestClusterIPGeneral.
    @Test func clusterIPGeneral() throws {
        let s2 = ["http", "https", "dns-udp", "dns-tcp", "dns-sctp"]
        let protos: [TransportProtocol] = [.tcp, .tcp, .udp, .tcp, .sctp]
        let svcPorts = [80, 443, 53, 53, 53], epPorts = [80, 8443, 53, 5353, 53]
        var ports: [(ServicePortInfo, [EndpointInfo])] = [
            (svc(spn("ns1", "svc1", "http"), "172.30.0.41"), [ep("10.180.0.1", local: true)]),
        ]
        for i in 0..<5 {
            let n = spn("ns2", "svc2", s2[i], protos[i])
            ports.append((svc(n, "172.30.0.42", port: svcPorts[i]), [ep("10.180.0.1", epPorts[i], local: true), ep("10.180.2.1", epPorts[i])]))
        }
        try run(ports, [
            Flow(name: "simple clusterIP", src: "10.180.0.2", dst: "172.30.0.41", port: 80, output: "10.180.0.1:80"),
            Flow(name: "hairpin to cluster IP", src: "10.180.0.1", dst: "172.30.0.41", port: 80, output: "10.180.0.1:80", masq: true),
            Flow(name: "clusterIP with multiple endpoints", src: "10.180.0.2", dst: "172.30.0.42", port: 80, output: "10.180.0.1:80, 10.180.2.1:80"),
            Flow(name: "clusterIP with TargetPort", src: "10.180.0.2", dst: "172.30.0.42", port: 443, output: "10.180.0.1:8443, 10.180.2.1:8443"),
            Flow(name: "TCP on a port shared with UDP and SCTP", src: "10.180.0.2", dst: "172.30.0.42", port: 53, output: "10.180.0.1:5353, 10.180.2.1:5353"),
            Flow(name: "UDP on a port shared with TCP and SCTP", src: "10.180.0.2", dst: "172.30.0.42", port: 53, proto: "udp", output: "10.180.0.1:53, 10.180.2.1:53"),
            Flow(name: "SCTP on a port shared with TCP and UDP", src: "10.180.0.2", dst: "172.30.0.42", port: 53, proto: "sctp", output: "10.180.0.1:53, 10.180.2.1:53"),
            Flow(name: "TCP-only port does not match UDP traffic", src: "10.180.0.2", dst: "172.30.0.42", port: 80, proto: "udp", output: "REJECT"),
            Flow(name: "svc1 does not accept svc2's ports", src: "10.180.0.2", dst: "172.30.0.41", port: 443, output: "REJECT"),
            Flow(name: "packet to unallocated cluster ip", src: "10.180.0.2", dst: "172.30.0.50", port: 80, output: "DROP"),
        ])
    }

    /// TestLoadBalancer.
    @Test func loadBalancer() throws {
        let svc1 = svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4", "5.6.7.8"], sourceRanges: ["192.168.0.0/24", " 203.0.113.0/25"])
        let out = "10.180.0.1:80"
        try run([(svc1, [ep("10.180.0.1")])], [
            Flow(name: "pod to cluster IP", src: "10.0.0.2", dst: "172.30.0.41", port: 80, output: out),
            Flow(name: "external to nodePort", src: externalClient, dst: "192.168.0.2", port: 3001, output: out, masq: true),
            Flow(name: "nodePort bypasses LoadBalancerSourceRanges", src: blockedClient, dst: "192.168.0.2", port: 3001, output: out, masq: true),
            Flow(name: "accepted external to LB1", src: externalClient, dst: "1.2.3.4", port: 80, output: out, masq: true),
            Flow(name: "accepted external to LB2", src: externalClient, dst: "5.6.7.8", port: 80, output: out, masq: true),
            Flow(name: "blocked external to LB1", src: blockedClient, dst: "1.2.3.4", port: 80, output: "DROP"),
            Flow(name: "blocked external to LB2", src: blockedClient, dst: "5.6.7.8", port: 80, output: "DROP"),
            Flow(name: "pod to LB1 (blocked by LoadBalancerSourceRanges)", src: "10.0.0.2", dst: "1.2.3.4", port: 80, output: "DROP"),
            Flow(name: "pod to LB2 (blocked by LoadBalancerSourceRanges)", src: "10.0.0.2", dst: "5.6.7.8", port: 80, output: "DROP"),
            Flow(name: "node to LB1 (allowed by LoadBalancerSourceRanges)", src: "192.168.0.2", dst: "1.2.3.4", port: 80, output: out, masq: true),
            Flow(name: "node to LB2 (allowed by LoadBalancerSourceRanges)", src: "192.168.0.2", dst: "5.6.7.8", port: 80, output: out, masq: true),
            Flow(name: "same node to LB1, SNATted to LB1 (implicitly allowed)", src: "1.2.3.4", dst: "1.2.3.4", port: 80, output: out, masq: true),
            Flow(name: "same node to LB2, SNATted to LB2 (implicitly allowed)", src: "5.6.7.8", dst: "5.6.7.8", port: 80, output: out, masq: true),
        ])
    }

    /// TestNodePorts: nodePortAddresses unset (the fake's 192.168.0.2/32, 2001:db8::1/128) or
    /// covering the alternate node IP too.
    @Test(arguments: [
        (IPFamily.ipv4, false), (IPFamily.ipv4, true), (IPFamily.ipv6, false), (IPFamily.ipv6, true),
    ])
    func nodePorts(family: IPFamily, multiple: Bool) throws {
        let v4 = family == .ipv4
        let svcIP = v4 ? "172.30.0.41" : "fd00:172:30::41"
        let ep1 = v4 ? "10.180.0.1" : "fd00:10:180::1", ep2 = v4 ? "10.180.2.1" : "fd00:10:180::2:1"
        let nodeIP = v4 ? "192.168.0.2" : "2001:db8::1", altNodeIP = v4 ? "192.168.1.2" : "2001:db8:1::2"
        let pod = v4 ? "10.0.0.2" : "fd00:10::2", external = v4 ? externalClient : "2600:5200::1"
        var npa: NodePortAddresses?
        if multiple {
            let list = v4 ? ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"]
                : ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64", "2001:db8:1::2/128"]
            npa = .cidrs(list.map { CIDR($0)! })
        }
        let options = KubeProxyFake.options(family, nodePortAddresses: npa)
        let output = [IPAddress(ep1)!.joined(port: 80), IPAddress(ep2)!.joined(port: 80)].sorted().joined(separator: ", ")
        try run([(svc(s1, svcIP, nodePort: 3001), [ep(ep1), ep(ep2, local: true)])], [
            Flow(name: "pod to cluster IP", src: pod, dst: svcIP, port: 80, output: output),
            Flow(name: "external to nodePort", src: external, dst: nodeIP, port: 3001, output: output, masq: true),
            Flow(name: "node to nodePort", src: nodeIP, dst: nodeIP, port: 3001, output: output, masq: true),
            multiple
                ? Flow(name: "external to nodePort on secondary IP", src: external, dst: altNodeIP, port: 3001, output: output, masq: true)
                : Flow(name: "secondary nodeIP ignores NodePorts", src: external, dst: altNodeIP, port: 3001, output: ""),
        ], options: options)
    }

    /// TestExternalTrafficPolicyLocal.
    @Test func externalTrafficPolicyLocal() throws {
        let svc1 = svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4"], externalIPs: ["192.168.99.11"], eTPLocal: true,
                       healthCheckNodePort: 30000)
        let both = "10.180.0.1:80, 10.180.2.1:80", local = "10.180.2.1:80"
        try run([(svc1, [ep("10.180.0.1"), ep("10.180.2.1", local: true)])], [
            Flow(name: "pod to cluster IP hits both endpoints, unmasqueraded", src: "10.0.0.2", dst: "172.30.0.41", port: 80, output: both),
            Flow(name: "pod to external IP hits both endpoints, unmasqueraded", src: "10.0.0.2", dst: "192.168.99.11", port: 80, output: both),
            Flow(name: "external to external IP hits only local endpoint, unmasqueraded", src: externalClient, dst: "192.168.99.11", port: 80, output: local),
            Flow(name: "pod to LB IP hits only both endpoints, unmasqueraded", src: "10.0.0.2", dst: "1.2.3.4", port: 80, output: both),
            Flow(name: "external to LB IP hits only local endpoint, unmasqueraded", src: externalClient, dst: "1.2.3.4", port: 80, output: local),
            Flow(name: "pod to NodePort hits both endpoints, unmasqueraded", src: "10.0.0.2", dst: "192.168.0.2", port: 3001, output: both),
            Flow(name: "external to NodePort hits only local endpoint, unmasqueraded", src: externalClient, dst: "192.168.0.2", port: 3001, output: local),
        ])
    }

    /// TestExternalTrafficPolicyCluster.
    @Test func externalTrafficPolicyCluster() throws {
        let svc1 = svc(s1, "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4"], externalIPs: ["192.168.99.11"])
        let both = "10.180.0.1:80, 10.180.2.1:80"
        try run([(svc1, [ep("10.180.0.1"), ep("10.180.2.1", local: true)])], [
            Flow(name: "pod to cluster IP hits both endpoints, unmasqueraded", src: "10.0.0.2", dst: "172.30.0.41", port: 80, output: both),
            Flow(name: "pod to external IP hits both endpoints, masqueraded", src: "10.0.0.2", dst: "192.168.99.11", port: 80, output: both, masq: true),
            Flow(name: "external to external IP hits both endpoints, masqueraded", src: externalClient, dst: "192.168.99.11", port: 80, output: both, masq: true),
            Flow(name: "pod to LB IP hits both endpoints, masqueraded", src: "10.0.0.2", dst: "1.2.3.4", port: 80, output: both, masq: true),
            Flow(name: "external to LB IP hits both endpoints, masqueraded", src: externalClient, dst: "1.2.3.4", port: 80, output: both, masq: true),
            Flow(name: "pod to NodePort hits both endpoints, masqueraded", src: "10.0.0.2", dst: "192.168.0.2", port: 3001, output: both, masq: true),
            Flow(name: "external to NodePort hits both endpoints, masqueraded", src: externalClient, dst: "192.168.0.2", port: 3001, output: both, masq: true),
        ])
    }

    /// TestInternalExternalMasquerade: three LoadBalancers (plain, eTP=Local, iTP=Local) with a
    /// local and a remote endpoint each, under the four combinations of masqueradeAll and the
    /// local-traffic detector.
    @Test(arguments: [(false, true), (false, false), (true, true), (true, false)])
    func internalExternalMasquerade(masqueradeAll: Bool, detector: Bool) throws {
        let n = "192.168.0.2", x = externalClient, pod = "10.0.0.2"
        let ports: [(ServicePortInfo, [EndpointInfo])] = [
            (svc(spn("ns1", "svc1"), "172.30.0.41", nodePort: 3001, lb: ["1.2.3.4"]), [ep("10.180.0.1", local: true), ep("10.180.1.1")]),
            (svc(spn("ns2", "svc2"), "172.30.0.42", nodePort: 3002, lb: ["5.6.7.8"], eTPLocal: true, healthCheckNodePort: 30002),
             [ep("10.180.0.2", local: true), ep("10.180.1.2")]),
            (svc(spn("ns3", "svc3"), "172.30.0.43", nodePort: 3003, lb: ["9.10.11.12"], iTPLocal: true), [ep("10.180.0.3", local: true), ep("10.180.1.3")]),
        ]
        let all1 = "10.180.0.1:80, 10.180.1.1:80", all2 = "10.180.0.2:80, 10.180.1.2:80", all3 = "10.180.0.3:80, 10.180.1.3:80"
        var flows: [Flow] = [
            Flow(name: "pod to ClusterIP", src: pod, dst: "172.30.0.41", port: 80, output: all1, masq: false),
            Flow(name: "pod to NodePort", src: pod, dst: n, port: 3001, output: all1, masq: true),
            Flow(name: "pod to LB", src: pod, dst: "1.2.3.4", port: 80, output: all1, masq: true),
            Flow(name: "node to ClusterIP", src: n, dst: "172.30.0.41", port: 80, output: all1, masq: true),
            Flow(name: "node to NodePort", src: n, dst: n, port: 3001, output: all1, masq: true),
            Flow(name: "node to LB", src: n, dst: "1.2.3.4", port: 80, output: all1, masq: true),
            Flow(name: "external to ClusterIP", src: x, dst: "172.30.0.41", port: 80, output: all1, masq: true),
            Flow(name: "external to NodePort", src: x, dst: n, port: 3001, output: all1, masq: true),
            Flow(name: "external to LB", src: x, dst: "1.2.3.4", port: 80, output: all1, masq: true),
            Flow(name: "pod to ClusterIP with eTP:Local", src: pod, dst: "172.30.0.42", port: 80, output: all2, masq: false),
            Flow(name: "pod to NodePort with eTP:Local", src: pod, dst: n, port: 3002, output: all2, masq: false),
            Flow(name: "pod to LB with eTP:Local", src: pod, dst: "5.6.7.8", port: 80, output: all2, masq: false),
            Flow(name: "node to ClusterIP with eTP:Local", src: n, dst: "172.30.0.42", port: 80, output: all2, masq: true),
            Flow(name: "node to NodePort with eTP:Local", src: n, dst: n, port: 3001, output: all1, masq: true),
            Flow(name: "node to LB with eTP:Local", src: n, dst: "5.6.7.8", port: 80, output: all2, masq: true),
            Flow(name: "external to ClusterIP with eTP:Local", src: x, dst: "172.30.0.42", port: 80, output: all2, masq: true),
            Flow(name: "external to NodePort with eTP:Local", src: x, dst: n, port: 3002, output: "10.180.0.2:80", masq: false),
            Flow(name: "external to LB with eTP:Local", src: x, dst: "5.6.7.8", port: 80, output: "10.180.0.2:80", masq: false),
            Flow(name: "pod to ClusterIP with iTP:Local", src: pod, dst: "172.30.0.43", port: 80, output: "10.180.0.3:80", masq: false),
            Flow(name: "pod to NodePort with iTP:Local", src: pod, dst: n, port: 3003, output: all3, masq: true),
            Flow(name: "pod to LB with iTP:Local", src: pod, dst: "9.10.11.12", port: 80, output: all3, masq: true),
            Flow(name: "node to ClusterIP with iTP:Local", src: n, dst: "172.30.0.43", port: 80, output: "10.180.0.3:80", masq: true),
            Flow(name: "node to NodePort with iTP:Local", src: n, dst: n, port: 3003, output: all3, masq: true),
            Flow(name: "node to LB with iTP:Local", src: n, dst: "9.10.11.12", port: 80, output: all3, masq: true),
            Flow(name: "external to ClusterIP with iTP:Local", src: x, dst: "172.30.0.43", port: 80, output: "10.180.0.3:80", masq: true),
            Flow(name: "external to NodePort with iTP:Local", src: x, dst: n, port: 3003, output: all3, masq: true),
            Flow(name: "external to LB with iTP:Local", src: x, dst: "9.10.11.12", port: 80, output: all3, masq: true),
        ]
        var overrides: [String: (output: String?, masq: Bool?)] = [:]
        if !detector {
            // Without a detector all ClusterIP traffic is taken for pod traffic (no masquerade),
            // and there is no pod short-circuit for eTP=Local.
            for f in ["node to ClusterIP", "node to ClusterIP with eTP:Local", "node to ClusterIP with iTP:Local",
                      "external to ClusterIP", "external to ClusterIP with eTP:Local", "external to ClusterIP with iTP:Local"] {
                overrides[f] = (nil, false)
            }
            overrides["pod to NodePort with eTP:Local"] = ("10.180.0.2:80", nil)
            overrides["pod to LB with eTP:Local"] = ("10.180.0.2:80", nil)
        }
        if masqueradeAll {
            for f in ["pod to ClusterIP", "pod to ClusterIP with eTP:Local", "pod to ClusterIP with iTP:Local"] { overrides[f] = (nil, true) }
            if !detector {
                for f in ["node to ClusterIP", "node to ClusterIP with eTP:Local", "node to ClusterIP with iTP:Local",
                          "external to ClusterIP", "external to ClusterIP with eTP:Local", "external to ClusterIP with iTP:Local"] {
                    overrides[f] = nil
                }
            }
        }
        var applied = 0
        for i in flows.indices {
            guard let o = overrides[flows[i].name] else { continue }
            applied += 1
            if let out = o.output { flows[i].output = out }
            if let m = o.masq { flows[i].masq = m }
        }
        #expect(applied == overrides.count)
        try run(ports, flows, options: KubeProxyFake.options(masqueradeAll: masqueradeAll, detector: detector))
    }

    /// TestTerminatingEndpointsTrafficPolicyLocal and ...Cluster: ready endpoints win over
    /// serving-terminating ones, which serve when no ready one is left; then the endpoints
    /// are deleted and both addresses reject.
    @Test(arguments: [true, false])
    func terminatingEndpoints(local eTPLocal: Bool) throws {
        let name = spn("ns1", "svc1", "")
        let info = svc(name, "172.30.1.1", lb: ["1.2.3.4"], eTPLocal: eTPLocal, healthCheckNodePort: eTPLocal ? 30000 : 0)
        func term(_ ip: String, local: Bool, serving: Bool = true) -> EndpointInfo {
            ep(ip, local: local, ready: false, serving: serving, terminating: true)
        }
        let x = externalClient, pod = "10.0.0.2"
        struct Case { var endpoints: [EndpointInfo]; var cluster: String; var external: String }
        let cases: [Case] = eTPLocal ? [
            Case(endpoints: [ep("10.0.1.1", local: true), ep("10.0.1.2", local: true), term("10.0.1.3", local: true),
                             term("10.0.1.4", local: true, serving: false), ep("10.0.1.5")],
                 cluster: "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", external: "10.0.1.1:80, 10.0.1.2:80"),
            Case(endpoints: [term("10.0.1.2", local: true), term("10.0.1.3", local: true), term("10.0.1.4", local: true, serving: false), ep("10.0.1.5")],
                 cluster: "10.0.1.5:80", external: "10.0.1.2:80, 10.0.1.3:80"),
            Case(endpoints: [term("10.0.1.5", local: false)], cluster: "10.0.1.5:80", external: "DROP"),
            Case(endpoints: [term("10.0.1.5", local: true, serving: false), term("10.0.1.5", local: false, serving: false)],
                 cluster: "REJECT", external: "REJECT"),
        ] : [
            Case(endpoints: [ep("10.0.1.1", local: true), ep("10.0.1.2", local: true), term("10.0.1.3", local: false),
                             term("10.0.1.4", local: false, serving: false), ep("10.0.1.5")],
                 cluster: "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", external: "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80"),
            Case(endpoints: [term("10.0.1.2", local: true), term("10.0.1.3", local: true), term("10.0.1.4", local: false, serving: false),
                             term("10.0.1.5", local: false)],
                 cluster: "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", external: "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80"),
            Case(endpoints: [term("10.0.1.5", local: false)], cluster: "10.0.1.5:80", external: "10.0.1.5:80"),
            Case(endpoints: [term("10.0.1.5", local: true, serving: false), term("10.0.1.5", local: false, serving: false)],
                 cluster: "REJECT", external: "REJECT"),
        ]
        for c in cases {
            try run([(info, c.endpoints)], [
                Flow(name: "pod to clusterIP", src: pod, dst: "172.30.1.1", port: 80, output: c.cluster, masq: false),
                Flow(name: "external to LB", src: x, dst: "1.2.3.4", port: 80, output: c.external, masq: !eTPLocal),
            ])
        }
        try run([(info, [])], [
            Flow(name: "pod to clusterIP after endpoints deleted", src: pod, dst: "172.30.1.1", port: 80, output: "REJECT"),
            Flow(name: "external to LB after endpoints deleted", src: x, dst: "1.2.3.4", port: 80, output: "REJECT"),
        ])
    }

    /// The tracer itself can fail: a table without the Service gives no DNAT.
    @Test func tracerSeesMissingService() throws {
        let model = try fullModel(makeState([]), options: KubeProxyFake.options())
        let got = try PacketTracer(model: model, nodeIPs: testNodeIPs).trace(src: "10.0.0.2", dst: "172.30.0.41", port: 80)
        #expect(got == TraceResult(output: "DROP", masq: false))
    }
}
