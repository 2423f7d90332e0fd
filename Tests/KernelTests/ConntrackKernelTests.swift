// Real-kernel tests of conntrack cleanup, iptables mode: a UDP client on one socket
// follows endpoint changes without waiting for the 30 s UDP timeout; flows created before a
// service had endpoints are replaced; TCP flows and unchanged state are left alone; the
// conntrack sysctls; and 100 000 flows reconciled with flat memory.

import Conntrack
import Foundation
import IPTables
import SluiceCore
import SluiceTesting
import Testing

/// One line of `conntrack -L -o id`.
struct CTEntry: CustomStringConvertible {
    var proto: String
    var origSrc = "", origDst = "", origSport = "", origDport = ""
    var replySrc = "", replyDst = "", replySport = "", replyDport = ""
    var id = ""
    var line: String

    init?(_ line: String) {
        let words = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard let p = words.first, ["udp", "tcp", "sctp"].contains(p) else { return nil }
        proto = p
        self.line = line
        var seen: Set<String> = []
        for w in words {
            guard let eq = w.firstIndex(of: "=") else { continue }
            let (k, v) = (String(w[..<eq]), String(w[w.index(after: eq)...]))
            let reply = seen.contains(k)
            seen.insert(k)
            switch (k, reply) {
            case ("src", false): origSrc = v
            case ("dst", false): origDst = v
            case ("sport", false): origSport = v
            case ("dport", false): origDport = v
            case ("src", true): replySrc = v
            case ("dst", true): replyDst = v
            case ("sport", true): replySport = v
            case ("dport", true): replyDport = v
            case ("id", _): id = v
            default: break
            }
        }
    }

    var description: String { line }
}

extension TestBed {
    /// The conntrack entries of the node namespace, optionally filtered (`conntrack -L` options).
    func conntrackEntries(_ filter: [String] = []) async throws -> [CTEntry] {
        try await conntrack(["-L", "-o", "id"] + filter).split(separator: "\n").compactMap { CTEntry(String($0)) }
    }

    /// The `conntrack reconcile:` log lines of the running sluice, as key=value maps.
    var reconciles: [[String: String]] {
        sluiceLog.split(separator: "\n").filter { $0.contains("conntrack reconcile: ") }.map { line in
            var out: [String: String] = [:]
            for w in line.split(separator: " ") {
                guard let eq = w.firstIndex(of: "=") else { continue }
                out[String(w[..<eq])] = String(w[w.index(after: eq)...])
            }
            return out
        }
    }

    /// Waits until sluice logged more than `count` reconciles; returns them all.
    @discardableResult
    func waitForReconcile(after count: Int, timeout: Duration = .seconds(15)) async throws -> [[String: String]] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let r = reconciles
            if r.count > count { return r }
            if let p = sluice, !p.isRunning { throw TestBedError("sluice exited:\n\(p.logTail())") }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw TestBedError("no conntrack reconcile after \(timeout):\n\(sluice?.logTail() ?? "")")
    }

    /// Polls a background client until `condition` holds for its lines; returns them.
    @discardableResult
    func waitForClient(_ client: BackgroundProcess, _ what: String, timeout: Duration = .seconds(15),
                       until condition: ([String]) -> Bool) async throws -> [String] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let lines = ClientResult(log: client).answers
            if condition(lines) { return lines }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw TestBedError("\(what): not seen after \(timeout); client printed \(ClientResult(log: client).answers)\n--- sluice log ---\n\(sluice?.logTail(30) ?? "")")
    }
}

/// The answers after the first one equal to `word`, that one included.
private func from(_ word: String, _ lines: [String]) -> ArraySlice<String> {
    guard let i = lines.firstIndex(of: word) else { return [] }
    return lines[i...]
}

@Suite("Kernel (iptables): conntrack cleanup", .serialized, .requiresRoot, .timeLimit(.minutes(3)))
struct ConntrackKernelTests {
    /// One datagram every 100 ms keeps a UDP flow alive forever (the timeout restarts with each
    /// packet), so without cleanup the client would never leave the old backend.
    static let interval = 0.1

    @Test("A UDP client on one socket reaches the new backend as soon as the old one is replaced")
    func replacedBackend() async throws {
        try await TestBed.with(.init(ext: false, label: "ctrep")) { bed in
            var svc = webService()
            svc.ports = [.dns()]
            svc.endpoints = [1]
            try bed.writeManifest("svc.yaml", svc.yaml)
            try bed.startSluice()
            try await bed.waitForServices([svc.portName("dns")])
            try await bed.waitForReconcile(after: 0)

            let client = try bed.startClient(from: bed.clientNS, .udp, svc.clusterTarget("dns"), count: 600,
                                             interval: Self.interval, timeout: 0.5, sameSocket: true)
            try await bed.waitForClient(client, "three answers from backend-1") { $0.filter { $0 == "backend-1" }.count >= 3 }
            let before = try await bed.conntrackEntries(["-p", "udp", "-d", svc.clusterIP])
            #expect(before.count == 1 && before.first?.replySrc == TestNet.backendIP(1), "one flow, to backend-1: \(before)")
            let seen = bed.reconciles.count

            svc.endpoints = [2]
            try bed.writeManifest("svc.yaml", svc.yaml)
            let lines = try await bed.waitForClient(client, "answers from backend-2") { from("backend-2", $0).count >= 5 }
            let reconcile = try #require(try await bed.waitForReconcile(after: seen).last)
            #expect(reconcile["trigger"] == "changed" && reconcile["endpoint_gone"] == "1", "\(reconcile)")
            // Once the new backend answered, the old one never did again, and nothing was lost.
            #expect(from("backend-2", lines).allSatisfy { $0 == "backend-2" }, "\(lines)")
            // A reply in flight while its flow is deleted comes back untranslated and is dropped:
            // at most one datagram may go unanswered at the switch.
            #expect(lines.filter { $0 == "TIMEOUT" }.count <= 1 && !lines.contains("REFUSED"), "\(lines)")
            let after = try await bed.conntrackEntries(["-p", "udp", "-d", svc.clusterIP])
            // A flow's reply tuple is fixed when it is created: one flow answered by backend-2 is
            // a new flow that replaced the old one. (Its id may equal the old one's: the kernel
            // hashes the entry's address, which the new entry can reuse.)
            #expect(after.count == 1 && after.first?.replySrc == TestNet.backendIP(2), "\(after)")
        }
    }

    @Test("Scaled to zero the client is refused at once; scaled back up it is answered at once")
    func scaleToZeroAndBack() async throws {
        // `ext` gives the node a default route: without one, an untranslated datagram dies in
        // routing before the REJECT rule sees it.
        try await TestBed.with(.init(ext: true, label: "ctzero")) { bed in
            var svc = webService()
            svc.ports = [.dns()]
            svc.endpoints = [1]
            try bed.writeManifest("svc.yaml", svc.yaml)
            try bed.startSluice()
            try await bed.waitForServices([svc.portName("dns")])

            let client = try bed.startClient(from: bed.clientNS, .udp, svc.clusterTarget("dns"), count: 600,
                                             interval: Self.interval, timeout: 0.5, sameSocket: true)
            try await bed.waitForClient(client, "answers from backend-1") { $0.filter { $0 == "backend-1" }.count >= 3 }
            let seen = bed.reconciles.count

            // Zero endpoints: the flow to backend-1 (which still runs) is deleted, so the next
            // datagram meets the REJECT rule instead of the old backend (kube-proxy #139628).
            svc.endpoints = []
            try bed.writeManifest("svc.yaml", svc.yaml)
            var lines = try await bed.waitForClient(client, "REFUSED after scaling to zero") { from("REFUSED", $0).count >= 3 }
            #expect(!from("REFUSED", lines).contains("backend-1"), "\(lines)")
            let down = try #require(try await bed.waitForReconcile(after: seen).last)
            #expect(down["endpoint_gone"] == "1", "\(down)")

            svc.endpoints = [2]
            try bed.writeManifest("svc.yaml", svc.yaml)
            lines = try await bed.waitForClient(client, "answers from backend-2") { from("backend-2", $0).count >= 5 }
            #expect(from("backend-2", lines).allSatisfy { $0 == "backend-2" }, "\(lines)")
            #expect(!from("REFUSED", lines).contains("backend-1"), "backend-1 never answered again: \(lines)")
        }
    }

    @Test("A flow to a ClusterIP created before the Service existed is replaced once it has endpoints")
    func neverTranslatedFlow() async throws {
        // `ext` gives the node its default route: a datagram to an unknown ClusterIP is
        // forwarded untranslated (and lost), and its conntrack entry is confirmed.
        try await TestBed.with(.init(ext: true, label: "ctlate")) { bed in
            let other = webService()
            try bed.writeManifest("other.yaml", other.yaml)
            try bed.startSluice()
            try await bed.waitForServices([other.portName("dns")])

            var late = webService(name: "late", clusterIP: "10.96.0.20")
            late.ports = [.dns()]
            late.endpoints = [1]
            let client = try bed.startClient(from: bed.clientNS, .udp, late.clusterTarget("dns"), count: 600,
                                             interval: Self.interval, timeout: 0.3, sameSocket: true)
            try await bed.waitForClient(client, "unanswered datagrams") { $0.filter { $0 == "TIMEOUT" }.count >= 2 }
            let blackHole = try await bed.conntrackEntries(["-p", "udp", "-d", late.clusterIP])
            #expect(blackHole.count == 1 && blackHole.first?.replySrc == late.clusterIP,
                    "one untranslated flow (reply source = the ClusterIP): \(blackHole)")
            let seen = bed.reconciles.count

            try bed.writeManifest("late.yaml", late.yaml)
            let lines = try await bed.waitForClient(client, "answers once the Service exists") { from("backend-1", $0).count >= 5 }
            #expect(from("backend-1", lines).allSatisfy { $0 == "backend-1" }, "\(lines)")
            let reconcile = try #require(try await bed.waitForReconcile(after: seen).last)
            #expect(reconcile["never_translated"] == "1", "\(reconcile)")
            let after = try await bed.conntrackEntries(["-p", "udp", "-d", late.clusterIP])
            #expect(after.count == 1 && after.first?.replySrc == TestNet.backendIP(1), "\(after)")
        }
    }

    @Test("An open TCP connection's entry survives a reconcile that deletes UDP flows")
    func tcpUntouched() async throws {
        try await TestBed.with(.init(ext: false, label: "cttcp")) { bed in
            var svc = webService()
            svc.ports = [.dns(), TestServicePort(name: "hold", proto: "TCP", port: 9191, targetPort: 9191)]
            svc.endpoints = [1]
            try bed.writeManifest("svc.yaml", svc.yaml)
            // A TCP server on backend-1 that keeps its connections open, and a client that
            // connects through the ClusterIP and waits.
            let server = try bed.startBackground(in: bed.backendNS[0], name: "hold-server", [bed.python, "-c", """
                import socket, time
                s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("\(TestNet.backendIP(1))", 9191)); s.listen(8); print("ready", flush=True)
                conns = []
                while True:
                    c, _ = s.accept(); conns.append(c)
                """])
            try bed.startSluice()
            try await bed.waitForServices([svc.portName("dns"), svc.portName("hold")])
            try await bed.waitForClient(server, "hold server ready") { $0.contains("ready") }
            let holder = try bed.startBackground(in: bed.clientNS, name: "hold-client", [bed.python, "-c", """
                import socket, time
                c = socket.create_connection(("\(svc.clusterIP)", 9191), timeout=5); print("connected", flush=True)
                time.sleep(600)
                """])
            try await bed.waitForClient(holder, "TCP connection through the ClusterIP") { $0.contains("connected") }
            let udp = try await bed.request(from: bed.clientNS, .udp, svc.clusterTarget("dns"), count: 3)
            expectAnswered(udp, count: 3, backends: ["backend-1"], "UDP before the change", bed)

            let tcpBefore = try await bed.conntrackEntries(["-p", "tcp", "-d", svc.clusterIP, "--dport", "9191"])
            #expect(tcpBefore.count == 1 && tcpBefore.first?.replySrc == TestNet.backendIP(1)
                    && tcpBefore.first?.line.contains("ESTABLISHED") == true, "\(tcpBefore)")
            #expect(try await bed.conntrackEntries(["-p", "udp", "-d", svc.clusterIP]).count == 3)
            let seen = bed.reconciles.count

            svc.endpoints = [2]
            try bed.writeManifest("svc.yaml", svc.yaml)
            let reconcile = try #require(try await bed.waitForReconcile(after: seen).last)
            #expect(reconcile["deleted"] == "3", "the three UDP flows to backend-1: \(reconcile)")
            #expect(try await bed.conntrackEntries(["-p", "udp", "-d", svc.clusterIP]).isEmpty)
            let tcpAfter = try await bed.conntrackEntries(["-p", "tcp", "-d", svc.clusterIP, "--dport", "9191"])
            #expect(tcpAfter.map(\.id) == tcpBefore.map(\.id) && tcpAfter.first?.line.contains("ESTABLISHED") == true,
                    "the TCP entry is the same one: \(tcpAfter)")
            #expect(holder.isRunning)
        }
    }

    @Test("A restart with unchanged state deletes nothing")
    func restartDeletesNothing() async throws {
        try await TestBed.with(.init(ext: false, label: "ctrst")) { bed in
            var svc = webService()
            svc.ports = [.dns(nodePort: 30053)]
            svc.type = "NodePort"
            try bed.writeManifest("svc.yaml", svc.yaml)
            // Long UDP timeouts, so that no flow expires while sluice restarts.
            let extra = ["--conntrack-udp-timeout", "120s", "--conntrack-udp-timeout-stream", "180s"]
            try bed.startSluice(extra: extra)
            try await bed.waitForServices([svc.portName("dns")])
            try await bed.waitForReconcile(after: 0)
            let udp = try await bed.request(from: bed.clientNS, .udp, svc.clusterTarget("dns"), count: 20)
            expectAnswered(udp, count: 20, backends: ["backend-1", "backend-2"], "20 UDP flows", bed)
            let nodePort = try await bed.request(from: bed.clientNS, .udp, "\(TestNet.clientGateway):30053", count: 5)
            expectAnswered(nodePort, count: 5, "5 UDP flows through the NodePort", bed)
            // The service's flows (the node namespace has other UDP traffic of its own).
            let ours = { (e: CTEntry) in e.origDst == svc.clusterIP || e.origDport == "30053" }
            let entries = try await bed.conntrackEntries(["-p", "udp"]).filter(ours)
            let before = Set(entries.map(\.id))
            #expect(before.count == 25, "\(entries)")

            #expect(await bed.stopSluice() == 0)
            try bed.startSluice(extra: extra)
            let first = try #require(try await bed.waitForReconcile(after: 0).first)
            #expect(first["trigger"] == "initial" && first["deleted"] == "0" && first["errors"] == "0", "\(first)")
            #expect(Int(first["judged"] ?? "") == 25, "every flow was looked at: \(first)")
            #expect(first["deleted_total"] == "0")
            let after = Set(try await bed.conntrackEntries(["-p", "udp"]).filter(ours).map(\.id))
            #expect(before.isSubset(of: after), "flows lost: \(before.subtracting(after))")
        }
    }

    @Test("Conntrack sysctls: set when given and different; a host-only one is reported, not fatal")
    func sysctls() async throws {
        try await TestBed.with(.init(backends: 1, ext: false, label: "ctsys")) { bed in
            var svc = webService()
            svc.ports = [.dns()]
            svc.endpoints = [1]
            try bed.writeManifest("svc.yaml", svc.yaml)
            let read = { (name: String) async throws -> String in
                try await bed.exec(checked: bed.nodeNS, ["cat", "/proc/sys/net/netfilter/\(name)"]).stdout
                    .trimmingCharacters(in: .whitespacesAndNewlines)
            }
            let hostMax = try await read("nf_conntrack_max")
            try bed.startSluice(extra: ["--conntrack-udp-timeout", "45s", "--conntrack-tcp-timeout-close-wait", "2h",
                                        "--conntrack-max-per-core", "1", "--conntrack-min", "\((Int(hostMax) ?? 0) + 1)"])
            try await bed.waitForServices([svc.portName("dns")])
            #expect(try await read("nf_conntrack_udp_timeout") == "45")
            #expect(try await read("nf_conntrack_tcp_timeout_close_wait") == "7200")
            #expect(try await read("nf_conntrack_max") == hostMax, "read-only outside the host's namespace")
            let log = bed.sluiceLog
            #expect(log.contains("set net.netfilter.nf_conntrack_udp_timeout to 45 (was 30)"), "\(log)")
            #expect(log.contains("cannot set net.netfilter.nf_conntrack_max to \((Int(hostMax) ?? 0) + 1)")
                    && log.contains("only the host's network namespace"), "\(log)")
            // Still proxying.
            let udp = try await bed.request(from: bed.clientNS, .udp, svc.clusterTarget("dns"), count: 3)
            expectAnswered(udp, count: 3, backends: ["backend-1"], "UDP with the sysctls applied", bed)
        }
    }
}

@Suite("Kernel: the conntrack table wrapper", .serialized, .requiresRoot, .timeLimit(.minutes(3)))
struct ConntrackTableKernelTests {
    /// `conntrack -I` lines: a UDP flow `client:sport -> dst:dport` answered by `reply`.
    static func udp(_ client: String, _ sport: Int, _ dst: String, _ dport: Int, reply: String, _ rport: Int) -> String {
        "-I -p udp -s \(client) -d \(dst) --sport \(sport) --dport \(dport) -r \(reply) -q \(client) --reply-port-src \(rport) --reply-port-dst \(sport) -t 600"
    }

    @Test("Kernel-filtered dumps, deletes by tuple and id, ENOENT as success, IPv4 and IPv6")
    func wrapper() async throws {
        try await TestNamespace.with(label: "cttable") { ns in
            let lines = [
                Self.udp("10.0.9.1", 4000, "10.96.0.50", 53, reply: "10.244.2.10", 5353),
                Self.udp("10.0.9.1", 4001, "10.96.0.50", 53, reply: "10.244.9.9", 5353),
                Self.udp("10.0.9.1", 4002, "10.96.0.51", 53, reply: "10.244.9.8", 5353),
                "-I -p tcp -s 10.0.9.1 -d 10.96.0.50 --sport 4003 --dport 53 -r 10.244.9.7 -q 10.0.9.1 --reply-port-src 5353 --reply-port-dst 4003 --state ESTABLISHED -t 600",
                Self.udp("fd00:9::1", 4000, "fd00:96::50", 53, reply: "fd00:2::10", 5353),
                Self.udp("fd00:9::1", 4001, "fd00:96::50", 53, reply: "fd00:9::9", 5353),
                Self.udp("fd00:9::1", 4002, "fd00:96::51", 53, reply: "fd00:9::8", 5353),
            ]
            try await ns.exec(checked: ["conntrack", "-R", "-"], input: lines.joined(separator: "\n") + "\n")
            let table = try await ns.run { try ConntrackTable() }

            let frontend = DumpFilter(family: .ipv4, l4: .udp, destination: IPAddress("10.96.0.50"), destinationPort: 53)
            let flows = try await table.flows(matching: frontend)
            #expect(Set(flows.map(\.reply.source.description)) == ["10.244.2.10:5353", "10.244.9.9:5353"], "\(flows)")
            #expect(flows.allSatisfy { $0.id != 0 && $0.original.source.ip == IPAddress("10.0.9.1") })
            #expect(await table.kernelAppliesFilters == true, "kernel ≥ 5.8 filters the dump itself")
            #expect(try await table.flows(matching: DumpFilter(family: .ipv4, l4: .tcp)).count == 1)
            #expect(try await table.flows(matching: DumpFilter(family: .ipv4)).count == 4)

            // Delete by tuple and id; a second delete finds nothing, and that is not an error.
            let stale = try #require(flows.first { $0.reply.source.ip == IPAddress("10.244.9.9") })
            var wrongID = stale
            wrongID.id &+= 1
            #expect(try await table.delete(wrongID) == false, "an id pins the delete to one entry")
            #expect(try await table.delete(stale) == true)
            #expect(try await table.delete(stale) == false)
            #expect(try await table.flows(matching: frontend).count == 1)

            // A sweep streams and deletes; the TCP entry to the same address and port is never judged.
            let sweep = await table.sweep(DumpFilter(family: .ipv4, l4: .udp)) { flow in
                flow.original.destination.ip == IPAddress("10.96.0.51") ? .delete(.endpointGone) : .keep
            }
            #expect(sweep.received == 2 && sweep.judged == 2 && sweep.deletedTotal == 1 && sweep.complete, "\(sweep)")
            let left = try await ns.exec(checked: ["conntrack", "-L", "-f", "ipv4"]).stdout
            #expect(left.split(separator: "\n").count == 2 && left.contains("tcp") && left.contains("src=10.244.2.10"), "\(left)")

            // IPv6: the destination address is checked in user space, the port in the kernel.
            let v6 = DumpFilter(family: .ipv6, l4: .udp, destination: IPAddress("fd00:96::50"), destinationPort: 53)
            let v6sweep = await table.sweep(v6) { flow in
                flow.reply.source.ip == IPAddress("fd00:2::10") ? .keep : .delete(.endpointGone)
            }
            #expect(v6sweep.received == 3 && v6sweep.judged == 2 && v6sweep.deletedTotal == 1 && v6sweep.kernelFiltered, "\(v6sweep)")
            let left6 = try await ns.exec(checked: ["conntrack", "-L", "-f", "ipv6"]).stdout
            #expect(left6.split(separator: "\n").count == 2 && !left6.contains("src=fd00:9::9 "), "\(left6)")
        }
    }

    /// The size the memory check allows the reconcile to grow by. The collecting design it
    /// replaces (read every flow into an array, then judge) grows by ~16 MiB for the 70 000
    /// flows read here, which the test measures as a control.
    static let memoryBound = 8 * 1024

    @Test("100 000 flows: the stale 50 000 deleted, the rest kept, memory flat (a collecting reader is not)")
    func hundredThousandFlows() async throws {
        let probe = try #require(TestSupportPaths.conntrackProbe, "conntrack-probe not built: run swift build")
        try await TestNamespace.with(label: "ct100k") { ns in
            var text = ""
            text.reserveCapacity(100_000 * 150)
            func client(_ i: Int) -> String { "10.244.1.\(i % 250 + 1)" }
            // A: 50 000 stale (reply from 10.244.9.9, not an endpoint); B: 20 000 current
            // (reply from the endpoint); C: 10 000 to another address; D: 10 000 TCP to the
            // frontend; E: 10 000 to the frontend's address on another port.
            for i in 0..<50_000 { text += Self.udp(client(i), 10000 + i / 250, "10.96.0.50", 53, reply: "10.244.9.9", 5353) + "\n" }
            for i in 0..<20_000 { text += Self.udp(client(i), 40000 + i / 250, "10.96.0.50", 53, reply: "10.244.2.10", 5353) + "\n" }
            for i in 0..<10_000 { text += Self.udp(client(i), 10000 + i / 250, "10.96.0.99", 53, reply: "10.244.9.10", 5353) + "\n" }
            for i in 0..<10_000 {
                let c = client(i), sp = 10000 + i / 250
                text += "-I -p tcp -s \(c) -d 10.96.0.50 --sport \(sp) --dport 53 -r 10.244.9.9 -q \(c) --reply-port-src 5353 --reply-port-dst \(sp) --state ESTABLISHED -t 600\n"
            }
            for i in 0..<10_000 { text += Self.udp(client(i), 10000 + i / 250, "10.96.0.50", 54, reply: "10.244.9.11", 5353) + "\n" }
            try await ns.exec(checked: ["conntrack", "-R", "-"], input: text, timeout: .seconds(120))
            let count = { () async throws -> Int in
                Int(try await ns.exec(checked: ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).stdout
                    .trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
            }
            #expect(try await count() == 100_000)

            let args = ["--frontend", "udp:10.96.0.50:53=10.244.2.10:5353"]
            func run(_ extra: [String]) async throws -> [String: Any] {
                let r = try await ns.exec(checked: [probe] + extra + args, timeout: .seconds(120))
                let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
                return try #require(json, "probe printed \(r.stdout) \(r.stderr)")
            }
            // The control: read the same flows into an array first (dry run, nothing deleted).
            let collect = try await run(["--collect"])
            #expect(collect["read"] as? Int == 70_000 && collect["would_delete"] as? Int == 50_000, "\(collect)")
            // The reconcile, as sluice runs it.
            let stream = try await run([])
            #expect(stream["deleted"] as? Int == 50_000 && stream["judged"] as? Int == 70_000
                    && stream["errors"] as? Int == 0 && stream["kernel_filter"] as? Bool == true, "\(stream)")
            let streamGrowth = try #require(stream["growth_kib"] as? Int)
            let collectGrowth = try #require(collect["growth_kib"] as? Int)
            print("conntrack 100k: streaming reconcile grew \(streamGrowth) KiB in \(stream["duration_ms"] ?? "?") ms; collecting read grew \(collectGrowth) KiB")
            #expect(streamGrowth < Self.memoryBound, "streaming reconcile grew \(streamGrowth) KiB: \(stream)")
            #expect(collectGrowth > Self.memoryBound, "the control must exceed the bound, or the bound proves nothing: \(collect)")

            #expect(try await count() == 50_000)
            func listed(_ filter: [String]) async throws -> Int {
                try await ns.exec(checked: ["conntrack", "-L"] + filter, timeout: .seconds(60)).stdout
                    .split(separator: "\n").count
            }
            #expect(try await listed(["-p", "udp", "--reply-src", "10.244.9.9"]) == 0, "every stale flow is gone")
            #expect(try await listed(["-p", "udp", "--reply-src", "10.244.2.10"]) == 20_000)
            #expect(try await listed(["-p", "udp", "-d", "10.96.0.99"]) == 10_000)
            #expect(try await listed(["-p", "tcp"]) == 10_000)
            #expect(try await listed(["-p", "udp", "--dport", "54"]) == 10_000)
            // Idempotent: a second reconcile finds nothing to delete.
            let again = try await run([])
            #expect(again["deleted"] as? Int == 0 && again["judged"] as? Int == 20_000, "\(again)")
        }
    }
}

/// Where the test helpers the package builds are.
enum TestSupportPaths {
    /// `.build/<config>/conntrack-probe`, next to the sluice binary.
    static var conntrackProbe: String? {
        var candidates: [String] = []
        if let bin = ProcessInfo.processInfo.environment["SLUICE_BIN"], !bin.isEmpty {
            candidates.append(URL(fileURLWithPath: bin).deletingLastPathComponent().appendingPathComponent("conntrack-probe").path)
        }
        if let root = TestBed.findPackageRoot(from: #filePath) {
            candidates.append(root + "/.build/debug/conntrack-probe")
        }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }
}
