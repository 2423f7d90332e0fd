// Sluice: a per-node Kubernetes service proxy.
// Backend choice for the userspace relays: round robin over the service port's endpoints,
// with sessionAffinity ClientIP (legacy kube-proxy's LoadBalancerRR). A value type driven
// by an explicit time, so tests control the clock.

import SluiceCore

/// Round robin over one service port's endpoints, with optional ClientIP affinity.
///
/// Affinity is sliding, as in legacy kube-proxy and `-m recent --rcheck --seconds`: a
/// client keeps its endpoint while it comes back within the timeout of its last choice.
/// Times are `Duration`s since any fixed origin (the relays use a monotonic clock).
public struct LoadBalancer: Sendable {
    /// One client's pinned endpoint.
    struct Affinity: Sendable {
        var endpoint: EndpointInfo
        var lastUsed: Duration
    }

    /// The endpoints new connections go to, in round-robin order.
    public private(set) var endpoints: [EndpointInfo]
    /// How long a client stays pinned after its last connection; nil when affinity is off.
    public private(set) var affinityTimeout: Duration?
    /// The next round-robin position.
    private var index = 0
    private var affinity: [IPAddress: Affinity] = [:]

    /// Creates a balancer.
    /// - Parameters:
    ///   - endpoints: the endpoints, in the order round robin visits them.
    ///   - affinityTimeout: ClientIP affinity timeout; nil for none.
    public init(endpoints: [EndpointInfo] = [], affinityTimeout: Duration? = nil) {
        self.endpoints = endpoints
        self.affinityTimeout = affinityTimeout
    }

    /// Clients currently pinned (expired entries included until `removeExpired`).
    public var pinnedClients: Int { affinity.count }

    /// Replaces the endpoint list. Unchanged lists keep the round-robin position; otherwise the
    /// position is kept modulo the new count. Clients pinned to an endpoint that left lose
    /// their pin; turning affinity off forgets every pin.
    public mutating func update(endpoints newEndpoints: [EndpointInfo], affinityTimeout newTimeout: Duration?) {
        if newTimeout == nil { affinity = [:] }
        affinityTimeout = newTimeout
        guard newEndpoints != endpoints else { return }
        let keys = Set(newEndpoints.map(\.description))
        affinity = affinity.filter { keys.contains($0.value.endpoint.description) }
        endpoints = newEndpoints
        index = endpoints.isEmpty ? 0 : index % endpoints.count
    }

    /// The endpoint for a new connection from `client`.
    /// - Parameters:
    ///   - client: the client's address (affinity key); nil when unknown.
    ///   - now: the current time.
    ///   - resetAffinity: ignore the client's pin and take the next endpoint in turn (a retry
    ///     after the pinned endpoint failed); the pin moves to the new choice.
    /// - Returns: nil when there are no endpoints.
    public mutating func next(client: IPAddress?, now: Duration, resetAffinity: Bool = false) -> EndpointInfo? {
        guard !endpoints.isEmpty else { return nil }
        let sticky = affinityTimeout != nil && client != nil
        if sticky, !resetAffinity, let client, let timeout = affinityTimeout, var pin = affinity[client] {
            if now - pin.lastUsed < timeout {
                pin.lastUsed = now
                affinity[client] = pin
                return pin.endpoint
            }
        }
        let chosen = endpoints[index]
        index = (index + 1) % endpoints.count
        if sticky, let client {
            affinity[client] = Affinity(endpoint: chosen, lastUsed: now)
        }
        return chosen
    }

    /// Forgets pins not used within the timeout (bounded memory for many clients).
    public mutating func removeExpired(now: Duration) {
        guard let timeout = affinityTimeout else {
            affinity = [:]
            return
        }
        affinity = affinity.filter { now - $0.value.lastUsed < timeout }
    }
}
