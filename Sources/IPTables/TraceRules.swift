// Sluice: a per-node Kubernetes service proxy.
// iptables rule text (iptables-restore input or iptables-save output) parsed into tables,
// chains and rules, with a canonical form in which the two texts of one rule compare equal
// (iptables-save reorders matches, adds /32, prints marks as --set-xmark, ...).

import SluiceCore

/// One option of a match or target: `--name values...`, possibly negated.
public struct RuleOption: Sendable, Hashable {
    public var name: String
    public var negated: Bool
    public var values: [String]
}

/// One `-m module` and its options.
public struct RuleMatch: Sendable, Hashable {
    public var module: String
    public var options: [RuleOption]

    /// The first option called `name`.
    public func option(_ name: String) -> RuleOption? { options.first { $0.name == name } }
}

/// An address match (`-s`, `-d`).
public struct AddressMatch: Sendable, Hashable {
    public var cidr: CIDR
    public var negated: Bool
}

/// One `-A CHAIN ...` rule.
public struct ParsedRule: Sendable, Hashable {
    /// The table.
    public var table: String
    /// The chain.
    public var chain: String
    /// The line as given.
    public var text: String
    public var source: AddressMatch?
    public var destination: AddressMatch?
    /// `-p`, lower-cased.
    public var proto: String?
    public var protoNegated = false
    /// `-i` / `-o` (the tracer cannot evaluate these).
    public var interfaces: [String] = []
    public var matches: [RuleMatch] = []
    /// `-j` or `-g` target; nil for a rule without one.
    public var target: String?
    /// `-g` rather than `-j`.
    public var isGoto = false
    public var targetOptions: [RuleOption] = []
    /// Tokens that could not be placed (kept in the canonical form so they still compare).
    public var unparsed: [String] = []

    /// The first match of `module`.
    public func match(_ module: String) -> RuleMatch? { matches.first { $0.module == module } }

    /// The rule's comment, if any.
    public var comment: String? { match("comment")?.option("--comment")?.values.first }

    /// A form in which equivalent restore input and save output are equal.
    public var canonical: String {
        var parts: [String] = ["-A \(chain)"]
        if let s = source { parts.append((s.negated ? "! " : "") + "-s \(s.cidr)") }
        if let d = destination { parts.append((d.negated ? "! " : "") + "-d \(d.cidr)") }
        if let p = proto { parts.append((protoNegated ? "! " : "") + "-p \(p)") }
        parts += interfaces
        for m in matches.sorted(by: { $0.module < $1.module }) {
            let opts = m.options.compactMap { canonicalOption($0, module: m.module) }.sorted()
            parts.append((["-m \(m.module)"] + opts).joined(separator: " "))
        }
        parts += unparsed
        if let t = target {
            var tail = [(isGoto ? "-g " : "-j ") + t]
            tail += canonicalTargetOptions(t)
            parts.append(tail.joined(separator: " "))
        }
        return parts.joined(separator: " ")
    }

    private func canonicalOption(_ o: RuleOption, module: String) -> String? {
        var values = o.values
        switch (module, o.name) {
        case ("recent", "--mask"):
            if values == ["255.255.255.255"] || values == ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"] { return nil }
        case ("recent", "--rsource"):
            return nil
        case ("mark", "--mark"):
            values = values.map { canonicalMark($0) }
        case ("conntrack", "--ctstate"), ("state", "--state"):
            values = values.map { $0.split(separator: ",").map(String.init).sorted().joined(separator: ",") }
        case ("statistic", "--probability"):
            values = values.map { v in Double(v).map { String(Int(($0 * 2147483648).rounded())) } ?? v }
        case ("comment", "--comment"):
            break
        default:
            break
        }
        return ((o.negated ? "! " : "") + ([o.name] + values).joined(separator: " "))
    }

    private func canonicalTargetOptions(_ t: String) -> [String] {
        switch t {
        case "MARK":
            var mark: UInt32 = 0, mask: UInt32 = 0xffff_ffff
            for o in targetOptions {
                let (v, m) = parseMark(o.values.first ?? "")
                switch o.name {
                case "--or-mark": mark = v; mask = v
                case "--xor-mark": mark = v; mask = 0
                case "--and-mark": mark = 0; mask = ~v
                case "--set-mark": mark = v; mask = (m ?? 0xffff_ffff) | v
                case "--set-xmark": mark = v; mask = m ?? 0xffff_ffff
                default: break
                }
            }
            return ["--set-xmark 0x\(String(mark, radix: 16))/0x\(String(mask, radix: 16))"]
        case "REJECT":
            return targetOptions.filter { !($0.name == "--reject-with" && ($0.values == ["icmp-port-unreachable"] || $0.values == ["icmp6-port-unreachable"])) }
                .map { ([$0.name] + $0.values).joined(separator: " ") }.sorted()
        default:
            return targetOptions.map { ((($0.negated ? "! " : "") + $0.name) + ($0.values.isEmpty ? "" : " " + $0.values.joined(separator: " "))) }.sorted()
        }
    }
}

/// `0x4000/0x4000` or `0x00004000` as value and optional mask.
func parseMark(_ text: String) -> (UInt32, UInt32?) {
    func num(_ s: Substring) -> UInt32 {
        if s.hasPrefix("0x") || s.hasPrefix("0X") { return UInt32(s.dropFirst(2), radix: 16) ?? 0 }
        return UInt32(s) ?? 0
    }
    let parts = text.split(separator: "/", maxSplits: 1)
    guard let first = parts.first else { return (0, nil) }
    return (num(first), parts.count > 1 ? num(parts[1]) : nil)
}

private func canonicalMark(_ text: String) -> String {
    let (v, m) = parseMark(text)
    return "0x\(String(v, radix: 16))/0x\(String(m ?? 0xffff_ffff, radix: 16))"
}

/// One table: its chains in declaration order, their policies and rules.
public struct ParsedTable: Sendable, Hashable {
    public var name: String
    /// Chain names in the order declared.
    public var chainOrder: [String] = []
    /// `ACCEPT`/`DROP` for built-in chains, `-` for user chains.
    public var policies: [String: String] = [:]
    public var rules: [String: [ParsedRule]] = [:]

    /// Declares a chain (no-op when declared).
    public mutating func declare(_ chain: String, policy: String = "-") {
        if policies[chain] == nil { chainOrder.append(chain) }
        policies[chain] = policy
        if rules[chain] == nil { rules[chain] = [] }
    }
}

/// A set of tables parsed from restore or save text.
public struct ParsedRuleSet: Sendable, Hashable {
    public var tables: [String: ParsedTable] = [:]

    /// Creates an empty set.
    public init() {}

    /// Parses iptables-restore input or iptables-save output. `-X CHAIN` removes the chain,
    /// as restore would; lines it does not know are ignored. A restore batch declares its
    /// chains with `:CHAIN - [0:0]` (flushing them), so parsing several batches in order gives
    /// what the kernel would hold.
    public static func parse(_ text: String, into set: ParsedRuleSet = ParsedRuleSet()) -> ParsedRuleSet {
        var out = set
        var table = ""
        for raw in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = raw.trimmingCharacters(in: " \t\r")
            if line.isEmpty || line.hasPrefix("#") || line == "COMMIT" { continue }
            if line.hasPrefix("*") {
                table = String(line.dropFirst())
                if out.tables[table] == nil { out.tables[table] = ParsedTable(name: table) }
                continue
            }
            guard !table.isEmpty else { continue }
            if line.hasPrefix(":") {
                let words = line.dropFirst().split(separator: " ")
                guard let name = words.first else { continue }
                let chain = String(name)
                out.tables[table]!.declare(chain, policy: words.count > 1 ? String(words[1]) : "-")
                out.tables[table]!.rules[chain] = []  // a declared chain is flushed
                continue
            }
            let tokens = tokenize(line)
            guard tokens.count >= 2 else { continue }
            switch tokens[0] {
            case "-A", "--append":
                let chain = tokens[1]
                if out.tables[table]!.policies[chain] == nil { out.tables[table]!.declare(chain) }
                out.tables[table]!.rules[chain, default: []].append(parseRule(table: table, chain: chain, text: line, tokens: Array(tokens.dropFirst(2))))
            case "-X", "--delete-chain":
                let chain = tokens[1]
                out.tables[table]!.policies[chain] = nil
                out.tables[table]!.rules[chain] = nil
                out.tables[table]!.chainOrder.removeAll { $0 == chain }
            default:
                continue
            }
        }
        return out
    }

    /// The rules of `chain` in `table` (empty when absent).
    public func rules(_ table: String, _ chain: String) -> [ParsedRule] { tables[table]?.rules[chain] ?? [] }

    /// Whether `table` declares `chain`.
    public func has(_ table: String, _ chain: String) -> Bool { tables[table]?.policies[chain] != nil }
}

/// Splits a rule line into words; double-quoted strings are one word (quotes removed, `\"` kept as `"`).
public func tokenize(_ line: some StringProtocol) -> [String] {
    var out: [String] = []
    var cur = ""
    var inQuotes = false
    var hasToken = false
    var escape = false
    for ch in line {
        if escape {
            cur.append(ch)
            escape = false
            continue
        }
        if ch == "\\" && inQuotes {
            escape = true
            continue
        }
        if ch == "\"" {
            inQuotes.toggle()
            hasToken = true
            continue
        }
        if (ch == " " || ch == "\t") && !inQuotes {
            if hasToken { out.append(cur) }
            cur = ""
            hasToken = false
            continue
        }
        cur.append(ch)
        hasToken = true
    }
    if hasToken { out.append(cur) }
    return out
}

/// Parses the words after `-A CHAIN`.
func parseRule(table: String, chain: String, text: String, tokens: [String]) -> ParsedRule {
    var r = ParsedRule(table: table, chain: chain, text: text)
    var i = 0
    var negate = false
    var inTarget = false
    func cidr(_ s: String) -> CIDR? {
        if let c = CIDR(s) { return c }
        if let ip = IPAddress(s) { return CIDR(host: ip) }
        return nil
    }
    while i < tokens.count {
        let t = tokens[i]
        if t == "!" {
            negate = true
            i += 1
            continue
        }
        let next = i + 1 < tokens.count ? tokens[i + 1] : nil
        switch t {
        case "-s", "--source", "-d", "--destination":
            if let n = next, let c = cidr(n) {
                let m = AddressMatch(cidr: c, negated: negate)
                if t == "-s" || t == "--source" { r.source = m } else { r.destination = m }
            } else {
                r.unparsed += [t, next ?? ""]
            }
            i += 2
        case "-p", "--protocol":
            r.proto = next?.lowercased()
            r.protoNegated = negate
            i += 2
        case "-i", "--in-interface", "-o", "--out-interface":
            r.interfaces.append((negate ? "! " : "") + "\(t) \(next ?? "")")
            i += 2
        case "-m", "--match":
            r.matches.append(RuleMatch(module: next ?? "", options: []))
            inTarget = false
            i += 2
        case "-j", "--jump", "-g", "--goto":
            r.target = next
            r.isGoto = t == "-g" || t == "--goto"
            inTarget = true
            i += 2
        default:
            if t.hasPrefix("--") {
                var values: [String] = []
                var j = i + 1
                while j < tokens.count, !tokens[j].hasPrefix("-") || Int(tokens[j]) != nil, tokens[j] != "!" {
                    values.append(tokens[j])
                    j += 1
                }
                let opt = RuleOption(name: t, negated: negate, values: values)
                if inTarget {
                    r.targetOptions.append(opt)
                } else if r.matches.isEmpty {
                    // `-p tcp --dport 80`: the protocol's implicit match.
                    r.matches.append(RuleMatch(module: r.proto ?? "", options: [opt]))
                } else {
                    r.matches[r.matches.count - 1].options.append(opt)
                }
                i = j
            } else {
                r.unparsed.append((negate ? "! " : "") + t)
                i += 1
            }
        }
        negate = false
    }
    return r
}

extension String {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String { String(self).trimmingCharacters(in: set) }
}
