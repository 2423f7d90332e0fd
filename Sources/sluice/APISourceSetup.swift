// Sluice: a per-node Kubernetes service proxy.
// The Kubernetes API as the object source: which configuration (--kubeconfig, --master,
// in-cluster), the Node facts the node configuration needs before the backend is created, and
// the guard that restarts the proxy when those facts change.

import ArgumentParser
import Foundation
import KubeAPI
import Logging
import SluiceCore

/// `--detect-local-mode`.
enum LocalMode: String, ExpressibleByArgument, CaseIterable {
    /// Local pods are those inside `--cluster-cidr`.
    case clusterCIDR = "ClusterCIDR"
    /// Local pods are those inside this Node's `spec.podCIDRs`.
    case nodeCIDR = "NodeCIDR"
    /// Local pods send from `--pod-bridge-interface`.
    case bridgeInterface = "BridgeInterface"
    /// Local pods send from interfaces named `--pod-interface-name-prefix`*.
    case interfaceNamePrefix = "InterfaceNamePrefix"
}

/// An object source ready to run, and the node configuration to compile with.
struct SourcePlan {
    /// Starts the event stream (full state, `.synced`, changes).
    var events: @Sendable () -> AsyncThrowingStream<ObjectEvent, Error>
    /// The node configuration.
    var node: NodeConfig
}

/// How long start-up waits for this node's Node object when the configuration needs it.
let nodeWaitLimit: Duration = .seconds(10)

/// Builds the API source from --kubeconfig, --master or the in-cluster service account.
func makeAPISourcePlan(options: ProxyOptions, logger: Logger) async throws -> SourcePlan {
    let config: KubeConfig
    do {
        if let file = options.kubeconfig {
            config = try KubeConfig.load(file: file, master: options.master)
        } else if let master = options.master {
            config = try KubeConfig.master(master)
        } else if ProcessInfo.processInfo.environment["KUBERNETES_SERVICE_HOST"] != nil {
            config = try KubeConfig.inCluster()
        } else {
            throw SluiceExit("no source of objects: pass --kubeconfig FILE, --master URL or --manifests DIR, or run in a pod")
        }
    } catch let e as KubeConfigError {
        throw SluiceExit(e.description)
    }
    let client: KubeClient
    do {
        client = try KubeClient(config: config, logger: logger, userAgent: "sluice/\(sluiceVersion)")
    } catch {
        throw SluiceExit(error.description)
    }
    logger.info("API server \(config.description)")

    let nodeName = options.nodeName()
    let needIPs = (options.nodeIP ?? "").isEmpty
    let needCIDRs = options.detectLocalMode == .nodeCIDR
    var nodeObject: Node?
    if needIPs || needCIDRs {
        nodeObject = await waitForNode(client: client, name: nodeName, needPodCIDRs: needCIDRs, logger: logger)
        if needCIDRs && (nodeObject?.podCIDRValues ?? []).isEmpty {
            await client.shutdown()
            throw SluiceExit("--detect-local-mode NodeCIDR: node \(nodeName) has no spec.podCIDRs after \(nodeWaitLimit) (is --hostname-override right, and does the cluster allocate pod CIDRs?)")
        }
        if needIPs && (nodeObject?.hostIPs ?? []).isEmpty {
            logger.warning("node \(nodeName)'s IPs are not known from the API after \(nodeWaitLimit); using this host's addresses (set --node-ip to choose)")
        }
    }
    let node = try options.nodeConfig(from: nodeObject)
    let fromNodeIPs = needIPs ? nodeObject.map(\.hostIPs).flatMap { $0.isEmpty ? nil : $0 } : nil
    let dependency = NodeDependency(nodeName: nodeName, nodeIPs: fromNodeIPs, podCIDRs: needCIDRs ? nodeObject?.podCIDRs : nil)
    let source = APISource(client: client, nodeName: nodeName, serviceProxyName: options.serviceProxyName, logger: logger,
                           shutsDownClient: true)
    let startupEvent = StartupEvent(nodeName: nodeName, mode: options.proxyMode.rawValue)
    Task { await startupEvent.post(client: client, logger: logger) }
    return SourcePlan(events: { dependency.guarding(source.events()) }, node: node)
}

/// GETs the Node until it exists (and has pod CIDRs, when asked) or the wait limit passes.
private func waitForNode(client: KubeClient, name: String, needPodCIDRs: Bool, logger: Logger) async -> Node? {
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: nodeWaitLimit)
    var last: Node?
    var reported = false
    while true {
        do {
            if case .node(let n) = try await client.get(.nodes, name: name) {
                last = n
                if !needPodCIDRs || !n.podCIDRValues.isEmpty { return n }
            }
        } catch {
            if !reported { logger.warning("reading node \(name): \(error); retrying") }
            reported = true
        }
        if clock.now >= deadline { return last }
        if !reported {
            logger.info("waiting for node \(name)\(needPodCIDRs ? " and its pod CIDRs" : "")")
            reported = true
        }
        try? await Task.sleep(for: .milliseconds(500))
    }
}
