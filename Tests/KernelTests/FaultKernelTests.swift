// Faults against the real process in network namespaces: a flush of the nat rules (the
// canary chains survive it), hostile HTTP clients on the health port, a YAML alias bomb, a
// manifest rewritten in place.

import Foundation
import IPTables
import SluiceTesting
import Testing

@Suite(.serialized, .requiresRoot) struct FaultKernelTests {
    @Test("A flush of the nat rules alone (chains kept) is repaired by the canary check")
    func natRuleFlushIsRepaired() async throws {
        try await TestBed.with(.init(label: "nf")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            // A long sync period: only the canary check can repair the flush in time.
            let sluice = try bed.startSluice(syncPeriod: "10m")
            try await bed.waitForServices([web.portName(), web.portName("dns")])
            expectAnswered(try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 5), count: 5, "before the flush", bed)

            sluice.send(SIGSTOP)
            var resumed = false
            defer { if !resumed { sluice.send(SIGCONT) } }
            let r = await bed.iptables(["-w", "5", "-t", "nat", "-F"])
            try #require(r.succeeded, "\(r)")
            // The flush kept every chain, the canary included: only its rules are gone.
            let canary = await bed.iptables(["-w", "5", "-t", "nat", "-S", "KUBE-PROXY-CANARY"])
            #expect(canary.succeeded, "the nat canary chain should survive a rule flush")
            let broken = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 1, timeout: 1)
            #expect(broken.answered == 0, context("the ClusterIP must be broken by the flush", broken, bed))

            sluice.send(SIGCONT)
            resumed = true
            // The canary period is 5 s; the bound only keeps a broken build from hanging.
            let took = try await bed.waitUntilAnswered(from: bed.clientNS, .tcp, web.clusterTarget(), within: .seconds(20))
            #expect(took != nil, "the ClusterIP did not answer again after the nat flush\n\(bed.sluice?.logTail() ?? "")")
            if let took { print("nat rule flush repaired after \(took)") }
            #expect(bed.sluiceLog.contains("jump rule PREROUTING -> KUBE-SERVICES missing from the nat table"))
            let nat = try await bed.save(.nat)
            #expect(nat.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"), "\(nat)")
            expectAnswered(try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 10), count: 10, "after the repair", bed)
        }
    }

    /// A hostile client: `count` connections to `target`, each sending a request line and then
    /// one header line every second, reconnecting whatever the server closes. It prints how
    /// many connections the server closed, every 5 s.
    private static let tricklingClient = """
        import socket, sys, time
        host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        conns, closed, last = [], 0, time.time()
        def connect():
            s = socket.socket(); s.settimeout(2)
            try:
                s.connect((host, port)); s.sendall(b"GET /healthz HTTP/1.1\\r\\n"); return s
            except OSError:
                s.close(); return None
        while True:
            conns = [c for c in conns if c is not None]
            while len(conns) < count:
                c = connect()
                if c is None: break
                conns.append(c)
            time.sleep(1)
            alive = []
            for c in conns:
                try:
                    c.sendall(b"X-Trickle: a\\r\\n"); alive.append(c)
                except OSError:
                    closed += 1; c.close()
            conns = alive
            if time.time() - last > 5:
                print("closed", closed, "open", len(conns), flush=True); last = time.time()
        """

    @Test("450 trickling clients on the health port: /healthz still answers and changes still sync")
    func hostileHealthClients() async throws {
        try await TestBed.with(.init(label: "hc")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            let sluice = try bed.startSluice(syncPeriod: "10m")
            try await bed.waitForServices([web.portName(), web.portName("dns")])
            // An open-file limit that 450 held connections would exhaust (sluice itself holds
            // about 100 descriptors): without the limits, iptables and the manifest directory
            // could no longer be opened.
            let limit = await bed.exec(bed.nodeNS, ["prlimit", "--pid", "\(sluice.pid)", "--nofile=512:512"])
            try #require(limit.succeeded, "\(limit)")

            let hostile = try bed.startBackground(in: bed.clientNS, name: "trickle",
                                                  [bed.python, "-c", Self.tricklingClient, TestNet.clientGateway, "10256", "450"])
            defer { hostile.send(SIGKILL) }
            // Long enough for the request timeout (10 s) to close the first wave.
            try await Task.sleep(for: .seconds(14))
            #expect(hostile.isRunning, "the hostile client died: \(hostile.logTail())")

            // /healthz answers a well-behaved client (from the node, another address).
            let probe = await bed.exec(bed.nodeNS, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                                                    "http://127.0.0.1:10256/healthz"])
            #expect(probe.stdout == "200", "healthz: \(probe)\n\(sluice.logTail())")
            // A manifest change is still synced, and traffic follows it.
            let web2 = webService(name: "web2", clusterIP: "10.96.0.20")
            try bed.writeManifest("web2.yaml", web2.yaml)
            try await bed.waitForServices([web2.portName()], timeout: .seconds(20))
            expectAnswered(try await bed.request(from: bed.clientNS, .tcp, web2.clusterTarget(), count: 5), count: 5, "web2 after the flood", bed)
            let log = sluice.log()
            #expect(log.contains("healthz: closing new connections"), "no refusal logged:\n\(sluice.logTail())")
            #expect(!log.contains("missing from the"), "a false canary alarm:\n\(sluice.logTail())")
            #expect(!log.contains("Too many open files"), "\(sluice.logTail())")
            let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(sluice.pid)/fd").count) ?? 0
            #expect(fds > 0 && fds < 512 - 128, "sluice holds \(fds) descriptors")
            print("hostile client: \(hostile.log().split(separator: "\n").last.map(String.init) ?? "-"); sluice descriptors: \(fds)")
        }
    }

    @Test("A YAML alias bomb dropped into the manifest directory is rejected by name; the other files keep being applied")
    func aliasBombIsRejected() async throws {
        try await TestBed.with(.init(label: "bomb")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            let sluice = try bed.startSluice(syncPeriod: "10m")
            try await bed.waitForServices([web.portName(), web.portName("dns")])
            // 9^9 (387 million) nodes once expanded: the file is measured before expansion.
            var bomb = ["apiVersion: v1", "kind: ConfigMap", "metadata: {name: lol, namespace: ns}", "data:",
                        "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
            for i in 1..<9 { bomb.append("  l\(i): &l\(i) [" + Array(repeating: "*l\(i - 1)", count: 9).joined(separator: ", ") + "]") }
            try bed.writeManifest("bomb.yaml", bomb.joined(separator: "\n") + "\n")
            // A file written after the bomb is still applied: the watcher is not stuck expanding it.
            let other = webService(name: "other", clusterIP: "10.96.0.20")
            try bed.writeManifest("other.yaml", other.yaml)
            try await bed.waitForServices([web.portName(), other.portName()])
            var logged = false
            for _ in 0..<50 where !logged {
                logged = sluice.log().contains("bomb.yaml") && sluice.log().contains("rejected")
                if !logged { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect(logged, "no log line rejecting bomb.yaml:\n\(sluice.logTail())")
            let r = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 10)
            expectAnswered(r, count: 10, "web after the bomb", bed)
        }
    }

    @Test("A manifest rewritten in place (truncate, then write) never deletes its Service")
    func inPlaceRewriteKeepsTheService() async throws {
        try await TestBed.with(.init(label: "rw")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            let sluice = try bed.startSluice(syncPeriod: "10m")
            try await bed.waitForServices([web.portName(), web.portName("dns")])
            let path = bed.manifestDir + "/web.yaml"
            // Requests every 50 ms while the file is rewritten in place five times, each time
            // empty for 150 ms (`: > web.yaml; ...; cat full > web.yaml`).
            let client = try bed.startClient(from: bed.clientNS, .tcp, web.clusterTarget(), count: 80, interval: 0.05)
            for _ in 0..<5 {
                try Data().write(to: URL(fileURLWithPath: path))
                try await Task.sleep(for: .milliseconds(150))
                try Data(web.yaml.utf8).write(to: URL(fileURLWithPath: path))
                try await Task.sleep(for: .milliseconds(600))
            }
            _ = await client.waitForExit(timeout: .seconds(60))
            let result = ClientResult(log: client)
            expectAnswered(result, count: 80, "requests during the in-place rewrites", bed)
            let nat = try await bed.save(.nat)
            #expect(nat.contains(web.portName()), "the Service's rules are gone:\n\(sluice.logTail())")

            // An empty file that stays empty is a real deletion.
            try Data().write(to: URL(fileURLWithPath: path))
            var deleted = false
            for _ in 0..<50 where !deleted {
                try await Task.sleep(for: .milliseconds(200))
                deleted = !(try await bed.save(.nat)).contains(web.portName())
            }
            #expect(deleted, "an empty file that settled did not delete the Service\n\(sluice.logTail())")
        }
    }

    @Test("SIGHUP resyncs and keeps running; SIGQUIT logs and exits 131 leaving the rules; an IPv6-only Service is logged")
    func hupAndQuit() async throws {
        try await TestBed.with(.init(label: "sg")) { bed in
            let web = webService()
            try bed.writeManifest("web.yaml", web.yaml)
            // This node proxies IPv4 only.
            try bed.writeManifest("v6.yaml", """
                apiVersion: v1
                kind: Service
                metadata: {name: only-v6, namespace: kt}
                spec:
                  clusterIP: fd00:96::10
                  clusterIPs: [fd00:96::10]
                  ipFamilies: [IPv6]
                  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
                """)
            let sluice = try bed.startSluice(syncPeriod: "10m")
            try await bed.waitForServices([web.portName(), web.portName("dns")])
            #expect(sluice.log().contains("service kt/only-v6 has only IPv6 cluster IPs (fd00:96::10) and this node proxies IPv4 only"),
                    "\(sluice.logTail())")
            let fullBefore = sluice.log().components(separatedBy: "full sync:").count
            sluice.send(SIGHUP)
            var resynced = false
            for _ in 0..<50 where !resynced {
                try await Task.sleep(for: .milliseconds(200))
                resynced = sluice.log().components(separatedBy: "full sync:").count > fullBefore
            }
            #expect(sluice.log().contains("received SIGHUP"), "\(sluice.logTail())")
            #expect(resynced, "no full sync after SIGHUP\n\(sluice.logTail())")
            #expect(sluice.isRunning)
            expectAnswered(try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 3), count: 3, "after SIGHUP", bed)

            sluice.send(SIGQUIT)
            let status = await sluice.waitForExit(timeout: .seconds(10))
            #expect(status == 131, "exit status \(String(describing: status))\n\(sluice.logTail())")
            #expect(sluice.log().contains("received SIGQUIT: exiting now"), "\(sluice.logTail())")
            expectAnswered(try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget(), count: 3), count: 3, "after SIGQUIT", bed)
        }
    }
}

