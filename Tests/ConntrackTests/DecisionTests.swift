// The pure decision: which flows are stale for which frontends (kube-proxy's
// cleanup_test.go in spirit, with the cases it gets wrong), and which frontends a
// reconcile has to look at.

import Conntrack
import SluiceCore
import Testing

/// One UDP service with every kind of frontend, two serving endpoints, a terminating one
/// that still serves and one that no longer does; a TCP service on the same ClusterIP
/// range; an SCTP service; a UDP service with no endpoints.
private let ports = [
    TestPort(service: "dns", clusterIP: "172.30.0.10", port: 53, nodePort: 30053, externalIPs: ["192.168.99.11"],
             loadBalancerIPs: ["1.2.3.4"], endpoints: ["10.0.1.1:5353", "10.0.1.2:5353"],
             servingTerminating: ["10.0.1.3:5353"], notServing: ["10.0.1.4:5353"]),
    TestPort(service: "web", proto: .tcp, clusterIP: "172.30.0.20", port: 80, nodePort: 30080, endpoints: ["10.0.2.1:8080"]),
    TestPort(service: "sig", proto: .sctp, clusterIP: "172.30.0.30", port: 3868, endpoints: ["10.0.3.1:3868"]),
    TestPort(service: "empty", clusterIP: "172.30.0.40", port: 53),
]
private let nodeIPs: Set<IPAddress> = [ip("192.168.0.2"), ip("127.0.0.1")]
private let map = FrontendMap.build(snapshot(ports), nodePortAddresses: nodeIPs, localAddresses: nodeIPs)

private struct Case: CustomTestStringConvertible, Sendable {
    var name: String
    var flow: ConntrackFlow
    var expected: FlowVerdict
    var testDescription: String { name }
}

private let cases: [Case] = [
    // Translated to a serving endpoint: current, on every frontend.
    Case(name: "ClusterIP to a ready endpoint", flow: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.1:5353"), expected: .keep),
    Case(name: "external IP to a ready endpoint", flow: flow("203.0.113.5:4000", "192.168.99.11:53", replyFrom: "10.0.1.2:5353"), expected: .keep),
    Case(name: "LB IP to a ready endpoint", flow: flow("203.0.113.5:4000", "1.2.3.4:53", replyFrom: "10.0.1.1:5353"), expected: .keep),
    Case(name: "NodePort on the node IP to a ready endpoint", flow: flow("203.0.113.5:4000", "192.168.0.2:30053", replyFrom: "10.0.1.1:5353"), expected: .keep),
    Case(name: "NodePort on localhost to a ready endpoint", flow: flow("127.0.0.1:4000", "127.0.0.1:30053", replyFrom: "10.0.1.2:5353"), expected: .keep),
    // Terminating but serving: the flow drains, as a TCP connection would.
    Case(name: "ClusterIP to a terminating, still serving endpoint", flow: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.3:5353"), expected: .keep),
    // Translated to something that no longer serves.
    Case(name: "ClusterIP to an endpoint that stopped serving", flow: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.4:5353"), expected: .delete(.endpointGone)),
    Case(name: "ClusterIP to a deleted endpoint", flow: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.9:5353"), expected: .delete(.endpointGone)),
    Case(name: "ClusterIP to a live endpoint IP on an old port", flow: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.1:5354"), expected: .delete(.endpointGone)),
    Case(name: "external IP to a deleted endpoint", flow: flow("203.0.113.5:4000", "192.168.99.11:53", replyFrom: "10.0.1.9:5353"), expected: .delete(.endpointGone)),
    Case(name: "LB IP to a deleted endpoint", flow: flow("203.0.113.5:4000", "1.2.3.4:53", replyFrom: "10.0.1.9:5353"), expected: .delete(.endpointGone)),
    Case(name: "NodePort to a deleted endpoint", flow: flow("203.0.113.5:4000", "192.168.0.2:30053", replyFrom: "10.0.1.9:5353"), expected: .delete(.endpointGone)),
    // Never translated (created before any rule sent the frontend anywhere).
    Case(name: "ClusterIP never translated, endpoints now", flow: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "172.30.0.10:53"), expected: .delete(.neverTranslated)),
    Case(name: "NodePort never translated, endpoints now", flow: flow("203.0.113.5:4000", "192.168.0.2:30053", replyFrom: "192.168.0.2:30053"), expected: .delete(.neverTranslated)),
    Case(name: "ClusterIP without endpoints, never translated: kept", flow: flow("10.0.9.1:4000", "172.30.0.40:53", replyFrom: "172.30.0.40:53"), expected: .keep),
    // A service with no endpoints: whatever it was translated to is gone (kube-proxy #139628).
    Case(name: "ClusterIP without endpoints, translated earlier", flow: flow("10.0.9.1:4000", "172.30.0.40:53", replyFrom: "10.0.1.9:5353"), expected: .delete(.endpointGone)),
    // SCTP is reconciled like UDP.
    Case(name: "SCTP to its endpoint", flow: flow(.sctp, "10.0.9.1:4000", "172.30.0.30:3868", replyFrom: "10.0.3.1:3868"), expected: .keep),
    Case(name: "SCTP to a deleted endpoint", flow: flow(.sctp, "10.0.9.1:4000", "172.30.0.30:3868", replyFrom: "10.0.3.9:3868"), expected: .delete(.endpointGone)),
    // Not ours: other protocols, other addresses, other ports.
    Case(name: "TCP to a UDP frontend's address and port", flow: flow(.tcp, "10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.9:5353"), expected: .keep),
    Case(name: "TCP service flow to a deleted endpoint", flow: flow(.tcp, "10.0.9.1:4000", "172.30.0.20:80", replyFrom: "10.0.2.9:8080"), expected: .keep),
    Case(name: "TCP NodePort flow", flow: flow(.tcp, "203.0.113.5:4000", "192.168.0.2:30080", replyFrom: "10.0.2.9:8080"), expected: .keep),
    Case(name: "UDP to a non-service address", flow: flow("10.0.9.1:4000", "8.8.8.8:53", replyFrom: "8.8.8.8:53"), expected: .keep),
    Case(name: "UDP to the ClusterIP, another port", flow: flow("10.0.9.1:4000", "172.30.0.10:54", replyFrom: "10.0.1.9:5353"), expected: .keep),
    Case(name: "UDP with the node port number to a non-local address", flow: flow("10.0.9.1:4000", "198.51.100.7:30053", replyFrom: "198.51.100.7:30053"), expected: .keep),
]

@Suite struct DecisionTests {
    @Test(arguments: cases)
    private func verdict(_ c: Case) {
        #expect(map.verdict(for: c.flow) == c.expected, "\(c.flow)")
    }

    @Test func frontendsOfEveryKind() {
        let keys = Set(map.frontends.keys.map(\.description))
        #expect(keys == ["udp 172.30.0.10:53", "udp 192.168.99.11:53", "udp 1.2.3.4:53", "udp nodePort 30053",
                         "sctp 172.30.0.30:3868", "udp 172.30.0.40:53"])
        #expect(map.frontends[Frontend(.udp, ip("172.30.0.10"), 53)]?.endpoints
                == [hp("10.0.1.1:5353"), hp("10.0.1.2:5353"), hp("10.0.1.3:5353")])
        #expect(map.frontends[Frontend(.udp, ip("172.30.0.40"), 53)]?.isEmpty == true)
    }

    @Test func ipv6Flows() {
        let state = snapshot([TestPort(service: "dns6", clusterIP: "fd00:30::10", endpoints: ["[fd00:1::1]:5353"])], family: .ipv6)
        let m = FrontendMap.build(state)
        #expect(m.verdict(for: flow("[fd00:9::1]:4000", "[fd00:30::10]:53", replyFrom: "[fd00:1::1]:5353")) == .keep)
        #expect(m.verdict(for: flow("[fd00:9::1]:4000", "[fd00:30::10]:53", replyFrom: "[fd00:1::2]:5353")) == .delete(.endpointGone))
        #expect(m.verdict(for: flow("[fd00:9::1]:4000", "[fd00:30::10]:53", replyFrom: "[fd00:30::10]:53")) == .delete(.neverTranslated))
        // An IPv4 flow is not judged by an IPv6 map.
        #expect(m.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.9:5353")) == .keep)
    }

    @Test func relayReplySourcesAreCurrent() {
        let state = snapshot([TestPort(service: "dns", clusterIP: "172.30.0.10", endpoints: ["10.0.1.1:5353"])])
        let m = FrontendMap.build(state, localAddresses: [ip("192.168.0.2")], relayPort: { _ in 40123 })
        #expect(m.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "192.168.0.2:40123")) == .keep)
        #expect(m.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "127.0.0.1:40123")) == .keep)
        #expect(m.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "192.168.0.2:40999")) == .delete(.endpointGone))
    }

    @Test func nodePortAddressSelection() {
        let local = [ip("127.0.0.1"), ip("192.168.0.2"), ip("10.1.0.2"), ip("::1"), ip("2001:db8::2")]
        #expect(FrontendMap.nodePortAddresses(.all, local: local, family: .ipv4, localhost: true)
                == [ip("127.0.0.1"), ip("192.168.0.2"), ip("10.1.0.2")])
        #expect(FrontendMap.nodePortAddresses(.all, local: local, family: .ipv4, localhost: false)
                == [ip("192.168.0.2"), ip("10.1.0.2")])
        #expect(FrontendMap.nodePortAddresses(.cidrs([CIDR("192.168.0.0/24")!]), local: local, family: .ipv4, localhost: true)
                == [ip("192.168.0.2")])
        #expect(FrontendMap.nodePortAddresses(.all, local: local, family: .ipv6, localhost: true) == [ip("2001:db8::2")])
    }

    /// The serving set never drops an endpoint the rules use (`categorizeEndpoints`'s
    /// `allReachable`), whatever the policies, topology and terminating states.
    @Test func servingSetContainsWhatRulesUse() {
        let zone = [topologyZoneLabel: "z1"]
        var endpoints: [EndpointInfo] = []
        var n = 0
        for ready in [true, false] {
            for serving in [true, false] {
                for terminating in [true, false] {
                    for local in [true, false] {
                        for hinted in [true, false] {
                            n += 1
                            endpoints.append(EndpointInfo(ip: ip("10.0.5.\(n)"), port: 53, isLocal: local, ready: ready,
                                                          serving: serving, terminating: terminating,
                                                          zoneHints: hinted ? ["z1"] : ["z2"]))
                        }
                    }
                }
            }
        }
        for iLocal in [false, true] {
            for eLocal in [false, true] {
                for nodePort in [0, 30053] {
                    for hints in [false, true] {
                        let name = ServicePortName(service: NamespacedName(namespace: "ns", name: "s"), port: "p", proto: .udp)
                        let info = ServicePortInfo(name: name, clusterIP: ip("172.30.0.10"), port: 53, proto: .udp, nodePort: nodePort,
                                                   externalPolicyLocal: eLocal, internalPolicyLocal: iLocal, usesTopologyHints: hints)
                        for subset in [endpoints, endpoints.filter { !$0.ready }, endpoints.filter { !$0.isLocal }] {
                            let used = categorizeEndpoints(subset, info: info, nodeName: "n", nodeLabels: zone).allReachable
                            let serving = FrontendMap.servingEndpoints(subset, family: .ipv4)
                            for ep in used {
                                #expect(serving.contains(IPPort(ep.ip, UInt16(ep.port))), "\(ep) used by the rules but not serving")
                            }
                        }
                    }
                }
            }
        }
    }
}

@Suite struct ChangeTests {
    private let base = [
        TestPort(service: "a", clusterIP: "172.30.0.10", nodePort: 30053, endpoints: ["10.0.1.1:5353", "10.0.1.2:5353"]),
        TestPort(service: "b", clusterIP: "172.30.0.11", endpoints: ["10.0.2.1:5353"]),
        TestPort(service: "t", proto: .tcp, clusterIP: "172.30.0.12", endpoints: ["10.0.3.1:80"]),
    ]
    private let local: Set<IPAddress> = [ip("192.168.0.2")]

    private func build(_ ports: [TestPort], local: Set<IPAddress>? = nil) -> FrontendMap {
        FrontendMap.build(snapshot(ports), nodePortAddresses: local ?? self.local, localAddresses: local ?? self.local)
    }

    @Test func firstReconcileChecksEverything() {
        let m = build(base)
        #expect(m.changes(since: nil) == m)
        #expect(m.frontends.count == 3, "the TCP service is not a frontend: \(m.frontends.keys)")
    }

    @Test func unchangedStateChecksNothing() {
        #expect(build(base).changes(since: build(base)).isEmpty)
        // A TCP-only change is not a change for conntrack.
        var tcpChanged = base
        tcpChanged[2].endpoints = ["10.0.3.9:80"]
        #expect(build(tcpChanged).changes(since: build(base)).isEmpty)
    }

    @Test func anEndpointChangeChecksThatServiceOnly() {
        var next = base
        next[0].endpoints = ["10.0.1.1:5353"]
        let work = build(next).changes(since: build(base))
        #expect(Set(work.frontends.keys.map(\.description)) == ["udp 172.30.0.10:53", "udp nodePort 30053"])
        #expect(work.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.2:5353")) == .delete(.endpointGone))
        // The unchanged service's flows are not looked at, even an odd one.
        #expect(work.verdict(for: flow("10.0.9.1:4000", "172.30.0.11:53", replyFrom: "10.0.2.9:5353")) == .keep)
    }

    @Test func aDeletedServiceLosesItsFlows() {
        let work = build([base[1], base[2]]).changes(since: build(base))
        #expect(work.frontends[Frontend(.udp, ip("172.30.0.10"), 53)] == ServingSet())
        #expect(work.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.1:5353")) == .delete(.endpointGone))
        #expect(work.verdict(for: flow("203.0.113.5:4000", "192.168.0.2:30053", replyFrom: "10.0.1.1:5353")) == .delete(.endpointGone))
    }

    @Test func scaledToZeroAndBack() {
        var zero = base
        zero[0].endpoints = []
        let down = build(zero).changes(since: build(base))
        #expect(down.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.1:5353")) == .delete(.endpointGone))
        var up = base
        up[0].endpoints = ["10.0.1.7:5353"]
        let back = build(up).changes(since: build(zero))
        #expect(back.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "172.30.0.10:53")) == .delete(.neverTranslated))
        #expect(back.verdict(for: flow("10.0.9.1:4000", "172.30.0.10:53", replyFrom: "10.0.1.7:5353")) == .keep)
    }

    @Test func newNodeAddressesRecheckNodePorts() {
        let work = build(base, local: [ip("192.168.0.2"), ip("192.168.7.2")]).changes(since: build(base))
        #expect(Set(work.frontends.keys.map(\.description)) == ["udp nodePort 30053"])
    }
}
