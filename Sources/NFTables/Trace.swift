// Sluice: a per-node Kubernetes service proxy.
// The nftables tracer: walks one `kube-proxy` table (the compiled ruleset, or the kernel's
// read back with `nft list table`) for the first packet of a new connection, as netfilter
// would: the table's base chains of the packet's hooks in priority order (prerouting, or
// output for the node's own packets), the routing decision, input / forward, then
// postrouting. Verdict-map lookups name the element hit; `numgen random` vmaps fork the walk,
// so every endpoint the packet can reach is one path with its probability.

import SluiceCore

/// Traces packets through one nftables `kube-proxy` table.
public struct NFTablesTracer: PacketTracer {
    public var mode: String { "nftables" }
    /// The table walked.
    public let table: NFTTableSnapshot
    /// The node's addresses (`fib … type local`, routing to input).
    public let localAddresses: Set<IPAddress>

    /// A tracer over `table`.
    public init(table: NFTTableSnapshot, localAddresses: Set<IPAddress>) {
        self.table = table
        self.localAddresses = localAddresses
    }

    /// A tracer over what a full sync of `ruleset` writes.
    public init(compiled ruleset: NFTRuleset, localAddresses: Set<IPAddress>) {
        self.init(table: NFTTableSnapshot(ruleset: ruleset), localAddresses: localAddresses)
    }

    private func isLocal(_ ip: IPAddress) -> Bool { ip.isLoopback || localAddresses.contains(ip) }

    /// One branch of the walk.
    struct Walk {
        var src: IPAddress
        var dst: IPAddress
        var port: Int
        var proto: String
        var mark: UInt32 = 0
        var dnat: (IPAddress, Int)?
        var masquerade = false
        var verdict: TraceVerdict?
        var probability = 1.0
        var steps: [TraceStep] = []
    }

    /// After a rule: on in the chain, the chain left (return, or the end of a chain reached by
    /// goto), or a final verdict for this base chain (accept, dnat, masquerade) or the packet
    /// (drop, reject).
    enum Flow { case next, returned, final }

    /// Traces `packet`.
    public func trace(_ packet: ProbePacket) -> TraceResult {
        var notes: [String] = []
        let src = packet.source ?? localAddresses.sorted().first { $0.family == packet.destination.family && !$0.isLoopback }
            ?? packet.destination
        let start = Walk(src: src, dst: packet.destination, port: packet.port, proto: packet.proto.lowercased)
        var done: [Walk] = []
        let first = packet.fromNode ? ["output"] : ["prerouting"]
        for w in runHooks(first, start, notes: &notes) {
            if w.verdict != nil {
                done.append(w)
                continue
            }
            let routed = packet.fromNode ? ["postrouting"] : (isLocal(w.dst) ? ["input"] : ["forward", "postrouting"])
            done += runHooks(routed, w, notes: &notes)
        }
        var paths: [TracePath] = []
        for var w in done {
            if w.verdict == nil { w.verdict = w.dnat == nil ? .unchanged : .forwarded }
            let endpoint = w.verdict == .forwarded ? w.dnat.map { $0.0.joined(port: $0.1) } : nil
            paths.append(TracePath(probability: w.probability, verdict: w.verdict!, endpoint: endpoint,
                                   masquerade: w.masquerade && (w.verdict == .forwarded || w.verdict == .unchanged), steps: w.steps))
        }
        paths.sort { ($0.probability, $1.endpoint ?? "") > ($1.probability, $0.endpoint ?? "") }
        var seen = Set<String>()
        notes = notes.filter { seen.insert($0).inserted }
        return TraceResult(mode: mode, paths: paths, notes: notes)
    }

    /// The table's base chains on `hooks`, each hook's in priority order, over every branch.
    private func runHooks(_ hooks: [String], _ start: Walk, notes: inout [String]) -> [Walk] {
        var branches = [start]
        for hook in hooks {
            let chains = table.chains.values.filter { $0.hook?.hook == hook }
                .sorted { ($0.hook!.priority, $0.name) < ($1.hook!.priority, $1.name) }
            for chain in chains {
                var next: [Walk] = []
                for b in branches {
                    if b.verdict != nil {
                        next.append(b)
                        continue
                    }
                    next += run(chain.name, b, depth: 0, notes: &notes).map(\.0)
                }
                branches = next
            }
        }
        return branches
    }

    private func location(_ chain: String) -> String {
        guard let h = table.chains[chain]?.hook else { return chain }
        return "\(chain) (\(h.type) \(h.hook) \(h.priority))"
    }

    /// Runs `chain`; each branch ends `.returned` (end of chain, `return`) or `.final`.
    private func run(_ chain: String, _ walk: Walk, depth: Int, notes: inout [String]) -> [(Walk, Flow)] {
        guard depth < 32, let rules = table.chains[chain]?.rules else {
            notes.append("chain \(chain) is missing (or the jumps loop): the packet leaves it as if it returned")
            return [(walk, .returned)]
        }
        var live = [walk]
        var done: [(Walk, Flow)] = []
        for rule in rules {
            var nextLive: [Walk] = []
            for w in live {
                for (q, flow) in apply(rule, in: chain, w, depth: depth, notes: &notes) {
                    if flow == .next { nextLive.append(q) } else { done.append((q, flow)) }
                }
            }
            live = nextLive
            if live.isEmpty { break }
        }
        return done + live.map { ($0, .returned) }
    }

    /// `jump` / `goto` `target`: what the calling chain sees.
    private func call(_ verb: String, _ target: String, _ w: Walk, depth: Int, notes: inout [String]) -> [(Walk, Flow)] {
        run(target, w, depth: depth + 1, notes: &notes).map { r, flow in
            if flow == .final { return (r, .final) }
            var r = r
            // A jump to a chain where no rule matched changed nothing: its step is left out.
            if verb == "jump" && r.steps.count == w.steps.count && r.steps.last?.action == "jump \(target)" { r.steps.removeLast() }
            return (r, verb == "goto" ? .returned : .next)
        }
    }

    private func element(_ set: String, _ key: String) -> NFTTableSnapshot.Element? {
        table.containers[set]?.elements[key]
    }

    private func matchesAddress(_ ip: IPAddress, _ value: String) -> Bool? {
        if value.hasPrefix("@") {
            let name = String(value.dropFirst())
            guard table.containers[name] != nil else { return nil }
            return element(name, ip.description) != nil
        }
        var items = [value]
        if value.hasPrefix("{ ") && value.hasSuffix(" }") {
            items = value.dropFirst(2).dropLast(2).split(separator: " ").filter { $0 != "," }.map(String.init)
        }
        var any = false
        for item in items {
            if item.contains("/") {
                guard let c = CIDR(item) else { return nil }
                if c.contains(ip) { any = true }
            } else {
                guard let a = IPAddress(item) else { return nil }
                if a == ip { any = true }
            }
        }
        return any
    }

    // swiftlint:disable:next cyclomatic_complexity function_body_length
    /// Applies one rule (normal form) to a branch.
    private func apply(_ rule: String, in chain: String, _ w: Walk, depth: Int, notes: inout [String]) -> [(Walk, Flow)] {
        var body = rule
        if let r = rule.range(of: " comment \"") { body = String(rule[..<r.lowerBound]) }
        var t = body.split(separator: " ").map(String.init)
        var q = w
        let step = { (action: String) in TraceStep(location: self.location(chain), rule: rule, action: action) }
        func unknown() -> [(Walk, Flow)] {
            notes.append("rule not understood, taken as not matching: \(chain): \(rule)")
            return [(w, .next)]
        }
        var affinityHit: String?
        // Matches.
        while let word = t.first {
            if word == "ct" && t.count >= 3 && t[1] == "state" {
                guard t[2].split(separator: ",").contains("new") else { return [(w, .next)] }
                t.removeFirst(3)
            } else if (word == "ip" || word == "ip6") && t.count >= 3 && (t[1] == "daddr" || t[1] == "saddr") && t[2] != "." {
                let addr = t[1] == "daddr" ? q.dst : q.src
                var negate = false, idx = 2
                if t[2] == "!=" { negate = true; idx = 3 }
                guard idx < t.count else { return unknown() }
                var value = t[idx], used = idx + 1
                if value == "{", let close = t[idx...].firstIndex(of: "}") {
                    value = t[idx...close].joined(separator: " ")
                    used = close + 1
                }
                guard let m = matchesAddress(addr, value) else { return unknown() }
                if m == negate { return [(w, .next)] }
                if value.hasPrefix("@affinity-") { affinityHit = String(value.dropFirst()) }
                t.removeFirst(used)
            } else if word == "fib" && t.count >= 4 && t[2] == "type" && t[3] == "local" {
                if !isLocal(t[1] == "saddr" ? q.src : q.dst) { return [(w, .next)] }
                t.removeFirst(4)
            } else if word == "mark" && t.count >= 5 && t[1] == "and" && t[3] == "==" {
                guard let mask = UInt32(t[2].dropFirst(2), radix: 16), let v = UInt32(t[4]) ?? UInt32(t[4].dropFirst(2), radix: 16) else { return unknown() }
                if q.mark & mask != v { return [(w, .next)] }
                t.removeFirst(5)
            } else if word == "meta" && t.count >= 3 && t[1] == "l4proto" && t[2] != "." {
                if t[2] != q.proto { return [(w, .next)] }
                t.removeFirst(3)
            } else {
                break
            }
        }
        guard let verb = t.first else { return [(q, .next)] }
        switch verb {
        case "jump", "goto":
            guard t.count >= 2 else { return unknown() }
            var action = "\(verb) \(t[1])"
            if let a = affinityHit { action += " (ClientIP affinity: \(q.src) is in @\(a))" }
            q.steps.append(step(action))
            return call(verb, t[1], q, depth: depth, notes: &notes)
        case "return":
            q.steps.append(step(body.hasPrefix("mark and ") ? "return: the connection is not marked for masquerade" : "return"))
            return [(q, .returned)]
        case "accept":
            q.steps.append(step("accept"))
            return [(q, .final)]
        case "drop":
            q.steps.append(step("drop"))
            q.verdict = .dropped
            return [(q, .final)]
        case "reject":
            q.steps.append(step("reject (ICMP port unreachable / TCP reset)"))
            q.verdict = .rejected
            return [(q, .final)]
        case "mark":
            // mark set mark or|xor X
            guard t.count == 5, t[1] == "set", let v = UInt32(t[4].dropFirst(2), radix: 16) else { return unknown() }
            q.mark = t[3] == "or" ? q.mark | v : q.mark ^ v
            if t[3] == "or" { q.steps.append(step("mark the connection for masquerade")) }
            return [(q, .next)]
        case "masquerade":
            q.masquerade = true
            q.steps.append(step("masquerade: the source becomes the node's address"))
            return [(q, .final)]
        case "update":
            q.steps.append(step("remember \(q.src) for ClientIP affinity"))
            return [(q, .next)]
        case "dnat":
            // dnat to IP:PORT
            guard t.count >= 3, let (ip, port) = splitHostPort(t[t.count - 1]) else { return unknown() }
            q.dnat = (ip, port)
            q.dst = ip
            q.port = port
            q.steps.append(step("DNAT to \(ip.joined(port: port))"))
            return [(q, .final)]
        case "numgen":
            // numgen random mod N vmap { 0 : goto A , 1 : goto B }
            guard t.count >= 4, let n = Int(t[3]), n > 0 else { return unknown() }
            var out: [(Walk, Flow)] = []
            for (i, tok) in t.enumerated() where (tok == "goto" || tok == "jump") && i + 1 < t.count {
                var b = q
                b.probability *= 1 / Double(n)
                b.steps.append(step("numgen: 1 in \(n): \(tok) \(t[i + 1])"))
                out += call(tok, t[i + 1], b, depth: depth, notes: &notes)
            }
            return out
        default:
            // KEY vmap @MAP, KEY = ip daddr . meta l4proto . th dport | meta l4proto . th dport
            guard let v = t.firstIndex(of: "vmap"), v + 1 < t.count, t[v + 1].hasPrefix("@") else { return unknown() }
            let keyText = t[..<v].joined(separator: " ")
            let map = String(t[v + 1].dropFirst())
            let key: String
            switch keyText {
            case "ip daddr . meta l4proto . th dport", "ip6 daddr . meta l4proto . th dport": key = "\(q.dst) . \(q.proto) . \(q.port)"
            case "meta l4proto . th dport": key = "\(q.proto) . \(q.port)"
            default: return unknown()
            }
            guard table.containers[map] != nil else { return unknown() }
            guard let e = element(map, key), let verdict = e.value else { return [(q, .next)] }
            q.steps.append(step("element \(key) of @\(map): \(verdict)"))
            return apply(verdict, in: chain, q, depth: depth, notes: &notes).map { r, flow in
                // The verdict's own step repeats the element: keep only the element's.
                var r = r
                if r.steps.count > q.steps.count, r.steps[q.steps.count].rule == verdict { r.steps.remove(at: q.steps.count) }
                return (r, flow)
            }
        }
    }

    private func splitHostPort(_ s: String) -> (IPAddress, Int)? {
        guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]) else { return nil }
        var host = s[..<colon]
        if host.hasPrefix("[") && host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        guard let ip = IPAddress(String(host)) else { return nil }
        return (ip, port)
    }
}
