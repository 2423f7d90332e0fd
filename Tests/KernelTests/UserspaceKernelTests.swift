// Real-kernel tests, userspace mode: sluice --proxy-mode userspace in the node namespace
// relays real TCP and UDP traffic from the client pod, the external host and the node
// itself, through the portal rules (REDIRECT / DNAT to the relay port) to the backends.

import Foundation
import IPTables
import SluiceTesting
import Userspace
import Testing

/// Lines of `iptables -S CHAIN` in the nat table (empty when the chain does not exist).
private func natRules(_ bed: TestBed, _ chain: String) async -> [String] {
    let r = await bed.iptables(["-w", "5", "-t", "nat", "-S", chain])
    return r.stdout.split(separator: "\n").map(String.init).filter { $0.hasPrefix("-A ") }
}

/// `--udp-timeout` for these tests: a flow closes this long after its last datagram, so the
/// production 250 ms would lose the reply of a backend slowed down by a loaded CI machine.
/// (The idle closing itself is tested on loopback, in UserspaceTests.)
private let udpTimeout = "5s"

/// No two consecutive answers from the same backend (strict round robin).
private func alternates(_ r: ClientResult) -> Bool {
    zip(r.answers, r.answers.dropFirst()).allSatisfy { $0 != $1 }
}

@Suite("Kernel (userspace): relays", .serialized, .requiresRoot, .timeLimit(.minutes(3)))
struct UserspaceKernelTests {
    @Test("Portal rules in the kernel read back exactly as written, and the jumps sit first and last")
    func rulesAsWritten() async throws {
        try await TestBed.with(.init(label: "usrules")) { bed in
            var web = webService()
            web.type = "NodePort"
            web.ports = [.http(nodePort: 30080), .dns()]
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            let nat = try await bed.waitForPortals([web.portName("http"), web.portName("dns")])
            let http = try #require(TestBed.relayPort(in: nat, for: web.portName("http")), "\(nat)")
            let dns = try #require(TestBed.relayPort(in: nat, for: web.portName("dns")), "\(nat)")
            #expect(http != dns)
            let c = "\"\(web.portName("http"))\""
            #expect(await natRules(bed, Chain.nodePortContainer) == [
                "-A KUBE-NODEPORT-CONTAINER -p tcp -m comment --comment \(c) -m tcp --dport 30080 -j REDIRECT --to-ports \(http)",
            ])
            #expect(await natRules(bed, Chain.nodePortHost) == [
                "-A KUBE-NODEPORT-HOST -p tcp -m comment --comment \(c) -m tcp --dport 30080 -j DNAT --to-destination \(TestNet.nodeIP):\(http)",
            ])
            let d = "\"\(web.portName("dns"))\""
            #expect(await natRules(bed, Chain.portalsContainer) == [
                "-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p udp -m comment --comment \(d) -m udp --dport 53 -j REDIRECT --to-ports \(dns)",
                "-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment \(c) -m tcp --dport 80 -j REDIRECT --to-ports \(http)",
            ])
            #expect(await natRules(bed, Chain.portalsHost) == [
                "-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p udp -m comment --comment \(d) -m udp --dport 53 -j DNAT --to-destination \(TestNet.nodeIP):\(dns)",
                "-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment \(c) -m tcp --dport 80 -j DNAT --to-destination \(TestNet.nodeIP):\(http)",
            ])
            let prerouting = await natRules(bed, "PREROUTING")
            #expect(prerouting.first?.hasSuffix("-j KUBE-PORTALS-CONTAINER") == true, "\(prerouting)")
            #expect(prerouting.last?.hasSuffix("-j KUBE-NODEPORT-CONTAINER") == true, "\(prerouting)")
            let output = await natRules(bed, "OUTPUT")
            #expect(output.first?.hasSuffix("-j KUBE-PORTALS-HOST") == true, "\(output)")
            #expect(output.last?.hasSuffix("-j KUBE-NODEPORT-HOST") == true, "\(output)")
            // Userspace mode writes nothing of the iptables mode.
            #expect(!nat.contains("KUBE-SERVICES"))

            // --cleanup removes the chains and the jumps.
            _ = await bed.stopSluice()
            let cleanup = await bed.runSluice(["--cleanup"])
            #expect(cleanup.succeeded, "\(cleanup)")
            let after = try await bed.save(.nat)
            #expect(!after.contains("KUBE-"), "left after --cleanup:\n\(after)")
        }
    }

    @Test("ClusterIP: TCP and UDP from a pod and from the node itself")
    func clusterIPFromPodAndNode() async throws {
        try await TestBed.with(.init(label: "uscip")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([web.portName("http"), web.portName("dns")])

            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 10, timeout: 5, showSource: true)
            expectAnswered(tcp, count: 10, backends: ["backend-1", "backend-2"], "10 TCP requests from the pod", bed)
            // The relay makes its own connection: backends see the node's address on their link.
            let gateways: Set<String> = [TestNet.backendGateway(1), TestNet.backendGateway(2)]
            #expect(Set(tcp.sources.compactMap { $0 }).isSubset(of: gateways), context("sources seen by the backends", tcp, bed))

            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 10, timeout: 5)
            expectAnswered(udp, count: 10, backends: ["backend-1", "backend-2"], "10 UDP requests from the pod", bed)

            let nodeTCP = try await bed.request(from: bed.nodeNS, .tcp, web.clusterTarget("http"), count: 10, timeout: 5)
            expectAnswered(nodeTCP, count: 10, backends: ["backend-1", "backend-2"], "10 TCP requests from the node", bed)

            let nodeUDP = try await bed.request(from: bed.nodeNS, .udp, web.clusterTarget("dns"), count: 10, timeout: 5)
            expectAnswered(nodeUDP, count: 10, backends: ["backend-1", "backend-2"], "10 UDP requests from the node", bed)
        }
    }

    @Test("NodePort: TCP and UDP from a pod, from outside and from the node itself")
    func nodePortFromPodOutsideAndNode() async throws {
        try await TestBed.with(.init(label: "usnp")) { bed in
            var web = webService()
            web.type = "NodePort"
            web.ports = [.http(nodePort: 30080), .dns(nodePort: 30053)]
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([web.portName("http"), web.portName("dns")])
            try await bed.waitForRules(.nat, "NodePort rules") { $0.contains("--dport 30080") && $0.contains("--dport 30053") }

            // A pod reaches the node on its own link's address.
            let podTCP = try await bed.request(from: bed.clientNS, .tcp, "\(TestNet.clientGateway):30080", count: 6, timeout: 5)
            expectAnswered(podTCP, count: 6, backends: ["backend-1", "backend-2"], "TCP NodePort from the pod", bed)
            let podUDP = try await bed.request(from: bed.clientNS, .udp, "\(TestNet.clientGateway):30053", count: 6, timeout: 5)
            expectAnswered(podUDP, count: 6, backends: ["backend-1", "backend-2"], "UDP NodePort from the pod", bed)

            let extTCP = try await bed.request(from: bed.extNS, .tcp, "\(TestNet.nodeIP):30080", count: 6, timeout: 5)
            expectAnswered(extTCP, count: 6, backends: ["backend-1", "backend-2"], "TCP NodePort from outside", bed)
            let extUDP = try await bed.request(from: bed.extNS, .udp, "\(TestNet.nodeIP):30053", count: 6, timeout: 5)
            expectAnswered(extUDP, count: 6, backends: ["backend-1", "backend-2"], "UDP NodePort from outside", bed)

            let nodeTCP = try await bed.request(from: bed.nodeNS, .tcp, "\(TestNet.nodeIP):30080", count: 6, timeout: 5)
            expectAnswered(nodeTCP, count: 6, backends: ["backend-1", "backend-2"], "TCP NodePort from the node", bed)
            let nodeUDP = try await bed.request(from: bed.nodeNS, .udp, "\(TestNet.nodeIP):30053", count: 6, timeout: 5)
            expectAnswered(nodeUDP, count: 6, backends: ["backend-1", "backend-2"], "UDP NodePort from the node", bed)
            let localhost = try await bed.request(from: bed.nodeNS, .tcp, "127.0.0.1:30080", count: 4, timeout: 5)
            expectAnswered(localhost, count: 4, "TCP NodePort on 127.0.0.1 from the node", bed)
        }
    }

    @Test("Round robin over two backends: consecutive connections and UDP flows alternate")
    func roundRobin() async throws {
        try await TestBed.with(.init(label: "usrr")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([web.portName("http"), web.portName("dns")])

            let tcp = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 20, timeout: 5)
            expectAnswered(tcp, count: 20, "20 TCP requests", bed)
            #expect(tcp.backendCounts == ["backend-1": 10, "backend-2": 10], context("TCP spread", tcp, bed))
            #expect(alternates(tcp), context("TCP round robin", tcp, bed))

            // Each request from a fresh socket is a new flow, so the next backend.
            let udp = try await bed.request(from: bed.clientNS, .udp, web.clusterTarget("dns"), count: 10, timeout: 5)
            expectAnswered(udp, count: 10, "10 UDP requests", bed)
            #expect(udp.backendCounts == ["backend-1": 5, "backend-2": 5], context("UDP spread", udp, bed))
            #expect(alternates(udp), context("UDP round robin", udp, bed))
        }
    }

    @Test("sessionAffinity ClientIP pins the client to one backend (TCP and UDP)")
    func clientIPAffinity() async throws {
        try await TestBed.with(.init(label: "usaff")) { bed in
            var sticky = webService(name: "sticky", clusterIP: "10.96.0.11")
            sticky.clientIPAffinitySeconds = 10800
            try bed.writeManifest("sticky.yaml", sticky.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([sticky.portName("http"), sticky.portName("dns")])

            let tcp = try await bed.request(from: bed.clientNS, .tcp, sticky.clusterTarget("http"), count: 20, timeout: 5)
            expectAnswered(tcp, count: 20, "20 TCP requests with affinity", bed)
            #expect(tcp.backends.count == 1, context("affinity: one backend for every TCP request", tcp, bed))

            let udp = try await bed.request(from: bed.clientNS, .udp, sticky.clusterTarget("dns"), count: 10, timeout: 5)
            expectAnswered(udp, count: 10, "10 UDP requests with affinity", bed)
            #expect(udp.backends.count == 1, context("affinity: one backend for every UDP flow", udp, bed))
        }
    }

    @Test("One backend down (still listed): every TCP request is answered by the other")
    func oneBackendDown() async throws {
        try await TestBed.with(.init(label: "usdown")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([web.portName("http")])
            bed.stopBackend(2)

            let fromPod = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 20, timeout: 5)
            expectAnswered(fromPod, count: 20, backends: ["backend-1"], "20 TCP requests with backend-2 down", bed)
            let fromNode = try await bed.request(from: bed.nodeNS, .tcp, web.clusterTarget("http"), count: 10, timeout: 5)
            expectAnswered(fromNode, count: 10, backends: ["backend-1"], "10 TCP requests from the node with backend-2 down", bed)
        }
    }

    @Test("A Service without endpoints keeps its rules; its connections are reset, not left hanging")
    func noEndpoints() async throws {
        try await TestBed.with(.init(label: "usnone")) { bed in
            var empty = webService(name: "empty", clusterIP: "10.96.0.12")
            empty.endpoints = []
            try bed.writeManifest("empty.yaml", empty.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([empty.portName("http"), empty.portName("dns")])
            let tcp = try await bed.request(from: bed.clientNS, .tcp, empty.clusterTarget("http"), count: 3, timeout: 3)
            #expect(tcp.answered == 0)
            #expect(tcp.count("TIMEOUT") == 0, context("a connection to a Service without endpoints must end at once", tcp, bed))
        }
    }

    @Test("A NodePort in use by this proxy cannot be bound by another process, and is free once the Service is gone")
    func nodePortHeld() async throws {
        try await TestBed.with(.init(label: "ushold")) { bed in
            var web = webService()
            web.type = "NodePort"
            web.ports = [.http(nodePort: 30080), .dns(nodePort: 30053)]
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([web.portName("http"), web.portName("dns")])
            // The listener is bound before the rules are written, so it is held by now.
            #expect(try await bed.tryBind(.tcp, port: 30080) == "EADDRINUSE")
            #expect(try await bed.tryBind(.udp, port: 30053) == "EADDRINUSE")
            // It shows as a socket of sluice.
            let ss = await bed.exec(bed.nodeNS, ["ss", "-ltnp", "sport = :30080"])
            #expect(ss.stdout.contains("sluice"), "\(ss.stdout)")

            try bed.removeManifest("web.yaml")
            try await bed.waitForRules(.nat, "portal rules removed") { !$0.contains(web.portName("http")) }
            var tcpFree = false, udpFree = false
            let deadline = ContinuousClock.now + .seconds(5)
            while ContinuousClock.now < deadline && !(tcpFree && udpFree) {
                tcpFree = try await bed.tryBind(.tcp, port: 30080) == "OK"
                udpFree = try await bed.tryBind(.udp, port: 30053) == "OK"
                if !(tcpFree && udpFree) { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect(tcpFree, "TCP NodePort 30080 still held after the Service was deleted\n\(bed.sluiceLog)")
            #expect(udpFree, "UDP NodePort 30053 still held after the Service was deleted\n\(bed.sluiceLog)")
        }
    }

    @Test("Half-closed TCP streams deliver all bytes: 1 MiB each way through the ClusterIP")
    func halfClose() async throws {
        try await TestBed.with(.init(label: "ushalf")) { bed in
            var echo = webService(name: "echo", clusterIP: "10.96.0.14")
            echo.ports = [TestServicePort(name: "echo", proto: "TCP", port: 7, targetPort: TestNet.backendEchoPort)]
            try bed.writeManifest("echo.yaml", echo.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([echo.portName("echo")])
            for from in [bed.clientNS, bed.nodeNS] {
                let out = try await bed.relayTest(from: from, "halfclose", echo.clusterTarget("echo"), ["--bytes", "\(1 << 20)"])
                #expect(out == ["OK \(1 << 20)"], "half-close from \(from): \(out)\n\(bed.sluice?.logTail(20) ?? "")")
            }
        }
    }

    @Test("200 concurrent connections through the ClusterIP all complete")
    func concurrentConnections() async throws {
        try await TestBed.with(.init(label: "usconc")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            try await bed.waitForPortals([web.portName("http")])
            let out = try await bed.relayTest(from: bed.clientNS, "concurrent", web.clusterTarget("http"), ["--count", "200"])
            #expect(out.first == "ok=200 failed=0", "\(out.prefix(10))\n\(bed.sluice?.logTail(20) ?? "")")
            // Both backends serve (about 100 each; a backend whose accept queue overflows under
            // load makes the relay retry on the other).
            #expect(out.dropFirst().prefix(2).map { $0.split(separator: " ").first.map(String.init) ?? "" } == ["backend-1", "backend-2"],
                    "\(out.prefix(5))")
        }
    }

    @Test("Endpoint changes keep established relays to ready backends; a backend that goes away has its relays closed")
    func endpointChanges() async throws {
        try await TestBed.with(.init(backends: 3, label: "uskeep")) { bed in
            var echo = webService(name: "echo", clusterIP: "10.96.0.15")
            echo.ports = [TestServicePort(name: "echo", proto: "TCP", port: 7, targetPort: TestNet.backendEchoPort)]
            echo.endpoints = [1, 2]
            try bed.writeManifest("echo.yaml", echo.yaml)
            try bed.startUserspaceSluice(udpTimeout: udpTimeout)
            let before = try await bed.waitForPortals([echo.portName("echo")])
            let port = TestBed.relayPort(in: before, for: echo.portName("echo"))

            // Two long-lived connections, made one after the other: round robin puts the first
            // on backend-1 and the second on backend-2.
            func hold(_ label: String) async throws -> (BackgroundProcess, String) {
                let (p, trigger) = try bed.startHold(from: bed.clientNS, echo.clusterTarget("echo"), label: label)
                let deadline = ContinuousClock.now + .seconds(10)
                while !p.log().contains("connected") && p.isRunning && ContinuousClock.now < deadline {
                    try await Task.sleep(for: .milliseconds(50))
                }
                #expect(p.log().contains("connected"), "hold \(label): \(p.log())")
                return (p, trigger)
            }
            let (toOne, triggerOne) = try await hold("one")
            defer { toOne.stop() }
            let (toTwo, triggerTwo) = try await hold("two")
            defer { toTwo.stop() }

            // backend-3 joins, then backend-1 leaves; the relay port never changes.
            let syncs = bed.syncCount
            echo.endpoints = [1, 2, 3]
            try bed.writeManifest("echo.yaml", echo.yaml)
            try await bed.waitForSyncs(after: syncs)
            #expect(TestBed.relayPort(in: try await bed.save(.nat), for: echo.portName("echo")) == port)
            let syncs2 = bed.syncCount
            echo.endpoints = [2, 3]
            try bed.writeManifest("echo.yaml", echo.yaml)
            try await bed.waitForSyncs(after: syncs2)
            #expect(TestBed.relayPort(in: try await bed.save(.nat), for: echo.portName("echo")) == port)

            func outcome(_ p: BackgroundProcess, _ trigger: String) async throws -> String {
                _ = FileManager.default.createFile(atPath: trigger, contents: nil)
                let deadline = ContinuousClock.now + .seconds(15)
                while p.isRunning && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
                return String(p.log().split(separator: "\n").last ?? "")
            }
            #expect(try await outcome(toOne, triggerOne) == "closed", "the relay to backend-1 (gone) must be closed: \(toOne.log())")
            #expect(try await outcome(toTwo, triggerTwo) == "alive", "the relay to backend-2 (still ready) must stay: \(toTwo.log())\n\(bed.sluiceLog)")

            // New connections still go through.
            let out = try await bed.relayTest(from: bed.clientNS, "halfclose", echo.clusterTarget("echo"), ["--bytes", "1000"])
            #expect(out == ["OK 1000"])
        }
    }
}
