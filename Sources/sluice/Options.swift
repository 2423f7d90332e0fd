// Sluice: a per-node Kubernetes service proxy.
// Command-line options shared by `sluice` (run) and `sluice compile`.

import ArgumentParser
import Foundation
import IPTables
import IPVS
import KernelKit
import KubeAPI
import Logging
import ProxyFlags
import SluiceCore
import SluiceServer

/// `--proxy-mode`.
enum ProxyMode: String, ExpressibleByArgument, CaseIterable {
    case iptables, ipvs, userspace, nftables
}

extension RandomFullyMode: ExpressibleByArgument {}

/// Flags that describe the node and the proxy's behaviour (kube-proxy's names).
@dynamicMemberLookup
struct ProxyOptions: ParsableArguments {
    @Option(help: "Which proxy mode to use: iptables, ipvs, userspace or nftables.")
    var proxyMode: ProxyMode = .iptables

    @Option(help: ArgumentHelp("Read Services, EndpointSlices, Endpoints and Nodes from the YAML/JSON files in this directory, and watch it.", valueName: "dir"))
    var manifests: String?

    @Option(help: ArgumentHelp("Read objects from the API server named in this kubeconfig file (its current context).", valueName: "file"))
    var kubeconfig: String?

    @Option(help: ArgumentHelp("The API server's address; overrides the kubeconfig's server.", valueName: "url"))
    var master: String?

    @Option(help: ArgumentHelp("How to tell traffic from local pods: ClusterCIDR (--cluster-cidr), NodeCIDR (the Node's spec.podCIDRs), BridgeInterface (--pod-bridge-interface) or InterfaceNamePrefix (--pod-interface-name-prefix).", valueName: "mode"))
    var detectLocalMode: LocalMode = .clusterCIDR

    @Option(help: ArgumentHelp("With --detect-local-mode BridgeInterface: traffic arriving on this bridge is from local pods.", valueName: "name"))
    var podBridgeInterface: String?

    @Option(help: ArgumentHelp("With --detect-local-mode InterfaceNamePrefix: traffic arriving on interfaces whose names start with this is from local pods.", valueName: "prefix"))
    var podInterfaceNamePrefix: String?

    @Option(help: ArgumentHelp("This node's primary IP when it is not 0.0.0.0 or :: (used when --node-ip is not given); an IPv6 address makes the default health and metrics addresses IPv6.", valueName: "ip"))
    var bindAddress: String = "0.0.0.0"

    @Flag(help: "Exit when the health or metrics server cannot listen (by default Sluice logs it and retries).")
    var bindAddressHardFail = false

    @Flag(help: "Do the privileged start-up work (conntrack sysctls, the OOM score), then exit.")
    var initOnly = false

    @Option(help: ArgumentHelp("The oom_score_adj written for the process, in [-1000, 1000].", valueName: "n"))
    var oomScoreAdj: Int = -999

    /// `--hostname-override`, `--node-ip`, `--cluster-cidr`, `--masquerade-all`,
    /// `--nodeport-addresses`, `--iptables-masquerade-bit`, `--iptables-localhost-nodeports`,
    /// `--iptables-backend` (ProxyFlags, shared with `sluice-bench-compile`).
    @OptionGroup var node: NodeOptions

    @Option(name: [.customLong("min-sync-period"), .customLong("iptables-min-sync-period")],
            help: ArgumentHelp("Minimum time between syncs (Go duration, e.g. 1s).", valueName: "duration"))
    var minSyncPeriod = FlagDuration(default: "1s")

    @Option(name: [.customLong("sync-period"), .customLong("iptables-sync-period")],
            help: ArgumentHelp("Maximum time between full syncs (Go duration, e.g. 30s).", valueName: "duration"))
    var syncPeriod = FlagDuration(default: "30s")

    @Option(help: ArgumentHelp("Proxy Services labelled service.kubernetes.io/service-proxy-name with this value.", valueName: "name"))
    var serviceProxyName: String?

    @Option(name: .shortAndLong, help: "Log verbosity: 0 info, 4 and above debug, 6 and above trace.")
    var v: Int = 0

    // IPVS mode (kube-proxy's names).

    @Option(help: ArgumentHelp("IPVS scheduler: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq or mh.", valueName: "name"))
    var ipvsScheduler: String = "rr"

    @Option(help: ArgumentHelp("IPVS mode: maximum time between full syncs (overrides --sync-period).", valueName: "duration"))
    var ipvsSyncPeriod: FlagDuration?

    @Option(help: ArgumentHelp("IPVS mode: minimum time between syncs (overrides --min-sync-period).", valueName: "duration"))
    var ipvsMinSyncPeriod: FlagDuration?

    @Option(help: ArgumentHelp("IPVS mode: comma-separated CIDRs whose virtual servers Sluice never deletes.", valueName: "cidrs"))
    var ipvsExcludeCidrs: String?

    @Flag(help: "IPVS mode: set arp_ignore=1 and arp_announce=2 so the node does not answer ARP for service addresses.")
    var ipvsStrictArp = false

    @Option(help: ArgumentHelp("IPVS mode: timeout of idle established TCP connections (0: leave the kernel's).", valueName: "duration"))
    var ipvsTcpTimeout = FlagDuration(default: "0s")

    @Option(help: ArgumentHelp("IPVS mode: timeout of TCP connections after FIN (0: leave the kernel's).", valueName: "duration"))
    var ipvsTcpfinTimeout = FlagDuration(default: "0s")

    @Option(help: ArgumentHelp("IPVS mode: timeout of UDP flows (0: leave the kernel's).", valueName: "duration"))
    var ipvsUdpTimeout = FlagDuration(default: "0s")

    @Option(help: ArgumentHelp("IPVS mode: how long a removed TCP endpoint's real server may drain at weight 0 before it is deleted.", valueName: "duration"))
    var ipvsGracefulPeriod = FlagDuration(default: "30s")

    @Option(help: ArgumentHelp("Where /healthz and /livez answer (IP:port, [::]:port for IPv6); empty disables them.", valueName: "ip:port"))
    var healthzBindAddress: String = HealthServer.defaultAddress

    @Option(help: ArgumentHelp("Where /metrics and /proxyMode answer (IP:port, [::1]:port for IPv6); empty disables them.", valueName: "ip:port"))
    var metricsBindAddress: String = MetricsServer.defaultAddress

    @Option(help: ArgumentHelp("Read a kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration; flags given on the command line override it.", valueName: "file"))
    var config: String?

    /// `--conntrack-*` (ConntrackSetup.swift).
    @OptionGroup var conntrack: ConntrackOptions

    @Option(help: ArgumentHelp("How long an idle UDP flow is kept open in userspace mode (Go duration, e.g. 250ms, 2s).", valueName: "duration"))
    var udpTimeout = FlagDuration(default: "250ms")

    mutating func validate() throws {
        try node.validate()
        guard syncPeriod.value > .zero else {
            throw ValidationError("--sync-period \"\(syncPeriod)\" is not a positive duration such as 30s")
        }
        guard minSyncPeriod.value <= syncPeriod.value else { throw ValidationError("--min-sync-period \(minSyncPeriod) is longer than --sync-period \(syncPeriod)") }
        guard udpTimeout.value > .zero else {
            throw ValidationError("--udp-timeout \"\(udpTimeout)\" is not a positive duration such as 250ms")
        }
        guard IPAddress(bindAddress) != nil else {
            throw ValidationError("--bind-address \"\(Validation.printable(bindAddress))\" is not an IP address")
        }
        guard (-1000...1000).contains(oomScoreAdj) else {
            throw ValidationError("--oom-score-adj \(oomScoreAdj) is not in [-1000, 1000]")
        }
        switch detectLocalMode {
        case .bridgeInterface:
            guard let name = podBridgeInterface, isInterfaceName(name) else {
                throw ValidationError("--detect-local-mode BridgeInterface needs --pod-bridge-interface (detectLocal.bridgeInterface) set to an interface name")
            }
        case .interfaceNamePrefix:
            guard let prefix = podInterfaceNamePrefix, isInterfaceName(prefix) else {
                throw ValidationError("--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix (detectLocal.interfaceNamePrefix) set to an interface name prefix")
            }
        case .clusterCIDR, .nodeCIDR: break
        }
        _ = try nodeIPs()
        _ = try clusterCIDRs()
        try validateIPVS()
        _ = try bindAddresses()
    }

    /// The health and metrics listen addresses; nil disables a server.
    func bindAddresses() throws -> (healthz: BindAddress?, metrics: BindAddress?) {
        do {
            return (try BindAddress.parse(ConfigFile.appendPortIfNeeded(healthzBindAddress, port: proxyHealthzPort), field: "--healthz-bind-address"),
                    try BindAddress.parse(ConfigFile.appendPortIfNeeded(metricsBindAddress, port: proxyMetricsPort), field: "--metrics-bind-address"))
        } catch {
            throw ValidationError(error.description)
        }
    }

    /// The node name: the override, else the host name, lower-cased (as kube-proxy does).
    func nodeName() -> String { node.nodeName() }

    /// `--node-ip`, else `--bind-address` when it names one address (kube-proxy's use of it).
    func nodeIPs() throws -> [IPAddress] { try node.nodeIPs(fallback: bindAddressNodeIP) }

    /// `--bind-address` when it names one address (not 0.0.0.0 or ::): the node IP when
    /// --node-ip is not given.
    var bindAddressNodeIP: IPAddress? {
        guard let ip = IPAddress(bindAddress), ip != IPAddress("0.0.0.0"), ip != IPAddress("::") else { return nil }
        return ip
    }

    func clusterCIDRs() throws -> [CIDR] { try node.clusterCIDRs() }

    /// The node configuration (``NodeOptions/nodeConfig(fallbackNodeIP:nodeHostIPs:nodePodCIDRs:localPods:)``):
    /// node IPs from --node-ip, else --bind-address, else the Node object, else the first
    /// non-loopback local addresses; with --detect-local-mode NodeCIDR the local-pod CIDRs are
    /// the Node's podCIDRs.
    func nodeConfig(from nodeObject: Node? = nil) throws -> NodeConfig {
        let localPods: NodeOptions.LocalPods
        switch detectLocalMode {
        case .clusterCIDR: localPods = .clusterCIDR
        case .nodeCIDR: localPods = .nodeCIDR
        case .bridgeInterface: localPods = .interface(podBridgeInterface.map(LocalInterfaceMatch.bridge))
        case .interfaceNamePrefix: localPods = .interface(podInterfaceNamePrefix.map(LocalInterfaceMatch.namePrefix))
        }
        return try node.nodeConfig(fallbackNodeIP: bindAddressNodeIP, nodeHostIPs: nodeObject?.hostIPs ?? [],
                                   nodePodCIDRs: nodeObject?.podCIDRValues ?? [], localPods: localPods)
    }

    var timing: SyncTiming {
        var t = SyncTiming(minSyncPeriod: minSyncPeriod.value, syncPeriod: syncPeriod.value)
        if proxyMode == .ipvs {
            if let p = ipvsSyncPeriod { t.syncPeriod = p.value }
            if let p = ipvsMinSyncPeriod { t.minSyncPeriod = p.value }
        }
        return t
    }
}

// The node flags by their own names (`options.nodeIP`, `options.iptablesBackend`), as the
// configuration file's bindings and the modes read and set them: they live in `node`, the
// group `sluice-bench-compile` shares.
extension ProxyOptions {
    subscript<T>(dynamicMember keyPath: WritableKeyPath<NodeOptions, T>) -> T {
        get { node[keyPath: keyPath] }
        set { node[keyPath: keyPath] = newValue }
    }
}

// IPVS-mode flags: validation and parsed values.
extension ProxyOptions {
    func validateIPVS() throws {
        guard ipvsSchedulers.contains(ipvsScheduler) else {
            throw ValidationError("--ipvs-scheduler \"\(Validation.printable(ipvsScheduler))\" is not one of \(ipvsSchedulers.joined(separator: ", "))")
        }
        if let p = ipvsSyncPeriod, p.value <= .zero {
            throw ValidationError("--ipvs-sync-period \"\(Validation.printable(p.text))\" is not a positive duration such as 30s")
        }
        if proxyMode == .ipvs, timing.minSyncPeriod > timing.syncPeriod {
            throw ValidationError("the minimum sync period \(GoDuration.format(timing.minSyncPeriod)) is longer than the sync period \(GoDuration.format(timing.syncPeriod))")
        }
        for (flag, value) in [("--ipvs-tcp-timeout", ipvsTcpTimeout), ("--ipvs-tcpfin-timeout", ipvsTcpfinTimeout),
                              ("--ipvs-udp-timeout", ipvsUdpTimeout), ("--ipvs-graceful-period", ipvsGracefulPeriod)] {
            guard value.value <= .seconds(Int64(UInt32.max)) else {
                throw ValidationError("\(flag) \"\(Validation.printable(value.text))\" is not a duration such as 900s")
            }
        }
        _ = try ipvsExcludeCIDRList()
    }

    func ipvsExcludeCIDRList() throws -> [CIDR] {
        try parseCIDRList(ipvsExcludeCidrs, flag: "--ipvs-exclude-cidrs")
    }

    /// The three `ipvsadm --set` timeouts in whole seconds.
    var ipvsTimeouts: IPVSTimeouts {
        func seconds(_ d: FlagDuration) -> UInt32 { UInt32(clamping: d.value.components.seconds) }
        return IPVSTimeouts(tcp: seconds(ipvsTcpTimeout), tcpFin: seconds(ipvsTcpfinTimeout), udp: seconds(ipvsUdpTimeout))
    }

    var ipvsGracefulDuration: Duration { ipvsGracefulPeriod.value }
}

/// A Linux interface name (or prefix): 1-15 bytes, no `/`, `:` or white space.
func isInterfaceName(_ s: String) -> Bool {
    !s.isEmpty && s.utf8.count <= 15 && s != "." && s != ".." && !s.contains { $0 == "/" || $0 == ":" || $0.isWhitespace }
}

/// `--iptables-backend auto` made concrete when both back ends are installed: the one the
/// host already uses (kube-proxy's image's rule, `IPTablesBackendEvidence`); otherwise the
/// variant as given.
func chooseIPTablesBackend(_ variant: IPTablesVariant, logger: Logger) async -> IPTablesVariant {
    guard variant == .auto, let evidence = await IPTablesBackendEvidence.read(runner: ProcessRunner()) else { return variant }
    let (choice, reason) = evidence.decide()
    logger.info("--iptables-backend auto: using \(IPTablesTools(variant: choice, family: .ipv4).iptables): \(reason)")
    return choice
}
