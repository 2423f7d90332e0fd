// Sluice: a per-node Kubernetes service proxy.
// One `kube-proxy` table as `sluice explain` and `sluice diff` read it: chains (hook and
// rules), sets and maps (declaration and elements), in one normal form whether it comes
// from the compiled ruleset or from the kernel (`nft list table ip kube-proxy`, whose
// rendering differs from the `nft -f` input: `meta mark set meta mark | 0x…`, named
// priorities, `a, b` instead of `a , b`, one-element anonymous sets without braces).

import SluiceCore

/// A table in the normal form the tracer walks and the drift check compares.
public struct NFTTableSnapshot: Sendable, Hashable {
    /// One chain.
    public struct Chain: Sendable, Hashable {
        /// The chain name.
        public var name: String
        /// The hook of a base chain.
        public var hook: NFTHook?
        /// The rules in order, normalised (``NFTTableSnapshot/normaliseRule(_:)``).
        public var rules: [String]

        /// Creates a chain.
        public init(name: String, hook: NFTHook? = nil, rules: [String] = []) {
            self.name = name
            self.hook = hook
            self.rules = rules
        }
    }

    /// One element of a set or map.
    public struct Element: Sendable, Hashable {
        /// The element comment.
        public var comment: String?
        /// The verdict of a map element (`goto service-…`, `drop`); nil in a set.
        public var value: String?

        /// Creates an element.
        public init(comment: String? = nil, value: String? = nil) {
            self.comment = comment
            self.value = value
        }
    }

    /// One set or map.
    public struct Container: Sendable, Hashable {
        /// Set or map.
        public var kind: NFTContainer.Kind
        /// The name.
        public var name: String
        /// The declared type.
        public var type: String
        /// The flags, sorted.
        public var flags: [String]
        /// The element timeout in seconds.
        public var timeoutSeconds: Int?
        /// The set comment.
        public var comment: String?
        /// Elements by key text (`172.30.0.41 . tcp . 80`). Dynamic sets (affinity) hold what
        /// the kernel added; the compiled form has none.
        public var elements: [String: Element]

        /// Creates a container.
        public init(kind: NFTContainer.Kind, name: String, type: String, flags: [String] = [], timeoutSeconds: Int? = nil,
                    comment: String? = nil, elements: [String: Element] = [:]) {
            self.kind = kind
            self.name = name
            self.type = type
            self.flags = flags.sorted()
            self.timeoutSeconds = timeoutSeconds
            self.comment = comment
            self.elements = elements
        }

        /// The declaration as `nft -f` takes it (for reports).
        public var declaration: String {
            NFTContainer(kind: kind, name: name, type: type, flags: flags, timeoutSeconds: timeoutSeconds, comment: comment)
                .declarationSuffix.trimmingASCIIWhitespace()
        }

        /// Whether elements are added by the packet path (`update @set`), not by the proxy.
        public var isDynamic: Bool { flags.contains("dynamic") }
    }

    /// The family.
    public var family: NFTFamily
    /// Chains by name.
    public var chains: [String: Chain]
    /// Sets and maps by name.
    public var containers: [String: Container]
    /// The Service port (`ns/name:port`) that owns each per-service chain and each element
    /// (`container\u{0}key`), where known (compiled form).
    public var owners: [String: String]

    /// Creates an empty table.
    public init(family: NFTFamily) {
        self.family = family
        chains = [:]
        containers = [:]
        owners = [:]
    }

    /// The table a full sync of `ruleset` writes.
    public init(ruleset rs: NFTRuleset) {
        self.init(family: rs.family)
        for c in rs.fixed.chains {
            chains[c.name] = Chain(name: c.name, hook: c.hook, rules: c.rules.map(Self.normaliseRule))
        }
        for c in rs.fixed.containers {
            if c.name == NFTablesCompiler.Names.nodePortIPs && rs.fixed.nodePortIPs == nil { continue }
            containers[c.name] = Container(kind: c.kind, name: c.name, type: c.type, flags: c.flags,
                                           timeoutSeconds: c.timeoutSeconds, comment: c.comment)
        }
        for ip in rs.fixed.nodePortIPs ?? [] {
            containers[NFTablesCompiler.Names.nodePortIPs]?.elements[ip] = Element()
        }
        for (name, f) in rs.services {
            for c in f.chains {
                chains[c.name] = Chain(name: c.name, rules: c.rules.map(Self.normaliseRule))
                owners[c.name] = name.description
            }
            for s in f.affinitySets {
                containers[s.name] = Container(kind: s.kind, name: s.name, type: s.type, flags: s.flags,
                                               timeoutSeconds: s.timeoutSeconds, comment: s.comment)
                owners[s.name] = name.description
            }
        }
        for (key, claim) in rs.claims {
            let e = claim.element
            containers[key.container]?.elements[Self.normaliseKey(key.key)] = Element(comment: e.comment, value: e.value.map(Self.normaliseRule))
            owners[key.container + "\u{0}" + Self.normaliseKey(key.key)] = claim.owner.description
        }
    }

    /// The owner of a per-service chain or set from its name (`service-HASH8-ns/name/proto/port`,
    /// `endpoint-HASH8-ns/name/proto/port__ip/port`): `ns/name:port`; nil for other names.
    public static func owner(ofChain name: String) -> String? {
        guard NFTChainNames.isServiceChain(name), let dash = name.firstIndex(of: "-") else { return nil }
        var rest = name[name.index(after: dash)...]
        guard let dash2 = rest.firstIndex(of: "-") else { return nil }
        rest = rest[rest.index(after: dash2)...]
        if let r = rest.range(of: "__") { rest = rest[..<r.lowerBound] }
        let parts = rest.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count >= 4 else { return nil }
        let port = parts[3...].joined(separator: "/")
        return "\(parts[0])/\(parts[1])" + (port.isEmpty ? "" : ":\(port)")
    }

    // MARK: normal form

    /// A rule (or verdict) in the normal form: the compiler's spelling (`mark set mark or X`,
    /// `mark and X == 0`, ` , ` between items), anonymous address sets sorted (one item
    /// without braces, host prefixes `/32` and `/128` dropped), the comment kept at the end.
    public static func normaliseRule(_ text: String) -> String {
        var body = Substring(text)
        var comment: Substring?
        if let r = text.range(of: " comment \"") {
            body = text[..<r.lowerBound]
            comment = text[r.lowerBound...]
        } else if text.hasPrefix("comment \"") {
            body = ""
            comment = Substring(" " + text)
        }
        var t: [String] = []
        for word in body.split(separator: " ") {
            // `a,b` and `b,` split around the commas.
            var cur = ""
            for ch in word {
                if ch == "," {
                    if !cur.isEmpty { t.append(cur) }
                    t.append(",")
                    cur = ""
                } else {
                    cur.append(ch)
                }
            }
            if !cur.isEmpty { t.append(cur) }
        }
        // The kernel's spelling of the mark rules.
        if t.count == 7 && t[0] == "meta" && t[1] == "mark" && t[2] == "set" && t[3] == "meta" && t[4] == "mark" && (t[5] == "|" || t[5] == "^") {
            t = ["mark", "set", "mark", t[5] == "|" ? "or" : "xor", t[6]]
        }
        if t.count >= 6 && t[0] == "meta" && t[1] == "mark" && t[2] == "&" && t[4] == "==" {
            let v = t[5].hasPrefix("0x") ? UInt64(t[5].dropFirst(2), radix: 16).map(String.init) ?? t[5] : t[5]
            t = ["mark", "and", t[3], "==", v] + t[6...]
        }
        var out: [String] = []
        var i = 0
        while i < t.count {
            let w = t[i]
            let prev = out.last
            let addressContext = prev == "daddr" || prev == "saddr" || prev == "!="
            if w == "{" && addressContext, let close = t[i...].firstIndex(of: "}") {
                let items = t[(i + 1)..<close].filter { $0 != "," }.map(stripHostPrefix).sorted()
                if items.count == 1 {
                    out.append(items[0])
                } else {
                    out.append("{ " + items.joined(separator: " , ") + " }")
                }
                i = close + 1
                continue
            }
            out.append(addressContext ? stripHostPrefix(w) : w)
            i += 1
        }
        return out.joined(separator: " ") + (comment.map(String.init) ?? "")
    }

    private static func stripHostPrefix(_ s: String) -> String {
        if s.hasSuffix("/32") && !s.contains(":") { return String(s.dropLast(3)) }
        if s.hasSuffix("/128") && s.contains(":") { return String(s.dropLast(4)) }
        return s
    }

    /// An element key in normal form (single spaces around ` . `).
    public static func normaliseKey(_ key: String) -> String {
        key.split(separator: " ").joined(separator: " ")
    }

    // MARK: the kernel's listing

    /// A listing `parse` could not read.
    public struct ParseError: Error, Sendable, CustomStringConvertible {
        /// The line.
        public var line: String
        /// What was wrong.
        public var reason: String
        public var description: String { "cannot read the nft listing (\(reason)): \(line)" }
    }

    /// Reads `nft list table FAMILY kube-proxy` output.
    public static func parse(listing: String, family: NFTFamily) throws(ParseError) -> NFTTableSnapshot {
        var table = NFTTableSnapshot(family: family)
        enum Block { case none, chain(String), container(String) }
        var block = Block.none
        var pendingElements: String?
        for raw in listing.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = String(raw).trimmingASCIIWhitespace()
            if line.isEmpty { continue }
            if var acc = pendingElements {
                acc += " " + line
                if balanced(acc) {
                    if case .container(let name) = block { try table.containers[name]!.addElements(acc) }
                    pendingElements = nil
                } else {
                    pendingElements = acc
                }
                continue
            }
            switch block {
            case .none:
                if line.hasPrefix("table ") || line == "}" || line.hasPrefix("comment ") { continue }
                guard line.hasSuffix(" {") else { throw ParseError(line: line, reason: "expected a chain, set or map") }
                let words = line.dropLast(2).split(separator: " ", maxSplits: 1)
                guard words.count == 2 else { throw ParseError(line: line, reason: "no name") }
                let name = unquote(String(words[1]))
                switch words[0] {
                case "chain":
                    table.chains[name] = Chain(name: name)
                    block = .chain(name)
                case "set", "map":
                    table.containers[name] = Container(kind: words[0] == "set" ? .set : .map, name: name, type: "")
                    block = .container(name)
                default:
                    throw ParseError(line: line, reason: "unknown object \(words[0])")
                }
            case .chain(let name):
                if line == "}" {
                    block = .none
                } else if line.hasPrefix("type ") && line.contains(" hook ") {
                    table.chains[name]!.hook = try parseHook(line)
                } else if line.hasPrefix("comment \"") && table.chains[name]!.rules.isEmpty {
                    continue  // the chain's own comment
                } else {
                    var rule = line
                    if let r = rule.range(of: " # handle ") { rule = String(rule[..<r.lowerBound]) }
                    table.chains[name]!.rules.append(normaliseRule(rule))
                }
            case .container(let name):
                if line == "}" {
                    block = .none
                } else if line.hasPrefix("type ") {
                    table.containers[name]!.type = String(line.dropFirst(5))
                } else if line.hasPrefix("flags ") {
                    table.containers[name]!.flags = line.dropFirst(6).split(separator: ",").map { String($0).trimmingASCIIWhitespace() }.sorted()
                } else if line.hasPrefix("timeout ") {
                    table.containers[name]!.timeoutSeconds = parseDuration(String(line.dropFirst(8)))
                } else if line.hasPrefix("comment \"") {
                    table.containers[name]!.comment = unquote(String(line.dropFirst(8)))
                } else if line.hasPrefix("elements = ") {
                    let acc = String(line.dropFirst(11))
                    if balanced(acc) { try table.containers[name]!.addElements(acc) } else { pendingElements = acc }
                } else if line.hasPrefix("size ") || line.hasPrefix("policy ") || line.hasPrefix("gc-interval ") {
                    continue
                } else {
                    throw ParseError(line: line, reason: "unknown set attribute")
                }
            }
        }
        return table
    }

    /// Reads `add …` commands for the table (the adds of an `nft -f` transaction in any
    /// order, such as `sluice compile` prints or a sorted dump); `flush` and `delete` lines are
    /// not applied.
    public static func parse(commands text: String, family: NFTFamily) throws(ParseError) -> NFTTableSnapshot {
        var table = NFTTableSnapshot(family: family)
        let prefix = "\(family.rawValue) \(kubeProxyTableName) "
        var elementLines: [(String, String)] = []
        var ruleLines: [(String, String)] = []
        for raw in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = String(raw).trimmingASCIIWhitespace()
            guard line.hasPrefix("add ") else { continue }
            let rest = line.dropFirst(4)
            guard let sp = rest.firstIndex(of: " ") else { continue }
            let object = String(rest[..<sp])
            var tail = String(rest[rest.index(after: sp)...])
            guard object != "table" else { continue }
            guard tail.hasPrefix(prefix) else { throw ParseError(line: line, reason: "not table \(prefix)") }
            tail = String(tail.dropFirst(prefix.count))
            let nameEnd = tail.firstIndex(of: " ") ?? tail.endIndex
            let name = String(tail[..<nameEnd])
            let spec = String(tail[nameEnd...]).trimmingASCIIWhitespace()
            switch object {
            case "chain":
                var c = table.chains[name] ?? Chain(name: name)
                if spec.contains(" hook ") { c.hook = try parseHook(spec.replacingBraces()) }
                table.chains[name] = c
            case "rule":
                ruleLines.append((name, spec))
            case "set", "map":
                var c = Container(kind: object == "set" ? .set : .map, name: name, type: "")
                for part in spec.replacingBraces().split(separator: ";") {
                    let p = String(part).trimmingASCIIWhitespace()
                    if p.hasPrefix("type ") { c.type = String(p.dropFirst(5)) }
                    if p.hasPrefix("flags ") { c.flags = p.dropFirst(6).split(separator: ",").map { String($0).trimmingASCIIWhitespace() }.sorted() }
                    if p.hasPrefix("timeout ") { c.timeoutSeconds = parseDuration(String(p.dropFirst(8))) }
                    if p.hasPrefix("comment ") { c.comment = unquote(String(p.dropFirst(8))) }
                }
                table.containers[name] = c
            case "element":
                elementLines.append((name, spec))
            default:
                throw ParseError(line: line, reason: "unknown object \(object)")
            }
        }
        for (chain, rule) in ruleLines {
            guard table.chains[chain] != nil else { throw ParseError(line: rule, reason: "no chain \(chain)") }
            table.chains[chain]!.rules.append(normaliseRule(rule))
        }
        for (set, body) in elementLines {
            guard table.containers[set] != nil else { throw ParseError(line: body, reason: "no set \(set)") }
            try table.containers[set]!.addElements(body)
        }
        return table
    }

    private static func balanced(_ s: String) -> Bool {
        var depth = 0, inString = false
        for ch in s {
            if ch == "\"" { inString.toggle() }
            if inString { continue }
            if ch == "{" { depth += 1 }
            if ch == "}" { depth -= 1 }
        }
        return depth == 0
    }

    static func unquote(_ s: String) -> String {
        guard s.count >= 2, s.hasPrefix("\""), s.hasSuffix("\"") else { return s }
        return String(s.dropFirst().dropLast())
    }

    /// `type filter hook prerouting priority dstnat - 10; policy accept;`
    static func parseHook(_ line: String) throws(ParseError) -> NFTHook {
        let t = line.replacingSemicolons().split(separator: " ").map(String.init)
        guard let ti = t.firstIndex(of: "type"), let hi = t.firstIndex(of: "hook"), let pi = t.firstIndex(of: "priority"),
              ti + 1 < t.count, hi + 1 < t.count, pi + 1 < t.count else {
            throw ParseError(line: line, reason: "not a hook")
        }
        let names = ["raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100]
        var p: Int
        if let n = Int(t[pi + 1]) { p = n } else if let n = names[t[pi + 1]] { p = n } else {
            throw ParseError(line: line, reason: "unknown priority \(t[pi + 1])")
        }
        if pi + 3 < t.count, let off = Int(t[pi + 3]) {
            if t[pi + 2] == "+" { p += off } else if t[pi + 2] == "-" { p -= off }
        }
        return NFTHook(type: t[ti + 1], hook: t[hi + 1], priority: p)
    }

    /// `3h`, `1d2h3m4s`, `10800s` in seconds.
    static func parseDuration(_ s: String) -> Int? {
        var total = 0, num = 0, any = false
        var chars = Array(s.trimmingASCIIWhitespace())
        if chars.last == ";" { chars.removeLast() }
        var i = 0
        while i < chars.count {
            let c = chars[i]
            if let d = c.wholeNumberValue {
                num = num * 10 + d
                any = true
            } else {
                if c == "m" && i + 1 < chars.count && chars[i + 1] == "s" { num = 0; i += 2; continue }  // milliseconds: ignored
                let unit = ["d": 86400, "h": 3600, "m": 60, "s": 1][String(c)] ?? 0
                total += num * unit
                num = 0
            }
            i += 1
        }
        return any ? total : nil
    }
}

extension NFTTableSnapshot.Container {
    /// Adds `{ a, b comment "c" : goto x, … }`.
    mutating func addElements(_ text: String) throws(NFTTableSnapshot.ParseError) {
        var s = text.trimmingASCIIWhitespace()
        guard s.hasPrefix("{"), s.hasSuffix("}") else { throw .init(line: text, reason: "elements not in braces") }
        s = String(s.dropFirst().dropLast())
        var items: [String] = []
        var cur = "", inString = false
        for ch in s {
            if ch == "\"" { inString.toggle() }
            if ch == "," && !inString {
                items.append(cur)
                cur = ""
            } else {
                cur.append(ch)
            }
        }
        items.append(cur)
        for raw in items {
            let item = raw.trimmingASCIIWhitespace()
            if item.isEmpty { continue }
            var keyPart = item
            var value: String?
            if kind == .map, let r = item.range(of: " : ", options: .backwards) {
                keyPart = String(item[..<r.lowerBound])
                value = NFTTableSnapshot.normaliseRule(String(item[r.upperBound...]))
            }
            var comment: String?
            if let r = keyPart.range(of: " comment \"") {
                comment = NFTTableSnapshot.unquote(String(keyPart[keyPart.index(r.lowerBound, offsetBy: 9)...]))
                keyPart = String(keyPart[..<r.lowerBound])
            }
            // Dynamic elements carry `timeout 3h expires 2h59m`.
            if let r = keyPart.range(of: " timeout ") { keyPart = String(keyPart[..<r.lowerBound]) }
            if let r = keyPart.range(of: " expires ") { keyPart = String(keyPart[..<r.lowerBound]) }
            elements[NFTTableSnapshot.normaliseKey(keyPart)] = NFTTableSnapshot.Element(comment: comment, value: value)
        }
    }
}

extension String {
    fileprivate func replacingBraces() -> String {
        String(decoding: utf8.filter { $0 != UInt8(ascii: "{") && $0 != UInt8(ascii: "}") }, as: UTF8.self)
    }

    fileprivate func replacingSemicolons() -> String {
        String(decoding: utf8.map { $0 == UInt8(ascii: ";") ? UInt8(ascii: " ") : $0 }, as: UTF8.self)
    }
}
