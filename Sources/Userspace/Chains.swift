// Sluice: a per-node Kubernetes service proxy.
// The chains and jump rules of the userspace mode (legacy kube-proxy, pkg/proxy/userspace
// before v1.26), and what its clean-up removes. The names extend the iptables mode's
// `Chain` namespace (every KUBE- chain name in one place for tracing); the mode owns them.

import IPTables
import KernelKit

extension Chain {
    /// Pods and other hosts reaching a Service address: `REDIRECT --to-ports <relay port>`.
    public static let portalsContainer = "KUBE-PORTALS-CONTAINER"
    /// Node processes reaching a Service address: `DNAT --to-destination <node IP>:<relay port>`.
    public static let portalsHost = "KUBE-PORTALS-HOST"
    /// Pods and other hosts reaching a NodePort: `REDIRECT --to-ports <relay port>`.
    public static let nodePortContainer = "KUBE-NODEPORT-CONTAINER"
    /// Node processes reaching a NodePort: `DNAT --to-destination <node IP>:<relay port>`.
    public static let nodePortHost = "KUBE-NODEPORT-HOST"

    /// The userspace mode's nat chains, in the order `iptables -S` lists them.
    public static let userspaceNAT = [nodePortContainer, nodePortHost, portalsContainer, portalsHost]
}

/// The jumps into the userspace chains, as legacy kube-proxy's `iptablesInit` made them:
/// the portal chains first in PREROUTING / OUTPUT ("must be before the NodePort rules"), the
/// NodePort chains last, for local destinations only.
public let userspaceJumpRules: [JumpRule] = {
    let portals = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
    let nodePorts = "handle service NodePorts; NOTE: this must be the last rule in the chain"
    let local = ["-m", "addrtype", "--dst-type", "LOCAL"]
    return [
        JumpRule(table: .nat, source: "PREROUTING", target: Chain.portalsContainer, comment: portals, extraArgs: [], position: .first),
        JumpRule(table: .nat, source: "OUTPUT", target: Chain.portalsHost, comment: portals, extraArgs: [], position: .first),
        JumpRule(table: .nat, source: "PREROUTING", target: Chain.nodePortContainer, comment: nodePorts, extraArgs: local, position: .last),
        JumpRule(table: .nat, source: "OUTPUT", target: Chain.nodePortHost, comment: nodePorts, extraArgs: local, position: .last),
    ]
}()

/// What the userspace mode owns in iptables: its four jumps and its four nat chains.
public let userspaceFootprint = IPTablesFootprint(jumps: userspaceJumpRules, tables: [.nat]) { table, chain in
    table == .nat && Chain.userspaceNAT.contains(chain)
}
