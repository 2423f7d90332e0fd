// Sluice: a per-node Kubernetes service proxy.
// A small HTTP/1.1 server on SwiftNIO for the health, service health-check and metrics
// endpoints: every answer is computed synchronously from lock-protected state.

#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import SluiceCore
import Synchronization

/// `host:port` for a listener (`--healthz-bind-address`, `--metrics-bind-address`).
public struct BindAddress: Sendable, Hashable, CustomStringConvertible {
    /// The IP address to bind (`0.0.0.0` and `::` mean every address, IPv4 and IPv6).
    public var host: IPAddress
    /// The TCP port; 0 picks a free one.
    public var port: Int

    /// Creates an address.
    public init(host: IPAddress, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses `IP:port` or `[IPv6]:port`.
    /// - Returns: nil for the empty string, which disables the server (kube-proxy's convention).
    /// - Throws: `ConfigError` naming `field` when the text is not such an address.
    public static func parse(_ text: String, field: String) throws(ConfigError) -> BindAddress? {
        if text.isEmpty { return nil }
        guard let colon = text.lastIndex(of: ":") else {
            throw ConfigError(field: field, value: text, reason: "expected IP:port, such as 0.0.0.0:10256 or [::]:10256")
        }
        var host = String(text[..<colon])
        let portText = String(text[text.index(after: colon)...])
        if host.hasPrefix("[") && host.hasSuffix("]") {
            host = String(host.dropFirst().dropLast())
            guard host.contains(":") else { throw ConfigError(field: field, value: text, reason: "brackets are for IPv6 addresses") }
        } else if host.contains(":") {
            throw ConfigError(field: field, value: text, reason: "an IPv6 address must be in brackets, such as [::]:10256")
        }
        guard let ip = IPAddress(host) else { throw ConfigError(field: field, value: text, reason: "\"\(host)\" is not an IP address") }
        guard let port = Int(portText), (0...65535).contains(port), portText.allSatisfy(\.isNumber) else {
            throw ConfigError(field: field, value: text, reason: "\"\(portText)\" is not a port number (0-65535)")
        }
        return BindAddress(host: ip, port: port)
    }

    /// `IP:port`, with brackets for IPv6.
    public var description: String { host.joined(port: port) }
}

/// What a handler sees of a request.
public struct HTTPRequestInfo: Sendable, Hashable {
    /// `GET`, `HEAD`, ...
    public var method: String
    /// The path, without the query.
    public var path: String
}

/// A complete response.
public struct HTTPReply: Sendable {
    /// The status code.
    public var status: Int
    /// Header fields in order (Content-Length is added by the server).
    public var headers: [(name: String, value: String)]
    /// The body.
    public var body: String

    /// Creates a response.
    public init(status: Int, headers: [(name: String, value: String)], body: String) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// Go's `http.NotFound`: `404 page not found`.
    public static let notFound = HTTPReply(
        status: 404,
        headers: [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")],
        body: "404 page not found\n")
}

/// Bounds on what clients may hold of a server: every server (health, metrics, per-Service
/// health checks) is reachable by anyone on the node's network, and each connection costs a
/// file descriptor that the sync path (iptables-restore's temporary files, the manifest
/// directory) needs too.
public struct HTTPServerLimits: Sendable, Hashable {
    /// From the moment a connection opens (or its previous answer was sent) until its request
    /// head and body have arrived; a client that trickles header lines is closed after it.
    public var requestTimeout: Duration
    /// How long a kept-alive connection may sit between requests.
    public var idleTimeout: Duration
    /// Open connections per server; further ones are closed on accept.
    public var maxConnections: Int
    /// Open connections per server from one client address (loopback clients excepted, see
    /// `capLoopbackClients`).
    public var maxConnectionsPerClient: Int
    /// Whether the per-client cap applies to loopback clients too. Off by default: a local
    /// scraper may open hundreds of connections at once (the metrics server listens on
    /// 127.0.0.1), and a local process can exhaust descriptors by other means anyway; the
    /// server cap and the descriptor reserve still apply.
    public var capLoopbackClients: Bool
    /// Bytes one request (head and body) may take; a larger one closes the connection.
    public var maxRequestBytes: Int
    /// Descriptors kept free for everything else: a connection is closed on accept when the
    /// process is within this many of its open-file limit (`RLIMIT_NOFILE`).
    public var descriptorReserve: Int
    /// The listen backlog (the kernel caps it at `net.core.somaxconn`): a burst of hundreds
    /// of concurrent scrapes waits in the queue instead of retrying its SYN after 1 s.
    public var backlog: Int32

    /// Creates limits.
    public init(requestTimeout: Duration = .seconds(10), idleTimeout: Duration = .seconds(60), maxConnections: Int = 512,
                maxConnectionsPerClient: Int = 64, capLoopbackClients: Bool = false, maxRequestBytes: Int = 16 * 1024,
                descriptorReserve: Int = 256, backlog: Int32 = 4096) {
        self.requestTimeout = requestTimeout
        self.idleTimeout = idleTimeout
        self.maxConnections = maxConnections
        self.maxConnectionsPerClient = maxConnectionsPerClient
        self.capLoopbackClients = capLoopbackClients
        self.maxRequestBytes = maxRequestBytes
        self.descriptorReserve = descriptorReserve
        self.backlog = backlog
    }

    /// What every server uses unless told otherwise.
    public static let standard = HTTPServerLimits()
}

/// Why a connection was closed on accept.
enum ConnectionRefusal: Error, Hashable, CustomStringConvertible {
    case serverFull(Int)
    case clientFull(String, Int)
    case descriptorReserve(Int)

    var description: String {
        switch self {
        case .serverFull(let n): return "\(n) connections open"
        case .clientFull(let client, let n): return "\(n) connections open from \(client)"
        case .descriptorReserve(let n): return "fewer than \(n) file descriptors left below the open-file limit"
        }
    }
}

/// The connections one server holds, by client address; refusals are logged at most once
/// every 10 s per server.
final class ConnectionTable: Sendable {
    private struct State {
        var total = 0
        var byClient: [String: Int] = [:]
        var refused = 0
        var lastLog: ContinuousClock.Instant?
    }

    private let state = Mutex(State())
    let limits: HTTPServerLimits
    let purpose: String
    let logger: Logger

    init(limits: HTTPServerLimits, purpose: String, logger: Logger) {
        self.limits = limits
        self.purpose = purpose
        self.logger = logger
    }

    /// Connections open now.
    var open: Int { state.withLock { $0.total } }
    /// Connections refused so far.
    var refused: Int { state.withLock { $0.refused } }

    /// Takes a slot for `client`, or says why not.
    func admit(_ client: String) -> ConnectionRefusal? {
        let refusal: ConnectionRefusal? = state.withLock { s in
            if s.total >= limits.maxConnections { return .serverFull(s.total) }
            let mine = s.byClient[client, default: 0]
            if mine >= limits.maxConnectionsPerClient && (limits.capLoopbackClients || !ConnectionTable.isLoopback(client)) {
                return .clientFull(client, mine)
            }
            if !DescriptorBudget.hasRoom(reserve: limits.descriptorReserve) { return .descriptorReserve(limits.descriptorReserve) }
            s.total += 1
            s.byClient[client] = mine + 1
            return nil
        }
        if let refusal {
            let shouldLog: Bool = state.withLock { s in
                s.refused += 1
                let now = ContinuousClock.now
                if let last = s.lastLog, last.duration(to: now) < .seconds(10) { return false }
                s.lastLog = now
                return true
            }
            if shouldLog { logger.warning("\(purpose): closing new connections (\(refusal)); \(refused) refused so far") }
        }
        return refusal
    }

    /// 127.0.0.0/8, ::1, and IPv4 loopback mapped into IPv6 (a dual-stack listener's view).
    static func isLoopback(_ client: String) -> Bool {
        client.hasPrefix("127.") || client == "::1" || client.lowercased().hasPrefix("::ffff:127.")
    }

    /// Frees `client`'s slot.
    func release(_ client: String) {
        state.withLock { s in
            s.total -= 1
            let left = s.byClient[client, default: 1] - 1
            s.byClient[client] = left > 0 ? left : nil
        }
    }
}

/// Whether the process may open another descriptor and still keep a reserve.
enum DescriptorBudget {
    /// The soft open-file limit.
    static var limit: Int {
        var rl = rlimit()
        #if canImport(Glibc)
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        #else
        let resource = RLIMIT_NOFILE
        #endif
        guard getrlimit(resource, &rl) == 0 else { return Int.max }
        return rl.rlim_cur >= rlim_t(Int.max) ? Int.max : Int(rl.rlim_cur)
    }

    /// Opens /dev/null and closes it: the kernel hands out the lowest free descriptor, so its
    /// number is a lower bound on the descriptors in use. Two system calls, no directory scan.
    static func hasRoom(reserve: Int) -> Bool {
        let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        close(fd)
        let limit = self.limit
        return limit == Int.max || Int(fd) < limit - reserve
    }
}

/// A listener that could not be opened.
public struct HTTPServerError: Error, Sendable, CustomStringConvertible {
    /// What the server is for, e.g. "healthz".
    public var purpose: String
    /// Where it tried to listen.
    public var address: String
    /// The underlying error.
    public var reason: String

    public var description: String { "cannot serve \(purpose) on \(address): \(reason)" }
}

/// One listening HTTP server.
public final class HTTPServer: Sendable {
    private let channel: any Channel
    private let table: ConnectionTable
    /// What the server is for (logs, errors).
    public let purpose: String
    /// The address actually bound (with the real port when 0 was asked for).
    public let boundAddress: String
    /// The bound port.
    public let port: Int

    /// Connections open now.
    public var openConnections: Int { table.open }
    /// Connections closed on accept so far (a cap or the descriptor reserve).
    public var refusedConnections: Int { table.refused }

    private init(channel: any Channel, purpose: String, table: ConnectionTable) {
        self.channel = channel
        self.table = table
        self.purpose = purpose
        self.port = channel.localAddress?.port ?? 0
        self.boundAddress = channel.localAddress.map { a in
            let ip = a.ipAddress ?? "?"
            return (ip.contains(":") ? "[\(ip)]" : ip) + ":\(a.port ?? 0)"
        } ?? "?"
    }

    /// Binds `address` and starts serving `handler`'s answers.
    ///
    /// An unspecified host (`0.0.0.0` or `::`) listens on IPv6 and IPv4 at once where the host
    /// has IPv6 (as Go's `net.Listen("tcp", ...)`, which kube-proxy uses, does), else on IPv4.
    ///
    /// `limits` bound what clients may hold (see `HTTPServerLimits`); a connection past them is
    /// closed, the others are served as before.
    public static func start(purpose: String, address: BindAddress, logger: Logger, limits: HTTPServerLimits = .standard,
                             handler: @escaping @Sendable (HTTPRequestInfo) -> HTTPReply) async throws(HTTPServerError) -> HTTPServer {
        let table = ConnectionTable(limits: limits, purpose: purpose, logger: logger)
        if address.host.isUnspecified {
            do {
                return try await bind(purpose: purpose, host: "::", port: address.port, dualStack: true, table: table, handler: handler)
            } catch {
                if address.host.family == .ipv6 {
                    throw HTTPServerError(purpose: purpose, address: address.description, reason: "\(error)")
                }
                logger.debug("no IPv6 listener for \(purpose) (\(error)); listening on IPv4 only")
            }
        }
        do {
            return try await bind(purpose: purpose, host: address.host.description, port: address.port, dualStack: false, table: table,
                                  handler: handler)
        } catch {
            throw HTTPServerError(purpose: purpose, address: address.description, reason: "\(error)")
        }
    }

    private static func bind(purpose: String, host: String, port: Int, dualStack: Bool, table: ConnectionTable,
                             handler: @escaping @Sendable (HTTPRequestInfo) -> HTTPReply) async throws -> HTTPServer {
        let limits = table.limits
        var bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: limits.backlog)
            .childChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                let client = channel.remoteAddress?.ipAddress ?? "?"
                if let refusal = table.admit(client) {
                    // A failed initializer makes the bootstrap close the accepted socket.
                    return channel.eventLoop.makeFailedFuture(refusal)
                }
                channel.closeFuture.whenComplete { _ in table.release(client) }
                return channel.eventLoop.makeCompletedFuture {
                    let guardHandler = RequestGuard(limits: limits)
                    try channel.pipeline.syncOperations.addHandler(guardHandler)
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(HTTPHandler(respond: handler, guardHandler: guardHandler))
                }
            }
        if dualStack {
            bootstrap = bootstrap.serverChannelOption(ChannelOptions.Types.SocketOption(level: .ipv6, name: .ipv6_v6only), value: 0)
        }
        // An address, not a host name: no resolver involved (getaddrinfo's AI_ADDRCONFIG would
        // hide "::" on a node whose only IPv6 address is ::1).
        let channel = try await bootstrap.bind(to: SocketAddress(ipAddress: host, port: port)).get()
        return HTTPServer(channel: channel, purpose: purpose, table: table)
    }

    /// Stops listening. Connections in progress finish their current answer.
    public func close() async {
        try? await channel.close()
    }

    /// Serves until the calling task is cancelled, then closes the listener.
    public func serveUntilCancelled() async {
        let channel = self.channel
        await withTaskCancellationHandler {
            try? await channel.closeFuture.get()
        } onCancel: {
            channel.close(promise: nil)
        }
    }
}

/// First in every connection's pipeline, on the raw bytes: closes the connection when a
/// request takes longer than `requestTimeout` to arrive, when it sits idle between requests
/// longer than `idleTimeout`, or when one request's bytes pass `maxRequestBytes`. The HTTP
/// handler tells it when a request is complete and when its answer has been sent.
final class RequestGuard: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let limits: HTTPServerLimits
    private var context: ChannelHandlerContext?
    private var deadline: Scheduled<Void>?
    /// Bytes of the request in progress.
    private var bytes = 0
    /// A request head or body is being received (between its first byte and its end).
    private var receiving = false
    /// Requests received and not yet answered (HTTP/1.1 pipelining).
    private var unanswered = 0

    init(limits: HTTPServerLimits) { self.limits = limits }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        arm(limits.requestTimeout)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        if !receiving && unanswered == 0 {
            // The first byte of a new request on a kept-alive connection: from idle to request.
            receiving = true
            arm(limits.requestTimeout)
        }
        receiving = true
        bytes += buffer.readableBytes
        if bytes > limits.maxRequestBytes {
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(data)
    }

    /// The HTTP handler received a whole request.
    func requestComplete() {
        receiving = false
        bytes = 0
        unanswered += 1
        deadline?.cancel()
        deadline = nil
    }

    /// The HTTP handler sent an answer; with nothing else pending, the idle timer runs.
    func responseSent() {
        unanswered = max(0, unanswered - 1)
        if unanswered == 0 && !receiving { arm(limits.idleTimeout) }
    }

    private func arm(_ after: Duration) {
        deadline?.cancel()
        guard let context else { return }
        let channel = context.channel
        deadline = context.eventLoop.scheduleTask(in: .nanoseconds(Int64(after.components.seconds) * 1_000_000_000
                                                                   + after.components.attoseconds / 1_000_000_000)) {
            channel.close(promise: nil)
        }
    }
}

/// Answers each request once its end arrives; keeps the connection open when the client asks.
private final class HTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let respond: @Sendable (HTTPRequestInfo) -> HTTPReply
    private let guardHandler: RequestGuard
    private var head: HTTPRequestHead?

    init(respond: @escaping @Sendable (HTTPRequestInfo) -> HTTPReply, guardHandler: RequestGuard) {
        self.respond = respond
        self.guardHandler = guardHandler
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
        case .body:
            break
        case .end:
            guard let request = head else { return }
            head = nil
            guardHandler.requestComplete()
            let path = String(request.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
            let reply = respond(HTTPRequestInfo(method: request.method.rawValue, path: path))
            var headers = HTTPHeaders()
            for (name, value) in reply.headers { headers.add(name: name, value: value) }
            headers.add(name: "Content-Length", value: String(reply.body.utf8.count))
            let keepAlive = request.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            let status = HTTPResponseStatus(statusCode: reply.status)
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
            if request.method != .HEAD {
                var buffer = context.channel.allocator.buffer(capacity: reply.body.utf8.count)
                buffer.writeString(reply.body)
                context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            }
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if !keepAlive {
                let channel = context.channel
                done.whenComplete { _ in channel.close(promise: nil) }
            } else {
                let guardHandler = NIOLoopBound(self.guardHandler, eventLoop: context.eventLoop)
                done.whenSuccess { guardHandler.value.responseSent() }
            }
        }
    }
}
