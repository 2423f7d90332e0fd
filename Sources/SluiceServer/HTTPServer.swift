// Sluice: a per-node Kubernetes service proxy.
// A small HTTP/1.1 server on SwiftNIO for the health, service health-check and metrics
// endpoints: every answer is computed synchronously from lock-protected state.

import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import SluiceCore

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
    /// What the server is for (logs, errors).
    public let purpose: String
    /// The address actually bound (with the real port when 0 was asked for).
    public let boundAddress: String
    /// The bound port.
    public let port: Int

    private init(channel: any Channel, purpose: String) {
        self.channel = channel
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
    public static func start(purpose: String, address: BindAddress, logger: Logger,
                             handler: @escaping @Sendable (HTTPRequestInfo) -> HTTPReply) async throws(HTTPServerError) -> HTTPServer {
        if address.host.isUnspecified {
            do {
                return try await bind(purpose: purpose, host: "::", port: address.port, dualStack: true, handler: handler)
            } catch {
                if address.host.family == .ipv6 {
                    throw HTTPServerError(purpose: purpose, address: address.description, reason: "\(error)")
                }
                logger.debug("no IPv6 listener for \(purpose) (\(error)); listening on IPv4 only")
            }
        }
        do {
            return try await bind(purpose: purpose, host: address.host.description, port: address.port, dualStack: false, handler: handler)
        } catch {
            throw HTTPServerError(purpose: purpose, address: address.description, reason: "\(error)")
        }
    }

    private static func bind(purpose: String, host: String, port: Int, dualStack: Bool,
                             handler: @escaping @Sendable (HTTPRequestInfo) -> HTTPReply) async throws -> HTTPServer {
        var bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(HTTPHandler(respond: handler))
                }
            }
        if dualStack {
            bootstrap = bootstrap.serverChannelOption(ChannelOptions.Types.SocketOption(level: .ipv6, name: .ipv6_v6only), value: 0)
        }
        // An address, not a host name: no resolver involved (getaddrinfo's AI_ADDRCONFIG would
        // hide "::" on a node whose only IPv6 address is ::1).
        let channel = try await bootstrap.bind(to: SocketAddress(ipAddress: host, port: port)).get()
        return HTTPServer(channel: channel, purpose: purpose)
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

/// Answers each request once its end arrives; keeps the connection open when the client asks.
private final class HTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let respond: @Sendable (HTTPRequestInfo) -> HTTPReply
    private var head: HTTPRequestHead?

    init(respond: @escaping @Sendable (HTTPRequestInfo) -> HTTPReply) {
        self.respond = respond
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
            }
        }
    }
}
