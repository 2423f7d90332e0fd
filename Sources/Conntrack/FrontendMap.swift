// Sluice: a per-node Kubernetes service proxy.
// Which conntrack flows are stale: the Service frontends of one IP family, the reply
// sources that are current for each, and the pure decision for one flow. Ported in spirit
// from kube-proxy's pkg/proxy/conntrack/cleanup.go (v1.32+), with its known gaps closed:
// services with no endpoints are checked too (#139628), flows that were never translated
// are caught, and only frontends whose endpoints changed are looked at (#122740, #129982).

import SluiceCore

/// A Service address clients send to, for one protocol.
public struct Frontend: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The protocol.
    public var l4: L4Protocol
    /// The address (ClusterIP, external IP, load-balancer IP); nil for a NodePort, which
    /// answers on every node address NodePorts are open on.
    public var ip: IPAddress?
    /// The service port, or the node port.
    public var port: UInt16

    /// Creates a frontend.
    public init(_ l4: L4Protocol, _ ip: IPAddress?, _ port: UInt16) {
        self.l4 = l4
        self.ip = ip
        self.port = port
    }

    /// `udp 10.96.0.10:53`, or `udp nodePort 30053`.
    public var description: String {
        if let ip { return "\(l4) \(ip.joined(port: Int(port)))" }
        return "\(l4) nodePort \(port)"
    }

    public static func < (a: Frontend, b: Frontend) -> Bool {
        if a.l4 != b.l4 { return a.l4.rawValue < b.l4.rawValue }
        switch (a.ip, b.ip) {
        case (nil, nil): return a.port < b.port
        case (nil, _): return false
        case (_, nil): return true
        case (let x?, let y?): return x != y ? x < y : a.port < b.port
        }
    }
}

/// The reply sources that make a frontend's flow current.
public struct ServingSet: Sendable, Hashable {
    /// Serving endpoints (`ip:port`): a flow translated to one of them is current.
    public var endpoints: Set<IPPort>
    /// userspace mode: flows are redirected to this relay port on the node; a flow whose
    /// reply comes from it (on a local address) is current.
    public var relayPort: UInt16?

    /// Creates a set.
    public init(endpoints: Set<IPPort> = [], relayPort: UInt16? = nil) {
        self.endpoints = endpoints
        self.relayPort = relayPort
    }

    /// No endpoint and no relay: nothing serves the frontend.
    public var isEmpty: Bool { endpoints.isEmpty && relayPort == nil }

    /// The union of two sets (two Services sharing an external IP and port).
    func union(_ other: ServingSet) -> ServingSet {
        ServingSet(endpoints: endpoints.union(other.endpoints), relayPort: relayPort ?? other.relayPort)
    }
}

/// The frontends of one IP family with their serving sets, and the decision for one flow.
public struct FrontendMap: Sendable, Hashable {
    /// The family every address here belongs to.
    public var family: IPFamily
    /// Each frontend and what serves it.
    public var frontends: [Frontend: ServingSet]
    /// The node addresses a NodePort flow may be sent to (a flow to another address with the
    /// node port's number is not a NodePort flow).
    public var nodePortAddresses: Set<IPAddress>
    /// The node's addresses (a relay answers from one of them).
    public var localAddresses: Set<IPAddress>

    /// Creates a map.
    public init(family: IPFamily, frontends: [Frontend: ServingSet] = [:], nodePortAddresses: Set<IPAddress> = [],
                localAddresses: Set<IPAddress> = []) {
        self.family = family
        self.frontends = frontends
        self.nodePortAddresses = nodePortAddresses
        self.localAddresses = localAddresses
    }

    /// Whether some flow could be judged stale (there is a frontend to check).
    public var isEmpty: Bool { frontends.isEmpty }

    /// The serving endpoints of a service port: every endpoint that is ready or serving.
    ///
    /// This is a superset of what the rules send new flows to (`categorizeEndpoints`'s
    /// `allReachable`): a terminating endpoint that still serves, a ready endpoint that
    /// topology hints or a Local traffic policy leave out of this node's rules, keep the flows
    /// they already have, as a TCP connection would; they lose them once they stop serving or
    /// leave the EndpointSlice. This is kube-proxy's choice too (`cleanup.go`: serving
    /// endpoints, policy and topology ignored).
    public static func servingEndpoints(_ endpoints: [EndpointInfo], family: IPFamily) -> Set<IPPort> {
        var out: Set<IPPort> = []
        for ep in endpoints where (ep.ready || ep.serving) && ep.ip.family == family && (0...65535).contains(ep.port) {
            out.insert(IPPort(ep.ip, UInt16(ep.port)))
        }
        return out
    }

    /// Builds the map of `state`'s service ports of the given protocols: ClusterIP, external
    /// IPs and load-balancer IPs at the service port, and the node port.
    /// - Parameters:
    ///   - nodePortAddresses: the node addresses NodePorts answer on (see `nodePortAddresses(_:local:family:localhost:)`).
    ///   - localAddresses: the node's addresses.
    ///   - relayPort: userspace mode's relay port of a service port (nil elsewhere).
    public static func build(_ state: ProxyState, protocols: Set<L4Protocol> = [.udp, .sctp],
                             nodePortAddresses: Set<IPAddress> = [], localAddresses: Set<IPAddress> = [],
                             relayPort: ((ServicePortName) -> UInt16?)? = nil) -> FrontendMap {
        var map = FrontendMap(family: state.family, nodePortAddresses: nodePortAddresses.filter { $0.family == state.family },
                              localAddresses: localAddresses.filter { $0.family == state.family })
        for (name, info) in state.servicePorts {
            let l4 = L4Protocol(info.proto)
            guard protocols.contains(l4) else { continue }
            let serving = ServingSet(endpoints: servingEndpoints(state.endpoints[name] ?? [], family: state.family),
                                     relayPort: relayPort?(name))
            func add(_ f: Frontend) {
                map.frontends[f] = map.frontends[f].map { $0.union(serving) } ?? serving
            }
            guard (1...65535).contains(info.port) else { continue }
            let port = UInt16(info.port)
            for ip in [info.clusterIP] + info.externalIPs + info.loadBalancerVIPs where ip.family == state.family {
                add(Frontend(l4, ip, port))
            }
            if (1...65535).contains(info.nodePort) {
                add(Frontend(l4, nil, UInt16(info.nodePort)))
            }
        }
        return map
    }

    /// The node addresses NodePorts answer on: the local addresses `--nodeport-addresses`
    /// selects; loopback only for IPv4 with localhost NodePorts on (as the iptables rules do).
    public static func nodePortAddresses(_ selection: NodePortAddresses, local: [IPAddress], family: IPFamily,
                                         localhost: Bool) -> Set<IPAddress> {
        var out: Set<IPAddress> = []
        for ip in local where ip.family == family {
            if ip.isLoopback && !(family == .ipv4 && localhost) { continue }
            switch selection {
            case .all: out.insert(ip)
            case .cidrs(let cidrs): if cidrs.contains(where: { $0.contains(ip) }) { out.insert(ip) }
            }
        }
        return out
    }

    /// The frontends whose flows may have gone stale since `old` was reconciled: those added,
    /// those whose serving set changed, and those removed (with an empty set: every
    /// translated flow to them is stale). A change of the node's addresses puts every
    /// NodePort (and relay) frontend in. With no `old` (the first reconcile after start),
    /// every frontend.
    public func changes(since old: FrontendMap?) -> FrontendMap {
        guard let old, old.family == family else { return self }
        var out = FrontendMap(family: family, nodePortAddresses: nodePortAddresses.union(old.nodePortAddresses),
                              localAddresses: localAddresses.union(old.localAddresses))
        let nodePortsMoved = nodePortAddresses != old.nodePortAddresses
        let localMoved = localAddresses != old.localAddresses
        for (f, serving) in frontends {
            let before = old.frontends[f]
            if before != serving || (nodePortsMoved && f.ip == nil) || (localMoved && serving.relayPort != nil) {
                out.frontends[f] = serving
            }
        }
        for (f, _) in old.frontends where frontends[f] == nil {
            out.frontends[f] = ServingSet()
        }
        return out
    }

    /// The frontend `flow` was sent to, with its serving set; nil when it is not one of ours.
    public func frontend(of flow: ConntrackFlow) -> (Frontend, ServingSet)? {
        guard flow.family == family, let l4 = flow.l4 else { return nil }
        let dst = flow.original.destination
        let exact = Frontend(l4, dst.ip, dst.port)
        if let s = frontends[exact] { return (exact, s) }
        let nodePort = Frontend(l4, nil, dst.port)
        if nodePortAddresses.contains(dst.ip), let s = frontends[nodePort] { return (nodePort, s) }
        return nil
    }

    /// Keep or delete `flow`:
    ///
    /// 1. Not sent to one of these frontends (another address, port or protocol): keep.
    /// 2. The reply comes from a serving endpoint (or the frontend's relay): keep.
    /// 3. The reply comes from the frontend itself, i.e. nothing translated the flow: it was
    ///    created while no rule sent the frontend anywhere. Delete it when something serves the
    ///    frontend now (its next packet is then translated); keep it while nothing does
    ///    (deleting would change nothing for the client, and would repeat on every check).
    /// 4. Otherwise it was translated to an address that no longer serves: delete.
    public func verdict(for flow: ConntrackFlow) -> FlowVerdict {
        guard let (_, serving) = frontend(of: flow) else { return .keep }
        let replySource = flow.reply.source
        if serving.endpoints.contains(replySource) { return .keep }
        if let relay = serving.relayPort, replySource.port == relay,
           localAddresses.contains(replySource.ip) || replySource.ip.isLoopback {
            return .keep
        }
        if replySource == flow.original.destination {
            return serving.isEmpty ? .keep : .delete(.neverTranslated)
        }
        return .delete(.endpointGone)
    }
}
