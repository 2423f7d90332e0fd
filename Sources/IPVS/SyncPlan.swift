// Sluice: a per-node Kubernetes service proxy.
// The IPVS mode's plan: from the desired state (the compiler's), what the kernel holds (read
// by the backend, or remembered from the last sync) and the sync's kind to the value that
// lists every write of the sync: the sets to create and their members to add and delete, the
// iptables batch, the IPVS virtual and real server messages, the real servers that start or
// stop draining, and the kube-ipvs0 addresses to bind and unbind. Pure: it reads and writes
// nothing; `IPVSBackend` reads the kernel, asks for the plan and applies it.

import IPTables
import KernelKit
import SluiceCore

/// A real server of a virtual server, as the drain bookkeeping names it.
public struct IPVSDrainKey: Hashable, Sendable, CustomStringConvertible {
    /// The virtual server.
    public var service: VirtualServerKey
    /// The real server's address and port.
    public var endpoint: RealServerEndpoint

    /// Creates a key.
    public init(service: VirtualServerKey, endpoint: RealServerEndpoint) {
        self.service = service
        self.endpoint = endpoint
    }

    /// `vs -> rs`.
    public var description: String { "\(service) -> \(endpoint)" }
}

/// A change a sync makes to the real servers draining at weight 0.
public enum IPVSDrainChange: Hashable, Sendable {
    /// The real server (as the kernel holds it, with its connection count) starts draining;
    /// it is deleted when its connections end or its graceful period is over.
    case start(VirtualServerKey, RealServer)
    /// The real server is desired again: it no longer drains.
    case stop(IPVSDrainKey)
    /// The virtual server is added anew or deleted: none of its real servers drains any more.
    case stopAll(VirtualServerKey)
}

/// Members to add to and delete from one set.
public struct IPSetChange: Hashable, Sendable {
    /// The set's name.
    public var set: String
    /// Members to add, sorted.
    public var add: [IPSetEntry]
    /// Members to delete, sorted.
    public var delete: [IPSetEntry]

    /// Creates a change.
    public init(set: String, add: [IPSetEntry], delete: [IPSetEntry]) {
        self.set = set
        self.add = add
        self.delete = delete
    }
}

/// The iptables batch a sync writes.
public struct IPVSRestore: Hashable, Sendable {
    /// The IPVS mode's rule set, as compiled (what the next sync compares with).
    public var rules: String
    /// What is sent to iptables-restore: the rule set, with the missing jump rules from the
    /// built-in chains inserted on a full sync.
    public var batch: String

    /// Creates a batch.
    public init(rules: String, batch: String) {
        self.rules = rules
        self.batch = batch
    }
}

/// What the backend read of the kernel for a sync that reads it (every full sync, and a
/// partial one without a remembered image).
public struct IPVSKernelView: Sendable {
    /// kube-ipvs0's interface index.
    public var dummyIndex: UInt32
    /// Every address in the network namespace, with its interface.
    public var addresses: [InterfaceAddress]
    /// The IPVS virtual servers (of every family).
    public var virtualServers: [VirtualServer]
    /// The real servers of the virtual servers the plan compares
    /// (``IPVSPlanner/destinationsToRead(desired:kernel:kind:)``).
    public var destinations: [VirtualServerKey: [RealServer]]
    /// The sets of the desired state that exist, with their members.
    public var sets: [IPSetInfo]
    /// `iptables-save` of the nat and filter tables, read for a full sync (its jump rules are
    /// checked against them); empty otherwise.
    public var saves: [Table: String]

    /// Creates a view.
    public init(dummyIndex: UInt32, addresses: [InterfaceAddress], virtualServers: [VirtualServer] = [],
                destinations: [VirtualServerKey: [RealServer]] = [:], sets: [IPSetInfo] = [], saves: [Table: String] = [:]) {
        self.dummyIndex = dummyIndex
        self.addresses = addresses
        self.virtualServers = virtualServers
        self.destinations = destinations
        self.sets = sets
        self.saves = saves
    }

    /// The node's own addresses: every address not on kube-ipvs0.
    public var nodeAddresses: [IPAddress] { addresses.filter { $0.index != dummyIndex }.map(\.address) }

    /// The addresses of `family` bound to kube-ipvs0.
    public func boundAddresses(_ family: IPFamily) -> Set<IPAddress> {
        Set(addresses.filter { $0.index == dummyIndex && $0.address.family == family }.map(\.address))
    }
}

/// Everything one IPVS-mode sync writes, in the order ``IPVSBackend`` writes it: sets first
/// (the iptables rules reference them), then the iptables batch, then the IPVS messages (the
/// virtual server deletions last), then the kube-ipvs0 addresses.
public struct IPVSSyncPlan: Sendable {
    /// Whether the sync compares everything with the kernel (a full sync).
    public var full: Bool
    /// What the kernel holds once the plan is applied.
    public var desired: IPVSDesiredState
    /// The compiler options it was compiled with (the node addresses resolved).
    public var options: IPVSOptions
    /// kube-ipvs0's interface index.
    public var dummyIndex: UInt32
    /// Sets to create.
    public var createSets: [IPSetDefinition] = []
    /// Members to add and delete, in the desired state's set order.
    public var setChanges: [IPSetChange] = []
    /// The iptables batch; nil when the rule set is unchanged and the sync is partial.
    public var restore: IPVSRestore?
    /// IPVS virtual and real server messages, in order.
    public var operations: [IPVSOperation] = []
    /// Real servers that start or stop draining, in order.
    public var drains: [IPVSDrainChange] = []
    /// Addresses to bind to kube-ipvs0, sorted.
    public var bind: [IPAddress] = []
    /// Addresses to remove from kube-ipvs0, sorted.
    public var unbind: [IPAddress] = []

    /// True when the plan writes nothing to the kernel (the iptables batch included).
    public var writesNothing: Bool {
        createSets.isEmpty && setChanges.isEmpty && restore == nil && operations.isEmpty && bind.isEmpty && unbind.isEmpty
    }
}

/// The IPVS mode's pure planner. The daemon's backend, `sluice compile --proxy-mode ipvs`,
/// `sluice diff` and the benchmark's `sluice-bench-compile` compile through it.
public struct IPVSPlanner: Sendable {
    /// The mode's options; the node addresses (`nodePortAddresses`, `localAddresses`) are
    /// resolved per sync from the addresses the node holds.
    public var options: IPVSOptions

    /// Creates a planner.
    public init(options: IPVSOptions) { self.options = options }

    /// The options a sync compiles with when the node's own addresses are `nodeAddresses`
    /// (the daemon: every address not on kube-ipvs0; `sluice compile`: the node IPs): they
    /// are the node's local addresses, and the NodePort addresses among them.
    public func options(nodeAddresses: [IPAddress]) -> IPVSOptions {
        var o = options
        o.localAddresses = Set(nodeAddresses)
        o.nodePortAddresses = IPVSOptions.nodePortAddresses(from: nodeAddresses, node: o.node, family: o.family)
        return o
    }

    /// The desired state of `state` on a node whose own addresses are `nodeAddresses`.
    public func desired(_ state: ProxyState, nodeAddresses: [IPAddress]) -> (desired: IPVSDesiredState, options: IPVSOptions) {
        let o = options(nodeAddresses: nodeAddresses)
        return (IPVSCompiler(options: o).compile(state), o)
    }

    /// The plan of a full sync of `state` into a kernel that holds nothing of the mode's
    /// (what `sluice compile` prints and the benchmark times).
    public func planFromScratch(_ state: ProxyState, nodeAddresses: [IPAddress]) -> IPVSSyncPlan {
        let (desired, o) = self.desired(state, nodeAddresses: nodeAddresses)
        return plan(desired, options: o, kind: .full, kernel: IPVSKernelView(dummyIndex: 0, addresses: []),
                    lastRestore: nil, draining: [])
    }

    // MARK: A sync that reads the kernel

    /// The virtual servers whose real servers a sync reading the kernel compares, and so must
    /// read: the desired ones the kernel holds, of the Services the sync writes.
    public static func destinationsToRead(desired: IPVSDesiredState, kernel virtualServers: [VirtualServer],
                                          kind: SyncKind) -> [VirtualServerKey] {
        let present = Set(virtualServers.map(\.key))
        return desired.sortedVirtualServers.filter { d in
            present.contains(d.server.key) && (kind.changed?.contains(d.servicePort.service) ?? true)
        }.map(\.server.key)
    }

    /// The plan of a sync that has read the kernel: everything desired that the kernel lacks
    /// or holds differently is written, and everything of this family the kernel holds and
    /// the desired state does not is removed (virtual servers in `excludeCIDRs` excepted). A
    /// partial sync (`kind`) compares the real servers of the changed Services only.
    /// - Parameters:
    ///   - desired: ``desired(_:nodeAddresses:)`` of the state, with `options`.
    ///   - lastRestore: the rule set the last successful restore wrote (nil: none).
    ///   - draining: the real servers draining now.
    public func plan(_ desired: IPVSDesiredState, options: IPVSOptions, kind: SyncKind, kernel: IPVSKernelView,
                     lastRestore: String?, draining: Set<IPVSDrainKey>) -> IPVSSyncPlan {
        let family = options.family
        var plan = IPVSSyncPlan(full: kind.isFull, desired: desired, options: options, dummyIndex: kernel.dummyIndex)

        // ipsets.
        let byName = Dictionary(kernel.sets.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        plan.createSets = desired.sets.filter { byName[$0.name] == nil }
        for d in desired.sets {
            let want = desired.entries[d.name] ?? []
            let have = Set(byName[d.name]?.entries ?? [])
            let add = want.subtracting(have).sorted()
            let del = have.subtracting(want).sorted()
            if !add.isEmpty || !del.isEmpty { plan.setChanges.append(IPSetChange(set: d.name, add: add, delete: del)) }
        }

        // iptables: rewritten when it changed, always on a full sync (with any missing jump rule).
        plan.restore = restore(desired, full: kind.isFull, lastRestore: lastRestore, saves: kernel.saves)

        // IPVS virtual and real servers.
        let current = kernel.virtualServers.filter { $0.key.address.family == family }
        let currentByKey = Dictionary(current.map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a })
        for d in desired.sortedVirtualServers {
            let key = d.server.key
            guard let existing = currentByKey[key] else {
                plan.operations.append(.addService(d.server))
                for rs in d.destinations { plan.operations.append(.addDestination(key, rs)) }
                if draining.contains(where: { $0.service == key }) { plan.drains.append(.stopAll(key)) }
                continue
            }
            if !d.server.sameConfiguration(as: existing) { plan.operations.append(.updateService(d.server)) }
            if let changed = kind.changed, !changed.contains(d.servicePort.service) { continue }
            let have = kernel.destinations[key] ?? []
            let haveByEndpoint = Dictionary(have.map { ($0.endpoint, $0) }, uniquingKeysWith: { a, _ in a })
            let want = Set(d.destinations.map(\.endpoint))
            for rs in d.destinations {
                if let h = haveByEndpoint[rs.endpoint] {
                    // A desired real server not at weight 1: a restart left it drained, or it
                    // was drained and came back. Put it back in service.
                    if h.weight != rs.weight || h.forwarding != rs.forwarding { plan.operations.append(.updateDestination(key, rs)) }
                } else {
                    plan.operations.append(.addDestination(key, rs))
                }
                let dk = IPVSDrainKey(service: key, endpoint: rs.endpoint)
                if draining.contains(dk) { plan.drains.append(.stop(dk)) }
            }
            for h in have.sorted() where !want.contains(h.endpoint) {
                if draining.contains(IPVSDrainKey(service: key, endpoint: h.endpoint)) { continue }
                remove(h, of: key, into: &plan)
            }
        }
        for vs in current.sorted(by: { $0.key < $1.key }) where desired.virtualServers[vs.key] == nil {
            if inExcludedRange(vs.key.address) { continue }
            plan.operations.append(.deleteService(vs.key))
            if draining.contains(where: { $0.service == vs.key }) { plan.drains.append(.stopAll(vs.key)) }
        }

        // kube-ipvs0.
        let bound = kernel.boundAddresses(family)
        plan.bind = desired.boundAddresses.subtracting(bound).sorted()
        plan.unbind = bound.subtracting(desired.boundAddresses).sorted()
        return plan
    }

    // MARK: A partial sync from memory

    /// The virtual servers whose real servers a partial sync from memory must read: the TCP
    /// ones losing real servers (their connection counts decide between deleting and draining).
    public static func destinationsToRead(update desired: IPVSDesiredState, changes: IPVSDesiredChanges) -> [VirtualServerKey] {
        changes.virtualServers.sorted(by: { $0.key < $1.key }).compactMap { key, was in
            guard key.proto == .tcp, let o = was, let d = desired.virtualServers[key] else { return nil }
            let want = Set(d.destinations.map(\.endpoint))
            return o.destinations.contains { !want.contains($0.endpoint) } ? key : nil
        }
    }

    /// The plan of a partial sync from memory: `desired` is the remembered desired state
    /// updated for the changed Services (`IPVSCompiler.update`, which gave `changes`), and
    /// what is written is the difference for what the update touched; nothing of the kernel
    /// is read but the real servers of ``destinationsToRead(update:changes:)`` (`inKernel`).
    public func plan(update desired: IPVSDesiredState, changes: IPVSDesiredChanges, options: IPVSOptions, dummyIndex: UInt32,
                     inKernel: [VirtualServerKey: [RealServer]], lastRestore: String?, draining: Set<IPVSDrainKey>) -> IPVSSyncPlan {
        var plan = IPVSSyncPlan(full: false, desired: desired, options: options, dummyIndex: dummyIndex)

        // ipsets: the members the update touched.
        for d in desired.sets {
            guard let touched = changes.entries[d.name] else { continue }
            let now = desired.entries[d.name] ?? []
            var add: [IPSetEntry] = []
            var del: [IPSetEntry] = []
            for (entry, was) in touched {
                let isMember = now.contains(entry)
                if isMember && !was { add.append(entry) } else if was && !isMember { del.append(entry) }
            }
            if !add.isEmpty || !del.isEmpty { plan.setChanges.append(IPSetChange(set: d.name, add: add.sorted(), delete: del.sorted())) }
        }

        plan.restore = restore(desired, full: false, lastRestore: lastRestore, saves: [:])

        // IPVS: the virtual servers the update touched.
        var deletes: [IPVSOperation] = []
        for (key, was) in changes.virtualServers.sorted(by: { $0.key < $1.key }) {
            switch (was, desired.virtualServers[key]) {
            case (nil, nil):
                continue
            case (nil, let d?):
                plan.operations.append(.addService(d.server))
                for rs in d.destinations { plan.operations.append(.addDestination(key, rs)) }
                if draining.contains(where: { $0.service == key }) { plan.drains.append(.stopAll(key)) }
            case (_?, nil):
                if draining.contains(where: { $0.service == key }) { plan.drains.append(.stopAll(key)) }
                if inExcludedRange(key.address) { continue }
                deletes.append(.deleteService(key))
            case (let o?, let d?):
                if !d.server.sameConfiguration(as: o.server) { plan.operations.append(.updateService(d.server)) }
                let had = Dictionary(o.destinations.map { ($0.endpoint, $0) }, uniquingKeysWith: { a, _ in a })
                let want = Set(d.destinations.map(\.endpoint))
                for rs in d.destinations {
                    let dk = IPVSDrainKey(service: key, endpoint: rs.endpoint)
                    if let h = had[rs.endpoint] {
                        if h.weight != rs.weight || h.forwarding != rs.forwarding { plan.operations.append(.updateDestination(key, rs)) }
                    } else if draining.contains(dk) {
                        // Draining at weight 0 and desired again: back in service.
                        plan.operations.append(.updateDestination(key, rs))
                    } else {
                        plan.operations.append(.addDestination(key, rs))
                    }
                    if draining.contains(dk) { plan.drains.append(.stop(dk)) }
                }
                let gone = o.destinations.filter { !want.contains($0.endpoint) }
                guard !gone.isEmpty else { continue }
                let kernel = Dictionary((inKernel[key] ?? []).map { ($0.endpoint, $0) }, uniquingKeysWith: { a, _ in a })
                for rs in gone { remove(kernel[rs.endpoint] ?? rs, of: key, into: &plan, zeroEvenIfZero: true) }
            }
        }
        plan.operations += deletes

        // kube-ipvs0: the addresses the update touched.
        plan.bind = changes.addresses.filter { !$0.value && desired.boundAddresses.contains($0.key) }.map(\.key).sorted()
        plan.unbind = changes.addresses.filter { $0.value && !desired.boundAddresses.contains($0.key) }.map(\.key).sorted()
        return plan
    }

    // MARK: Shared steps

    /// The iptables batch: the rule set when it changed or the sync is full; on a full sync
    /// with the jump rules `saves` lacks inserted in the same batch (no fork per rule).
    private func restore(_ desired: IPVSDesiredState, full: Bool, lastRestore: String?, saves: [Table: String]) -> IPVSRestore? {
        let text = desired.restoreText
        guard full || text != lastRestore else { return nil }
        var batch = text
        if full {
            var missing: [Table: [JumpRule]] = [:]
            for table in [Table.nat, .filter] {
                let absent = JumpInstaller.missing(ipvsJumpRules, in: table, save: saves[table] ?? "")
                if !absent.isEmpty { missing[table] = absent }
            }
            if !missing.isEmpty { batch = JumpInstaller.inserting(missing, into: text) }
        }
        return IPVSRestore(rules: text, batch: batch)
    }

    /// A real server that is no longer desired: deleted at once, or, for TCP with established
    /// connections (graceful termination, as kube-proxy), set to weight 0 to drain (a sync
    /// from memory sets the weight even when the kernel has it at 0 already).
    private func remove(_ h: RealServer, of key: VirtualServerKey, into plan: inout IPVSSyncPlan, zeroEvenIfZero: Bool = false) {
        if key.proto != .tcp || h.activeConnections == 0 {
            plan.operations.append(.deleteDestination(key, h))
            return
        }
        if h.weight != 0 || zeroEvenIfZero {
            var zero = h
            zero.weight = 0
            plan.operations.append(.updateDestination(key, zero))
        }
        plan.drains.append(.start(key, h))
    }

    private func inExcludedRange(_ ip: IPAddress) -> Bool {
        options.excludeCIDRs.contains { $0.contains(ip) }
    }
}
