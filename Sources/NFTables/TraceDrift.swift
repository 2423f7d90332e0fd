// Sluice: a per-node Kubernetes service proxy.
// Drift between what a full nftables sync would write and what the kernel's `kube-proxy`
// table holds: base chain hooks, every chain's rules (in order), set and map declarations
// and their elements, per Service port. Read-only: one `list table` through libnftables.

import SluiceCore

/// Compares desired and actual `kube-proxy` tables.
public enum NFTablesDrift {
    /// The differences between `desired` (with its owners) and `actual`.
    public static func compare(desired: NFTTableSnapshot, actual: NFTTableSnapshot) -> [DriftItem] {
        var items: [DriftItem] = []
        func chainOwner(_ name: String) -> String { desired.owners[name] ?? NFTTableSnapshot.owner(ofChain: name) ?? "" }
        // Chains.
        for name in Set(desired.chains.keys).union(actual.chains.keys).sorted() {
            let owner = chainOwner(name)
            switch (desired.chains[name], actual.chains[name]) {
            case (let w?, nil):
                items.append(DriftItem(kind: .missing, owner: owner, object: "chain \(name)", want: "\(w.rules.count) rules", have: nil))
            case (nil, let h?):
                // A sync flushes a chain nobody wants and deletes it on the next one: an empty
                // service chain is that chain between two syncs, not drift.
                if h.rules.isEmpty && NFTChainNames.isServiceChain(name) { continue }
                items.append(DriftItem(kind: .extra, owner: owner, object: "chain \(name)", want: nil, have: "\(h.rules.count) rules"))
            case (let w?, let h?):
                if w.hook != h.hook {
                    items.append(DriftItem(kind: .different, owner: owner, object: "chain \(name) hook",
                                           want: w.hook.map(hookText) ?? "no hook", have: h.hook.map(hookText) ?? "no hook"))
                }
                items += compareRules(chain: name, want: w.rules, have: h.rules, owner: owner)
            case (nil, nil): break
            }
        }
        // Sets and maps.
        for name in Set(desired.containers.keys).union(actual.containers.keys).sorted() {
            let owner = desired.owners[name] ?? (NFTChainNames.isAffinitySet(name) ? NFTTableSnapshot.owner(ofChain: name) ?? "" : "")
            switch (desired.containers[name], actual.containers[name]) {
            case (let w?, nil):
                items.append(DriftItem(kind: .missing, owner: owner, object: "\(w.kind.rawValue) \(name)", want: w.declaration, have: nil))
            case (nil, let h?):
                items.append(DriftItem(kind: .extra, owner: owner, object: "\(h.kind.rawValue) \(name)", want: nil, have: h.declaration))
            case (let w?, let h?):
                if w.kind != h.kind || w.type != h.type || w.flags != h.flags || w.timeoutSeconds != h.timeoutSeconds || w.comment != h.comment {
                    items.append(DriftItem(kind: .different, owner: owner, object: "\(w.kind.rawValue) \(name) declaration",
                                           want: w.declaration, have: h.declaration))
                }
                if w.isDynamic { continue }  // the packet path fills affinity sets
                for key in Set(w.elements.keys).union(h.elements.keys).sorted() {
                    let we = w.elements[key], he = h.elements[key]
                    let elementOwner = desired.owners[name + "\u{0}" + key] ?? he.flatMap { elementOwnerGuess($0, chainOwner: chainOwner) } ?? ""
                    let object = "element of \(w.kind.rawValue) \(name)"
                    switch (we, he) {
                    case (let a?, nil):
                        items.append(DriftItem(kind: .missing, owner: elementOwner, object: object, want: elementText(key, a), have: nil))
                    case (nil, let b?):
                        items.append(DriftItem(kind: .extra, owner: elementOwner, object: object, want: nil, have: elementText(key, b)))
                    case (let a?, let b?) where a != b:
                        items.append(DriftItem(kind: .different, owner: elementOwner, object: object, want: elementText(key, a), have: elementText(key, b)))
                    default: break
                    }
                }
            case (nil, nil): break
            }
        }
        return items.sorted()
    }

    private static func hookText(_ h: NFTHook) -> String { "type \(h.type) hook \(h.hook) priority \(h.priority)" }

    private static func elementText(_ key: String, _ e: NFTTableSnapshot.Element) -> String {
        var s = key
        if let c = e.comment { s += " comment " + nftQuoted(c) }
        if let v = e.value { s += " : " + v }
        return s
    }

    /// An element the desired state does not have: its comment (`ns/name:port`) or its verdict's chain names the Service.
    private static func elementOwnerGuess(_ e: NFTTableSnapshot.Element, chainOwner: (String) -> String) -> String? {
        if let c = e.comment, c.contains("/") { return c }
        if let v = e.value, let target = v.split(separator: " ").last { let o = chainOwner(String(target)); return o.isEmpty ? nil : o }
        return nil
    }

    private static func compareRules(chain: String, want: [String], have: [String], owner: String) -> [DriftItem] {
        var budget: [String: Int] = [:]
        for r in have { budget[r, default: 0] += 1 }
        var missing: [String] = []
        for r in want {
            if budget[r, default: 0] > 0 { budget[r]! -= 1 } else { missing.append(r) }
        }
        budget = [:]
        for r in want { budget[r, default: 0] += 1 }
        var extra: [String] = []
        for r in have {
            if budget[r, default: 0] > 0 { budget[r]! -= 1 } else { extra.append(r) }
        }
        let object = "chain \(chain) rule"
        var items: [DriftItem] = []
        // A missing and an extra rule with the same verdict are one changed rule (a weight, an address).
        for m in missing {
            if let j = extra.firstIndex(where: { verdictWord($0) == verdictWord(m) && sameShape($0, m) }) {
                items.append(DriftItem(kind: .different, owner: owner, object: object, want: m, have: extra.remove(at: j)))
            } else {
                items.append(DriftItem(kind: .missing, owner: owner, object: object, want: m, have: nil))
            }
        }
        for e in extra { items.append(DriftItem(kind: .extra, owner: owner, object: object, want: nil, have: e)) }
        if items.isEmpty && want != have {
            items.append(DriftItem(kind: .different, owner: owner, object: "chain \(chain) rule order",
                                   want: want.joined(separator: "\n"), have: have.joined(separator: "\n")))
        }
        return items
    }

    private static func verdictWord(_ rule: String) -> String {
        let words = rule.split(separator: " ")
        for v in ["numgen", "vmap", "dnat", "masquerade", "reject", "drop", "goto", "jump", "return", "mark", "update"] where words.contains(Substring(v)) {
            return v
        }
        return ""
    }

    /// Two rules of the same form (the same words where neither holds an address or a number).
    private static func sameShape(_ a: String, _ b: String) -> Bool {
        func shape(_ s: String) -> [String] {
            s.split(separator: " ").prefix(3).map { w in w.contains(where: { $0.isNumber || $0 == ":" }) ? "#" : String(w) }
        }
        return shape(a) == shape(b)
    }
}

/// Reads the kernel's `kube-proxy` table: `nft list table` through libnftables (read-only,
/// the kernel's own lock only for the dump).
public struct NFTablesKernelReader: Sendable {
    /// The family read.
    public let family: NFTFamily
    private let lib: LibNFTables

    /// A reader over `lib`.
    public init(family: NFTFamily, lib: LibNFTables) {
        self.family = family
        self.lib = lib
    }

    /// The table; nil when it does not exist.
    public func read() throws -> NFTTableSnapshot? {
        let text: String
        do {
            text = try lib.list(table: kubeProxyTableName, family: family)
        } catch let e as NFTablesError where e.isNotFound {
            return nil
        }
        do {
            return try NFTTableSnapshot.parse(listing: text, family: family)
        } catch {
            throw NFTablesError(operation: "reading table \(family.rawValue) \(kubeProxyTableName)", message: error.description)
        }
    }
}

/// The nftables mode's drift check: a full sync's table for the state against the kernel's.
public struct NFTablesDriftChecker: DriftChecking {
    public var mode: String { "nftables" }
    /// The compiler options (as the running proxy's).
    public let options: NFTablesOptions
    /// The kernel's table.
    public let reader: NFTablesKernelReader

    /// A checker.
    public init(options: NFTablesOptions, reader: NFTablesKernelReader) {
        self.options = options
        self.reader = reader
    }

    /// The table a full sync of `state` writes.
    public func desired(_ state: ProxyState) -> NFTTableSnapshot {
        NFTTableSnapshot(ruleset: NFTablesCompiler(options: options).compile(state))
    }

    public func check(_ state: ProxyState) async throws -> DriftReport {
        let want = desired(state)
        guard let have = try reader.read() else {
            return DriftReport(mode: mode, family: options.family, items: [
                DriftItem(kind: .missing, owner: "", object: "table \(want.family.rawValue) \(kubeProxyTableName)",
                          want: "\(want.chains.count) chains, \(want.containers.count) sets and maps", have: nil),
            ])
        }
        return DriftReport(mode: mode, family: options.family, items: NFTablesDrift.compare(desired: want, actual: have))
    }
}
