// The relays with real sockets on 127.0.0.1 (no root, no iptables): clients connect to the
// relay port directly, as the portal rules would send them.

import Foundation
import NIOCore
import SluiceCore
import Synchronization
import Testing
import Userspace

@Suite("Relays on loopback", .timeLimit(.minutes(2)))
struct RelayTests {
    @Test("TCP: each connection goes to the next backend in turn")
    func tcpRoundRobin() async throws {
        let a = try await namedServer("A"), b = try await namedServer("B")
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let name = spn("rr")
        let prepared = await relays.prepare([name: RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(a.port), endpoint(b.port)])])
        let port = try #require(prepared.ports[name])
        var answers: [String] = []
        for _ in 0..<6 { answers.append(try await askName(port)) }
        #expect(answers == ["A", "B", "A", "B", "A", "B"])
        await relays.closeAll()
        await a.close(); await b.close()
    }

    @Test("TCP: ClientIP affinity keeps a client on one backend until the timeout passes")
    func tcpAffinity() async throws {
        let a = try await namedServer("A"), b = try await namedServer("B")
        let time = TestTime()
        let relays = RelayManager(config: testConfig(time: time), logger: testLogger)
        let name = spn("aff")
        let spec = RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(a.port), endpoint(b.port)], affinityTimeout: .seconds(10))
        let port = try #require(await relays.prepare([name: spec]).ports[name])
        var answers: [String] = []
        for _ in 0..<5 {
            answers.append(try await askName(port))
            time.advance(.seconds(9))
        }
        #expect(Set(answers).count == 1, "\(answers)")
        time.advance(.seconds(10))
        let after = try await askName(port)
        #expect(after != answers[0], "the pin must expire after 10 s without a connection")
        await relays.closeAll()
        await a.close(); await b.close()
    }

    @Test("Past the listener budget a service port gets a failure, not a listener; a retired one frees its place")
    func listenerBudget() async throws {
        let a = try await namedServer("A")
        let relays = RelayManager(config: testConfig(maxListeners: 2), logger: testLogger)
        let names = ["b1", "b2", "b3"].map { spn($0) }
        var specs: [ServicePortName: RelaySpec] = [:]
        for n in names { specs[n] = RelaySpec(name: n, proto: .tcp, endpoints: [endpoint(a.port)]) }
        let first = await relays.prepare(specs)
        // Sorted order: b1 and b2 get the two listeners, b3 the failure.
        #expect(Set(first.ports.keys) == Set(names[0..<2]))
        let why = try #require(first.listenerFailures[names[2]])
        #expect(why.contains("2 listeners are open already"), "\(why)")
        #expect(try await askName(try #require(first.ports[names[0]])) == "A")
        // b1 goes away: its listener closes and b3 can have the place.
        await relays.retire(keeping: [names[1]])
        let second = await relays.prepare([names[1]: specs[names[1]]!, names[2]: specs[names[2]]!])
        #expect(second.listenerFailures.isEmpty)
        #expect(try await askName(try #require(second.ports[names[2]])) == "A")
        await relays.closeAll()
        await a.close()
    }

    @Test("TCP: a refused connection is retried on the next backend; every request is answered")
    func tcpRetriesTheNextBackend() async throws {
        let live = try await namedServer("LIVE")
        let dead = try await deadPort()
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let name = spn("retry")
        let port = try #require(await relays.prepare([name: RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(dead), endpoint(live.port)])]).ports[name])
        for _ in 0..<10 {
            #expect(try await askName(port) == "LIVE")
        }
        await relays.closeAll()
        await live.close()
    }

    @Test("TCP: with no endpoints (or none reachable) the client connection is reset")
    func tcpNoEndpointsResets() async throws {
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let empty = spn("empty"), down = spn("down")
        let dead = try await deadPort()
        let prepared = await relays.prepare([
            empty: RelaySpec(name: empty, proto: .tcp, endpoints: []),
            down: RelaySpec(name: down, proto: .tcp, endpoints: [endpoint(dead)]),
        ])
        for port in [prepared.ports[empty], prepared.ports[down]] {
            let p = try #require(port)
            let outcome = try await onThread { () -> String in
                let s = try BlockingSocket()
                try s.connect(port: p)
                do {
                    let bytes = try s.readAll()
                    return "eof after \(bytes.count) bytes"
                } catch let e as SocketFailure {
                    return e.code == ECONNRESET ? "reset" : "\(e)"
                }
            }
            #expect(outcome == "reset")
        }
        await relays.closeAll()
    }

    @Test("TCP: a half-closed 1 MiB stream reaches the backend whole, and its reply after the half-close comes back whole")
    func tcpHalfClose() async throws {
        let echo = try await echoServer()
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let name = spn("half")
        let port = try #require(await relays.prepare([name: RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(echo.port)])]).ports[name])
        let payload = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 8) }
        let received = try await onThread { () -> [UInt8] in
            let s = try BlockingSocket(timeout: 20)
            try s.connect(port: port)
            let writer = Thread {
                try? s.sendAll(payload)
                s.shutdownWrite()
            }
            writer.start()
            return try s.readAll()
        }
        let trailer = "END \(payload.count) \(String(fnv1a(payload), radix: 16))\n"
        #expect(received.count == payload.count + trailer.utf8.count)
        #expect(Array(received.prefix(payload.count)) == payload, "the echoed bytes differ")
        #expect(String(decoding: received.dropFirst(payload.count), as: UTF8.self) == trailer,
                "the backend must see EOF after exactly the bytes sent")
        await relays.closeAll()
        await echo.close()
    }

    @Test("TCP: a request sent and half-closed before the backend connection is up is not lost")
    func tcpEarlyHalfClose() async throws {
        // NIO reads a half-closed peer's input eagerly, autoRead or not: the relay must hold
        // those bytes and the EOF until the backend side is joined.
        // A refusing endpoint first in turn makes every connection take a failed attempt
        // before the good one, which widens the window.
        let echo = try await echoServer()
        let dead = try await deadPort()
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let name = spn("early")
        let spec = RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(dead), endpoint(echo.port)])
        let port = try #require(await relays.prepare([name: spec]).ports[name])
        let request = Array("GET / HTTP/1.0\r\n\r\n".utf8)
        let trailer = Array("END \(request.count) \(String(fnv1a(request), radix: 16))\n".utf8)
        let results = try await onThread { () -> [Bool] in
            try (0..<100).map { _ in
                let s = try BlockingSocket()
                try s.connect(port: port)
                try s.sendAll(request)
                s.shutdownWrite()
                return try s.readAll() == request + trailer
            }
        }
        #expect(results.filter { !$0 }.isEmpty, "\(results.filter { !$0 }.count) of 100 exchanges lost bytes")
        await relays.closeAll()
        await echo.close()
    }

    /// 50 here (200 in the kernel test, where clients and backends are other processes): the
    /// test process holds four descriptors per connection, and Foundation's Process.run,
    /// which other tests call concurrently, walks every open descriptor.
    @Test("TCP: 50 concurrent connections all complete")
    func tcpConcurrent() async throws {
        let a = try await namedServer("A"), b = try await namedServer("B")
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let name = spn("many")
        let port = try #require(await relays.prepare([name: RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(a.port), endpoint(b.port)])]).ports[name])
        let answers = try await withThrowingTaskGroup(of: String.self) { group in
            for _ in 0..<50 { group.addTask { try await askName(port) } }
            return try await group.reduce(into: [String]()) { $0.append($1) }
        }
        // Both backends serve (not necessarily 25 each: under load a backend's accept queue
        // can overflow, and the relay then retries the connection on the other one).
        #expect(answers.count == 50)
        #expect(Set(answers) == ["A", "B"])
        await relays.closeAll()
        await a.close(); await b.close()
    }

    @Test("Endpoint changes keep established relays to endpoints that stay and close those to endpoints that left")
    func endpointChangesKeepOrCloseRelays() async throws {
        let e1 = try await echoServer(), e2 = try await echoServer()
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let name = spn("keep")
        let both = RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(e1.port), endpoint(e2.port)])
        let port = try #require(await relays.prepare([name: both]).ports[name])
        // Two long-lived connections: round robin puts one on each endpoint.
        let c1 = try await onThread { () -> BlockingSocket in
            let s = try BlockingSocket()
            try s.connect(port: port)
            try s.sendAll([1])
            guard try s.readOnce() == [1] else { throw SocketFailure(what: "echo", code: 0) }
            return s
        }
        let c2 = try await onThread { () -> BlockingSocket in
            let s = try BlockingSocket()
            try s.connect(port: port)
            try s.sendAll([2])
            guard try s.readOnce() == [2] else { throw SocketFailure(what: "echo", code: 0) }
            return s
        }
        #expect(await relays.relayCounts(name) == ["127.0.0.1:\(e1.port)": 1, "127.0.0.1:\(e2.port)": 1])

        // A third endpoint joins: nothing established is touched, and the relay port stays.
        let e3 = try await echoServer()
        let three = RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(e1.port), endpoint(e2.port), endpoint(e3.port)])
        let again = await relays.prepare([name: three])
        #expect(again.ports[name] == port)
        #expect(again.closedRelays == 0)

        // e1 leaves: c1 (on e1) is closed, c2 (on e2) keeps working.
        let gone = await relays.prepare([name: RelaySpec(name: name, proto: .tcp, endpoints: [endpoint(e2.port), endpoint(e3.port)])])
        #expect(gone.ports[name] == port)
        #expect(gone.closedRelays == 1)
        // EOF or a reset: closed. A receive timeout (EAGAIN) would mean it is still open.
        let c1Closed = try await onThread { () -> Bool in
            do { return try c1.readAll().isEmpty } catch let e as SocketFailure { return e.code != EAGAIN }
        }
        #expect(c1Closed)
        let c2Echo = try await onThread { () -> [UInt8] in
            try c2.sendAll([3, 4])
            var got: [UInt8] = []
            while got.count < 2 { got += try c2.readOnce() }
            return got
        }
        #expect(c2Echo == [3, 4])
        #expect(await relays.relayCounts(name) == ["127.0.0.1:\(e2.port)": 1])
        await relays.closeAll()
        for s in [e1, e2, e3] { await s.close() }
    }

    @Test("UDP: replies return to the right client; flows spread round robin; idle flows close")
    func udpFlows() async throws {
        let a = try await udpServer("A"), b = try await udpServer("B")
        // An idle timeout long enough that a loaded machine's slow reply never meets a
        // closed flow (a flow closes `udpIdle` after its last datagram either way); 1 s was
        // seen to lose a reply on a loaded 2-core machine.
        let relays = RelayManager(config: testConfig(udpIdle: .seconds(3)), logger: testLogger)
        let name = spn("dns", .udp)
        let port = try #require(await relays.prepare([name: RelaySpec(name: name, proto: .udp, endpoints: [endpoint(a.port), endpoint(b.port)])]).ports[name])
        // Fresh sockets: each is a new client address, so a new flow, so the next backend.
        var answers: [String] = []
        for _ in 0..<4 { answers.append(try await askUDP(port)) }
        #expect(answers == ["A", "B", "A", "B"])

        // One client, many datagrams: one flow, one backend, every reply to this client.
        let same = try await onThread { () -> [String] in
            let s = try BlockingSocket(udp: true)
            try s.connect(port: port)
            var out: [String] = []
            for _ in 0..<5 {
                try s.sendAll(Array("ping\n".utf8))
                out.append(String(decoding: try s.readOnce(), as: UTF8.self))
            }
            return out
        }
        #expect(Set(same).count == 1)
        // Idle flows close after 3 s.
        #expect(await eventually(within: .seconds(20)) { await relays.relayCounts(name).isEmpty })
        await relays.closeAll()
        await a.close(); await b.close()
    }

    @Test("UDP: with affinity a client keeps its backend across flows")
    func udpAffinity() async throws {
        let a = try await udpServer("A"), b = try await udpServer("B")
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let name = spn("sticky", .udp)
        let spec = RelaySpec(name: name, proto: .udp, endpoints: [endpoint(a.port), endpoint(b.port)], affinityTimeout: .seconds(60))
        let port = try #require(await relays.prepare([name: spec]).ports[name])
        var answers: Set<String> = []
        for _ in 0..<6 { answers.insert(try await askUDP(port)) }
        #expect(answers.count == 1)
        await relays.closeAll()
        await a.close(); await b.close()
    }

    @Test("NodePorts are held while the service port exists, serve the relay, and are released when it goes")
    func nodePortHeld() async throws {
        let a = try await namedServer("A")
        let u = try await udpServer("U")
        let nodePortTCP = try await deadPort()
        let nodePortUDP = try await deadPort()
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let tcp = spn("np"), udp = spn("np", .udp)
        let prepared = await relays.prepare([
            tcp: RelaySpec(name: tcp, proto: .tcp, nodePort: nodePortTCP, endpoints: [endpoint(a.port)]),
            udp: RelaySpec(name: udp, proto: .udp, nodePort: nodePortUDP, endpoints: [endpoint(u.port)]),
        ])
        #expect(prepared.nodePortFailures.isEmpty)
        #expect(await relays.heldNodePort(tcp) == nodePortTCP)
        #expect(await relays.heldNodePort(udp) == nodePortUDP)
        // Another process cannot bind them, even asking for SO_REUSEADDR on TCP.
        let (tcpErr, udpErr) = try await onThread { () -> (Int32, Int32) in
            let t = try BlockingSocket()
            var one: Int32 = 1
            setsockopt(t.fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            let u = try BlockingSocket(udp: true)
            return (t.bind(port: nodePortTCP), u.bind(port: nodePortUDP))
        }
        #expect(tcpErr == EADDRINUSE)
        #expect(udpErr == EADDRINUSE)
        // The held sockets serve the same relay.
        #expect(try await askName(nodePortTCP) == "A")
        #expect(try await askUDP(nodePortUDP) == "U")

        await relays.retire(keeping: [])
        // (SO_REUSEADDR: the connection above left the NodePort in TIME_WAIT.)
        let (tcpAfter, udpAfter) = try await onThread { () -> (Int32, Int32) in
            let t = try BlockingSocket()
            var one: Int32 = 1
            setsockopt(t.fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            return (t.bind(port: nodePortTCP), try BlockingSocket(udp: true).bind(port: nodePortUDP))
        }
        #expect(tcpAfter == 0)
        #expect(udpAfter == 0)
        await a.close(); await u.close()
    }

    @Test("A NodePort another process holds is reported, and held once it is free")
    func nodePortInUseIsRetried() async throws {
        let a = try await namedServer("A")
        let busyPort = try await deadPort()
        let squatter = try await namedServer("squatter", port: busyPort)
        let relays = RelayManager(config: testConfig(), logger: testLogger)
        let name = spn("busy")
        let spec = RelaySpec(name: name, proto: .tcp, nodePort: busyPort, endpoints: [endpoint(a.port)])
        let first = await relays.prepare([name: spec])
        #expect(first.ports[name] != nil, "the relay itself still works")
        #expect(first.nodePortFailures[name] != nil)
        #expect(await relays.heldNodePort(name) == nil)
        await squatter.close()
        let second = await relays.prepare([name: spec])
        #expect(second.nodePortFailures.isEmpty)
        #expect(await relays.heldNodePort(name) == busyPort)
        #expect(second.ports[name] == first.ports[name])
        await relays.closeAll()
        await a.close()
    }
}
