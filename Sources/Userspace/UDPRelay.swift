// Sluice: a per-node Kubernetes service proxy.
// The UDP relay: a flow per client address (IP and port), each a connected socket to one
// backend, closed after an idle time with no datagram either way (legacy kube-proxy's
// `--udp-timeout`, 250 ms). A backend's replies go back to the client from the socket the
// client's datagrams arrived on, so conntrack turns them back into the Service address.

import Logging
import NIOCore
import NIOPosix
import SluiceCore

/// Listens for one service port's datagrams (on its relay port or its NodePort).
enum UDPRelay {
    /// The largest datagram relayed (the UDP maximum over IPv4).
    static let maxDatagram = 65_536

    /// Binds a listener whose clients are relayed for `service`. No SO_REUSEADDR: on a UDP
    /// socket it would let another process bind the same port.
    static func listen(host: String, port: Int, service: ServiceRelayState, group: any EventLoopGroup) async throws -> any Channel {
        try await DatagramBootstrap(group: group)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: maxDatagram))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(UDPListenHandler(service: service))
                }
            }
            .bind(to: SocketAddress(ipAddress: host, port: port))
            .get()
    }
}

/// Owns the flow table of one UDP listener (on its event loop).
final class UDPListenHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    private let service: ServiceRelayState
    private var flows: [SocketAddress: UDPFlow] = [:]

    init(service: ServiceRelayState) {
        self.service = service
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        if let flow = flows[envelope.remoteAddress], flow.isOpen {
            flow.send(envelope.data)
            return
        }
        // No flow, or one closing (idle timeout, endpoint gone) whose socket no longer
        // sends: a new flow takes the client over.
        let client = envelope.remoteAddress.ipAddress.flatMap(IPAddress.init)
        guard let endpoint = service.pick(client: client, resetAffinity: false) else {
            service.logger.trace("\(service.name): no endpoints; datagram from \(envelope.remoteAddress) dropped")
            return
        }
        let flow = UDPFlow(client: envelope.remoteAddress, endpoint: endpoint, listener: context.channel, owner: self,
                           service: service)
        flows[envelope.remoteAddress] = flow
        flow.start(first: envelope.data)
    }

    func channelInactive(context: ChannelHandlerContext) {
        let all = flows.values
        flows = [:]
        for f in all { f.close() }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // E.g. an ICMP error for a reply to a client that went away: not fatal to the listener.
        service.logger.trace("\(service.name): UDP listener: \(error)")
    }

    /// A flow ended (idle, endpoint gone, error): forget it.
    fileprivate func flowEnded(_ flow: UDPFlow) {
        if flows[flow.client] === flow { flows[flow.client] = nil }
    }
}

/// One client's conversation with one backend. Lives on the listener's event loop.
final class UDPFlow {
    /// Datagrams queued while the backend socket is being set up, at most this many.
    static let maxPending = 64

    let client: SocketAddress
    private let endpoint: EndpointInfo
    private let listener: any Channel
    private weak var owner: UDPListenHandler?
    private let service: ServiceRelayState
    private let idle: TimeAmount
    private var channel: (any Channel)?
    private var pending: [ByteBuffer] = []
    private var lastActivity = NIODeadline.now()
    private var ticket: RelayTicket?
    private var closing = false
    private var ended = false

    /// False once the flow has started closing: datagrams must go to a new flow.
    var isOpen: Bool { !closing && !ended && (channel?.isActive ?? true) }

    init(client: SocketAddress, endpoint: EndpointInfo, listener: any Channel, owner: UDPListenHandler, service: ServiceRelayState) {
        self.client = client
        self.endpoint = endpoint
        self.listener = listener
        self.owner = owner
        self.service = service
        idle = service.config.udpIdleTimeout.timeAmount
    }

    /// Opens the backend socket and sends `first`.
    func start(first: ByteBuffer) {
        pending.append(first)
        let address: SocketAddress
        do {
            address = try SocketAddress(ipAddress: endpoint.ip.description, port: endpoint.port)
        } catch {
            service.logger.error("\(service.name): bad endpoint address \(endpoint): \(error)")
            end()
            return
        }
        DatagramBootstrap(group: listener.eventLoop)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: UDPRelay.maxDatagram))
            .connect(to: address)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    self.attach(channel)
                case .failure(let error):
                    self.service.logger.debug("\(self.service.name): UDP socket to \(self.endpoint) failed: \(error)")
                    self.end()
                }
            }
    }

    private func attach(_ channel: any Channel) {
        guard !ended, let ticket = service.register(endpoint: endpoint.description, channels: [channel]) else {
            channel.close(promise: nil)
            end()
            return
        }
        self.ticket = ticket
        self.channel = channel
        do {
            try channel.pipeline.syncOperations.addHandler(UDPFlowHandler(flow: self))
        } catch {
            channel.close(promise: nil)
            end()
            return
        }
        channel.closeFuture.assumeIsolated().whenComplete { _ in self.end() }
        for datagram in pending { channel.write(datagram, promise: nil) }
        pending = []
        channel.flush()
        armTimer()
    }

    /// A datagram from the client.
    func send(_ datagram: ByteBuffer) {
        lastActivity = .now()
        if let channel {
            channel.writeAndFlush(datagram, promise: nil)
        } else if pending.count < UDPFlow.maxPending {
            pending.append(datagram)
        }
    }

    /// A datagram from the backend: back to the client, from the listener's socket.
    fileprivate func reply(_ datagram: ByteBuffer) {
        lastActivity = .now()
        listener.writeAndFlush(AddressedEnvelope(remoteAddress: client, data: datagram), promise: nil)
    }

    private func armTimer() {
        listener.eventLoop.assumeIsolated().scheduleTask(deadline: lastActivity + idle) {
            guard !self.ended else { return }
            if NIODeadline.now() >= self.lastActivity + self.idle {
                self.close()
            } else {
                self.armTimer()
            }
        }
    }

    /// Closes the backend socket (the flow ends when it has closed).
    func close() {
        closing = true
        if let channel {
            channel.close(promise: nil)
        } else {
            end()
        }
    }

    private func end() {
        guard !ended else { return }
        ended = true
        if let ticket { service.unregister(ticket) }
        owner?.flowEnded(self)
        channel?.close(promise: nil)
    }
}

/// Reads a flow's backend socket.
final class UDPFlowHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    private let flow: UDPFlow

    init(flow: UDPFlow) {
        self.flow = flow
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        flow.reply(unwrapInboundIn(data).data)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ECONNREFUSED from an ICMP port unreachable: the backend is not listening.
        context.close(promise: nil)
    }
}
