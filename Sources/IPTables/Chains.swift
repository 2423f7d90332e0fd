// Sluice: a per-node Kubernetes service proxy.
// Names of the iptables chains and the fixed jump rules (kube-proxy v1.31 layout). The
// table and jump-rule types are the kernel kit's.

import KernelKit

/// Well-known chain names.
public enum Chain {
    public static let services = "KUBE-SERVICES"
    public static let externalServices = "KUBE-EXTERNAL-SERVICES"
    public static let forward = "KUBE-FORWARD"
    public static let nodePorts = "KUBE-NODEPORTS"
    public static let proxyFirewall = "KUBE-PROXY-FIREWALL"
    public static let postrouting = "KUBE-POSTROUTING"
    public static let markMasq = "KUBE-MARK-MASQ"
    public static let kubeletFirewall = "KUBE-FIREWALL"
    public static let canary = "KUBE-PROXY-CANARY"

    /// Per-service chain prefixes (nat).
    public static let servicePrefixes = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"]

    /// True for a per-service chain name (the ones stale-chain cleanup may delete).
    public static func isServiceChain(_ name: String) -> Bool {
        servicePrefixes.contains { name.hasPrefix($0) }
    }

    /// Top-level filter chains, in kube-proxy's declaration order.
    public static let filterTopLevel = [services, externalServices, forward, nodePorts, proxyFirewall]
    /// Top-level nat chains, in kube-proxy's declaration order.
    public static let natTopLevel = [services, nodePorts, postrouting, markMasq]
}

/// kube-proxy's `iptablesJumpChains` followed by the kubelet duplicates, in order.
public let jumpRules: [JumpRule] = {
    let newConn = ["-m", "conntrack", "--ctstate", "NEW"]
    return [
        JumpRule(table: .filter, source: "INPUT", target: Chain.externalServices, comment: "kubernetes externally-visible service portals", extraArgs: newConn),
        JumpRule(table: .filter, source: "FORWARD", target: Chain.externalServices, comment: "kubernetes externally-visible service portals", extraArgs: newConn),
        JumpRule(table: .filter, source: "INPUT", target: Chain.nodePorts, comment: "kubernetes health check service ports", extraArgs: []),
        JumpRule(table: .filter, source: "FORWARD", target: Chain.services, comment: "kubernetes service portals", extraArgs: newConn),
        JumpRule(table: .filter, source: "OUTPUT", target: Chain.services, comment: "kubernetes service portals", extraArgs: newConn),
        JumpRule(table: .filter, source: "FORWARD", target: Chain.forward, comment: "kubernetes forwarding rules", extraArgs: []),
        JumpRule(table: .filter, source: "INPUT", target: Chain.proxyFirewall, comment: "kubernetes load balancer firewall", extraArgs: newConn),
        JumpRule(table: .filter, source: "OUTPUT", target: Chain.proxyFirewall, comment: "kubernetes load balancer firewall", extraArgs: newConn),
        JumpRule(table: .filter, source: "FORWARD", target: Chain.proxyFirewall, comment: "kubernetes load balancer firewall", extraArgs: newConn),
        JumpRule(table: .nat, source: "OUTPUT", target: Chain.services, comment: "kubernetes service portals", extraArgs: []),
        JumpRule(table: .nat, source: "PREROUTING", target: Chain.services, comment: "kubernetes service portals", extraArgs: []),
        JumpRule(table: .nat, source: "POSTROUTING", target: Chain.postrouting, comment: "kubernetes postrouting rules", extraArgs: []),
    ]
}()

/// The kubelet's KUBE-FIREWALL jumps, which kube-proxy also ensures (and never deletes).
public let kubeletJumpRules: [JumpRule] = [
    JumpRule(table: .filter, source: "INPUT", target: Chain.kubeletFirewall, comment: "", extraArgs: []),
    JumpRule(table: .filter, source: "OUTPUT", target: Chain.kubeletFirewall, comment: "", extraArgs: []),
]
