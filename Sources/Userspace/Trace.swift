// Sluice: a per-node Kubernetes service proxy.
// The userspace tracer: the portal rules (REDIRECT or DNAT to the relay's port on the node),
// then the relay, which opens its own connection to an endpoint, round robin.

import IPTables
import SluiceCore

/// Traces packets through userspace mode's portal rules and relays.
public enum UserspaceTracer {
    /// A tracer over the portal rules a sync would write (relay ports as the dry run assigns them).
    public static func compiled(state: ProxyState, nodeName: String, nodeIP: IPAddress, localAddresses: Set<IPAddress>) -> IPTablesTracer {
        let plan = UserspacePlan(state: state, nodeName: nodeName)
        let text = PortalCompiler(nodeIP: nodeIP).compile(plan, relayPorts: RelayPortPlan.dryRun(plan.names)).restoreText
        return make(rules: IPTablesDrift.desired(restoreText: text, jumps: userspaceJumpRules), plan: plan,
                    localAddresses: localAddresses.union([nodeIP]))
    }

    /// A tracer over rules read from the kernel (relay ports as the running proxy got them).
    public static func make(rules: ParsedRuleSet, plan: UserspacePlan, localAddresses: Set<IPAddress>) -> IPTablesTracer {
        // Relay port -> service port, from the portal rules' comments and targets.
        var relays: [Int: RelaySpec] = [:]
        let byComment = Dictionary(plan.relays.values.map { ($0.name.description + "/" + $0.proto.lowercased, $0) }, uniquingKeysWith: { a, _ in a })
        for chain in Chain.userspaceNAT {
            for r in rules.rules("nat", chain) {
                guard let comment = r.comment, let proto = r.proto, let spec = byComment[comment + "/" + proto] else { continue }
                let to = r.targetOptions.first { $0.name == "--to-ports" || $0.name == "--to-destination" }?.values.first ?? ""
                if let port = Int(to.split(separator: ":").last ?? "") { relays[port] = spec }
            }
        }
        var tracer = IPTablesTracer(rules: rules, localAddresses: localAddresses)
        let table = relays
        tracer.virtualServers = { p in
            guard let spec = table[p.dport], spec.proto.lowercased == p.proto else { return nil }
            let n = Double(spec.endpoints.count)
            let affinity = spec.affinityTimeout.map { " (ClientIP affinity \($0.components.seconds) s: a returning client keeps its endpoint)" } ?? ""
            return IPTablesTracer.VirtualServerHit(
                location: "relay", server: "relay for \(spec.name) on the node's port \(p.dport)",
                destinations: spec.endpoints.map { ep in
                    (ep.ip, ep.port, 1 / n, "the relay connects from the node to \(ep), round robin\(affinity)")
                }, relay: true)
        }
        return tracer
    }
}
