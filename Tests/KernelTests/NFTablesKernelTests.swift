// Real-kernel tests, nftables mode: traffic through `table ip kube-proxy` as sluice programs
// it with libnftables in the node namespace, and the table read back with `nft list table`
// compared with what a full sync of the same state gives (loaded into a scratch namespace).

import Foundation
import IPTables
import KernelKit
import SluiceTesting
import Testing

/// Waits until the node's `table ip kube-proxy`, normalised, equals the listing of a full sync
/// of the same manifests, and returns it; records a failure with both listings when it does not.
@discardableResult
func expectTableEqualsFullSync(_ bed: TestBed, _ what: String, timeout: Duration = .seconds(15),
                               sourceLocation: SourceLocation = #_sourceLocation) async throws -> String {
    let want = NFTablesListing.normalise(try await bed.nftablesFullSyncListing())
    let deadline = ContinuousClock.now + timeout
    var got = ""
    while ContinuousClock.now < deadline {
        got = NFTablesListing.normalise(try await bed.nftTable() ?? "")
        if got == want { return got }
        try await Task.sleep(for: .milliseconds(200))
    }
    Issue.record(Comment(rawValue: "\(what): the kernel's table differs from a full sync\n--- kernel ---\n\(got)\n--- full sync ---\n\(want)\n--- sluice log ---\n\(bed.sluice?.logTail(30) ?? "")"),
                 sourceLocation: sourceLocation)
    return got
}

/// A Service with `externalTrafficPolicy: Local` on NodePort 30081 whose endpoints are
/// backend-1 on this node and backend-2 on another node.
func localPolicyService() -> String {
    """
    apiVersion: v1
    kind: Service
    metadata:
      name: local
      namespace: kt
    spec:
      type: NodePort
      externalTrafficPolicy: Local
      clusterIP: 10.96.0.40
      clusterIPs: [10.96.0.40]
      ipFamilies: [IPv4]
      ipFamilyPolicy: SingleStack
      ports:
        - name: http
          protocol: TCP
          port: 80
          targetPort: 8080
          nodePort: 30081
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: local-kt001
      namespace: kt
      labels:
        kubernetes.io/service-name: local
    addressType: IPv4
    ports:
      - name: http
        port: 8080
        protocol: TCP
    endpoints:
      - addresses: [\(TestNet.backendIP(1))]
        conditions: {ready: true}
        nodeName: \(TestNet.nodeName)
      - addresses: [\(TestNet.backendIP(2))]
        conditions: {ready: true}
        nodeName: other-node

    """
}

@Suite("Kernel (nftables): traffic and ruleset", .serialized, .requiresRoot, .timeLimit(.minutes(3)))
struct NFTablesKernelTests {
    @Test("ClusterIP TCP and UDP reach both backends, affinity pins a client; the table equals a full sync")
    func clusterIPAndAffinity() async throws {
        try await TestBed.with(.init(label: "nftcip")) { bed in
            let web = webService()
            var sticky = webService(name: "sticky", clusterIP: "10.96.0.11")
            sticky.clientIPAffinitySeconds = 10800
            try bed.writeManifest("svc.yaml", web.yaml + "---\n" + sticky.yaml)
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices([web.portName("http"), web.portName("dns"), sticky.portName("http")])
            try await expectTableEqualsFullSync(bed, "after the first sync")

            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 30, showSource: true)
            expectAnswered(tcp, count: 30, backends: ["backend-1", "backend-2"], "30 TCP requests to \(web.clusterTarget("http"))", bed)
            #expect(Set(tcp.sources.compactMap { $0 }) == [TestNet.clientIP], context("pod sources are kept", tcp, bed))

            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 30)
            expectAnswered(udp, count: 30, backends: ["backend-1", "backend-2"], "30 UDP requests to \(web.clusterTarget("dns"))", bed)

            let pinned = try await bed.request(from: bed.clientNS, .tcp, sticky.clusterTarget("http"), count: 20)
            expectAnswered(pinned, count: 20, "20 TCP requests to the ClientIP-affinity service", bed)
            #expect(pinned.backends.count == 1, context("affinity: all requests land on one backend", pinned, bed))
        }
    }

    @Test("NodePort answers from outside (masqueraded) and from the node; eTP Local keeps the source and stays local")
    func nodePortAndLocalPolicy() async throws {
        try await TestBed.with(.init(label: "nftnp")) { bed in
            var web = webService()
            web.type = "NodePort"
            web.ports = [.http(nodePort: 30080), .dns(nodePort: 30053)]
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.writeManifest("local.yaml", localPolicyService())
            // Source-preserved replies from backend-1 to ext go back through the node.
            try await bed.exec(checked: bed.backendNS[0], ["ip", "route", "add", "192.168.50.0/24", "via", TestNet.backendGateway(1)])
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices([web.portName("http"), web.portName("dns"), "kt/local:http"])
            try await expectTableEqualsFullSync(bed, "NodePort services")
            let gateways: Set<String> = [TestNet.backendGateway(1), TestNet.backendGateway(2)]

            let ext = try await bed.request(from: bed.extNS, .tcp, "\(TestNet.nodeIP):30080", count: 20, showSource: true)
            expectAnswered(ext, count: 20, backends: ["backend-1", "backend-2"], "20 TCP requests from ext to the NodePort", bed)
            #expect(Set(ext.sources.compactMap { $0 }).isSubset(of: gateways), context("NodePort traffic is masqueraded", ext, bed))

            let extUDP = try await bed.request(from: bed.extNS, .udp, "\(TestNet.nodeIP):30053", count: 10)
            expectAnswered(extUDP, count: 10, "10 UDP requests from ext to the UDP NodePort", bed)

            let node = try await bed.request(from: bed.nodeNS, .tcp, "\(TestNet.nodeIP):30080", count: 10)
            expectAnswered(node, count: 10, "10 TCP requests from the node to its own NodePort", bed)

            let local = try await bed.request(from: bed.extNS, .tcp, "\(TestNet.nodeIP):30081", count: 20, showSource: true)
            expectAnswered(local, count: 20, backends: ["backend-1"], "eTP Local: only the local endpoint answers", bed)
            #expect(Set(local.sources.compactMap { $0 }) == [TestNet.extIP], context("eTP Local keeps the client's address", local, bed))
        }
    }

    @Test("loadBalancerSourceRanges: an allowed source connects, another one gets no answer")
    func loadBalancerSourceRanges() async throws {
        try await TestBed.with(.init(label: "nftlb")) { bed in
            let lbIP = "198.51.100.10"
            var lb = webService(name: "lb", clusterIP: "10.96.0.30")
            lb.type = "LoadBalancer"
            lb.ports = [.http(nodePort: 30090)]
            lb.loadBalancerIP = lbIP
            lb.loadBalancerSourceRanges = ["192.168.50.0/28"]
            try bed.writeManifest("lb.yaml", lb.yaml)
            try bed.startNFTablesSluice()
            try await bed.waitForNFTables("the firewall-ips element of \(lbIP)") { $0.contains("firewall-ips") && $0.contains(lbIP) }
            try await expectTableEqualsFullSync(bed, "a LoadBalancer with source ranges")

            let allowed = try await bed.request(from: bed.extNS, .tcp, "\(lbIP):80", count: 10, sourceIP: TestNet.extIP)
            expectAnswered(allowed, count: 10, backends: ["backend-1", "backend-2"], "10 TCP requests to the LB IP from an allowed source", bed)
            let denied = try await bed.request(from: bed.extNS, .tcp, "\(lbIP):80", count: 2, timeout: 1.5, sourceIP: TestNet.extIP2)
            #expect(denied.count("TIMEOUT") == 2, context("a source outside loadBalancerSourceRanges gets no answer", denied, bed))
            let again = try await bed.request(from: bed.extNS, .tcp, "\(lbIP):80", count: 3, sourceIP: TestNet.extIP)
            expectAnswered(again, count: 3, "the allowed source after the denied attempts", bed)
        }
    }

    @Test("A sequence of changes (endpoint change, new Service, Service delete): after each, the table equals a full sync")
    func changesMatchFullSync() async throws {
        try await TestBed.with(.init(label: "nftseq")) { bed in
            var web = webService()
            let other = webService(name: "other", clusterIP: "10.96.0.12")
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.writeManifest("other.yaml", other.yaml)
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices([web.portName("http"), other.portName("http")])
            try await expectTableEqualsFullSync(bed, "the first sync")

            // An endpoint change: web loses backend-1.
            web.endpoints = [2]
            try bed.writeManifest("web.yaml", web.yaml)
            try await expectTableEqualsFullSync(bed, "after web lost backend-1")
            let afterChange = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 20)
            expectAnswered(afterChange, count: 20, backends: ["backend-2"], "web after the endpoint change", bed)

            // A new NodePort Service.
            var np = webService(name: "np", clusterIP: "10.96.0.13")
            np.type = "NodePort"
            np.ports = [.http(nodePort: 30082), .dns(nodePort: 30054)]
            try bed.writeManifest("np.yaml", np.yaml)
            try await expectTableEqualsFullSync(bed, "after a NodePort Service was added")
            let npAnswers = try await bed.request(from: bed.extNS, .tcp, "\(TestNet.nodeIP):30082", count: 10)
            expectAnswered(npAnswers, count: 10, backends: ["backend-1", "backend-2"], "the new NodePort", bed)

            // A Service delete: its chains are flushed at once and deleted by a later sync.
            try bed.removeManifest("other.yaml")
            let afterDelete = try await expectTableEqualsFullSync(bed, "after other was deleted")
            #expect(!afterDelete.contains("kt/other"), "the deleted Service's elements and rules are gone:\n\(afterDelete)")
            let gone = try await bed.request(from: bed.clientNS, .tcp, other.clusterTarget("http"), count: 2, timeout: 1)
            #expect(gone.answered == 0, context("the deleted Service no longer answers", gone, bed))
            let flushed = NFTablesListing.emptyServiceChains(try await bed.nftTable() ?? "")
            #expect(flushed.allSatisfy { $0.contains("kt/other") }, "only the deleted Service's chains wait, empty: \(flushed)")

            // The next sync, a second later, deletes the flushed chains.
            try await Task.sleep(for: .milliseconds(1100))
            web.endpoints = [1, 2]
            try bed.writeManifest("web.yaml", web.yaml)
            try await expectTableEqualsFullSync(bed, "after web got backend-1 back")
            let listing = try await bed.waitForNFTables("the deleted Service's chains deleted") { !$0.contains("kt/other") }
            #expect(NFTablesListing.emptyServiceChains(listing).isEmpty, "no empty service chains remain:\n\(listing)")
            let both = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 20)
            expectAnswered(both, count: 20, backends: ["backend-1", "backend-2"], "web with both endpoints again", bed)
        }
    }

    @Test("A deleted or flushed table is noticed and rebuilt by a full sync")
    func externalDeleteIsRepaired() async throws {
        try await TestBed.with(.init(label: "nftext")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices([web.portName("http")])

            try await bed.exec(checked: bed.nodeNS, ["nft", "flush", "table", "ip", "kube-proxy"])
            try await expectTableEqualsFullSync(bed, "after `nft flush table ip kube-proxy`", timeout: .seconds(20))
            try await bed.exec(checked: bed.nodeNS, ["nft", "delete", "table", "ip", "kube-proxy"])
            try await expectTableEqualsFullSync(bed, "after `nft delete table ip kube-proxy`", timeout: .seconds(20))
            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 10)
            expectAnswered(tcp, count: 10, backends: ["backend-1", "backend-2"], "web after the repair", bed)
        }
    }

    @Test("Mode switches iptables -> nftables -> iptables: served after each, nothing of the previous mode left")
    func modeSwitch() async throws {
        try await TestBed.with(.init(label: "nftsw")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)

            try bed.startSluice()
            try await bed.waitForServices([web.portName("http")])
            let viaIPTables = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 10)
            expectAnswered(viaIPTables, count: 10, backends: ["backend-1", "backend-2"], "iptables mode", bed)
            #expect(await bed.stopSluice() == 0)

            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices([web.portName("http")])
            let viaNFTables = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 10)
            expectAnswered(viaNFTables, count: 10, backends: ["backend-1", "backend-2"], "nftables mode after iptables", bed)
            for table in [Table.nat, .filter] {
                let left = kubeLines(try await bed.save(table))
                #expect(left.isEmpty, "KUBE- chains left in \(table.rawValue) after the switch to nftables: \(left)")
            }
            #expect(await bed.stopSluice() == 0)

            try bed.startSluice()
            try await bed.waitForServices([web.portName("http")])
            let back = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 10)
            expectAnswered(back, count: 10, backends: ["backend-1", "backend-2"], "iptables mode after nftables", bed)
            let tables = try await bed.nftTables()
            #expect(!tables.contains("kube-proxy"), "the nftables tables are gone after the switch back: \(tables)")
        }
    }

    @Test("Dual-stack: the ip6 kube-proxy table carries TCP and UDP to both IPv6 backends, beside the ip table")
    func dualStack() async throws {
        try await TestBed.with(.init(label: "nftds", dualStack: true)) { bed in
            try bed.writeManifest("web.yaml", DualStackKernelTests.yaml)
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices(["kt/web:http", "kt/web:dns"])
            var v6 = ""
            for _ in 0..<100 {
                v6 = try await bed.nftTable("ip6") ?? ""
                if v6.contains("fd00:96::10 . tcp . 80") { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(v6.contains("fd00:96::10 . tcp . 80"), "the IPv6 ClusterIP in table ip6 kube-proxy:\n\(v6)")
            #expect(v6.contains("dnat to [\(TestNet.backendIPv6(2))]:\(TestNet.backendTCPPort)"), "\(v6)")
            #expect(!v6.contains("10.96.0.10"), "IPv4 addresses in the ip6 table:\n\(v6)")
            let v4 = try await bed.nftTable("ip") ?? ""
            #expect(!v4.contains("fd00:"), "IPv6 addresses in the ip table:\n\(v4)")

            // The very first IPv6 connection after the ip6 table appears sometimes times out
            // (about half the runs on a loaded machine; the next 29 are answered). Not yet
            // understood; the counted requests start once one connection has been answered.
            for _ in 0..<20 {
                if try await bed.request(from: bed.clientNS, .tcp, "[fd00:96::10]:80", count: 1).answered == 1 { break }
            }
            let tcp6 = try await bed.request(from: bed.clientNS, .tcp, "[fd00:96::10]:80", count: 30, showSource: true)
            expectAnswered(tcp6, count: 30, backends: ["backend-1", "backend-2"], "30 TCP requests to [fd00:96::10]:80", bed)
            #expect(Set(tcp6.sources.compactMap { $0 }) == [TestNet.clientIPv6], context("IPv6 TCP sources", tcp6, bed))
            let udp6 = try await bed.request(from: bed.clientNS, .udp, "[fd00:96::10]:53", count: 30)
            expectAnswered(udp6, count: 30, backends: ["backend-1", "backend-2"], "30 UDP requests to [fd00:96::10]:53", bed)
            let tcp4 = try await bed.request(from: bed.clientNS, .tcp, "10.96.0.10:80", count: 10)
            expectAnswered(tcp4, count: 10, "10 TCP requests to the IPv4 ClusterIP of the same Service", bed)
        }
    }

    @Test("sluice nft-apply (large transactions in a child) applies a transaction, and names the error of a bad one")
    func nftApplyChild() async throws {
        try await TestBed.with(.init(backends: 1, ext: false, label: "nftapp")) { bed in
            let ok = await bed.exec(bed.nodeNS, [bed.sluiceBinary, "nft-apply"],
                                    input: "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\nadd chain ip kube-proxy services\n")
            #expect(ok.succeeded, "\(ok)")
            let table = try await bed.nftTable() ?? ""
            #expect(table.contains("chain services"), "\(table)")
            let bad = await bed.exec(bed.nodeNS, [bed.sluiceBinary, "nft-apply"], input: "add rule ip kube-proxy nowhere accept\n")
            #expect(bad.status == 1)
            #expect(bad.stderr.contains("Error:") && bad.stderr.contains("nowhere"), "\(bad)")
        }
    }

    @Test("--cleanup deletes the nftables tables")
    func cleanupRemovesTables() async throws {
        try await TestBed.with(.init(label: "nftcln")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices([web.portName("http")])
            #expect(await bed.stopSluice() == 0)
            #expect(try await bed.nftTable() != nil, "the rules stay in place when sluice stops")
            let r = await bed.runSluice(["--cleanup"])
            #expect(r.succeeded, "\(r)")
            let tables = try await bed.nftTables()
            #expect(!tables.contains("kube-proxy"), "tables after --cleanup: \(tables)")
        }
    }
}

@Suite("nft listing normalisation")
struct NFTablesListingTests {
    let a = """
    table ip kube-proxy {
    \tcomment "rules for kube-proxy"
    \tmap service-ips {
    \t\ttype ipv4_addr . inet_proto . inet_service : verdict
    \t\telements = { 10.96.0.11 . tcp . 80 : goto service-B-kt/b/tcp/http,
    \t\t\t     10.96.0.10 . tcp . 80 : goto service-A-kt/a/tcp/http }
    \t}
    \tchain service-A-kt/a/tcp/http {
    \t\tip daddr 10.96.0.10 jump mark-for-masquerade
    \t\tgoto endpoint-A
    \t}
    \tchain service-B-kt/b/tcp/http {
    \t}
    \tchain services {
    \t\tip daddr . meta l4proto . th dport vmap @service-ips
    \t}
    }

    """

    @Test func orderOfObjectsAndElementsDoesNotMatterButRuleOrderDoes() {
        let reordered = """
        table ip kube-proxy {
        \tcomment "rules for kube-proxy"
        \tchain services {
        \t\tip daddr . meta l4proto . th dport vmap @service-ips
        \t}
        \tchain service-A-kt/a/tcp/http {
        \t\tip daddr 10.96.0.10 jump mark-for-masquerade
        \t\tgoto endpoint-A
        \t}
        \tmap service-ips {
        \t\ttype ipv4_addr . inet_proto . inet_service : verdict
        \t\telements = { 10.96.0.10 . tcp . 80 : goto service-A-kt/a/tcp/http, 10.96.0.11 . tcp . 80 : goto service-B-kt/b/tcp/http }
        \t}
        }

        """
        #expect(NFTablesListing.normalise(a) == NFTablesListing.normalise(reordered))
        #expect(NFTablesListing.normalise(a).contains("goto endpoint-A"))
        let swapped = reordered.replacingOccurrences(of: "\t\tip daddr 10.96.0.10 jump mark-for-masquerade\n\t\tgoto endpoint-A",
                                                     with: "\t\tgoto endpoint-A\n\t\tip daddr 10.96.0.10 jump mark-for-masquerade")
        #expect(swapped != reordered)
        #expect(NFTablesListing.normalise(a) != NFTablesListing.normalise(swapped))
        let otherElement = reordered.replacingOccurrences(of: "10.96.0.11 . tcp . 80", with: "10.96.0.12 . tcp . 80")
        #expect(NFTablesListing.normalise(a) != NFTablesListing.normalise(otherElement))
    }

    @Test func emptyServiceChainsAreFound() {
        #expect(NFTablesListing.emptyServiceChains(a) == ["service-B-kt/b/tcp/http"])
    }
}
