// Sluice: a per-node Kubernetes service proxy.
// Where each proxy mode and each object source plugs into the executable.

import IPTables
import KubeAPI
import Logging
import ServiceLifecycle
import SluiceCore
import SluiceServer

/// A proxy mode as the executable runs it: its backend, the observers that follow each
/// sync, and any long-running services of its own.
struct ModeRuntime {
    var backend: any ProxyBackend
    var observers: [any SyncObserver] = []
    var services: (SyncRunner<ContinuousClock>) -> [any ServiceLifecycle.Service] = { _ in [] }
}

/// Builds the runtime of the selected `--proxy-mode` for one IP family (a dual-stack node
/// runs one per family over the same model, as kube-proxy's metaproxier does).
/// - Parameter metrics: where the nfacct counters are exported (iptables mode).
func makeMode(options: ProxyOptions, node: NodeConfig, family: IPFamily, metrics: ProxyMetrics? = nil,
              logger: Logger) async throws -> ModeRuntime {
    switch options.proxyMode {
    case .iptables:
        let backend: IPTablesBackend
        // kube-proxy's nfacct counters; one poller (the first family's) reads the shared objects.
        let first = family == node.families.first
        let nfacct = await makeNFAcct(metrics: first ? metrics : nil, logger: logger)
        let poller = nfacct.poller
        do {
            backend = try await IPTablesBackend.create(node: node, family: family, variant: options.iptablesBackend,
                                                       runner: ProcessRunner(), nfacctCounters: nfacct.names, logger: logger)
        } catch {
            throw SluiceExit("cannot use \(family == .ipv4 ? "iptables" : "ip6tables"): \(error)")
        }
        return ModeRuntime(backend: backend, observers: [makeConntrackReconciler(node: node, logger: logger)]) { runner in
            [CanaryMonitor(backend: backend, runner: runner, interval: .seconds(5))] + (poller.map { [$0] } ?? [])
        }
    case .ipvs:
        var mode = try await makeIPVSMode(options: options, node: node, family: family, logger: logger)
        // IPVS mode keeps net.ipv4.vs.conntrack=1, so its flows are in the conntrack table too.
        mode.observers.append(makeConntrackReconciler(node: node, logger: logger))
        return mode
    case .nftables:
        return try await makeNFTablesMode(options: options, node: node, family: family, logger: logger)
    case .userspace:
        let backend = try makeUserspaceBackend(options: options, node: node, logger: logger)
        // Redirected flows answer from the relay port, not an endpoint: the reconciler keeps them.
        return ModeRuntime(backend: backend, observers: [makeConntrackReconciler(node: node, logger: logger, relayPort: { backend.relayPort(of: $0) })]) { runner in
            [CanaryMonitor(backend: backend, runner: runner, interval: .seconds(5))]
        }
    }
}

/// Builds the object source (a stream of events that starts with the full state, then
/// `.synced`, then changes) and the node configuration, which may depend on the Node object.
func makeSource(options: ProxyOptions, logger: Logger) async throws -> SourcePlan {
    guard let dir = options.manifests else {
        return try await makeAPISourcePlan(options: options, logger: logger)
    }
    if options.kubeconfig != nil || options.master != nil {
        throw SluiceExit("--manifests cannot be combined with --kubeconfig or --master: pick one source")
    }
    let source = ManifestDirectorySource(directory: dir, logger: logger) { rejection in
        logger.error("\(rejection.description); skipped")
    }
    var nodeObject: Node?
    if options.detectLocalMode == .nodeCIDR {
        let name = options.nodeName()
        nodeObject = ((try? source.scan(from: .init()).1) ?? []).lazy.compactMap { e -> Node? in
            if case .nodeUpserted(let n) = e, n.name == name { return n }
            return nil
        }.first
    }
    return SourcePlan(events: { source.events() }, node: try options.nodeConfig(from: nodeObject))
}
