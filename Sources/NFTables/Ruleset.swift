// Sluice: a per-node Kubernetes service proxy.
// The desired nftables ruleset for one address family, in kube-proxy's nftables layout
// (table `ip kube-proxy` / `ip6 kube-proxy`). Compiler.swift fills it from the model;
// RulesetTransactions.swift renders it as `nft -f` transactions (full and partial).

import SluiceCore

/// The address family of one `kube-proxy` table: `ip` (IPv4) or `ip6` (IPv6).
public enum NFTFamily: String, Sendable, Hashable, CaseIterable {
    /// `table ip kube-proxy`.
    case ip
    /// `table ip6 kube-proxy`.
    case ip6

    /// The table family for an IP family.
    public init(_ family: IPFamily) { self = family == .ipv4 ? .ip : .ip6 }

    /// The IP family this table serves.
    public var ipFamily: IPFamily { self == .ip ? .ipv4 : .ipv6 }

    /// The address type of sets and map keys (`ipv4_addr`, `ipv6_addr`).
    public var addressType: String { self == .ip ? "ipv4_addr" : "ipv6_addr" }

    /// The payload keyword of address matches (`ip daddr`, `ip6 saddr`).
    public var addressKeyword: String { rawValue }
}

/// The table every kube-proxy-compatible ruleset lives in.
public let kubeProxyTableName = "kube-proxy"

/// A base chain's hook: `{ type T hook H priority P ; }`.
public struct NFTHook: Sendable, Hashable {
    /// `filter` or `nat`.
    public var type: String
    /// `prerouting`, `input`, `forward`, `output` or `postrouting`.
    public var hook: String
    /// The numeric priority (kube-proxy's -110, -100, 0, 100).
    public var priority: Int

    /// Creates a hook.
    public init(type: String, hook: String, priority: Int) {
        self.type = type
        self.hook = hook
        self.priority = priority
    }
}

/// One chain and its rules, in order. Rule text is what follows `add rule FAMILY kube-proxy CHAIN`.
public struct NFTChain: Sendable, Hashable {
    /// The chain name.
    public var name: String
    /// Set for base chains.
    public var hook: NFTHook?
    /// The chain comment (only `reject-chain` has one).
    public var comment: String?
    /// Rules in order.
    public var rules: [String]
    /// The same rules as values, when the chain was built from values (the compiler's fixed
    /// chains): what a full sync sends as netlink messages. nil for chains read back as text.
    public var ruleValues: [NFTRule]?

    /// Creates a chain.
    public init(name: String, hook: NFTHook? = nil, comment: String? = nil, rules: [String] = []) {
        self.name = name
        self.hook = hook
        self.comment = comment
        self.rules = rules
    }

    /// Appends a rule as a value (and its text).
    public mutating func append(_ rule: NFTRule, family: NFTFamily) {
        rules.append(rule.text(family))
        ruleValues = (ruleValues ?? []) + [rule]
    }

    /// The `{ ... }` part of `add chain` ("" when the chain has neither hook nor comment).
    public var declarationSuffix: String {
        var parts: [String] = []
        if let hook { parts.append("type \(hook.type) hook \(hook.hook) priority \(hook.priority) ;") }
        if let comment { parts.append("comment \(nftQuoted(comment)) ;") }
        return parts.isEmpty ? "" : " { " + parts.joined(separator: " ") + " }"
    }
}

/// A set or verdict map declaration.
public struct NFTContainer: Sendable, Hashable {
    /// Set or map.
    public enum Kind: String, Sendable, Hashable {
        /// `add set`.
        case set
        /// `add map`.
        case map
    }

    /// Set or map.
    public var kind: Kind
    /// The name.
    public var name: String
    /// The type (`ipv4_addr`, `ipv4_addr . inet_proto . inet_service : verdict`).
    public var type: String
    /// Flags (`dynamic`, `timeout`).
    public var flags: [String]
    /// The element timeout in seconds (affinity sets).
    public var timeoutSeconds: Int?
    /// The comment.
    public var comment: String?

    /// Creates a declaration.
    public init(kind: Kind, name: String, type: String, flags: [String] = [], timeoutSeconds: Int? = nil, comment: String? = nil) {
        self.kind = kind
        self.name = name
        self.type = type
        self.flags = flags
        self.timeoutSeconds = timeoutSeconds
        self.comment = comment
    }

    /// The `{ type … ; flags … ; timeout …s ; comment "…" ; }` part of the declaration.
    public var declarationSuffix: String {
        var s = " { type \(type) ;"
        if !flags.isEmpty { s += " flags " + flags.joined(separator: ",") + " ;" }
        if let timeoutSeconds { s += " timeout \(timeoutSeconds)s ;" }
        if let comment { s += " comment \(nftQuoted(comment)) ;" }
        return s + " }"
    }
}

/// Identifies one element: the set or map it belongs to and its key text
/// (`172.30.0.41 . tcp . 80`).
public struct NFTElementKey: Sendable, Hashable, Comparable {
    /// The set or map name.
    public var container: String
    /// The key, components joined by ` . `.
    public var key: String

    /// Creates a key.
    public init(container: String, key: String) {
        self.container = container
        self.key = key
    }

    public static func < (a: NFTElementKey, b: NFTElementKey) -> Bool {
        a.container != b.container ? a.container < b.container : a.key < b.key
    }
}

/// One element a service port wants: its key, optional comment and (for maps) verdict.
public struct NFTElement: Sendable, Hashable {
    /// Set or map and key.
    public var id: NFTElementKey
    /// The element comment (kube-proxy comments `no-endpoint-*` elements with the port name).
    public var comment: String?
    /// The verdict (`goto service-…`, `drop`); nil for set elements.
    public var value: String?

    /// Creates an element.
    public init(_ container: String, key: String, comment: String? = nil, value: String? = nil) {
        self.id = NFTElementKey(container: container, key: key)
        self.comment = comment
        self.value = value
    }

    /// The `{ … }` body of `add element` (`KEY comment "…" : VALUE`).
    public var body: String {
        var s = id.key
        if let comment { s += " comment " + nftQuoted(comment) }
        if let value { s += " : " + value }
        return s
    }
}

/// One endpoint of a service port, kept compact: its chain and affinity set are derived.
public struct NFTEndpointRef: Sendable, Hashable {
    /// The endpoint address.
    public var ip: IPAddress
    /// The endpoint port.
    public var port: Int
    /// The 8 hash characters of the endpoint's names, packed.
    var hash: UInt64

    init(ip: IPAddress, port: Int, hash: String) {
        self.ip = ip
        self.port = port
        var h: UInt64 = 0
        for b in hash.utf8.prefix(8) { h = h << 8 | UInt64(b) }
        self.hash = h
    }

    var hashText: String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(8)
        for i in (0..<8).reversed() { bytes.append(UInt8(truncatingIfNeeded: hash >> (UInt64(i) * 8))) }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// A Cluster- or Local-policy chain, kept compact: the masquerade rule and the endpoints it
/// balances over (indices into the fragment's endpoints); the rules are derived.
struct NFTPolicyChain: Sendable, Hashable {
    var name: String
    var masquerade: NFTRule?
    var members: [Int32]
}

/// Everything one service port contributes: its chains, affinity sets and elements.
///
/// Stored compactly (a 10 000 × 10 ruleset is about a tenth of its text): endpoint chains,
/// affinity sets and policy-chain rules are derived from the endpoints when rendered.
public struct NFTServiceFragment: Sendable, Hashable {
    var family: NFTFamily
    var proto: String
    /// `ns/name/proto/portName`, the hashed text of the port's names.
    var portPath: String
    var affinityTimeout: Int?
    var policyChains: [NFTPolicyChain] = []
    /// `external-…` and `firewall-…`.
    var otherChains: [NFTRuleChain] = []
    /// Every endpoint some traffic reaches, in order.
    var endpoints: [NFTEndpointRef] = []
    /// Elements of the shared sets and maps.
    public internal(set) var elements: [NFTElement] = []
    /// iTP=Local with endpoints elsewhere but none here (kube-proxy's `no_local_endpoints` gauge).
    public internal(set) var noLocalInternal = false
    /// eTP=Local with endpoints elsewhere but none here.
    public internal(set) var noLocalExternal = false

    init(family: NFTFamily, proto: String, portPath: String, affinityTimeout: Int?) {
        self.family = family
        self.proto = proto
        self.portPath = portPath
        self.affinityTimeout = affinityTimeout
    }

    /// The base of an endpoint's chain and affinity set names (`HASH8-ns/name/proto/port__ip/port`).
    func endpointBase(_ e: NFTEndpointRef) -> String {
        var ipText = e.ip.description
        if family == .ip6 { ipText = String(decoding: ipText.utf8.map { $0 == UInt8(ascii: ":") ? UInt8(ascii: ".") : $0 }, as: UTF8.self) }
        let full = e.hashText + "-" + portPath + "__" + ipText + "/" + String(e.port)
        let bytes = full.utf8
        guard bytes.count > NFTChainNames.baseLengthMax else { return full }
        return String(decoding: bytes.prefix(NFTChainNames.baseLengthMax - 3), as: UTF8.self) + "..."
    }

    /// Per-service chains (`service-…`, `local-…`, `external-…`, `firewall-…`, `endpoint-…`),
    /// rules in order, as text.
    public var chains: [NFTChain] { ruleChains.map { $0.textChain(family) } }

    /// The same chains with their rules as values (what a netlink partial sync encodes).
    public var ruleChains: [NFTRuleChain] {
        var out: [NFTRuleChain] = []
        out.reserveCapacity(policyChains.count + otherChains.count + endpoints.count)
        let bases = endpoints.map(endpointBase)
        let markMasq = NFTablesCompiler.Names.markMasq
        for p in policyChains {
            var rules: [NFTRule] = []
            if let m = p.masquerade { rules.append(m) }
            if affinityTimeout != nil {
                for i in p.members {
                    rules.append(NFTRule([.addressInSet(.source, set: "affinity-" + bases[Int(i)])], .verdict(.goto("endpoint-" + bases[Int(i)]))))
                }
            }
            rules.append(NFTRule(.numgenVmap(p.members.map { "endpoint-" + bases[Int($0)] })))
            out.append(NFTRuleChain(name: p.name, rules: rules))
        }
        out += otherChains
        for (i, e) in endpoints.enumerated() {
            let b = bases[i]
            var rules = [NFTRule([.address(.source, negated: false, .ip(e.ip))], .verdict(.jump(markMasq)))]
            if affinityTimeout != nil { rules.append(NFTRule(.updateSet("affinity-" + b, .source))) }
            rules.append(NFTRule([.l4proto(proto)], .dnat(e.ip, port: e.port)))
            out.append(NFTRuleChain(name: "endpoint-" + b, rules: rules))
        }
        return out
    }

    /// Names of the per-service chains, without their rules.
    public var chainNames: [String] {
        policyChains.map(\.name) + otherChains.map(\.name) + endpoints.map { "endpoint-" + endpointBase($0) }
    }

    /// Per-endpoint affinity sets (ClientIP affinity only).
    public var affinitySets: [NFTContainer] {
        guard let timeout = affinityTimeout else { return [] }
        return endpoints.map {
            NFTContainer(kind: .set, name: "affinity-" + endpointBase($0), type: family.addressType,
                         flags: ["dynamic", "timeout"], timeoutSeconds: timeout)
        }
    }
}

/// The part of the ruleset that does not depend on Services: base chains, fixed chains,
/// set and map declarations and the `nodeport-ips` elements. A partial sync requires it to be
/// unchanged.
public struct NFTFixedPart: Sendable, Hashable {
    /// Base chains, then regular fixed chains, with their rules, in emission order.
    public var chains: [NFTChain]
    /// Set and map declarations, in emission order.
    public var containers: [NFTContainer]
    /// The `nodeport-ips` elements; nil when NodePorts match every local address (the set is
    /// then deleted, as kube-proxy does).
    public var nodePortIPs: [String]?

    /// Creates a fixed part.
    public init(chains: [NFTChain], containers: [NFTContainer], nodePortIPs: [String]?) {
        self.chains = chains
        self.containers = containers
        self.nodePortIPs = nodePortIPs
    }
}

/// Which service port's element is in the table for one key, and how many service ports want
/// the key. When service ports disagree on a map element's verdict (two Services claiming the
/// same external IP and port), the smallest `ServicePortName` wins, in full and partial syncs
/// alike.
struct NFTClaim: Sendable, Hashable {
    var element: NFTElement
    var owner: ServicePortName
    var count: Int
    /// Every claim so far carried the same element (the common case: a ClusterIP shared by
    /// the ports of one Service), so the owner does not matter.
    var uniform = true
    /// The owner left while others still claim the key; found again only if a conflict arises.
    var ownerStale = false
}

/// The whole desired ruleset of one family: the fixed part plus one fragment per service port.
///
/// Built by ``NFTablesCompiler``; rendered by ``fullTransaction(recreateBaseChains:existing:)``
/// and ``partialTransaction(from:changedPorts:)``. It is also the backend's record of what the
/// kernel holds after a successful transaction.
public struct NFTRuleset: Sendable {
    /// The table family.
    public let family: NFTFamily
    /// Base chains, fixed chains, declarations and `nodeport-ips`.
    public internal(set) var fixed: NFTFixedPart
    /// Per-service-port fragments.
    public internal(set) var services: [ServicePortName: NFTServiceFragment]
    /// Elements by key, with the winning claim.
    var claims: [NFTElementKey: NFTClaim] = [:]
    /// Service ports of each Service (for incremental compiles).
    var portsByService: [NamespacedName: Set<ServicePortName>] = [:]
    /// The node labels the fragments were compiled with (topology).
    var nodeLabels: [String: String] = [:]

    init(family: NFTFamily, fixed: NFTFixedPart) {
        self.family = family
        self.fixed = fixed
        self.services = [:]
    }

    /// `FAMILY kube-proxy`, the object prefix of every command.
    public var tableSpec: String { "\(family.rawValue) \(kubeProxyTableName)" }

    /// The elements the table holds, sorted by container and key.
    public var elements: [NFTElement] {
        claims.keys.sorted().map { claims[$0]!.element }
    }

    /// Every per-service chain name (the chains a full sync keeps).
    public var serviceChainNames: Set<String> {
        var out = Set<String>()
        for f in services.values { out.formUnion(f.chainNames) }
        return out
    }

    /// Every affinity set name.
    public var affinitySetNames: Set<String> {
        var out = Set<String>()
        for f in services.values { for s in f.affinitySets { out.insert(s.name) } }
        return out
    }

    /// Service ports with a Local policy and no local endpoints, by traffic policy.
    public var noLocalEndpoints: [TrafficPolicyScope: Int] {
        var i = 0, e = 0
        for f in services.values {
            if f.noLocalInternal { i += 1 }
            if f.noLocalExternal { e += 1 }
        }
        return [.internal: i, .external: e]
    }

    // MARK: fragments and claims

    /// Replaces (or removes, with nil) one service port's fragment, keeping the claims current.
    mutating func setFragment(_ name: ServicePortName, _ fragment: NFTServiceFragment?) {
        if let old = services[name] {
            for e in old.elements { unclaim(e.id, by: name) }
        }
        if let fragment {
            services[name] = fragment
            portsByService[name.service, default: []].insert(name)
            for e in fragment.elements { claim(e, by: name) }
        } else {
            services[name] = nil
            portsByService[name.service]?.remove(name)
            if portsByService[name.service]?.isEmpty == true { portsByService[name.service] = nil }
        }
    }

    private mutating func claim(_ e: NFTElement, by owner: ServicePortName) {
        guard var c = claims[e.id] else {
            claims[e.id] = NFTClaim(element: e, owner: owner, count: 1)
            return
        }
        c.count += 1
        if e != c.element { c.uniform = false }
        if c.ownerStale && !c.uniform {
            c = rescan(c, excluding: nil)
        } else if !c.ownerStale && owner < c.owner {
            c.owner = owner
            c.element = e
        }
        claims[e.id] = c
    }

    private mutating func unclaim(_ id: NFTElementKey, by owner: ServicePortName) {
        guard var c = claims[id] else { return }
        c.count -= 1
        if c.count <= 0 {
            claims[id] = nil
            return
        }
        if c.owner == owner && !c.ownerStale {
            if c.uniform {
                c.ownerStale = true
            } else {
                c = rescan(c, excluding: owner)
            }
        }
        claims[id] = c
    }

    /// Finds the smallest current claimant of `c`'s key (a scan over every fragment: only
    /// when service ports disagree on an element).
    private func rescan(_ c: NFTClaim, excluding: ServicePortName?) -> NFTClaim {
        var out = c
        var best: (ServicePortName, NFTElement)?
        for (n, f) in services where n != excluding {
            for e in f.elements where e.id == c.element.id {
                if best == nil || n < best!.0 { best = (n, e) }
            }
        }
        if let best {
            out.owner = best.0
            out.element = best.1
            out.ownerStale = false
        }
        return out
    }
}

/// Go's `%q` for the strings kube-proxy puts in comments: printable ASCII as is, `"` and `\`
/// escaped, everything else as `\u{…}`-free hex escapes. The model validates names to DNS
/// labels, so in practice nothing is escaped; this keeps a bad name from ending the string.
public func nftQuoted(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case " "..."~": out.unicodeScalars.append(u)
        default:
            for b in String(u).utf8 {
                let hex = String(b, radix: 16)
                out += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
    }
    return out + "\""
}
