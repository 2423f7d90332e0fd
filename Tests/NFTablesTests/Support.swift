// Test support: a small in-memory model of one nftables table that applies the
// transactions the compiler renders (checking references as the kernel does), dumps it the
// way knftables' fake does, and kube-proxy's test sort of a dump.

import Foundation
import NFTables
import SluiceCore
import SluiceTesting

struct ModelError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// One `kube-proxy` table in memory.
struct NFTModel: Equatable {
    struct Chain: Equatable {
        var suffix: String
        var rules: [String]
    }
    struct Container: Equatable {
        var kind: String
        var suffix: String
        /// key -> full element body (`key comment "c" : value`)
        var elements: [String: String]
        var values: [String: String]
    }

    let family: String
    var tableComment: String?
    var exists = false
    var chains: [String: Chain] = [:]
    var containers: [String: Container] = [:]

    init(family: String = "ip") { self.family = family }

    /// Applies `text` atomically: on any error the model is left as it was.
    mutating func apply(_ text: String) throws {
        var copy = self
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            try copy.command(String(line))
        }
        self = copy
    }

    private static func tokens(_ s: String) -> [Substring] { s.split(separator: " ") }

    /// Chains a rule or verdict refers to (`jump X`, `goto X`, `goto X` inside a vmap).
    static func chainRefs(_ text: String) -> [String] {
        let t = tokens(text)
        var out: [String] = []
        for (i, w) in t.enumerated() where (w == "jump" || w == "goto") && i + 1 < t.count {
            out.append(String(t[i + 1]))
        }
        return out
    }

    /// Sets and maps a rule refers to (`@name`).
    static func setRefs(_ text: String) -> [String] {
        tokens(text).filter { $0.hasPrefix("@") }.map { String($0.dropFirst()) }
    }

    private func referenced(chain: String) -> Bool {
        for (_, c) in chains { for r in c.rules where NFTModel.chainRefs(r).contains(chain) { return true } }
        for (_, m) in containers { for v in m.values.values where NFTModel.chainRefs(v).contains(chain) { return true } }
        return false
    }

    private func referenced(set: String) -> Bool {
        for (_, c) in chains { for r in c.rules where NFTModel.setRefs(r).contains(set) { return true } }
        return false
    }

    /// Splits `NAME rest` / `NAME { … }` after the table.
    private static func nameAndRest(_ s: Substring) -> (String, String) {
        if let sp = s.firstIndex(of: " ") { return (String(s[..<sp]), String(s[s.index(after: sp)...])) }
        return (String(s), "")
    }

    mutating func command(_ line: String) throws {
        let prefixes = ["add", "flush", "delete"]
        let parts = line.split(separator: " ", maxSplits: 4, omittingEmptySubsequences: false)
        guard parts.count >= 4, prefixes.contains(String(parts[0])), parts[2] == family, parts[3] == "kube-proxy" else {
            throw ModelError("bad command: \(line)")
        }
        let verb = parts[0], object = parts[1]
        let rest = parts.count > 4 ? parts[4] : ""
        if object == "table" {
            switch verb {
            case "add":
                exists = true
                if rest.hasPrefix("{ comment ") { tableComment = String(rest) }
            case "delete":
                guard exists else { throw ModelError("no table: \(line)") }
                self = NFTModel(family: family)
            default: throw ModelError("unsupported: \(line)")
            }
            return
        }
        guard exists else { throw ModelError("no table: \(line)") }
        let (name, tail) = NFTModel.nameAndRest(rest)
        switch (verb, object) {
        case ("add", "chain"):
            if let c = chains[name] {
                if !tail.isEmpty && !c.suffix.isEmpty && " " + tail != c.suffix { throw ModelError("chain spec differs: \(line)") }
                if c.suffix.isEmpty && !tail.isEmpty { chains[name]!.suffix = " " + tail }
            } else {
                chains[name] = Chain(suffix: tail.isEmpty ? "" : " " + tail, rules: [])
            }
        case ("flush", "chain"):
            guard chains[name] != nil else { throw ModelError("no chain: \(line)") }
            chains[name]!.rules = []
        case ("delete", "chain"):
            guard chains[name] != nil else { throw ModelError("no chain: \(line)") }
            if referenced(chain: name) { throw ModelError("chain in use: \(line)") }
            chains[name] = nil
        case ("add", "rule"):
            guard chains[name] != nil else { throw ModelError("no chain: \(line)") }
            for c in NFTModel.chainRefs(tail) where chains[c] == nil { throw ModelError("rule refers to missing chain \(c): \(line)") }
            for s in NFTModel.setRefs(tail) where containers[s] == nil { throw ModelError("rule refers to missing set \(s): \(line)") }
            chains[name]!.rules.append(tail)
        case ("add", "set"), ("add", "map"):
            if let c = containers[name] {
                if c.kind != object || c.suffix != " " + tail { throw ModelError("set spec differs: \(line)") }
            } else {
                containers[name] = Container(kind: String(object), suffix: " " + tail, elements: [:], values: [:])
            }
        case ("flush", "set"), ("flush", "map"):
            guard containers[name]?.kind == String(object) else { throw ModelError("no \(object): \(line)") }
            containers[name]!.elements = [:]
            containers[name]!.values = [:]
        case ("delete", "set"), ("delete", "map"):
            guard containers[name]?.kind == String(object) else { throw ModelError("no \(object): \(line)") }
            if referenced(set: name) { throw ModelError("set in use: \(line)") }
            containers[name] = nil
        case ("add", "element"), ("delete", "element"):
            guard containers[name] != nil else { throw ModelError("no set: \(line)") }
            guard tail.hasPrefix("{ "), tail.hasSuffix(" }") else { throw ModelError("bad element: \(line)") }
            let body = String(tail.dropFirst(2).dropLast(2))
            var key = body, value: String?
            if let r = body.range(of: " : ") {
                key = String(body[..<r.lowerBound])
                value = String(body[r.upperBound...])
            }
            if let r = key.range(of: " comment ") { key = String(key[..<r.lowerBound]) }
            if verb == "delete" {
                guard containers[name]!.elements[key] != nil else { throw ModelError("no element: \(line)") }
                guard key == body else { throw ModelError("delete carries more than the key: \(line)") }
                containers[name]!.elements[key] = nil
                containers[name]!.values[key] = nil
            } else {
                if containers[name]!.kind == "map" && value == nil { throw ModelError("map element without value: \(line)") }
                if let v = value { for c in NFTModel.chainRefs(v) where chains[c] == nil { throw ModelError("element refers to missing chain: \(line)") } }
                if let old = containers[name]!.values[key], old != value { throw ModelError("element exists with another value: \(line)") }
                if containers[name]!.elements[key] == nil { containers[name]!.elements[key] = body }
                if let value { containers[name]!.values[key] = value }
            }
        default:
            throw ModelError("unsupported: \(line)")
        }
    }

    /// The table as knftables' fake dumps it (unsorted; compare through `sortNFT`).
    func dump() -> String {
        guard exists else { return "" }
        let t = "\(family) kube-proxy"
        var out: [String] = ["add table \(t)" + (tableComment.map { " " + $0 } ?? "")]
        for name in chains.keys.sorted() { out.append("add chain \(t) \(name)\(chains[name]!.suffix)") }
        for name in containers.keys.sorted() { out.append("add \(containers[name]!.kind) \(t) \(name)\(containers[name]!.suffix)") }
        for name in chains.keys.sorted() { for r in chains[name]!.rules { out.append("add rule \(t) \(name) \(r)") } }
        for name in containers.keys.sorted() {
            for k in containers[name]!.elements.keys.sorted() { out.append("add element \(t) \(name) { \(containers[name]!.elements[k]!) }") }
        }
        return out.joined(separator: "\n") + "\n"
    }
}

/// kube-proxy's `sortNFTablesTransaction` (helpers_test.go): blank and `#` lines dropped;
/// stable sort by object type (table, chain, rule, set, map, element), then object name;
/// lines of the same type and name other than rules ordered bytewise; rules keep their order.
func sortNFT(_ text: String) -> String {
    let order: [String: Int] = ["table": 10, "chain": 9, "rule": 8, "set": 7, "map": 6, "element": 5]
    let lines = text.split(separator: "\n", omittingEmptySubsequences: true).map(String.init).filter { !$0.hasPrefix("#") }
        .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    struct Key { var rank: Int; var name: [UInt8]; var line: [UInt8]; var index: Int }
    let keyed: [(Key, String)] = lines.enumerated().map { i, l in
        let w = l.split(separator: " ", omittingEmptySubsequences: false)
        guard w.count >= 5 else { return (Key(rank: 0, name: [], line: [], index: i), l) }
        let typ = String(w[1])
        let rank = -(order[typ] ?? 0)
        let line: [UInt8] = typ == "rule" ? [] : Array(l.utf8)
        return (Key(rank: rank, name: Array(w[4].utf8), line: line, index: i), l)
    }
    func less(_ a: [UInt8], _ b: [UInt8]) -> Bool { a.lexicographicallyPrecedes(b) }
    let sorted = keyed.sorted { x, y in
        let (a, b) = (x.0, y.0)
        if a.rank != b.rank { return a.rank < b.rank }
        if a.name != b.name { return less(a.name, b.name) }
        if a.line != b.line { return less(a.line, b.line) }
        return a.index < b.index
    }
    return sorted.map(\.1).joined(separator: "\n")
}

/// The test fake's mark text (kube-proxy's NewFakeProxier hard-codes `0x4000`; production
/// formats it as `0x00004000`).
func fakeMark(_ text: String) -> String { text.replacingOccurrences(of: "0x00004000", with: "0x4000") }

/// The first differing line of two sorted texts, for failure messages.
func firstDifference(_ a: String, _ b: String) -> String? {
    let x = a.split(separator: "\n"), y = b.split(separator: "\n")
    for i in 0..<max(x.count, y.count) {
        let l = i < x.count ? String(x[i]) : "<none>"
        let r = i < y.count ? String(y[i]) : "<none>"
        if l != r { return "line \(i + 1):\n got: \(l)\nwant: \(r)" }
    }
    return nil
}

/// Settings of kube-proxy's NewFakeProxier (pkg/proxy/nftables/proxier_test.go).
enum KubeProxyFake {
    static let nodeIPs = ["192.168.0.2", "192.168.1.2", "192.168.99.11", "2001:db8::1", "2001:db8:1::2"]

    static func options(_ family: IPFamily = .ipv4, nodePortAddresses: NodePortAddresses? = nil,
                        masqueradeAll: Bool = false, detector: Bool = true) -> NFTablesOptions {
        let v4 = family == .ipv4
        let node = NodeConfig(
            nodeName: "test-node",
            nodeIPs: [IPAddress(v4 ? "192.168.0.2" : "2001:db8::1")!],
            clusterCIDRs: detector ? [CIDR(v4 ? "10.0.0.0/8" : "fd00:10::/64")!] : [],
            masqueradeAll: masqueradeAll,
            nodePortAddresses: nodePortAddresses ?? .cidrs([CIDR("192.168.0.2/32")!, CIDR("2001:db8::1/128")!]))
        return NFTablesOptions(
            node: node, family: family,
            localAddresses: (["127.0.0.1", "::1"] + nodeIPs).compactMap(IPAddress.init),
            serviceCIDRs: [CIDR(v4 ? "172.30.0.0/16" : "fd00:10:96::/112")!])
    }
}

/// Compact model builders.
func spn(_ ns: String, _ name: String, _ port: String = "p80", _ proto: TransportProtocol = .tcp) -> ServicePortName {
    ServicePortName(service: NamespacedName(namespace: ns, name: name), port: port, proto: proto)
}

func ep(_ ip: String, _ port: Int = 80, local: Bool = false, ready: Bool = true, serving: Bool = true,
        terminating: Bool = false) -> EndpointInfo {
    EndpointInfo(ip: IPAddress(ip)!, port: port, isLocal: local, ready: ready, serving: serving, terminating: terminating)
}

func svc(_ name: ServicePortName, _ clusterIP: String, port: Int = 80, nodePort: Int = 0, lb: [String] = [],
         sourceRanges: [String] = [], externalIPs: [String] = [], affinity: Int? = nil, eTPLocal: Bool = false,
         iTPLocal: Bool = false, healthCheckNodePort: Int = 0) -> ServicePortInfo {
    ServicePortInfo(name: name, clusterIP: IPAddress(clusterIP)!, port: port, proto: name.proto, nodePort: nodePort,
                    loadBalancerVIPs: lb.map { IPAddress($0)! }, loadBalancerSourceRanges: sourceRanges.map { CIDR($0)! },
                    externalIPs: externalIPs.map { IPAddress($0)! }, stickyTimeoutSeconds: affinity,
                    externalPolicyLocal: eTPLocal, internalPolicyLocal: iTPLocal, healthCheckNodePort: healthCheckNodePort)
}

/// A state from service ports and their endpoints.
func makeState(_ ports: [(ServicePortInfo, [EndpointInfo])], family: IPFamily = .ipv4, changed: Set<NamespacedName> = []) -> ProxyState {
    var s = ProxyState(family: family)
    for (info, eps) in ports {
        s.servicePorts[info.name] = info
        if !eps.isEmpty { s.endpoints[info.name] = eps.sorted() }
    }
    s.changedServices = changed
    return s
}

/// Applies a full sync of `state` to a fresh model and returns the model.
func fullModel(_ state: ProxyState, options: NFTablesOptions) throws -> NFTModel {
    let rs = NFTablesCompiler(options: options).compile(state)
    var m = NFTModel(family: NFTFamily(options.family).rawValue)
    try m.apply(rs.fullTransaction(recreateBaseChains: false).text)
    return m
}
