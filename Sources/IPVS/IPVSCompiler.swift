// Sluice: a per-node Kubernetes service proxy.
// The IPVS compiler: a pure function from the per-node model to what the kernel should hold
// in IPVS mode (virtual and real servers, ipset members, kube-ipvs0 addresses, and
// kube-proxy's constant-size iptables rules), following kube-proxy's syncProxyRules.

import IPTables
import KernelKit
import SluiceCore

/// Settings of the IPVS compiler beyond the model.
public struct IPVSOptions: Sendable, Hashable {
    /// Node-level settings (node name and IPs, cluster CIDRs, masquerade-all, mark bit).
    public var node: NodeConfig
    /// The family this proxier handles.
    public var family: IPFamily
    /// `--ipvs-scheduler` (default `rr`).
    public var scheduler: String
    /// `--ipvs-exclude-cidrs`: virtual servers in these ranges are never deleted.
    public var excludeCIDRs: [CIDR]
    /// Append `--random-fully` to MASQUERADE.
    public var randomFully: Bool
    /// Node addresses that NodePort virtual servers are created on.
    public var nodePortAddresses: [IPAddress]
    /// Addresses on interfaces other than kube-ipvs0: external and load-balancer IPs among
    /// them are not bound to kube-ipvs0 (kube-proxy #114815).
    public var localAddresses: Set<IPAddress>

    /// Creates options.
    public init(node: NodeConfig, family: IPFamily = .ipv4, scheduler: String = "rr", excludeCIDRs: [CIDR] = [],
                randomFully: Bool = true, nodePortAddresses: [IPAddress] = [], localAddresses: Set<IPAddress> = []) {
        self.node = node
        self.family = family
        self.scheduler = scheduler
        self.excludeCIDRs = excludeCIDRs
        self.randomFully = randomFully
        self.nodePortAddresses = nodePortAddresses
        self.localAddresses = localAddresses
    }

    /// The addresses NodePorts open on, picked from `candidates` as kube-proxy does: every
    /// non-loopback, non-link-local address of the family when `--nodeport-addresses` is
    /// unset, else those inside its CIDRs (still without loopback: IPVS cannot serve it).
    public static func nodePortAddresses(from candidates: [IPAddress], node: NodeConfig, family: IPFamily) -> [IPAddress] {
        let usable = candidates.filter { $0.family == family && !$0.isLoopback && !$0.isLinkLocalUnicast }
        switch node.nodePortAddresses.forFamily(family) {
        case .all: return Array(Set(usable)).sorted()
        case .cidrs(let cidrs): return Array(Set(usable.filter { ip in cidrs.contains { $0.contains(ip) } })).sorted()
        }
    }
}

/// One virtual server the kernel should hold, with its real servers.
public struct DesiredVirtualServer: Hashable, Sendable {
    /// The service.
    public var server: VirtualServer
    /// Its destinations (weight 1, masquerading), sorted.
    public var destinations: [RealServer]
    /// The service port it belongs to.
    public var servicePort: ServicePortName
}

/// What the kernel should hold in IPVS mode.
public struct IPVSDesiredState: Sendable {
    /// Virtual servers by key.
    public var virtualServers: [VirtualServerKey: DesiredVirtualServer] = [:]
    /// Every set Sluice manages, in kube-proxy's order.
    public var sets: [IPSetDefinition] = []
    /// Members by set name (every set has an entry, possibly empty).
    public var entries: [String: Set<IPSetEntry>] = [:]
    /// Addresses bound to kube-ipvs0.
    public var boundAddresses: Set<IPAddress> = []
    /// The filter table batch.
    public var filter = TableBatch(chainLines: [], ruleLines: [])
    /// The nat table batch.
    public var nat = TableBatch(chainLines: [], ruleLines: [])
    /// Services with a Local policy and no local endpoints, by traffic policy.
    public var noLocalEndpoints: [TrafficPolicyScope: Int] = [.internal: 0, .external: 0]

    // The bookkeeping that lets `IPVSCompiler.update` add and remove one service port's
    // share of the state: members and addresses more than one service port contributes are
    // counted (beyond the first), so removing one port's share keeps the others'.
    /// Extra contributions of set members, by set.
    var extraEntries: [String: [IPSetEntry: Int]] = [:]
    /// Extra contributions of bound addresses.
    var extraBound: [IPAddress: Int] = [:]
    /// Load-balancer addresses the node may not reach (source ranges without the node), by service port.
    var noNodeAccess: [ServicePortName: [IPVSNoNodeAccess]] = [:]
    /// Services counted in `noLocalEndpoints`.
    var noLocalInternal: Set<NamespacedName> = []
    var noLocalExternal: Set<NamespacedName> = []
    /// What each service port added, by Service: `IPVSCompiler.update` takes a changed
    /// Service's share out again from this record alone, without the model it was compiled
    /// from (so nobody keeps a second copy of that model between syncs).
    var footprints: [NamespacedName: [IPVSPortFootprint]] = [:]

    /// Adds one contribution of `entry` to `set`.
    mutating func insert(_ entry: IPSetEntry, into set: String, recording changes: inout IPVSDesiredChanges?) {
        changes?.note(entry, in: set, wasMember: entries[set]?.contains(entry) ?? false)
        if !entries[set, default: []].insert(entry).inserted { extraEntries[set, default: [:]][entry, default: 0] += 1 }
    }

    /// Removes one contribution of `entry` from `set`: the member goes with its last one.
    mutating func remove(_ entry: IPSetEntry, from set: String, recording changes: inout IPVSDesiredChanges?) {
        changes?.note(entry, in: set, wasMember: entries[set]?.contains(entry) ?? false)
        if let n = extraEntries[set]?[entry] {
            extraEntries[set]?[entry] = n > 1 ? n - 1 : nil
        } else {
            entries[set]?.remove(entry)
        }
    }

    /// Adds one contribution of a bound address (and its `KUBE-IPVS-IPS` member).
    mutating func bind(_ ip: IPAddress, ipvsIPs: String, recording changes: inout IPVSDesiredChanges?) {
        changes?.note(ip, wasBound: boundAddresses.contains(ip))
        if boundAddresses.insert(ip).inserted {
            insert(.ip(ip), into: ipvsIPs, recording: &changes)
        } else {
            extraBound[ip, default: 0] += 1
        }
    }

    /// Removes one contribution of a bound address.
    mutating func unbind(_ ip: IPAddress, ipvsIPs: String, recording changes: inout IPVSDesiredChanges?) {
        changes?.note(ip, wasBound: boundAddresses.contains(ip))
        if let n = extraBound[ip] {
            extraBound[ip] = n > 1 ? n - 1 : nil
        } else if boundAddresses.remove(ip) != nil {
            remove(.ip(ip), from: ipvsIPs, recording: &changes)
        }
    }

    /// The iptables-restore input: nat then filter, as kube-proxy's IPVS proxier writes it.
    public var restoreText: String {
        var out = "*nat\n"
        for l in nat.chains { out += l + "\n" }
        for l in nat.rules { out += l + "\n" }
        out += "COMMIT\n*filter\n"
        for l in filter.chains { out += l + "\n" }
        for l in filter.rules { out += l + "\n" }
        out += "COMMIT\n"
        return out
    }

    /// Rules in the batch, per table.
    public var ruleCounts: [String: Int] {
        ["nat": nat.rules.count, "filter": filter.rules.count]
    }

    /// Virtual servers sorted by key.
    public var sortedVirtualServers: [DesiredVirtualServer] {
        virtualServers.keys.sorted().compactMap { virtualServers[$0] }
    }

    /// The services and destinations in `ipvsadm -Sn` format, sorted by address, protocol, port.
    public var ipvsadmSave: String {
        var out = ""
        for d in sortedVirtualServers {
            out += ipvsadmServiceLine(d.server) + "\n"
            for rs in d.destinations { out += ipvsadmDestinationLine(d.server.key, rs) + "\n" }
        }
        return out
    }

    /// The sets and members in `ipset save` format (without the kernel-chosen `bucketsize`
    /// and `initval`), members sorted.
    public var ipsetSave: String {
        var out = ""
        for d in sets {
            out += "create \(d.name) \(d.type.rawValue) \(d.createOptions)\n"
            for e in (entries[d.name] ?? []).sorted() { out += "add \(d.name) \(e)\n" }
        }
        return out
    }

    /// The whole dry run: ipvsadm, ipset and iptables-restore sections.
    public var dryRunText: String {
        "# ipvsadm -Sn\n" + ipvsadmSave + "# ipset save\n" + ipsetSave + "# iptables-restore\n" + restoreText
    }
}

/// One service port's share of an `IPVSDesiredState`, as much as taking it out needs: the
/// virtual servers it created, the set members (by base set name) and the addresses it bound.
struct IPVSPortFootprint: Sendable {
    var name: ServicePortName
    var servers: [VirtualServerKey]
    var entries: [IPVSSetMember]
    var bound: [IPAddress]
}

/// One set member a service port contributes: the set's base name (a constant) and the entry.
struct IPVSSetMember: Sendable {
    var base: String
    var entry: IPSetEntry
}

/// A load-balancer address whose source ranges leave the node out.
struct IPVSNoNodeAccess: Hashable, Sendable {
    var ip: IPAddress
    var proto: TransportProtocol
    var port: Int
}

/// What `IPVSCompiler.update` may have changed, with the values before: the backend writes
/// the kernel from this and the updated state, without reading the kernel.
public struct IPVSDesiredChanges: Sendable {
    /// Virtual servers touched, with their desired value before (nil: there was none).
    public var virtualServers: [VirtualServerKey: DesiredVirtualServer?] = [:]
    /// Set members touched, by set, with whether each was a member before.
    public var entries: [String: [IPSetEntry: Bool]] = [:]
    /// Addresses touched, with whether each was bound before.
    public var addresses: [IPAddress: Bool] = [:]

    /// Creates an empty record.
    public init() {}

    mutating func note(_ entry: IPSetEntry, in set: String, wasMember: Bool) {
        if entries[set]?[entry] == nil { entries[set, default: [:]][entry] = wasMember }
    }

    mutating func note(_ ip: IPAddress, wasBound: Bool) {
        if addresses[ip] == nil { addresses[ip] = wasBound }
    }

    mutating func note(_ key: VirtualServerKey, was: DesiredVirtualServer?) {
        if virtualServers.index(forKey: key) == nil { virtualServers[key] = .some(was) }
    }
}

/// `-t 10.96.0.10:80` / `-u ...` / `--sctp-service ...`, as ipvsadm writes a service.
func ipvsadmServiceSpec(_ key: VirtualServerKey) -> String {
    let option: String
    switch key.proto {
    case .tcp: option = "-t"
    case .udp: option = "-u"
    case .sctp: option = "--sctp-service"
    }
    return "\(option) \(key.address.joined(port: Int(key.port)))"
}

/// One `ipvsadm -Sn` service line.
public func ipvsadmServiceLine(_ vs: VirtualServer) -> String {
    var line = "-A \(ipvsadmServiceSpec(vs.key)) -s \(vs.scheduler)"
    if vs.flags.contains(.persistent) {
        line += " -p \(vs.timeout)"
        if vs.key.address.family == .ipv4, vs.netmask != 0xFFFF_FFFF {
            line += " -M \(IPAddress.v4(vs.netmask))"
        } else if vs.key.address.family == .ipv6, vs.netmask != 128 {
            line += " -M \(vs.netmask)"
        }
    }
    var schedFlags: [String] = []
    let prefix = vs.scheduler == "mh" ? "mh" : "sh"
    if vs.flags.contains(.scheduler1) { schedFlags.append("\(prefix)-fallback") }
    if vs.flags.contains(.scheduler2) { schedFlags.append("\(prefix)-port") }
    if !schedFlags.isEmpty { line += " -b " + schedFlags.joined(separator: ",") }
    if vs.flags.contains(.onePacket) { line += " -o" }
    return line
}

/// One `ipvsadm -Sn` destination line.
public func ipvsadmDestinationLine(_ key: VirtualServerKey, _ rs: RealServer) -> String {
    let method: String
    switch rs.forwarding {
    case .masquerade: method = "-m"
    case .tunnel: method = "-i"
    case .directRoute, .localNode, .bypass: method = "-g"
    }
    return "-a \(ipvsadmServiceSpec(key)) -r \(rs.address.joined(port: Int(rs.port))) \(method) -w \(rs.weight)"
}

/// Nat chains of IPVS mode, in kube-proxy's declaration order.
public let ipvsNATChains = ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ"]
/// Filter chains of IPVS mode, in kube-proxy's declaration order.
public let ipvsFilterChains = ["KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL",
                               "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER"]

/// Chains IPVS mode shares with iptables mode (same names).
public let ipvsSharedChains: Set<String> = ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL"]

/// kube-proxy's IPVS-mode jump rules from the built-in chains (`iptablesJumpChain`).
public let ipvsJumpRules: [JumpRule] = [
    JumpRule(.nat, from: "OUTPUT", to: "KUBE-SERVICES", comment: "kubernetes service portals"),
    JumpRule(.nat, from: "PREROUTING", to: "KUBE-SERVICES", comment: "kubernetes service portals"),
    JumpRule(.nat, from: "POSTROUTING", to: "KUBE-POSTROUTING", comment: "kubernetes postrouting rules"),
    JumpRule(.filter, from: "FORWARD", to: "KUBE-FORWARD", comment: "kubernetes forwarding rules"),
    JumpRule(.filter, from: "INPUT", to: "KUBE-NODE-PORT", comment: "kubernetes health check rules"),
    JumpRule(.filter, from: "INPUT", to: "KUBE-PROXY-FIREWALL", comment: "kube-proxy firewall rules"),
    JumpRule(.filter, from: "FORWARD", to: "KUBE-PROXY-FIREWALL", comment: "kube-proxy firewall rules"),
    JumpRule(.filter, from: "INPUT", to: "KUBE-IPVS-FILTER", comment: "kubernetes ipvs access filter"),
    JumpRule(.filter, from: "OUTPUT", to: "KUBE-IPVS-OUT-FILTER", comment: "kubernetes ipvs access filter"),
]

/// Compiles a `ProxyState` into an `IPVSDesiredState`.
public struct IPVSCompiler: Sendable {
    /// The options compiled with.
    public let options: IPVSOptions

    /// Creates a compiler.
    public init(options: IPVSOptions) { self.options = options }

    private var family: IPFamily { options.family }

    private func set(_ base: String) -> String { IPSetDefinition(baseName: base, type: .hashIP, family: family, comment: "").name }

    /// One service port's share of the state.
    private struct Contribution {
        var servers: [DesiredVirtualServer] = []
        var entries: [IPVSSetMember] = []
        var bound: [IPAddress] = []
        var noNodeAccess: [IPVSNoNodeAccess] = []
        var noLocalInternal = false
        var noLocalExternal = false
    }

    /// Compiles `state`.
    public func compile(_ state: ProxyState) -> IPVSDesiredState {
        var out = IPVSDesiredState()
        out.sets = KubeIPSet.all(family)
        for d in out.sets { out.entries[d.name] = [] }
        var none: IPVSDesiredChanges? = nil
        for name in state.sortedNames {
            guard let c = contribution(of: name, in: state) else { continue }
            add(c, of: name, to: &out, recording: &none)
        }
        finish(&out)
        return out
    }

    /// Brings `out`, compiled with these options, to `new`, re-deriving only the Services in
    /// `changed`: what `out` held for them is taken out using the record `out` keeps of each
    /// service port's share, and what `new` gives is added. The cost is that of the changes,
    /// not of the number of Services.
    /// - Returns: what was touched, with the values before.
    public func update(_ out: inout IPVSDesiredState, to new: ProxyState, changed: Set<NamespacedName>) -> IPVSDesiredChanges {
        var changes: IPVSDesiredChanges? = IPVSDesiredChanges()
        let services = changed.sorted()
        for service in services {
            for f in out.footprints.removeValue(forKey: service) ?? [] {
                remove(f, from: &out, recording: &changes)
            }
        }
        for service in services {
            for name in new.portNames(of: service) {
                guard let c = contribution(of: name, in: new) else { continue }
                add(c, of: name, to: &out, recording: &changes)
            }
        }
        finish(&out)
        return changes ?? IPVSDesiredChanges()
    }

    private func add(_ c: Contribution, of name: ServicePortName, to out: inout IPVSDesiredState, recording changes: inout IPVSDesiredChanges?) {
        let ipvsIPs = set(KubeIPSet.ipvsIPs)
        for e in c.entries { out.insert(e.entry, into: set(e.base), recording: &changes) }
        for vs in c.servers {
            changes?.note(vs.server.key, was: out.virtualServers[vs.server.key])
            out.virtualServers[vs.server.key] = vs
        }
        for ip in c.bound { out.bind(ip, ipvsIPs: ipvsIPs, recording: &changes) }
        if !c.noNodeAccess.isEmpty { out.noNodeAccess[name] = c.noNodeAccess }
        if c.noLocalInternal { out.noLocalInternal.insert(name.service) }
        if c.noLocalExternal { out.noLocalExternal.insert(name.service) }
        out.footprints[name.service, default: []].append(
            IPVSPortFootprint(name: name, servers: c.servers.map(\.server.key), entries: c.entries, bound: c.bound))
    }

    private func remove(_ f: IPVSPortFootprint, from out: inout IPVSDesiredState, recording changes: inout IPVSDesiredChanges?) {
        let ipvsIPs = set(KubeIPSet.ipvsIPs)
        let name = f.name
        for e in f.entries { out.remove(e.entry, from: set(e.base), recording: &changes) }
        for key in f.servers where out.virtualServers[key]?.servicePort == name {
            changes?.note(key, was: out.virtualServers[key])
            out.virtualServers[key] = nil
        }
        for ip in f.bound { out.unbind(ip, ipvsIPs: ipvsIPs, recording: &changes) }
        out.noNodeAccess[name] = nil
        out.noLocalInternal.remove(name.service)
        out.noLocalExternal.remove(name.service)
    }

    /// The parts that depend on the whole state: the no-local-endpoints counts and the
    /// constant-size rule set.
    private func finish(_ out: inout IPVSDesiredState) {
        out.noLocalEndpoints = [.internal: out.noLocalInternal.count, .external: out.noLocalExternal.count]
        let noNodeAccess = out.noNodeAccess.keys.sorted().flatMap { out.noNodeAccess[$0] ?? [] }
        writeRules(&out, noNodeAccess: noNodeAccess.map { ($0.ip, $0.proto, $0.port) })
    }

    /// What one service port adds to the state (nil when it is not of this family).
    private func contribution(of name: ServicePortName, in state: ProxyState) -> Contribution? {
        guard let svc = state.servicePorts[name], svc.clusterIP.family == family else { return nil }
        var out = Contribution()
        let nodeIP = options.node.nodeIPs.first { $0.family == family }
        let nodePortIPs = options.nodePortAddresses.filter { $0.family == family }
        func insert(_ base: String, _ e: IPSetEntry) { out.entries.append(IPVSSetMember(base: base, entry: e)) }

        let proto = svc.proto
        let all = state.endpoints[name] ?? []
        let cat = categorizeEndpoints(all, info: svc, nodeName: options.node.nodeName, nodeLabels: state.nodeLabels)

        // Hairpin: local endpoints masquerade traffic they send to themselves.
        for ep in all where ep.isLocal && ep.ip.family == family {
            insert(KubeIPSet.loopBack, .ipPortIP(ep.ip, proto, ep.port, ep.ip))
        }

        func destinations(local: Bool) -> [RealServer] {
            // Local policy: the local endpoints; with none, the cluster set, as kube-proxy
            // does (#97081) so that pods on this node still reach the service.
            let eps = local && !cat.local.isEmpty ? cat.local : cat.cluster
            var seen = Set<RealServerEndpoint>()
            var rs: [RealServer] = []
            for ep in eps where ep.ip.family == family {
                let r = RealServer(address: ep.ip, port: UInt16(clamping: ep.port), weight: 1)
                if seen.insert(r.endpoint).inserted { rs.append(r) }
            }
            return rs.sorted()
        }

        func addVS(_ address: IPAddress, _ port: Int, local: Bool, bind: Bool) {
            var flags: IPVSServiceFlags = []
            var timeout: UInt32 = 0
            if let sticky = svc.stickyTimeoutSeconds {
                flags.insert(.persistent)
                timeout = UInt32(clamping: sticky)
            }
            if options.scheduler == "mh" { flags.insert(.scheduler2) }
            let key = VirtualServerKey(address: address, proto: proto, port: UInt16(clamping: port))
            let vs = VirtualServer(key: key, scheduler: options.scheduler, flags: flags, timeout: timeout)
            out.servers.append(DesiredVirtualServer(server: vs, destinations: destinations(local: local), servicePort: name))
            if bind { out.bound.append(address) }
        }

        // Cluster IP.
        insert(KubeIPSet.clusterIP, .ipPort(svc.clusterIP, proto, svc.port))
        addVS(svc.clusterIP, svc.port, local: svc.internalPolicyLocal, bind: true)
        if svc.internalPolicyLocal && cat.local.isEmpty && cat.hasAnyEndpoints {
            out.noLocalInternal = true
        }
        if svc.externallyAccessible && svc.externalPolicyLocal && cat.local.isEmpty && cat.hasAnyEndpoints {
            out.noLocalExternal = true
        }

        // External IPs.
        for ip in svc.externalIPs where ip.family == family {
            insert(svc.externalPolicyLocal ? KubeIPSet.externalIPLocal : KubeIPSet.externalIP, .ipPort(ip, proto, svc.port))
            addVS(ip, svc.port, local: svc.externalPolicyLocal, bind: !options.localAddresses.contains(ip))
        }

        // Load-balancer IPs.
        for ip in svc.loadBalancerVIPs where ip.family == family {
            let entry = IPSetEntry.ipPort(ip, proto, svc.port)
            insert(KubeIPSet.loadBalancer, entry)
            if svc.externalPolicyLocal { insert(KubeIPSet.loadBalancerLocal, entry) }
            if !svc.loadBalancerSourceRanges.isEmpty {
                insert(KubeIPSet.loadBalancerFW, entry)
                var allowFromNode = false
                for cidr in svc.loadBalancerSourceRanges where cidr.family == family {
                    insert(KubeIPSet.loadBalancerSourceCIDR, .ipPortNet(ip, proto, svc.port, cidr))
                    if let nodeIP, cidr.contains(nodeIP) { allowFromNode = true }
                }
                if allowFromNode {
                    insert(KubeIPSet.loadBalancerSourceIP, .ipPortIP(ip, proto, svc.port, ip))
                } else {
                    out.noNodeAccess.append(IPVSNoNodeAccess(ip: ip, proto: proto, port: svc.port))
                }
            }
            addVS(ip, svc.port, local: svc.externalPolicyLocal, bind: !options.localAddresses.contains(ip))
        }

        // Node ports.
        if svc.nodePort != 0 && !nodePortIPs.isEmpty {
            let entries: [IPSetEntry]
            let (setName, localSetName): (String, String)
            switch proto {
            case .tcp:
                (setName, localSetName) = (KubeIPSet.nodePortTCP, KubeIPSet.nodePortLocalTCP)
                entries = [.port(svc.nodePort)]
            case .udp:
                (setName, localSetName) = (KubeIPSet.nodePortUDP, KubeIPSet.nodePortLocalUDP)
                entries = [.port(svc.nodePort)]
            case .sctp:
                (setName, localSetName) = (KubeIPSet.nodePortSCTP, KubeIPSet.nodePortLocalSCTP)
                entries = nodePortIPs.map { .ipPort($0, .sctp, svc.nodePort) }
            }
            for e in entries {
                insert(setName, e)
                if svc.externalPolicyLocal { insert(localSetName, e) }
            }
            for ip in nodePortIPs {
                addVS(ip, svc.nodePort, local: svc.externalPolicyLocal, bind: false)
            }
        }

        if svc.healthCheckNodePort != 0 {
            insert(KubeIPSet.healthCheckNodePort, .port(svc.healthCheckNodePort))
        }
        return out
    }

    /// kube-proxy's `writeIptablesRules`: a fixed number of rules whatever the number of services.
    private func writeRules(_ out: inout IPVSDesiredState, noNodeAccess: [(IPAddress, TransportProtocol, Int)]) {
        var nat: [String] = []
        var filter: [String] = []
        let mark = options.node.masqueradeMark
        func def(_ base: String) -> IPSetDefinition { KubeIPSet.definition(base, family) }
        func nonEmpty(_ base: String) -> Bool { !(out.entries[def(base).name]?.isEmpty ?? true) }
        func comment(_ base: String) -> String { "-m comment --comment \"\(def(base).comment)\"" }
        func match(_ base: String, _ type: String) -> String { "-m set --match-set \(def(base).name) \(type)" }

        nat.append("-A KUBE-SERVICES -s \(family == .ipv4 ? "127.0.0.0/8" : "::1/128") -j RETURN")

        // kube-proxy's ipsetWithIptablesChain, in order; the Local sets come before their
        // masquerading counterparts.
        let table: [(set: String, isNAT: Bool, from: String, to: String, match: String, proto: String)] = [
            (KubeIPSet.loopBack, true, "KUBE-POSTROUTING", "MASQUERADE", "dst,dst,src", ""),
            (KubeIPSet.loadBalancer, true, "KUBE-SERVICES", "KUBE-LOAD-BALANCER", "dst,dst", ""),
            (KubeIPSet.loadBalancerLocal, true, "KUBE-LOAD-BALANCER", "RETURN", "dst,dst", ""),
            (KubeIPSet.nodePortLocalTCP, true, "KUBE-NODE-PORT", "RETURN", "dst", "tcp"),
            (KubeIPSet.nodePortTCP, true, "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "tcp"),
            (KubeIPSet.nodePortLocalUDP, true, "KUBE-NODE-PORT", "RETURN", "dst", "udp"),
            (KubeIPSet.nodePortUDP, true, "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst", "udp"),
            (KubeIPSet.nodePortLocalSCTP, true, "KUBE-NODE-PORT", "RETURN", "dst,dst", "sctp"),
            (KubeIPSet.nodePortSCTP, true, "KUBE-NODE-PORT", "KUBE-MARK-MASQ", "dst,dst", "sctp"),
            (KubeIPSet.loadBalancerFW, false, "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL", "dst,dst", ""),
            (KubeIPSet.loadBalancerSourceCIDR, false, "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
            (KubeIPSet.loadBalancerSourceIP, false, "KUBE-SOURCE-RANGES-FIREWALL", "RETURN", "dst,dst,src", ""),
        ]
        for row in table where nonEmpty(row.set) {
            let p = row.proto.isEmpty ? "" : " -p \(row.proto)"
            let rule = "-A \(row.from)\(p) \(comment(row.set)) \(match(row.set, row.match)) -j \(row.to)"
            if row.isNAT { nat.append(rule) } else { filter.append(rule) }
        }

        if nonEmpty(KubeIPSet.clusterIP) {
            let head = "-A KUBE-SERVICES \(comment(KubeIPSet.clusterIP)) -m set --match-set \(def(KubeIPSet.clusterIP).name)"
            if options.node.masqueradeAll {
                nat.append("\(head) dst,dst -j KUBE-MARK-MASQ")
            } else if let iface = options.node.localInterface {
                nat.append("\(head) dst,dst ! -i \(iface.iptablesName) -j KUBE-MARK-MASQ")
            } else if let cidr = options.node.clusterCIDRs.first(where: { $0.family == family }) {
                nat.append("\(head) dst,dst ! -s \(cidr) -j KUBE-MARK-MASQ")
            } else {
                nat.append("\(head) src,dst -j KUBE-MARK-MASQ")
            }
        }

        func externalIPRules(_ head: String) {
            nat.append("\(head) -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
            nat.append("\(head) -m addrtype --dst-type LOCAL -j ACCEPT")
        }
        if nonEmpty(KubeIPSet.externalIP) {
            let head = "-A KUBE-SERVICES \(comment(KubeIPSet.externalIP)) \(match(KubeIPSet.externalIP, "dst,dst"))"
            nat.append("\(head) -j KUBE-MARK-MASQ")
            externalIPRules(head)
        }
        if nonEmpty(KubeIPSet.externalIPLocal) {
            externalIPRules("-A KUBE-SERVICES \(comment(KubeIPSet.externalIPLocal)) \(match(KubeIPSet.externalIPLocal, "dst,dst"))")
        }

        nat.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
        nat.append("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ")
        filter.append("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
        for (ip, proto, port) in noNodeAccess {
            filter.append("-A KUBE-IPVS-OUT-FILTER -s \(ip) -m ipvs --vaddr \(ip) --vproto \(proto.lowercased) --vport \(port) -j DROP")
        }
        // Accept IPVS traffic at the end of KUBE-SERVICES (#62718).
        for base in [KubeIPSet.clusterIP, KubeIPSet.loadBalancer] where nonEmpty(base) {
            nat.append("-A KUBE-SERVICES \(match(base, "dst,dst")) -j ACCEPT")
        }
        filter.append("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark \(mark)/\(mark) -j ACCEPT")
        filter.append("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
        filter.append("-A KUBE-NODE-PORT \(comment(KubeIPSet.healthCheckNodePort)) \(match(KubeIPSet.healthCheckNodePort, "dst")) -j ACCEPT")
        for base in [KubeIPSet.loadBalancer, KubeIPSet.clusterIP, KubeIPSet.externalIP, KubeIPSet.externalIPLocal] {
            filter.append("-A KUBE-IPVS-FILTER \(match(base, "dst,dst")) -j RETURN")
        }
        filter.append("-A KUBE-IPVS-FILTER \(match(KubeIPSet.healthCheckNodePort, "dst")) -j RETURN")
        filter.append("-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW \(match(KubeIPSet.ipvsIPs, "dst")) -j REJECT")

        nat.append("-A KUBE-POSTROUTING -m mark ! --mark \(mark)/\(mark) -j RETURN")
        nat.append("-A KUBE-POSTROUTING -j MARK --xor-mark \(mark)")
        nat.append("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
            + (options.randomFully ? " --random-fully" : ""))
        nat.append("-A KUBE-MARK-MASQ -j MARK --or-mark \(mark)")

        out.nat = TableBatch(chainLines: ipvsNATChains.map { ":\($0) - [0:0]" }, ruleLines: nat)
        out.filter = TableBatch(chainLines: ipvsFilterChains.map { ":\($0) - [0:0]" }, ruleLines: filter)
    }
}
