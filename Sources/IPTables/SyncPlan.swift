// Sluice: a per-node Kubernetes service proxy.
// The iptables mode's sync, planned: a pure function of the state, the sync kind and what
// the backend remembers from the last sync, giving the restore batches to apply. The backend
// applies a plan; `sluice-bench-compile` plans without applying. See docs/architecture.md,
// "The sync contract".

import SluiceCore

/// What the iptables backend carries from one sync to the next.
public struct IPTablesSyncMemory: Sendable {
    /// Chain names and every service port's top-level rules and chains from the last compile,
    /// so that a partial compile works only through the changed Services.
    public var compile = IPTablesCompileMemory()
    /// The top-level chains as the last successful restore left them: a partial sync leaves
    /// out those it would write unchanged.
    public var appliedTopLevel = TopLevelRules()
    /// A restore failed or the rules were removed: the next sync is full whatever is asked.
    public var fullSyncNeeded = false

    /// Nothing remembered (the first sync is full).
    public init() {}

    /// The kind a sync asked for as `requested` is made: full when asked, after a failure, or
    /// while the compile memory cannot serve a partial compile.
    public func effectiveKind(_ requested: SyncKind) -> SyncKind {
        requested.isFull || fullSyncNeeded || !compile.isValid ? .full : requested
    }

    /// A copy whose compile memory shares no storage with this one (to plan the same sync
    /// several times from one starting point, as the benchmark does).
    public func independentCopy() -> IPTablesSyncMemory {
        var out = self
        out.compile = compile.independentCopy()
        return out
    }
}

/// One iptables sync as restore batches, in the order they are applied, with what the
/// top-level chains hold once they are.
public struct IPTablesSyncPlan: Sendable {
    /// One restore batch.
    public struct Restore: Sendable {
        /// The `iptables-restore --noflush` input (an empty text: nothing to write, skip the
        /// restore). The whole-table batch of a large full sync is made as it is written.
        public var input: CommandInput
        /// What it is, for errors and logs ("partial restore", "full restore, batch 2 of 9").
        public var operation: String
        /// Whether the backend keeps it as its `lastRestore` (the top-level batch; always a
        /// whole text).
        public var isLastRestore: Bool

        /// The input as one string (for printing, and tests).
        public var text: String { input.joined() }
    }

    fileprivate enum Payload: Sendable {
        /// One batch: `compiled`, rendered.
        case single(operation: String)
        /// A full sync compiled a piece at a time.
        case pieces(FullSyncPlan)
    }

    /// The kind of sync made (full when the memory could not serve the partial one asked for).
    public let kind: SyncKind
    /// What is written (a partial sync: with the unchanged top-level chains left out or edited;
    /// a full sync in pieces: the top-level compile, no per-service chain).
    public let compiled: CompiledRules
    /// The top-level chain names a partial sync leaves out (`table/chain`).
    public let omittedTopLevel: [String]
    /// What the top-level chains hold once every batch is applied.
    public let topLevelAfter: TopLevelRules
    /// Rules written and held, by table, for the ``SyncReport``.
    public let written: [SyncCount: Int]
    /// Rules the full state holds, by table.
    public let total: [SyncCount: Int]
    private let payload: Payload

    /// How many restore batches the plan has.
    public var restoreCount: Int {
        switch payload {
        case .single: 1
        case .pieces(let p): p.isSingleRestore ? 1 : p.steps.count
        }
    }

    /// Restore batch `i` (0 ..< `restoreCount`), rendered now.
    public func restore(at i: Int) -> Restore {
        switch payload {
        case .single(let operation):
            return Restore(input: .text(compiled.restoreText), operation: operation, isLastRestore: true)
        case .pieces(let p) where p.isSingleRestore:
            return Restore(input: p.wholeInput(), operation: "full restore", isLastRestore: false)
        case .pieces(let p):
            let step = p.steps[i]
            return Restore(input: .text(p.text(of: step)), operation: "full restore, batch \(i + 1) of \(p.steps.count)",
                           isLastRestore: step == .topLevel)
        }
    }

    /// The report of the plan once applied, `bytes` sent.
    public func report(bytes: Int) -> SyncReport {
        SyncReport(full: kind.isFull, written: written, total: total, bytes: bytes)
    }

    fileprivate init(kind: SyncKind, compiled: CompiledRules, omitted: [String], topLevelAfter: TopLevelRules,
                     written: [SyncCount: Int], total: [SyncCount: Int], payload: Payload) {
        self.kind = kind
        self.compiled = compiled
        self.omittedTopLevel = omitted
        self.topLevelAfter = topLevelAfter
        self.written = written
        self.total = total
        self.payload = payload
    }
}

/// Plans iptables syncs: the pure half of the backend.
public struct IPTablesPlanner: Sendable {
    /// The compiler planned with.
    public let compiler: IPTablesCompiler
    /// How a full sync is cut into restore batches.
    public let batching: FullSyncBatching

    /// Creates a planner.
    public init(options: IPTablesOptions, batching: FullSyncBatching) {
        self.compiler = IPTablesCompiler(options: options)
        self.batching = batching
    }

    /// Plans a sync of `state`.
    ///
    /// A partial sync writes the chains of the changed Services, deletes their stale chains,
    /// and touches a top-level chain (KUBE-SERVICES, KUBE-NODEPORTS, ...) only as far as its
    /// rules differ from `memory.appliedTopLevel`
    /// (`CompiledRules.omittingUnchangedTopLevelChains`). A full sync writes everything and
    /// deletes the per-service chains in `existingChains` that are no longer used; above the
    /// batching's size it is compiled in pieces (`FullSyncPlan`).
    ///
    /// - Parameters:
    ///   - kind: what is asked; made full by `memory.effectiveKind(_:)`.
    ///   - existingChains: for a full sync, the per-service nat chains the kernel holds.
    ///   - memory: updated with the compile (the caller forgets it when the plan is not
    ///     applied, and sets `appliedTopLevel` to `topLevelAfter` when it is).
    public func plan(_ state: ProxyState, kind requested: SyncKind, existingChains: Set<String>,
                     memory: inout IPTablesSyncMemory) -> IPTablesSyncPlan {
        let kind = memory.effectiveKind(requested)
        // A full sync cut into batches first compiles every service port without writing its
        // chains (the memory forgotten, so that every port is walked), then each batch's chains.
        let inPieces = kind.isFull && FullSyncPlan.compilesInPieces(state, batching: batching)
        if inPieces { memory.compile.invalidate() }
        let compileKind: SyncKind = inPieces ? .partial(changed: []) : kind
        let compiled = compiler.compile(state, kind: compileKind, existingChains: existingChains, memory: &memory.compile)
        let total = ruleCounts { compiled.totalRules[$0] ?? 0 }
        if inPieces {
            let pieces = FullSyncPlan(topLevel: compiled, state: state, compiler: compiler, memory: memory.compile, batching: batching)
            // Every rule is written.
            return IPTablesSyncPlan(kind: kind, compiled: compiled, omitted: [], topLevelAfter: compiled.topLevelRules(),
                                    written: total, total: total, payload: .pieces(pieces))
        }
        if kind.isFull {
            return IPTablesSyncPlan(kind: kind, compiled: compiled, omitted: [], topLevelAfter: compiled.topLevelRules(),
                                    written: ruleCounts(compiled.writtenRules), total: total,
                                    payload: .single(operation: "full restore"))
        }
        let (batch, omitted, topLevel) = compiled.omittingUnchangedTopLevelChains(memory.appliedTopLevel)
        return IPTablesSyncPlan(kind: kind, compiled: batch, omitted: omitted, topLevelAfter: topLevel,
                                written: ruleCounts(batch.writtenRules), total: total,
                                payload: .single(operation: "partial restore"))
    }
}
