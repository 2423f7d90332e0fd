// A packet tracer over the in-memory table (NFTModel), for porting kube-proxy's packet-flow
// tests (runPacketFlowTests in pkg/proxy/nftables): it runs the base chains a new
// connection passes, follows every branch of a random vmap, and reports the DNAT
// destinations, DROP or REJECT, and whether the connection is masqueraded. It understands
// exactly the rule forms the compiler writes and fails on anything else.

import Foundation
import SluiceCore

struct TraceResult: Equatable, CustomStringConvertible {
    /// "DROP", "REJECT", "" (not a Service: untouched) or the sorted DNAT destinations.
    var output: String
    var masq: Bool
    var description: String { "\(output) masq=\(masq)" }
}

struct PacketTracer {
    let model: NFTModel
    let nodeIPs: Set<String>
    let mark: UInt32 = 0x4000

    struct Packet {
        var src: IPAddress
        var dst: IPAddress
        var proto: String
        var port: Int
        var mark: UInt32 = 0
        var dnat: String?
        var verdict: String?  // "drop", "reject", "accept"
    }

    /// After a rule: go on in the chain, leave it (return, or the end of a chain reached by
    /// goto), or a final verdict (accept, drop, reject, dnat, masquerade).
    enum Flow { case next, returned, final }

    /// Traces one new connection.
    func trace(src: String, dst: String, port: Int, proto: String = "tcp") throws -> TraceResult {
        let p = Packet(src: IPAddress(src)!, dst: IPAddress(dst)!, proto: proto, port: port)
        let fromNode = nodeIPs.contains(src)
        let pre = fromNode ? ["filter-output-pre-dnat", "nat-output"] : ["filter-prerouting-pre-dnat", "nat-prerouting"]
        var outcomes: [Packet] = []
        for branch in try runHooks(pre, p) {
            if branch.verdict != nil {
                outcomes.append(branch)
                continue
            }
            var b = branch
            let finalDst = b.dnat.map { String($0[..<$0.lastIndex(of: ":")!]).trimmingCharacters(in: ["[", "]"]) } ?? b.dst.description
            if let d = b.dnat { b.dst = IPAddress(String(d[..<d.lastIndex(of: ":")!]).trimmingCharacters(in: ["[", "]"]))! }
            let post = fromNode ? ["filter-output"] : (nodeIPs.contains(finalDst) ? ["filter-input"] : ["filter-forward"])
            for c in try runHooks(post + ["nat-postrouting"], b) { outcomes.append(c) }
        }
        let verdicts = Set(outcomes.compactMap(\.verdict))
        if verdicts.contains("reject") { return TraceResult(output: "REJECT", masq: false) }
        if verdicts.contains("drop") { return TraceResult(output: "DROP", masq: false) }
        let dests = Set(outcomes.compactMap(\.dnat)).sorted()
        let masq = outcomes.contains { $0.verdict == "masquerade" }
        return TraceResult(output: dests.joined(separator: ", "), masq: masq)
    }

    /// Runs base chains in order over every branch.
    private func runHooks(_ chains: [String], _ p: Packet) throws -> [Packet] {
        var branches = [p]
        for c in chains where model.chains[c] != nil {
            var next: [Packet] = []
            for b in branches {
                if b.verdict != nil && b.verdict != "masquerade" {
                    next.append(b)
                    continue
                }
                next += try run(c, b, depth: 0).map(\.0)  // accepted or NATed: on to the next hook
            }
            branches = next
        }
        return branches
    }

    /// Runs `chain`; returns each branch with `.returned` (end of chain or `return`) or
    /// `.final` (a verdict).
    private func run(_ chain: String, _ packet: Packet, depth: Int) throws -> [(Packet, Flow)] {
        guard depth < 20, let rules = model.chains[chain]?.rules else { throw ModelError("no chain \(chain)") }
        var live: [Packet] = [packet]
        var done: [(Packet, Flow)] = []
        for rule in rules {
            var nextLive: [Packet] = []
            for p in live {
                for (q, flow) in try apply(rule, p, depth: depth) {
                    if flow == .next { nextLive.append(q) } else { done.append((q, flow)) }
                }
            }
            live = nextLive
            if live.isEmpty { break }
        }
        return done + live.map { ($0, .returned) }
    }

    /// `jump`/`goto` to `target`: what the calling chain sees.
    private func call(_ verb: String, _ target: String, _ q: Packet, depth: Int) throws -> [(Packet, Flow)] {
        try run(target, q, depth: depth + 1).map { r, flow in
            if flow == .final { return (r, .final) }
            return (r, verb == "goto" ? .returned : .next)
        }
    }

    private func strip(_ rule: String) -> String {
        if let r = rule.range(of: " comment \"") { return String(rule[..<r.lowerBound]) }
        return rule
    }

    private func addressMatches(_ ip: IPAddress, _ op: String, _ value: String) throws -> Bool {
        let positive: Bool
        if value.hasPrefix("@") {
            let set = String(value.dropFirst())
            guard let c = model.containers[set] else { throw ModelError("no set \(set)") }
            positive = c.elements[ip.description] != nil
        } else if value.hasPrefix("{") {
            let items = value.dropFirst().dropLast().split(whereSeparator: { $0 == "," || $0 == " " }).map(String.init)
            positive = try items.contains { try single(ip, $0) }
        } else {
            positive = try single(ip, value)
        }
        return op == "!=" ? !positive : positive
    }

    private func single(_ ip: IPAddress, _ text: String) throws -> Bool {
        if text.contains("/") {
            guard let c = CIDR(text) else { throw ModelError("bad CIDR \(text)") }
            return c.contains(ip)
        }
        guard let a = IPAddress(text) else { throw ModelError("bad address \(text)") }
        return a == ip
    }

    /// Applies one rule to a packet.
    private func apply(_ full: String, _ p: Packet, depth: Int) throws -> [(Packet, Flow)] {
        var t = strip(full).split(separator: " ").map(String.init)
        var q = p
        func take(_ n: Int) { t.removeFirst(n) }
        // Matches.
        while let w = t.first {
            if w == "ct" && t.count >= 3 && t[1] == "state" && t[2] == "new" {
                take(3)
            } else if (w == "ip" || w == "ip6") && t.count >= 3 && (t[1] == "daddr" || t[1] == "saddr") && t[2] != "." {
                let isDst = t[1] == "daddr"
                var op = "==", idx = 2
                if t[2] == "!=" { op = "!="; idx = 3 }
                var value = t[idx]
                var used = idx + 1
                if value == "{" {
                    let close = t[idx...].firstIndex(of: "}")!
                    value = "{" + t[(idx + 1)..<close].joined(separator: " ") + "}"
                    used = close + 1
                }
                if try !addressMatches(isDst ? q.dst : q.src, op, value) { return [(q, .next)] }
                take(used)
            } else if w == "fib" && t.count >= 4 && t[2] == "type" && t[3] == "local" {
                let ip = t[1] == "saddr" ? q.src : q.dst
                if !nodeIPs.contains(ip.description) { return [(q, .next)] }
                take(4)
            } else if w == "mark" && t.count >= 5 && t[1] == "and" && t[3] == "==" {
                if (q.mark & UInt32(t[2].dropFirst(2), radix: 16)!) != UInt32(t[4])! { return [(q, .next)] }
                take(5)
            } else if w == "meta" && t.count >= 3 && t[1] == "l4proto" && t[2] != "." {
                if t[2] != q.proto { return [(q, .next)] }
                take(3)
            } else {
                break
            }
        }
        guard let w = t.first else { return [(q, .next)] }
        switch w {
        case "jump", "goto":
            return try call(w, t[1], q, depth: depth)
        case "return":
            return [(q, .returned)]
        case "drop", "reject", "accept":
            q.verdict = w
            return [(q, .final)]
        case "mark":
            // mark set mark or|xor X
            let v = UInt32(t[4].dropFirst(2), radix: 16)!
            q.mark = t[3] == "or" ? q.mark | v : q.mark ^ v
            return [(q, .next)]
        case "masquerade":
            q.verdict = "masquerade"
            return [(q, .final)]
        case "update":
            return [(q, .next)]
        case "dnat":
            // dnat to IP:PORT
            q.dnat = t[2]
            return [(q, .final)]
        case "numgen":
            // numgen random mod N vmap { 0 : goto A , 1 : goto B }
            var out: [(Packet, Flow)] = []
            for (i, tok) in t.enumerated() where tok == "goto" {
                out += try call("goto", t[i + 1], q, depth: depth)
            }
            return out
        default:
            // KEY vmap @MAP, KEY = ip daddr . meta l4proto . th dport | meta l4proto . th dport
            guard let v = t.firstIndex(of: "vmap") else { throw ModelError("unsupported rule: \(full)") }
            let keyText = t[..<v].joined(separator: " ")
            let map = String(t[v + 1].dropFirst())
            let key: String
            switch keyText {
            case "ip daddr . meta l4proto . th dport", "ip6 daddr . meta l4proto . th dport": key = "\(q.dst) . \(q.proto) . \(q.port)"
            case "meta l4proto . th dport": key = "\(q.proto) . \(q.port)"
            default: throw ModelError("unsupported vmap key: \(full)")
            }
            guard let c = model.containers[map] else { throw ModelError("no map \(map)") }
            guard let verdict = c.values[key] else { return [(q, .next)] }
            return try apply(verdict, q, depth: depth)
        }
    }
}
