// Sluice: a per-node Kubernetes service proxy.
// The chunked full sync: one full iptables sync cut into restore batches of a bounded number
// of per-service chains, because iptables-nft-restore --noflush costs roughly the square of
// one batch's size (docs/iptables-sync.md). Every batch is atomic and leaves a consistent
// ruleset: a top-level rule never jumps to a chain that is missing or half written.

/// How a full sync is cut into restore batches.
public struct FullSyncBatching: Sendable, Hashable {
    /// Per-service nat chains per batch; 0 writes the whole sync as one batch.
    public var chainsPerBatch: Int

    /// Creates a setting.
    public init(chainsPerBatch: Int) { self.chainsPerBatch = max(0, chainsPerBatch) }

    /// One batch, whatever the size (the legacy back end: every legacy commit rewrites the whole
    /// table, so more batches cost more).
    public static let off = FullSyncBatching(chainsPerBatch: 0)

    /// The nft back end's default: about 55 Services of 10 endpoints per batch (11 chains each).
    /// Measured with iptables-nft 1.8.9 (docs/iptables-sync.md): a batch costs roughly the
    /// square of its size plus the size of the table it lands in, and 500–1 000 chains a batch
    /// came out fastest at 5 000–20 000 Services.
    public static let nft = FullSyncBatching(chainsPerBatch: 600)
}

/// The restore batches of one full sync, in the order they are applied, each rendered only
/// when asked for (the whole payload is never one string).
///
/// 1. *Service batches*: the per-service chains of consecutive service ports, whole (a port's
///    chains never span two batches), without their KUBE-SERVICES / KUBE-NODEPORTS rules. A
///    chain that exists is replaced atomically by its new content; a new one is not yet
///    reachable. The first batch also writes KUBE-MARK-MASQ and KUBE-POSTROUTING (constant), which
///    the service chains jump to.
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
        /// The whole sync in one batch (`CompiledRules.restoreText`).
        case whole
        /// The per-service chains of written service ports `range` (indices in compile order).
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
    private let rules: CompiledRules
    private let staleInline: Bool

    /// Plans the batches of `rules`, a full compile.
    public init(_ rules: CompiledRules, batching: FullSyncBatching) {
        self.rules = rules
        let starts = rules.natPortStarts
        let limit = batching.chainsPerBatch
        guard limit > 0, let first = starts.first, let last = starts.last, last.chains - first.chains > limit else {
            steps = [.whole]
            staleInline = true
            return
        }
        var steps: [Step] = []
        var begin = 0
        for i in 0..<(starts.count - 1) where starts[i + 1].chains - starts[begin].chains >= limit {
            steps.append(.services(begin..<(i + 1)))
            begin = i + 1
        }
        if begin < starts.count - 1 { steps.append(.services(begin..<(starts.count - 1))) }
        steps.append(.topLevel)
        let stale = rules.deletedChains.count
        staleInline = stale <= limit
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
        case .whole:
            return rules.restoreText
        case .services(let range):
            return servicesText(range)
        case .topLevel:
            return topLevelText()
        case .flushStale(let range):
            var out = "*nat\n"
            for c in rules.deletedChains[range] { out += ":\(c) - [0:0]\n" }
            return out + "COMMIT\n"
        case .deleteStale(let range):
            var out = "*nat\n"
            for c in rules.deletedChains[range] { out += ":\(c) - [0:0]\n" }
            for c in rules.deletedChains[range] { out += "-X \(c)\n" }
            return out + "COMMIT\n"
        }
    }

    /// A line of a top-level nat chain a service port writes (KUBE-SERVICES, KUBE-NODEPORTS).
    private static func isPortTopLevel(_ line: String) -> Bool {
        line.hasPrefix("-A KUBE-SERVICES ") || line.hasPrefix("-A KUBE-NODEPORTS ")
    }

    private func servicesText(_ range: Range<Int>) -> String {
        let starts = rules.natPortStarts
        let chains = starts[range.lowerBound].chains..<starts[range.upperBound].chains
        let lines = starts[range.lowerBound].rules..<starts[range.upperBound].rules
        var out = "*nat\n"
        let constant = [Chain.postrouting, Chain.markMasq]
        if range.lowerBound == 0 {
            for c in constant { out += ":\(c) - [0:0]\n" }
        }
        for line in rules.nat.chains[chains] { out += line; out += "\n" }
        if range.lowerBound == 0 {
            for line in rules.nat.rules[..<starts[0].rules] where constant.contains(where: { line.hasPrefix("-A \($0) ") }) {
                out += line; out += "\n"
            }
        }
        for line in rules.nat.rules[lines] where !FullSyncPlan.isPortTopLevel(line) { out += line; out += "\n" }
        return out + "COMMIT\n"
    }

    private func topLevelText() -> String {
        let starts = rules.natPortStarts
        let chains = starts[0].chains..<starts[starts.count - 1].chains
        let lines = starts[0].rules..<starts[starts.count - 1].rules
        var out = ""
        if !(rules.filter.chains.isEmpty && rules.filter.rules.isEmpty) {
            out += "*filter\n"
            for line in rules.filter.chains { out += line; out += "\n" }
            for line in rules.filter.rules { out += line; out += "\n" }
            out += "COMMIT\n"
        }
        out += "*nat\n"
        for line in rules.nat.chains[..<chains.lowerBound] { out += line; out += "\n" }
        if staleInline {
            for line in rules.nat.chains[chains.upperBound...] { out += line; out += "\n" }
        }
        for line in rules.nat.rules[..<lines.lowerBound] { out += line; out += "\n" }
        for line in rules.nat.rules[lines] where FullSyncPlan.isPortTopLevel(line) { out += line; out += "\n" }
        for line in rules.nat.rules[lines.upperBound...] where staleInline || !line.hasPrefix("-X ") {
            out += line; out += "\n"
        }
        return out + "COMMIT\n"
    }
}
