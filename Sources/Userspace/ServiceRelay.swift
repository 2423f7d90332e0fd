// Sluice: a per-node Kubernetes service proxy.
// The state one service port's listeners share across event loops: its load balancer, and
// the book of established relays by endpoint, so that an endpoint that goes away has its
// relays closed while every other relay stays.

import Glibc
import Logging
import NIOCore
import SluiceCore
import Synchronization

/// Tuning of the relays.
public struct RelayConfig: Sendable {
    /// The address relay listeners bind (0.0.0.0: REDIRECT sends to the incoming interface's
    /// primary address, DNAT to the node IP; both must reach the listener).
    public var listenAddress: String
    /// A UDP flow with no datagram either way for this long is closed (`--udp-timeout`).
    public var udpIdleTimeout: Duration
    /// Connect timeout of each attempt at a backend, in order; the last one repeats.
    /// Legacy kube-proxy's `endpointDialTimeout`.
    public var connectTimeouts: [Duration]
    /// At most this many backends are tried for one TCP connection (fewer when the service
    /// port has fewer endpoints).
    public var maxConnectAttempts: Int
    /// Listen backlog of relay and NodePort listeners.
    public var backlog: Int
    /// Monotonic time for affinity (tests inject their own).
    public var now: @Sendable () -> Duration
    /// At most this many listeners (relay ports and NodePort holds) are open at once; a service
    /// port past it gets no listener and a logged failure instead of taking the descriptors
    /// every other part of the proxy needs. nil: the soft open-file limit less
    /// `descriptorReserve` (a quarter of it when the limit is under 4 096), read when the relay
    /// manager is created.
    public var maxListeners: Int?

    /// Descriptors kept free of listeners by default: relayed connections, the iptables tools'
    /// temporary files, the manifest source, the metrics and health servers.
    public static let descriptorReserve = 1024

    /// Creates a configuration.
    public init(listenAddress: String = "0.0.0.0", udpIdleTimeout: Duration = .milliseconds(250),
                connectTimeouts: [Duration] = [.milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2)],
                maxConnectAttempts: Int = 4, backlog: Int = 1024, maxListeners: Int? = nil,
                now: @escaping @Sendable () -> Duration = RelayConfig.monotonicNow) {
        self.listenAddress = listenAddress
        self.udpIdleTimeout = udpIdleTimeout
        self.connectTimeouts = connectTimeouts.isEmpty ? [.seconds(1)] : connectTimeouts
        self.maxConnectAttempts = max(1, maxConnectAttempts)
        self.backlog = backlog
        self.maxListeners = maxListeners
        self.now = now
    }

    /// `maxListeners`, or the default from the process's soft open-file limit.
    var listenerBudget: Int {
        if let maxListeners { return max(0, maxListeners) }
        var limit = rlimit()
        guard getrlimit(RLIMIT_NOFILE_RESOURCE, &limit) == 0, limit.rlim_cur != rlim_t.max else { return Int.max }
        return RelayConfig.listeners(underOpenFileLimit: Int(clamping: limit.rlim_cur))
    }

    /// How many listeners an open-file limit of `limit` leaves room for: the limit less
    /// `descriptorReserve`, or less a quarter of it when the limit is under 4 096.
    public static func listeners(underOpenFileLimit limit: Int) -> Int {
        limit - min(descriptorReserve, limit / 4)
    }

    private static let origin = ContinuousClock.now

    /// Time since the process's first use of this clock.
    public static let monotonicNow: @Sendable () -> Duration = { RelayConfig.origin.duration(to: .now) }

    /// The timeout of attempt `n` (0-based).
    func connectTimeout(attempt n: Int) -> TimeAmount {
        connectTimeouts[min(n, connectTimeouts.count - 1)].timeAmount
    }
}

extension Duration {
    /// The same span as a NIO `TimeAmount`.
    var timeAmount: TimeAmount {
        .nanoseconds(Int64(components.seconds) * 1_000_000_000 + components.attoseconds / 1_000_000_000)
    }
}

/// One established relay's handle in the book.
struct RelayTicket: Sendable, Hashable {
    let id: Int
}

/// Established relays by endpoint, and which endpoints they may stay on.
struct RelayBook: Sendable {
    struct Entry: Sendable {
        var endpoint: String
        var channels: [any Channel]
    }

    var keep: Set<String>
    var closed = false
    var nextID = 0
    var entries: [Int: Entry] = [:]
}

/// Shared by one service port's listeners (relay port and NodePort) on every event loop.
final class ServiceRelayState: Sendable {
    let name: ServicePortName
    let config: RelayConfig
    let logger: Logger
    private let balancer: Mutex<LoadBalancer>
    private let book: Mutex<RelayBook>

    init(spec: RelaySpec, config: RelayConfig, logger: Logger) {
        name = spec.name
        self.config = config
        self.logger = logger
        balancer = Mutex(LoadBalancer(endpoints: spec.endpoints, affinityTimeout: spec.affinityTimeout))
        book = Mutex(RelayBook(keep: spec.keep))
    }

    /// How many backends one connection may try.
    var connectAttempts: Int {
        min(config.maxConnectAttempts, max(1, balancer.withLock { $0.endpoints.count }))
    }

    /// The endpoint for a new connection from `client`.
    func pick(client: IPAddress?, resetAffinity: Bool) -> EndpointInfo? {
        let now = config.now()
        return balancer.withLock { $0.next(client: client, now: now, resetAffinity: resetAffinity) }
    }

    /// Records an established relay; nil when its endpoint is no longer kept (it went away
    /// while the connection was being made), in which case the caller closes the channels.
    func register(endpoint: String, channels: [any Channel]) -> RelayTicket? {
        book.withLock { b in
            guard !b.closed, b.keep.contains(endpoint) else { return nil }
            b.nextID += 1
            b.entries[b.nextID] = RelayBook.Entry(endpoint: endpoint, channels: channels)
            return RelayTicket(id: b.nextID)
        }
    }

    /// Forgets a relay that ended.
    func unregister(_ ticket: RelayTicket) {
        _ = book.withLock { $0.entries.removeValue(forKey: ticket.id) }
    }

    /// Established relays, by endpoint `ip:port`.
    var relayCounts: [String: Int] {
        book.withLock { b in b.entries.values.reduce(into: [:]) { $0[$1.endpoint, default: 0] += 1 } }
    }

    /// Applies a new spec; returns the channels of relays whose endpoint is no longer kept,
    /// for the caller to close.
    func update(_ spec: RelaySpec) -> [any Channel] {
        let now = config.now()
        balancer.withLock { lb in
            lb.update(endpoints: spec.endpoints, affinityTimeout: spec.affinityTimeout)
            lb.removeExpired(now: now)
        }
        return book.withLock { b in
            b.keep = spec.keep
            let gone = b.entries.filter { !spec.keep.contains($0.value.endpoint) }
            for id in gone.keys { b.entries[id] = nil }
            return gone.values.flatMap(\.channels)
        }
    }

    /// Marks the service port gone; returns every relay's channels for the caller to close.
    func closeAll() -> [any Channel] {
        book.withLock { b in
            b.closed = true
            let all = b.entries.values.flatMap(\.channels)
            b.entries = [:]
            return all
        }
    }
}
