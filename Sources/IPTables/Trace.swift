// Sluice: a per-node Kubernetes service proxy.
// The iptables tracer: walks a rule set (the compiled batch, or iptables-save output of the
// kernel) chain by chain for the first packet of a new connection, as netfilter would: nat
// PREROUTING (or OUTPUT for the node's own packets), the routing decision, filter INPUT,
// FORWARD or OUTPUT, then nat POSTROUTING. `-m statistic` rules fork the walk, so every
// endpoint the packet can reach is one path with its probability.

import KernelKit
import SluiceCore

/// Traces packets through an iptables rule set.
public struct IPTablesTracer: PacketTracer {
    public var mode: String { "iptables" }
    /// The rules walked.
    public let rules: ParsedRuleSet
    /// The node's addresses (`-m addrtype --src-type/--dst-type LOCAL`, routing to INPUT).
    public let localAddresses: Set<IPAddress>

    /// Evaluates `-m set --match-set NAME FLAGS` (IPVS mode's ipsets); nil: set matches are
    /// not evaluated.
    public var setMatcher: (@Sendable (_ set: String, _ flags: [String], _ packet: PacketFields) -> Bool?)?
    /// A load balancer after the filter table (IPVS): the real servers for a destination, each
    /// with its share of new connections and the step to print; nil when no virtual server has it.
    public var virtualServers: (@Sendable (_ packet: PacketFields) -> VirtualServerHit?)?

    /// The fields of the packet a set or virtual-server lookup reads.
    public struct PacketFields: Sendable {
        public var src: IPAddress
        public var dst: IPAddress
        public var dport: Int
        /// `tcp`, `udp`, `sctp`.
        public var proto: String
    }

    /// What a virtual-server lookup found.
    public struct VirtualServerHit: Sendable {
        /// Where the step is shown (`ipvs`).
        public var location: String
        /// The virtual server as the kernel states it.
        public var server: String
        /// Real servers with their share and how the step reads.
        public var destinations: [(ip: IPAddress, port: Int, share: Double, text: String)]
        /// A proxy process takes the connection and opens its own to the destination (userspace
        /// relay): the destination sees the node's address.
        public var relay: Bool

        /// Creates a hit.
        public init(location: String, server: String, destinations: [(ip: IPAddress, port: Int, share: Double, text: String)],
                    relay: Bool = false) {
            self.location = location
            self.server = server
            self.destinations = destinations
            self.relay = relay
        }
    }

    /// A tracer over `rules`.
    public init(rules: ParsedRuleSet, localAddresses: Set<IPAddress>) {
        self.rules = rules
        self.localAddresses = localAddresses
    }

    /// A tracer over a compiled batch, with the jump rules from the built-in chains the
    /// backend keeps in place (they are not part of the batch).
    public init(compiled: CompiledRules, localAddresses: Set<IPAddress>) {
        var set = ParsedRuleSet()
        var base = ""
        for table in [Table.filter, .nat] {
            base += "*\(table.rawValue)\n"
            let builtins = table == .nat ? ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] : ["INPUT", "FORWARD", "OUTPUT"]
            for b in builtins { base += ":\(b) ACCEPT [0:0]\n" }
            let ordered = (jumpRules + kubeletJumpRules).filter { $0.table == table }
            // `ensureBaseRules` inserts each missing rule at position 1 in list order, so on a
            // fresh host a built-in chain holds them in reverse list order.
            for rule in ordered.reversed() {
                base += "-A \(rule.source) " + rule.ruleArgs.map { $0.contains(" ") ? "\"\($0)\"" : $0 }.joined(separator: " ") + "\n"
            }
            base += "COMMIT\n"
        }
        set = ParsedRuleSet.parse(base, into: set)
        set = ParsedRuleSet.parse(compiled.restoreText, into: set)
        self.init(rules: set, localAddresses: localAddresses)
    }

    private func isLocal(_ ip: IPAddress) -> Bool { ip.isLoopback || localAddresses.contains(ip) }

    /// Traces `packet`.
    public func trace(_ packet: ProbePacket) -> TraceResult {
        let src = packet.source ?? localAddresses.sorted().first { $0.family == packet.destination.family && !$0.isLoopback }
            ?? packet.destination
        var start = Walk(src: src, dst: packet.destination, dport: packet.port, proto: packet.proto.lowercased, packet: packet)
        var notes: [String] = []
        let natHook = packet.fromNode ? "OUTPUT" : "PREROUTING"
        var results: [Walk] = []
        start.hookNote = packet.fromNode ? "sent by the node: nat OUTPUT" : "arrives from outside the node: nat PREROUTING"

        // nat PREROUTING / OUTPUT.
        for (w, outcome) in runBuiltin("nat", natHook, start) {
            var w = w
            switch outcome {
            case .drop(let why):
                w.verdict = .dropped
                w.verdictNote = why
                results.append(w)
                continue
            case .reject:
                w.verdict = .rejected
                results.append(w)
                continue
            default: break
            }
            // Routing, then filter.
            let filterHook = packet.fromNode ? "OUTPUT" : (isLocal(w.dst) ? "INPUT" : "FORWARD")
            w.ctstates.insert("NEW")
            if w.dnat != nil { w.ctstates.insert("DNAT") }
            var after: [Walk] = []
            for (f, o) in runBuiltin("filter", filterHook, w) {
                var f = f
                switch o {
                case .drop(let why):
                    f.verdict = .dropped
                    f.verdictNote = why
                    results.append(f)
                case .reject:
                    f.verdict = .rejected
                    results.append(f)
                default:
                    after.append(f)
                }
            }
            // A load balancer behind the filter table (IPVS at LOCAL_IN / LOCAL_OUT).
            if let lookup = virtualServers, filterHook != "FORWARD" {
                var balanced: [Walk] = []
                for f in after {
                    guard f.dnat == nil || isLocal(f.dst), let hit = lookup(PacketFields(src: f.src, dst: f.dst, dport: f.dport, proto: f.proto)) else {
                        balanced.append(f)
                        continue
                    }
                    if hit.destinations.isEmpty {
                        var r = f
                        r.steps.append(TraceStep(location: hit.location, rule: hit.server, action: "no real servers: the node's own stack gets the packet (connection refused)"))
                        r.verdict = .rejected
                        results.append(r)
                        continue
                    }
                    for d in hit.destinations {
                        var b = f
                        b.probability *= d.share
                        b.steps.append(TraceStep(location: hit.location, rule: hit.server, action: d.text))
                        b.dnat = (d.ip, d.port)
                        b.dst = d.ip
                        b.dport = d.port
                        if hit.relay {
                            b.relayed = true
                            b.masquerade = true
                            results.append(b)
                            continue
                        }
                        balanced.append(b)
                    }
                }
                after = balanced
            }
            // nat POSTROUTING for packets that leave the node.
            for f in after {
                if filterHook == "INPUT" && f.dnat == nil {
                    var f = f
                    f.verdict = f.dnat != nil ? .forwarded : .unchanged
                    results.append(f)
                    continue
                }
                for (p, o) in runBuiltin("nat", "POSTROUTING", f) {
                    var p = p
                    if case .drop(let why) = o {
                        p.verdict = .dropped
                        p.verdictNote = why
                    } else {
                        p.verdict = p.dnat != nil ? .forwarded : .unchanged
                    }
                    results.append(p)
                }
            }
        }
        for i in results.indices where results[i].relayed { results[i].verdict = .relayed }
        for r in results { for n in r.notes where !notes.contains(n) { notes.append(n) } }
        let paths = results.map { w in
            TracePath(probability: w.probability, verdict: w.verdict, endpoint: w.dnat.map { $0.ip.joined(port: $0.port) },
                      masquerade: w.masquerade, steps: w.steps)
        }.sorted { $0.probability != $1.probability ? $0.probability > $1.probability : ($0.endpoint ?? "") < ($1.endpoint ?? "") }
        return TraceResult(mode: mode, paths: paths, notes: notes)
    }

    // MARK: - the walk

    struct Walk {
        var src: IPAddress
        var dst: IPAddress
        var dport: Int
        var proto: String
        /// The packet as given (arrival interface).
        var packet: ProbePacket
        var mark: UInt32 = 0
        var probability = 1.0
        var steps: [TraceStep] = []
        var notes: [String] = []
        var dnat: (ip: IPAddress, port: Int)?
        var masquerade = false
        var ctstates: Set<String> = []
        var verdict = TraceVerdict.unchanged
        var verdictNote = ""
        var hookNote = ""
        var depth = 0
        var relayed = false
    }

    enum Outcome {
        /// Fell off the end of the chain or RETURNed.
        case fallThrough
        /// ACCEPT, DNAT, MASQUERADE: this table is done with the packet.
        case accept
        case drop(String)
        case reject
    }

    enum MatchResult {
        case no
        case yes
        /// Matches with this probability (`-m statistic --mode random`).
        case random(Double)
    }

    private func runBuiltin(_ table: String, _ chain: String, _ w: Walk) -> [(Walk, Outcome)] {
        guard rules.has(table, chain) else { return [(w, .fallThrough)] }
        let policy = rules.tables[table]?.policies[chain] ?? "ACCEPT"
        return runChain(table, chain, w).map { walk, outcome in
            guard case .fallThrough = outcome else { return (walk, outcome) }
            if policy == "DROP" {
                var walk = walk
                walk.steps.append(TraceStep(location: "\(table) \(chain)", rule: "policy DROP", action: "dropped by the chain policy"))
                return (walk, .drop("policy of \(table) \(chain)"))
            }
            return (walk, .fallThrough)
        }
    }

    private func runChain(_ table: String, _ chain: String, _ w: Walk) -> [(Walk, Outcome)] {
        guard w.depth < 64 else {
            var w = w
            w.notes.append("jumps nested deeper than 64 chains at \(chain); the walk stopped there")
            return [(w, .fallThrough)]
        }
        return runRules(rules.rules(table, chain), from: 0, table: table, chain: chain, w)
    }

    private func runRules(_ list: [ParsedRule], from start: Int, table: String, chain: String, _ w: Walk) -> [(Walk, Outcome)] {
        var i = start
        var w = w
        while i < list.count {
            let r = list[i]
            var w2 = w
            switch evaluate(r, &w2) {
            case .no:
                w.notes = w2.notes  // keep what the tracer noted about a rule it skipped
                i += 1
                continue
            case .yes:
                return apply(r, in: list, at: i, table: table, chain: chain, w2, chance: nil)
            case .random(let p):
                var taken = w2
                taken.probability *= p
                var skipped = w
                skipped.probability *= 1 - p
                var out: [(Walk, Outcome)] = []
                if p > 0 { out += apply(r, in: list, at: i, table: table, chain: chain, taken, chance: p) }
                if p < 1 { out += runRules(list, from: i + 1, table: table, chain: chain, skipped) }
                return out
            }
        }
        return [(w, .fallThrough)]
    }

    /// Applies a matching rule's target, then continues the chain when the target does.
    private func apply(_ r: ParsedRule, in list: [ParsedRule], at i: Int, table: String, chain: String, _ w: Walk,
                       chance: Double?) -> [(Walk, Outcome)] {
        var w = w
        let loc = "\(table) \(chain)"
        let chanceText = chance.map { " (taken by \(formatProbability($0)) of the packets reaching it)" } ?? ""
        func step(_ action: String) { w.steps.append(TraceStep(location: loc, rule: r.text, action: action + chanceText)) }
        func continueChain(_ walk: Walk) -> [(Walk, Outcome)] {
            runRules(list, from: i + 1, table: table, chain: chain, walk)
        }
        guard let target = r.target else {
            step("matches; no target, next rule")
            return continueChain(w)
        }
        switch target {
        case "ACCEPT":
            step("ACCEPT")
            return [(w, .accept)]
        case "DROP":
            step("DROP")
            return [(w, .drop("\(loc): \(r.text)"))]
        case "REJECT":
            step("REJECT")
            return [(w, .reject)]
        case "RETURN":
            step("RETURN to the calling chain")
            return [(w, .fallThrough)]
        case "DNAT":
            let to = r.targetOptions.first { $0.name == "--to-destination" }?.values.first ?? ""
            if let (ip, port) = splitHostPort(to) {
                w.dnat = (ip, port ?? w.dport)
                w.dst = ip
                w.dport = port ?? w.dport
                step("DNAT to \(ip.joined(port: port ?? w.dport))")
            } else {
                w.notes.append("DNAT target \(to) not understood")
                step("DNAT to \(to)")
            }
            return [(w, .accept)]
        case "REDIRECT":
            let port = r.targetOptions.first { $0.name == "--to-ports" }?.values.first.flatMap { Int($0.split(separator: "-").first ?? "") }
            let node = w.dst.isLoopback ? w.dst : localAddresses.sorted().first { $0.family == w.dst.family && !$0.isLoopback } ?? w.dst
            w.dst = node
            w.dport = port ?? w.dport
            step("REDIRECT to the node's port \(w.dport)")
            return [(w, .accept)]
        case "MASQUERADE", "SNAT":
            w.masquerade = true
            step(target == "MASQUERADE" ? "MASQUERADE: the source becomes the node's address on the way to the destination" : "SNAT")
            return [(w, .accept)]
        case "MARK":
            let before = w.mark
            for o in r.targetOptions {
                let (v, m) = parseMark(o.values.first ?? "")
                switch o.name {
                case "--or-mark": w.mark |= v
                case "--xor-mark": w.mark ^= v
                case "--and-mark": w.mark &= v
                case "--set-mark": w.mark = (w.mark & ~(m ?? 0xffff_ffff)) | v
                case "--set-xmark": w.mark = (w.mark & ~(m ?? 0xffff_ffff)) ^ v
                default: break
                }
            }
            step("mark 0x\(String(before, radix: 16)) -> 0x\(String(w.mark, radix: 16))")
            return continueChain(w)
        case "LOG", "NFLOG", "CT", "NOTRACK", "TRACE", "CONNMARK", "CHECKSUM", "TCPMSS":
            step("\(target): no effect on where the packet goes")
            return continueChain(w)
        default:
            guard rules.has(table, target) else {
                w.notes.append("target \(target) in \(loc) is not evaluated; the walk continued after it")
                step("\(target) (not evaluated)")
                return continueChain(w)
            }
            step(r.isGoto ? "goto \(target)" : "jump to \(target)")
            w.depth += 1
            var out: [(Walk, Outcome)] = []
            for (sub, outcome) in runChain(table, target, w) {
                var sub = sub
                sub.depth -= 1
                if case .fallThrough = outcome {
                    // RETURN from a goto returns from this chain too.
                    out += r.isGoto ? [(sub, .fallThrough)] : continueChain(sub)
                } else {
                    out.append((sub, outcome))
                }
            }
            return out
        }
    }

    /// Whether `r` matches the packet; `-m recent --set` records the client as it matches.
    private func evaluate(_ r: ParsedRule, _ w: inout Walk) -> MatchResult {
        if let s = r.source, s.cidr.contains(w.src) == s.negated { return .no }
        if let d = r.destination, d.cidr.contains(w.dst) == d.negated { return .no }
        if let p = r.proto, p != "all", (p == w.proto) == r.protoNegated { return .no }
        for i in r.interfaces {
            let words = i.split(separator: " ").map(String.init)
            let negated = words.first == "!"
            let flag = words.dropFirst(negated ? 1 : 0).first ?? ""
            let pattern = words.last ?? ""
            guard flag == "-i" || flag == "--in-interface", let arrives = w.packet.arrives(on: pattern) else {
                note(&w, "rule \"\(r.text)\" matches on an interface (\(i)) the tracer does not know (pass --in-interface); assumed not to match")
                return .no
            }
            if arrives == negated { return .no }
        }
        if !r.unparsed.isEmpty {
            note(&w, "rule \"\(r.text)\" has words the tracer does not understand; assumed not to match")
            return .no
        }
        var result = MatchResult.yes
        for m in r.matches {
            switch m.module {
            case "comment", "nfacct":
                // nfacct only counts the packets it sees.
                continue
            case "tcp", "udp", "sctp":
                if m.module != w.proto { return .no }
                for o in m.options {
                    switch o.name {
                    case "--dport", "--destination-port":
                        if portIn(o.values.first ?? "", w.dport) == o.negated { return .no }
                    case "--sport", "--source-port":
                        note(&w, "rule \"\(r.text)\" matches the source port, which a new connection picks at random; assumed not to match")
                        return .no
                    default:
                        note(&w, "\(m.module) option \(o.name) in \"\(r.text)\" not evaluated; assumed to match")
                    }
                }
            case "addrtype":
                for o in m.options {
                    let ip: IPAddress
                    switch o.name {
                    case "--src-type": ip = w.src
                    case "--dst-type": ip = w.dst
                    default: continue
                    }
                    let types = (o.values.first ?? "").split(separator: ",")
                    guard types.allSatisfy({ $0 == "LOCAL" }) else {
                        note(&w, "address type \(o.values.joined()) in \"\(r.text)\" not evaluated; assumed not to match")
                        return .no
                    }
                    if isLocal(ip) == o.negated { return .no }
                }
            case "mark":
                if let o = m.option("--mark") {
                    let (v, mask) = parseMark(o.values.first ?? "")
                    if ((w.mark & (mask ?? 0xffff_ffff)) == v) == o.negated { return .no }
                }
            case "conntrack", "state":
                if let o = m.option("--ctstate") ?? m.option("--state") {
                    let wanted = Set((o.values.first ?? "").split(separator: ",").map(String.init))
                    let states = w.ctstates.isEmpty ? ["NEW"] : w.ctstates
                    if wanted.isDisjoint(with: states) != o.negated { return .no }
                }
            case "statistic":
                guard m.option("--mode")?.values.first == "random", let p = m.option("--probability")?.values.first.flatMap(Double.init) else {
                    note(&w, "statistic match in \"\(r.text)\" not evaluated; assumed to match")
                    continue
                }
                result = .random(p)
            case "set":
                guard let o = m.option("--match-set"), o.values.count >= 2, let matcher = setMatcher,
                      let hit = matcher(o.values[0], o.values[1].split(separator: ",").map(String.init),
                                        PacketFields(src: w.src, dst: w.dst, dport: w.dport, proto: w.proto)) else {
                    note(&w, "set match in \"\(r.text)\" not evaluated; assumed not to match")
                    return .no
                }
                if hit == o.negated { return .no }
            case "recent":
                if m.option("--set") != nil { continue }
                if m.option("--rcheck") != nil || m.option("--update") != nil {
                    let secs = m.option("--seconds")?.values.first.map { " within \($0) s" } ?? ""
                    note(&w, "session affinity: a client that was sent to \(r.target ?? "?")\(secs) is sent there again (\(r.chain)); the paths shown are a new client's")
                    return .no
                }
            default:
                note(&w, "match -m \(m.module) in \"\(r.text)\" not evaluated; assumed not to match")
                return .no
            }
        }
        return result
    }

    private func note(_ w: inout Walk, _ text: String) {
        if !w.notes.contains(text) { w.notes.append(text) }
    }
}

/// `80`, `1000:2000`.
private func portIn(_ spec: String, _ port: Int) -> Bool {
    let parts = spec.split(separator: ":")
    if parts.count == 2, let a = Int(parts[0]), let b = Int(parts[1]) { return (a...b).contains(port) }
    return Int(spec) == port
}

/// `10.0.0.1:80`, `[fd00::1]:80`, `10.0.0.1`.
func splitHostPort(_ text: String) -> (IPAddress, Int?)? {
    if text.hasPrefix("[") {
        guard let close = text.firstIndex(of: "]"), let ip = IPAddress(String(text[text.index(after: text.startIndex)..<close])) else { return nil }
        let rest = text[text.index(after: close)...]
        return (ip, rest.hasPrefix(":") ? Int(rest.dropFirst()) : nil)
    }
    if let ip = IPAddress(text) { return (ip, nil) }
    guard let colon = text.lastIndex(of: ":"), let ip = IPAddress(String(text[..<colon])) else { return nil }
    return (ip, Int(text[text.index(after: colon)...]))
}

/// A probability as a percentage with up to two decimals (`50%`, `33.33%`).
public func formatProbability(_ p: Double) -> String {
    let v = (p * 10000).rounded() / 100
    if v == v.rounded() { return "\(Int(v))%" }
    return "\(v)%"
}
