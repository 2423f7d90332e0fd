// Test support for the relay tests: small NIO backends on 127.0.0.1 (named, echo, UDP) and
// blocking POSIX clients run on their own threads, so the relays are exercised by plain
// sockets, as a real client would.

import Foundation
import Logging
import NIOCore
import NIOPosix
import SluiceCore
import Synchronization
import Userspace
#if canImport(Glibc)
import Glibc
#endif

let testLogger: Logger = {
    var l = Logger(label: "userspace-test")
    l.logLevel = .critical
    return l
}()

let loopback = IPAddress("127.0.0.1")!

/// An endpoint on 127.0.0.1.
func endpoint(_ port: Int) -> EndpointInfo { EndpointInfo(ip: loopback, port: port) }

/// A service port name for tests.
func spn(_ name: String, _ proto: TransportProtocol = .tcp) -> ServicePortName {
    ServicePortName(service: NamespacedName(namespace: "ut", name: name), port: "p", proto: proto)
}

/// A time the test moves by hand (the relays' affinity clock).
final class TestTime: Sendable {
    private let value = Mutex(Duration.zero)
    var now: Duration { value.withLock { $0 } }
    func advance(_ d: Duration) { value.withLock { $0 += d } }
}

/// Relay settings for tests: loopback only. The UDP idle timeout is long by default: a flow
/// closes that long after its last datagram, and a loaded test machine can be slower than
/// the production 250 ms between a request and its reply.
func testConfig(udpIdle: Duration = .seconds(10), time: TestTime? = nil, maxListeners: Int? = nil) -> RelayConfig {
    let t = time
    return RelayConfig(listenAddress: "127.0.0.1", udpIdleTimeout: udpIdle,
                       connectTimeouts: [.milliseconds(500), .seconds(1)], maxConnectAttempts: 4, backlog: 1024,
                       maxListeners: maxListeners, now: { t?.now ?? RelayConfig.monotonicNow() })
}

// MARK: - backends

/// A listening test backend.
struct TestServer: Sendable {
    let channel: any Channel
    var port: Int { channel.localAddress?.port ?? 0 }
    func close() async { try? await channel.close() }
}

/// TCP: writes `name\n` to every connection and closes it.
func namedServer(_ name: String, port: Int = 0) async throws -> TestServer {
    let ch = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(NamedHandler(name: name))
            }
        }
        .bind(host: "127.0.0.1", port: port).get()
    return TestServer(channel: ch)
}

private final class NamedHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let name: String
    init(name: String) { self.name = name }
    func channelActive(context: ChannelHandlerContext) {
        let channel = context.channel
        context.writeAndFlush(NIOAny(channel.allocator.buffer(string: name + "\n"))).whenComplete { _ in
            channel.close(promise: nil)
        }
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

/// TCP: echoes every byte; when the client half-closes, sends `END <count> <fnv1a64>\n` for
/// what it received and closes.
func echoServer() async throws -> TestServer {
    let ch = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .childChannelOption(.allowRemoteHalfClosure, value: true)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(EchoHandler())
            }
        }
        .bind(host: "127.0.0.1", port: 0).get()
    return TestServer(channel: ch)
}

/// FNV-1a, 64 bits: a checksum both sides compute without extra dependencies.
func fnv1a(_ bytes: some Sequence<UInt8>, seed: UInt64 = 0xcbf2_9ce4_8422_2325) -> UInt64 {
    var h = seed
    for b in bytes {
        h ^= UInt64(b)
        h = h &* 0x100_0000_01b3
    }
    return h
}

private final class EchoHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    var count = 0
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buf = unwrapInboundIn(data)
        count += buf.readableBytes
        hash = fnv1a(buf.readableBytesView, seed: hash)
        context.write(NIOAny(buf), promise: nil)
    }
    func channelReadComplete(context: ChannelHandlerContext) { context.flush() }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e {
            let channel = context.channel
            let trailer = "END \(count) \(String(hash, radix: 16))\n"
            context.writeAndFlush(NIOAny(channel.allocator.buffer(string: trailer))).whenComplete { _ in
                channel.close(promise: nil)
            }
        }
    }
}

/// UDP: answers every datagram with `name\n`.
func udpServer(_ name: String) async throws -> TestServer {
    let ch = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(UDPNameHandler(name: name))
            }
        }
        .bind(host: "127.0.0.1", port: 0).get()
    return TestServer(channel: ch)
}

private final class UDPNameHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>
    let name: String
    init(name: String) { self.name = name }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let env = unwrapInboundIn(data)
        let reply = AddressedEnvelope(remoteAddress: env.remoteAddress, data: context.channel.allocator.buffer(string: name + "\n"))
        context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
    }
}

/// A port on 127.0.0.1 nobody listens on, for a dead endpoint or a NodePort: picked in the
/// NodePort range 30000-32767, below the ephemeral range, so that the other tests of this
/// process, which take their ports from the kernel (bind to port 0), never get it next.
func deadPort() async throws -> Int {
    try await onThread {
        for _ in 0..<200 {
            let candidate = Int.random(in: 30000...32767)
            guard try BlockingSocket().bind(port: candidate) == 0,
                  try BlockingSocket(udp: true).bind(port: candidate) == 0 else { continue }
            return candidate
        }
        throw SocketFailure(what: "no free port in 30000-32767", code: EADDRINUSE)
    }
}

// MARK: - blocking clients

struct SocketFailure: Error, CustomStringConvertible {
    var what: String
    var code: Int32
    var description: String { "\(what): \(String(cString: strerror(code))) (errno \(code))" }
}

/// Runs blocking work on a thread of its own (never on the cooperative pool).
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, any Error>) in
        let t = Thread { cont.resume(with: Result { try body() }) }
        t.start()
    }
}

/// A blocking IPv4 socket.
final class BlockingSocket: @unchecked Sendable {
    let fd: Int32

    init(udp: Bool = false, timeout: Double = 10) throws {
        #if canImport(Glibc)
        let type = Int32(udp ? SOCK_DGRAM.rawValue : SOCK_STREAM.rawValue)
        #else
        let type = udp ? SOCK_DGRAM : SOCK_STREAM
        #endif
        fd = socket(AF_INET, type, 0)
        guard fd >= 0 else { throw SocketFailure(what: "socket", code: errno) }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    private static func address(_ port: Int) -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        return a
    }

    func connect(port: Int) throws {
        var a = BlockingSocket.address(port)
        let r = withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard r == 0 else { throw SocketFailure(what: "connect 127.0.0.1:\(port)", code: errno) }
    }

    /// bind(2) on 127.0.0.1:port; returns errno (0 on success).
    func bind(port: Int) -> Int32 {
        var a = BlockingSocket.address(port)
        let r = withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        return r == 0 ? 0 : errno
    }

    func sendAll(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw SocketFailure(what: "send", code: errno) }
            off += n
        }
    }

    func shutdownWrite() { _ = shutdown(fd, Int32(SHUT_WR)) }

    /// Reads until EOF (or the receive timeout, which throws EAGAIN).
    func readAll() throws -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n == 0 { return out }
            guard n > 0 else { throw SocketFailure(what: "recv after \(out.count) bytes", code: errno) }
            out += buf[0..<n]
        }
    }

    /// One read (one datagram for UDP).
    func readOnce() throws -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard n >= 0 else { throw SocketFailure(what: "recv", code: errno) }
        return Array(buf[0..<n])
    }
}

/// Connects to the relay, reads the whole answer of a named backend.
func askName(_ port: Int) async throws -> String {
    try await onThread {
        let s = try BlockingSocket()
        try s.connect(port: port)
        return String(decoding: try s.readAll(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// One UDP request from a fresh socket; returns the answer.
func askUDP(_ port: Int, timeout: Double = 10) async throws -> String {
    try await onThread {
        let s = try BlockingSocket(udp: true, timeout: timeout)
        try s.connect(port: port)
        try s.sendAll(Array("ping\n".utf8))
        return String(decoding: try s.readOnce(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// Polls `condition` every 20 ms for up to `within`.
func eventually(within: Duration = .seconds(5), _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + within
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return try await condition()
}
