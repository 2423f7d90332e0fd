// Sluice: a per-node Kubernetes service proxy.
// The portal rules of the userspace mode (seeds §3.3-3.5, legacy kube-proxy's
// iptablesContainerPortalArgs / iptablesHostPortalArgs / iptablesHostNodePortArgs): a pure
// function from the plan, the relay ports and the node IP to iptables-restore input.
//
// Every rule is written in the form `iptables -S` prints it back, so what the kernel holds
// can be compared with what was written, line for line.

import IPTables
import SluiceCore

/// The four chains' rules for one sync.
public struct PortalRules: Sendable, Hashable {
    /// `-A CHAIN ...` lines, grouped by chain in `Chain.userspaceNAT` order, service ports
    /// sorted within a chain: the order `iptables -S -t nat` lists them.
    public var rules: [String]

    /// The rules of one chain.
    public func rules(in chain: String) -> [String] {
        rules.filter { $0.hasPrefix("-A \(chain) ") }
    }

    /// The iptables-restore input (nat table only): the four chains declared, which with
    /// `--noflush` replaces their content and nothing else, then the rules.
    public var restoreText: String {
        var out = "*nat\n"
        for c in Chain.userspaceNAT { out += ":\(c) - [0:0]\n" }
        for r in rules { out += r + "\n" }
        out += "COMMIT\n"
        return out
    }
}

/// Compiles portal rules.
public struct PortalCompiler: Sendable {
    /// The node address HOST rules DNAT to (REDIRECT cannot be used for locally generated
    /// packets whose replies must come from a non-loopback address).
    public let nodeIP: IPAddress

    /// Creates a compiler.
    public init(nodeIP: IPAddress) { self.nodeIP = nodeIP }

    /// The rules for every service port of `plan` that has a relay port.
    ///
    /// Per service port with relay port P:
    /// - `KUBE-PORTALS-CONTAINER`: `-d <address>/32 ... --dport <port> -j REDIRECT --to-ports P`
    ///   for the ClusterIP, each external IP and each load-balancer IP;
    /// - `KUBE-PORTALS-HOST`: the same matches, `-j DNAT --to-destination <node IP>:P`;
    /// - with a NodePort, `KUBE-NODEPORT-CONTAINER` and `KUBE-NODEPORT-HOST` match only
    ///   `--dport <nodePort>` (their jumps match local destinations), with the same targets.
    ///
    /// The comment is legacy kube-proxy's `ns/name:port`, colon kept for an unnamed port.
    public func compile(_ plan: UserspacePlan, relayPorts: [ServicePortName: Int]) -> PortalRules {
        var byChain: [String: [String]] = [:]
        for name in plan.names {
            guard let svc = plan.servicePorts[name], let relay = relayPorts[name] else { continue }
            for (chain, rule) in rules(name, svc, relay: relay) { byChain[chain, default: []].append(rule) }
        }
        return PortalRules(rules: Chain.userspaceNAT.flatMap { byChain[$0] ?? [] })
    }

    /// The rules of one service port with relay port `relay`, with their chains, in chain order.
    public func rules(_ name: ServicePortName, _ svc: ServicePortInfo, relay: Int) -> [(chain: String, rule: String)] {
        var out: [(chain: String, rule: String)] = []
        let proto = svc.proto.lowercased
        let comment = "-m comment --comment \"\(name.service):\(name.port)\""
        let redirect = "-j REDIRECT --to-ports \(relay)"
        let dnat = "-j DNAT --to-destination \(nodeIP.joined(port: relay))"
        var container: [String] = []
        var host: [String] = []
        for ip in [svc.clusterIP] + svc.externalIPs + svc.loadBalancerVIPs where ip.family == nodeIP.family {
            let match = "-d \(CIDR(host: ip)) -p \(proto) \(comment) -m \(proto) --dport \(svc.port)"
            container.append("-A \(Chain.portalsContainer) \(match) \(redirect)")
            host.append("-A \(Chain.portalsHost) \(match) \(dnat)")
        }
        out += container.map { (Chain.portalsContainer, $0) } + host.map { (Chain.portalsHost, $0) }
        if svc.nodePort != 0 {
            let match = "-p \(proto) \(comment) -m \(proto) --dport \(svc.nodePort)"
            out.append((Chain.nodePortContainer, "-A \(Chain.nodePortContainer) \(match) \(redirect)"))
            out.append((Chain.nodePortHost, "-A \(Chain.nodePortHost) \(match) \(dnat)"))
        }
        return out
    }
}

/// Relay ports for a dry run (`sluice compile --proxy-mode userspace`).
public enum RelayPortPlan {
    /// The first port of Linux's default ephemeral range (`net.ipv4.ip_local_port_range`),
    /// where the kernel picks a running proxy's relay ports.
    public static let dryRunStart = 32768

    /// Consecutive ports from `start`, one per name in the given order. A running proxy binds
    /// port 0 and gets whatever free port the kernel picks; a dry run cannot, so it shows
    /// these stand-ins, which are stable for the same input.
    public static func dryRun(_ names: [ServicePortName], start: Int = dryRunStart) -> [ServicePortName: Int] {
        var out: [ServicePortName: Int] = [:]
        for (i, name) in names.enumerated() { out[name] = start + i }
        return out
    }
}
