// The check every mode's packet tracer passes over a compiled rule set: for every address of
// every Service port, the tracer's walk must reach exactly the endpoints the model (an
// independent implementation, `explainModel`) selects, each with 1/n, and masquerade exactly
// when the model says so.

import Foundation
import SluiceCore

/// A packet to `destination` ("IP:port[/proto]") from `source` (nil: from the node itself,
/// at `nodeIP`); `fromNode` when the source is one of `localAddresses`.
public func probePacket(from source: String?, to destination: String, nodeIP: IPAddress,
                        localAddresses: Set<IPAddress>) throws -> ProbePacket {
    let (ip, port, proto) = try ProbePacket.parseDestination(destination)
    var src = nodeIP
    if let source {
        guard let address = IPAddress(source) else { throw TestBedError("bad source address \(source)") }
        src = address
    }
    return ProbePacket(source: src, fromNode: source == nil || localAddresses.contains(src), destination: ip, port: port, proto: proto)
}

/// What ``TracerModelAgreement/check(_:state:node:localAddresses:nodeIP:requireNoNotes:)``
/// found: how many packets it compared, the verdicts the tracer gave, and every disagreement.
public struct TracerModelAgreement: Sendable {
    /// Packets whose trace was compared endpoint by endpoint.
    public var checked = 0
    /// The verdicts the tracer's paths ended in.
    public var verdicts: Set<TraceVerdict> = []
    /// One line per disagreement (empty when the tracer and the model agree).
    public var problems: [String] = []

    /// Traces every ClusterIP, external IP, load-balancer IP and NodePort (on `nodeIP`) of
    /// `state` from a pod (10.0.0.5), from outside (203.0.113.9, 198.51.100.7: inside and
    /// outside the golden fixture's source range) and from the node, and compares each trace
    /// with the model. `requireNoNotes`: a trace note (something the tracer did not understand)
    /// counts as a disagreement.
    public static func check(_ tracer: some PacketTracer, state: ProxyState, node: NodeConfig, localAddresses: Set<IPAddress>,
                             nodeIP: IPAddress, requireNoNotes: Bool = false) throws -> TracerModelAgreement {
        var out = TracerModelAgreement()
        for name in state.sortedNames {
            guard let svc = state.servicePorts[name] else { continue }
            var dsts = ["\(svc.clusterIP):\(svc.port)"] + svc.externalIPs.map { "\($0):\(svc.port)" }
                + svc.loadBalancerVIPs.map { "\($0):\(svc.port)" }
            if svc.nodePort != 0 { dsts.append("\(nodeIP):\(svc.nodePort)") }
            for dst in dsts {
                for src in ["10.0.0.5", "203.0.113.9", "198.51.100.7", nil] {
                    let p = try probePacket(from: src, to: dst, nodeIP: nodeIP, localAddresses: localAddresses)
                    out.compare(p, what: "\(src ?? "node") -> \(dst) (\(name))", expected: name.description, tracer: tracer,
                                state: state, node: node, localAddresses: localAddresses, requireNoNotes: requireNoNotes)
                }
            }
        }
        return out
    }

    private mutating func compare(_ p: ProbePacket, what: String, expected: String, tracer: some PacketTracer, state: ProxyState,
                                  node: NodeConfig, localAddresses: Set<IPAddress>, requireNoNotes: Bool) {
        let model = explainModel(p, state: state, node: node, localAddresses: localAddresses)
        let trace = tracer.trace(p)
        func fail(_ text: String) { problems.append("\(what): \(text)") }
        if requireNoNotes && !trace.notes.isEmpty { fail("trace notes \(trace.notes)") }
        if model.hits.first?.servicePort != expected { fail("model hit \(model.hits)") }
        verdicts.formUnion(trace.paths.map(\.verdict))
        let sum = trace.paths.reduce(0) { $0 + $1.probability }
        if abs(sum - 1) >= 1e-9 { fail("path probabilities sum to \(sum)") }
        if let action = model.noEndpointsAction {
            let want: TraceVerdict = action.hasPrefix("REJECT") ? .rejected : .dropped
            if !trace.paths.allSatisfy({ $0.verdict == want }) { fail("model says \(action), trace \(trace.paths.map(\.verdict))") }
            return
        }
        if model.sourceRange?.hasPrefix("denied") == true {
            if !trace.paths.allSatisfy({ $0.verdict == .dropped }) { fail("denied by source range, trace \(trace.paths.map(\.verdict))") }
            return
        }
        let selected = Set(model.endpoints.filter(\.selected).map(\.address))
        let probs = trace.endpointProbabilities
        if Set(probs.keys) != selected { fail("trace reaches \(probs), model selects \(selected)") }
        for (_, pr) in probs where abs(pr - 1 / Double(selected.count)) >= 1e-6 { fail("unequal shares \(probs)") }
        for path in trace.paths {
            if path.verdict != .forwarded { fail("path \(path)") }
            let hairpin = path.endpoint.flatMap(Self.endpointIP) == p.source
            if !hairpin && path.masquerade != model.masquerade {
                fail("trace masquerade \(path.masquerade), model \(String(describing: model.masquerade)) \(model.masqueradeReasons)")
            }
        }
        checked += 1
    }

    /// The address of an "IP:port" or "[IPv6]:port" endpoint.
    private static func endpointIP(_ text: String) -> IPAddress? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        return IPAddress(String(text[..<colon]).trimmingCharacters(in: ["[", "]"]))
    }
}
