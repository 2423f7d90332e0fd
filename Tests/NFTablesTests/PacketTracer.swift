// The packet-flow tests' view of the module's tracer (NFTablesTracer) over the in-memory
// table (NFTModel), for porting kube-proxy's packet-flow tests (runPacketFlowTests in
// pkg/proxy/nftables): the DNAT destinations, DROP or REJECT, and whether the connection is
// masqueraded. A rule the tracer does not understand, or a missing chain, fails the trace.

import Foundation
import NFTables
import SluiceCore

struct TraceResult: Equatable, CustomStringConvertible {
    /// "DROP", "REJECT", "" (not a Service: untouched) or the sorted DNAT destinations.
    var output: String
    var masq: Bool
    var description: String { "\(output) masq=\(masq)" }
}

extension NFTModel {
    /// The table in the tracer's normal form (read from the model's dump).
    func snapshot() throws -> NFTTableSnapshot {
        try NFTTableSnapshot.parse(commands: dump(), family: family == "ip" ? .ip : .ip6)
    }
}

struct PacketTracer {
    let model: NFTModel
    let nodeIPs: Set<String>

    /// Traces one new connection.
    func trace(src: String, dst: String, port: Int, proto: String = "tcp") throws -> TraceResult {
        let tracer = NFTablesTracer(table: try model.snapshot(), localAddresses: Set(nodeIPs.compactMap(IPAddress.init)))
        guard let p = TransportProtocol(rawValue: proto.uppercased()), let s = IPAddress(src), let d = IPAddress(dst) else {
            throw ModelError("bad packet \(src) -> \(dst):\(port)/\(proto)")
        }
        let result = tracer.trace(ProbePacket(source: s, fromNode: nodeIPs.contains(src), destination: d, port: port, proto: p))
        if let bad = result.notes.first(where: { $0.contains("not understood") || $0.contains("is missing") }) { throw ModelError(bad) }
        let verdicts = Set(result.paths.map(\.verdict))
        if verdicts.contains(.rejected) { return TraceResult(output: "REJECT", masq: false) }
        if verdicts.contains(.dropped) { return TraceResult(output: "DROP", masq: false) }
        let dests = Set(result.paths.compactMap(\.endpoint)).sorted()
        return TraceResult(output: dests.joined(separator: ", "), masq: result.paths.contains(where: \.masquerade))
    }
}
