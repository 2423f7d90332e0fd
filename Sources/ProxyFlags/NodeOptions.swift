// Sluice: a per-node Kubernetes service proxy.
// The node and compile flags that `sluice` and `sluice-bench-compile` share, and the one
// derivation of the node configuration from them (node name and IPs, NodePort addresses,
// local-pod detection). Both executables include them with `@OptionGroup`.

import ArgumentParser
import Foundation
import KernelKit
import SluiceCore

extension IPTablesVariant: ExpressibleByArgument {}

/// The flags that describe the node and bear on what a sync compiles (kube-proxy's names):
/// `--hostname-override`, `--node-ip`, `--cluster-cidr`, `--masquerade-all`,
/// `--nodeport-addresses`, `--iptables-masquerade-bit`, `--iptables-localhost-nodeports` and
/// `--iptables-backend`.
public struct NodeOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The name of this node (endpoints with this nodeName are local). Defaults to the host name.", valueName: "name"))
    public var hostnameOverride: String?

    @Option(help: ArgumentHelp("This node's IP address(es), comma-separated. Defaults to the first non-loopback address.", valueName: "ip"))
    public var nodeIP: String?

    @Option(help: ArgumentHelp("The pod CIDR(s) of the cluster, comma-separated: traffic from outside it to a ClusterIP is masqueraded.", valueName: "cidr"))
    public var clusterCIDR: String?

    @Flag(help: "SNAT all traffic sent to Service cluster IPs.")
    public var masqueradeAll = false

    @Option(help: ArgumentHelp("Node addresses NodePorts answer on: comma-separated CIDRs or 'primary'. Default: every local address.", valueName: "cidrs"))
    public var nodeportAddresses: String?

    @Option(help: "The fwmark bit (0-31) marking packets for SNAT.")
    public var iptablesMasqueradeBit: Int = 14

    @Option(help: ArgumentHelp("Answer NodePorts on 127.0.0.1 (IPv4; sets route_localnet). true or false.", valueName: "bool"))
    public var iptablesLocalhostNodeports: Bool = true

    @Option(help: "Which iptables binaries to use: auto (the host's default), nft or legacy.")
    public var iptablesBackend: IPTablesVariant = .auto

    /// The defaults, as when no flag is given.
    public init() {}

    /// Checks the masquerade bit and the node name (the rest is checked by ``nodeConfig(fallbackNodeIP:nodeHostIPs:nodePodCIDRs:localPods:)``).
    public mutating func validate() throws {
        guard (0...31).contains(iptablesMasqueradeBit) else {
            throw ValidationError("--iptables-masquerade-bit \(iptablesMasqueradeBit) is not in 0-31")
        }
        if let h = hostnameOverride, !Validation.isNodeName(h.lowercased()) {
            throw ValidationError("--hostname-override \"\(Validation.printable(h))\" is not a valid node name")
        }
    }

    /// The node name: the override, else the host name, lower-cased (as kube-proxy does).
    public func nodeName() -> String {
        (hostnameOverride ?? ProcessInfo.processInfo.hostName).lowercased()
    }

    /// `--node-ip`; when it is not given, `fallback` (the proxy's `--bind-address` when it
    /// names one address), else none.
    public func nodeIPs(fallback: IPAddress? = nil) throws -> [IPAddress] {
        guard let text = nodeIP, !text.isEmpty else { return fallback.map { [$0] } ?? [] }
        return try text.split(separator: ",").map { part in
            guard let ip = IPAddress(String(part).trimmingASCIIWhitespace()) else {
                throw ValidationError("--node-ip \"\(Validation.printable(String(part)))\" is not an IP address")
            }
            return ip
        }
    }

    /// `--cluster-cidr`.
    public func clusterCIDRs() throws -> [CIDR] {
        try parseCIDRList(clusterCIDR, flag: "--cluster-cidr")
    }

    /// How traffic from local pods is told apart (`--detect-local-mode` and its interface flags).
    public enum LocalPods: Sendable, Hashable {
        /// Inside `--cluster-cidr`.
        case clusterCIDR
        /// Inside the Node object's `spec.podCIDRs` (`nodePodCIDRs`).
        case nodeCIDR
        /// Arriving on an interface (a bridge, or a name prefix); nil when none is named.
        case interface(LocalInterfaceMatch?)
    }

    /// The node configuration. Node IPs come from `--node-ip`, else `fallbackNodeIP`, else
    /// `nodeHostIPs` (the Node object's), else the first non-loopback, non-link-local local
    /// address of each family; NodePort addresses from `--nodeport-addresses` over those IPs;
    /// the local-pod CIDRs as `localPods` says.
    public func nodeConfig(fallbackNodeIP: IPAddress? = nil, nodeHostIPs: [IPAddress] = [], nodePodCIDRs: [CIDR] = [],
                           localPods: LocalPods = .clusterCIDR) throws -> NodeConfig {
        var ips = try nodeIPs(fallback: fallbackNodeIP)
        if ips.isEmpty { ips = nodeHostIPs }
        if ips.isEmpty {
            let local = LocalAddresses.current().filter { !$0.isLoopback && !$0.isLinkLocalUnicast }
            ips = [local.first { $0.family == .ipv4 }, local.first { $0.family == .ipv6 }].compactMap { $0 }
        }
        let npa: NodePortAddresses
        do {
            npa = try NodePortAddresses.parse(nodeportAddresses ?? "", nodeIPs: ips)
        } catch {
            throw ValidationError(error.description)
        }
        let localCIDRs: [CIDR]
        var localInterface: LocalInterfaceMatch?
        switch localPods {
        case .clusterCIDR: localCIDRs = try clusterCIDRs()
        case .nodeCIDR: localCIDRs = nodePodCIDRs
        case .interface(let match):
            localCIDRs = []
            localInterface = match
        }
        var config = NodeConfig(nodeName: nodeName(), nodeIPs: ips, clusterCIDRs: localCIDRs, masqueradeAll: masqueradeAll,
                                masqueradeBit: iptablesMasqueradeBit, nodePortAddresses: npa,
                                localhostNodePorts: iptablesLocalhostNodeports)
        config.localInterface = localInterface
        return config
    }
}

/// A comma-separated CIDR list flag (`--cluster-cidr`, `--ipvs-exclude-cidrs`); empty or
/// absent is none. A part that is not a CIDR is a `ValidationError` naming `flag`.
public func parseCIDRList(_ text: String?, flag: String) throws -> [CIDR] {
    guard let text, !text.isEmpty else { return [] }
    return try text.split(separator: ",").map { part in
        guard let c = CIDR(String(part)) else {
            throw ValidationError("\(flag) \"\(Validation.printable(String(part)))\" is not a CIDR")
        }
        return c
    }
}
