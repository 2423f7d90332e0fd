// Sluice: a per-node Kubernetes service proxy.
// A port of kube-proxy's test helpers for iptables-restore text: the dump parser, the
// sorting normalisation its golden tests compare after (sortIPTablesRules), and the
// jump-consistency check (checkIPTablesRuleJumps).

/// A parsed iptables-restore batch.
public struct RestoreDump: Sendable, Equatable {
    /// One chain: its rules in emission order and whether the batch deletes it.
    public struct ChainDump: Sendable, Equatable {
        public var name: String
        public var rules: [String] = []
        public var deleted = false
    }

    /// One table.
    public struct TableDump: Sendable, Equatable {
        public var name: String
        public var chains: [ChainDump] = []
    }

    public var tables: [TableDump] = []

    /// A parse failure with the offending line.
    public struct ParseError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Parses restore text (kube-proxy's ParseIPTablesDump).
    public static func parse(_ text: String) throws -> RestoreDump {
        var dump = RestoreDump()
        enum State { case table, chainDecl, chains }
        var state = State.table
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            let line = String(raw).trimmingCharacters(in: " \t\r")
            if line.isEmpty || line.hasPrefix("#") { continue }
            var handled = false
            while !handled {
                handled = true
                switch state {
                case .table:
                    guard line.hasPrefix("*") else { throw ParseError(description: "expected a table, found \(line)") }
                    dump.tables.append(TableDump(name: String(line.dropFirst())))
                    state = .chainDecl
                case .chainDecl:
                    if line.hasPrefix(":"), line.hasSuffix("]"), let sp = line.firstIndex(of: " "), line[sp...].hasPrefix(" - [") {
                        dump.tables[dump.tables.count - 1].chains.append(ChainDump(name: String(line[line.index(after: line.startIndex)..<sp])))
                    } else {
                        state = .chains
                        handled = false
                    }
                case .chains:
                    let t = dump.tables.count - 1
                    if line.hasPrefix("-A ") {
                        let name = String(line.dropFirst(3).prefix { $0 != " " })
                        guard let c = dump.tables[t].chains.firstIndex(where: { $0.name == name }) else {
                            throw ParseError(description: "rule for undeclared chain: \(line)")
                        }
                        guard !dump.tables[t].chains[c].deleted else { throw ParseError(description: "rule for deleted chain: \(line)") }
                        dump.tables[t].chains[c].rules.append(line)
                    } else if line.hasPrefix("-X ") {
                        let name = String(line.dropFirst(3))
                        guard let c = dump.tables[t].chains.firstIndex(where: { $0.name == name }) else {
                            throw ParseError(description: "deleting undeclared chain: \(line)")
                        }
                        guard dump.tables[t].chains[c].rules.isEmpty else { throw ParseError(description: "deleting a chain with rules: \(line)") }
                        dump.tables[t].chains[c].deleted = true
                    } else if line == "COMMIT" {
                        state = .table
                    } else {
                        throw ParseError(description: "cannot parse rule: \(line)")
                    }
                }
            }
        }
        guard state == .table else { throw ParseError(description: "no COMMIT at the end") }
        return dump
    }

    /// The text form (kube-proxy's IPTablesDump.String): chains, then rules chain by chain,
    /// then the deletions, per table.
    public var text: String {
        var out = ""
        for t in tables {
            out += "*\(t.name)\n"
            for c in t.chains { out += ":\(c.name) - [0:0]\n" }
            for c in t.chains { for r in c.rules { out += r + "\n" } }
            for c in t.chains where c.deleted { out += "-X \(c.name)\n" }
            out += "COMMIT\n"
        }
        return out
    }

    /// The rules of one chain, in order (empty when absent).
    public func rules(_ table: String, _ chain: String) -> [String] {
        tables.first { $0.name == table }?.chains.first { $0.name == chain }?.rules ?? []
    }

    /// Chain names declared in `table`.
    public func chains(_ table: String) -> [String] {
        tables.first { $0.name == table }?.chains.map(\.name) ?? []
    }
}

/// The comment value of a rule (`--comment "x y"` or `--comment x`), nil when none.
public func ruleComment(_ rule: String) -> String? {
    guard let r = rule.range(of: "--comment ") else { return nil }
    let rest = rule[r.upperBound...]
    if rest.hasPrefix("\"") {
        let body = rest.dropFirst()
        return String(body.prefix { $0 != "\"" })
    }
    return String(rest.prefix { $0 != " " })
}

/// kube-proxy's sortIPTablesRules: tables by name; chains KUBE-NODEPORTS, KUBE-SERVICES,
/// other KUBE-* bytewise, then the rest; rules of KUBE-NODEPORTS (filter, nat) and
/// KUBE-SERVICES (filter, nat) stable-sorted by the `namespace/name` of their comment, with
/// nat KUBE-SERVICES's "must be the last rule" rule kept last.
public func sortRestoreText(_ text: String) throws -> String {
    var dump = try RestoreDump.parse(text)
    dump.tables.sort { $0.name < $1.name }
    func chainLess(_ a: String, _ b: String) -> Bool {
        if a == "KUBE-NODEPORTS" { return b != "KUBE-NODEPORTS" }
        if b == "KUBE-NODEPORTS" { return false }
        if a == "KUBE-SERVICES" { return true }
        if b == "KUBE-SERVICES" { return false }
        let ak = a.hasPrefix("KUBE-"), bk = b.hasPrefix("KUBE-")
        if ak != bk { return ak }
        return Array(a.utf8).lexicographicallyPrecedes(Array(b.utf8))
    }
    func serviceKey(_ rule: String) -> String? {
        guard let c = ruleComment(rule) else { return nil }
        return String(c.prefix { $0 != " " && $0 != ":" })
    }
    func stableSort(_ rules: [String], last: (String) -> Bool) -> [String] {
        let indexed = rules.enumerated().map { ($0.offset, $0.element) }
        return indexed.sorted { x, y in
            let (lx, ly) = (last(x.1), last(y.1))
            if lx != ly { return ly }
            let (kx, ky) = (serviceKey(x.1) ?? "", serviceKey(y.1) ?? "")
            if kx != ky { return Array(kx.utf8).lexicographicallyPrecedes(Array(ky.utf8)) }
            return x.0 < y.0
        }.map(\.1)
    }
    for t in dump.tables.indices {
        dump.tables[t].chains.sort { chainLess($0.name, $1.name) }
        for c in dump.tables[t].chains.indices {
            let name = dump.tables[t].chains[c].name
            guard name == "KUBE-NODEPORTS" || name == "KUBE-SERVICES" else { continue }
            let isNatServices = dump.tables[t].name == "nat" && name == "KUBE-SERVICES"
            dump.tables[t].chains[c].rules = stableSort(dump.tables[t].chains[c].rules) { rule in
                isNatServices && (ruleComment(rule)?.contains("must be the last rule") ?? false)
            }
        }
    }
    return dump.text
}

/// kube-proxy's checkIPTablesRuleJumps: every jump target and filled chain is declared,
/// every jumped-to chain has rules, every declared chain is used. Returns the problems.
public func checkRuleJumps(_ text: String) throws -> [String] {
    let dump = try RestoreDump.parse(text)
    var problems: [String] = []
    let builtinTargets: Set<String> = ["ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"]
    let topLevel: Set<String> = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
                                 "KUBE-FORWARD", "KUBE-MARK-MASQ", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"]
    for t in dump.tables {
        let created = Set(t.chains.filter { !$0.deleted }.map(\.name))
        let filled = Set(t.chains.filter { !$0.rules.isEmpty }.map(\.name))
        var jumped = Set<String>()
        for c in t.chains {
            for r in c.rules {
                if let j = r.range(of: " -j ") {
                    let target = String(r[j.upperBound...].prefix { $0 != " " })
                    if !builtinTargets.contains(target) { jumped.insert(target) }
                }
            }
        }
        let undeclared = jumped.union(filled).subtracting(created)
        if !undeclared.isEmpty { problems.append("\(t.name): used but not created: \(undeclared.sorted())") }
        let empty = jumped.subtracting(filled).subtracting(["KUBE-NODEPORTS"])
        if !empty.isEmpty { problems.append("\(t.name): jumped to but empty: \(empty.sorted())") }
        let unused = created.subtracting(jumped).subtracting(topLevel)
        if !unused.isEmpty { problems.append("\(t.name): created but not used: \(unused.sorted())") }
    }
    return problems
}

extension String {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}
