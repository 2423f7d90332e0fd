// Hostile clients against the HTTP server: header trickling, idle keep-alive connections,
// oversized requests, connection floods and the descriptor reserve. Every test checks that
// the server closes what it must and still answers a well-behaved client.

import Foundation
import Logging
import SluiceCore
import SluiceServer
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A raw TCP connection to 127.0.0.1 that the test drives byte by byte.
private final class RawConnection: @unchecked Sendable {
    let fd: Int32

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw HTTPClientError(description: "socket: errno \(errno)") }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            throw HTTPClientError(description: "connect: errno \(errno)")
        }
    }

    deinit { close(fd) }

    /// Sends `text`; false when the peer has closed (EPIPE/ECONNRESET).
    @discardableResult
    func send(_ text: String) -> Bool {
        let bytes = Array(text.utf8)
        return bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } == bytes.count
    }

    /// Waits up to `seconds` (a safety bound, not an assertion) for the peer to close; true
    /// when it did. Data the server sent first (an answer, a 400) is read and skipped.
    func closedByPeer(within seconds: Int) -> Bool {
        var buf = [UInt8](repeating: 0, count: 4096)
        let end = Date().addingTimeInterval(Double(seconds))
        while Date() < end {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return true }
        }
        return false
    }

    /// Reads what the server sent so far (up to 200 ms of waiting).
    func readAvailable() -> String {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while poll(&p, 1, 200) > 0 {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Reads until the text contains `marker`, the peer closes, or `seconds` pass (a loaded
    /// machine may take longer than one 200 ms poll to answer).
    func read(until marker: String, within seconds: Double = 10) -> String {
        var text = ""
        let deadline = Date().addingTimeInterval(seconds)
        while !text.contains(marker) && Date() < deadline {
            let more = readAvailable()
            if more.isEmpty {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                if poll(&p, 1, 0) > 0 { break }  // readable with nothing to read: closed
                continue
            }
            text += more
        }
        return text
    }
}

private func blocking<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { (c: CheckedContinuation<T, Never>) in Thread { c.resume(returning: body()) }.start() }
}

private func server(_ limits: HTTPServerLimits) async throws -> HTTPServer {
    try await HTTPServer.start(purpose: "test", address: BindAddress(host: IPAddress("127.0.0.1")!, port: 0),
                               logger: Logger(label: "test"), limits: limits) { request in
        HTTPReply(status: 200, headers: [("Content-Type", "text/plain")], body: "ok \(request.path)\n")
    }
}

@Suite(.serialized) struct HTTPLimitsTests {
    @Test func aClientTricklingHeaderLinesIsClosedAfterTheRequestTimeout() async throws {
        let s = try await server(HTTPServerLimits(requestTimeout: .milliseconds(500)))
        defer { Task { await s.close() } }
        let port = s.port
        let closed = await blocking {
            guard let c = try? RawConnection(port: port) else { return false }
            c.send("GET /healthz HTTP/1.1\r\n")
            // One header line every 100 ms: each read is fresh, only the request deadline ends it.
            for i in 0..<100 {
                if !c.send("X-Trickle-\(i): a\r\n") { return true }
                usleep(100_000)
                var p = pollfd(fd: c.fd, events: Int16(POLLIN), revents: 0)
                if poll(&p, 1, 0) > 0 { return c.closedByPeer(within: 1) }
            }
            return false
        }
        #expect(closed)
        #expect(try await httpGet(port: port, path: "/healthz").status == 200)
    }

    @Test func aConnectionThatSendsNothingIsClosed() async throws {
        let s = try await server(HTTPServerLimits(requestTimeout: .milliseconds(300)))
        defer { Task { await s.close() } }
        let port = s.port
        #expect(await blocking { (try? RawConnection(port: port))?.closedByPeer(within: 10) ?? false })
    }

    @Test func anIdleKeptAliveConnectionIsClosedAfterTheIdleTimeout() async throws {
        let s = try await server(HTTPServerLimits(requestTimeout: .seconds(30), idleTimeout: .milliseconds(300)))
        defer { Task { await s.close() } }
        let port = s.port
        let (answered, closed) = await blocking { () -> (Bool, Bool) in
            guard let c = try? RawConnection(port: port) else { return (false, false) }
            c.send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            let first = c.read(until: "ok /a")
            return (first.contains("ok /a"), c.closedByPeer(within: 10))
        }
        #expect(answered)
        #expect(closed)
    }

    @Test func anOversizedRequestClosesTheConnection() async throws {
        let s = try await server(HTTPServerLimits(maxRequestBytes: 4096))
        defer { Task { await s.close() } }
        let port = s.port
        let (closed, answer) = await blocking { () -> (Bool, String) in
            guard let c = try? RawConnection(port: port) else { return (false, "") }
            c.send("GET /healthz HTTP/1.1\r\nX-Big: " + String(repeating: "a", count: 8192) + "\r\n\r\n")
            let text = c.readAvailable()
            return (c.closedByPeer(within: 10), text)
        }
        #expect(closed)
        #expect(!answer.contains("ok /healthz"))
        #expect(try await httpGet(port: port, path: "/healthz").status == 200)
    }

    @Test func connectionsPastTheCapAreClosedAndTheServerStillAnswersOthers() async throws {
        // The test's client is on loopback, which the per-client cap spares unless told otherwise.
        let s = try await server(HTTPServerLimits(requestTimeout: .seconds(60), maxConnections: 100, maxConnectionsPerClient: 4,
                                                  capLoopbackClients: true))
        defer { Task { await s.close() } }
        let port = s.port
        var held: [RawConnection?] = try (0..<4).map { _ in try RawConnection(port: port) }
        for _ in 0..<200 where s.openConnections < 4 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(s.openConnections == 4)
        let extra = try RawConnection(port: port)
        #expect(await blocking { extra.closedByPeer(within: 10) })
        #expect(s.refusedConnections >= 1)
        // The held ones are still served.
        let first = held[0]!
        first.send("GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(await blocking { first.read(until: "ok /x") }.contains("ok /x"))
        // Closing one frees its slot for a new client.
        held[3] = nil
        for _ in 0..<200 where s.openConnections > 3 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(try await httpGet(port: port, path: "/healthz").status == 200)
        #expect(held.count == 4)
    }

    @Test func theDescriptorReserveRefusesConnectionsNearTheOpenFileLimit() async throws {
        var rl = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &rl)
        let limit = Int(min(rl.rlim_cur, 1 << 30))
        // A reserve as large as the limit: every new connection is past it.
        let s = try await server(HTTPServerLimits(descriptorReserve: limit))
        defer { Task { await s.close() } }
        let port = s.port
        let c = try RawConnection(port: port)
        c.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(await blocking { c.closedByPeer(within: 10) })
        #expect(s.refusedConnections >= 1)
        // A reserve well inside the limit serves as usual.
        let t = try await server(HTTPServerLimits(descriptorReserve: 16))
        defer { Task { await t.close() } }
        #expect(try await httpGet(port: t.port, path: "/healthz").status == 200)
    }

    @Test func loopbackClientsAreSparedThePerClientCapButNotTheServerCap() async throws {
        let s = try await server(HTTPServerLimits(requestTimeout: .seconds(60), maxConnections: 6, maxConnectionsPerClient: 2))
        defer { Task { await s.close() } }
        let port = s.port
        let held = try (0..<6).map { _ in try RawConnection(port: port) }
        for _ in 0..<200 where s.openConnections < 6 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(s.openConnections == 6)
        #expect(s.refusedConnections == 0)
        let extra = try RawConnection(port: port)
        #expect(await blocking { extra.closedByPeer(within: 10) })
        #expect(s.refusedConnections == 1)
        #expect(held.count == 6)
    }
}
