// Sluice: a per-node Kubernetes service proxy.
// The relay listeners of every service port: one per service port on an ephemeral port
// (the relay port the portal rules point at), plus the service port's NodePort, bound so that
// no other process can take it while the Service exists. Both serve the same relay.

import Logging
import NIOCore
import NIOPosix
import SluiceCore
import Synchronization

/// Opens, keeps and closes relay listeners and NodePort holds.
///
/// Reconciling is two-phase so that traffic is never sent to a closed port: `prepare` opens
/// what is new and updates what stays (before the portal rules change), `retire` closes what
/// is gone (after the rules no longer point at it).
public actor RelayManager {
    struct Relay {
        let state: ServiceRelayState
        let listener: any Channel
        let port: Int
        var nodePort = 0
        var nodePortChannel: (any Channel)?
    }

    /// What `prepare` did.
    public struct Prepared: Sendable {
        /// The relay port of every service port that has a listener.
        public var ports: [ServicePortName: Int] = [:]
        /// Service ports whose relay listener could not be opened, with the reason; they get no
        /// portal rules this time and are retried on the next sync.
        public var listenerFailures: [ServicePortName: String] = [:]
        /// Service ports whose NodePort could not be held (another process has it), with the
        /// reason; the portal rules still redirect the NodePort, and holding is retried.
        public var nodePortFailures: [ServicePortName: String] = [:]
        /// Established relays closed because their endpoint went away.
        public var closedRelays = 0
    }

    /// The relays' tuning.
    public let config: RelayConfig
    private let group: any EventLoopGroup
    private let logger: Logger
    private var relays: [ServicePortName: Relay] = [:]
    /// Listeners open now (relay ports and NodePort holds), and the most allowed at once.
    private var openListeners = 0
    private let listenerBudget: Int
    /// The relay ports, readable without awaiting the actor.
    private let portTable = Mutex<[ServicePortName: Int]>([:])

    /// Creates a manager.
    /// - Parameters:
    ///   - config: listen address, timeouts, clock.
    ///   - group: the event loops relays run on.
    public init(config: RelayConfig = RelayConfig(), group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                logger: Logger) {
        self.config = config
        self.group = group
        self.logger = logger
        self.listenerBudget = config.listenerBudget
    }

    /// Opens listeners for new service ports, applies new endpoints and affinity to existing
    /// ones (closing relays to endpoints that left, keeping every other), and holds NodePorts.
    public func prepare(_ specs: [ServicePortName: RelaySpec]) async -> Prepared {
        var out = Prepared()
        for name in specs.keys.sorted() {
            guard let spec = specs[name] else { continue }
            var relay: Relay
            if let existing = relays[name] {
                relay = existing
                let doomed = relay.state.update(spec)
                out.closedRelays += doomed.count / (spec.proto == .tcp ? 2 : 1)
                for c in doomed { c.close(promise: nil) }
            } else {
                let state = ServiceRelayState(spec: spec, config: config, logger: logger)
                do {
                    let listener = try await listen(spec.proto, port: 0, state: state, reuseAddress: false)
                    guard let port = listener.localAddress?.port else {
                        await close(listener)
                        out.listenerFailures[name] = "the listener has no local port"
                        continue
                    }
                    relay = Relay(state: state, listener: listener, port: port)
                    logger.info("\(name.service):\(name.port) (\(spec.proto.lowercased)): relaying on port \(port)")
                } catch {
                    out.listenerFailures[name] = "cannot open a \(spec.proto.lowercased) relay listener on \(config.listenAddress): \(error)"
                    continue
                }
            }
            if relay.nodePort != spec.nodePort, let old = relay.nodePortChannel {
                await close(old)
                logger.info("\(name.service):\(name.port): released NodePort \(relay.nodePort)/\(spec.proto.lowercased)")
                relay.nodePortChannel = nil
            }
            relay.nodePort = spec.nodePort
            if spec.nodePort != 0 && relay.nodePortChannel == nil {
                do {
                    relay.nodePortChannel = try await listen(spec.proto, port: spec.nodePort, state: relay.state, reuseAddress: true)
                    logger.info("\(name.service):\(name.port): holding NodePort \(spec.nodePort)/\(spec.proto.lowercased)")
                } catch {
                    out.nodePortFailures[name] = "cannot hold NodePort \(spec.nodePort)/\(spec.proto.lowercased): \(error)"
                }
            }
            relays[name] = relay
            out.ports[name] = relay.port
        }
        // Only the names prepared can have changed (retire removes the others' entries).
        let ports = out.ports
        portTable.withLock { table in
            for (name, port) in ports { table[name] = port }
        }
        return out
    }

    /// Closes the listener, NodePort and every relay of each of `names` that has them (a
    /// partial sync's retire: it costs the names given).
    public func retire(_ names: some Sequence<ServicePortName>) async {
        for name in names {
            guard let relay = relays.removeValue(forKey: name) else { continue }
            await close(name, relay)
        }
    }

    /// Closes the listener, NodePort and every relay of each service port not in `names`.
    public func retire(keeping names: Set<ServicePortName>) async {
        for name in relays.keys.sorted() where !names.contains(name) {
            guard let relay = relays.removeValue(forKey: name) else { continue }
            await close(name, relay)
        }
    }

    private func close(_ name: ServicePortName, _ relay: Relay) async {
        _ = portTable.withLock { $0.removeValue(forKey: name) }
        for c in relay.state.closeAll() { c.close(promise: nil) }
        await close(relay.listener)
        if let np = relay.nodePortChannel {
            await close(np)
            logger.info("\(name.service):\(name.port): released NodePort \(relay.nodePort)")
        }
        logger.info("\(name.service):\(name.port): closed relay port \(relay.port)")
    }

    /// Closes everything.
    public func closeAll() async {
        await retire(keeping: [])
    }

    /// The relay port of a service port.
    public func relayPort(_ name: ServicePortName) -> Int? { relays[name]?.port }

    /// The relay port of a service port, from any thread without awaiting the actor (for
    /// synchronous callers such as the conntrack reconciler, which must not delete the
    /// client -> relay flows of current service ports). nil when the service port has none.
    public nonisolated func currentRelayPort(_ name: ServicePortName) -> Int? {
        portTable.withLock { $0[name] }
    }

    /// The NodePort held for a service port, nil when none is held.
    public func heldNodePort(_ name: ServicePortName) -> Int? {
        guard let r = relays[name], r.nodePortChannel != nil else { return nil }
        return r.nodePort
    }

    /// Established relays of a service port, by endpoint `ip:port`.
    public func relayCounts(_ name: ServicePortName) -> [String: Int] {
        relays[name]?.state.relayCounts ?? [:]
    }

    /// Service ports with a listener.
    public var serviceCount: Int { relays.count }

    /// NodePorts currently held.
    public var heldNodePortCount: Int { relays.values.filter { $0.nodePortChannel != nil }.count }

    /// Opens a listener, unless `listenerBudget` listeners are open already.
    private func listen(_ proto: TransportProtocol, port: Int, state: ServiceRelayState, reuseAddress: Bool) async throws -> any Channel {
        guard openListeners < listenerBudget else { throw ListenerBudgetExhausted(budget: listenerBudget) }
        let channel: any Channel
        switch proto {
        case .udp:
            channel = try await UDPRelay.listen(host: config.listenAddress, port: port, service: state, group: group)
        default:
            channel = try await TCPRelay.listen(host: config.listenAddress, port: port, service: state, group: group,
                                                reuseAddress: reuseAddress)
        }
        openListeners += 1
        return channel
    }

    private func close(_ listener: any Channel) async {
        try? await listener.close()
        openListeners -= 1
    }
}

/// A listener was not opened: `budget` listeners are open already (`RelayConfig.maxListeners`,
/// by default the open-file limit less a reserve).
public struct ListenerBudgetExhausted: Error, CustomStringConvertible {
    /// The most listeners allowed at once.
    public var budget: Int
    public var description: String {
        "\(budget) listeners are open already, the most allowed (by default the open-file limit less up to \(RelayConfig.descriptorReserve) descriptors kept for connections and tools)"
    }
}
