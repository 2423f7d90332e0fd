// Sluice: a per-node Kubernetes service proxy.
// The nftables backend: applies the compiler's transactions through libnftables, one
// transaction per sync, keeps in memory what the kernel holds, deletes stale chains a sync
// later (as kube-proxy does), and watches for a deleted or flushed table.

import Foundation
import Logging
import SluiceCore

/// The kernel side the backend talks to (libnftables and the netlink inventory in
/// production; a fake in unit tests).
public protocol NFTablesKernel: Sendable {
    /// Applies one transaction (all or nothing).
    func apply(_ text: String, operation: String) async throws
    /// The table's chain and set names.
    func inventory() async throws -> (chains: Set<String>, sets: Set<String>)
    /// Whether the table exists and `chain` holds at least one rule.
    func chainHasRules(_ chain: String) async throws -> Bool
    /// Applies one transaction (all or nothing); a kernel that can send its recorded
    /// ``NFTTransaction/operations`` as netlink messages does, else its text is applied.
    func apply(_ transaction: NFTTransaction, operation: String) async throws
    /// Whether full transactions should be encoded as netlink batches
    /// (``NFTTransaction/netlinkBatch``) instead of text.
    var sendsFullTransactionsAsNetlink: Bool { get }
    /// Whether the transactions of a chunked full sync (``NFTFullSyncPlan``) should be encoded
    /// as netlink batches instead of text.
    var sendsChunkedTransactionsAsNetlink: Bool { get }
}

extension NFTablesKernel {
    /// Applies the transaction's text.
    public func apply(_ transaction: NFTTransaction, operation: String) async throws {
        try await apply(transaction.text, operation: operation)
    }

    /// Text only.
    public var sendsFullTransactionsAsNetlink: Bool { false }

    /// Text only.
    public var sendsChunkedTransactionsAsNetlink: Bool { false }
}

/// Applies one transaction in a child process (the same libnftables call there).
public typealias NFTablesChildApplier = @Sendable (_ text: String, _ operation: String) async throws -> Void

/// libnftables for full syncs, nf_tables netlink messages for partial syncs and stale-chain
/// deletions, nfnetlink for the inventory.
///
/// libnftables reads the whole table from the kernel before it runs any command (it resolves
/// names against that cache): at 10 000 Services × 10 endpoints, with ~10 000 anonymous
/// verdict maps, that read alone costs seconds, so a one-Service change through it grows with
/// the table. Transactions that record their commands as values (partial ones) are therefore
/// sent as one nfnetlink batch built in the process (``NFTNetlinkWriter``), which costs what
/// it changes.
///
/// libnftables builds its own representation of a whole transaction before it sends it: about
/// 23 bytes of memory per byte of input (130 MiB for the 5.6 MB full transaction of 1 000
/// Services × 10 endpoints, measured with `nft -f`), which stays in the process's peak memory.
/// Transactions of at least `childBytes` (full syncs of large tables) therefore go to a child
/// process when a `child` applier is given; the small partial ones stay in the process.
public struct LibNFTablesKernel: NFTablesKernel {
    /// The library context.
    public let lib: LibNFTables
    /// The netlink reader of the same table.
    public let reader: NFTablesInventory
    /// Where large transactions are applied (nil: always in this process).
    public let child: NFTablesChildApplier?
    /// The size from which a transaction goes to `child`.
    public let childBytes: Int
    /// Where recorded transactions go as netlink batches (nil: everything through libnftables).
    public let writer: NFTNetlinkWriter?
    /// Full transactions go to `writer` too (else to libnftables or the child).
    public let netlinkFull: Bool

    /// Creates a kernel interface for `table` in `family`.
    /// - Parameters:
    ///   - netlinkPartials: send transactions with recorded operations (partial syncs,
    ///     stale-chain deletions) as nf_tables netlink batches instead of through libnftables.
    ///   - netlinkFull: full syncs too (needs `netlinkPartials`).
    public init(table: String = kubeProxyTableName, family: NFTFamily, lib: LibNFTables,
                child: NFTablesChildApplier? = nil, childBytes: Int = 1 << 20, netlinkPartials: Bool = true,
                netlinkFull: Bool = true) throws {
        self.lib = lib
        self.reader = try NFTablesInventory(table: table, family: family)
        self.child = child
        self.childBytes = childBytes
        self.writer = netlinkPartials ? try NFTNetlinkWriter(family: family, table: table) : nil
        self.netlinkFull = netlinkPartials && netlinkFull
    }

    public var sendsFullTransactionsAsNetlink: Bool { netlinkFull }

    /// The chunks of a chunked full sync go as netlink batches whenever partial syncs do:
    /// through libnftables each chunk would first read the whole table into its cache.
    public var sendsChunkedTransactionsAsNetlink: Bool { writer != nil }

    public func apply(_ transaction: NFTTransaction, operation: String) async throws {
        if let writer, let batch = transaction.netlinkBatch {
            try await writer.apply(batch)
        } else if let writer, let ops = transaction.operations {
            try await writer.apply(ops)
        } else {
            try await apply(transaction.text, operation: operation)
        }
    }

    public func apply(_ text: String, operation: String) async throws {
        if let child, text.utf8.count >= childBytes {
            try await child(text, operation)
        } else {
            try lib.run(text, operation: operation)
        }
    }

    public func inventory() async throws -> (chains: Set<String>, sets: Set<String>) {
        guard try await reader.tableExists() else { return ([], []) }
        return (try await reader.chainNames(), try await reader.setNames())
    }

    public func chainHasRules(_ chain: String) async throws -> Bool {
        try await reader.ruleCount(chain: chain) > 0
    }
}

/// The nftables backend for one IP family: table `ip kube-proxy` or `ip6 kube-proxy`.
public actor NFTablesBackend: ProxyBackend {
    public nonisolated let name = "nftables"
    /// kube-proxy's table name.
    public static let tableName = kubeProxyTableName
    /// The chain the canary check reads: it always holds the `@service-ips` dispatch rule, so
    /// a deleted table and a flushed one both leave it without rules.
    public static let canaryChain = NFTablesCompiler.Names.services

    /// The table family.
    public nonisolated let family: NFTFamily
    private let compiler: NFTablesCompiler
    private let kernel: any NFTablesKernel
    private let logger: Logger
    /// The time, for the stale-chain delay (a settable clock in unit tests).
    private let now: @Sendable () -> ContinuousClock.Instant

    /// The ruleset the kernel holds after the last successful transaction (nil: unknown, so
    /// the next sync is full).
    private var applied: NFTRuleset?
    /// Flushed chains waiting to be deleted.
    private var stale = NFTStaleChains()
    /// Whether the next full sync is the process's first (it recreates the base chains).
    private var firstSync = true
    /// When the last full transaction was applied.
    private var lastFullSync: ContinuousClock.Instant?
    /// How often a full sync the caller asks for is really sent (kube-proxy's
    /// `FullSyncPeriod`, one hour); other requests are partial syncs of every Service.
    public nonisolated let fullSyncPeriod: Duration
    /// How a full sync into a table without service chains is cut into transactions
    /// (``NFTFullSyncPlan``).
    public nonisolated let chunking: NFTFullSyncChunking
    /// The last transaction applied, for debugging and tests.
    public private(set) var lastTransaction = ""
    /// Failed main transactions (`…_nftables_sync_failures_total`).
    public private(set) var syncFailures = 0
    /// Failed stale-chain deletions (`…_nftables_cleanup_failures_total`).
    public private(set) var cleanupFailures = 0
    /// Cleanup failures not yet carried by a sync report.
    private var unreportedCleanupFailures = 0

    /// Creates a backend.
    /// - Parameters:
    ///   - compiler: the pure compiler of this family.
    ///   - kernel: libnftables and the netlink reader (`LibNFTablesKernel`), or a fake.
    ///   - fullSyncPeriod: see ``fullSyncPeriod``; `.zero` makes every requested full sync full.
    ///   - chunking: see ``chunking``.
    ///   - now: the time (`ContinuousClock.now` unless a test passes its own).
    public init(compiler: NFTablesCompiler, kernel: any NFTablesKernel, logger: Logger, fullSyncPeriod: Duration = .seconds(3600),
                chunking: NFTFullSyncChunking = .default,
                now: @escaping @Sendable () -> ContinuousClock.Instant = { ContinuousClock.now }) {
        self.family = NFTFamily(compiler.options.family)
        self.fullSyncPeriod = fullSyncPeriod
        self.chunking = chunking
        self.compiler = compiler
        self.kernel = kernel
        self.logger = logger
        self.now = now
    }

    /// Chains flushed and waiting for deletion (tests).
    public var pendingStaleChains: Set<String> { Set(stale.flushedAt.keys) }

    /// Applies `state` in one transaction (a full sync into a table without service chains: in
    /// several, ``NFTFullSyncPlan``).
    ///
    /// A partial sync compiles only the changed Services into the ruleset the last transaction
    /// left and sends the difference (their chains, the changed set and map elements). A full
    /// one (asked for, the first, after a failure, or when the fixed part changed) sends the
    /// whole ruleset and reads the table's chain and set names back first, so service chains
    /// and affinity sets nobody wants any more are flushed (chains) or deleted (sets). Chains
    /// flushed by an earlier sync are deleted first, in a transaction of their own, once they
    /// have been flushed for a second. A failed transaction leaves the kernel as it was and
    /// the next sync is full.
    ///
    /// As in kube-proxy's nftables mode, a full sync asked for while the kernel state is known
    /// (the runner's periodic resync, every `--sync-period`) is sent only when the last one is
    /// `fullSyncPeriod` old; otherwise every Service is compiled again and only differences go
    /// to the kernel. A full sync at 10 000 Services costs the kernel tens of seconds
    /// (anonymous sets); the canary, a failure and a changed fixed part still force one.
    public func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        let requested = kind.isFull
        let start = now()
        let fullDue = lastFullSync.map { start - $0 >= fullSyncPeriod } ?? true
        var full = (requested && fullDue) || applied == nil
        if let deletion = stale.takeDeletionTransaction(family: family, now: start) {
            do {
                try await kernel.apply(deletion, operation: "deleting \(deletion.operationCount) stale chains")
                logger.debug("deleted \(deletion.operationCount) stale chains")
            } catch {
                cleanupFailures += 1
                unreportedCleanupFailures += 1
                logger.error("deleting stale chains failed (\(error)); the full sync that follows finds them again")
                full = true
            }
        }

        // The previous ruleset is handed over, not shared, so an incremental compile updates
        // it in place; until the transaction succeeds nothing is remembered.
        let previous = full ? nil : applied
        applied = nil
        let result = compiler.compile(state, previous: consume previous, changed: full ? nil : kind.services(in: state))
        var bytes = 0
        if let delta = result.delta {
            let tx = result.ruleset.partialTransaction(delta)
            if !tx.isEmpty { try await applyMain(tx, operation: "partial transaction") }
            stale.record(tx, at: start)
            lastTransaction = tx.text
            bytes = tx.textBytes
        } else {
            full = true
            let existing: (chains: Set<String>, sets: Set<String>)
            do {
                existing = try await kernel.inventory()
            } catch {
                syncFailures += 1
                stale.reset()
                throw NFTablesError(operation: "reading table \(family.rawValue) \(Self.tableName)", message: "\(error)")
            }
            let objects = NFTExistingObjects(chains: existing.chains, sets: existing.sets)
            let plan = NFTFullSyncPlan(ruleset: result.ruleset, recreateBaseChains: firstSync, existing: objects, chunking: chunking)
            let netlink = plan.isChunked ? kernel.sendsChunkedTransactionsAsNetlink : kernel.sendsFullTransactionsAsNetlink
            // One transaction at a time: built, applied, dropped (a full sync of 10 000 Services
            // is about 15 MB of text). A failed chunk leaves the chunks before it (whole Services).
            for i in plan.steps.indices {
                var tx = plan.transaction(i, encodingNetlink: netlink)
                if let e = tx.encodingError {
                    logger.warning("full transaction not encodable as netlink messages (\(e)); sending it as text")
                    tx = plan.transaction(i)
                }
                let operation = plan.isChunked ? "full transaction \(i + 1) of \(plan.steps.count)" : "full transaction"
                if !tx.isEmpty { try await applyMain(tx, operation: operation) }
                stale.record(tx, at: start)
                lastTransaction = tx.netlinkBatch.map { "(\($0.messageCount) nf_tables messages, \($0.byteCount) bytes)" } ?? tx.text
                bytes += tx.textBytes
            }
            if plan.isChunked {
                logger.info("full sync sent as \(plan.steps.count) transactions of about \(chunking.servicesPerChunk) service ports (the table held no service chain)")
            }
            firstSync = false
            lastFullSync = start
        }
        applied = result.ruleset
        var report = SyncReport(full: full, bytes: bytes)
        report.cleanupFailures = unreportedCleanupFailures
        unreportedCleanupFailures = 0
        return report
    }

    /// Applies one main transaction; on failure counts it and forgets the stale chains (a
    /// failed transaction flushed nothing; kube-proxy clears its list too: the full sync that
    /// follows reads the table and finds them again).
    private func applyMain(_ tx: NFTTransaction, operation: String) async throws {
        do {
            try await kernel.apply(tx, operation: operation)
        } catch {
            syncFailures += 1
            stale.reset()
            throw error
        }
    }

    /// True when the table is gone or its `services` chain lost its rules (someone ran
    /// `nft delete table` or `nft flush table`/`flush ruleset`): the next sync must be full.
    /// One rule dump of one chain over netlink, whatever the size of the table.
    public func externalChangeDetected() async -> Bool {
        guard applied != nil else { return false }
        do {
            if try await kernel.chainHasRules(Self.canaryChain) { return false }
        } catch {
            logger.warning("checking table \(family.rawValue) \(Self.tableName): \(error); resyncing fully")
            return true
        }
        logger.warning("table \(family.rawValue) \(Self.tableName) was deleted or flushed: resyncing fully")
        applied = nil
        return true
    }

    /// Deletes `table ip kube-proxy` and `table ip6 kube-proxy` (what kube-proxy's nftables
    /// mode and this backend leave behind). A missing table is not an error.
    /// - Returns: one message per table that could not be deleted.
    public static func cleanup(lib: LibNFTables, logger: Logger) -> [String] {
        var failures: [String] = []
        for family in NFTFamily.allCases {
            do {
                try lib.run("delete table \(family.rawValue) \(tableName)\n", operation: "deleting table \(family.rawValue) \(tableName)")
                logger.info("deleted table \(family.rawValue) \(tableName)")
            } catch let e as NFTablesError where e.isNotFound {
                continue
            } catch {
                failures.append("\(error)")
            }
        }
        return failures
    }
}
