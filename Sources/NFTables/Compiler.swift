// Sluice: a per-node Kubernetes service proxy.
// The nftables compiler: a pure function from the per-node model to kube-proxy v1.34/v1.35's
// nftables ruleset (pkg/proxy/nftables syncProxyRules / setupNFTables), one family at a time.

import SluiceCore

/// Settings the nftables compiler needs beyond the model.
public struct NFTablesOptions: Sendable, Hashable {
    /// Node-level settings. In nftables mode an unset `--nodeport-addresses` means the node's
    /// primary IPs (see ``defaultNodePortAddresses(nodeIPs:)``); `.all`, or a list with a /0 of
    /// this family or with no CIDR of this family, matches every local address.
    public var node: NodeConfig
    /// The family this table serves.
    public var family: IPFamily
    /// The node's local addresses; `nodeport-ips` holds those inside `nodePortAddresses`
    /// (loopback addresses never: kube-proxy's nftables mode has no localhost NodePorts).
    public var localAddresses: [IPAddress]
    /// ServiceCIDRs (any family; this family's are used): traffic to an address in them that
    /// is no ClusterIP is dropped by `cluster-ips-check`. Empty leaves that rule out.
    public var serviceCIDRs: [CIDR]

    /// Creates options.
    public init(node: NodeConfig, family: IPFamily = .ipv4, localAddresses: [IPAddress] = [], serviceCIDRs: [CIDR] = []) {
        self.node = node
        self.family = family
        self.localAddresses = localAddresses
        self.serviceCIDRs = serviceCIDRs
    }

    /// kube-proxy's nftables-mode default for an empty `--nodeport-addresses`: `primary`, the
    /// node IPs' own /32 and /128.
    public static func defaultNodePortAddresses(nodeIPs: [IPAddress]) -> NodePortAddresses {
        .cidrs(nodeIPs.map(CIDR.init(host:)))
    }

    /// The addresses that accept NodePorts; nil when every local address does (MatchAll).
    public var nodePortIPs: [IPAddress]? {
        switch node.nodePortAddresses.forFamily(family) {
        case .all:
            return nil
        case .cidrs(let cidrs):
            if cidrs.isEmpty || cidrs.contains(where: { $0.prefixLength == 0 }) { return nil }
            var out: [IPAddress] = []
            for ip in localAddresses where ip.family == family && !ip.isLoopback && cidrs.contains(where: { $0.contains(ip) }) {
                if !out.contains(ip) { out.append(ip) }
            }
            return out
        }
    }
}

/// What one compile produced.
public struct NFTCompileResult: Sendable {
    /// The desired ruleset.
    public var ruleset: NFTRuleset
    /// Service ports whose fragment differs from the previous ruleset's (added, removed or
    /// changed); every port when there was no usable previous ruleset.
    public var changedPorts: Set<ServicePortName>
    /// Set when the previous ruleset was reused (only changed Services were compiled): what
    /// the changed ports and their elements were before, for the partial transaction.
    public var delta: NFTRulesetDelta?

    /// True when the previous ruleset was reused.
    public var incremental: Bool { delta != nil }
}

/// What an incremental compile replaced: the previous fragments of the changed service ports
/// and the previous elements of the keys they touch. With the updated ruleset it is all a
/// partial transaction needs (``NFTRuleset/partialTransaction(_:)``), so the backend need not
/// keep the previous ruleset beside the new one.
public struct NFTRulesetDelta: Sendable {
    /// Previous fragments of the changed ports (nil: the port is new).
    public internal(set) var oldFragments: [ServicePortName: NFTServiceFragment?] = [:]
    /// Previous winning elements of the keys the changed ports touch (nil: no element).
    public internal(set) var oldElements: [NFTElementKey: NFTElement?] = [:]
    /// The changed ports.
    public var changedPorts: Set<ServicePortName> { Set(oldFragments.keys) }

    /// Creates an empty delta.
    public init() {}
}

/// Compiles a `ProxyState` into the desired nftables ruleset of one family.
public struct NFTablesCompiler: Sendable {
    /// The options compiled with.
    public let options: NFTablesOptions

    /// Creates a compiler.
    public init(options: NFTablesOptions) { self.options = options }

    private var family: NFTFamily { NFTFamily(options.family) }
    private var ipX: String { family.addressKeyword }
    private var mark: String { options.node.masqueradeMark }

    /// Compiles `state` from scratch.
    public func compile(_ state: ProxyState) -> NFTRuleset {
        compile(state, previous: nil, changed: nil).ruleset
    }

    /// Compiles `state`, reusing `previous` for the Services not in `changed` (see
    /// ``update(_:to:changed:)``); from scratch when `previous` or `changed` is nil or cannot
    /// be reused. Hand `previous` over (`consume`) without keeping another reference to it, or
    /// its storage is copied.
    public func compile(_ state: ProxyState, previous: consuming NFTRuleset?, changed: Set<NamespacedName>?) -> NFTCompileResult {
        var owned = consume previous
        var previousPorts: Dictionary<ServicePortName, NFTServiceFragment>.Keys?
        if let changed, var rs = owned {
            owned = nil  // `rs` is now the only reference: the update below copies nothing
            if let delta = update(&rs, to: state, changed: changed) {
                return NFTCompileResult(ruleset: rs, changedPorts: delta.changedPorts, delta: delta)
            }
            previousPorts = rs.services.keys
        } else if let rs = owned {
            previousPorts = rs.services.keys
        }
        var rs = NFTRuleset(family: family, fixed: fixedPart(serviceCIDRs: state.serviceCIDRs))
        rs.nodeLabels = state.nodeLabels
        rs.services.reserveCapacity(state.servicePorts.count)
        for name in state.sortedNames {
            rs.setFragment(name, fragment(state.servicePorts[name]!, state: state))
        }
        var changedPorts = Set(state.servicePorts.keys)
        if let previousPorts { changedPorts.formUnion(previousPorts) }
        return NFTCompileResult(ruleset: rs, changedPorts: changedPorts, delta: nil)
    }

    /// Updates `ruleset` in place to `state`, compiling only the service ports of the Services
    /// in `changed` (and the ports that appeared or disappeared with them); the cost follows
    /// the changed Services, not the table. The result equals a compile from scratch.
    ///
    /// `changed` must cover every Service whose Service or EndpointSlices differ from the
    /// state `ruleset` was compiled from (the union of `ProxyState.changedServices` since).
    /// - Returns: what was replaced, for ``NFTRuleset/partialTransaction(_:)``; nil (and
    ///   `ruleset` untouched) when the ruleset cannot be reused: another family, another fixed
    ///   part (node addresses, ServiceCIDRs, masquerade settings) or other node labels. Then
    ///   compile from scratch and send a full transaction.
    public func update(_ ruleset: inout NFTRuleset, to state: ProxyState, changed: Set<NamespacedName>) -> NFTRulesetDelta? {
        guard ruleset.family == family, ruleset.nodeLabels == state.nodeLabels, ruleset.fixed == fixedPart(serviceCIDRs: state.serviceCIDRs) else { return nil }
        var delta = NFTRulesetDelta()
        var candidates = Set<ServicePortName>()
        for svc in changed { candidates.formUnion(ruleset.portsByService[svc] ?? []) }
        if !changed.isEmpty {
            for n in state.servicePorts.keys where changed.contains(n.service) { candidates.insert(n) }
        }
        for name in candidates {
            let new = state.servicePorts[name].map { fragment($0, state: state) }
            let old = ruleset.services[name]
            if old == new { continue }
            delta.oldFragments[name] = .some(old)
            for e in old?.elements ?? [] where delta.oldElements[e.id] == nil {
                delta.oldElements[e.id] = .some(ruleset.claims[e.id]?.element)
            }
            for e in new?.elements ?? [] where delta.oldElements[e.id] == nil {
                delta.oldElements[e.id] = .some(ruleset.claims[e.id]?.element)
            }
            ruleset.setFragment(name, new)
        }
        return delta
    }

    // MARK: fixed part (setupNFTables)

    /// Names of kube-proxy's fixed chains, sets and maps.
    public enum Names {
        public static let filterPreroutingPreDNAT = "filter-prerouting-pre-dnat"
        public static let filterOutputPreDNAT = "filter-output-pre-dnat"
        public static let filterInput = "filter-input"
        public static let filterForward = "filter-forward"
        public static let filterOutput = "filter-output"
        public static let natPrerouting = "nat-prerouting"
        public static let natOutput = "nat-output"
        public static let natPostrouting = "nat-postrouting"
        public static let nodePortEndpointsCheck = "nodeport-endpoints-check"
        public static let serviceEndpointsCheck = "service-endpoints-check"
        public static let firewallCheck = "firewall-check"
        public static let services = "services"
        public static let masquerading = "masquerading"
        public static let clusterIPsCheck = "cluster-ips-check"
        public static let markMasq = "mark-for-masquerade"
        public static let rejectChain = "reject-chain"
        public static let clusterIPs = "cluster-ips"
        public static let nodePortIPs = "nodeport-ips"
        public static let serviceIPs = "service-ips"
        public static let serviceNodePorts = "service-nodeports"
        public static let noEndpointServices = "no-endpoint-services"
        public static let noEndpointNodePorts = "no-endpoint-nodeports"
        public static let firewallIPs = "firewall-ips"
    }

    /// kube-proxy v1.34's base chains, in order.
    public static let baseChains: [(String, NFTHook)] = [
        (Names.filterPreroutingPreDNAT, NFTHook(type: "filter", hook: "prerouting", priority: -110)),
        (Names.filterOutputPreDNAT, NFTHook(type: "filter", hook: "output", priority: -110)),
        (Names.filterInput, NFTHook(type: "filter", hook: "input", priority: 0)),
        (Names.filterForward, NFTHook(type: "filter", hook: "forward", priority: 0)),
        (Names.filterOutput, NFTHook(type: "filter", hook: "output", priority: 0)),
        (Names.natPrerouting, NFTHook(type: "nat", hook: "prerouting", priority: -100)),
        (Names.natOutput, NFTHook(type: "nat", hook: "output", priority: -100)),
        (Names.natPostrouting, NFTHook(type: "nat", hook: "postrouting", priority: 100)),
    ]

    /// kube-proxy v1.34's jumps from base chains: (destination, source, `ct state new` first).
    static let jumps: [(String, String, Bool)] = [
        (Names.nodePortEndpointsCheck, Names.filterInput, true),
        (Names.serviceEndpointsCheck, Names.filterInput, true),
        (Names.serviceEndpointsCheck, Names.filterForward, true),
        (Names.serviceEndpointsCheck, Names.filterOutput, true),
        (Names.firewallCheck, Names.filterPreroutingPreDNAT, true),
        (Names.firewallCheck, Names.filterOutputPreDNAT, true),
        (Names.services, Names.natOutput, false),
        (Names.services, Names.natPrerouting, false),
        (Names.masquerading, Names.natPostrouting, false),
        (Names.clusterIPsCheck, Names.filterForward, true),
        (Names.clusterIPsCheck, Names.filterOutput, true),
    ]

    /// The fixed part for these options and the ServiceCIDR objects' ranges (`serviceCIDRs`,
    /// any family, added to the options' own).
    public func fixedPart(serviceCIDRs: [CIDR] = []) -> NFTFixedPart {
        var chains: [NFTChain] = []
        var index: [String: Int] = [:]
        func ensure(_ name: String, hook: NFTHook? = nil, comment: String? = nil) {
            if index[name] != nil { return }
            index[name] = chains.count
            chains.append(NFTChain(name: name, hook: hook, comment: comment))
        }
        func rule(_ chain: String, _ r: NFTRule) {
            chains[index[chain]!].append(r, family: family)
        }
        for (name, hook) in Self.baseChains { ensure(name, hook: hook) }
        for (dst, src, ctNew) in Self.jumps {
            ensure(dst)
            rule(src, NFTRule(ctNew ? [.ctStateNew] : [], .verdict(.jump(dst))))
        }
        for c in [Names.services, Names.clusterIPsCheck, Names.masquerading, Names.markMasq] { ensure(c) }
        rule(Names.markMasq, NFTRule(.markSet(.or, mark)))
        rule(Names.masquerading, NFTRule([.markClear(mark)], .verdict(.return)))
        rule(Names.masquerading, NFTRule(.markSet(.xor, mark)))
        rule(Names.masquerading, NFTRule(.masqueradeFullyRandom))

        let addr = family.addressType
        var containers: [NFTContainer] = [
            NFTContainer(kind: .set, name: Names.clusterIPs, type: addr, comment: "Active ClusterIPs"),
        ]
        rule(Names.clusterIPsCheck, NFTRule([.addressInSet(.destination, set: Names.clusterIPs)], .reject,
                                            comment: "Reject traffic to invalid ports of ClusterIPs"))
        var cidrs: [CIDR] = []
        for c in options.serviceCIDRs + serviceCIDRs where c.family == options.family && !cidrs.contains(where: { $0.description == c.description }) {
            cidrs.append(c)
        }
        if !cidrs.isEmpty {
            rule(Names.clusterIPsCheck, NFTRule([.addressInList(.destination, cidrs.map { .cidr($0) })], .verdict(.drop),
                                                comment: "Drop traffic to unallocated ClusterIPs"))
        }
        containers.append(NFTContainer(kind: .set, name: Names.nodePortIPs, type: addr, comment: "IPs that accept NodePort traffic"))
        let npIPs = options.nodePortIPs
        let noLocalhost: NFTMatch = family == .ip ? .address(.destination, negated: true, .cidr(CIDR("127.0.0.0/8")!))
            : .address(.destination, negated: true, .ip(IPAddress("::1")!))

        containers.append(NFTContainer(kind: .map, name: Names.noEndpointServices, type: "\(addr) . inet_proto . inet_service : verdict",
                                       comment: "vmap to drop or reject packets to services with no endpoints"))
        containers.append(NFTContainer(kind: .map, name: Names.noEndpointNodePorts, type: "inet_proto . inet_service : verdict",
                                       comment: "vmap to drop or reject packets to service nodeports with no endpoints"))
        ensure(Names.rejectChain, comment: "helper for @no-endpoint-services / @no-endpoint-nodeports")
        rule(Names.rejectChain, NFTRule(.reject))
        rule(Names.serviceEndpointsCheck, NFTRule(.vmapLookup(Names.noEndpointServices, withAddress: true)))
        if npIPs == nil {
            rule(Names.nodePortEndpointsCheck, NFTRule([noLocalhost], .vmapLookup(Names.noEndpointNodePorts, withAddress: false)))
        } else {
            rule(Names.nodePortEndpointsCheck, NFTRule([.addressInSet(.destination, set: Names.nodePortIPs)],
                                                       .vmapLookup(Names.noEndpointNodePorts, withAddress: false)))
        }
        containers.append(NFTContainer(kind: .map, name: Names.firewallIPs, type: "\(addr) . inet_proto . inet_service : verdict",
                                       comment: "destinations that are subject to LoadBalancerSourceRanges"))
        ensure(Names.firewallCheck)
        rule(Names.firewallCheck, NFTRule(.vmapLookup(Names.firewallIPs, withAddress: true)))
        containers.append(NFTContainer(kind: .map, name: Names.serviceIPs, type: "\(addr) . inet_proto . inet_service : verdict",
                                       comment: "ClusterIP, ExternalIP and LoadBalancer IP traffic"))
        containers.append(NFTContainer(kind: .map, name: Names.serviceNodePorts, type: "inet_proto . inet_service : verdict",
                                       comment: "NodePort traffic"))
        rule(Names.services, NFTRule(.vmapLookup(Names.serviceIPs, withAddress: true)))
        if npIPs == nil {
            rule(Names.services, NFTRule([.fibDestinationLocal, noLocalhost], .vmapLookup(Names.serviceNodePorts, withAddress: false)))
        } else {
            rule(Names.services, NFTRule([.addressInSet(.destination, set: Names.nodePortIPs)],
                                         .vmapLookup(Names.serviceNodePorts, withAddress: false)))
        }
        return NFTFixedPart(chains: chains, containers: containers, nodePortIPs: npIPs?.map(\.description))
    }

    // MARK: per service port (syncProxyRules' loop body)

    /// The local-traffic detector's block (`ip saddr 10.0.0.0/8`, negated with `!=` where
    /// used); nil when no cluster CIDR of this family is configured.
    private func localDetector() -> CIDR? {
        options.node.clusterCIDRs.first(where: { $0.family == options.family })
    }

    // swiftlint:disable:next function_body_length cyclomatic_complexity
    /// One service port's chains, affinity sets and elements.
    public func fragment(_ svc: ServicePortInfo, state: ProxyState) -> NFTServiceFragment {
        let proto = svc.proto.lowercased
        let spn = svc.name.description
        let base = NFTChainNames.servicePortBase(svc.name)
        let clusterPolicyChain = "service-" + base
        let localPolicyChain = "local-" + base
        let externalTrafficChain = "external-" + base
        let fwChain = "firewall-" + base
        let markMasq = Names.markMasq

        let routing = PolicyRouting(svc, endpoints: state.endpoints[svc.name] ?? [], nodeName: options.node.nodeName,
                                    nodeLabels: state.nodeLabels)
        let cat = routing.endpoints
        let internalTrafficChain = routing.internalGoesLocal ? localPolicyChain : clusterPolicyChain
        let externalPolicyChain = routing.externalGoesLocal ? localPolicyChain : clusterPolicyChain
        let usesFWChain = !svc.loadBalancerVIPs.isEmpty && !svc.loadBalancerSourceRanges.isEmpty

        let portPath = "\(svc.name.service.namespace)/\(svc.name.service.name)/\(proto)/\(svc.name.port)"
        var out = NFTServiceFragment(family: family, proto: proto, portPath: portPath, affinityTimeout: svc.stickyTimeoutSeconds)
        var internalVerdict = "", externalVerdict = ""
        if !routing.hasEndpoints {
            internalVerdict = "goto \(Names.rejectChain)"
            externalVerdict = internalVerdict
        } else {
            if !routing.hasInternalEndpoints {
                internalVerdict = "drop"
                out.noLocalInternal = true
            }
            if !routing.hasExternalEndpoints {
                externalVerdict = "drop"
                out.noLocalExternal = true
            }
        }

        // Elements, in kube-proxy's order.
        let port = svc.port
        func ipKey(_ ip: IPAddress) -> String { "\(ip) . \(proto) . \(port)" }
        out.elements.append(NFTElement(Names.clusterIPs, key: svc.clusterIP.description))
        if routing.hasInternalEndpoints {
            out.elements.append(NFTElement(Names.serviceIPs, key: ipKey(svc.clusterIP), value: "goto \(internalTrafficChain)"))
        } else {
            out.elements.append(NFTElement(Names.noEndpointServices, key: ipKey(svc.clusterIP), comment: spn, value: internalVerdict))
        }
        for ip in svc.externalIPs {
            if routing.hasEndpoints {
                out.elements.append(NFTElement(Names.serviceIPs, key: ipKey(ip), value: "goto \(externalTrafficChain)"))
            }
            if !routing.hasExternalEndpoints {
                out.elements.append(NFTElement(Names.noEndpointServices, key: ipKey(ip), comment: spn, value: externalVerdict))
            }
        }
        for ip in svc.loadBalancerVIPs {
            if routing.hasEndpoints {
                out.elements.append(NFTElement(Names.serviceIPs, key: ipKey(ip), value: "goto \(externalTrafficChain)"))
            }
            if usesFWChain {
                out.elements.append(NFTElement(Names.firewallIPs, key: ipKey(ip), value: "goto \(fwChain)"))
            }
        }
        if !routing.hasExternalEndpoints {
            for ip in svc.loadBalancerVIPs {
                out.elements.append(NFTElement(Names.noEndpointServices, key: ipKey(ip), comment: spn, value: externalVerdict))
            }
        }
        if svc.nodePort != 0 {
            let key = "\(proto) . \(svc.nodePort)"
            if routing.hasEndpoints {
                out.elements.append(NFTElement(Names.serviceNodePorts, key: key, value: "goto \(externalTrafficChain)"))
            }
            if !routing.hasExternalEndpoints {
                out.elements.append(NFTElement(Names.noEndpointNodePorts, key: key, comment: spn, value: externalVerdict))
            }
        }

        // Endpoints (every one some traffic reaches), then the chains over them.
        var index: [String: Int32] = [:]
        for ep in cat.allReachable where index[ep.description] == nil {
            index[ep.description] = Int32(out.endpoints.count)
            let hash = NFTChainNames.endpointHash(portPath: portPath, ipText: ep.ip.description, port: ep.port)
            out.endpoints.append(NFTEndpointRef(ip: ep.ip, port: ep.port, hash: hash))
        }
        var masq: NFTRule?
        if routing.hasInternalEndpoints {
            if options.node.masqueradeAll {
                masq = NFTRule([.address(.destination, negated: false, .ip(svc.clusterIP))], .verdict(.jump(markMasq)))
            } else if let local = localDetector() {
                masq = NFTRule([.address(.destination, negated: false, .ip(svc.clusterIP)), .address(.source, negated: true, .cidr(local))],
                               .verdict(.jump(markMasq)))
            }
        }
        if routing.usesClusterPolicyChain {
            out.policyChains.append(NFTPolicyChain(name: clusterPolicyChain,
                                                   masquerade: internalTrafficChain == clusterPolicyChain ? masq : nil,
                                                   members: cat.cluster.compactMap { index[$0.description] }))
        }
        if routing.usesLocalPolicyChain {
            out.policyChains.append(NFTPolicyChain(name: localPolicyChain,
                                                   masquerade: internalTrafficChain == localPolicyChain ? masq : nil,
                                                   members: cat.local.compactMap { index[$0.description] }))
        }
        if routing.usesExternalTrafficChain {
            var rules: [NFTRule] = []
            if !svc.externalPolicyLocal {
                rules.append(NFTRule(.verdict(.jump(markMasq))))
            } else {
                if let local = localDetector() {
                    rules.append(NFTRule([.address(.source, negated: false, .cidr(local))], .verdict(.goto(clusterPolicyChain)),
                                         comment: "short-circuit pod traffic"))
                }
                rules.append(NFTRule([.fibSourceLocal], .verdict(.jump(markMasq)), comment: "masquerade local traffic"))
                rules.append(NFTRule([.fibSourceLocal], .verdict(.goto(clusterPolicyChain)), comment: "short-circuit local traffic"))
            }
            if routing.hasExternalEndpoints {
                rules.append(NFTRule(.verdict(.goto(externalPolicyChain))))
            }
            out.otherChains.append(NFTRuleChain(name: externalTrafficChain, rules: rules))
        }
        if usesFWChain {
            var sources = svc.loadBalancerSourceRanges.map { NFTAddressOperand.cidr($0) }
            let nodeIP = options.node.nodeIPs.first { $0.family == options.family }
            if let nodeIP, svc.loadBalancerSourceRanges.contains(where: { $0.contains(nodeIP) }) {
                sources += svc.loadBalancerVIPs.map { NFTAddressOperand.ip($0) }
            }
            out.otherChains.append(NFTRuleChain(name: fwChain, rules: [NFTRule([.addressNotInList(.source, sources)], .verdict(.drop))]))
        }
        return out
    }
}
