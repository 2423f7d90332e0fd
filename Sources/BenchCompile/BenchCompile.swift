// Sluice benchmark helper: `sluice-bench-compile`, the harness's window on the pure half of
// a sync. It reads a manifest directory exactly as the running proxy does (same source,
// tracker and compiler, same compiler options as the iptables backend would probe), times the
// model snapshot and the planning in-process, and writes each payload to a file so the
// harness can time the kernel tool on the very same bytes. See benchmarks/README.md.
//
// It is not part of the product: `sluice` does not ship it. The iptables payloads come from
// the backend's own planner (`IPTablesPlanner`) with the memory the backend keeps between
// syncs, so compile_s covers what a sync computes before it writes: the compilation with that
// memory and the top-level chains left out when unchanged.

import ArgumentParser
import Foundation
import IPTables
import IPVS
import KernelKit
import KubeAPI
import Logging
import NFTables
import ProxyFlags
import SluiceCore

/// The modes whose compilation the benchmark times.
enum BenchMode: String, ExpressibleByArgument, CaseIterable {
    case iptables, ipvs, nftables
}

/// A failure to report on standard error (exit status 1).
struct BenchExit: Error, CustomStringConvertible {
    var description: String
    init(_ message: String) { description = message }
}

/// `sluice-bench-compile`: compile a manifest directory, then one partial sync per `step`.
/// With `--proxy-mode ipvs` every step compiles the whole desired IPVS state (the IPVS
/// backend diffs that against the kernel), and the payload file holds its dry-run text.
/// With `--proxy-mode nftables` a step compiles the changed Services into the previous
/// step's ruleset and the payload is the partial `nft -f` transaction the backend would send
/// (the full transaction for the first step).
///
/// Protocol: after start-up it plans a full sync and prints one JSON line. Then, for every
/// line `step NAME` on standard input (the harness changes the directory in between), it rescans
/// the directory, folds the events into the tracker, plans a partial sync of the changed
/// Services against what the previous step left (as the backend does) and prints one JSON
/// line. `full NAME` plans a full sync of the current state instead. EOF or `quit` ends it.
///
/// The flags that bear on compilation are the proxy's, with the proxy's defaults.
@main
struct BenchCompile: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sluice-bench-compile",
        abstract: "Time the model snapshot and the rule compilation for a manifest directory (benchmark harness).")

    @Option(help: "The proxy mode whose compilation is timed: iptables, ipvs or nftables.")
    var proxyMode: BenchMode = .iptables

    @Option(help: ArgumentHelp("The manifest directory (Services, EndpointSlices, Endpoints, Nodes).", valueName: "dir"))
    var manifests: String

    /// The proxy's node flags (`--hostname-override`, `--node-ip`, `--cluster-cidr`,
    /// `--masquerade-all`, `--nodeport-addresses`, `--iptables-*`), as `sluice` has them.
    @OptionGroup var node: NodeOptions

    @Option(help: ArgumentHelp("IPVS scheduler.", valueName: "name"))
    var ipvsScheduler: String = "rr"

    @Option(help: ArgumentHelp("IPVS mode: comma-separated CIDRs whose virtual servers are never deleted.", valueName: "cidrs"))
    var ipvsExcludeCidrs: String?

    @Option(help: ArgumentHelp("Proxy Services labelled service.kubernetes.io/service-proxy-name with this value.", valueName: "name"))
    var serviceProxyName: String?

    @Option(name: .shortAndLong, help: "Log verbosity: 0 info, 4 and above debug.")
    var v: Int = 0

    @Option(help: ArgumentHelp("Write each payload to DIR/NAME.txt (the full one as full.txt).", valueName: "dir"))
    var out: String?

    @Option(help: "Compile each state this many times (the timings of every run are printed).")
    var repeatCount: Int = 5

    @Option(name: .customLong("compiler-options"),
            help: ArgumentHelp("probe (as the backend does: iptables version, conntrack, local addresses) or fixed (random-fully, no probing).", valueName: "how"))
    var compilerOptionsMode: String = "probe"

    func run() async throws {
        let verbosity = v
        LoggingSystem.bootstrap { label in
            var h = EscapingLogHandler(StreamLogHandler.standardError(label: label))
            h.logLevel = verbosity >= 4 ? .debug : .info
            return h
        }
        let logger = Logger(label: "sluice-bench-compile")
        guard repeatCount >= 1 else { throw BenchExit("--repeat-count must be at least 1") }
        // The node configuration as the proxy derives it from the same flags (local pods by
        // --cluster-cidr, the proxy's default; no --bind-address).
        let node = try self.node.nodeConfig()
        let dir = manifests
        let compilerOptions: IPTablesOptions
        if compilerOptionsMode == "fixed" || proxyMode == .ipvs || proxyMode == .nftables {
            compilerOptions = IPTablesOptions(node: node, family: .ipv4, randomFully: true)
        } else {
            do {
                let backend = try await IPTablesBackend.create(node: node, family: .ipv4, variant: self.node.iptablesBackend,
                                                               runner: ProcessRunner(), logger: logger)
                compilerOptions = await backend.options
            } catch {
                throw BenchExit("cannot probe iptables: \(error)")
            }
        }
        // The iptables payloads are single restores, as the legacy back end's full sync (the
        // nft back end's batched full sync writes the same rules in several restores).
        let planner = IPTablesPlanner(options: compilerOptions, batching: .classic)
        // The IPVS backend's planner, with the node IPs as the node's addresses (as `sluice
        // compile --proxy-mode ipvs`).
        let ipvsPlanner = IPVSPlanner(options: IPVSOptions(node: node, family: .ipv4, scheduler: ipvsScheduler,
                                                           excludeCIDRs: try parseCIDRList(ipvsExcludeCidrs, flag: "--ipvs-exclude-cidrs"),
                                                           randomFully: compilerOptions.randomFully))
        // nftables: the ruleset the backend keeps between syncs (partial transactions are
        // computed against it); NodePorts on the node's primary IPs unless given, as the
        // nftables mode defaults to.
        var nftNode = node
        if proxyMode == .nftables && self.node.nodeportAddresses == nil {
            nftNode.nodePortAddresses = NFTablesOptions.defaultNodePortAddresses(nodeIPs: node.nodeIPs)
        }
        let nftCompiler = NFTablesCompiler(options: NFTablesOptions(
            node: nftNode, family: .ipv4, localAddresses: Array(Set(node.nodeIPs + LocalAddresses.current())).filter { $0.family == .ipv4 }))
        var nftRuleset: NFTRuleset?
        // Each step's files are complete before the harness asks for the step: no settling.
        let source = ManifestDirectorySource(directory: dir, settle: .zero, logger: logger) { logger.error("\($0.description); skipped") }
        var tracker = ChangeTracker(nodeName: node.nodeName, serviceProxyName: serviceProxyName)
        var snapshot = ManifestDirectorySource.Snapshot()
        var known: Set<String> = []
        // What the iptables backend keeps between syncs: the compile memory and the top-level
        // chains as last written (partial payloads leave out the unchanged ones).
        var remembered = IPTablesSyncMemory()
        let clock = ContinuousClock()

        func write(_ text: String, step name: String) throws {
            guard let out else { return }
            let path = out + "/" + name + ".txt"
            guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8)) else { throw BenchExit("cannot write \(path)") }
        }

        func emit(_ report: [String: Any]) throws {
            let json = try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys])
            FileHandle.standardOutput.write(json + Data("\n".utf8))
        }

        /// Rescans, folds and snapshots; plans `repeatCount` times; writes and reports.
        func step(_ name: String, full: Bool) throws {
            let t0 = clock.now
            let events: [ObjectEvent]
            do {
                (snapshot, events) = try source.scan(from: snapshot)
            } catch {
                throw BenchExit("\(error)")
            }
            let t1 = clock.now
            var applied = 0
            for e in events {
                switch tracker.apply(e) {
                case .applied: applied += 1
                case .ignored: break
                case .rejected(let r): logger.error("\(r.description); skipped")
                }
            }
            _ = tracker.apply(.synced)
            let t2 = clock.now
            let state = tracker.snapshot(.ipv4)
            let kind: SyncKind = full ? .full : .partial(of: state)
            let t3 = clock.now
            var compileTimes: [Double] = []
            var renderTimes: [Double] = []
            var report: [String: Any] = [
                "step": name, "full": full, "events": events.count, "applied": applied,
                "changed_services": kind.services(in: state).count, "service_ports": state.servicePorts.count,
                "endpoints": state.totalEndpoints,
                "scan_s": seconds(t0.duration(to: t1)), "apply_s": seconds(t1.duration(to: t2)),
                "snapshot_s": seconds(t2.duration(to: t3)),
            ]
            switch proxyMode {
            case .nftables:
                // Each run starts from the ruleset the previous step left, as the backend's sync
                // would (the ruleset is copied per run: the compile updates it in place).
                var text = ""
                var next: NFTRuleset?
                var operations = 0
                for _ in 0..<repeatCount {
                    let previous = full ? nil : nftRuleset
                    let c0 = clock.now
                    let result = nftCompiler.compile(state, previous: previous, changed: kind.changed)
                    let c1 = clock.now
                    let tx = result.delta.map { result.ruleset.partialTransaction($0) } ?? result.ruleset.fullTransaction()
                    let c2 = clock.now
                    text = tx.text
                    operations = tx.operationCount
                    next = result.ruleset
                    compileTimes.append(seconds(c0.duration(to: c1)))
                    renderTimes.append(seconds(c1.duration(to: c2)))
                }
                nftRuleset = next
                try write(text, step: name)
                report.merge(["bytes": text.utf8.count, "operations": operations, "written_nat": operations, "written_filter": 0]) { $1 }
            case .ipvs:
                var desired: IPVSDesiredState?
                var text = ""
                for _ in 0..<repeatCount {
                    let c0 = clock.now
                    let d = ipvsPlanner.desired(state, nodeAddresses: node.nodeIPs).desired
                    let c1 = clock.now
                    text = d.dryRunText
                    let c2 = clock.now
                    desired = d
                    compileTimes.append(seconds(c0.duration(to: c1)))
                    renderTimes.append(seconds(c1.duration(to: c2)))
                }
                try write(text, step: name)
                let d = desired!
                report.merge([
                    "bytes": text.utf8.count, "virtual_servers": d.virtualServers.count,
                    "real_servers": d.virtualServers.values.reduce(0) { $0 + $1.destinations.count },
                    "set_entries": d.entries.values.reduce(0) { $0 + $1.count }, "bound_addresses": d.boundAddresses.count,
                    "written_nat": 0, "written_filter": 0,
                ]) { $1 }
            case .iptables:
                var last: IPTablesSyncPlan?
                var text = ""
                var next = remembered
                for _ in 0..<repeatCount {
                    // Every run starts from the memory the previous step left, as the backend's sync would.
                    var m = remembered.independentCopy()
                    let c0 = clock.now
                    let plan = planner.plan(state, kind: kind, existingChains: known, memory: &m)
                    let c1 = clock.now
                    text = plan.restore(at: 0).text
                    let c2 = clock.now
                    last = plan
                    next = m
                    compileTimes.append(seconds(c0.duration(to: c1)))
                    renderTimes.append(seconds(c1.duration(to: c2)))
                }
                let plan = last!
                let compiled = plan.compiled
                known = compiled.activeNATChains
                remembered = next
                remembered.appliedTopLevel = plan.topLevelAfter
                try write(text, step: name)
                report.merge([
                    "bytes": text.utf8.count,
                    "written_nat": compiled.writtenRules(Table.nat),
                    "written_filter": compiled.writtenRules(Table.filter),
                    "total_nat": compiled.totalRules[Table.nat] ?? 0,
                    "total_filter": compiled.totalRules[Table.filter] ?? 0,
                    "deleted_chains": compiled.deletedChains.count,
                    "large_cluster": compiled.largeClusterMode,
                ]) { $1 }
            }
            report["compile_s"] = compileTimes
            report["render_s"] = renderTimes
            try emit(report)
        }

        try step("full", full: true)
        while let line = readLine() {
            let words = line.split(separator: " ").map(String.init)
            guard let verb = words.first else { continue }
            if words.count == 2, !words[1].allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) {
                throw BenchExit("sluice-bench-compile: step names are letters, digits, - and _")
            }
            switch (verb, words.count) {
            case ("quit", _): return
            case ("step", 2): try step(words[1], full: false)
            case ("full", 2): try step(words[1], full: true)
            default: throw BenchExit("sluice-bench-compile: unknown command \"\(Validation.printable(line))\" (want: step NAME, full NAME, quit)")
            }
        }
    }
}

private func seconds(_ d: Duration) -> Double {
    let (s, atto) = d.components
    return Double(s) + Double(atto) / 1e18
}
