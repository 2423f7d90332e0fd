// Sluice: a per-node Kubernetes service proxy.
// IPVS mode in the executable: start-up checks, the backend, the drain reaper, the dry run
// of `sluice compile --proxy-mode ipvs`, and the IPVS part of `--cleanup`.

import IPTables
import IPVS
import KernelKit
import Logging
import Netlink
import ServiceLifecycle
import SluiceCore

/// Builds the IPVS-mode runtime, or fails with one line naming every missing kernel feature.
/// It never falls back to another mode.
func makeIPVSMode(options: ProxyOptions, node: NodeConfig, family: IPFamily, logger: Logger) async throws -> ModeRuntime {
    let tools = IPTablesTools(variant: options.iptablesBackend, family: family)
    let runner = ProcessRunner()

    let ipvs: GenericNetlinkIPVSClient?
    let links: RouteNetlinkClient
    let ipsets: NetfilterIPSetClient
    do {
        ipvs = try await GenericNetlinkIPVSClient.connect()
        links = try RouteNetlinkClient.connect()
        ipsets = try NetfilterIPSetClient.connect()
    } catch {
        throw SluiceExit("cannot use --proxy-mode ipvs: \(error)")
    }

    let randomFully: Bool
    do {
        randomFully = try await IPTablesFeatures.probe(tools, runner: runner)?.randomFully ?? true
    } catch let e as IPTablesError {
        throw SluiceExit("cannot use --proxy-mode ipvs: its iptables rules need \(tools.iptables): \(e.underlying)")
    }

    let ipvsOptions = IPVSOptions(node: node, family: family, scheduler: options.ipvsScheduler,
                                  excludeCIDRs: (try? options.ipvsExcludeCIDRList()) ?? [], randomFully: randomFully)
    let config = IPVSBackendConfig(options: ipvsOptions, gracefulPeriod: options.ipvsGracefulDuration, tools: tools)
    do {
        _ = try await IPVSBackend.prepare(config: config, ipvs: ipvs, links: links, ipsets: ipsets, timeouts: options.ipvsTimeouts,
                                          strictARP: options.ipvsStrictArp, logger: logger)
    } catch let e as SluiceIPVSUnavailable {
        throw SluiceExit(e.description)
    }
    guard let ipvs else { throw SluiceExit("cannot use --proxy-mode ipvs: the kernel has no IPVS (ip_vs)") }
    let backend = IPVSBackend(config: config, ipvs: ipvs, links: links, ipsets: ipsets, runner: runner, logger: logger)
    return ModeRuntime(backend: backend) { _ in
        [IPVSDrainReaper(backend: backend, interval: .seconds(1), logger: logger)]
    }
}

/// Deletes drained real servers once their connections end or their graceful period is over.
struct IPVSDrainReaper: ServiceLifecycle.Service {
    let backend: IPVSBackend
    let interval: Duration
    let logger: Logger

    func run() async throws {
        try await untilShutdown {
            while !Task.isCancelled {
                try await Task.sleep(for: interval)
                do {
                    try await backend.reapDraining()
                } catch {
                    logger.error("checking draining real servers: \(error)")
                }
            }
        }
    }
}

/// `sluice compile --proxy-mode ipvs`: what the backend's planner writes into a node that
/// holds nothing of the mode's: the IPVS services and destinations (`ipvsadm -Sn`), the ipset
/// members (`ipset save`), then the iptables-restore input. NodePorts open on the `--node-ip`
/// addresses, which also count as the node's own addresses.
func ipvsDryRun(options: ProxyOptions, node: NodeConfig, family: IPFamily, state: ProxyState, randomFully: Bool) throws -> String {
    let o = IPVSOptions(node: node, family: family, scheduler: options.ipvsScheduler, excludeCIDRs: try options.ipvsExcludeCIDRList(),
                        randomFully: randomFully)
    return IPVSPlanner(options: o).planFromScratch(state, nodeAddresses: node.nodeIPs).desired.dryRunText
}

/// The IPVS part of `--cleanup`: IPVS services, IPVS-mode chains and jumps, ipsets, kube-ipvs0.
func runIPVSCleanup(options: ProxyOptions, logger: Logger) async -> [String] {
    let ipvs = try? await GenericNetlinkIPVSClient.connect()
    let links = try? RouteNetlinkClient.connect()
    let ipsets = try? NetfilterIPSetClient.connect()
    let tools = IPFamily.allCases.map { IPTablesTools(variant: options.iptablesBackend, family: $0) }
        .filter { ProcessRunner().resolve($0.restore) != nil }
    return await IPVSBackend.cleanup(ipvs: ipvs ?? nil, links: links, ipsets: ipsets, tools: tools, runner: ProcessRunner(), logger: logger)
}
