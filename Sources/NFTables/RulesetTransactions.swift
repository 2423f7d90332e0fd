// Sluice: a per-node Kubernetes service proxy.
// `nft -f` transactions from desired rulesets: the full sync (table, base and fixed chains,
// every service chain, every element), the partial sync (only what changed between two
// rulesets), and kube-proxy's delayed deletion of stale chains.

import SluiceCore

/// One `nft -f` transaction: commands in order, plus what the backend must remember after
/// it was applied.
public struct NFTTransaction: Sendable {
    /// The table family the commands address.
    public let family: NFTFamily
    /// The `nft -f` input: one command per line, each ending in a newline. Built directly
    /// as text (a full sync of 20 000 Services holds about a million commands).
    public private(set) var text: String = ""
    /// The number of commands (kube-proxy's `NumOperations`).
    public private(set) var operationCount: Int = 0
    /// Per-service chains this transaction flushed because nothing uses them any more; they
    /// are deleted by a later transaction (``NFTStaleChains``).
    public internal(set) var flushedStaleChains: [String] = []
    /// Per-service chains this transaction (re)wrote: used again, so no longer stale.
    public internal(set) var writtenChains: [String] = []
    /// The same commands as values, for sending them as netlink messages (``NFTNetlinkWriter``);
    /// nil when the transaction was built as text only (full syncs, which go to libnftables).
    public private(set) var operations: [NFTOperation]?
    /// The commands encoded as one nfnetlink batch while the transaction was built (full
    /// syncs sent through netlink; then ``text`` stays empty); nil otherwise, or when a
    /// command could not be encoded (``encodingError``).
    public private(set) var netlinkBatch: NFTNetlinkBatch?
    /// Why ``netlinkBatch`` was dropped.
    public private(set) var encodingError: NFTEncodingError?
    /// The size of the `nft -f` text of the commands, also when ``text`` is not built.
    public private(set) var textBytes = 0
    private var recordingText = true

    /// Creates an empty transaction; with `recordingOperations`, every command is also kept as
    /// an ``NFTOperation``; with `encodingNetlink`, the commands are encoded as netlink
    /// messages instead of written as text.
    public init(family: NFTFamily, recordingOperations: Bool = false, encodingNetlink: Bool = false) {
        self.family = family
        self.table = "\(family.rawValue) \(kubeProxyTableName)"
        if recordingOperations { operations = [] }
        if encodingNetlink {
            netlinkBatch = NFTNetlinkBatch(family: family)
            recordingText = false
        }
    }

    /// The commands, one per element (for inspection and tests; splits `text`).
    public var commands: [String] { text.split(separator: "\n").map(String.init) }

    /// True when there is nothing to send.
    public var isEmpty: Bool { operationCount == 0 }

    private let table: String

    mutating func add(_ verb: String, _ object: String, _ rest: String) {
        textBytes += verb.utf8.count + object.utf8.count + table.utf8.count + rest.utf8.count + 4
        operationCount += 1
        guard recordingText else { return }
        text += verb
        text += " "
        text += object
        text += " "
        text += table
        text += " "
        text += rest
        text += "\n"
    }

    private mutating func record(_ op: @autoclosure () -> NFTOperation) {
        if operations != nil { operations!.append(op()) }
        if netlinkBatch != nil {
            do {
                try netlinkBatch?.append(op())
            } catch {
                dropNetlinkBatch(error)
            }
        }
    }

    /// Ends the netlink batch in place (before the transaction is passed on and shared).
    mutating func endNetlinkBatch() { netlinkBatch?.end() }

    private mutating func dropNetlinkBatch(_ error: NFTEncodingError) {
        guard netlinkBatch != nil else { return }
        netlinkBatch = nil
        encodingError = error
    }

    mutating func addChain(_ c: NFTChain) {
        add("add", "chain", c.name + c.declarationSuffix)
        record(c.hook == nil && c.comment == nil ? .addChain(c.name) : .declareChain(c.name, hook: c.hook, comment: c.comment))
    }
    mutating func addTable(comment: String) {
        add("add", "table", "{ comment \(nftQuoted(comment)) ; }")
        record(.addTable(comment: comment))
    }
    mutating func flushChain(_ name: String) {
        add("flush", "chain", name)
        record(.flushChain(name))
    }
    mutating func deleteChain(_ name: String) {
        add("delete", "chain", name)
        record(.deleteChain(name))
    }
    /// A rule known only as text: the transaction can no longer be sent as netlink messages.
    mutating func addRule(_ chain: String, _ rule: String) {
        add("add", "rule", "\(chain) \(rule)")
        operations = nil
        dropNetlinkBatch(NFTEncodingError("rule \(rule) of \(chain) is known only as text"))
    }
    mutating func addRule(_ chain: String, _ rule: NFTRule) {
        add("add", "rule", "\(chain) \(rule.text(family))")
        record(.addRule(chain: chain, rule))
    }
    mutating func addContainer(_ c: NFTContainer) {
        add("add", c.kind.rawValue, c.name + c.declarationSuffix)
        record(.addSet(c))
    }
    mutating func flushContainer(_ c: NFTContainer) {
        add("flush", c.kind.rawValue, c.name)
        record(.flushSet(c.name))
    }
    mutating func deleteSet(_ name: String) {
        add("delete", "set", name)
        record(.deleteSet(name))
    }
    mutating func addElement(_ e: NFTElement) {
        add("add", "element", "\(e.id.container) { \(e.body) }")
        record(.addElement(e))
    }
    mutating func deleteElement(_ id: NFTElementKey) {
        add("delete", "element", "\(id.container) { \(id.key) }")
        record(.deleteElement(id))
    }
}

/// What the kernel holds besides the desired ruleset, as read back before a full sync.
public struct NFTExistingObjects: Sendable, Hashable {
    /// Chain names in the table.
    public var chains: Set<String>
    /// Set names in the table.
    public var sets: Set<String>

    /// Creates a listing.
    public init(chains: Set<String> = [], sets: Set<String> = []) {
        self.chains = chains
        self.sets = sets
    }
}

extension NFTRuleset {
    /// The transaction of a full sync: it adds the table, (re)declares and flushes every base
    /// and fixed chain, declares and flushes every set and map, writes the fixed rules, every
    /// service chain, affinity set and rule, adds every element, deletes the fixed chains in
    /// `existing` this layout does not have (an older kube-proxy's base chains), flushes the
    /// per-service chains in `existing` that nothing uses any more (``NFTTransaction/flushedStaleChains``,
    /// to delete later) and deletes the unused affinity sets in `existing`.
    ///
    /// - Parameters:
    ///   - recreateBaseChains: the first sync of a process: every base chain is added and
    ///     deleted first, so a base chain left with another hook or priority (an older
    ///     kube-proxy) is recreated instead of failing the transaction.
    ///   - existing: the table's chains and sets as read back (empty when unknown or absent).
    ///   - recordingOperations: keep the commands as values too (``NFTTransaction/operations``).
    ///   - encodingNetlink: encode the commands as one netlink batch
    ///     (``NFTTransaction/netlinkBatch``) instead of writing the text.
    /// The same builders write the transactions of a chunked full sync (``NFTFullSyncPlan``:
    /// this head, then whole Services with their elements); the backend and `sluice compile`
    /// go through that plan, which is this one transaction when it does not chunk.
    ///
    /// - Returns: the transaction; its text is what `sluice compile --proxy-mode nftables` prints
    ///   when the plan is one transaction.
    public func fullTransaction(recreateBaseChains: Bool = false, existing: NFTExistingObjects = NFTExistingObjects(),
                                recordingOperations: Bool = false, encodingNetlink: Bool = false) -> NFTTransaction {
        var tx = NFTTransaction(family: family, recordingOperations: recordingOperations, encodingNetlink: encodingNetlink)
        addFixedPart(to: &tx, recreateBaseChains: recreateBaseChains)
        let (active, activeSets) = addServices(services.keys.sorted(), to: &tx)
        for key in claims.keys.sorted() { tx.addElement(claims[key]!.element) }
        removeOtherObjects(from: &tx, existing: existing, activeChains: active, activeSets: activeSets)
        tx.endNetlinkBatch()
        return tx
    }

    /// The transaction of a partial sync from `previous` (what the kernel holds: the ruleset of
    /// the last successful transaction) to this ruleset, or nil when the fixed part differs
    /// and a full sync is needed.
    ///
    /// Only the service ports in `changedPorts` are compared (``NFTCompileResult/changedPorts``);
    /// every other port must be the same in both rulesets. For those ports it writes the
    /// chains that are new or whose rules changed, adds new affinity sets (an affinity set
    /// whose timeout changed is deleted and added again), deletes and adds the elements whose
    /// key appeared, disappeared or changed verdict, flushes the chains nothing uses any more
    /// (to delete later, ``NFTTransaction/flushedStaleChains``) and deletes unused affinity
    /// sets. Order: element deletions, chain flushes (rewritten and stale chains) and affinity set
    /// changes, rules, element additions, set deletions, so no command refers to an object that does not
    /// exist yet or deletes one still referred to.
    ///
    /// kube-proxy rewrites every chain of a changed Service; this writes only the chains whose
    /// rules differ, which gives the same table.
    public func partialTransaction(from previous: NFTRuleset, changedPorts: Set<ServicePortName>) -> NFTTransaction? {
        guard previous.family == family, previous.fixed == fixed else { return nil }
        var delta = NFTRulesetDelta()
        for p in changedPorts {
            delta.oldFragments[p] = .some(previous.services[p])
            for e in previous.services[p]?.elements ?? [] { delta.oldElements[e.id] = .some(previous.claims[e.id]?.element) }
            for e in services[p]?.elements ?? [] { delta.oldElements[e.id] = .some(previous.claims[e.id]?.element) }
        }
        return partialTransaction(delta)
    }

    /// The transaction of a partial sync after an incremental compile
    /// (``NFTablesCompiler/update(_:to:changed:)``): the same as
    /// ``partialTransaction(from:changedPorts:)`` without the previous ruleset.
    public func partialTransaction(_ delta: NFTRulesetDelta) -> NFTTransaction {
        var tx = NFTTransaction(family: family, recordingOperations: true)
        let ports = delta.oldFragments.keys.sorted()

        // Elements: the keys touched by the changed ports.
        var adds: [NFTElement] = []
        for k in delta.oldElements.keys.sorted() {
            let old = delta.oldElements[k] ?? nil
            let new = claims[k]?.element
            if old == new { continue }
            if old != nil { tx.deleteElement(k) }
            if let new { adds.append(new) }
        }

        // Chains and affinity sets.
        var staleSets: [String] = []
        var rulesToWrite: [NFTRuleChain] = []
        for p in ports {
            let old = delta.oldFragments[p] ?? nil
            let new = services[p]
            var oldChains: [String: NFTRuleChain] = [:]
            for c in old?.ruleChains ?? [] { oldChains[c.name] = c }
            var oldSets: [String: NFTContainer] = [:]
            for s in old?.affinitySets ?? [] { oldSets[s.name] = s }
            var kept = Set<String>()
            var changedSet = false
            for s in new?.affinitySets ?? [] {
                if let o = oldSets[s.name], o != s { changedSet = true }
            }
            for c in new?.ruleChains ?? [] {
                kept.insert(c.name)
                // A chain refers to the affinity sets; when one is recreated every chain of
                // the port is rewritten, so none refers to the old set when it is deleted.
                if !changedSet, let o = oldChains[c.name], o == c { continue }
                tx.addChain(NFTChain(name: c.name))
                tx.flushChain(c.name)
                tx.writtenChains.append(c.name)
                rulesToWrite.append(c)
            }
            // Chains nothing uses any more: flushed now (before any affinity set they refer to
            // is deleted), deleted by a later transaction.
            for name in oldChains.keys.sorted() where !kept.contains(name) {
                tx.flushChain(name)
                tx.flushedStaleChains.append(name)
            }
            var keptSets = Set<String>()
            for s in new?.affinitySets ?? [] {
                keptSets.insert(s.name)
                if let o = oldSets[s.name] {
                    if o == s { continue }
                    // Flushed above (every chain of the port was rewritten): nothing refers to it.
                    tx.deleteSet(s.name)
                }
                tx.addContainer(s)
            }
            for (name, _) in oldSets where !keptSets.contains(name) { staleSets.append(name) }
        }
        for c in rulesToWrite {
            for r in c.rules { tx.addRule(c.name, r) }
        }
        for e in adds { tx.addElement(e) }
        for s in staleSets.sorted() { tx.deleteSet(s) }
        return tx
    }
}

/// kube-proxy's delayed deletion of stale chains: a chain that nothing uses any more is
/// flushed at once but deleted only by a later sync, in its own transaction, once a grace
/// period has passed (kernels before 6.2 notice late that a deleted map element no longer
/// refers to a chain). The backend keeps one per family.
public struct NFTStaleChains: Sendable {
    /// Stale chains and when they were flushed.
    public private(set) var flushedAt: [String: ContinuousClock.Instant] = [:]

    /// kube-proxy's grace period.
    public static let defaultGrace: Duration = .seconds(1)

    /// Creates an empty record.
    public init() {}

    /// Chains flushed more than `grace` before `now`, sorted.
    public func due(now: ContinuousClock.Instant, grace: Duration = defaultGrace) -> [String] {
        flushedAt.filter { $0.value < now - grace }.keys.sorted()
    }

    /// The deletion transaction for the chains due at `now` (nil when none is), run before the
    /// sync's main transaction. The chains are forgotten here, as kube-proxy does: if the
    /// deletion fails, the next full sync finds them again.
    public mutating func takeDeletionTransaction(family: NFTFamily, now: ContinuousClock.Instant,
                                                 grace: Duration = defaultGrace) -> NFTTransaction? {
        let chains = due(now: now, grace: grace)
        guard !chains.isEmpty else { return nil }
        var tx = NFTTransaction(family: family, recordingOperations: true)
        for c in chains {
            tx.deleteChain(c)
            flushedAt[c] = nil
        }
        return tx
    }

    /// Records a main transaction that was applied at `now`: the chains it wrote are in use
    /// again, the chains it flushed as stale wait for deletion.
    public mutating func record(_ tx: NFTTransaction, at now: ContinuousClock.Instant) {
        for c in tx.writtenChains where flushedAt[c] != nil { flushedAt[c] = nil }
        for c in tx.flushedStaleChains { flushedAt[c] = now }
    }

    /// Forgets everything (a failed main transaction flushed nothing; the next full sync
    /// finds stale chains again).
    public mutating func reset() { flushedAt.removeAll() }

    /// The number of chains waiting.
    public var count: Int { flushedAt.count }
}
