// Sluice: a per-node Kubernetes service proxy.
// IPVS-mode drift: what a full sync would hold (virtual servers and real servers, ipset
// members, kube-ipvs0 addresses, the IPVS-mode iptables chains) against the kernel, read with
// one netlink dump per object kind and one iptables-save per table. Read-only.

import IPTables
import KernelKit
import SluiceCore

/// What the kernel holds in IPVS mode, as the drift check reads it.
public struct IPVSKernelState: Sendable {
    /// Virtual servers with their real servers.
    public var services: [(server: VirtualServer, destinations: [RealServer])]
    /// The sets Sluice manages, with members.
    public var sets: [IPSetInfo]
    /// Addresses on kube-ipvs0 (of the family checked).
    public var boundAddresses: Set<IPAddress>
    /// The nat and filter tables.
    public var rules: ParsedRuleSet

    /// Creates a kernel state.
    public init(services: [(server: VirtualServer, destinations: [RealServer])], sets: [IPSetInfo], boundAddresses: Set<IPAddress>,
                rules: ParsedRuleSet) {
        self.services = services
        self.sets = sets
        self.boundAddresses = boundAddresses
        self.rules = rules
    }
}

/// Compares IPVS mode's desired state with the kernel's.
public enum IPVSDrift {
    /// The differences. Real servers at weight 0 that are not desired are draining (graceful
    /// termination) and not reported; virtual servers in `excludeCIDRs`, and other families',
    /// are not the proxy's.
    public static func compare(desired: IPVSDesiredState, actual: IPVSKernelState, family: IPFamily,
                               excludeCIDRs: [CIDR]) -> [DriftItem] {
        var items: [DriftItem] = []
        var ownerOfAddress: [IPAddress: String] = [:]
        for vs in desired.virtualServers.values { ownerOfAddress[vs.server.key.address] = vs.servicePort.description }
        let kernel = Dictionary(actual.services.map { ($0.server.key, $0) }, uniquingKeysWith: { a, _ in a })
        for (key, want) in desired.virtualServers.sorted(by: { $0.key < $1.key }) {
            let owner = want.servicePort.description
            guard let have = kernel[key] else {
                items.append(DriftItem(kind: .missing, owner: owner, object: "ipvs virtual server", want: describe(want.server), have: nil))
                continue
            }
            if !want.server.sameConfiguration(as: have.server) {
                items.append(DriftItem(kind: .different, owner: owner, object: "ipvs virtual server", want: describe(want.server), have: describe(have.server)))
            }
            let haveRS = Dictionary(have.destinations.map { ($0.endpoint, $0) }, uniquingKeysWith: { a, _ in a })
            let wantRS = Set(want.destinations.map(\.endpoint))
            for rs in want.destinations {
                let object = "ipvs real server of \(key)"
                guard let h = haveRS[rs.endpoint] else {
                    items.append(DriftItem(kind: .missing, owner: owner, object: object, want: describe(rs), have: nil))
                    continue
                }
                if h.weight != rs.weight || h.forwarding != rs.forwarding {
                    items.append(DriftItem(kind: .different, owner: owner, object: object, want: describe(rs), have: describe(h)))
                }
            }
            for h in have.destinations where !wantRS.contains(h.endpoint) && h.weight != 0 {
                items.append(DriftItem(kind: .extra, owner: owner, object: "ipvs real server of \(key)", want: nil, have: describe(h)))
            }
        }
        for (key, have) in kernel.sorted(by: { $0.key < $1.key }) where desired.virtualServers[key] == nil {
            guard key.address.family == family, !excludeCIDRs.contains(where: { $0.contains(key.address) }) else { continue }
            items.append(DriftItem(kind: .extra, owner: "", object: "ipvs virtual server", want: nil, have: describe(have.server)))
        }

        // ipsets.
        let kernelSets = Dictionary(actual.sets.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for def in desired.sets {
            let want = desired.entries[def.name] ?? []
            guard let have = kernelSets[def.name] else {
                items.append(DriftItem(kind: .missing, owner: "", object: "ipset \(def.name)", want: "\(want.count) members", have: nil))
                continue
            }
            let haveEntries = Set(have.entries)
            for e in want.subtracting(haveEntries).sorted() {
                items.append(DriftItem(kind: .missing, owner: e.ip.flatMap { ownerOfAddress[$0] } ?? "", object: "ipset \(def.name) member", want: e.description, have: nil))
            }
            for e in haveEntries.subtracting(want).sorted() {
                items.append(DriftItem(kind: .extra, owner: e.ip.flatMap { ownerOfAddress[$0] } ?? "", object: "ipset \(def.name) member", want: nil, have: e.description))
            }
        }

        // kube-ipvs0.
        for ip in desired.boundAddresses.subtracting(actual.boundAddresses).sorted() {
            items.append(DriftItem(kind: .missing, owner: ownerOfAddress[ip] ?? "", object: "kube-ipvs0 address", want: ip.description, have: nil))
        }
        for ip in actual.boundAddresses.subtracting(desired.boundAddresses).sorted() {
            items.append(DriftItem(kind: .extra, owner: "", object: "kube-ipvs0 address", want: nil, have: ip.description))
        }

        // iptables: the chains IPVS mode writes, and its jumps.
        let wantRules = IPTablesDrift.desired(restoreText: desired.restoreText, jumps: ipvsJumpRules)
        let owned = Set(ipvsNATChains + ipvsFilterChains)
        items += IPTablesDrift.compare(desired: wantRules, actual: actual.rules, owns: { owned.contains($0) })
        return items.sorted()
    }

    private static func describe(_ vs: VirtualServer) -> String {
        "\(vs.key) scheduler \(vs.scheduler)" + (vs.timeout > 0 ? " persistent \(vs.timeout)s" : "")
    }

    private static func describe(_ rs: RealServer) -> String {
        "\(rs) weight \(rs.weight) \(rs.forwarding)"
    }
}

/// The IPVS drift check: compiles the state as the backend does (node addresses read from the
/// kernel), then reads IPVS, the ipsets, kube-ipvs0 and the nat and filter tables.
public struct IPVSDriftChecker: DriftChecking {
    public var mode: String { "ipvs" }
    let config: IPVSBackendConfig
    let ipvs: any IPVSClient
    let links: any LinkClient
    let ipsets: any IPSetClient
    let runner: any CommandRunner

    /// Creates a checker over the same clients the backend uses.
    public init(config: IPVSBackendConfig, ipvs: any IPVSClient, links: any LinkClient, ipsets: any IPSetClient, runner: any CommandRunner) {
        self.config = config
        self.ipvs = ipvs
        self.links = links
        self.ipsets = ipsets
        self.runner = runner
    }

    public func check(_ state: ProxyState) async throws -> DriftReport {
        let family = config.options.family
        let (desired, options, bound) = try await compile(state)
        var actual = try await readKernel(setNames: Set(desired.sets.map(\.name)))
        actual.boundAddresses = bound
        return DriftReport(mode: mode, family: family,
                           items: IPVSDrift.compare(desired: desired, actual: actual, family: family, excludeCIDRs: options.excludeCIDRs))
    }

    /// The compiled state of `state` with the node addresses read from the kernel, as a sync computes it.
    public func desired(_ state: ProxyState) async throws -> IPVSDesiredState {
        try await compile(state).desired
    }

    /// The backend's planner's desired state (node addresses: every address not on
    /// kube-ipvs0), and the addresses of the family bound to kube-ipvs0.
    private func compile(_ state: ProxyState) async throws -> (desired: IPVSDesiredState, options: IPVSOptions, bound: Set<IPAddress>) {
        let index = try await links.link(named: config.dummyDevice).map { UInt32(bitPattern: $0.index) }
        let addresses = try await links.addresses()
        let bound = Set(addresses.filter { $0.index == index && $0.address.family == config.options.family }.map(\.address))
        let elsewhere = addresses.filter { $0.index != index }.map(\.address)
        let (desired, options) = IPVSPlanner(options: config.options).desired(state, nodeAddresses: elsewhere)
        return (desired, options, bound)
    }

    /// Reads IPVS, the named sets, kube-ipvs0's addresses and the nat and filter tables.
    public func readKernel(setNames: Set<String>) async throws -> IPVSKernelState {
        let family = config.options.family
        let index = try await links.link(named: config.dummyDevice).map { UInt32(bitPattern: $0.index) }
        let bound = Set(try await links.addresses().filter { $0.index == index && $0.address.family == family }.map(\.address))
        var services: [(server: VirtualServer, destinations: [RealServer])] = []
        for vs in try await ipvs.services() {
            services.append((vs, try await ipvs.destinations(of: vs.key)))
        }
        let sets = try await ipsets.list(setNames)
        var rules = ParsedRuleSet()
        for t in IPTablesDrift.tables.compactMap(Table.init(rawValue:)) {
            rules = ParsedRuleSet.parse(try await IPTablesRestorer(tools: config.tools, runner: runner).save(t), into: rules)
        }
        return IPVSKernelState(services: services, sets: sets, boundAddresses: bound, rules: rules)
    }
}
