// Sluice: a per-node Kubernetes service proxy.
// nftables mode in the executable: the start-up check, the backend, the clean-up of what the
// other modes leave behind (and theirs of ours), `--cleanup` and `sluice compile`.

import ArgumentParser
import Foundation
import IPTables
import KernelKit
import Logging
import NFTables
import SluiceCore
import Userspace

/// The node configuration as the nftables mode uses it: with no `--nodeport-addresses`
/// (flag or config), NodePorts answer on the node's primary IPs only, as kube-proxy's
/// nftables mode defaults to `primary`.
func nftablesNodeConfig(_ node: NodeConfig, options: ProxyOptions) -> NodeConfig {
    guard options.proxyMode == .nftables, options.nodeportAddresses == nil else { return node }
    var node = node
    node.nodePortAddresses = NFTablesOptions.defaultNodePortAddresses(nodeIPs: node.nodeIPs)
    return node
}

/// Builds the nftables-mode runtime for one family, or fails with one line naming what the
/// kernel or library lacks. It never falls back to another mode.
func makeNFTablesMode(options: ProxyOptions, node: NodeConfig, family: IPFamily, logger: Logger) async throws -> ModeRuntime {
    let lib: LibNFTables
    let kernel: LibNFTablesKernel
    do {
        lib = try LibNFTables()
        try NFTablesSupport.check(lib, families: [NFTFamily(family)])
        kernel = try LibNFTablesKernel(family: NFTFamily(family), lib: lib, child: applyInChild,
                                       netlinkFull: nftFullSyncThroughNetlink(ProcessInfo.processInfo.environment))
    } catch {
        throw SluiceExit("cannot use --proxy-mode nftables: \(error)")
    }
    let backend = NFTablesBackend(compiler: makeNFTablesCompiler(node: node, family: family), kernel: kernel, logger: logger,
                                  chunking: NFTFullSyncChunking.from(environment: ProcessInfo.processInfo.environment))
    return ModeRuntime(backend: backend, observers: [makeConntrackReconciler(node: node, logger: logger)]) { runner in
        [CanaryMonitor(backend: backend, runner: runner, interval: .seconds(5))]
    }
}

/// Whether full syncs go to the kernel as one nf_tables netlink batch
/// (`SLUICE_NFT_FULL_SYNC=netlink` in the environment) or through libnftables (a child
/// process for large transactions; the default: at 10 000 Services × 10 the netlink batch
/// had not finished after 5 min 45 s on 2 December 2026, where libnftables took 197 s).
func nftFullSyncThroughNetlink(_ environment: [String: String]) -> Bool {
    environment["SLUICE_NFT_FULL_SYNC"]?.lowercased() == "netlink"
}

/// Applies a large transaction with `sluice nft-apply` in a child process (the same
/// libnftables call), so the library's parse memory is not the proxy's.
@Sendable func applyInChild(_ text: String, operation: String) async throws {
    do {
        _ = try await ProcessRunner(timeout: nftApplyTimeout(bytes: text.utf8.count)).check("/proc/self/exe", ["nft-apply"], input: text)
    } catch {
        throw NFTablesError(operation: operation, message: error.message.trimmingCharacters(in: .whitespacesAndNewlines),
                            status: error.status ?? -1)
    }
}

/// How long a `sluice nft-apply` child may run: the usual 60 s for a hung tool, or 1 s per
/// 10 KB of transaction when that is longer. The kernel's cost of a full transaction grows
/// faster than its size (anonymous sets): 10 000 Services × 10 endpoints, about 15 MB, take
/// minutes, and a 60 s limit killed every such start-up.
func nftApplyTimeout(bytes: Int) -> Duration {
    max(ProcessRunner.defaultTimeout, .seconds(bytes / 10_000))
}

/// `sluice nft-apply` (hidden): applies the `nft -f` text on standard input as one libnftables
/// transaction; the library's error text goes to standard error and the status is 1.
struct NFTApply: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nft-apply",
        abstract: "Apply an nft -f transaction from standard input with libnftables (used by the nftables mode).",
        shouldDisplay: false)

    func run() throws {
        let text = String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
        do {
            try LibNFTables().run(text, operation: "transaction")
        } catch let e as NFTablesError {
            FileHandle.standardError.write(Data((e.message.isEmpty ? "\(e)" : e.message).utf8 + [0x0A]))
            throw ExitCode(1)
        }
    }
}

/// What a mode removes at start-up, as kube-proxy does: the nftables mode removes the
/// iptables and IPVS modes' chains, IPVS services, ipsets and `kube-ipvs0`; every other
/// mode removes the nftables mode's tables. Failures are logged; start-up goes on.
func cleanupOtherModes(options: ProxyOptions, logger: Logger) async {
    if options.proxyMode == .nftables {
        var failures = await runIPVSCleanup(options: options, logger: logger)
        failures += await runIPTablesCleanup(options: options, logger: logger)
        for f in failures { logger.warning("removing the iptables/IPVS modes' leftovers: \(f)") }
        return
    }
    for f in runNFTablesCleanup(logger: logger) { logger.warning("removing the nftables mode's tables: \(f)") }
}

/// Deletes `table ip kube-proxy` and `table ip6 kube-proxy`; one message per failure.
func runNFTablesCleanup(logger: Logger) -> [String] {
    do {
        return NFTablesBackend.cleanup(lib: try LibNFTables(), logger: logger)
    } catch {
        return ["\(error)"]
    }
}

/// Removes the iptables and userspace modes' chains and jump rules of both families (each
/// mode's own clean-up).
func runIPTablesCleanup(options: ProxyOptions, logger: Logger) async -> [String] {
    var failures: [String] = []
    for family in IPFamily.allCases {
        let tools = IPTablesTools(variant: options.iptablesBackend, family: family)
        guard ProcessRunner().resolve(tools.restore) != nil else {
            logger.info("\(tools.restore) not installed; nothing to clean for \(family.rawValue)")
            continue
        }
        let node = NodeConfig(nodeName: options.nodeName())
        let backend = IPTablesBackend(options: IPTablesOptions(node: node, family: family), tools: tools,
                                      runner: ProcessRunner(), logger: logger)
        do {
            try await backend.cleanup()
        } catch {
            failures.append("\(error)")
        }
        do {
            try await UserspaceBackend.cleanup(tools: tools, runner: ProcessRunner(), logger: logger)
        } catch {
            failures.append("\(error)")
        }
    }
    return failures
}

/// The compiler for one family: the node's own addresses of that family decide which
/// accept NodePorts (`nodeport-ips`).
func makeNFTablesCompiler(node: NodeConfig, family: IPFamily) -> NFTablesCompiler {
    NFTablesCompiler(options: NFTablesOptions(node: node, family: family,
                                              localAddresses: LocalAddresses.current().filter { $0.family == family }))
}

/// `sluice compile --proxy-mode nftables`: the transactions of the full sync the backend
/// sends into an empty table (`nft -f` input; when it is chunked, each transaction after a
/// `# transaction N of M` comment: one `nft -f` of the whole output gives the same table).
/// The plan is the backend's (``NFTFullSyncPlan``), with the same `SLUICE_NFT_CHUNK_SERVICES`.
func nftablesDryRun(node: NodeConfig, family: IPFamily, state: ProxyState) -> String {
    let ruleset = makeNFTablesCompiler(node: node, family: family).compile(state)
    return NFTFullSyncPlan(ruleset: ruleset, chunking: NFTFullSyncChunking.from(environment: ProcessInfo.processInfo.environment)).text()
}
