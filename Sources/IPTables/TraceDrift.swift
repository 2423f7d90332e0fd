// Sluice: a per-node Kubernetes service proxy.
// Drift between what a full iptables sync would write and what the kernel holds: the nat and
// filter chains the proxy owns, rule by rule in canonical form, and the jump rules from the
// built-in chains. Read-only: two `iptables-save -t TABLE` calls.

import KernelKit
import SluiceCore

/// Compares desired and actual iptables rule sets.
public enum IPTablesDrift {
    /// The tables compared.
    public static let tables = ["nat", "filter"]

    /// Chains this proxy owns in iptables mode (other KUBE-* chains, such as the kubelet's
    /// KUBE-KUBELET-CANARY, are not compared).
    public static func owns(_ chain: String) -> Bool {
        Chain.isServiceChain(chain) || Chain.filterTopLevel.contains(chain) || Chain.natTopLevel.contains(chain)
            || chain == Chain.kubeletFirewall || chain == Chain.canary
    }

    /// The desired rule set: the built-in jump rules, the canary chains and the compiled batch.
    public static func desired(_ compiled: CompiledRules) -> ParsedRuleSet {
        var set = IPTablesTracer(compiled: compiled, localAddresses: []).rules
        for t in tables { set.tables[t, default: ParsedTable(name: t)].declare(Chain.canary) }
        return set
    }

    /// A desired rule set from a restore batch and the jump rules kept in the built-in chains
    /// (another mode's: IPVS mode has its own batch and jumps).
    public static func desired(restoreText: String, jumps: [JumpRule]) -> ParsedRuleSet {
        var base = ""
        for t in tables {
            base += "*\(t)\n"
            for b in t == "nat" ? ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] : ["INPUT", "FORWARD", "OUTPUT"] { base += ":\(b) ACCEPT [0:0]\n" }
            for rule in jumps where rule.table.rawValue == t {
                base += "-A \(rule.source) " + rule.ruleArgs.map { $0.contains(" ") ? "\"\($0)\"" : $0 }.joined(separator: " ") + "\n"
            }
            base += "COMMIT\n"
        }
        return ParsedRuleSet.parse(restoreText, into: ParsedRuleSet.parse(base))
    }

    /// The differences, per owned chain and jump rule.
    /// - Parameter owns: the chains compared (default: iptables mode's); other chains are not the proxy's.
    public static func compare(desired: ParsedRuleSet, actual: ParsedRuleSet,
                               owns: (String) -> Bool = IPTablesDrift.owns) -> [DriftItem] {
        var items: [DriftItem] = []
        let owners = chainOwners(desired).merging(chainOwners(actual)) { a, _ in a }
        func owner(_ r: ParsedRule) -> String {
            if let o = owners[r.chain] { return o }
            if let first = r.comment?.split(separator: " ").first, first.contains("/") { return String(first) }
            return ""
        }
        for t in tables {
            let want = desired.tables[t] ?? ParsedTable(name: t)
            let have = actual.tables[t] ?? ParsedTable(name: t)
            // Built-in chains: each desired jump rule must be there (anywhere in the chain).
            for chain in want.chainOrder where want.policies[chain] != "-" {
                let present = Set((have.rules[chain] ?? []).map(\.canonical))
                for r in want.rules[chain] ?? [] where !present.contains(r.canonical) {
                    items.append(DriftItem(kind: .missing, owner: "", object: "\(t) \(chain) jump rule", want: r.text, have: nil))
                }
            }
            let chains = (want.chainOrder + have.chainOrder.filter { want.policies[$0] == nil }).filter { owns($0) && want.policies[$0] != "ACCEPT" && want.policies[$0] != "DROP" }
            for chain in chains {
                let w = want.rules[chain], h = have.rules[chain]
                let chainOwner = owners[chain] ?? ""
                guard let w else {
                    items.append(DriftItem(kind: .extra, owner: chainOwner, object: "\(t) chain \(chain)", want: nil,
                                           have: "\(h?.count ?? 0) rules"))
                    continue
                }
                guard let h else {
                    items.append(DriftItem(kind: .missing, owner: chainOwner, object: "\(t) chain \(chain)", want: "\(w.count) rules", have: nil))
                    continue
                }
                items += compareRules(table: t, chain: chain, want: w, have: h, owner: owner)
            }
        }
        return items.sorted()
    }

    private static func compareRules(table: String, chain: String, want: [ParsedRule], have: [ParsedRule],
                                     owner: (ParsedRule) -> String) -> [DriftItem] {
        var haveCount: [String: Int] = [:]
        for r in have { haveCount[r.canonical, default: 0] += 1 }
        var wantCount: [String: Int] = [:]
        for r in want { wantCount[r.canonical, default: 0] += 1 }
        var missing: [ParsedRule] = []
        var budget = haveCount
        for r in want {
            if budget[r.canonical, default: 0] > 0 { budget[r.canonical]! -= 1 } else { missing.append(r) }
        }
        var extra: [ParsedRule] = []
        budget = wantCount
        for r in have {
            if budget[r.canonical, default: 0] > 0 { budget[r.canonical]! -= 1 } else { extra.append(r) }
        }
        var items: [DriftItem] = []
        let object = "\(table) \(chain) rule"
        // A missing and an extra rule with the same comment and target are one changed rule.
        for m in missing {
            if let j = extra.firstIndex(where: { $0.comment == m.comment && $0.target == m.target && $0.comment != nil }) {
                let e = extra.remove(at: j)
                items.append(DriftItem(kind: .different, owner: owner(m), object: object, want: m.text, have: e.text))
            } else {
                items.append(DriftItem(kind: .missing, owner: owner(m), object: object, want: m.text, have: nil))
            }
        }
        for e in extra { items.append(DriftItem(kind: .extra, owner: owner(e), object: object, want: nil, have: e.text)) }
        if items.isEmpty && !sameMeaningfulOrder(table: table, chain: chain, want, have) {
            items.append(DriftItem(kind: .different, owner: "", object: "\(table) chain \(chain) rule order",
                                   want: want.map(\.text).joined(separator: "\n"), have: have.map(\.text).joined(separator: "\n")))
        }
        return items
    }

    /// Whether two rule lists with the same rules are in an equivalent order. In nat
    /// KUBE-SERVICES the per-service rules match distinct destinations, so their order carries
    /// no meaning (a partial sync inserts a new Service's rules at the head of the chain; see
    /// docs/iptables-sync.md); only the NodePort jump must stay last.
    private static func sameMeaningfulOrder(table: String, chain: String, _ want: [ParsedRule], _ have: [ParsedRule]) -> Bool {
        guard table == "nat" && chain == Chain.services else { return want.map(\.canonical) == have.map(\.canonical) }
        func normalised(_ rules: [ParsedRule]) -> [String] {
            var k = rules.count
            while k > 0 && rules[k - 1].target == Chain.nodePorts { k -= 1 }
            // A NodePort jump before other rules is out of place: keep the order as it is.
            if rules[..<k].contains(where: { $0.target == Chain.nodePorts }) { return rules.map(\.canonical) }
            return rules[..<k].map(\.canonical).sorted() + rules[k...].map(\.canonical)
        }
        return normalised(want) == normalised(have)
    }

    /// Per-service chain -> `ns/name:port`, from rule comments and from the jumps to the chain.
    static func chainOwners(_ set: ParsedRuleSet) -> [String: String] {
        var out: [String: String] = [:]
        for t in tables {
            guard let table = set.tables[t] else { continue }
            for pass in 0..<3 {
                for chain in table.chainOrder {
                    for r in table.rules[chain] ?? [] {
                        let fromComment = r.comment?.split(separator: " ").first.flatMap { $0.contains("/") ? String($0) : nil }
                        if pass == 0, Chain.isServiceChain(chain), out[chain] == nil, let o = fromComment { out[chain] = o }
                        if let target = r.target, Chain.isServiceChain(target), out[target] == nil,
                           let o = fromComment ?? (Chain.isServiceChain(chain) ? out[chain] : nil) {
                            out[target] = o
                        }
                    }
                }
            }
        }
        return out
    }
}

/// The iptables drift check: compiles the state, reads the kernel's nat and filter tables.
public struct IPTablesDriftChecker: DriftChecking {
    public var mode: String { "iptables" }
    /// Compiler options (as the backend runs with).
    public let options: IPTablesOptions
    /// The tools of this family and back end.
    public let tools: IPTablesTools
    private let runner: any CommandRunner

    /// Creates a checker.
    public init(options: IPTablesOptions, tools: IPTablesTools, runner: any CommandRunner) {
        self.options = options
        self.tools = tools
        self.runner = runner
    }

    /// Reads the kernel's nat and filter tables (iptables-save, one call per table).
    public func readKernel() async throws -> ParsedRuleSet {
        var set = ParsedRuleSet()
        for t in IPTablesDrift.tables.compactMap(Table.init(rawValue:)) {
            set = ParsedRuleSet.parse(try await IPTablesRestorer(tools: tools, runner: runner).save(t), into: set)
        }
        return set
    }

    public func check(_ state: ProxyState) async throws -> DriftReport {
        // What a full sync would write: the backend's planner, as `sluice compile` prints it.
        var memory = IPTablesSyncMemory()
        let compiled = IPTablesPlanner(options: options, batching: .classic)
            .plan(state, kind: .full, existingChains: [], memory: &memory).compiled
        let actual = try await readKernel()
        return DriftReport(mode: mode, family: options.family,
                           items: IPTablesDrift.compare(desired: IPTablesDrift.desired(compiled), actual: actual))
    }
}
