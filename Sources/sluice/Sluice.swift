// Sluice: a per-node Kubernetes service proxy.
// The executable: `sluice` runs the proxy, `sluice compile` prints what it would program,
// `sluice --cleanup` removes everything a proxy left behind.

import ArgumentParser
import Dispatch
import Foundation
import IPTables
import KernelKit
import KubeAPI
import Logging
import ServiceLifecycle
import SluiceCore

/// The version printed by `--version`.
let sluiceVersion = "0.1.0"

@main
struct Sluice: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sluice",
        abstract: "A per-node Kubernetes service proxy: a drop-in replacement for kube-proxy.",
        version: sluiceVersion,
        subcommands: [Compile.self, NFTApply.self, Explain.self, Diff.self])

    @OptionGroup var options: ProxyOptions

    /// `--drift-check-period` (ExplainDiff.swift).
    @OptionGroup var drift: DriftCheckOptions

    @Flag(help: "Remove every chain and rule Sluice or kube-proxy created, then exit.")
    var cleanup = false

    @Option(help: ArgumentHelp("Write the effective configuration (flags and --config) as a KubeProxyConfiguration to this file, then exit.", valueName: "file"))
    var writeConfigTo: String?

    func run() async throws {
        let resolved = try self.options.resolvedConfiguration()
        var options = resolved.options
        let logger = makeLogger(verbosity: options.v)
        signal(SIGPIPE, SIG_IGN)
        reportUnhonouredFields(resolved.unhonoured, path: options.config, logger: logger)
        if let path = writeConfigTo {
            do {
                try ConfigFile.render(options, document: resolved.document).write(toFile: path, atomically: true, encoding: .utf8)
            } catch {
                throw SluiceExit("cannot write the configuration to \(path): \(error)")
            }
            logger.info("wrote the effective configuration to \(path)")
            return
        }
        if cleanup {
            try await runCleanup(options: options, logger: logger)
            return
        }
        if options.initOnly {
            runPrivilegedStartup(options: options, logger: logger)
            logger.info("--init-only: start-up settings applied; exiting")
            return
        }
        let plan = try await makeSource(options: options, logger: logger)
        // After the source is set up (a bad kubeconfig or directory ends the process before
        // anything on the host is read or changed), as kube-proxy does.
        runPrivilegedStartup(options: options, logger: logger)
        options.iptablesBackend = await chooseIPTablesBackend(options.iptablesBackend, logger: logger)
        let node = nftablesNodeConfig(plan.node, options: options)
        let source = plan.events
        logger.info("sluice \(sluiceVersion) starting: mode \(options.proxyMode.rawValue), node \(node.nodeName), node IPs \(node.nodeIPs.map(\.description).joined(separator: ","))")
        let observability = try makeObservability(options: options, node: node, document: resolved.document, logger: logger)
        await cleanupOtherModes(options: options, logger: logger)
        var runners: [SyncRunner<ContinuousClock>] = []
        var services: [any ServiceLifecycle.Service] = []
        // Userspace mode relays IPv4 only (its portal rules are iptables rules).
        let families = options.proxyMode == .userspace ? [IPFamily.ipv4] : node.families
        for family in families {
            let mode = try await makeMode(options: options, node: node, family: family, metrics: observability.metrics, logger: logger)
            let driftWatch = await makeDriftWatch(drift, options: options, node: node, family: family, logger: logger)
            let runner = SyncRunner(tracker: ChangeTracker(nodeName: node.nodeName, serviceProxyName: options.serviceProxyName),
                                    backend: mode.backend, family: family, timing: options.timing, clock: ContinuousClock(),
                                    logger: logger, observers: observability.instrument(mode.observers) + observability.observers + driftWatch.observers,
                                    recorders: observability.recorders)
            runners.append(runner)
            services += [RunnerService(runner: runner)] + mode.services(runner) + driftWatch.services
        }
        if families.count > 1 { logger.info("dual-stack: one proxier per family (\(node.families.map(\.rawValue).joined(separator: ", ")))") }
        services = [SourcePump(events: source, runners: runners, families: families, logger: logger)] + services + observability.services
        if let path = options.config { services.append(ConfigFileWatch(path: path, logger: logger)) }
        let signals = SignalHandlers(runners: runners, logger: logger)
        defer { withExtendedLifetime(signals) {} }
        let group = ServiceGroup(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        try await group.run()
        logger.info("stopped; the rules stay in place")
    }

    private func runCleanup(options: ProxyOptions, logger: Logger) async throws {
        // IPVS mode first: it removes its services, sets, device and own chains, and empties the
        // chains it shares with iptables mode, which the iptables clean-up below then deletes.
        var failures = await runIPVSCleanup(options: options, logger: logger)
        failures += await runIPTablesCleanup(options: options, logger: logger)
        failures += runNFTablesCleanup(logger: logger)
        if !failures.isEmpty { throw SluiceExit("cleanup incomplete: " + failures.joined(separator: "; ")) }
        logger.info("cleanup done")
    }
}

/// `sluice compile`: prints the iptables-restore input of a full sync for the manifests.
struct Compile: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print what a full sync would program for a manifest directory (a dry run): the iptables-restore input, with --proxy-mode ipvs the IPVS services, ipset members and iptables rules, or with --proxy-mode nftables the `nft -f` transaction.",
        discussion: "With --proxy-mode userspace it prints the portal rules; relay ports are assigned from 32768 in service-port order, as stand-ins for the ports a running proxy gets from the kernel.")

    @OptionGroup var options: ProxyOptions

    @Option(help: ArgumentHelp("Add --random-fully to MASQUERADE: auto (ask the installed iptables), true or false.", valueName: "mode"))
    var randomFully: RandomFullyMode = .auto

    func run() async throws {
        let options = try self.options.resolved()
        let logger = makeLogger(verbosity: options.v)
        guard let dir = options.manifests else { throw SluiceExit("compile needs --manifests DIR") }
        let node = try options.nodeConfig()
        var tracker = ChangeTracker(nodeName: node.nodeName, serviceProxyName: options.serviceProxyName)
        let source = ManifestDirectorySource(directory: dir, logger: logger) { logger.error("\($0.description); skipped") }
        let events: [ObjectEvent]
        do {
            events = try source.scan(from: .init()).1
        } catch {
            throw SluiceExit("\(error)")
        }
        for e in events {
            if case .rejected(let r) = tracker.apply(e) { logger.error("\(r.description); skipped") }
        }
        if options.proxyMode == .userspace {
            FileHandle.standardOutput.write(Data(try userspaceDryRun(state: tracker.snapshot(.ipv4), node: node).utf8))
            return
        }
        let liberal = SysctlWriter.read("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal") == 1
        // One batch per family; a dual-stack node's ip6tables batch follows, after a comment
        // line (iptables-restore ignores comments).
        for family in node.families {
            let state = tracker.snapshot(family)
            let rf = await randomFully.resolve(IPTablesTools(variant: options.iptablesBackend, family: family), runner: ProcessRunner())
            if options.proxyMode == .nftables {
                let node = nftablesNodeConfig(node, options: options)
                FileHandle.standardOutput.write(Data(nftablesDryRun(node: node, family: family, state: state).utf8))
                continue
            }
            if options.proxyMode == .ipvs {
                if family != node.families.first { FileHandle.standardOutput.write(Data("# \(family.rawValue)\n".utf8)) }
                let text = try ipvsDryRun(options: options, node: node, family: family, state: state, randomFully: rf)
                FileHandle.standardOutput.write(Data(text.utf8))
                continue
            }
            var opts = IPTablesOptions(node: node, family: family, randomFully: rf, conntrackTCPLiberal: liberal,
                                       localAddresses: LocalAddresses.current().filter { $0.family == family })
            // As the running proxy: the nfacct objects that exist are counted into.
            opts.nfacctCounters = await existingNFAcctCounters()
            // What the backend's first sync writes into empty tables: its planner's full plan.
            var memory = IPTablesSyncMemory()
            let plan = IPTablesPlanner(options: opts, batching: .classic).plan(state, kind: .full, existingChains: [], memory: &memory)
            if family != node.families.first { FileHandle.standardOutput.write(Data("# \(IPTablesTools(variant: .auto, family: family).restore) input\n".utf8)) }
            FileHandle.standardOutput.write(Data(plan.restore(at: 0).text.utf8))
        }
    }
}

/// An error that ends the process with one clear line and a non-zero status.
struct SluiceExit: Error, CustomStringConvertible {
    var description: String
    init(_ message: String) { description = message }
}

/// Logs to stderr, one line per event. Control characters (from names in manifest files and
/// API objects) are escaped, so no log line can be forged or split.
func makeLogger(verbosity: Int) -> Logger {
    LoggingSystem.bootstrap { label in
        var h = EscapingLogHandler(StreamLogHandler.standardError(label: label))
        h.logLevel = verbosity >= 6 ? .trace : (verbosity >= 4 ? .debug : .info)
        return h
    }
    return Logger(label: "sluice")
}

/// Feeds source events into the runner.
struct SourcePump: ServiceLifecycle.Service {
    let events: @Sendable () -> AsyncThrowingStream<ObjectEvent, Error>
    /// One runner per IP family; every event goes to each.
    let runners: [SyncRunner<ContinuousClock>]
    /// The families the runners proxy.
    let families: [IPFamily]
    let logger: Logger

    func run() async throws {
        try await untilShutdown {
            var unproxied = UnproxiedFamilies(families: families)
            for try await event in events() {
                if let line = unproxied.note(event) { logger.warning("\(line)") }
                for runner in runners { await runner.handle(event) }
            }
        }
    }
}

/// Notices Services whose cluster IPs are all of a family this node does not proxy (an
/// IPv6-only Service on an IPv4-only node): no runner programs them, so one log line says so,
/// once per Service until it changes.
struct UnproxiedFamilies {
    let families: [IPFamily]
    private var reported: [NamespacedName: [String]] = [:]

    init(families: [IPFamily]) { self.families = families }

    /// The line to log for `event`, if any.
    mutating func note(_ event: ObjectEvent) -> String? {
        switch event {
        case .serviceUpserted(let svc):
            let ips = svc.clusterIPs.compactMap(IPAddress.init)
            guard !ips.isEmpty, !ips.contains(where: { families.contains($0.family) }) else {
                reported[svc.key] = nil
                return nil
            }
            if reported[svc.key] == svc.clusterIPs { return nil }
            reported[svc.key] = svc.clusterIPs
            let theirs = Set(ips.map(\.family.rawValue)).sorted().joined(separator: ", ")
            return "service \(svc.key) has only \(theirs) cluster IPs (\(svc.clusterIPs.joined(separator: ", "))) and this node proxies \(families.map(\.rawValue).joined(separator: ", ")) only: it is not programmed"
        case .serviceDeleted(let key):
            reported[key] = nil
            return nil
        default:
            return nil
        }
    }
}

/// SIGHUP and SIGQUIT, as docs/operations-signals.md describes: SIGHUP logs a line and asks
/// every runner for a full resync; SIGQUIT logs a line with each runner's sync counters and
/// exits at once with status 131, leaving the rules in place (SIGTERM and SIGINT stop
/// gracefully through the service group).
final class SignalHandlers: @unchecked Sendable {
    private let sources: [any DispatchSourceSignal]

    init(runners: [SyncRunner<ContinuousClock>], logger: Logger) {
        signal(SIGHUP, SIG_IGN)
        signal(SIGQUIT, SIG_IGN)
        let hup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: .global())
        hup.setEventHandler {
            logger.info("received SIGHUP: resyncing every rule now (the manifest directory is rescanned continuously)")
            Task { for r in runners { await r.requestFullSync() } }
        }
        let quit = DispatchSource.makeSignalSource(signal: SIGQUIT, queue: .global())
        quit.setEventHandler {
            let done = DispatchSemaphore(value: 0)
            Task {
                var parts: [String] = []
                for r in runners {
                    let c = await r.counters
                    parts.append("\(c.syncs) syncs (\(c.fullSyncs) full), \(c.failures) failures" + (c.lastError.map { ", last error: \($0)" } ?? ""))
                }
                logger.warning("received SIGQUIT: exiting now without a graceful shutdown; the rules stay in place; \(parts.joined(separator: "; "))")
                done.signal()
            }
            _ = done.wait(timeout: .now() + .seconds(2))
            _exit(131)
        }
        hup.resume()
        quit.resume()
        sources = [hup, quit]
    }

    deinit { for s in sources { s.cancel() } }
}

/// Runs the sync loop.
struct RunnerService: ServiceLifecycle.Service {
    let runner: SyncRunner<ContinuousClock>

    func run() async throws {
        try await untilShutdown {
            await runner.run()
        }
    }
}

/// Polls the canary chains and asks for a full sync when they vanish.
struct CanaryMonitor: ServiceLifecycle.Service {
    let backend: any ProxyBackend
    let runner: SyncRunner<ContinuousClock>
    let interval: Duration

    func run() async throws {
        try await untilShutdown {
            while !Task.isCancelled {
                try await Task.sleep(for: interval)
                if await runner.counters.syncs > 0, await backend.externalChangeDetected() {
                    await runner.requestFullSync()
                }
            }
        }
    }
}

/// Runs `body` until it ends or a graceful shutdown (SIGTERM/SIGINT) cancels it; the
/// cancellation itself is a clean stop, not an error.
func untilShutdown(_ body: @escaping @Sendable () async throws -> Void) async throws {
    do {
        try await cancelWhenGracefulShutdown { try await body() }
    } catch is CancellationError {
        return
    }
}
