// Sluice: a per-node Kubernetes service proxy.
// The IPVS tracer: IPVS mode's iptables chains walked with the ipset members evaluated, then
// the virtual server the packet hits and its real servers, each with its share by weight.

import IPTables
import SluiceCore

/// Traces packets through IPVS mode's rules, sets and virtual servers.
public enum IPVSTracer {
    /// A tracer over what a sync would hold.
    public static func compiled(_ desired: IPVSDesiredState, localAddresses: Set<IPAddress>) -> IPTablesTracer {
        let services = desired.virtualServers.values.map { (server: $0.server, destinations: $0.destinations) }
        return make(rules: IPTablesDrift.desired(restoreText: desired.restoreText, jumps: ipvsJumpRules),
                    services: services, entries: desired.entries,
                    localAddresses: localAddresses.union(desired.boundAddresses))
    }

    /// A tracer over what the kernel holds.
    public static func kernel(_ state: IPVSKernelState, localAddresses: Set<IPAddress>) -> IPTablesTracer {
        var entries: [String: Set<IPSetEntry>] = [:]
        for s in state.sets { entries[s.name] = Set(s.entries) }
        return make(rules: state.rules, services: state.services, entries: entries,
                    localAddresses: localAddresses.union(state.boundAddresses))
    }

    private static func make(rules: ParsedRuleSet, services: [(server: VirtualServer, destinations: [RealServer])],
                             entries: [String: Set<IPSetEntry>], localAddresses: Set<IPAddress>) -> IPTablesTracer {
        var tracer = IPTablesTracer(rules: rules, localAddresses: localAddresses)
        tracer.setMatcher = { name, flags, p in
            guard let members = entries[name] else { return nil }
            return members.contains { matches($0, flags: flags, p) }
        }
        let table = Dictionary(services.map { ($0.server.key, $0) }, uniquingKeysWith: { a, _ in a })
        tracer.virtualServers = { p in
            guard let proto = TransportProtocol(rawValue: p.proto.uppercased()),
                  let vs = table[VirtualServerKey(address: p.dst, proto: proto, port: UInt16(clamping: p.dport))] else { return nil }
            let live = vs.destinations.filter { $0.weight > 0 }
            let total = Double(live.reduce(0) { $0 + $1.weight })
            let server = "\(vs.server.key) scheduler \(vs.server.scheduler)" + (vs.server.timeout > 0 ? " persistent \(vs.server.timeout) s" : "")
            let shareNote = ["rr", "wrr"].contains(vs.server.scheduler) ? "" : " (share by weight; scheduler \(vs.server.scheduler) decides per connection)"
            return IPTablesTracer.VirtualServerHit(location: "ipvs", server: server, destinations: live.map { rs in
                (rs.address, Int(rs.port), Double(rs.weight) / total, "real server \(rs) weight \(rs.weight), masquerading forward\(shareNote)")
            })
        }
        return tracer
    }

    /// Whether a set member matches the packet for `--match-set NAME FLAGS` (`dst`, `dst,dst`,
    /// `dst,dst,src`): each flag names the packet field the member's next dimension is compared with.
    static func matches(_ e: IPSetEntry, flags: [String], _ p: IPTablesTracer.PacketFields) -> Bool {
        func addr(_ flag: String) -> IPAddress { flag == "src" ? p.src : p.dst }
        var i = 0
        if let ip = e.ip {
            guard i < flags.count, addr(flags[i]) == ip else { return false }
            i += 1
        }
        if let port = e.port {
            guard i < flags.count, flags[i] == "dst", Int(port) == p.dport else { return false }
            if let proto = e.proto, proto.lowercased != p.proto { return false }
            i += 1
        }
        if let ip2 = e.ip2 {
            guard i < flags.count, addr(flags[i]) == ip2 else { return false }
        } else if let net = e.net {
            guard i < flags.count, net.contains(addr(flags[i])) else { return false }
        }
        return true
    }
}
