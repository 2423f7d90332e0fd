// Sluice: a per-node Kubernetes service proxy.
// `sluice bench-compile` (hidden): the benchmark harness's window on the pure half of a sync.
// It reads a manifest directory exactly as the running proxy does (same source, tracker and
// compiler, same compiler options as the iptables backend would probe), times the model
// snapshot and the compilation in-process, and writes each restore payload to a file so the
// harness can time `iptables-restore` of the very same bytes. See benchmarks/README.md.
// Like the iptables backend, it keeps the compile memory and the top-level chains between
// steps: compile_s covers the compilation with that memory and leaving out the unchanged
// top-level chains, and a partial payload is what the backend would restore.

import ArgumentParser
import Foundation
import IPTables
import IPVS
import KernelKit
import KubeAPI
import Logging
import NFTables
import SluiceCore

/// `sluice bench-compile`: compile a manifest directory, then one partial sync per `step`.
/// With `--proxy-mode ipvs` every step compiles the whole desired IPVS state (the IPVS
/// backend diffs that against the kernel), and the payload file holds its dry-run text.
/// With `--proxy-mode nftables` a step compiles the changed Services into the previous
/// step's ruleset and the payload is the partial `nft -f` transaction the backend would send
/// (the full transaction for the first step).
///
/// Protocol: after start-up it compiles a full sync and prints one JSON line. Then, for every
/// line `step NAME` on standard input (the harness changes the directory in between), it rescans
/// the directory, folds the events into the tracker, compiles a partial sync of the changed
/// Services against the chains the previous step left (as the backend does) and prints one JSON
/// line. `full NAME` compiles a full sync of the current state instead. EOF or `quit` ends it.
struct BenchCompile: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-compile",
        abstract: "Time the model snapshot and the rule compilation for a manifest directory (benchmark harness).",
        shouldDisplay: false)

    @OptionGroup var options: ProxyOptions

    @Option(help: ArgumentHelp("Write each payload to DIR/NAME.txt (the full one as full.txt).", valueName: "dir"))
    var out: String?

    @Option(help: "Compile each state this many times (the timings of every run are printed).")
    var repeatCount: Int = 5

    @Option(name: .customLong("compiler-options"),
            help: ArgumentHelp("probe (as the backend does: iptables version, conntrack, local addresses) or fixed (random-fully, no probing).", valueName: "how"))
    var compilerOptionsMode: String = "probe"

    func run() async throws {
        let options = try self.options.resolved()
        let logger = makeLogger(verbosity: options.v)
        guard options.proxyMode == .iptables || options.proxyMode == .ipvs || options.proxyMode == .nftables else {
            throw SluiceExit("bench-compile --proxy-mode \(options.proxyMode.rawValue) is not available")
        }
        guard let dir = options.manifests else { throw SluiceExit("bench-compile needs --manifests DIR") }
        guard repeatCount >= 1 else { throw SluiceExit("--repeat-count must be at least 1") }
        let node = try options.nodeConfig()
        let compilerOptions: IPTablesOptions
        if compilerOptionsMode == "fixed" || options.proxyMode == .ipvs || options.proxyMode == .nftables {
            compilerOptions = IPTablesOptions(node: node, family: .ipv4, randomFully: true)
        } else {
            do {
                let backend = try await IPTablesBackend.create(node: node, family: .ipv4, variant: options.iptablesBackend,
                                                               runner: ProcessRunner(), logger: logger)
                compilerOptions = await backend.options
            } catch {
                throw SluiceExit("cannot probe iptables: \(error)")
            }
        }
        let compiler = IPTablesCompiler(options: compilerOptions)
        var ipvsOptions = IPVSOptions(node: node, family: .ipv4, scheduler: options.ipvsScheduler,
                                      excludeCIDRs: (try? options.ipvsExcludeCIDRList()) ?? [], randomFully: compilerOptions.randomFully)
        ipvsOptions.nodePortAddresses = IPVSOptions.nodePortAddresses(from: node.nodeIPs, node: node, family: .ipv4)
        ipvsOptions.localAddresses = Set(node.nodeIPs)
        let ipvsCompiler = IPVSCompiler(options: ipvsOptions)
        let ipvsMode = options.proxyMode == .ipvs
        // nftables: the ruleset the backend keeps between syncs (partial transactions are
        // computed against it); NodePorts on the node IPs as the proxy in the test network has.
        let nftNode = nftablesNodeConfig(node, options: options)
        let nftCompiler = NFTablesCompiler(options: NFTablesOptions(
            node: nftNode, family: .ipv4, localAddresses: Array(Set(node.nodeIPs + LocalAddresses.current())).filter { $0.family == .ipv4 }))
        var nftRuleset: NFTRuleset?
        // Each step's files are complete before the harness asks for the step: no settling.
        let source = ManifestDirectorySource(directory: dir, settle: .zero, logger: logger) { logger.error("\($0.description); skipped") }
        var tracker = ChangeTracker(nodeName: node.nodeName, serviceProxyName: options.serviceProxyName)
        var snapshot = ManifestDirectorySource.Snapshot()
        var known: Set<String> = []
        // What the iptables backend keeps between syncs: the compile memory and the top-level
        // chains as last written (partial payloads leave out the unchanged ones).
        var memory = IPTablesCompileMemory()
        var appliedTopLevel = TopLevelRules()
        let clock = ContinuousClock()

        /// Rescans, folds and snapshots; compiles `repeatCount` times; writes and reports.
        func step(_ name: String, full: Bool) throws {
            let t0 = clock.now
            let events: [ObjectEvent]
            do {
                (snapshot, events) = try source.scan(from: snapshot)
            } catch {
                throw SluiceExit("\(error)")
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
            var state = tracker.snapshot(.ipv4)
            if full { state.changedServices = Set(state.servicePorts.keys.map(\.service)).union(state.changedServices) }
            let t3 = clock.now
            var compileTimes: [Double] = []
            var renderTimes: [Double] = []
            if options.proxyMode == .nftables {
                // Each run starts from the ruleset the previous step left, as the backend's sync
                // would (the ruleset is copied per run: the compile updates it in place).
                var text = ""
                var next: NFTRuleset?
                var operations = 0
                for _ in 0..<repeatCount {
                    let previous = full ? nil : nftRuleset
                    let c0 = clock.now
                    let result = nftCompiler.compile(state, previous: previous, changed: full ? nil : state.changedServices)
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
                if let out {
                    let path = out + "/" + name + ".txt"
                    guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8)) else { throw SluiceExit("cannot write \(path)") }
                }
                let report: [String: Any] = [
                    "step": name, "full": full, "events": events.count, "applied": applied,
                    "changed_services": state.changedServices.count, "service_ports": state.servicePorts.count,
                    "endpoints": state.totalEndpoints,
                    "scan_s": seconds(t0.duration(to: t1)), "apply_s": seconds(t1.duration(to: t2)),
                    "snapshot_s": seconds(t2.duration(to: t3)), "compile_s": compileTimes, "render_s": renderTimes,
                    "bytes": text.utf8.count, "operations": operations, "written_nat": operations, "written_filter": 0,
                ]
                let json = try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys])
                FileHandle.standardOutput.write(json + Data("\n".utf8))
                return
            }
            if ipvsMode {
                var compileTimes: [Double] = []
                var renderTimes: [Double] = []
                var desired: IPVSDesiredState?
                var text = ""
                for _ in 0..<repeatCount {
                    let c0 = clock.now
                    let d = ipvsCompiler.compile(state)
                    let c1 = clock.now
                    text = d.dryRunText
                    let c2 = clock.now
                    desired = d
                    compileTimes.append(seconds(c0.duration(to: c1)))
                    renderTimes.append(seconds(c1.duration(to: c2)))
                }
                if let out {
                    let path = out + "/" + name + ".txt"
                    guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8)) else { throw SluiceExit("cannot write \(path)") }
                }
                let d = desired!
                let report: [String: Any] = [
                    "step": name, "full": full, "events": events.count, "applied": applied,
                    "changed_services": state.changedServices.count, "service_ports": state.servicePorts.count,
                    "endpoints": state.totalEndpoints,
                    "scan_s": seconds(t0.duration(to: t1)), "apply_s": seconds(t1.duration(to: t2)),
                    "snapshot_s": seconds(t2.duration(to: t3)), "compile_s": compileTimes, "render_s": renderTimes,
                    "bytes": text.utf8.count, "virtual_servers": d.virtualServers.count,
                    "real_servers": d.virtualServers.values.reduce(0) { $0 + $1.destinations.count },
                    "set_entries": d.entries.values.reduce(0) { $0 + $1.count }, "bound_addresses": d.boundAddresses.count,
                    "written_nat": 0, "written_filter": 0,
                ]
                let json = try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys])
                FileHandle.standardOutput.write(json + Data("\n".utf8))
                return
            }
            let kind: SyncKind = full ? .full : .partial(changed: state.changedServices)
            var last: CompiledRules?
            var text = ""
            var nextMemory = memory
            var nextTopLevel = appliedTopLevel
            for _ in 0..<repeatCount {
                // Every run starts from the memory the previous step left, as the backend's sync would.
                var m = memory.independentCopy()
                let c0 = clock.now
                let all = compiler.compile(state, kind: kind, existingChains: known, memory: &m)
                let (compiled, _, topLevel) = all.omittingUnchangedTopLevelChains(full ? TopLevelRules() : appliedTopLevel)
                let c1 = clock.now
                text = compiled.restoreText
                last = compiled
                nextMemory = m
                nextTopLevel = topLevel
                let c2 = clock.now
                compileTimes.append(seconds(c0.duration(to: c1)))
                renderTimes.append(seconds(c1.duration(to: c2)))
            }
            let compiled = last!
            known = compiled.activeNATChains
            memory = nextMemory
            appliedTopLevel = nextTopLevel
            if let out {
                let path = out + "/" + name + ".txt"
                guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8)) else {
                    throw SluiceExit("cannot write \(path)")
                }
            }
            let report: [String: Any] = [
                "step": name,
                "full": full,
                "events": events.count,
                "applied": applied,
                "changed_services": state.changedServices.count,
                "service_ports": state.servicePorts.count,
                "endpoints": state.totalEndpoints,
                "scan_s": seconds(t0.duration(to: t1)),
                "apply_s": seconds(t1.duration(to: t2)),
                "snapshot_s": seconds(t2.duration(to: t3)),
                "compile_s": compileTimes,
                "render_s": renderTimes,
                "bytes": text.utf8.count,
                "written_nat": compiled.writtenRules(Table.nat),
                "written_filter": compiled.writtenRules(Table.filter),
                "total_nat": compiled.totalRules[Table.nat] ?? 0,
                "total_filter": compiled.totalRules[Table.filter] ?? 0,
                "deleted_chains": compiled.deletedChains.count,
                "large_cluster": compiled.largeClusterMode,
            ]
            let json = try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys])
            FileHandle.standardOutput.write(json + Data("\n".utf8))
        }

        try step("full", full: true)
        while let line = readLine() {
            let words = line.split(separator: " ").map(String.init)
            guard let verb = words.first else { continue }
            if words.count == 2, !words[1].allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) {
                throw SluiceExit("bench-compile: step names are letters, digits, - and _")
            }
            switch (verb, words.count) {
            case ("quit", _): return
            case ("step", 2): try step(words[1], full: false)
            case ("full", 2): try step(words[1], full: true)
            default: throw SluiceExit("bench-compile: unknown command \"\(Validation.printable(line))\" (want: step NAME, full NAME, quit)")
            }
        }
    }
}

private func seconds(_ d: Duration) -> Double {
    let (s, atto) = d.components
    return Double(s) + Double(atto) / 1e18
}
