// Sluice: a per-node Kubernetes service proxy.
// The TCP relay: an accepted connection is held (no reads) until a backend connection is
// made, trying the next backend when one refuses or times out; then two glue handlers
// copy bytes both ways with back-pressure, pass a half-close on as a half-close once every
// byte before it has been written, and close both sides when either fails.

import Logging
import NIOCore
import NIOPosix
import SluiceCore

/// Listens for one service port's TCP connections (on its relay port or its NodePort).
enum TCPRelay {
    /// Binds a listener whose accepted connections are relayed for `service`.
    /// - Parameter reuseAddress: set SO_REUSEADDR (a held NodePort: a restarted proxy can
    ///   bind again over TIME_WAIT; a listening socket still keeps every other process out).
    static func listen(host: String, port: Int, service: ServiceRelayState, group: any EventLoopGroup,
                       reuseAddress: Bool) async throws -> any Channel {
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: Int32(clamping: service.config.backlog))
            .childChannelOption(.autoRead, value: false)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([ReadHold(), TCPConnectHandler(service: service)])
                }
            }
        if reuseAddress {
            bootstrap = bootstrap.serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        }
        return try await bootstrap.bind(to: SocketAddress(ipAddress: host, port: port)).get()
    }

    /// Closes `channel` with a RST (SO_LINGER 0): the client learns at once that nothing
    /// answers, rather than reading an empty reply.
    static func reset(_ channel: any Channel) {
        guard let provider = channel as? any SocketOptionProvider else {
            channel.close(promise: nil)
            return
        }
        provider.setSoLinger(linger(l_onoff: 1, l_linger: 0)).whenComplete { _ in channel.close(promise: nil) }
    }
}

/// The first handler of an accepted connection: picks a backend and connects to it.
final class TCPConnectHandler: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    private let service: ServiceRelayState

    init(service: ServiceRelayState) {
        self.service = service
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        let client = context.channel.remoteAddress?.ipAddress.flatMap(IPAddress.init)
        connect(context.channel, client: client, attempt: 0, attempts: service.connectAttempts)
    }

    /// Attempt `attempt` (0-based) of at most `attempts`; each retry takes the next endpoint
    /// in turn, ignoring (and moving) the client's affinity pin.
    private func connect(_ channel: any Channel, client: IPAddress?, attempt: Int, attempts: Int) {
        guard channel.isActive else { return }
        guard let endpoint = service.pick(client: client, resetAffinity: attempt > 0) else {
            service.logger.debug("\(service.name): no endpoints; resetting the connection from \(client?.description ?? "?")")
            TCPRelay.reset(channel)
            return
        }
        let address: SocketAddress
        do {
            address = try SocketAddress(ipAddress: endpoint.ip.description, port: endpoint.port)
        } catch {
            service.logger.error("\(service.name): bad endpoint address \(endpoint): \(error)")
            TCPRelay.reset(channel)
            return
        }
        ClientBootstrap(group: channel.eventLoop)
            .connectTimeout(service.config.connectTimeout(attempt: attempt))
            .channelOption(.autoRead, value: false)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { backend in
                backend.eventLoop.makeCompletedFuture { try backend.pipeline.syncOperations.addHandler(ReadHold()) }
            }
            .connect(to: address)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let backend):
                    self.join(client: channel, backend: backend, endpoint: endpoint)
                case .failure(let error):
                    if attempt + 1 < attempts && channel.isActive {
                        self.service.logger.debug("\(self.service.name): connecting to \(endpoint) failed (\(error)); trying the next endpoint")
                        self.connect(channel, client: client, attempt: attempt + 1, attempts: attempts)
                    } else {
                        self.service.logger.info("\(self.service.name): connecting to \(endpoint) failed (\(error)) after \(attempt + 1) attempt(s); resetting the client connection")
                        TCPRelay.reset(channel)
                    }
                }
            }
    }

    /// Glues the two channels together and starts reading on both.
    private func join(client: any Channel, backend: any Channel, endpoint: EndpointInfo) {
        guard client.isActive,
              let ticket = service.register(endpoint: endpoint.description, channels: [client, backend]) else {
            // The client left, or the endpoint went away while we connected.
            backend.close(promise: nil)
            client.close(promise: nil)
            return
        }
        let service = self.service
        client.closeFuture.and(backend.closeFuture).whenComplete { _ in service.unregister(ticket) }
        let (clientGlue, backendGlue) = RelayGlue.pair()
        do {
            try backend.pipeline.syncOperations.addHandler(backendGlue)
            try client.pipeline.syncOperations.addHandler(clientGlue)
            try backend.syncOptions?.setOption(.autoRead, value: true)
            try client.syncOptions?.setOption(.autoRead, value: true)
            try backend.pipeline.syncOperations.handler(type: ReadHold.self).release()
            try client.pipeline.syncOperations.handler(type: ReadHold.self).release()
        } catch {
            service.logger.error("\(service.name): cannot start the relay to \(endpoint): \(error)")
            backend.close(promise: nil)
            client.close(promise: nil)
        }
    }
}

/// Holds what a channel reads until the relay is joined, then passes it on in order.
///
/// `autoRead` off is not enough: when the peer half-closes, NIO reads everything up to the
/// EOF at once (its one-shot `readEOF` handling), so a client that sends its request and
/// shuts down its write side before the backend connection is up would otherwise have its
/// bytes and its EOF dropped at the end of the pipeline.
final class ReadHold: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    private var context: ChannelHandlerContext?
    private var held: [NIOAny] = []
    private var heldEOF = false
    private var released = false

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if released { context.fireChannelRead(data) } else { held.append(data) }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if released { context.fireChannelReadComplete() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if !released, let e = event as? ChannelEvent, case .inputClosed = e {
            heldEOF = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// Passes on what was held and everything that follows.
    func release() {
        guard !released else { return }
        released = true
        guard let context else { return }
        if !held.isEmpty {
            let data = held
            held = []
            for d in data { context.fireChannelRead(d) }
            context.fireChannelReadComplete()
        }
        if heldEOF { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
    }
}

/// One side of a relay: what its channel reads is written to the partner's channel.
///
/// - Back-pressure: a side reads only while the partner's channel is writable.
/// - Half-close: when a side reads EOF, the partner's output is shut down once the writes
///   queued before it have completed (never earlier: NIO would drop them when the
///   partner's input is already closed and the half-close escalates to a full close).
/// - A side that closes cleanly lets the partner finish its writes, then closes it; a side
///   that fails closes the partner at once.
final class RelayGlue: ChannelDuplexHandler {
    typealias InboundIn = NIOAny
    typealias OutboundIn = NIOAny
    typealias OutboundOut = NIOAny

    private var partner: RelayGlue?
    private var context: ChannelHandlerContext?
    private var pendingRead = false
    private var failed = false

    private init() {}

    /// Two handlers, each the other's partner.
    static func pair() -> (RelayGlue, RelayGlue) {
        let a = RelayGlue()
        let b = RelayGlue()
        a.partner = b
        b.partner = a
        return (a, b)
    }

    // MARK: called by the partner (same event loop)

    private func partnerWrite(_ data: NIOAny) {
        context?.write(data, promise: nil)
    }

    private func partnerFlush() {
        context?.flush()
    }

    /// The partner read EOF: finish our writes, then shut our output.
    private func partnerEnded() {
        afterPendingWrites { $0.close(mode: .output, promise: nil) }
    }

    /// The partner's channel closed.
    private func partnerClosed(failed: Bool) {
        if failed {
            context?.close(promise: nil)
        } else {
            afterPendingWrites { $0.close(promise: nil) }
        }
    }

    private func partnerBecameWritable() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    private var isWritable: Bool { context?.channel.isWritable ?? false }

    /// Runs `body` with our channel once every write queued so far has completed (an empty
    /// write completes after them, in order).
    private func afterPendingWrites(_ body: @escaping @Sendable (any Channel) -> Void) {
        guard let context else { return }
        let channel = context.channel
        context.writeAndFlush(NIOAny(channel.allocator.buffer(capacity: 0))).whenComplete { _ in body(channel) }
    }

    // MARK: ChannelDuplexHandler

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        partner?.partnerWrite(data)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        partner?.partnerFlush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        partner?.partnerClosed(failed: failed)
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, case .inputClosed = e {
            partner?.partnerEnded()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failed = true
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            partner?.partnerBecameWritable()
        }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if partner?.isWritable ?? false {
            context.read()
        } else {
            pendingRead = true
        }
    }
}
