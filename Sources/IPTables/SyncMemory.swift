// Sluice: a per-node Kubernetes service proxy.
// What the iptables backend remembers between syncs so that a partial sync costs what changed:
// the compile memory (chain names and every service port's top-level rules and chains) and
// the top-level chains as the last restore left them (so unchanged ones are not rewritten).

import ChainHashing
import KernelKit
import SluiceCore

/// A service port's chain names: kube-proxy's SHA-256 based names, worked out once.
struct ChainNameMemo: Sendable {
    /// The suffix of the KUBE-SVC/SVL/EXT/FW chains (`ChainHash.servicePort`).
    var service: String
    /// Endpoint address -> the hash after `KUBE-SEP-`, for the endpoints the last compile used.
    /// Held as values, not text: at 10 000 Services × 10 endpoints the two strings per endpoint
    /// were 13 MiB of the heap.
    var endpoints: [EndpointKey: HashSuffix]

    init(_ name: ServicePortName) {
        service = ChainHash.servicePort(name)
        endpoints = [:]
    }

    init(service: String, endpoints: [EndpointKey: HashSuffix]) {
        self.service = service
        self.endpoints = endpoints
    }
}

/// An endpoint's address and port: the key of its remembered KUBE-SEP chain name.
struct EndpointKey: Hashable, Sendable {
    let ip: IPAddress
    let port: Int

    init(_ endpoint: EndpointInfo) {
        ip = endpoint.ip
        port = endpoint.port
    }

    /// `ip:port`, the text kube-proxy hashes.
    var text: String { ip.joined(port: port) }
}

/// A 16-character chain-name hash (``ChainHash/hash16(_:)``: base32 letters and digits) in two
/// words.
struct HashSuffix: Hashable, Sendable {
    private let high: UInt64
    private let low: UInt64

    /// Packs `text`, which must be 16 ASCII characters.
    init(_ text: String) {
        let bytes = Array(text.utf8)
        precondition(bytes.count == 16, "a chain hash has 16 characters")
        func word(_ part: ArraySlice<UInt8>) -> UInt64 { part.reduce(0) { $0 << 8 | UInt64($1) } }
        high = word(bytes[0..<8])
        low = word(bytes[8..<16])
    }

    /// The 16 characters.
    var text: String {
        String(unsafeUninitializedCapacity: 16) { buffer in
            for i in 0..<8 {
                buffer[i] = UInt8(truncatingIfNeeded: high >> UInt64(56 - 8 * i))
                buffer[8 + i] = UInt8(truncatingIfNeeded: low >> UInt64(56 - 8 * i))
            }
            return 16
        }
    }
}

/// What one service port contributed to the last compile. A class, so that replaying it
/// costs one retain.
final class ServicePortMemo: Sendable {
    let names: ChainNameMemo
    /// Its per-service nat chains.
    let chains: [String]
    /// Its filter rules (all in top-level chains), in order.
    let filterLines: [String]
    /// Its KUBE-SERVICES and KUBE-NODEPORTS nat rules, in order.
    let topNATLines: [String]
    /// Rules in its own chains (for the total-rules metric).
    let chainRules: Int
    let noLocalInternal: Bool
    let noLocalExternal: Bool

    init(names: ChainNameMemo, chains: [String], filterLines: [String], topNATLines: [String], chainRules: Int,
         noLocalInternal: Bool, noLocalExternal: Bool) {
        self.names = names
        self.chains = chains
        self.filterLines = filterLines
        self.topNATLines = topNATLines
        self.chainRules = chainRules
        self.noLocalInternal = noLocalInternal
        self.noLocalExternal = noLocalExternal
    }
}

/// What `IPTablesCompiler.compile(_:kind:existingChains:memory:)` keeps between compiles: every
/// service port's chain names, top-level rules and chains, the sorted service port names and the
/// set of per-service chains in use. A value type: the backend actor owns one.
public struct IPTablesCompileMemory: Sendable {
    var entries: [ServicePortName: ServicePortMemo] = [:]
    var sortedNames: [ServicePortName] = []
    var activeChains: Set<String> = []
    /// Set by a compile that went through every service port; cleared by `invalidate()`.
    var valid = false

    /// An empty memory: the next compile goes through every service port.
    public init() {}

    /// Whether a partial compile can replay unchanged service ports from this memory.
    public var isValid: Bool { valid }

    /// Forgets the per-service contributions (the batch compiled last was not applied), so the
    /// next compile goes through every service port. Chain names, pure functions of their
    /// inputs, are kept.
    public mutating func invalidate() { valid = false }

    /// The chain names remembered for a service port: the KUBE-SVC/SVL/EXT/FW suffix and the
    /// KUBE-SEP chain of each endpoint (`ip:port`) the last compile used.
    public func chainNames(for name: ServicePortName) -> (service: String, endpoints: [String: String])? {
        entries[name].map { entry in
            (entry.names.service,
             Dictionary(uniqueKeysWithValues: entry.names.endpoints.map { ($0.key.text, "KUBE-SEP-" + $0.value.text) }))
        }
    }

    /// A copy sharing no storage with `self`, so that compiling with it copies nothing while
    /// timed (`sluice bench-compile` compiles one state several times from the same memory).
    public func independentCopy() -> IPTablesCompileMemory {
        var out = IPTablesCompileMemory()
        out.entries = Dictionary(minimumCapacity: entries.count)
        for (k, v) in entries { out.entries[k] = v }
        out.sortedNames = Array(sortedNames)
        out.sortedNames.reserveCapacity(sortedNames.count + 1)
        out.activeChains = Set(minimumCapacity: activeChains.count)
        for c in activeChains { out.activeChains.insert(c) }
        out.valid = valid
        return out
    }

    /// Brings `sortedNames` to `state`'s service ports: drops the removed ones (their chains
    /// become stale candidates and leave the active set) and inserts the new ones in order.
    /// - Returns: the service ports in order, with their info.
    mutating func updateSortedNames(for state: ProxyState, staleChains: inout [String]) -> [(ServicePortName, ServicePortInfo)] {
        var kept: [(ServicePortName, ServicePortInfo)] = []
        kept.reserveCapacity(state.servicePorts.count + 1)
        var removed = false
        for name in sortedNames {
            if let info = state.servicePorts[name] {
                kept.append((name, info))
            } else if let old = entries.removeValue(forKey: name) {
                removed = true
                for c in old.chains where activeChains.remove(c) != nil { staleChains.append(c) }
            }
        }
        if kept.count != state.servicePorts.count {
            let known = Set(kept.map(\.0))
            let added = state.servicePorts.filter { !known.contains($0.key) }.map { ($0.key, $0.value) }.sorted { $0.0 < $1.0 }
            if added.count > 64 {
                kept = (kept + added).sorted { $0.0 < $1.0 }
            } else {
                for item in added {
                    var lo = 0, hi = kept.count
                    while lo < hi {
                        let mid = (lo + hi) / 2
                        if kept[mid].0 < item.0 { lo = mid + 1 } else { hi = mid }
                    }
                    kept.insert(item, at: lo)
                }
            }
            sortedNames = kept.map(\.0)
        } else if removed {
            sortedNames = kept.map(\.0)
        }
        return kept
    }
}

/// The rules of our top-level chains (`Chain.filterTopLevel`, KUBE-FIREWALL, `Chain.natTopLevel`)
/// as a batch writes them, by table and chain.
public struct TopLevelRules: Sendable, Equatable {
    /// table -> chain -> rule lines.
    public var chains: [Table: [String: [String]]] = [:]

    /// None known: nothing is left out of the next batch.
    public init() {}

    /// The top-level chains of each table, in declaration order.
    static let names: [Table: [String]] = [
        .filter: Chain.filterTopLevel + [Chain.kubeletFirewall],
        .nat: Chain.natTopLevel,
    ]
}

extension CompiledRules {
    /// The top-level chains this batch declares, with their rules.
    public func topLevelRules() -> TopLevelRules {
        var out = TopLevelRules()
        for (table, batch) in [(Table.filter, filter), (.nat, nat)] {
            let names = TopLevelRules.names[table] ?? []
            let split = TopLevelSplit(batch, names: names)
            var chains: [String: [String]] = [:]
            for (i, rules) in split.rules.enumerated() where split.declared[i] { chains[names[i]] = rules }
            out.chains[table] = chains
        }
        return out
    }

    /// This batch with the top-level chains written only as far as they differ from `applied`
    /// (what the last successful restore left in them):
    ///
    /// - a chain whose rules equal those in `applied` is left out entirely: neither its
    ///   `:CHAIN` line, which with `--noflush` would flush the chain, nor its rules;
    /// - a chain that differs by a few rules (a Service added or deleted) is edited in place:
    ///   `-D CHAIN <spec>` for each rule that goes, then, in nat KUBE-SERVICES, `-I CHAIN 1` for
    ///   each rule that comes (its per-service rules are order-free; the NodePort dispatch stays
    ///   last: `TopLevelEdits.unordered`), and in the other chains `-I CHAIN <position>` (or `-A`
    ///   at the end), at the position the rule has in the new rules (`TopLevelEdits.edits`);
    /// - any other chain is written whole, as a full sync writes it.
    ///
    /// Per-service chains and deletions are kept. The edits come first among the table's rule
    /// lines, so a deleted rule is gone before its target chain is deleted (`-X`), and an
    /// inserted rule's target chain is declared by the same batch's `:CHAIN` lines.
    ///
    /// This is a deliberate departure from kube-proxy, whose partial sync always rewrites every
    /// top-level chain (KUBE-SERVICES alone is one rule per service port): see
    /// docs/iptables-sync.md. With the nft back end a restore costs what it writes, so an
    /// endpoint change at 10 000 services costs about a tenth as much without them.
    /// - Returns: the batch, the `table/chain` names left out, and `topLevelRules()` of `self`
    ///   (what the top-level chains hold once the batch is applied).
    public func omittingUnchangedTopLevelChains(_ applied: TopLevelRules)
        -> (CompiledRules, omitted: [String], topLevel: TopLevelRules) {
        var out = self
        var omitted: [String] = []
        var topLevel = TopLevelRules()
        for table in [Table.filter, .nat] {
            let batch = table == .filter ? filter : nat
            let names = TopLevelRules.names[table] ?? []
            let split = TopLevelSplit(batch, names: names)
            var drop = [Bool](repeating: false, count: names.count)
            var edits: [String] = []
            var chains: [String: [String]] = [:]
            for (i, name) in names.enumerated() where split.declared[i] {
                chains[name] = split.rules[i]
                guard let before = applied.chains[table]?[name] else { continue }
                if before == split.rules[i] {
                    drop[i] = true
                    omitted.append("\(table.rawValue)/\(name)")
                } else if table == .nat && name == Chain.services {
                    // Order-free: the kernel keeps the order the edits leave (see `TopLevelEdits.unordered`).
                    guard let e = TopLevelEdits.unordered(chain: name, from: before, to: split.rules[i]) else { continue }
                    drop[i] = true
                    chains[name] = e.result
                    if e.lines.isEmpty { omitted.append("\(table.rawValue)/\(name)") }
                    edits += e.lines
                } else if let e = TopLevelEdits.edits(chain: name, from: before, to: split.rules[i]) {
                    drop[i] = true
                    edits += e
                }
            }
            topLevel.chains[table] = chains
            guard drop.contains(true) else { continue }
            var kept = TableBatch()
            kept.chains.reserveCapacity(batch.chains.count)
            for (line, tag) in zip(batch.chains, split.chainTags) where tag < 0 || !drop[tag] { kept.chains.append(line) }
            kept.rules.reserveCapacity(batch.rules.count + edits.count)
            kept.rules += edits
            for (line, tag) in zip(batch.rules, split.ruleTags) where tag < 0 || !drop[tag] { kept.rules.append(line) }
            if table == .filter { out.filter = kept } else { out.nat = kept }
        }
        return (out, omitted, topLevel)
    }
}

/// In-place edits of one top-level chain, from the rules the kernel holds to the new ones.
enum TopLevelEdits {
    /// The rule that must stay last in nat KUBE-SERVICES jumps here.
    private static let nodePortsJump = " -j \(Chain.nodePorts)"

    /// Edits of nat KUBE-SERVICES that keep its meaning but not kube-proxy's order: `-D CHAIN
    /// <rule>` for each rule that goes, then `-I CHAIN 1 <rule>` for each that comes (in reverse,
    /// so the new rules head the chain in their own order), and `result`, the chain as the kernel
    /// holds it afterwards. Nil when writing the chain whole is the better or the only safe choice:
    /// the NodePort dispatch (the trailing rules jumping to KUBE-NODEPORTS) changes or is not at
    /// the end, a rule appears twice, or more than a quarter of the rules change. An unchanged
    /// set of rules in another order gives no lines.
    ///
    /// Every other rule of the chain jumps on its own destination address, protocol and port (a
    /// cluster IP, external IP or load-balancer IP of one service port, which the API keeps
    /// distinct), so at most one of them matches a packet and their order is not part of the
    /// chain's meaning; kube-proxy itself writes them in Go map order, different on every sync.
    /// `-I CHAIN 1` needs no rule lookup, where `-I CHAIN <n>` makes iptables-nft-restore read and
    /// walk the chain's rules first (docs/iptables-sync.md).
    static func unordered(chain: String, from old: [String], to new: [String]) -> (lines: [String], result: [String])? {
        func tail(_ rules: [String]) -> Int {
            var k = rules.count
            while k > 0 && rules[k - 1].hasSuffix(nodePortsJump) { k -= 1 }
            return k
        }
        let oldBody = tail(old), newBody = tail(new)
        guard old[oldBody...] == new[newBody...] else { return nil }
        if old[..<oldBody].contains(where: { $0.hasSuffix(nodePortsJump) }) || new[..<newBody].contains(where: { $0.hasSuffix(nodePortsJump) }) {
            return nil
        }
        var inOld = Set<String>(minimumCapacity: old.count)
        for line in old where !inOld.insert(line).inserted { return nil }
        var inNew = Set<String>(minimumCapacity: new.count)
        for line in new where !inNew.insert(line).inserted { return nil }
        let limit = max(old.count, new.count) / 4
        let deleted = old[..<oldBody].filter { !inNew.contains($0) }
        let inserted = new[..<newBody].filter { !inOld.contains($0) }
        guard deleted.count + inserted.count <= limit || (deleted.isEmpty && inserted.isEmpty) else { return nil }
        let head = "-A \(chain) "
        var lines: [String] = []
        lines.reserveCapacity(deleted.count + inserted.count)
        for line in deleted {
            guard line.hasPrefix(head) else { return nil }
            lines.append("-D \(chain) \(line.dropFirst(head.count))")
        }
        for line in inserted.reversed() {
            guard line.hasPrefix(head) else { return nil }
            lines.append("-I \(chain) 1 \(line.dropFirst(head.count))")
        }
        var result = inserted
        result.reserveCapacity(new.count)
        for line in old[..<oldBody] where inNew.contains(line) { result.append(line) }
        result += old[oldBody...]
        return (lines, result)
    }

    /// The `-D`/`-I`/`-A` lines that turn `old` into `new`, or nil when writing the chain whole
    /// is the better (or the only safe) choice: a rule appears twice in either list (a `-D` by
    /// specification would be ambiguous), the rules both lists keep are not in the same order,
    /// or more than a quarter of the rules change.
    ///
    /// Deletions go first, by rule specification; then each new rule is inserted, in the order
    /// of `new`, at its final position: every rule before it in `new` is in the chain by then
    /// (kept, or inserted just before), so `-I CHAIN <index + 1>` puts it exactly there.
    static func edits(chain: String, from old: [String], to new: [String]) -> [String]? {
        let limit = max(old.count, new.count) / 4
        guard limit > 0 else { return nil }
        var inOld = Set<String>(minimumCapacity: old.count)
        for line in old where !inOld.insert(line).inserted { return nil }
        var inNew = Set<String>(minimumCapacity: new.count)
        for line in new where !inNew.insert(line).inserted { return nil }
        var deleted: [String] = []
        for line in old where !inNew.contains(line) {
            deleted.append(line)
            if deleted.count > limit { return nil }
        }
        var insertedCount = 0
        for line in new where !inOld.contains(line) {
            insertedCount += 1
            if deleted.count + insertedCount > limit { return nil }
        }
        // The kept rules must keep their order.
        var keptOld = old.lazy.filter { inNew.contains($0) }.makeIterator()
        for line in new where inOld.contains(line) {
            guard keptOld.next() == line else { return nil }
        }
        let head = "-A \(chain) "
        func spec(_ line: String) -> Substring? {
            line.hasPrefix(head) ? line.dropFirst(head.count) : nil
        }
        var out: [String] = []
        out.reserveCapacity(deleted.count + insertedCount)
        for line in deleted {
            guard let s = spec(line) else { return nil }
            out.append("-D \(chain) \(s)")
        }
        var length = old.count - deleted.count
        for (i, line) in new.enumerated() where !inOld.contains(line) {
            guard let s = spec(line) else { return nil }
            out.append(i == length ? line : "-I \(chain) \(i + 1) \(s)")
            length += 1
        }
        return out
    }
}

/// One table batch's lines tagged with the top-level chain they belong to (-1 for none).
private struct TopLevelSplit {
    var chainTags: [Int] = []
    var ruleTags: [Int] = []
    var declared: [Bool]
    var rules: [[String]]

    init(_ batch: TableBatch, names: [String]) {
        declared = [Bool](repeating: false, count: names.count)
        rules = [[String]](repeating: [], count: names.count)
        chainTags.reserveCapacity(batch.chains.count)
        for line in batch.chains {
            let tag = TopLevelSplit.index(of: TopLevelSplit.name(line, after: 1), in: names)
            chainTags.append(tag)
            if tag >= 0 { declared[tag] = true }
        }
        ruleTags.reserveCapacity(batch.rules.count)
        for line in batch.rules {
            let tag = line.hasPrefix("-A ") ? TopLevelSplit.index(of: TopLevelSplit.name(line, after: 3), in: names) : -1
            ruleTags.append(tag)
            if tag >= 0 { rules[tag].append(line) }
        }
    }

    /// The word that starts `offset` bytes into `line`.
    static func name(_ line: String, after offset: Int) -> Substring {
        let utf8 = line.utf8
        guard utf8.count > offset else { return "" }
        let start = utf8.index(utf8.startIndex, offsetBy: offset)
        let end = utf8[start...].firstIndex(of: UInt8(ascii: " ")) ?? utf8.endIndex
        return Substring(utf8[start..<end])
    }

    static func index(of name: Substring, in names: [String]) -> Int {
        for (i, n) in names.enumerated() where n.utf8.count == name.utf8.count && name == n { return i }
        return -1
    }
}
