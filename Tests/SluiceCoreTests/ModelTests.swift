// Model tests: addresses, validation, change tracking and endpoint categorisation.

import SluiceCore
import SluiceTesting
import Testing

@Suite struct AddressTests {
    @Test(arguments: ["10.0.0.1", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::1", "fd00:10::"])
    func validAddressesRoundTrip(text: String) throws {
        let ip = try #require(IPAddress(text))
        #expect(ip.description == text)
    }

    @Test(arguments: ["", "10.0.0", "10.0.0.256", "010.0.0.1", "1.2.3.4 ", "a.b.c.d", "1.2.3.4/32", "::g", "fe80::1%eth0",
                      "10.0.0.1\n-A INPUT -j ACCEPT", "\"10.0.0.1\""])
    func invalidAddressesAreRejected(text: String) {
        #expect(IPAddress(text) == nil)
    }

    @Test func ipv6IsCanonicalised() {
        #expect(IPAddress("2001:0db8:0000:0000:0000:0000:0000:0001")?.description == "2001:db8::1")
        #expect(IPAddress("fd00:10::1")?.joined(port: 80) == "[fd00:10::1]:80")
    }

    @Test func cidrContainment() throws {
        let c = try #require(CIDR(" 203.0.113.0/25"))
        #expect(c.description == "203.0.113.0/25")
        #expect(c.contains(IPAddress("203.0.113.2")!))
        #expect(!c.contains(IPAddress("203.0.113.130")!))
        #expect(!c.contains(IPAddress("2001:db8::1")!))
        #expect(CIDR("10.1.2.3/8")?.description == "10.0.0.0/8")
        #expect(CIDR("10.0.0.0/33") == nil)
        #expect(CIDR("fd00::/64")?.contains(IPAddress("fd00::ffff")!) == true)
        #expect(CIDR("fd00::/64")?.contains(IPAddress("fd00:0:0:1::")!) == false)
    }

    @Test func specialRanges() {
        #expect(IPAddress("127.0.0.2")!.isLoopback)
        #expect(IPAddress("169.254.1.1")!.isLinkLocalUnicast)
        #expect(IPAddress("224.0.0.5")!.isLinkLocalMulticast)
        #expect(!IPAddress("224.0.1.5")!.isLinkLocalMulticast)
        #expect(IPAddress("fe80::1")!.isLinkLocalUnicast)
    }

    @Test func goDurations() {
        #expect(GoDuration.parse("1s") == .seconds(1))
        #expect(GoDuration.parse("1m30s") == .seconds(90))
        #expect(GoDuration.parse("250ms") == .milliseconds(250))
        #expect(GoDuration.parse("0") == .zero)
        #expect(GoDuration.parse("30") == nil)
        #expect(GoDuration.parse("-1s") == nil)
        #expect(GoDuration.format(.seconds(90)) == "1m30s")
        #expect(GoDuration.format(.milliseconds(250)) == "250ms")
    }

    @Test func masqueradeMarkFormatting() {
        #expect(NodeConfig(nodeName: "n").masqueradeMark == "0x00004000")
        #expect(NodeConfig(nodeName: "n", masqueradeBit: 0).masqueradeMark == "0x00000001")
        #expect(NodeConfig(nodeName: "n", masqueradeBit: 31).masqueradeMark == "0x80000000")
    }
}

private func svc(_ name: String = "web", ports: [ServicePort] = [ServicePort(name: "http", port: 80)], ip: String = "10.96.0.10") -> Service {
    Service(namespace: "ns", name: name, clusterIPs: [ip], ports: ports)
}

private func slice(_ name: String, service: String = "web", endpoints: [Endpoint], port: Int = 8080) -> EndpointSlice {
    EndpointSlice(namespace: "ns", name: name, serviceName: service, ports: [EndpointPort(name: "http", port: port)], endpoints: endpoints)
}

@Suite struct ValidationTests {
    @Test(arguments: [
        ("bad\"name", "metadata.name"), ("a\nb", "metadata.name"), ("UPPER", "metadata.name"), ("x y", "metadata.name"),
        (String(repeating: "a", count: 64), "metadata.name"),
    ])
    func hostileNamesAreRejected(name: String, field: String) {
        let s = Service(namespace: "ns", name: name, clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)])
        #expect(throws: ObjectRejection.self) { try Validation.validate(s) }
        do { try Validation.validate(s) } catch {
            #expect(error.reason.contains(field))
            #expect(!error.description.contains("\n"))
        }
    }

    @Test func badPortsProtocolsAndAddressesAreRejected() {
        let cases: [(Service, String)] = [
            (svc(ports: [ServicePort(name: "http", port: 0)]), "port 0"),
            (svc(ports: [ServicePort(name: "http", port: 70000)]), "port 70000"),
            (svc(ports: [ServicePort(name: "http", port: 80, nodePort: 65536)]), "nodePort 65536"),
            (svc(ports: [ServicePort(name: "http", protocolName: "ICMP", port: 80)]), "protocol \"ICMP\""),
            (svc(ports: [ServicePort(name: "Bad Name", port: 80)]), "name \"Bad Name\""),
            (svc(ports: [ServicePort(name: "a", port: 80), ServicePort(name: "b", port: 80)]), "duplicated"),
            (svc(ports: [ServicePort(name: "", port: 80), ServicePort(name: "b", port: 81)]), "must be named"),
            (svc(ip: "10.96.0.300"), "10.96.0.300"),
            (Service(namespace: "ns", name: "x", clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)], externalIPs: ["1.2.3"]), "externalIPs"),
            (Service(namespace: "ns", name: "x", clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)], loadBalancerSourceRanges: ["1.2.3.0/40"]), "loadBalancerSourceRanges"),
            (Service(namespace: "ns", name: "x", clusterIPs: ["10.96.0.1"], ports: [ServicePort(port: 80)], sessionAffinityTimeoutSeconds: 0), "timeoutSeconds 0"),
        ]
        for (s, needle) in cases {
            do {
                try Validation.validate(s)
                Issue.record("accepted: \(needle)")
            } catch {
                #expect(error.reason.contains(needle), "\(error.reason)")
            }
        }
        #expect(throws: Never.self) { try Validation.validate(svc()) }
    }

    @Test func badSlicesAreRejected() {
        #expect(throws: ObjectRejection.self) { try Validation.validate(slice("s1", endpoints: [Endpoint(addresses: ["10.0.0.999"])])) }
        #expect(throws: ObjectRejection.self) { try Validation.validate(slice("s1", endpoints: [Endpoint(addresses: ["fd00::1"])])) }
        #expect(throws: ObjectRejection.self) { try Validation.validate(slice("s1", service: "", endpoints: [])) }
        #expect(throws: ObjectRejection.self) { try Validation.validate(slice("s1", endpoints: [], port: 0)) }
        #expect(throws: ObjectRejection.self) {
            try Validation.validate(slice("s1", endpoints: [Endpoint(addresses: ["10.0.0.1"], nodeName: "node\"; rm")]))
        }
    }

    @Test func printableEscapesControlCharacters() {
        #expect(Validation.printable("a\"b\nc\u{1b}") == "a\\\"b\\nc\\u{1b}")
    }
}

@Suite struct ChangeTrackerTests {
    let key = NamespacedName(namespace: "ns", name: "web")
    let spn = ServicePortName(service: NamespacedName(namespace: "ns", name: "web"), port: "http", proto: .tcp)

    @Test func slicesOfOneServiceMergeAndDuplicatesCountOnce() {
        var t = ChangeTracker(nodeName: "node-a")
        t.apply(.serviceUpserted(svc()))
        t.apply(.sliceUpserted(slice("web-1", endpoints: [Endpoint(addresses: ["10.0.0.2"]), Endpoint(addresses: ["10.0.0.1"], nodeName: "node-a")])))
        t.apply(.sliceUpserted(slice("web-2", endpoints: [Endpoint(addresses: ["10.0.0.1"], ready: false), Endpoint(addresses: ["10.0.0.3"])])))
        let s = t.snapshot(.ipv4)
        let eps = s.endpoints[spn] ?? []
        #expect(eps.map(\.description) == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
        #expect(eps[0].ready)  // the ready copy wins
        #expect(eps[0].isLocal)
        #expect(s.changedServices == [key])
        #expect(t.snapshot(.ipv4).changedServices.isEmpty)
    }

    @Test func neverUsableAddressesAreSkipped() {
        var t = ChangeTracker(nodeName: "node-a")
        t.apply(.serviceUpserted(svc()))
        t.apply(.sliceUpserted(slice("web-1", endpoints: ["127.0.0.1", "169.254.1.1", "224.0.0.1", "10.0.0.1"].map { Endpoint(addresses: [$0]) })))
        #expect(t.snapshot(.ipv4).endpoints[spn]?.map(\.description) == ["10.0.0.1:8080"])
    }

    @Test func anInvalidUpdateKeepsThePreviousVersion() {
        var t = ChangeTracker(nodeName: "node-a")
        t.apply(.serviceUpserted(svc()))
        var bad = svc()
        bad.ports = [ServicePort(name: "http", port: 99999)]
        guard case .rejected(let r) = t.apply(.serviceUpserted(bad)) else {
            Issue.record("accepted an invalid update")
            return
        }
        #expect(r.key == "ns/web")
        #expect(t.snapshot(.ipv4).servicePorts[spn]?.port == 80)
    }

    @Test func deletesAndMovesAreTracked() {
        var t = ChangeTracker(nodeName: "node-a")
        t.apply(.serviceUpserted(svc()))
        t.apply(.serviceUpserted(svc("api", ip: "10.96.0.11")))
        t.apply(.sliceUpserted(slice("s", endpoints: [Endpoint(addresses: ["10.0.0.1"])])))
        _ = t.snapshot(.ipv4)
        // The slice moves to another service: both change.
        t.apply(.sliceUpserted(slice("s", service: "api", endpoints: [Endpoint(addresses: ["10.0.0.1"])])))
        var s = t.snapshot(.ipv4)
        #expect(s.changedServices == [key, NamespacedName(namespace: "ns", name: "api")])
        #expect(s.endpoints[spn] == nil || s.endpoints[spn]!.isEmpty)
        t.apply(.serviceDeleted(key))
        s = t.snapshot(.ipv4)
        #expect(s.servicePorts[spn] == nil)
        #expect(t.apply(.serviceDeleted(key)) == .ignored)
        #expect(t.apply(.sliceDeleted(NamespacedName(namespace: "ns", name: "nope"))) == .ignored)
    }

    @Test func familiesAreSeparated() {
        var t = ChangeTracker(nodeName: "node-a")
        var dual = svc()
        dual.clusterIPs = ["10.96.0.10", "fd00::10"]
        dual.externalIPs = ["192.0.2.1", "2001:db8::5"]
        t.apply(.serviceUpserted(dual))
        t.apply(.sliceUpserted(EndpointSlice(namespace: "ns", name: "v6", serviceName: "web", addressType: "IPv6",
                                             ports: [EndpointPort(name: "http", port: 8080)], endpoints: [Endpoint(addresses: ["fd00::1"])])))
        let v4 = t.snapshot(.ipv4), v6 = t.snapshot(.ipv6)
        #expect(v4.servicePorts[spn]?.clusterIP.description == "10.96.0.10")
        #expect(v4.servicePorts[spn]?.externalIPs.map(\.description) == ["192.0.2.1"])
        #expect(v6.servicePorts[spn]?.clusterIP.description == "fd00::10")
        #expect(v4.endpoints[spn]?.isEmpty ?? true)
        #expect(v6.endpoints[spn]?.map(\.description) == ["[fd00::1]:8080"])
    }

    @Test func proxyNameLabelSelectsServices() {
        var labelled = svc()
        labelled.labels[ServiceLabels.serviceProxyName] = "sluice"
        #expect(ChangeTracker.servicePorts(labelled, family: .ipv4, proxyName: nil) == nil)
        #expect(ChangeTracker.servicePorts(labelled, family: .ipv4, proxyName: "sluice") != nil)
        var headless = svc()
        headless.labels[ServiceLabels.headless] = ""
        #expect(ChangeTracker.servicePorts(headless, family: .ipv4, proxyName: nil) == nil)
    }
}

@Suite struct CategorizeTests {
    private func info(iTPLocal: Bool = false, eTPLocal: Bool = false, nodePort: Int = 0, hints: Bool = false) -> ServicePortInfo {
        ServicePortInfo(name: ServicePortName(service: .init(namespace: "ns", name: "s"), port: "", proto: .tcp),
                        clusterIP: IPAddress("10.96.0.1")!, port: 80, proto: .tcp, nodePort: nodePort, loadBalancerVIPs: [],
                        loadBalancerSourceRanges: [], externalIPs: [], stickyTimeoutSeconds: nil, externalPolicyLocal: eTPLocal,
                        internalPolicyLocal: iTPLocal, healthCheckNodePort: 0, usesTopologyHints: hints)
    }

    private func ep(_ ip: String, local: Bool = false, ready: Bool = true, serving: Bool = true, terminating: Bool = false,
                    zones: Set<String> = []) -> EndpointInfo {
        EndpointInfo(ip: IPAddress(ip)!, port: 80, isLocal: local, ready: ready, serving: serving, terminating: terminating, zoneHints: zones)
    }

    private func names(_ e: [EndpointInfo]) -> [String] { e.map { $0.ip.description } }

    @Test func clusterPolicyUsesReadyEndpoints() {
        let c = categorizeEndpoints([ep("10.0.0.1"), ep("10.0.0.2", ready: false, serving: false)], info: info(), nodeName: "n", nodeLabels: [:])
        #expect(names(c.cluster) == ["10.0.0.1"])
        #expect(c.local.isEmpty)
        #expect(c.hasAnyEndpoints)
    }

    @Test func clusterFallsBackToServingTerminating() {
        let c = categorizeEndpoints([ep("10.0.0.1", ready: false, serving: true, terminating: true), ep("10.0.0.2", ready: false, serving: false, terminating: true)],
                                    info: info(), nodeName: "n", nodeLabels: [:])
        #expect(names(c.cluster) == ["10.0.0.1"])
        #expect(c.hasAnyEndpoints)
    }

    @Test func localPolicyWithoutLocalEndpointsStillReportsRemoteOnes() {
        let c = categorizeEndpoints([ep("10.0.0.1")], info: info(iTPLocal: true), nodeName: "n", nodeLabels: [:])
        #expect(c.cluster.isEmpty)
        #expect(c.local.isEmpty)
        #expect(c.hasAnyEndpoints)
    }

    @Test func localFallsBackToLocalTerminatingAndMergesReachable() {
        let eps = [ep("10.0.0.1", local: true, ready: false, serving: true, terminating: true), ep("10.0.0.2")]
        let c = categorizeEndpoints(eps, info: info(eTPLocal: true, nodePort: 30000), nodeName: "n", nodeLabels: [:])
        #expect(names(c.cluster) == ["10.0.0.2"])
        #expect(names(c.local) == ["10.0.0.1"])
        #expect(names(c.allReachable) == ["10.0.0.1", "10.0.0.2"])
    }

    @Test func topologyHintsNarrowTheClusterSetOnlyWhenComplete() {
        let labels = [topologyZoneLabel: "zone-a"]
        let full = [ep("10.0.0.1", zones: ["zone-a"]), ep("10.0.0.2", zones: ["zone-b"])]
        #expect(names(categorizeEndpoints(full, info: info(hints: true), nodeName: "n", nodeLabels: labels).cluster) == ["10.0.0.1"])
        // kube-proxy 1.34 follows hints whatever the Service says (only the EndpointSlice
        // controller decides whether there are hints).
        #expect(names(categorizeEndpoints(full, info: info(hints: false), nodeName: "n", nodeLabels: labels).cluster) == ["10.0.0.1"])
        let partial = [ep("10.0.0.1", zones: ["zone-a"]), ep("10.0.0.2")]
        #expect(names(categorizeEndpoints(partial, info: info(hints: true), nodeName: "n", nodeLabels: labels).cluster).count == 2)
        let noMatch = [ep("10.0.0.1", zones: ["zone-c"]), ep("10.0.0.2", zones: ["zone-b"])]
        #expect(names(categorizeEndpoints(noMatch, info: info(hints: true), nodeName: "n", nodeLabels: labels).cluster).count == 2)
    }
}
