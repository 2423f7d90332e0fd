// Sluice: a per-node Kubernetes service proxy.
// The rules of per-service chains as values: the compiler builds them, and they render both
// the `nft` text (for full syncs through libnftables, `sluice compile` and the tests) and the
// nf_tables expressions of a partial sync sent as netlink messages (NFTNetlink.swift). Only
// the shapes kube-proxy's service, endpoint, external and firewall chains use exist here.

import SluiceCore

/// Which address of the IP header a match reads.
public enum NFTAddressField: String, Sendable, Hashable {
    /// `saddr`.
    case source = "saddr"
    /// `daddr`.
    case destination = "daddr"
}

/// An address or a block of addresses, as written in a rule (`10.0.0.1`, `10.0.0.0/8`).
public enum NFTAddressOperand: Sendable, Hashable, CustomStringConvertible {
    /// One address, written without a prefix length.
    case ip(IPAddress)
    /// A block, written `address/length`.
    case cidr(CIDR)

    /// The block the operand covers.
    public var block: CIDR {
        switch self {
        case .ip(let ip): return CIDR(host: ip)
        case .cidr(let c): return c
        }
    }

    public var description: String {
        switch self {
        case .ip(let ip): return ip.description
        case .cidr(let c): return c.description
        }
    }
}

/// A verdict: where a rule sends the packet.
public enum NFTVerdict: Sendable, Hashable, CustomStringConvertible {
    /// `jump CHAIN`.
    case jump(String)
    /// `goto CHAIN`.
    case goto(String)
    /// `drop`.
    case drop
    /// `accept`.
    case accept
    /// `return`.
    case `return`

    public var description: String {
        switch self {
        case .jump(let c): return "jump " + c
        case .goto(let c): return "goto " + c
        case .drop: return "drop"
        case .accept: return "accept"
        case .return: return "return"
        }
    }

    /// Parses the verdict text of a map element (`goto service-…`, `drop`).
    public init?(text: String) {
        if text == "drop" { self = .drop } else if text == "accept" { self = .accept } else if text.hasPrefix("goto ") {
            self = .goto(String(text.dropFirst(5)))
        } else if text.hasPrefix("jump ") {
            self = .jump(String(text.dropFirst(5)))
        } else {
            return nil
        }
    }
}

/// One match of a rule.
public enum NFTMatch: Sendable, Hashable {
    /// `ip saddr 10.0.0.0/8`, `ip daddr != 10.0.0.1`.
    case address(NFTAddressField, negated: Bool, NFTAddressOperand)
    /// `ip saddr @SET`.
    case addressInSet(NFTAddressField, set: String)
    /// `ip saddr != { A , B }` (an anonymous interval set; one operand is a plain compare).
    case addressNotInList(NFTAddressField, [NFTAddressOperand])
    /// `fib saddr type local`.
    case fibSourceLocal
    /// `meta l4proto tcp` (`tcp`, `udp` or `sctp`).
    case l4proto(String)
    /// `ip daddr { A,B }` (an anonymous interval set; one operand is a plain compare), as
    /// the fixed `cluster-ips-check` rule writes it.
    case addressInList(NFTAddressField, [NFTAddressOperand])
    /// `fib daddr type local`.
    case fibDestinationLocal
    /// `ct state new`.
    case ctStateNew
    /// `mark and MARK == 0` (the mark as configured, `0x4000`).
    case markClear(String)
}

/// How `mark set mark OP MARK` changes the packet mark.
public enum NFTMarkOperation: String, Sendable, Hashable {
    /// Sets the mark's bits.
    case or
    /// Flips them (clears them after `mark and MARK != 0`).
    case xor
}

/// What a rule does after its matches.
public enum NFTStatement: Sendable, Hashable {
    /// A verdict.
    case verdict(NFTVerdict)
    /// `numgen random mod N vmap { 0 : goto A , 1 : goto B }`: one chain per value.
    case numgenVmap([String])
    /// `dnat to IP:PORT`.
    case dnat(IPAddress, port: Int)
    /// `update @SET { ip saddr }`.
    case updateSet(String, NFTAddressField)
    /// `ip daddr . meta l4proto . th dport vmap @MAP` (`withAddress`) or
    /// `meta l4proto . th dport vmap @MAP`.
    case vmapLookup(String, withAddress: Bool)
    /// `mark set mark or|xor MARK`.
    case markSet(NFTMarkOperation, String)
    /// `masquerade fully-random`.
    case masqueradeFullyRandom
    /// `reject` (ICMP port unreachable).
    case reject
}

/// A rule of a per-service chain: matches, one statement, an optional comment.
public struct NFTRule: Sendable, Hashable {
    /// The matches, in order.
    public var matches: [NFTMatch]
    /// The statement.
    public var statement: NFTStatement
    /// The rule comment.
    public var comment: String?

    /// Creates a rule.
    public init(_ matches: [NFTMatch], _ statement: NFTStatement, comment: String? = nil) {
        self.matches = matches
        self.statement = statement
        self.comment = comment
    }

    /// Creates a rule without matches.
    public init(_ statement: NFTStatement, comment: String? = nil) {
        self.init([], statement, comment: comment)
    }

    /// The rule as `nft` writes it after `add rule FAMILY TABLE CHAIN`.
    public func text(_ family: NFTFamily) -> String {
        let kw = family.addressKeyword
        var parts: [String] = []
        for m in matches {
            switch m {
            case .address(let f, let negated, let op):
                parts.append("\(kw) \(f.rawValue) \(negated ? "!= " : "")\(op)")
            case .addressInSet(let f, let set):
                parts.append("\(kw) \(f.rawValue) @\(set)")
            case .addressNotInList(let f, let ops):
                parts.append("\(kw) \(f.rawValue) != { \(ops.map(\.description).joined(separator: " , ")) }")
            case .fibSourceLocal:
                parts.append("fib saddr type local")
            case .l4proto(let p):
                parts.append("meta l4proto \(p)")
            case .addressInList(let f, let ops):
                parts.append("\(kw) \(f.rawValue) { \(ops.map(\.description).joined(separator: ",")) }")
            case .fibDestinationLocal:
                parts.append("fib daddr type local")
            case .ctStateNew:
                parts.append("ct state new")
            case .markClear(let mark):
                parts.append("mark and \(mark) == 0")
            }
        }
        switch statement {
        case .verdict(let v):
            parts.append(v.description)
        case .numgenVmap(let chains):
            var s = "numgen random mod \(chains.count) vmap { "
            for (n, c) in chains.enumerated() {
                if n > 0 { s += " , " }
                s += "\(n) : goto \(c)"
            }
            parts.append(s + " }")
        case .dnat(let ip, let port):
            parts.append("dnat to \(ip.joined(port: port))")
        case .updateSet(let set, let f):
            parts.append("update @\(set) { \(kw) \(f.rawValue) }")
        case .vmapLookup(let map, let withAddress):
            parts.append((withAddress ? "\(kw) daddr . " : "") + "meta l4proto . th dport vmap @\(map)")
        case .markSet(let op, let mark):
            parts.append("mark set mark \(op.rawValue) \(mark)")
        case .masqueradeFullyRandom:
            parts.append("masquerade fully-random")
        case .reject:
            parts.append("reject")
        }
        if let comment { parts.append("comment \(nftQuoted(comment))") }
        return parts.joined(separator: " ")
    }
}

/// A per-service chain with its rules as values.
public struct NFTRuleChain: Sendable, Hashable {
    /// The chain name.
    public var name: String
    /// The rules, in order.
    public var rules: [NFTRule]

    /// Creates a chain.
    public init(name: String, rules: [NFTRule]) {
        self.name = name
        self.rules = rules
    }

    /// The chain with its rules as text.
    public func textChain(_ family: NFTFamily) -> NFTChain {
        NFTChain(name: name, rules: rules.map { $0.text(family) })
    }
}
