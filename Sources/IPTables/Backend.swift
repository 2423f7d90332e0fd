// Sluice: a per-node Kubernetes service proxy.
// The iptables backend: applies compiled batches with iptables-restore, keeps the base jump
// rules and the canary chains in place, deletes stale chains, and cleans up on request.

import Foundation
import KernelKit
import Logging
import SluiceCore

/// The iptables backend for one IP family.
public actor IPTablesBackend: ProxyBackend {
    public nonisolated let name = "iptables"
    private let tools: IPTablesTools
    private let runner: any CommandRunner
    private let restorer: IPTablesRestorer
    private let jumps: JumpInstaller
    private let logger: Logger
    /// The compiler options in force (random-fully and be_liberal resolved at start-up).
    public let options: IPTablesOptions
    /// The compile memory and the top-level chains as last applied (`IPTablesSyncMemory`):
    /// dropped when a batch is not applied, so that the next sync is full.
    private var remembered = IPTablesSyncMemory()
    /// The last batch applied (of a full sync cut into batches, the top-level one), for
    /// `sluice` debugging and tests.
    public private(set) var lastRestore: String = ""
    /// How a full sync is cut into restore batches.
    public let batching: FullSyncBatching

    /// Creates a backend without probing the host (tests, dry runs).
    public init(options: IPTablesOptions, tools: IPTablesTools, runner: any CommandRunner, logger: Logger,
                batching: FullSyncBatching = .off) {
        self.options = options
        self.tools = tools
        self.runner = runner
        self.restorer = IPTablesRestorer(tools: tools, runner: runner)
        self.jumps = JumpInstaller(tools: tools, runner: runner)
        self.logger = logger
        self.batching = batching
    }

    /// Probes the host (iptables version and flavour, conntrack liberal mode), prepares the
    /// kernel settings localhost NodePorts need, and returns a backend.
    public static func create(node: NodeConfig, family: IPFamily, variant: IPTablesVariant, runner: any CommandRunner,
                              nfacctCounters: Set<String> = [], logger: Logger) async throws -> IPTablesBackend {
        let tools = IPTablesTools(variant: variant, family: family)
        let features = try await IPTablesFeatures.require(tools, runner: runner)
        let liberal = SysctlWriter.read("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal") == 1
        if family == .ipv4 && node.localhostNodePorts {
            switch SysctlWriter().set("net/ipv4/conf/all/route_localnet", 1) {
            case .unchanged: break
            case .changed: logger.info("set net.ipv4.conf.all.route_localnet=1 for localhost NodePorts")
            case .failed: logger.warning("cannot set net.ipv4.conf.all.route_localnet=1: localhost NodePorts will not answer")
            }
        }
        let local = family == .ipv4 ? LocalAddresses.current().filter { $0.family == .ipv4 } : LocalAddresses.current().filter { $0.family == .ipv6 }
        // Full syncs in batches on the nft back end only: a legacy commit rewrites the whole
        // table, so there more batches cost more. For measurements and tests,
        // SLUICE_IPTABLES_BATCH_CHAINS (chains per batch, 0 for one batch) and
        // SLUICE_IPTABLES_PIECE_CHAINS (one batch compiled in pieces above this many chains)
        // override it.
        var batching: FullSyncBatching = features.mode == .nft ? .nft : .off
        let env = ProcessInfo.processInfo.environment
        if let n = env["SLUICE_IPTABLES_BATCH_CHAINS"].flatMap({ Int($0) }) {
            batching = FullSyncBatching(chainsPerBatch: n, compileInPiecesAbove: batching.compileInPiecesAbove)
        }
        if let n = env["SLUICE_IPTABLES_PIECE_CHAINS"].flatMap({ Int($0) }) {
            batching = FullSyncBatching(chainsPerBatch: batching.chainsPerBatch, compileInPiecesAbove: n)
        }
        logger.info("iptables \(features.version) (\(features.mode)), random-fully \(features.randomFully), tcp_be_liberal \(liberal), full sync batches of \(batching.chainsPerBatch) chains")
        var options = IPTablesOptions(node: node, family: family, randomFully: features.randomFully,
                                      conntrackTCPLiberal: liberal, localAddresses: local)
        options.nfacctCounters = nfacctCounters
        return IPTablesBackend(options: options, tools: tools, runner: runner, logger: logger, batching: batching)
    }

    /// The planner: compiler options and batching (the pure half of a sync).
    public var planner: IPTablesPlanner { IPTablesPlanner(options: options, batching: batching) }

    /// Plans (`IPTablesPlanner.plan`) and applies a sync of `state`.
    ///
    /// A partial sync touches a top-level chain only as far as its rules differ from what the
    /// last successful restore wrote to it (kube-proxy always rewrites them; see
    /// docs/iptables-sync.md). A full sync first installs the base chains and jump rules and
    /// reads the per-service chains present, so that stale ones are deleted; with `batching`
    /// on (the nft back end) it is cut into batches (`FullSyncPlan`), because one large
    /// `--noflush` restore costs the square of its size. When a restore fails, the memory is
    /// dropped and the next sync is full, even when asked for a partial one.
    public func sync(_ state: ProxyState, kind requested: SyncKind) async throws -> SyncReport {
        let kind = remembered.effectiveKind(requested)
        var existing: Set<String> = []
        if kind.isFull {
            try await ensureBaseRules()
            existing = try await chainsIn(.nat)
        }
        let plan = planner.plan(state, kind: kind, existingChains: existing, memory: &remembered)
        existing = []
        var bytes = 0
        for i in 0..<plan.restoreCount {
            let step = plan.restore(at: i)
            if let text = step.input.wholeText {
                bytes += text.utf8.count
                if !text.isEmpty { try await restore(step.input, operation: step.operation) }
                if step.isLastRestore { lastRestore = text }
            } else {
                // Made as it is written: counted on the way.
                let written = ByteCount()
                try await restore(step.input.counted(into: written), operation: step.operation)
                bytes += written.value
            }
        }
        if plan.restoreCount > 1 { logger.debug("full sync in \(plan.restoreCount) batches") }
        remembered.appliedTopLevel = plan.topLevelAfter
        remembered.fullSyncNeeded = false
        if !plan.compiled.deletedChains.isEmpty {
            logger.debug("deleted \(plan.compiled.deletedChains.count) stale chains")
        }
        return plan.report(bytes: bytes)
    }

    /// Applies one batch with `--noflush`; on failure forgets what was applied, so the next
    /// sync is full.
    private func restore(_ input: CommandInput, operation: String) async throws {
        do {
            try await restorer.restore(input, counters: true, operation: operation)
        } catch {
            remembered.compile.invalidate()
            remembered.appliedTopLevel = TopLevelRules()
            remembered.fullSyncNeeded = true
            throw error
        }
    }

    /// True when a canary chain is gone or a sentinel jump rule is gone: someone deleted our
    /// chains, or flushed the rules of a table (`iptables -t nat -F` keeps every chain, the
    /// canary included, but removes the jumps into ours).
    ///
    /// The checks run concurrently: three `iptables -S KUBE-PROXY-CANARY` (each reads one
    /// chain, not the table) and one `iptables -C` per table of a jump rule from a built-in
    /// chain. A check that could not run or answer (no descriptors, the xtables lock, a
    /// timeout: anything but exit status 0 or 1) proves nothing: it is logged and skipped, never
    /// read as "missing".
    public func externalChangeDetected() async -> Bool {
        let runner = self.runner, iptables = tools.iptables
        let probes = IPTablesBackend.canaryProbes
        let outcomes = await withTaskGroup(of: (Int, CanaryOutcome).self) { group in
            for (i, probe) in probes.enumerated() {
                group.addTask {
                    let r = await runner.run(iptables, IPTablesTools.locked(probe.table, probe.arguments), input: nil)
                    return (i, CanaryOutcome(r))
                }
            }
            var out = [CanaryOutcome](repeating: .present, count: probes.count)
            for await (i, o) in group { out[i] = o }
            return out
        }
        var unknown: [String] = []
        for (probe, outcome) in zip(probes, outcomes) {
            switch outcome {
            case .present: continue
            case .missing:
                logger.warning("\(probe.what) missing from the \(probe.table.rawValue) table: rules were flushed, resyncing fully")
                return true
            case .unknown(let why): unknown.append("\(probe.what) in \(probe.table.rawValue): \(why)")
            }
        }
        if !unknown.isEmpty {
            logger.warning("canary check skipped, could not look: \(unknown.joined(separator: "; "))")
        }
        return false
    }

    /// What the canary check looks at: the canary chain in each table, and one jump rule from
    /// a built-in chain in nat and in filter.
    static let canaryProbes: [(table: Table, arguments: [String], what: String)] = {
        var out: [(table: Table, arguments: [String], what: String)] = [Table.mangle, .nat, .filter].map {
            ($0, ["-S", Chain.canary], "canary chain \(Chain.canary)")
        }
        for (table, source, target) in [(Table.nat, "PREROUTING", Chain.services), (.filter, "FORWARD", Chain.forward)] {
            if let rule = jumpRules.first(where: { $0.table == table && $0.source == source && $0.target == target }) {
                out.append((table, ["-C", rule.source] + rule.ruleArgs, "jump rule \(rule.source) -> \(rule.target)"))
            }
        }
        return out
    }()

    /// What one canary probe found.
    enum CanaryOutcome: Equatable {
        case present
        case missing
        /// The probe could not tell (it did not start, was killed, or failed otherwise).
        case unknown(String)

        /// Exit status 0: present; 1: iptables' "no such chain" / "bad rule"; anything else,
        /// a timeout, or a failure to start: unknown.
        init(_ result: Result<CommandResult, CommandError>) {
            switch result {
            case .failure(let e): self = .unknown(e.description)
            case .success(let r) where r.timedOut: self = .unknown("timed out")
            case .success(let r) where r.status == 0: self = .present
            case .success(let r) where r.status == 1: self = .missing
            case .success(let r): self = .unknown("exit status \(r.status): \(r.stderr.trimmingASCIIWhitespace())")
            }
        }
    }

    /// Creates our top-level chains and the canaries, and inserts the jump rules from the
    /// built-in chains when they are missing (idempotent, like kube-proxy's EnsureRule).
    private func ensureBaseRules() async throws {
        var chains: [(Table, String)] = [(.mangle, Chain.canary), (.nat, Chain.canary), (.filter, Chain.canary)]
        for rule in jumpRules + kubeletJumpRules where !chains.contains(where: { $0 == (rule.table, rule.target) }) {
            chains.append((rule.table, rule.target))
        }
        for (table, chain) in chains { try await jumps.ensureChain(chain, in: table) }
        for rule in jumpRules + kubeletJumpRules { try await jumps.ensureJump(rule) }
    }

    /// Chain names currently in `table`.
    private func chainsIn(_ table: Table) async throws -> Set<String> {
        try await restorer.chains(in: table)
    }

    /// Chain names declared in `iptables-save` output.
    public static func parseChains(_ save: String) -> Set<String> { IPTablesRestorer.parseChains(save) }

    /// What the iptables mode owns: the jumps from the built-in chains (kube-proxy's and the
    /// kubelet's KUBE-FIREWALL ones), its top-level chains, the canaries and every per-service
    /// chain, in the nat, filter and mangle tables. The userspace mode declares its own.
    public static let footprint = IPTablesFootprint(jumps: jumpRules + kubeletJumpRules, tables: [.nat, .filter, .mangle]) { _, chain in
        ownedTopLevel.contains(chain) || Chain.isServiceChain(chain)
    }

    private static let ownedTopLevel: Set<String> = Set(Chain.filterTopLevel + Chain.natTopLevel + [Chain.kubeletFirewall, Chain.canary])

    /// Removes every rule and chain Sluice or kube-proxy created in iptables mode: the jump
    /// rules from the built-in chains, then every KUBE- chain of ours in one restore per table.
    public func cleanup() async throws {
        let logger = self.logger
        try await restorer.remove(IPTablesBackend.footprint) { table, n in
            logger.info("removed \(n) chains from the \(table.rawValue) table")
        }
        remembered = IPTablesSyncMemory()
        remembered.fullSyncNeeded = true
    }
}

/// The filter and nat tables' rule counts as a ``SyncReport`` holds them.
func ruleCounts(_ count: (Table) -> Int) -> [SyncCount: Int] {
    [.iptablesRules(.filter): count(.filter), .iptablesRules(.nat): count(.nat)]
}
