// Sluice: a per-node Kubernetes service proxy.
// `sluice diff`: what a full sync would write against what the kernel holds now, per Service;
// and the running proxy's periodic drift check (`--drift-check-period`), which exports
// `sluice_kernel_drift_objects` and logs the first differences.

import ArgumentParser
import Foundation
import IPTables
import IPVS
import KernelKit
import Logging
import Metrics
import NFTables
import ServiceLifecycle
import SluiceCore
import Userspace

/// `sluice diff`.
struct Diff: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare the desired state (what `compile` would write) with what the kernel holds now; exit 1 when they differ.",
        discussion: """
            Takes the proxy's source and node flags. iptables mode compares the nat and filter chains Sluice owns, rule by rule, \
            and the jump rules from the built-in chains; nftables mode the kube-proxy table's chains, rules, sets, maps and elements. Read-only: one iptables-save per table (nftables: one nft list table).
            """)

    @OptionGroup var options: ProxyOptions

    @Option(help: ArgumentHelp("text or json.", valueName: "format"))
    var output: ReportFormat = .text

    func run() async throws {
        var options = try self.options.resolved()
        let logger = makeLogger(verbosity: options.v)
        // The back end the proxy itself picks on this host (`auto`: the one holding the rules).
        options.iptablesBackend = await chooseIPTablesBackend(options.iptablesBackend, logger: logger)
        let loaded = try await loadDesiredState(options: options, logger: logger)
        var tracker = loaded.tracker
        let families = options.proxyMode == .userspace ? [IPFamily.ipv4] : loaded.node.families
        var reports: [DriftReport] = []
        for family in families {
            guard let checker = await makeDriftChecker(options: options, node: loaded.node, family: family) else {
                switch options.proxyMode {
                case .ipvs: throw SluiceExit("diff: cannot open the IPVS, ipset or rtnetlink sockets (a kernel with IPVS and root are needed)")
                case .nftables: throw SluiceExit("diff: cannot open libnftables")
                default: throw SluiceExit("diff in userspace mode needs an IPv4 --node-ip")
                }
            }
            do {
                reports.append(try await checker.check(tracker.snapshot(family)))
            } catch {
                throw SluiceExit("\(error)")
            }
        }
        switch output {
        case .json:
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            let doc = DiffDocument(version: 1, clean: reports.allSatisfy(\.isClean), reports: reports)
            FileHandle.standardOutput.write(Data((String(decoding: try enc.encode(doc), as: UTF8.self) + "\n").utf8))
        case .text:
            FileHandle.standardOutput.write(Data(reports.map(renderDrift).joined().utf8))
        }
        if !reports.allSatisfy(\.isClean) { throw ExitCode(1) }
    }
}

/// `sluice diff --output json`.
struct DiffDocument: Codable {
    var version: Int
    /// True when no report has a difference.
    var clean: Bool
    var reports: [DriftReport]
}

/// A drift report as text, grouped by Service port.
func renderDrift(_ report: DriftReport) -> String {
    let head = "\(report.mode) \(report.family.rawValue): "
    guard !report.isClean else { return head + "the kernel holds the desired state\n" }
    var s = head + "\(report.items.count) difference\(report.items.count == 1 ? "" : "s")\n"
    var owner: String?
    for item in report.items {
        if item.owner != owner {
            owner = item.owner
            s += "  \(item.owner.isEmpty ? "(not owned by one Service)" : item.owner)\n"
        }
        switch item.kind {
        case .missing: s += "    missing \(item.object): \(item.want ?? "")\n"
        case .extra: s += "    extra   \(item.object): \(item.have ?? "")\n"
        case .different:
            s += "    changed \(item.object)\n"
            s += "      want: \(item.want ?? "")\n      have: \(item.have ?? "")\n"
        }
    }
    return s
}

/// The drift checker of the selected mode and family (nil when the mode has none yet).
func makeDriftChecker(options: ProxyOptions, node: NodeConfig, family: IPFamily) async -> (any DriftChecking)? {
    if options.proxyMode == .ipvs { return await makeIPVSDriftChecker(options: options, node: node, family: family) }
    switch options.proxyMode {
    case .iptables:
        let opts = await iptablesCompileOptions(options: options, node: node, family: family)
        return IPTablesDriftChecker(options: opts, tools: IPTablesTools(variant: options.iptablesBackend, family: family),
                                    runner: ProcessRunner())
    case .userspace:
        guard family == .ipv4, let nodeIP = node.nodeIPs.first(where: { $0.family == .ipv4 }) else { return nil }
        return UserspaceDriftChecker(nodeIP: nodeIP, nodeName: node.nodeName,
                                     tools: IPTablesTools(variant: options.iptablesBackend, family: family), runner: ProcessRunner())
    case .nftables:
        guard let lib = try? LibNFTables() else { return nil }
        let opts = NFTablesOptions(node: nftablesNodeConfig(node, options: options), family: family,
                                   localAddresses: LocalAddresses.current().filter { $0.family == family })
        return NFTablesDriftChecker(options: opts, reader: NFTablesKernelReader(family: NFTFamily(family), lib: lib))
    case .ipvs:
        // Handled above.
        return nil
    }
}

/// The IPVS drift checker (nil when the IPVS, ipset or rtnetlink sockets cannot be opened).
func makeIPVSDriftChecker(options: ProxyOptions, node: NodeConfig, family: IPFamily) async -> IPVSDriftChecker? {
    do {
        let tools = IPTablesTools(variant: options.iptablesBackend, family: family)
        guard let ipvs = try? await GenericNetlinkIPVSClient.connect(), let links = try? RouteNetlinkClient.connect(),
              let ipsets = try? NetfilterIPSetClient.connect() else { return nil }
        let opts = await iptablesCompileOptions(options: options, node: node, family: family)
        let ipvsOptions = IPVSOptions(node: node, family: family, scheduler: options.ipvsScheduler,
                                      excludeCIDRs: (try? options.ipvsExcludeCIDRList()) ?? [], randomFully: opts.randomFully)
        let config = IPVSBackendConfig(options: ipvsOptions, gracefulPeriod: options.ipvsGracefulDuration, tools: tools)
        return IPVSDriftChecker(config: config, ipvs: ipvs, links: links, ipsets: ipsets, runner: ProcessRunner())
    }
}

// MARK: - the running proxy's drift check

/// `--drift-check-period`.
struct DriftCheckOptions: ParsableArguments {
    @Option(help: ArgumentHelp("How often the running proxy compares the kernel with the desired state, off the sync path (Go duration; 0 turns it off).", valueName: "duration"))
    var driftCheckPeriod = FlagDuration(default: "5m")

    var period: Duration? { driftCheckPeriod.value > .zero ? driftCheckPeriod.value : nil }
}

/// Keeps the state of the last successful sync for the drift check, and counts syncs so that a
/// check overlapping a sync is discarded.
final class LastSyncedState: SyncObserver, @unchecked Sendable {
    private let lock = NSLock()
    private var state: ProxyState?
    private var generation = 0

    func didSync(state: ProxyState, previous: ProxyState?, report: SyncReport) async {
        lock.withLock {
            self.state = state
            generation += 1
        }
    }

    /// The last synced state and its generation.
    var current: (ProxyState?, Int) { lock.withLock { (state, generation) } }
}

/// The drift check of one family: an observer for the runner and a service that checks every period.
struct DriftWatch {
    var observers: [any SyncObserver] = []
    var services: [any ServiceLifecycle.Service] = []
}

/// Builds the drift check for one family (nothing when it is off or the mode has no checker).
func makeDriftWatch(_ drift: DriftCheckOptions, options: ProxyOptions, node: NodeConfig, family: IPFamily,
                    logger: Logger) async -> DriftWatch {
    guard let period = drift.period else { return DriftWatch() }
    guard let checker = await makeDriftChecker(options: options, node: node, family: family) else {
        let why: String
        switch options.proxyMode {
        case .ipvs: why = " (IPVS, ipset or rtnetlink sockets cannot be opened)"
        case .nftables: why = " (libnftables cannot be opened)"
        default: why = " without an IPv4 node IP"
        }
        logger.info("drift check: not available in \(options.proxyMode.rawValue) mode\(why)")
        return DriftWatch()
    }
    let last = LastSyncedState()
    return DriftWatch(observers: [last], services: [DriftMonitor(checker: checker, last: last, period: period, family: family, logger: logger)])
}

/// Compares the kernel with the last synced state every `period` and exports the count.
struct DriftMonitor: ServiceLifecycle.Service {
    /// The gauge's name.
    static let metricName = "sluice_kernel_drift_objects"
    let checker: any DriftChecking
    let last: LastSyncedState
    let period: Duration
    let family: IPFamily
    let logger: Logger

    func run() async throws {
        let gauge = Gauge(label: DriftMonitor.metricName, dimensions: [("mode", checker.mode), ("ip_family", family.rawValue)])
        try await untilShutdown {
            var previous: [DriftItem]?
            while !Task.isCancelled {
                try await Task.sleep(for: period)
                let (state, generation) = last.current
                guard let state else { continue }
                let report: DriftReport
                do {
                    // A check at 10 000 Services reads the whole table for tens of seconds and
                    // cannot stop half way: a shutdown does not wait for it.
                    report = try await abandoningOnCancellation { try await checker.check(state) }
                } catch {
                    if Task.isCancelled { return }
                    logger.warning("drift check failed: \(error)")
                    continue
                }
                // A sync ran while the kernel was read: the comparison is not meaningful.
                guard last.current.1 == generation else { continue }
                gauge.record(report.items.count)
                if report.items != previous {
                    if report.isClean {
                        if previous != nil { logger.info("drift check: the kernel holds the desired state again") }
                    } else {
                        let first = report.items.prefix(5).map { "\($0.owner.isEmpty ? "" : $0.owner + ": ")\($0)" }.joined(separator: " | ")
                        logger.warning("drift check (\(checker.mode) \(family.rawValue)): \(report.items.count) objects differ from the desired state; first: \(first)")
                    }
                    previous = report.items
                }
            }
        }
    }
}
