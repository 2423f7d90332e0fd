// Sluice: a per-node Kubernetes service proxy.
// The iptables backend: applies compiled batches with iptables-restore, keeps the base jump
// rules and the canary chains in place, deletes stale chains, and cleans up on request.

import Foundation
import Logging
import SluiceCore

/// Which iptables binaries to call.
public enum IPTablesVariant: String, Sendable, Hashable, CaseIterable {
    /// Whatever `iptables` is on this host (Debian's alternatives pick nft by default).
    case auto
    /// `iptables-nft*`.
    case nft
    /// `iptables-legacy*`.
    case legacy
}

/// The three binaries of one iptables flavour and family.
public struct IPTablesTools: Sendable, Hashable {
    public var iptables: String
    public var restore: String
    public var save: String

    /// Tool names for a variant and family.
    public init(variant: IPTablesVariant, family: IPFamily) {
        let base = family == .ipv4 ? "iptables" : "ip6tables"
        let suffix = variant == .auto ? "" : "-\(variant.rawValue)"
        iptables = base + suffix
        restore = base + suffix + "-restore"
        save = base + suffix + "-save"
    }
}

/// A failure of the iptables backend, with the tool's own message.
public struct IPTablesError: Error, Sendable, CustomStringConvertible {
    /// What the backend was doing.
    public var operation: String
    /// The failed command.
    public var underlying: CommandError

    public var description: String { "\(operation): \(underlying)" }
}

/// Facts about the installed iptables, read once at start-up.
public struct IPTablesFeatures: Sendable, Hashable {
    /// e.g. "1.8.9".
    public var version: String
    /// "nf_tables" or "legacy".
    public var mode: String
    /// `--random-fully` is supported (>= 1.6.2).
    public var randomFully: Bool

    /// Parses `iptables --version` output such as `iptables v1.8.9 (nf_tables)`.
    public static func parse(_ text: String) -> IPTablesFeatures? {
        guard let vRange = text.range(of: " v") else { return nil }
        let rest = text[vRange.upperBound...]
        let version = String(rest.prefix { $0.isNumber || $0 == "." })
        let nums = version.split(separator: ".").compactMap { Int($0) }
        guard nums.count >= 2 else { return nil }
        let mode = text.contains("nf_tables") ? "nf_tables" : "legacy"
        let padded = nums + [0, 0, 0]
        let atLeast162 = (padded[0], padded[1], padded[2]) >= (1, 6, 2)
        return IPTablesFeatures(version: version, mode: mode, randomFully: atLeast162)
    }
}

/// The iptables backend for one IP family.
public actor IPTablesBackend: ProxyBackend {
    public nonisolated let name = "iptables"
    private let tools: IPTablesTools
    private let runner: any CommandRunner
    private let logger: Logger
    /// The compiler options in force (random-fully and be_liberal resolved at start-up).
    public let options: IPTablesOptions
    /// Chain names and every service port's top-level rules and chains from the last compile,
    /// so that a partial compile works only through the changed Services. Invalidated when a
    /// batch is not applied.
    private var memory = IPTablesCompileMemory()
    /// The top-level chains as the last successful restore left them (empty after a failure or
    /// a cleanup): a partial sync leaves out those it would write unchanged.
    private var appliedTopLevel = TopLevelRules()
    /// A restore failed: the next sync is full whatever the caller asks.
    private var fullSyncNeeded = false
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
        self.logger = logger
        self.batching = batching
    }

    /// Probes the host (iptables version and flavour, conntrack liberal mode), prepares the
    /// kernel settings localhost NodePorts need, and returns a backend.
    public static func create(node: NodeConfig, family: IPFamily, variant: IPTablesVariant, runner: any CommandRunner,
                              nfacctCounters: Set<String> = [], logger: Logger) async throws -> IPTablesBackend {
        let tools = IPTablesTools(variant: variant, family: family)
        let versionOut: CommandResult
        do {
            versionOut = try await runner.check(tools.iptables, ["--version"])
        } catch {
            throw IPTablesError(operation: "probing \(tools.iptables)", underlying: error)
        }
        guard let features = IPTablesFeatures.parse(versionOut.stdout + versionOut.stderr) else {
            throw IPTablesError(operation: "probing \(tools.iptables)",
                                underlying: CommandError(command: "\(tools.iptables) --version", status: 0, message: "unrecognised version text"))
        }
        let liberal = (try? String(contentsOfFile: "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal", encoding: .utf8))?
            .trimmingASCIIWhitespace() == "1"
        if family == .ipv4 && node.localhostNodePorts {
            let path = "/proc/sys/net/ipv4/conf/all/route_localnet"
            if (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingASCIIWhitespace() != "1" {
                if (try? "1\n".write(toFile: path, atomically: false, encoding: .utf8)) == nil {
                    logger.warning("cannot set net.ipv4.conf.all.route_localnet=1: localhost NodePorts will not answer")
                } else {
                    logger.info("set net.ipv4.conf.all.route_localnet=1 for localhost NodePorts")
                }
            }
        }
        let local = family == .ipv4 ? LocalAddresses.current().filter { $0.family == .ipv4 } : LocalAddresses.current().filter { $0.family == .ipv6 }
        // Full syncs in batches on the nft back end only: a legacy commit rewrites the whole
        // table, so there more batches cost more. For measurements and tests,
        // SLUICE_IPTABLES_BATCH_CHAINS (chains per batch, 0 for one batch) and
        // SLUICE_IPTABLES_PIECE_CHAINS (one batch compiled in pieces above this many chains)
        // override it.
        var batching: FullSyncBatching = features.mode == "nf_tables" ? .nft : .off
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

    /// Compiles and applies `state`.
    ///
    /// A partial sync writes the chains of `state.changedServices`, deletes their stale chains,
    /// and touches a top-level chain (KUBE-SERVICES, KUBE-NODEPORTS, ...) only as far as its
    /// rules differ from what the last successful restore wrote to it: an unchanged chain is
    /// left out (with `--noflush` a `:CHAIN` line flushes the chain), a chain that gains or
    /// loses a few rules (a Service added or deleted) gets `-D`/`-I` edits, and only a chain
    /// that changed more is rewritten (`CompiledRules.omittingUnchangedTopLevelChains`).
    /// kube-proxy always rewrites them; see docs/iptables-sync.md. A full sync writes
    /// everything and refreshes what is remembered; with `batching` on (the nft back end) it
    /// is cut into batches of service chains followed by the top-level chains
    /// (`FullSyncPlan`), because one large `--noflush` restore costs the square of its size.
    /// When a restore fails, the memory is dropped and the next sync is full, even when asked
    /// for a partial one.
    public func sync(_ state: ProxyState, full requested: Bool) async throws -> SyncReport {
        let full = requested || fullSyncNeeded || !memory.isValid
        var existing: Set<String> = []
        if full {
            try await ensureBaseRules()
            existing = try await chainsIn(.nat)
        }
        let compiler = IPTablesCompiler(options: options)
        var state = state
        if full && !requested { state.changedServices.formUnion(state.servicePorts.keys.map(\.service)) }
        // A full sync cut into batches first compiles every service port without writing its
        // chains (the memory forgotten, so that every port is walked), then each batch's chains.
        let chunked = full && FullSyncPlan.compilesInPieces(state, batching: batching)
        if chunked { memory.invalidate() }
        let kind: SyncKind = chunked ? .partial(changed: []) : full ? .full : .partial(changed: state.changedServices)
        let compiled = compiler.compile(state, kind: kind, existingChains: existing, memory: &memory)
        existing = []
        let report: SyncReport
        let total = ruleCounts { compiled.totalRules[$0] ?? 0 }
        if chunked {
            let plan = FullSyncPlan(topLevel: compiled, state: state, compiler: compiler, memory: memory, batching: batching)
            var bytes = 0
            if plan.isSingleRestore {
                let text = plan.wholeText()
                bytes = text.utf8.count
                try await restore(text, operation: "full restore")
            } else {
                for (i, step) in plan.steps.enumerated() {
                    let text = plan.text(of: step)
                    bytes += text.utf8.count
                    try await restore(text, operation: "full restore, batch \(i + 1) of \(plan.steps.count)")
                    if step == .topLevel { lastRestore = text }
                }
                logger.debug("full sync in \(plan.steps.count) batches")
            }
            appliedTopLevel = compiled.topLevelRules()
            // Every rule is written.
            report = SyncReport(full: true, written: total, total: total, bytes: bytes)
        } else if full {
            let text = compiled.restoreText
            try await restore(text, operation: "full restore")
            lastRestore = text
            appliedTopLevel = compiled.topLevelRules()
            report = SyncReport(
                full: true,
                written: ruleCounts(compiled.writtenRules), total: total, bytes: text.utf8.count)
        } else {
            let (batch, _, topLevel) = compiled.omittingUnchangedTopLevelChains(appliedTopLevel)
            let text = batch.restoreText
            if !text.isEmpty { try await restore(text, operation: "partial restore") }
            appliedTopLevel = topLevel
            lastRestore = text
            report = SyncReport(
                full: false,
                written: ruleCounts(batch.writtenRules), total: total, bytes: text.utf8.count)
        }
        fullSyncNeeded = false
        if !compiled.deletedChains.isEmpty {
            logger.debug("deleted \(compiled.deletedChains.count) stale chains")
        }
        return report
    }

    /// Applies one batch with `--noflush`; on failure forgets what was applied, so the next
    /// sync is full.
    private func restore(_ text: String, operation: String) async throws {
        do {
            _ = try await runner.check(tools.restore, ["-w", "5", "-W", "100000", "--noflush", "--counters"], input: text)
        } catch {
            memory.invalidate()
            appliedTopLevel = TopLevelRules()
            fullSyncNeeded = true
            throw IPTablesError(operation: operation, underlying: error)
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
                    let r = await runner.run(iptables, ["-w", "5", "-t", probe.table.rawValue] + probe.arguments, input: nil)
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
        for (table, chain) in chains {
            let r = await runner.run(tools.iptables, ["-w", "5", "-t", table.rawValue, "-N", chain], input: nil)
            if case .failure(let e) = r { throw IPTablesError(operation: "creating chain \(chain)", underlying: e) }
        }
        for rule in jumpRules + kubeletJumpRules {
            let check = await runner.run(tools.iptables, ["-w", "5", "-t", rule.table.rawValue, "-C", rule.source] + rule.ruleArgs, input: nil)
            if case .success(let r) = check, r.status == 0 { continue }
            do {
                _ = try await runner.check(tools.iptables, ["-w", "5", "-t", rule.table.rawValue, "-I", rule.source, "1"] + rule.ruleArgs)
            } catch {
                throw IPTablesError(operation: "inserting the \(rule.source) -> \(rule.target) jump", underlying: error)
            }
        }
    }

    /// Chain names currently in `table`.
    private func chainsIn(_ table: Table) async throws -> Set<String> {
        do {
            let r = try await runner.check(tools.save, ["-t", table.rawValue])
            return IPTablesBackend.parseChains(r.stdout)
        } catch {
            throw IPTablesError(operation: "reading the \(table.rawValue) table", underlying: error)
        }
    }

    /// Chain names declared in `iptables-save` output.
    public static func parseChains(_ save: String) -> Set<String> {
        var out = Set<String>()
        let utf8 = save.utf8
        var i = utf8.startIndex
        // Only the `:CHAIN` lines, without splitting the (tens of megabytes of) rules into lines.
        while i < utf8.endIndex {
            let end = utf8[i...].firstIndex(of: UInt8(ascii: "\n")) ?? utf8.endIndex
            if utf8[i] == UInt8(ascii: ":") {
                let start = utf8.index(after: i)
                let nameEnd = utf8[start..<end].firstIndex(of: UInt8(ascii: " ")) ?? end
                out.insert(String(Substring(utf8[start..<nameEnd])))
            }
            i = end < utf8.endIndex ? utf8.index(after: end) : end
        }
        return out
    }

    /// Removes every rule and chain Sluice or kube-proxy created in iptables or userspace mode:
    /// the jump rules from the built-in chains, then every KUBE- chain of ours in one restore per table.
    public func cleanup() async throws {
        for rule in jumpRules + kubeletJumpRules + userspaceJumpRules {
            // A rule may have been inserted more than once; delete until it is gone.
            for _ in 0..<16 {
                let r = await runner.run(tools.iptables, ["-w", "5", "-t", rule.table.rawValue, "-D", rule.source] + rule.ruleArgs, input: nil)
                guard case .success(let res) = r, res.status == 0 else { break }
            }
        }
        let ours: Set<String> = Set(Chain.filterTopLevel + Chain.natTopLevel + [Chain.kubeletFirewall, Chain.canary] + Chain.userspaceNAT)
        for table in [Table.nat, .filter, .mangle] {
            let present = (try? await chainsIn(table)) ?? []
            let doomed = present.filter { ours.contains($0) || Chain.isServiceChain($0) }.sorted()
            if doomed.isEmpty { continue }
            var text = "*\(table.rawValue)\n"
            for c in doomed { text += ":\(c) - [0:0]\n" }
            for c in doomed { text += "-X \(c)\n" }
            text += "COMMIT\n"
            do {
                _ = try await runner.check(tools.restore, ["-w", "5", "-W", "100000", "--noflush"], input: text)
            } catch {
                throw IPTablesError(operation: "removing chains from the \(table.rawValue) table", underlying: error)
            }
            logger.info("removed \(doomed.count) chains from the \(table.rawValue) table")
        }
        memory = IPTablesCompileMemory()
        appliedTopLevel = TopLevelRules()
        fullSyncNeeded = true
    }
}

/// The addresses configured on this network namespace's interfaces.
public enum LocalAddresses {
    /// Reads them with getifaddrs.
    public static func current() -> [IPAddress] {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else { return [] }
        defer { freeifaddrs(head) }
        var out: [IPAddress] = []
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let ifa = cursor {
            defer { cursor = ifa.pointee.ifa_next }
            guard let sa = ifa.pointee.ifa_addr else { continue }
            var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            let len: socklen_t
            switch Int32(sa.pointee.sa_family) {
            case AF_INET: len = socklen_t(MemoryLayout<sockaddr_in>.size)
            case AF_INET6: len = socklen_t(MemoryLayout<sockaddr_in6>.size)
            default: continue
            }
            guard getnameinfo(sa, len, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST) == 0 else { continue }
            let text = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if let ip = IPAddress(String(text.split(separator: "%").first ?? "")) { out.append(ip) }
        }
        return Array(Set(out)).sorted()
    }
}

/// The filter and nat tables' rule counts as a ``SyncReport`` holds them.
func ruleCounts(_ count: (Table) -> Int) -> [SyncCount: Int] {
    [.iptablesRules(.filter): count(.filter), .iptablesRules(.nat): count(.nat)]
}
