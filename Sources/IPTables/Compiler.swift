// Sluice: a per-node Kubernetes service proxy.
// The iptables compiler: a pure function from the per-node model to iptables-restore input,
// matching kube-proxy v1.31's syncProxyRules rule for rule.

import ChainHashing
import KernelKit
import SluiceCore

/// Settings the iptables compiler needs beyond the model.
public struct IPTablesOptions: Sendable, Hashable {
    /// Node-level settings.
    public var node: NodeConfig
    /// The family this proxier handles (iptables or ip6tables).
    public var family: IPFamily
    /// Append `--random-fully` to MASQUERADE (iptables >= 1.6.2).
    public var randomFully: Bool
    /// `net.netfilter.nf_conntrack_tcp_be_liberal` is set: leave out the INVALID drop rule.
    public var conntrackTCPLiberal: Bool
    /// Local addresses NodePorts are opened on when `nodePortAddresses` is not "all".
    public var localAddresses: [IPAddress]
    /// The nfacct objects that exist (`NFAcctCounterName`): their rules count packets with
    /// `-m nfacct`, as kube-proxy's do where nfacct is available. Empty: no nfacct matches.
    public var nfacctCounters: Set<String> = []

    /// Creates options.
    public init(node: NodeConfig, family: IPFamily = .ipv4, randomFully: Bool = true,
                conntrackTCPLiberal: Bool = false, localAddresses: [IPAddress] = []) {
        self.node = node
        self.family = family
        self.randomFully = randomFully
        self.conntrackTCPLiberal = conntrackTCPLiberal
        self.localAddresses = localAddresses
    }
}

/// kube-proxy's nfacct object names (pkg/proxy/metrics).
public enum NFAcctCounterName {
    /// Packets the INVALID-state rule of KUBE-FORWARD drops.
    public static let ctStateInvalidDropped = "ct_state_invalid_dropped_pkts"
    /// Packets accepted on NodePorts of 127.0.0.0/8.
    public static let localhostNodePortsAccepted = "localhost_nps_accepted_pkts"
    /// Both.
    public static let all: [String] = [ctStateInvalidDropped, localhostNodePortsAccepted]
}

/// kube-proxy's threshold above which per-endpoint comments are dropped.
public let largeClusterEndpointsThreshold = 1000

/// One table's part of a restore batch.
public struct TableBatch: Sendable, Hashable {
    /// `:CHAIN - [0:0]` lines.
    public var chains: [String] = []
    /// `-A ...` and `-X ...` lines.
    public var rules: [String] = []
}

/// The output of one compilation.
public struct CompiledRules: Sendable {
    /// The filter table batch.
    public var filter = TableBatch()
    /// The nat table batch.
    public var nat = TableBatch()
    /// Every per-service nat chain the current state uses (written or not).
    public var activeNATChains: Set<String> = []
    /// Rules that a full sync would write per table, including skipped service chains.
    public var totalRules: [Table: Int] = [:]
    /// Whether per-endpoint comments were dropped.
    public var largeClusterMode = false
    /// Service ports with a Local policy and no local endpoints, by traffic policy.
    public var noLocalEndpoints: [TrafficPolicyScope: Int] = [.internal: 0, .external: 0]
    /// Per-service chains the batch deletes.
    public var deletedChains: [String] = []

    /// The iptables-restore input: filter then nat, each closed by COMMIT. A table with
    /// nothing to write (possible only in a partial sync whose top-level chains were left
    /// out) is left out; with nothing at all to write the text is empty.
    public var restoreText: String {
        // Sized once: growing a payload of tens of MB by doubling held up to three times its
        // size at the last growth (the old buffer and a new one twice as large).
        var size = 0
        for batch in [filter, nat] where !(batch.chains.isEmpty && batch.rules.isEmpty) {
            size += 8 + 7
            for line in batch.chains { size += line.utf8.count + 1 }
            for line in batch.rules { size += line.utf8.count + 1 }
        }
        var out = ""
        out.reserveCapacity(size)
        for (name, batch) in [("filter", filter), ("nat", nat)] where !(batch.chains.isEmpty && batch.rules.isEmpty) {
            out += "*\(name)\n"
            for line in batch.chains { out += line; out += "\n" }
            for line in batch.rules { out += line; out += "\n" }
            out += "COMMIT\n"
        }
        return out
    }

    /// Lines written for `table` (rules only, as kube-proxy's `_last` metric counts).
    public func writtenRules(_ table: Table) -> Int {
        (table == .filter ? filter.rules : nat.rules).reduce(0) { $0 + ($1.hasPrefix("-A ") || $1.hasPrefix("-I ") ? 1 : 0) }
    }
}

/// Compiles a `ProxyState` into iptables-restore input.
public struct IPTablesCompiler: Sendable {
    /// The options compiled with.
    public let options: IPTablesOptions

    /// Creates a compiler.
    public init(options: IPTablesOptions) { self.options = options }

    private var mark: String { options.node.masqueradeMark }
    private var isIPv6: Bool { options.family == .ipv6 }

    /// Compiles `state`.
    /// - Parameters:
    ///   - state: the model snapshot.
    ///   - kind: full or partial.
    ///   - existingChains: per-service nat chains present in the kernel (or written before); those
    ///     not in the new state are flushed and deleted in the same batch.
    /// - Returns: the batch and its metadata.
    public func compile(_ state: ProxyState, kind: SyncKind = .full, existingChains: Set<String> = []) -> CompiledRules {
        var none: IPTablesCompileMemory?
        return compile(state, kind: kind, existingChains: existingChains, memoryIfAny: &none)
    }

    /// Compiles `state`, reusing and then updating `memory` (what the previous compile with this
    /// memory found about every service port). The text is the same as without the memory.
    ///
    /// A full compile (or any compile with an invalid memory) works through every service port
    /// and rebuilds the memory; it only saves the chain-name hashing. A partial compile with a
    /// valid memory works only through the service ports of `changed` Services: every other
    /// port's top-level rules, chains and rule counts are replayed from the memory, so its cost
    /// is the changed Services plus a string copy per service port. Stale chains are then
    /// the changed Services' previous chains that are no longer used, and `existingChains` is
    /// not consulted. The caller must only pass a partial `kind` whose `changed` set covers
    /// every Service that differs from the state the memory was built from, and must
    /// `invalidate()` the memory when the batch was not applied.
    public func compile(_ state: ProxyState, kind: SyncKind, existingChains: Set<String> = [],
                        memory: inout IPTablesCompileMemory) -> CompiledRules {
        var taken: IPTablesCompileMemory? = memory
        memory = IPTablesCompileMemory()  // leaves `taken` the only owner, so updating it copies nothing
        let out = compile(state, kind: kind, existingChains: existingChains, memoryIfAny: &taken)
        memory = taken ?? IPTablesCompileMemory()
        return out
    }

    // swiftlint:disable:next function_body_length cyclomatic_complexity
    private func compile(_ state: ProxyState, kind: SyncKind, existingChains: Set<String>,
                         memoryIfAny memory: inout IPTablesCompileMemory?) -> CompiledRules {
        var out = CompiledRules()
        var filterRules = LineBuffer()
        var natChains = LineBuffer()
        var natRules = LineBuffer()
        var filterChains = LineBuffer()

        for c in Chain.filterTopLevel { filterChains.write(":\(c) - [0:0]") }
        for c in Chain.natTopLevel { natChains.write(":\(c) - [0:0]") }

        natRules.write("-A \(Chain.postrouting) -m mark ! --mark \(mark)/\(mark) -j RETURN")
        natRules.write("-A \(Chain.postrouting) -j MARK --xor-mark \(mark)")
        natRules.write("-A \(Chain.postrouting) -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
            + (options.randomFully ? " --random-fully" : ""))
        natRules.write("-A \(Chain.markMasq) -j MARK --or-mark \(mark)")

        if !isIPv6 && options.node.localhostNodePorts {
            filterChains.write(":\(Chain.kubeletFirewall) - [0:0]")
            filterRules.write("-A \(Chain.kubeletFirewall) -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")
        }

        let totalEndpoints = state.totalEndpoints
        out.largeClusterMode = totalEndpoints > largeClusterEndpointsThreshold

        var changed: Set<NamespacedName>?
        if case .partial(let c) = kind { changed = c }
        // The fast path: replay unchanged service ports from the memory.
        let replay = changed != nil && memory?.valid == true
        var staleCandidates: [String] = []
        let ports: [(ServicePortName, ServicePortInfo)]
        if replay {
            ports = memory!.updateSortedNames(for: state, staleChains: &staleCandidates)
        } else {
            ports = state.sortedNames.compactMap { name in state.servicePorts[name].map { (name, $0) } }
        }
        var rebuilt: [ServicePortName: ServicePortMemo] = [:]
        if memory != nil && !replay { rebuilt.reserveCapacity(ports.count) }

        var emit = Emitter()
        for (name, svc) in ports {
            var isChanged = changed.map { $0.contains(name.service) } ?? true
            if replay && !isChanged {
                if let memo = memory!.entries[name] {
                    emit.replay(memo)
                    if memo.noLocalInternal { out.noLocalEndpoints[.internal, default: 0] += 1 }
                    if memo.noLocalExternal { out.noLocalEndpoints[.external, default: 0] += 1 }
                    continue
                }
                isChanged = true  // new to the memory though not reported changed: write its chains
            }
            emit.skipping = !isChanged
            var chainNames = memory?.entries[name]?.names ?? ChainNameMemo(name)
            let memo = writeServicePort(svc, state: state, largeCluster: out.largeClusterMode, names: &chainNames,
                                        emit: &emit, out: &out)
            if replay {
                if let old = memory!.entries[name] {
                    for c in old.chains where memory!.activeChains.remove(c) != nil { staleCandidates.append(c) }
                }
                memory!.activeChains.formUnion(memo.chains)
                memory!.entries[name] = memo
            } else {
                out.activeNATChains.formUnion(memo.chains)
                if memory != nil { rebuilt[name] = memo }
            }
        }
        filterRules.append(emit.filterRules)
        natChains.append(emit.natChains)
        natRules.append(emit.natRules)

        // Stale per-service chains: flush (chain line) and delete.
        let stale: [String]
        if replay {
            out.activeNATChains = memory!.activeChains
            stale = Set(staleCandidates).filter { !out.activeNATChains.contains($0) }.sorted()
        } else {
            stale = existingChains.subtracting(out.activeNATChains).sorted()
            if memory != nil {
                memory!.entries = rebuilt
                memory!.sortedNames = ports.map(\.0)
                memory!.activeChains = out.activeNATChains
                memory!.valid = true
            }
        }
        for chain in stale where Chain.isServiceChain(chain) {
            natChains.write(":\(chain) - [0:0]")
            natRules.write("-X \(chain)")
            out.deletedChains.append(chain)
        }

        // The NodePort dispatch: the last rule of KUBE-SERVICES.
        let lastComment = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\""
        switch options.node.nodePortAddresses.forFamily(options.family) {
        case .all:
            var dest = "-m addrtype --dst-type LOCAL"
            if isIPv6 {
                dest += " ! -d ::1/128"
            } else if !options.node.localhostNodePorts {
                dest += " ! -d 127.0.0.0/8"
            }
            natRules.write("-A \(Chain.services) \(lastComment) \(dest) -j \(Chain.nodePorts)")
        case .cidrs(let cidrs):
            let ips = options.localAddresses.filter { ip in ip.family == options.family && cidrs.contains { $0.contains(ip) } }
            for ip in ips {
                if ip.isLoopback && (isIPv6 || !options.node.localhostNodePorts) { continue }
                natRules.write("-A \(Chain.services) \(lastComment) -d \(ip) -j \(Chain.nodePorts)")
            }
        }

        if !options.conntrackTCPLiberal {
            let count = options.nfacctCounters.contains(NFAcctCounterName.ctStateInvalidDropped)
                ? " -m nfacct --nfacct-name \(NFAcctCounterName.ctStateInvalidDropped)" : ""
            filterRules.write("-A \(Chain.forward) -m conntrack --ctstate INVALID\(count) -j DROP")
        }
        filterRules.write("-A \(Chain.forward) -m comment --comment \"kubernetes forwarding rules\" -m mark --mark \(mark)/\(mark) -j ACCEPT")
        filterRules.write("-A \(Chain.forward) -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")

        out.filter = TableBatch(chains: filterChains.lines, rules: filterRules.lines)
        out.nat = TableBatch(chains: natChains.lines, rules: natRules.lines)
        out.totalRules[.filter] = filterRules.count
        out.totalRules[.nat] = natRules.count + emit.skippedRules.count - out.deletedChains.count
        return out
    }

    // swiftlint:disable:next function_body_length
    /// Writes one service port's lines and returns what the memory keeps about it.
    func writeServicePort(_ svc: ServicePortInfo, state: ProxyState, largeCluster: Bool, names: inout ChainNameMemo,
                                  emit: inout Emitter, out: inout CompiledRules) -> ServicePortMemo {
        emit.begin()
        let proto = svc.proto.lowercased
        let spn = svc.name.description
        let hash = names.service
        var usedSEPs: [EndpointKey: HashSuffix] = [:]
        func sepName(_ ep: EndpointInfo) -> String {
            let key = EndpointKey(ep)
            if let n = usedSEPs[key] { return "KUBE-SEP-" + n.text }
            let n = names.endpoints[key] ?? HashSuffix(ChainHash.endpoint(svc.name, key.text))
            usedSEPs[key] = n
            return "KUBE-SEP-" + n.text
        }
        defer { names.endpoints = usedSEPs }
        let clusterPolicyChain = "KUBE-SVC-" + hash
        let localPolicyChain = "KUBE-SVL-" + hash
        let externalTrafficChain = "KUBE-EXT-" + hash
        let fwChain = "KUBE-FW-" + hash

        let routing = PolicyRouting(svc, endpoints: state.endpoints[svc.name] ?? [], nodeName: options.node.nodeName,
                                    nodeLabels: state.nodeLabels)
        let cat = routing.endpoints
        let internalTrafficChain = routing.internalGoesLocal ? localPolicyChain : clusterPolicyChain
        let externalPolicyChain = routing.externalGoesLocal ? localPolicyChain : clusterPolicyChain
        let usesFWChain = routing.hasEndpoints && !svc.loadBalancerVIPs.isEmpty && !svc.loadBalancerSourceRanges.isEmpty
        let loadBalancerTrafficChain = usesFWChain ? fwChain : externalTrafficChain

        var internalFilterTarget = "", internalFilterComment = ""
        var externalFilterTarget = "", externalFilterComment = ""
        if !routing.hasEndpoints {
            internalFilterTarget = "REJECT"
            internalFilterComment = "\"\(spn) has no endpoints\""
            externalFilterTarget = "REJECT"
            externalFilterComment = internalFilterComment
        } else {
            if !routing.hasInternalEndpoints {
                internalFilterTarget = "DROP"
                internalFilterComment = "\"\(spn) has no local endpoints\""
                out.noLocalEndpoints[.internal, default: 0] += 1
                emit.noLocalInternal = true
            }
            if !routing.hasExternalEndpoints {
                externalFilterTarget = "DROP"
                externalFilterComment = "\"\(spn) has no local endpoints\""
                out.noLocalEndpoints[.external, default: 0] += 1
                emit.noLocalExternal = true
            }
        }

        let match = "-m \(proto) -p \(proto)"
        let port = svc.port

        // Cluster IP.
        if routing.hasInternalEndpoints {
            emit.top("-A \(Chain.services) -m comment --comment \"\(spn) cluster IP\" \(match) -d \(svc.clusterIP) --dport \(port) -j \(internalTrafficChain)")
        } else {
            emit.filter("-A \(Chain.services) -m comment --comment \(internalFilterComment) \(match) -d \(svc.clusterIP) --dport \(port) -j \(internalFilterTarget)")
        }
        // External IPs.
        for ip in svc.externalIPs {
            if routing.hasEndpoints {
                emit.top("-A \(Chain.services) -m comment --comment \"\(spn) external IP\" \(match) -d \(ip) --dport \(port) -j \(externalTrafficChain)")
            }
            if !routing.hasExternalEndpoints {
                emit.filter("-A \(Chain.externalServices) -m comment --comment \(externalFilterComment) \(match) -d \(ip) --dport \(port) -j \(externalFilterTarget)")
            }
        }
        // Load-balancer IPs.
        for ip in svc.loadBalancerVIPs {
            if routing.hasEndpoints {
                emit.top("-A \(Chain.services) -m comment --comment \"\(spn) loadbalancer IP\" \(match) -d \(ip) --dport \(port) -j \(loadBalancerTrafficChain)")
            }
            if usesFWChain {
                emit.filter("-A \(Chain.proxyFirewall) -m comment --comment \"\(spn) traffic not accepted by \(fwChain)\" \(match) -d \(ip) --dport \(port) -j DROP")
            }
        }
        if !routing.hasExternalEndpoints {
            for ip in svc.loadBalancerVIPs {
                emit.filter("-A \(Chain.externalServices) -m comment --comment \(externalFilterComment) \(match) -d \(ip) --dport \(port) -j \(externalFilterTarget)")
            }
        }
        // Node ports.
        if svc.nodePort != 0 {
            if routing.hasEndpoints {
                // Where nfacct is available, localhost NodePort packets are counted first.
                if options.family == .ipv4 && options.node.localhostNodePorts
                    && options.nfacctCounters.contains(NFAcctCounterName.localhostNodePortsAccepted)
                    && options.node.nodePortAddresses.containsLoopback(.ipv4) {
                    emit.top("-A \(Chain.nodePorts) -m comment --comment \(spn) \(match) -d 127.0.0.0/8 --dport \(svc.nodePort) -m nfacct --nfacct-name \(NFAcctCounterName.localhostNodePortsAccepted) -j \(externalTrafficChain)")
                }
                emit.top("-A \(Chain.nodePorts) -m comment --comment \(spn) \(match) --dport \(svc.nodePort) -j \(externalTrafficChain)")
            }
            if !routing.hasExternalEndpoints {
                emit.filter("-A \(Chain.externalServices) -m comment --comment \(externalFilterComment) -m addrtype --dst-type LOCAL \(match) --dport \(svc.nodePort) -j \(externalFilterTarget)")
            }
        }
        // Health-check node port.
        if svc.healthCheckNodePort != 0 {
            emit.filter("-A \(Chain.nodePorts) -m comment --comment \"\(spn) health check node port\" -m tcp -p tcp --dport \(svc.healthCheckNodePort) -j ACCEPT")
        }

        // Internal traffic masquerade.
        if routing.hasInternalEndpoints {
            let args = "-m comment --comment \"\(spn) cluster IP\" \(match) -d \(svc.clusterIP) --dport \(port)"
            if options.node.masqueradeAll {
                emit.rule("-A \(internalTrafficChain) \(args) -j \(Chain.markMasq)")
            } else if let notLocal = localDetectorArgs(negated: true) {
                emit.rule("-A \(internalTrafficChain) \(args) \(notLocal) -j \(Chain.markMasq)")
            }
        }

        // External traffic.
        if routing.usesExternalTrafficChain {
            emit.chain(":\(externalTrafficChain) - [0:0]")
            emit.uses(externalTrafficChain)
            if !svc.externalPolicyLocal {
                emit.rule("-A \(externalTrafficChain) -m comment --comment \"masquerade traffic for \(spn) external destinations\" -j \(Chain.markMasq)")
            } else {
                if let local = localDetectorArgs(negated: false) {
                    emit.rule("-A \(externalTrafficChain) -m comment --comment \"pod traffic for \(spn) external destinations\" \(local) -j \(clusterPolicyChain)")
                }
                emit.rule("-A \(externalTrafficChain) -m comment --comment \"masquerade LOCAL traffic for \(spn) external destinations\" -m addrtype --src-type LOCAL -j \(Chain.markMasq)")
                emit.rule("-A \(externalTrafficChain) -m comment --comment \"route LOCAL traffic for \(spn) external destinations\" -m addrtype --src-type LOCAL -j \(clusterPolicyChain)")
            }
            if routing.hasExternalEndpoints {
                emit.rule("-A \(externalTrafficChain) -j \(externalPolicyChain)")
            }
        }

        // Firewall chain for loadBalancerSourceRanges.
        if usesFWChain {
            emit.chain(":\(fwChain) - [0:0]")
            emit.uses(fwChain)
            let head = "-A \(fwChain) -m comment --comment \"\(spn) loadbalancer IP\""
            var allowFromNode = false
            let nodeIP = options.node.nodeIPs.first { $0.family == options.family }
            for cidr in svc.loadBalancerSourceRanges {
                emit.rule("\(head) -s \(cidr) -j \(externalTrafficChain)")
                if let nodeIP, cidr.contains(nodeIP) { allowFromNode = true }
            }
            if allowFromNode {
                for ip in svc.loadBalancerVIPs {
                    emit.rule("\(head) -s \(ip) -j \(externalTrafficChain)")
                }
            }
            emit.rule("-A \(fwChain) -m comment --comment \"other traffic to \(spn) will be dropped by KUBE-PROXY-FIREWALL\"")
        }

        if routing.usesClusterPolicyChain {
            emit.chain(":\(clusterPolicyChain) - [0:0]")
            emit.uses(clusterPolicyChain)
            writeServiceToEndpointRules(svc, chain: clusterPolicyChain, endpoints: cat.cluster, largeCluster: largeCluster,
                                        sepName: sepName, emit: &emit)
        }
        if routing.usesLocalPolicyChain {
            emit.chain(":\(localPolicyChain) - [0:0]")
            emit.uses(localPolicyChain)
            writeServiceToEndpointRules(svc, chain: localPolicyChain, endpoints: cat.local, largeCluster: largeCluster,
                                        sepName: sepName, emit: &emit)
        }

        for ep in cat.allReachable {
            let sep = sepName(ep)
            emit.chain(":\(sep) - [0:0]")
            emit.uses(sep)
            let head = largeCluster ? "-A \(sep)" : "-A \(sep) -m comment --comment \(spn)"
            emit.rule("\(head) -s \(ep.ip) -j \(Chain.markMasq)")
            let recent = svc.stickyTimeoutSeconds != nil ? " -m recent --name \(sep) --set" : ""
            emit.rule("\(head)\(recent) \(match) -j DNAT --to-destination \(ep.description)")
        }
        return emit.end(names: ChainNameMemo(service: hash, endpoints: usedSEPs))
    }

    private func writeServiceToEndpointRules(_ svc: ServicePortInfo, chain: String, endpoints: [EndpointInfo],
                                             largeCluster: Bool, sepName: (EndpointInfo) -> String, emit: inout Emitter) {
        let spn = svc.name.description
        func head(_ ep: EndpointInfo) -> String {
            largeCluster ? "-A \(chain)" : "-A \(chain) -m comment --comment \"\(spn) -> \(ep.description)\""
        }
        func sep(_ ep: EndpointInfo) -> String { sepName(ep) }
        if let timeout = svc.stickyTimeoutSeconds {
            for ep in endpoints {
                emit.rule("\(head(ep)) -m recent --name \(sep(ep)) --rcheck --seconds \(timeout) --reap -j \(sep(ep))")
            }
        }
        let n = endpoints.count
        for (i, ep) in endpoints.enumerated() {
            if i < n - 1 {
                emit.rule("\(head(ep)) -m statistic --mode random --probability \(probability(n - i)) -j \(sep(ep))")
            } else {
                emit.rule("\(head(ep)) -j \(sep(ep))")
            }
        }
    }

    /// The local-traffic detector's arguments (`-s <cidr>` / `! -s <cidr>`, or `-i <if>` /
    /// `! -i <if>` when local pods are told by interface), nil when no detector is configured.
    private func localDetectorArgs(negated: Bool) -> String? {
        if let iface = options.node.localInterface {
            return negated ? "! -i \(iface.iptablesName)" : "-i \(iface.iptablesName)"
        }
        guard let cidr = options.node.clusterCIDRs.first(where: { $0.family == options.family }) else { return nil }
        return negated ? "! -s \(cidr)" : "-s \(cidr)"
    }
}

/// kube-proxy's probability text: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
public func probability(_ n: Int) -> String {
    guard n > 0 else { return "<bad value>" }
    // Exact decimal rounding of 1/n to 10 places (round half to even matches Go on these values).
    let scale: Int64 = 10_000_000_000
    let q = scale / Int64(n)
    let r = scale % Int64(n)
    var v = q
    if 2 * r > Int64(n) || (2 * r == Int64(n) && q % 2 == 1) { v += 1 }
    let intPart = v / scale
    let frac = String(v % scale)
    return "\(intPart)." + String(repeating: "0", count: 10 - frac.count) + frac
}

/// A line buffer that can discard its content while still counting lines (kube-proxy
/// computes skipped service chains for the metrics without writing them).
struct LineBuffer {
    private(set) var lines: [String] = []
    private(set) var count = 0
    let discarding: Bool

    init(discarding: Bool = false) { self.discarding = discarding }

    mutating func write(_ line: @autoclosure () -> String) {
        count += 1
        if !discarding { lines.append(line()) }
    }

    /// Counts `n` lines without writing them (a discarding buffer's replayed lines).
    mutating func count(_ n: Int) { count += n }

    /// Appends lines written before.
    mutating func write(contentsOf other: [String]) {
        count += other.count
        if !discarding { lines += other }
    }

    mutating func append(_ other: LineBuffer) {
        count += other.count
        lines += other.lines
    }
}

/// Where one service port's lines go. Top-level chain rules (KUBE-SERVICES, KUBE-NODEPORTS and
/// every filter rule) are always written; per-service chains go to the discard buffers when
/// the Service is unchanged in a partial sync. Between `begin()` and `end(names:)` it also
/// collects what the compile memory keeps about the service port.
struct Emitter {
    var filterRules = LineBuffer()
    var natChains = LineBuffer()
    var natRules = LineBuffer()
    var skippedChains = LineBuffer(discarding: true)
    var skippedRules = LineBuffer(discarding: true)
    var skipping = false

    var noLocalInternal = false
    var noLocalExternal = false
    private var topNAT: [String] = []
    private var filterLines: [String] = []
    private var chains: [String] = []
    private var chainRules = 0

    mutating func begin() {
        noLocalInternal = false
        noLocalExternal = false
        topNAT = []
        filterLines = []
        chains = []
        chainRules = 0
    }

    mutating func end(names: ChainNameMemo) -> ServicePortMemo {
        ServicePortMemo(names: names, chains: chains, filterLines: filterLines, topNATLines: topNAT, chainRules: chainRules,
                        noLocalInternal: noLocalInternal, noLocalExternal: noLocalExternal)
    }

    /// Replays an unchanged service port: its top-level lines, and the count of its chain rules.
    mutating func replay(_ memo: ServicePortMemo) {
        filterRules.write(contentsOf: memo.filterLines)
        natRules.write(contentsOf: memo.topNATLines)
        skippedRules.count(memo.chainRules)
    }

    /// A rule of a top-level nat chain (KUBE-SERVICES, KUBE-NODEPORTS).
    mutating func top(_ line: String) {
        natRules.write(line)
        topNAT.append(line)
    }

    /// A filter rule (every filter chain is top-level).
    mutating func filter(_ line: String) {
        filterRules.write(line)
        filterLines.append(line)
    }

    /// Records a per-service nat chain the state uses.
    mutating func uses(_ chain: String) { chains.append(chain) }

    mutating func chain(_ line: @autoclosure () -> String) {
        if skipping { skippedChains.write(line()) } else { natChains.write(line()) }
    }

    mutating func rule(_ line: @autoclosure () -> String) {
        chainRules += 1
        if skipping { skippedRules.write(line()) } else { natRules.write(line()) }
    }
}
