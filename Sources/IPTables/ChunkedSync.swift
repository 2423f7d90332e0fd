// Sluice: a per-node Kubernetes service proxy.
// The chunked full sync: one full iptables sync cut into restore batches of a bounded number
// of per-service chains, because iptables-nft-restore --noflush costs roughly the square of
// one batch's size (docs/iptables-sync.md). Every batch is atomic and leaves a consistent
// ruleset: a top-level rule never jumps to a chain that is missing or half written.

import SluiceCore

/// How a full sync is cut into restore batches.
public struct FullSyncBatching: Sendable, Hashable {
    /// Per-service nat chains per batch; 0 writes the whole sync as one batch.
    public var chainsPerBatch: Int
    /// With one batch: above this many chains the batch is still compiled and rendered a
    /// piece at a time (`FullSyncPlan.wholeText()`), so that its lines are never all in memory.
    public var compileInPiecesAbove: Int

    /// Creates a setting.
    public init(chainsPerBatch: Int, compileInPiecesAbove: Int = 600) {
        self.chainsPerBatch = max(0, chainsPerBatch)
        self.compileInPiecesAbove = max(1, compileInPiecesAbove)
    }

    /// One batch compiled whole, whatever the size: the plain full compile (tests compare the
    /// other forms with it).
    public static let classic = FullSyncBatching(chainsPerBatch: 0, compileInPiecesAbove: .max)

    /// One batch, whatever the size (the legacy back end: every legacy commit rewrites the whole
    /// table, so more batches cost more).
    public static let off = FullSyncBatching(chainsPerBatch: 0)

    /// The nft back end's default: about 55 Services of 10 endpoints per batch (11 chains each).
    /// Measured with iptables-nft 1.8.9 (docs/iptables-sync.md): a batch costs roughly the
    /// square of its size plus the size of the table it lands in, and 500–1 000 chains a batch
    /// came out fastest at 5 000–20 000 Services.
    public static let nft = FullSyncBatching(chainsPerBatch: 600)
}

/// The restore batches of one full sync cut into batches, in the order they are applied, each
/// compiled and rendered only when asked for: neither the whole payload nor all of its lines
/// are in memory at once.
///
/// It starts from a compile of the full state that writes no per-service chain (`topLevel`: a
/// `.partial(changed: [])` compile with the memory invalidated, which walks every service
/// port, rebuilds the memory and keeps only the top-level lines and the stale chains). Then:
///
/// 1. *Service batches*: the per-service chains of consecutive service ports, whole (a port's
///    chains never span two batches), without their KUBE-SERVICES / KUBE-NODEPORTS rules. A
///    chain that exists is replaced atomically by its new content; a new one is not yet
///    reachable. The first batch also writes KUBE-MARK-MASQ and KUBE-POSTROUTING (constant),
///    which the service chains jump to.
/// 2. *The top-level batch*: the filter table and the top-level nat chains whole, exactly as a
///    single-batch full sync writes them, so every KUBE-SERVICES rule changes in one commit,
///    to chains that are complete; stale chains are deleted in it when they are few.
/// 3. When there are more stale chains than one batch holds: *flush* batches empty them (none
///    is referenced by a live chain any more, but stale chains may reference each other), then
///    *delete* batches remove them.
///
/// A failure at any step leaves every chain whole: the previous top-level rules (or none, on a
/// cold start) jumping to chains that are either the old or the new version of themselves.
public struct FullSyncPlan: Sendable {
    /// One restore batch of the plan.
    public enum Step: Sendable, Hashable {
        /// The per-service chains of service ports `range` (indices in sorted order).
        case services(Range<Int>)
        /// The filter table and the top-level nat chains (and the stale chains when inline).
        case topLevel
        /// Empty the stale chains `deletedChains[range]`.
        case flushStale(Range<Int>)
        /// Delete the (emptied) stale chains `deletedChains[range]`.
        case deleteStale(Range<Int>)
    }

    /// The batches, in order.
    public let steps: [Step]
    private let topLevel: CompiledRules
    private let state: ProxyState
    private let compiler: IPTablesCompiler
    private let memory: IPTablesCompileMemory
    private let staleInline: Bool

    /// Whether a full sync of `state` with `batching` is compiled a piece at a time (through a
    /// plan): it has more chains than one batch holds (or, with one batch, more than
    /// `compileInPiecesAbove`), counting one per service port and one per endpoint.
    public static func compilesInPieces(_ state: ProxyState, batching: FullSyncBatching) -> Bool {
        let chains = state.servicePorts.count + state.totalEndpoints
        return chains > (batching.chainsPerBatch > 0 ? batching.chainsPerBatch : batching.compileInPiecesAbove)
    }

    /// The whole sync goes in one restore (`wholeText()`), not in `steps`.
    public let isSingleRestore: Bool

    /// Plans the batches of a full sync of `state`.
    /// - Parameters:
    ///   - topLevel: `compiler`'s compile of `state` with `kind: .partial(changed: [])` and an
    ///     invalidated memory (every service port walked, no per-service chain written).
    ///   - memory: the memory that compile left (valid: every service port's chains).
    public init(topLevel: CompiledRules, state: ProxyState, compiler: IPTablesCompiler, memory: IPTablesCompileMemory,
                batching: FullSyncBatching) {
        self.topLevel = topLevel
        self.state = state
        self.compiler = compiler
        self.memory = memory
        isSingleRestore = batching.chainsPerBatch == 0
        let limit = isSingleRestore ? batching.compileInPiecesAbove : batching.chainsPerBatch
        var steps: [Step] = []
        var begin = 0, chains = 0
        let names = memory.sortedNames
        for (i, name) in names.enumerated() {
            chains += memory.entries[name]?.chains.count ?? 0
            if chains >= limit {
                steps.append(.services(begin..<(i + 1)))
                begin = i + 1
                chains = 0
            }
        }
        if begin < names.count { steps.append(.services(begin..<names.count)) }
        steps.append(.topLevel)
        let stale = topLevel.deletedChains.count
        staleInline = isSingleRestore || stale <= limit
        if !staleInline {
            let ranges = stride(from: 0, to: stale, by: limit).map { $0..<min($0 + limit, stale) }
            steps += ranges.map { .flushStale($0) }
            steps += ranges.map { .deleteStale($0) }
        }
        self.steps = steps
    }

    /// The restore input of `step`.
    public func text(of step: Step) -> String {
        switch step {
        case .services(let range):
            return "*nat\n" + serviceBody(range) + "COMMIT\n"
        case .topLevel:
            return topLevelText()
        case .flushStale(let range):
            var out = "*nat\n"
            for c in topLevel.deletedChains[range] { out += ":\(c) - [0:0]\n" }
            return out + "COMMIT\n"
        case .deleteStale(let range):
            var out = "*nat\n"
            for c in topLevel.deletedChains[range] { out += ":\(c) - [0:0]\n" }
            for c in topLevel.deletedChains[range] { out += "-X \(c)\n" }
            return out + "COMMIT\n"
        }
    }

    /// The whole sync as one restore input, rendered a batch at a time as it is written (so
    /// never whole in memory): the filter table, then in one nat section every service batch's
    /// chains and the top-level nat chains. A chain is declared before any rule jumps to it;
    /// KUBE-MARK-MASQ and KUBE-POSTROUTING, written with the first service batch, are declared
    /// (emptied) and written again with the top-level chains, in the same commit.
    public func wholeInput() -> CommandInput {
        let plan = self
        return .pieces { write in
            if !(plan.topLevel.filter.chains.isEmpty && plan.topLevel.filter.rules.isEmpty) {
                var out = "*filter\n"
                for line in plan.topLevel.filter.chains { out += line; out += "\n" }
                for line in plan.topLevel.filter.rules { out += line; out += "\n" }
                out += "COMMIT\n"
                try write(out)
            }
            try write("*nat\n")
            for step in plan.steps {
                if case .services(let range) = step { try write(plan.serviceBody(range)) }
            }
            var out = ""
            for line in plan.topLevel.nat.chains { out += line; out += "\n" }
            for line in plan.topLevel.nat.rules { out += line; out += "\n" }
            out += "COMMIT\n"
            try write(out)
        }
    }

    /// ``wholeInput()`` as one string.
    public func wholeText() -> String { wholeInput().joined() }

    private func serviceBody(_ range: Range<Int>) -> String {
        compiler.serviceChainsBatch(state, ports: memory.sortedNames[range], memory: memory,
                                    largeCluster: topLevel.largeClusterMode,
                                    constantLines: range.lowerBound == 0 ? constantNATLines : [])
    }

    /// KUBE-POSTROUTING and KUBE-MARK-MASQ, declared and filled: constant, and jumped to by the
    /// service chains, so the first service batch writes them.
    private var constantNATLines: [String] {
        let constant = [Chain.postrouting, Chain.markMasq]
        return constant.map { ":\($0) - [0:0]" }
            + topLevel.nat.rules.filter { line in constant.contains { line.hasPrefix("-A \($0) ") } }
    }

    private func topLevelText() -> String {
        if staleInline { return topLevel.restoreText }
        var batch = topLevel
        let stale = Set(topLevel.deletedChains)
        batch.nat.chains = topLevel.nat.chains.filter { line in
            !(line.hasPrefix(":") && stale.contains(String(line.dropFirst().prefix { $0 != " " })))
        }
        batch.nat.rules = topLevel.nat.rules.filter { !$0.hasPrefix("-X ") }
        return batch.restoreText
    }
}

extension IPTablesCompiler {
    /// The body of one service batch of a full sync compiled in pieces (without the `*nat` and
    /// `COMMIT` lines): the per-service nat chains of `ports`, declared and filled, without
    /// their top-level rules, with the chain names in `memory`.
    /// `constantLines` (the first batch's) go first: their declarations before the service
    /// chains' declarations, their rules before the service chains' rules.
    func serviceChainsBatch(_ state: ProxyState, ports: ArraySlice<ServicePortName>, memory: IPTablesCompileMemory,
                            largeCluster: Bool, constantLines: [String]) -> String {
        var emit = Emitter()
        var scratch = CompiledRules()
        for name in ports {
            guard let svc = state.servicePorts[name] else { continue }
            var names = memory.entries[name]?.names ?? ChainNameMemo(name)
            _ = writeServicePort(svc, state: state, largeCluster: largeCluster, names: &names, emit: &emit, out: &scratch)
        }
        var out = ""
        for line in constantLines where line.hasPrefix(":") { out += line; out += "\n" }
        for line in emit.natChains.lines { out += line; out += "\n" }
        for line in constantLines where !line.hasPrefix(":") { out += line; out += "\n" }
        for line in emit.natRules.lines where !(line.hasPrefix("-A KUBE-SERVICES ") || line.hasPrefix("-A KUBE-NODEPORTS ")) {
            out += line; out += "\n"
        }
        return out
    }
}
