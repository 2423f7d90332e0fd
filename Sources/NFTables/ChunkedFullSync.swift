// Sluice: a per-node Kubernetes service proxy.
// The chunked full sync of the nftables mode: one full sync into an empty table cut into
// transactions of a bounded number of Services, because the kernel's cost of one transaction
// grows with the square of the anonymous sets it binds (docs/nftables-kernel.md). Every
// transaction leaves a consistent table: no map element points at a missing or half-written
// chain. The same design as the iptables mode's `FullSyncPlan` (Sources/IPTables/ChunkedSync.swift).

import SluiceCore

/// How a full sync of the nftables mode is cut into transactions.
public struct NFTFullSyncChunking: Sendable, Hashable {
    /// Service ports per transaction (a Service's ports are never split: a chunk ends at a
    /// Service boundary once it holds at least this many); 0 sends every full sync as one
    /// transaction.
    public var servicesPerChunk: Int

    /// Creates a setting.
    public init(servicesPerChunk: Int) {
        self.servicesPerChunk = max(0, servicesPerChunk)
    }

    /// One transaction, whatever the size (the form before chunking; tests compare with it).
    public static let off = NFTFullSyncChunking(servicesPerChunk: 0)

    /// The default: 500 service ports per transaction. Measured at 10 000 Services × 10
    /// endpoints, release build, one run (docs/nftables-kernel.md, "Chunked cold full syncs"):
    /// 100 → 22.7 s, 250 → 18.7–20.1 s, 500 → 18.1 s, 1 000 → 20.8 s, 3 000 → 33.1 s for
    /// the first sync, where `nft -f` of the one transaction took 215.7 s.
    public static let `default` = NFTFullSyncChunking(servicesPerChunk: 500)

    /// The environment variable that overrides the default (measurements and tests).
    public static let environmentVariable = "SLUICE_NFT_CHUNK_SERVICES"

    /// `SLUICE_NFT_CHUNK_SERVICES` from `environment` (a number of service ports per
    /// transaction, 0 for one transaction), or ``default`` when it is absent or not a number.
    public static func from(environment: [String: String]) -> NFTFullSyncChunking {
        guard let v = environment[environmentVariable], let n = Int(v.filter { $0 != " " }), n >= 0 else {
            return .default
        }
        return NFTFullSyncChunking(servicesPerChunk: n)
    }
}

/// The transactions of one full sync, in the order they are applied: a pure value computed
/// from the desired ruleset (the compile of the state), what the table holds (its chain and
/// set names as read back) and whether this is the process's first sync. The backend applies
/// them; `sluice compile --proxy-mode nftables` prints them.
///
/// When the sync is *chunked* (``isChunked``):
///
/// 1. *The fixed step*: the table, the base and fixed chains with their rules, every set and
///    map declared and flushed, `nodeport-ips`, and the removal of other layouts' fixed chains
///    and of unused affinity sets: exactly the head of the one-transaction full sync. The
///    verdict maps are empty, so every Service in it falls through (none was served: see below).
/// 2. *Service steps*: the service ports `ports[range]`, whole Services in sorted order: their
///    affinity sets, chains (declared, flushed, written) and the set and map elements that
///    belong to them (`service-ips`, `service-nodeports`, `no-endpoint-*`, `firewall-ips`,
///    `cluster-ips`, …). An element goes in the step that writes the chain its verdict names,
///    so no element ever points at a missing or half-written chain.
///
/// A sync is chunked only when the table holds no per-service chain (absent at start-up,
/// deleted or emptied by someone, or a table with only fixed chains), chunking is on and there
/// are more service ports than one chunk holds. A full sync over a table that serves Services
/// stays one transaction: it must flush the verdict maps (the only way to drop elements whose
/// Services the memory does not know), and flushing them in the first chunk would leave the
/// Services of later chunks without their elements until their chunk lands; dropping only the
/// elements nothing wants would need the table's elements read back first (tens of MB at
/// 10 000 Services). The first full sync over a table a running proxy left (a restart) is
/// therefore still one transaction.
///
/// A failed step leaves the steps before it applied (whole Services); the sync fails, and the
/// next one is full and, finding service chains, one transaction that rewrites everything.
public struct NFTFullSyncPlan: Sendable {
    /// One transaction of the plan.
    public enum Step: Sendable, Hashable {
        /// The whole full sync in one transaction (``NFTRuleset/fullTransaction(recreateBaseChains:existing:recordingOperations:encodingNetlink:)``).
        case whole
        /// The table, the fixed chains and rules, every set and map declared and flushed.
        case fixed
        /// The Services of service ports `ports[range]`, with their elements.
        case services(Range<Int>)
    }

    /// The transactions, in order.
    public let steps: [Step]
    /// The desired ruleset.
    public let ruleset: NFTRuleset
    /// The service ports, sorted (the order of the service steps).
    public let ports: [ServicePortName]
    private let recreateBaseChains: Bool
    private let existing: NFTExistingObjects
    /// Element keys by service step (index into `steps`).
    private let elementsByStep: [Int: [NFTElementKey]]

    /// Whether the sync is cut into several transactions.
    public var isChunked: Bool { steps.first != .whole }

    /// Whether a full sync with `existing` in the table may be chunked: the table holds no
    /// per-service chain (so no Service is being served and flushing the maps first loses none).
    public static func mayChunk(existing: NFTExistingObjects) -> Bool {
        !existing.chains.contains(where: NFTChainNames.isServiceChain)
    }

    /// Plans the full sync of `ruleset`.
    /// - Parameters:
    ///   - recreateBaseChains: the process's first sync (see ``NFTRuleset/fullTransaction(recreateBaseChains:existing:recordingOperations:encodingNetlink:)``).
    ///   - existing: the table's chains and sets as read back (empty when absent).
    ///   - chunking: how many service ports per transaction.
    public init(ruleset: NFTRuleset, recreateBaseChains: Bool = false, existing: NFTExistingObjects = NFTExistingObjects(),
                chunking: NFTFullSyncChunking) {
        self.ruleset = ruleset
        self.recreateBaseChains = recreateBaseChains
        self.existing = existing
        let limit = chunking.servicesPerChunk
        guard limit > 0, ruleset.services.count > limit, Self.mayChunk(existing: existing) else {
            steps = [.whole]
            ports = []
            elementsByStep = [:]
            return
        }
        let ports = ruleset.services.keys.sorted()
        self.ports = ports
        var steps: [Step] = [.fixed]
        var begin = 0
        var stepOfChain: [String: Int] = [:]
        var stepOfPort: [ServicePortName: Int] = [:]
        func close(_ end: Int) {
            let index = steps.count
            steps.append(.services(begin..<end))
            for p in ports[begin..<end] {
                stepOfPort[p] = index
                for c in ruleset.services[p]!.chainNames { stepOfChain[c] = index }
            }
            begin = end
        }
        for i in ports.indices where i + 1 - begin >= limit {
            // A Service's ports stay together: cut only where the next port is another Service's.
            if i + 1 == ports.count || ports[i + 1].service != ports[i].service { close(i + 1) }
        }
        if begin < ports.count { close(ports.count) }
        self.steps = steps
        // Each element goes with the chain its verdict names (`goto X`, `jump X`); an element
        // naming no service chain (a set element, a verdict to a fixed chain) with its owner.
        var byStep: [Int: [NFTElementKey]] = [:]
        let last = steps.count - 1
        for key in ruleset.claims.keys.sorted() {
            let claim = ruleset.claims[key]!
            var step = stepOfPort[claim.owner] ?? last
            if let value = claim.element.value, let chain = Self.verdictChain(value), let s = stepOfChain[chain] {
                step = s
            }
            byStep[step, default: []].append(key)
        }
        elementsByStep = byStep
    }

    /// The chain a map element's value jumps or goes to (`goto X`, `jump X`), if any.
    static func verdictChain(_ value: String) -> String? {
        let words = value.split(separator: " ")
        guard words.count >= 2, words[0] == "goto" || words[0] == "jump" else { return nil }
        return String(words[1])
    }

    /// The transaction of step `index`.
    /// - Parameters:
    ///   - recordingOperations: keep the commands as values too.
    ///   - encodingNetlink: encode the commands as one netlink batch instead of text.
    public func transaction(_ index: Int, recordingOperations: Bool = false, encodingNetlink: Bool = false) -> NFTTransaction {
        switch steps[index] {
        case .whole:
            return ruleset.fullTransaction(recreateBaseChains: recreateBaseChains, existing: existing,
                                           recordingOperations: recordingOperations, encodingNetlink: encodingNetlink)
        case .fixed:
            var tx = NFTTransaction(family: ruleset.family, recordingOperations: recordingOperations, encodingNetlink: encodingNetlink)
            ruleset.addFixedPart(to: &tx, recreateBaseChains: recreateBaseChains)
            ruleset.removeOtherObjects(from: &tx, existing: existing, activeChains: [], activeSets: ruleset.affinitySetNames)
            tx.endNetlinkBatch()
            return tx
        case .services(let range):
            var tx = NFTTransaction(family: ruleset.family, recordingOperations: recordingOperations, encodingNetlink: encodingNetlink)
            _ = ruleset.addServices(ports[range], to: &tx)
            for key in elementsByStep[index] ?? [] { tx.addElement(ruleset.claims[key]!.element) }
            tx.endNetlinkBatch()
            return tx
        }
    }

    /// Every transaction, in order (tests and small tables; the backend builds them one at a time).
    public func transactions(recordingOperations: Bool = false) -> [NFTTransaction] {
        steps.indices.map { transaction($0, recordingOperations: recordingOperations) }
    }

    /// The `nft -f` input of the whole plan: each transaction's text after a comment line
    /// naming it (`nft -f` ignores comments). Applied with one `nft -f` it gives the table the
    /// transactions give one after another (and the one-transaction full sync gives).
    public func text() -> String {
        guard isChunked else { return transaction(0).text }
        var out = ""
        for i in steps.indices {
            out += "# transaction \(i + 1) of \(steps.count)\n"
            out += transaction(i).text
        }
        return out
    }
}

extension NFTRuleset {
    /// The head of a full sync: the table, (with `recreateBaseChains`) every base chain added
    /// and deleted, every fixed chain declared and flushed, every set and map declared and
    /// flushed (`nodeport-ips` filled or deleted), the fixed chains' rules.
    func addFixedPart(to tx: inout NFTTransaction, recreateBaseChains: Bool) {
        tx.addTable(comment: "rules for kube-proxy")
        if recreateBaseChains {
            for c in fixed.chains where c.hook != nil {
                tx.addChain(NFTChain(name: c.name))
                tx.deleteChain(c.name)
            }
        }
        // Every chain and set exists before any rule or element refers to it.
        for c in fixed.chains {
            tx.addChain(c)
            tx.flushChain(c.name)
        }
        for c in fixed.containers {
            tx.addContainer(c)
            if c.name == NFTablesCompiler.Names.nodePortIPs {
                if let ips = fixed.nodePortIPs {
                    tx.flushContainer(c)
                    for ip in ips { tx.addElement(NFTElement(c.name, key: ip)) }
                } else {
                    tx.deleteSet(c.name)
                }
            } else {
                tx.flushContainer(c)
            }
        }
        for c in fixed.chains {
            if let values = c.ruleValues {
                for r in values { tx.addRule(c.name, r) }
            } else {
                for r in c.rules { tx.addRule(c.name, r) }
            }
        }
    }

    /// The Services of `names`: affinity sets and chains declared (chains flushed) first, then
    /// every chain's rules. Returns the chain and affinity set names written.
    func addServices<C: Collection>(_ names: C, to tx: inout NFTTransaction) -> (chains: Set<String>, sets: Set<String>)
    where C.Element == ServicePortName {
        var active = Set<String>()
        var activeSets = Set<String>()
        for name in names {
            let f = services[name]!
            for s in f.affinitySets {
                tx.addContainer(s)
                activeSets.insert(s.name)
            }
            for name in f.chainNames {
                tx.addChain(NFTChain(name: name))
                tx.flushChain(name)
                active.insert(name)
                tx.writtenChains.append(name)
            }
        }
        for name in names {
            for c in services[name]!.ruleChains {
                for r in c.rules { tx.addRule(c.name, r) }
            }
        }
        return (active, activeSets)
    }

    /// The tail of a full sync: other layouts' fixed chains in `existing` flushed and deleted,
    /// per-service chains in `existing` not in `activeChains` flushed (to delete later), affinity
    /// sets in `existing` not in `activeSets` deleted.
    func removeOtherObjects(from tx: inout NFTTransaction, existing: NFTExistingObjects, activeChains: Set<String>,
                            activeSets: Set<String>) {
        // Fixed chains of other kube-proxy versions (v1.31-v1.33's `filter-prerouting` and
        // `filter-output-post-dnat`): flushed, then deleted, so no old hook stays in the path.
        let known = Set(fixed.chains.map(\.name))
        let unknown = existing.chains.filter { !NFTChainNames.isServiceChain($0) && !known.contains($0) }.sorted()
        for chain in unknown { tx.flushChain(chain) }
        for chain in unknown { tx.deleteChain(chain) }
        for chain in existing.chains.sorted() where NFTChainNames.isServiceChain(chain) && !activeChains.contains(chain) {
            tx.flushChain(chain)
            tx.flushedStaleChains.append(chain)
        }
        for set in existing.sets.sorted() where NFTChainNames.isAffinitySet(set) && !activeSets.contains(set) {
            tx.deleteSet(set)
        }
    }
}
