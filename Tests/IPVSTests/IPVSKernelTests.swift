// IPVS mode against a real kernel. These tests need the IPVS generic-netlink family, which
// the CI host kernel lacks: `make test` runs them inside user-mode Linux with
//
//   scripts/uml-run.sh .build/debug/SluicePackageTests.xctest --testing-library swift-testing --filter IPVSKernelTests
//
// and on the host they are skipped, saying why. The end-to-end test builds its own network
// namespaces (node, client pod, two backend pods, an outside host); the client-level tests
// touch the root namespace and so run only inside the UML guest (UML_RUN=1).

import Foundation
import IPVS
import Netlink
import SluiceCore
import Testing

/// The system Python without `site` (-S): half the start-up time in UML.
private let python = "/usr/bin/python3"
private let pythonArgs = [python, "-S"]
private let testbed = repositoryRoot.appendingPathComponent("scripts/testbed").path
private let skipReason: Comment = "needs a kernel with IPVS (CONFIG_IP_VS) and dummy devices; make test runs it inside user-mode Linux (scripts/uml-run.sh)"
private let umlOnly: Comment = "touches the root network namespace: runs only inside the user-mode Linux guest (UML_RUN=1) with IPVS"

/// The network of the end-to-end test, all in namespaces named `<prefix>-<role>`:
///
///   client  eth0 10.244.1.10/24 -- vcl  10.244.1.1/24   node (sluice, IPVS, kube-ipvs0)
///   be1     eth0 10.244.2.10/24 -- vbe1 10.244.2.1/24   backend-1 :8080/tcp :5353/udp :9000/tcp (holds)
///   be2     eth0 10.244.3.10/24 -- vbe2 10.244.3.1/24   backend-2 (the same)
///   ext     eth0 192.168.50.10/24 -- vext 192.168.50.1/24 (the node IP; only its /24 is routed)
final class Testbed: @unchecked Sendable {
    let prefix = "sipvs\(getpid() % 100000)"
    var namespaces: [String] = []
    var processes: [Background] = []
    let dir: URL
    let manifests: URL

    init() throws {
        let base = Kernel.inUML ? URL(fileURLWithPath: "/run") : FileManager.default.temporaryDirectory
        dir = base.appendingPathComponent("sluice-ipvs-kernel-\(getpid())")
        manifests = dir.appendingPathComponent("manifests")
        try FileManager.default.createDirectory(at: manifests, withIntermediateDirectories: true)
    }

    func ns(_ role: String) -> String { "\(prefix)-\(role)" }

    func sh(_ args: [String], input: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) async -> String {
        let r = await Kernel.run(args, input: input)
        #expect(r.status == 0, "\(args.joined(separator: " ")) \(input ?? ""): \(r.out)", sourceLocation: sourceLocation)
        return r.out
    }

    func node(_ args: [String]) async -> (status: Int32, out: String) { await Kernel.run(Kernel.inNS(ns("node"), args)) }

    func up() async throws {
        let t0 = ContinuousClock.now
        // Few commands: fork/exec is slow in UML (~60 ms), so one `ip -batch` per namespace.
        let roles = ["node", "client", "be1", "be2", "ext"]
        let links: [(String, String, String, String)] = [
            ("client", "vcl", "10.244.1.10", "10.244.1.1"), ("be1", "vbe1", "10.244.2.10", "10.244.2.1"),
            ("be2", "vbe2", "10.244.3.10", "10.244.3.1"), ("ext", "vext", "192.168.50.10", "192.168.50.1"),
        ]
        namespaces = roles.map(ns)
        var root = roles.map { "netns add \(ns($0))\n" }.joined()
        for (role, nodeSide, _, _) in links {
            root += "link add \(nodeSide) netns \(ns("node")) type veth peer name eth0 netns \(ns(role))\n"
        }
        _ = await sh(["ip", "-batch", "-"], input: root)
        var node = "link set lo up\n"
        for (role, nodeSide, podIP, nodeIP) in links {
            node += "addr add \(nodeIP)/24 dev \(nodeSide)\nlink set \(nodeSide) up\n"
            var pod = "link set lo up\naddr add \(podIP)/24 dev eth0\nlink set eth0 up\n"
            if role != "ext" {
                // Pods route the pod and service ranges through the node; no default route.
                pod += "route add 10.244.0.0/16 via \(nodeIP)\nroute add 10.96.0.0/12 via \(nodeIP)\n"
            }
            _ = await sh(["ip", "-n", ns(role), "-batch", "-"], input: pod)
        }
        _ = await sh(["ip", "-n", ns("node"), "-batch", "-"], input: node)
        for (role, name, ip) in [("be1", "backend-1", "10.244.2.10"), ("be2", "backend-2", "10.244.3.10")] {
            processes.append(try Background(Kernel.inNS(ns(role), pythonArgs + ["\(testbed)/backend.py", "--name", name, "--bind", ip,
                                                                    "--tcp-port", "8080", "--udp-port", "5353"]),
                                            log: dir.appendingPathComponent("\(role).log")))
            processes.append(try Background(Kernel.inNS(ns(role), pythonArgs + ["\(testbed)/hold.py", "serve", "--name", name, "--bind", ip,
                                                                    "--port", "9000"]),
                                            log: dir.appendingPathComponent("\(role)-hold.log")))
        }
        print("[IPVSKernelTests] namespaces and links: \(t0.duration(to: ContinuousClock.now))")
        let ready = await Kernel.waitUntil(.seconds(20)) {
            self.processes.allSatisfy { $0.output.contains("ready") }
        }
        #expect(ready, "backends did not start: \(processes.map(\.output))")
        print("[IPVSKernelTests] backends ready: \(t0.duration(to: ContinuousClock.now))")
    }

    func down() async {
        for p in processes where p.isRunning { kill(p.process.processIdentifier, SIGKILL) }
        for n in namespaces.reversed() {
            for pid in (await Kernel.run(["ip", "netns", "pids", n])).out.split(separator: "\n") {
                if let p = Int32(pid) { kill(p, SIGKILL) }
            }
            await Kernel.run(["ip", "netns", "del", n])
        }
        try? FileManager.default.removeItem(at: dir)
    }

    func write(_ name: String, _ text: String) throws {
        let tmp = dir.appendingPathComponent(".\(name).tmp")
        try text.write(to: tmp, atomically: false, encoding: .utf8)
        guard rename(tmp.path, manifests.appendingPathComponent(name).path) == 0 else {
            throw CommandError(command: "rename \(tmp.path)", status: nil, message: "errno \(errno)")
        }
    }

    func remove(_ name: String) throws { try FileManager.default.removeItem(at: manifests.appendingPathComponent(name)) }

    func startSluice(_ logName: String) throws -> Background {
        let p = try Background(Kernel.inNS(ns("node"), [
            sluiceBinary, "--proxy-mode", "ipvs", "--manifests", manifests.path, "--hostname-override", "node-1",
            "--node-ip", "192.168.50.1", "--cluster-cidr", "10.244.0.0/16", "--nodeport-addresses", "192.168.50.1/32",
            "--min-sync-period", "100ms", "--ipvs-graceful-period", "4s", "--iptables-backend", "legacy",
        ]), log: dir.appendingPathComponent(logName))
        processes.append(p)
        return p
    }

    /// `ipvsadm -Sn` in the node namespace, lines sorted.
    func ipvsSave() async -> [String] {
        (await node(["ipvsadm", "-Sn"])).out.split(separator: "\n").map(String.init).sorted()
    }

    /// Responses of `count` requests from `role` to `target`.
    func requests(from role: String, _ proto: String, _ target: String, count: Int, showSource: Bool = false) async -> [String] {
        let args = pythonArgs + ["\(testbed)/client.py", "--proto", proto, "--target", target, "--count", "\(count)", "--timeout", "3"]
            + (showSource ? ["--show-source"] : [])
        return (await Kernel.run(Kernel.inNS(ns(role), args))).out.split(separator: "\n").map(String.init)
    }
}

private func slice(_ name: String, service: String, ports: String, endpoints: [String]) -> String {
    """
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: \(name), namespace: demo, labels: {kubernetes.io/service-name: \(service)}}
    addressType: IPv4
    ports: \(ports)
    endpoints: [\(endpoints.map { "{addresses: [\($0)], conditions: {ready: true}, nodeName: node-1}" }.joined(separator: ", "))]

    """
}

private let webYAML = """
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: demo}
    spec:
      type: NodePort
      clusterIP: 10.96.0.10
      ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
    ---

    """ + slice("web-1", service: "web", ports: "[{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]",
                endpoints: ["10.244.2.10", "10.244.3.10"])

private let stickyYAML = """
    apiVersion: v1
    kind: Service
    metadata: {name: sticky, namespace: demo}
    spec:
      clusterIP: 10.96.0.20
      sessionAffinity: ClientIP
      ports: [{name: http, port: 80, protocol: TCP}]
    ---

    """ + slice("sticky-1", service: "sticky", ports: "[{name: http, port: 8080, protocol: TCP}]", endpoints: ["10.244.2.10", "10.244.3.10"])

private let holdService = """
    apiVersion: v1
    kind: Service
    metadata: {name: hold, namespace: demo}
    spec:
      clusterIP: 10.96.0.30
      ports: [{name: hold, port: 9000, protocol: TCP}]

    """

private func holdSlice(_ endpoints: [String]) -> String {
    slice("hold-1", service: "hold", ports: "[{name: hold, port: 9000, protocol: TCP}]", endpoints: endpoints)
}

private let backendIP = ["backend-1": "10.244.2.10", "backend-2": "10.244.3.10"]

/// `ipvsadm -Ln` as virtual server line -> its real server lines (white space collapsed, sorted).
func parseIPVSList(_ text: String) -> [String: [String]] {
    var out: [String: [String]] = [:]
    var current: String?
    for raw in text.split(separator: "\n") {
        let line = raw.split(separator: " ").joined(separator: " ")
        if line.hasPrefix("TCP ") || line.hasPrefix("UDP ") || line.hasPrefix("SCTP ") {
            current = line
            out[line] = []
        } else if line.hasPrefix("-> "), let c = current, !line.hasPrefix("-> RemoteAddress") {
            out[c, default: []].append(line)
        }
    }
    return out.mapValues { $0.sorted() }
}

/// `ipset list` as set name -> (type, members sorted).
func parseIPSetList(_ text: String) -> [String: (type: String, members: [String])] {
    var out: [String: (type: String, members: [String])] = [:]
    var name: String?
    var inMembers = false
    for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
        let line = String(raw)
        if line.hasPrefix("Name: ") {
            name = String(line.dropFirst(6))
            inMembers = false
            if let n = name { out[n] = ("", []) }
        } else if line.hasPrefix("Type: "), let n = name {
            out[n]?.type = String(line.dropFirst(6))
        } else if line == "Members:" {
            inMembers = true
        } else if line.isEmpty {
            inMembers = false
        } else if inMembers, let n = name {
            out[n]?.members.append(line)
        }
    }
    return out.mapValues { ($0.type, $0.members.sorted()) }
}

@Suite(.serialized) struct IPVSKernelTests {
    @Test(.enabled(skipReason) { let ipvs = await Kernel.ipvsPresent(); return ipvs && isRoot })
    func ipvsModeEndToEnd() async throws {
        let bed = try Testbed()
        do {
            let t0 = ContinuousClock.now
            try await bed.up()
            print("[IPVSKernelTests] up: \(t0.duration(to: ContinuousClock.now))")
            try bed.write("web.yaml", webYAML)
            try bed.write("sticky.yaml", stickyYAML)
            try bed.write("hold.yaml", holdService)
            try bed.write("hold-slice.yaml", holdSlice(["10.244.2.10", "10.244.3.10"]))
            let clock = ContinuousClock()
            var mark = clock.now
            func step(_ name: String) {
                print("[IPVSKernelTests] \(name): \(mark.duration(to: clock.now))")
                mark = clock.now
            }
            step("test bed up")
            let sluice = try bed.startSluice("sluice-1.log")
            try await programsServicesFromManifests(bed, sluice)
            step("programmed")
            await trafficReachesBothBackends(bed)
            step("traffic")
            await clientIPAffinityPins(bed)
            step("affinity")
            try await removedEndpointDrainsThenIsDeleted(bed)
            step("drain")
            try await drainingEndsAfterTheGracefulPeriod(bed)
            step("graceful period")
            try await deletedServiceRemovesVirtualServerAndAddress(bed)
            step("service deleted")
            await sluice.stop()
            try await restartChangesNothing(bed)
            step("restart")
            await cleanupRemovesEverything(bed)
            step("cleanup")
        } catch {
            Issue.record("\(error)")
        }
        await bed.down()
    }

    /// ipvsadm, ipset and kube-ipvs0 hold exactly the expected state.
    func programsServicesFromManifests(_ bed: Testbed, _ sluice: Background) async throws {
        let expected = """
            -A -t 10.96.0.10:80 -s rr
            -a -t 10.96.0.10:80 -r 10.244.2.10:8080 -m -w 1
            -a -t 10.96.0.10:80 -r 10.244.3.10:8080 -m -w 1
            -A -u 10.96.0.10:53 -s rr
            -a -u 10.96.0.10:53 -r 10.244.2.10:5353 -m -w 1
            -a -u 10.96.0.10:53 -r 10.244.3.10:5353 -m -w 1
            -A -t 10.96.0.20:80 -s rr -p 10800
            -a -t 10.96.0.20:80 -r 10.244.2.10:8080 -m -w 1
            -a -t 10.96.0.20:80 -r 10.244.3.10:8080 -m -w 1
            -A -t 10.96.0.30:9000 -s rr
            -a -t 10.96.0.30:9000 -r 10.244.2.10:9000 -m -w 1
            -a -t 10.96.0.30:9000 -r 10.244.3.10:9000 -m -w 1
            -A -t 192.168.50.1:30080 -s rr
            -a -t 192.168.50.1:30080 -r 10.244.2.10:8080 -m -w 1
            -a -t 192.168.50.1:30080 -r 10.244.3.10:8080 -m -w 1
            -A -u 192.168.50.1:30053 -s rr
            -a -u 192.168.50.1:30053 -r 10.244.2.10:5353 -m -w 1
            -a -u 192.168.50.1:30053 -r 10.244.3.10:5353 -m -w 1
            """.split(separator: "\n").map(String.init).sorted()
        let programmed = await Kernel.waitUntil(.seconds(60)) { await bed.ipvsSave() == expected }
        let programmedState = await bed.ipvsSave()
        #expect(programmed, "ipvsadm -Sn:\n\(programmedState.joined(separator: "\n"))\nsluice log:\n\(sluice.output)")
        #expect(programmedState == expected)

        // ipvsadm -Ln: every virtual server with exactly its real servers (Masq, weight 1, no
        // connection yet).
        let listed = parseIPVSList((await bed.node(["ipvsadm", "-Ln"])).out)
        let rows = { (ips: [String], port: Int) in ips.map { "-> \($0):\(port) Masq 1 0 0" } }
        let both = ["10.244.2.10", "10.244.3.10"]
        #expect(listed == [
            "TCP 10.96.0.10:80 rr": rows(both, 8080),
            "UDP 10.96.0.10:53 rr": rows(both, 5353),
            "TCP 10.96.0.20:80 rr persistent 10800": rows(both, 8080),
            "TCP 10.96.0.30:9000 rr": rows(both, 9000),
            "TCP 192.168.50.1:30080 rr": rows(both, 8080),
            "UDP 192.168.50.1:30053 rr": rows(both, 5353),
        ])

        // ipset: every member of every set.
        let members = (await bed.node(["ipset", "save"])).out.split(separator: "\n").filter { $0.hasPrefix("add ") }.map(String.init).sorted()
        #expect(members == """
            add KUBE-CLUSTER-IP 10.96.0.10,tcp:80
            add KUBE-CLUSTER-IP 10.96.0.10,udp:53
            add KUBE-CLUSTER-IP 10.96.0.20,tcp:80
            add KUBE-CLUSTER-IP 10.96.0.30,tcp:9000
            add KUBE-IPVS-IPS 10.96.0.10
            add KUBE-IPVS-IPS 10.96.0.20
            add KUBE-IPVS-IPS 10.96.0.30
            add KUBE-LOOP-BACK 10.244.2.10,tcp:8080,10.244.2.10
            add KUBE-LOOP-BACK 10.244.2.10,tcp:9000,10.244.2.10
            add KUBE-LOOP-BACK 10.244.2.10,udp:5353,10.244.2.10
            add KUBE-LOOP-BACK 10.244.3.10,tcp:8080,10.244.3.10
            add KUBE-LOOP-BACK 10.244.3.10,tcp:9000,10.244.3.10
            add KUBE-LOOP-BACK 10.244.3.10,udp:5353,10.244.3.10
            add KUBE-NODE-PORT-TCP 30080
            add KUBE-NODE-PORT-UDP 30053
            """.split(separator: "\n").map(String.init).sorted())
        // ipset list: the 17 sets with their types, and exactly these members.
        let sets = parseIPSetList((await bed.node(["ipset", "list"])).out)
        #expect(sets.count == 17)
        #expect(sets.mapValues(\.type) == Dictionary(uniqueKeysWithValues: KubeIPSet.all(.ipv4).map { ($0.name, $0.type.rawValue) }))
        #expect(sets.filter { !$0.value.members.isEmpty }.mapValues(\.members) == [
            "KUBE-CLUSTER-IP": ["10.96.0.10,tcp:80", "10.96.0.10,udp:53", "10.96.0.20,tcp:80", "10.96.0.30,tcp:9000"],
            "KUBE-IPVS-IPS": ["10.96.0.10", "10.96.0.20", "10.96.0.30"],
            "KUBE-LOOP-BACK": ["10.244.2.10,tcp:8080,10.244.2.10", "10.244.2.10,tcp:9000,10.244.2.10", "10.244.2.10,udp:5353,10.244.2.10",
                               "10.244.3.10,tcp:8080,10.244.3.10", "10.244.3.10,tcp:9000,10.244.3.10", "10.244.3.10,udp:5353,10.244.3.10"],
            "KUBE-NODE-PORT-TCP": ["30080"],
            "KUBE-NODE-PORT-UDP": ["30053"],
        ])

        // kube-ipvs0: a NOARP dummy device, down, holding the ClusterIPs as /32.
        let link = (await bed.node(["ip", "-d", "-o", "link", "show", "kube-ipvs0"])).out
        #expect(link.contains("NOARP"))
        #expect(link.contains("state DOWN"))
        #expect(link.contains("dummy"))
        #expect(!link.contains(",UP"))
        let addrs = (await bed.node(["ip", "-o", "-4", "addr", "show", "dev", "kube-ipvs0"])).out
        for ip in ["10.96.0.10/32", "10.96.0.20/32", "10.96.0.30/32"] { #expect(addrs.contains(" \(ip) "), "\(addrs)") }
        #expect(addrs.split(separator: "\n").count == 3)

        // The iptables rule set is kube-proxy's constant one.
        let nat = (await bed.node(["iptables-legacy-save", "-t", "nat"])).out
        #expect(nat.contains("-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"))
        #expect(nat.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"))
    }

    /// Real TCP and UDP traffic through the ClusterIP and a NodePort; rr splits evenly.
    func trafficReachesBothBackends(_ bed: Testbed) async {
        let tcp = await bed.requests(from: "client", "tcp", "10.96.0.10:80", count: 20)
        #expect(tcp.filter { $0 == "backend-1" }.count == 10, "\(tcp)")
        #expect(tcp.filter { $0 == "backend-2" }.count == 10, "\(tcp)")

        let udp = await bed.requests(from: "client", "udp", "10.96.0.10:53", count: 10)
        #expect(udp.filter { $0 == "backend-1" }.count == 5, "\(udp)")
        #expect(udp.filter { $0 == "backend-2" }.count == 5, "\(udp)")

        // From outside through the NodePort: masqueraded (the outside network is not routed
        // from the pods), so the backends see a node address.
        let nodePort = await bed.requests(from: "ext", "tcp", "192.168.50.1:30080", count: 10, showSource: true)
        #expect(nodePort.filter { $0.hasPrefix("backend-1 ") }.count == 5, "\(nodePort)")
        #expect(nodePort.filter { $0.hasPrefix("backend-2 ") }.count == 5, "\(nodePort)")
        #expect(nodePort.allSatisfy { !$0.hasSuffix(" 192.168.50.10") }, "\(nodePort)")
        let udpNodePort = await bed.requests(from: "ext", "udp", "192.168.50.1:30053", count: 10, showSource: true)
        #expect(udpNodePort.filter { $0.hasPrefix("backend-1 ") }.count == 5, "\(udpNodePort)")
        #expect(udpNodePort.filter { $0.hasPrefix("backend-2 ") }.count == 5, "\(udpNodePort)")
        #expect(udpNodePort.allSatisfy { !$0.hasSuffix(" 192.168.50.10") }, "\(udpNodePort)")
    }

    /// ClientIP affinity: every connection from one client lands on one backend.
    func clientIPAffinityPins(_ bed: Testbed) async {
        let answers = await bed.requests(from: "client", "tcp", "10.96.0.20:80", count: 10)
        #expect(answers.count == 10)
        #expect(Set(answers).count == 1, "\(answers)")
        #expect(answers.first?.hasPrefix("backend-") == true, "\(answers)")
    }

    /// Opens a held connection to the hold service; returns the process and the backend name.
    func hold(_ bed: Testbed, _ n: Int) async throws -> (Background, String) {
        let p = try Background(Kernel.inNS(bed.ns("client"), pythonArgs + ["\(testbed)/hold.py", "connect", "--target", "10.96.0.30:9000"]),
                               log: bed.dir.appendingPathComponent("holder-\(n).log"))
        bed.processes.append(p)
        _ = await Kernel.waitUntil(.seconds(10)) { !p.output.isEmpty }
        return (p, p.output.trimmingASCIIWhitespace())
    }

    /// The `ipvsadm -Ln` row of a real server of the hold service: (weight, active connections).
    func holdRow(_ bed: Testbed, _ ip: String) async -> (weight: Int, active: Int)? {
        let out = (await bed.node(["ipvsadm", "-Ln", "-t", "10.96.0.30:9000"])).out
        for line in out.split(separator: "\n") where line.contains("\(ip):9000") {
            let f = line.split(separator: " ")
            // "  -> 10.244.2.10:9000  Masq  0  1  0"
            if f.count >= 6, let w = Int(f[3]), let a = Int(f[4]) { return (w, a) }
        }
        return nil
    }

    /// An endpoint removed while a connection is open drains at weight 0 and is deleted once
    /// the connection ends.
    func removedEndpointDrainsThenIsDeleted(_ bed: Testbed) async throws {
        let (holder, name) = try await hold(bed, 1)
        let drained = try #require(backendIP[name], "holder answered \(name)")
        let other = drained == "10.244.2.10" ? "10.244.3.10" : "10.244.2.10"
        try bed.write("hold-slice.yaml", holdSlice([other]))

        let atZero = await Kernel.waitUntil(.seconds(10)) { await holdRow(bed, drained)?.weight == 0 }
        let stateAtZero = await bed.ipvsSave()
        #expect(atZero, "\(stateAtZero)")
        #expect(await holdRow(bed, drained)?.active == 1)
        // New connections go to the remaining backend only.
        let fresh = await bed.requests(from: "client", "tcp", "10.96.0.30:9000", count: 4)
        #expect(fresh.allSatisfy { backendIP[$0] == other }, "\(fresh)")
        #expect(holder.isRunning)

        // The connection ends: the real server goes within a reaper tick or two.
        await holder.kill()
        let gone = await Kernel.waitUntil(.seconds(8)) { await holdRow(bed, drained) == nil }
        let stateGone = await bed.ipvsSave()
        #expect(gone, "\(stateGone)")

        try bed.write("hold-slice.yaml", holdSlice(["10.244.2.10", "10.244.3.10"]))
        let back = await Kernel.waitUntil(.seconds(10)) { await holdRow(bed, drained)?.weight == 1 }
        #expect(back)
    }

    /// A connection that never ends holds a drained real server only for --ipvs-graceful-period (4 s).
    func drainingEndsAfterTheGracefulPeriod(_ bed: Testbed) async throws {
        let (holder, name) = try await hold(bed, 2)
        let drained = try #require(backendIP[name], "holder answered \(name)")
        let other = drained == "10.244.2.10" ? "10.244.3.10" : "10.244.2.10"
        try bed.write("hold-slice.yaml", holdSlice([other]))
        let clock = ContinuousClock()
        let atZero = await Kernel.waitUntil(.seconds(10)) { await holdRow(bed, drained)?.weight == 0 }
        let start = clock.now
        #expect(atZero)
        #expect(await holdRow(bed, drained)?.active == 1)
        let gone = await Kernel.waitUntil(.seconds(12)) { await holdRow(bed, drained) == nil }
        let waited = start.duration(to: clock.now)
        print("[IPVSKernelTests] drained real server deleted \(waited) after it went to weight 0")
        #expect(gone)
        #expect(waited >= .seconds(2), "deleted after \(waited) with a connection still open")
        #expect(holder.isRunning)
        await holder.kill()
        try bed.write("hold-slice.yaml", holdSlice(["10.244.2.10", "10.244.3.10"]))
        _ = await Kernel.waitUntil(.seconds(10)) { await holdRow(bed, drained)?.weight == 1 }
    }

    /// A deleted Service loses its virtual server, its kube-ipvs0 address and its set members.
    func deletedServiceRemovesVirtualServerAndAddress(_ bed: Testbed) async throws {
        try bed.remove("sticky.yaml")
        let gone = await Kernel.waitUntil(.seconds(10)) {
            !(await bed.ipvsSave()).contains { $0.contains("10.96.0.20:80") }
        }
        #expect(gone)
        let addrs = (await bed.node(["ip", "-o", "-4", "addr", "show", "dev", "kube-ipvs0"])).out
        #expect(!addrs.contains("10.96.0.20/32"), "\(addrs)")
        let cluster = (await bed.node(["ipset", "list", "KUBE-CLUSTER-IP"])).out
        #expect(!cluster.contains("10.96.0.20,tcp:80"))
        #expect(cluster.contains("10.96.0.10,tcp:80"))
    }

    /// A restart reads the kernel state and writes nothing that is already right.
    func restartChangesNothing(_ bed: Testbed) async throws {
        let before = await bed.ipvsSave()
        let sluice = try bed.startSluice("sluice-2.log")
        let synced = await Kernel.waitUntil(.seconds(60)) { sluice.output.contains("ipvs full sync") }
        #expect(synced, "\(sluice.output)")
        let line = sluice.output.split(separator: "\n").first { $0.contains("ipvs full sync") }.map(String.init) ?? ""
        #expect(line.contains("wrote services +0 ~0 -0, destinations +0 ~0 -0, flushes 0, addresses +0 -0, ipset entries +0 -0, sets created 0"), "\(line)")
        #expect(await bed.ipvsSave() == before)
        await sluice.stop()
    }

    /// `sluice --cleanup` removes IPVS services, ipsets, the IPVS-mode chains and kube-ipvs0.
    func cleanupRemovesEverything(_ bed: Testbed) async {
        let r = await bed.node([sluiceBinary, "--cleanup", "--iptables-backend", "legacy"])
        #expect(r.status == 0, "\(r.out)")
        #expect(await bed.ipvsSave().isEmpty)
        #expect((await bed.node(["ip", "link", "show", "kube-ipvs0"])).status != 0)
        #expect(!(await bed.node(["ipset", "list", "-n"])).out.contains("KUBE-"))
        #expect(!(await bed.node(["iptables-legacy-save"])).out.contains("KUBE-"))
    }
}

/// The kernel clients on their own, in the guest's root namespace.
@Suite(.serialized) struct IPVSClientKernelTests {
    @Test(.enabled(umlOnly) { let ipvs = await Kernel.ipvsPresent(); return Kernel.inUML && isRoot && ipvs })
    func ipvsOverGenericNetlink() async throws {
        let connection = try NetlinkConnection(protocol: NetlinkProtocol.generic)
        let family = try #require(try await connection.resolveFamily("IPVS"))
        let ipvs = GenericNetlinkIPVSClient(executor: connection, familyID: family.id)
        try await ipvs.flush()
        #expect(try await ipvs.info().version >= 0x010200)

        // Every scheduler kube-proxy documents, on IPv4 TCP.
        for (i, scheduler) in ipvsSchedulers.enumerated() {
            let vs = VirtualServer(key: VirtualServerKey(address: IPAddress("10.97.0.\(i + 1)")!, proto: .tcp, port: 80), scheduler: scheduler,
                                   flags: scheduler == "mh" ? .scheduler2 : [])
            #expect(try await ipvs.apply([.addService(vs)]).isEmpty, "scheduler \(scheduler)")
            let back = try await ipvs.services().first { $0.key == vs.key }
            #expect(back?.scheduler == scheduler)
            #expect(back.map { vs.sameConfiguration(as: $0) } == true)
        }
        let save = (await Kernel.run(["ipvsadm", "-Sn"])).out
        #expect(save.contains("-A -t 10.97.0.11:80 -s mh -b mh-port"), "\(save)")
        try await ipvs.flush()
        #expect(try await ipvs.services().isEmpty)

        // IPv6 UDP with persistence, SCTP, destinations: add, edit, read back, delete.
        let v6 = VirtualServer(key: VirtualServerKey(address: IPAddress("fd00::10")!, proto: .udp, port: 53), scheduler: "wrr",
                               flags: .persistent, timeout: 300)
        let sctp = VirtualServer(key: VirtualServerKey(address: IPAddress("10.97.1.1")!, proto: .sctp, port: 7777), scheduler: "rr")
        let rs6 = RealServer(address: IPAddress("fd00:1::2")!, port: 5353, weight: 3)
        let rs4 = RealServer(address: IPAddress("10.244.9.9")!, port: 7777, weight: 1)
        #expect(try await ipvs.apply([.addService(v6), .addService(sctp), .addDestination(v6.key, rs6), .addDestination(sctp.key, rs4)]).isEmpty)
        #expect(Set((await Kernel.run(["ipvsadm", "-Sn"])).out.split(separator: "\n").map(String.init)) == [
            "-A -u [fd00::10]:53 -s wrr -p 300", "-a -u [fd00::10]:53 -r [fd00:1::2]:5353 -m -w 3",
            "-A --sctp-service 10.97.1.1:7777 -s rr", "-a --sctp-service 10.97.1.1:7777 -r 10.244.9.9:7777 -m -w 1",
        ])
        let v6back = try await ipvs.services().first { $0.key == v6.key }
        #expect(v6back?.netmask == 128)
        #expect(v6back?.timeout == 300)
        var zero = rs6
        zero.weight = 0
        #expect(try await ipvs.apply([.updateDestination(v6.key, zero)]).isEmpty)
        #expect(try await ipvs.destinations(of: v6.key).map(\.weight) == [0])
        #expect(try await ipvs.apply([.deleteDestination(v6.key, rs6), .deleteService(sctp.key)]).isEmpty)
        #expect(try await ipvs.destinations(of: v6.key).isEmpty)

        // Errors come back per request, with the kernel's errno.
        let failures = try await ipvs.apply([.deleteService(sctp.key), .addService(v6)])
        #expect(failures.map(\.error.errno) == [.noSuchProcess, .fileExists])

        // A batch of 300 destinations in a handful of sendmsg calls.
        let big = VirtualServer(key: VirtualServerKey(address: IPAddress("10.97.2.1")!, proto: .tcp, port: 80), scheduler: "rr")
        let sendsBefore = await connection.sendCalls
        let ops: [IPVSOperation] = [.addService(big)] + (0..<300).map {
            .addDestination(big.key, RealServer(address: IPAddress("10.245.\($0 / 200).\($0 % 200 + 1)")!, port: 8080))
        }
        #expect(try await ipvs.apply(ops).isEmpty)
        #expect(await connection.sendCalls - sendsBefore <= 2)
        #expect(try await ipvs.destinations(of: big.key).count == 300)

        // Timeouts (ipvsadm --set).
        try await ipvs.setTimeouts(IPVSTimeouts(tcp: 901, tcpFin: 121, udp: 301))
        #expect(try await ipvs.timeouts() == IPVSTimeouts(tcp: 901, tcpFin: 121, udp: 301))
        #expect((await Kernel.run(["ipvsadm", "-L", "--timeout"])).out.contains("901 121 301"))
        try await ipvs.flush()
    }

    @Test(.enabled(umlOnly) { let ipvs = await Kernel.ipvsPresent(); return Kernel.inUML && isRoot && ipvs })
    func dummyLinkAndAddressesOverRTNetlink() async throws {
        let links = try RouteNetlinkClient.connect()
        _ = try await links.deleteLink(named: "tst-ipvs0")
        #expect(try await links.link(named: "tst-ipvs0") == nil)
        let link = try await links.createDummy(named: "tst-ipvs0")
        #expect(link.flags & InterfaceFlags.noARP != 0)
        #expect(link.flags & InterfaceFlags.up == 0)
        let shown = (await Kernel.run(["ip", "-d", "-o", "link", "show", "tst-ipvs0"])).out
        #expect(shown.contains("NOARP") && shown.contains("state DOWN") && shown.contains("dummy"), "\(shown)")

        let index = UInt32(bitPattern: link.index)
        let ips = [IPAddress("10.96.7.7")!, IPAddress("fd00::7")!]
        #expect(try await links.addAddresses(ips, index: index).isEmpty)
        #expect(try await links.addAddresses(ips, index: index).isEmpty)  // already bound: not an error
        let listed = try await links.addresses().filter { $0.index == index }
        #expect(Set(listed.map(\.address)) == Set(ips))
        #expect(Set(listed.map(\.prefixLength)) == [32, 128])
        let ipShow = (await Kernel.run(["ip", "-o", "addr", "show", "dev", "tst-ipvs0"])).out
        #expect(ipShow.contains("10.96.7.7/32") && ipShow.contains("fd00::7/128"), "\(ipShow)")
        #expect(try await links.deleteAddresses(ips, index: index).isEmpty)
        #expect(try await links.deleteAddresses(ips, index: index).isEmpty)  // already gone: not an error
        #expect(try await links.addresses().filter { $0.index == index }.isEmpty)
        #expect(try await links.deleteLink(named: "tst-ipvs0"))
        #expect(try await links.deleteLink(named: "tst-ipvs0") == false)
    }

    @Test(.enabled(umlOnly) { let ipvs = await Kernel.ipvsPresent(); return Kernel.inUML && isRoot && ipvs })
    func ipsetThroughLibipset() async throws {
        let ipsets = try NetfilterIPSetClient.connect()
        let defs = KubeIPSet.all(.ipv4) + KubeIPSet.all(.ipv6)
        try await ipsets.destroy(defs.map(\.name))
        try await ipsets.create(defs)
        try await ipsets.create(defs)  // again: -exist semantics
        let entries: [String: [IPSetEntry]] = [
            "KUBE-CLUSTER-IP": [.ipPort(IPAddress("10.96.0.10")!, .tcp, 80), .ipPort(IPAddress("10.96.0.10")!, .udp, 53),
                                .ipPort(IPAddress("10.96.0.11")!, .sctp, 7777)],
            "KUBE-LOOP-BACK": [.ipPortIP(IPAddress("10.244.1.2")!, .tcp, 8080, IPAddress("10.244.1.2")!)],
            "KUBE-LOAD-BALANCER-SOURCE-CIDR": [.ipPortNet(IPAddress("1.2.3.4")!, .tcp, 80, CIDR("10.0.0.0/8")!)],
            "KUBE-NODE-PORT-TCP": [.port(30080), .port(30081)],
            "KUBE-IPVS-IPS": [.ip(IPAddress("10.96.0.10")!)],
            "KUBE-6-CLUSTER-IP": [.ipPort(IPAddress("fd00::10")!, .tcp, 80)],
            "KUBE-6-LOAD-BALANCER-SOURCE-CID": [.ipPortNet(IPAddress("fd00::1")!, .tcp, 80, CIDR("fd00:5::/64")!)],
        ]
        try await ipsets.update(entries.map { ($0.key, $0.value, []) })
        let listed = try await ipsets.list(Set(defs.map(\.name)))
        #expect(listed.count == defs.count)
        for (name, want) in entries {
            let got = listed.first { $0.name == name }?.entries ?? []
            #expect(Set(got) == Set(want), "\(name)")
        }
        let save = (await Kernel.run(["ipset", "save"])).out
        #expect(save.contains("add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:80,10.0.0.0/8"))
        #expect(save.contains("add KUBE-CLUSTER-IP 10.96.0.11,sctp:7777"))
        #expect(save.contains("add KUBE-6-CLUSTER-IP fd00::10,tcp:80"))
        #expect(save.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"))
        #expect(save.contains("create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536"))

        try await ipsets.update([("KUBE-NODE-PORT-TCP", [], [.port(30080), .port(30999)])])  // a missing member: not an error
        #expect(try await ipsets.list(["KUBE-NODE-PORT-TCP"]).first?.entries == [.port(30081)])

        // swap and flush.
        try await ipsets.swap("KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP")
        let swapped = try await ipsets.list(["KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP"])
        #expect(swapped.first { $0.name == "KUBE-CLUSTER-IP" }?.entries == [])
        #expect(Set(swapped.first { $0.name == "KUBE-EXTERNAL-IP" }?.entries ?? []) == Set(entries["KUBE-CLUSTER-IP"] ?? []))
        try await ipsets.flush(["KUBE-EXTERNAL-IP"])
        #expect(try await ipsets.list(["KUBE-EXTERNAL-IP"]).first?.entries == [])

        // libipset's own text, naming the set and the member; the client keeps working after it.
        await #expect {
            try await ipsets.update([("KUBE-NO-SUCH-SET", [.ip(IPAddress("10.0.0.1")!)], [])])
        } throws: { error in
            let e = error as? IPSetError
            return e?.operation == .add && e?.set == "KUBE-NO-SUCH-SET" && e?.message.contains("does not exist") == true
        }
        await #expect {
            try await ipsets.create([IPSetDefinition(baseName: "KUBE-CLUSTER-IP", type: .hashIP, family: .ipv4, comment: "")])
        } throws: { error in
            (error as? IPSetError)?.operation == .create && (error as? IPSetError)?.message.isEmpty == false
        }
        #expect(try await ipsets.list(["KUBE-NODE-PORT-TCP"]).first?.entries == [.port(30081)])
        try await ipsets.destroy(defs.map(\.name))
        #expect(try await ipsets.list(Set(defs.map(\.name))).isEmpty)
    }
}

/// What happens without kernel support, on a kernel without IPVS (the CI host).
@Suite struct IPVSMissingKernelTests {
    @Test(.enabled("needs root and a kernel without IPVS (the CI host)") { let ipvs = await Kernel.ipvsPresent(); return isRoot && !ipvs })
    func startupFailsNamingWhatIsMissing() async throws {
        let ns = "sipvs-nokern-\(getpid())"
        await Kernel.run(["ip", "netns", "add", ns])
        let r = await Kernel.run(Kernel.inNS(ns, [sluiceBinary, "--proxy-mode", "ipvs", "--manifests", repositoryRoot.appendingPathComponent("examples").path,
                                                  "--hostname-override", "n1", "--node-ip", "192.168.50.1"]))
        await Kernel.run(["ip", "netns", "del", ns])
        #expect(r.status != 0)
        #expect(r.out.contains("cannot use --proxy-mode ipvs"), "\(r.out)")
        #expect(r.out.contains("ip_vs"), "\(r.out)")
        #expect(!r.out.contains("full sync"), "\(r.out)")
    }

    @Test func genericNetlinkOnTheHostKernel() async throws {
        // Real sockets, read-only requests: nlctrl resolves to 0x10; IPVS resolves or is absent.
        let c = try NetlinkConnection(protocol: NetlinkProtocol.generic)
        let ctrl = try #require(try await c.resolveFamily("nlctrl"))
        #expect(ctrl.id == GenericNetlinkControl.familyID)
        #expect(try await c.resolveFamily("no-such-family") == nil)

        // Three requests in one sendmsg: each gets its own answer.
        let route = try NetlinkConnection(protocol: NetlinkProtocol.route)
        let before = await route.sendCalls
        let results = try await route.executeBatch([RouteMessages.getLink(name: "lo"), RouteMessages.getLink(name: "no-such-link0"),
                                                    RouteMessages.getLink(name: "lo")])
        #expect(await route.sendCalls - before == 1)
        #expect(results.count == 3)
        #expect((try? results[0].get())?.first.map { try? RouteMessages.parseLink($0).name } == "lo")
        if case .failure(let e) = results[1] { #expect(e.errno == .noSuchDevice) } else { Issue.record("expected ENODEV") }
        #expect((try? results[2].get())?.count == 1)
    }

    @Test(.enabled("needs root (SO_RCVBUFFORCE)") { isRoot })
    func aThousandRequestsInOneBatchAreAllAnswered() async throws {
        // Sent 2 000 to a datagram (64 KiB of 32-byte requests), the kernel dropped the
        // replies past the receive buffer and the batch failed with ENOBUFS.
        let route = try NetlinkConnection(protocol: NetlinkProtocol.route)
        let before = await route.sendCalls
        let results = try await route.executeBatch(Array(repeating: RouteMessages.getLink(name: "lo"), count: 1000))
        #expect(results.count == 1000)
        #expect(results.allSatisfy { (try? $0.get())?.count == 1 })
        #expect(await route.sendCalls - before == (1000 + NetlinkConnection.batchRequests - 1) / NetlinkConnection.batchRequests)
    }
}
