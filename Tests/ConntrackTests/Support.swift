// Helpers for the conntrack tests: model snapshots built in code, flows in one line, and a
// fake conntrack table that applies the reconciler's decisions to an in-memory list.

import Conntrack
import SluiceCore

func ip(_ text: String) -> IPAddress {
    guard let a = IPAddress(text) else { fatalError("bad address \(text)") }
    return a
}

func hp(_ text: String) -> IPPort {
    let i = text.lastIndex(of: ":")!
    var host = String(text[..<i])
    if host.hasPrefix("[") { host = String(host.dropFirst().dropLast()) }
    return IPPort(ip(host), UInt16(text[text.index(after: i)...])!)
}

/// A UDP flow `client -> frontend` whose reply comes from `replyFrom`.
func flow(_ client: String, _ frontend: String, replyFrom: String, id: UInt32 = 0) -> ConntrackFlow {
    flow(.udp, client, frontend, replyFrom: replyFrom, id: id)
}

/// A flow `client -> frontend` whose reply comes from `replyFrom`.
func flow(_ l4: L4Protocol, _ client: String, _ frontend: String, replyFrom: String, id: UInt32 = 0) -> ConntrackFlow {
    let c = hp(client)
    return ConntrackFlow(l4, original: FlowTuple(source: c, destination: hp(frontend)),
                         reply: FlowTuple(source: hp(replyFrom), destination: c), id: id)
}

/// A service port for a test snapshot.
struct TestPort {
    var service: String
    var proto: TransportProtocol = .udp
    var clusterIP: String
    var port = 53
    var nodePort = 0
    var externalIPs: [String] = []
    var loadBalancerIPs: [String] = []
    /// `ip:port` endpoints, ready.
    var endpoints: [String] = []
    /// `ip:port` endpoints that are terminating but still serving.
    var servingTerminating: [String] = []
    /// `ip:port` endpoints that are neither ready nor serving.
    var notServing: [String] = []

    var name: ServicePortName { ServicePortName(service: NamespacedName(namespace: "ns", name: service), port: "p", proto: proto) }
}

/// A snapshot holding `ports`.
func snapshot(_ ports: [TestPort], family: IPFamily = .ipv4) -> ProxyState {
    var state = ProxyState(family: family)
    for p in ports {
        state.servicePorts[p.name] = ServicePortInfo(
            name: p.name, clusterIP: ip(p.clusterIP), port: p.port, proto: p.proto, nodePort: p.nodePort,
            loadBalancerVIPs: p.loadBalancerIPs.map(ip), externalIPs: p.externalIPs.map(ip))
        func ep(_ t: String, ready: Bool, serving: Bool, terminating: Bool) -> EndpointInfo {
            let a = hp(t)
            return EndpointInfo(ip: a.ip, port: Int(a.port), ready: ready, serving: serving, terminating: terminating)
        }
        state.endpoints[p.name] = (p.endpoints.map { ep($0, ready: true, serving: true, terminating: false) }
            + p.servingTerminating.map { ep($0, ready: false, serving: true, terminating: true) }
            + p.notServing.map { ep($0, ready: false, serving: false, terminating: true) }).sorted()
    }
    return state
}

/// An in-memory conntrack table: sweeps apply the filter as a kernel would (or ignore it,
/// like a kernel before 5.8) and delete what the decision condemns.
actor FakeTable: FlowSweeping {
    var flows: [ConntrackFlow]
    /// Every filter swept, in order.
    private(set) var sweeps: [DumpFilter] = []
    /// Behave like a kernel without CTA_FILTER.
    let ignoresFilters: Bool
    /// Fail the next sweeps' deletes with this errno.
    var failDeletes: Int32?
    private(set) var kernelAppliesFilters: Bool?

    init(_ flows: [ConntrackFlow] = [], ignoresFilters: Bool = false) {
        self.flows = flows
        self.ignoresFilters = ignoresFilters
    }

    func add(_ f: [ConntrackFlow]) { flows += f }
    func setFailDeletes(_ e: Int32?) { failDeletes = e }

    func sweep(_ filter: DumpFilter, deciding decide: @Sendable (ConntrackFlow) -> FlowVerdict) -> SweepResult {
        sweeps.append(filter)
        var result = SweepResult()
        var kept: [ConntrackFlow] = []
        for f in flows {
            guard f.family == filter.family else {
                kept.append(f)
                continue
            }
            let kernelMatch = ignoresFilters || filter.kernelSide.matches(f)
            guard kernelMatch else {
                kept.append(f)
                continue
            }
            result.received += 1
            if !filter.kernelSide.matches(f) { result.kernelFiltered = false }
            guard filter.matches(f) else {
                kept.append(f)
                continue
            }
            result.judged += 1
            if case .delete(let reason) = decide(f) {
                if let e = failDeletes {
                    result.deleteErrors += 1
                    result.errors.append(ConntrackError(.delete, errno: e, context: f.description))
                    kept.append(f)
                } else {
                    result.deleted[reason, default: 0] += 1
                }
            } else {
                kept.append(f)
            }
        }
        flows = kept
        if !result.kernelFiltered {
            kernelAppliesFilters = false
        } else if kernelAppliesFilters == nil && result.received > 0 && filter.kernelSide != DumpFilter(family: filter.family) {
            kernelAppliesFilters = true
        }
        return result
    }
}
