// Sluice: a per-node Kubernetes service proxy.
// Folds object events into the per-node model. Events are cheap (they record what changed);
// the derived per-port model is rebuilt only for changed Services, once per snapshot.

/// Labels kube-proxy's informers select on.
public enum ServiceLabels {
    /// Services carrying this label belong to another proxy, unless it names this one.
    public static let serviceProxyName = "service.kubernetes.io/service-proxy-name"
    /// Services carrying this label are headless.
    public static let headless = "service.kubernetes.io/headless"
    /// EndpointSlice label naming its Service.
    public static let serviceName = "kubernetes.io/service-name"
    /// Service annotations requesting topology-aware routing.
    public static let topologyMode = "service.kubernetes.io/topology-mode"
    public static let topologyAwareHints = "service.kubernetes.io/topology-aware-hints"
}

/// What one `apply` did with an event.
public enum ApplyOutcome: Sendable, Hashable {
    /// The event changed the model.
    case applied
    /// The event carried nothing new (same object as before) or was out of scope.
    case ignored
    /// The object was invalid; the previous valid version (if any) stays in effect.
    case rejected(ObjectRejection)
}

/// The per-node change tracker: kube-proxy's ServiceChangeTracker and EndpointsChangeTracker in one.
///
/// It keeps the last valid version of every object, and records which Services changed so a
/// backend can rewrite just those (partial sync). It is a value type: the owner (an actor)
/// confines it.
public struct ChangeTracker: Sendable {
    /// This node's name: endpoints with this `nodeName` are local.
    public let nodeName: String
    /// This proxy's name for the `service-proxy-name` label, nil to skip every labelled Service.
    public let serviceProxyName: String?

    private var services: [NamespacedName: Service] = [:]
    private var slices: [NamespacedName: EndpointSlice] = [:]
    private var slicesByService: [NamespacedName: Set<NamespacedName>] = [:]
    private var pending: [IPFamily: Set<NamespacedName>] = [:]
    private var cache: [IPFamily: FamilyCache] = [:]
    /// `last-change-trigger-time` values of EndpointSlice changes not yet taken, by family and
    /// Service (seconds since the Unix epoch): the start of network programming latency.
    private var triggerTimes: [IPFamily: [NamespacedName: [Double]]] = [:]
    /// At most this many trigger times are kept per Service between two syncs.
    public static let maximumTriggerTimesPerService = 64
    /// The node object, when a source has delivered it.
    public private(set) var node: Node?
    /// Whether the source has delivered its initial state.
    public private(set) var synced = false
    /// Set when the node's labels change (topology): the next sync must be full.
    public private(set) var nodeLabelsChanged = false
    /// The valid ServiceCIDR objects' ranges, by object name.
    private var serviceCIDRObjects: [String: [CIDR]] = [:]
    /// The ranges of every ServiceCIDR object, sorted and without duplicates (two objects may
    /// name the same range; deleting one keeps it while the other exists).
    public private(set) var serviceCIDRs: [CIDR] = []

    /// The derived model of one family, kept flat (as `ProxyState` holds it) and updated in
    /// place for changed Services, so a snapshot costs the changes, not the number of Services.
    private struct FamilyCache: Sendable {
        var ports: [ServicePortName: ServicePortInfo] = [:]
        var endpoints: [ServicePortName: [EndpointInfo]] = [:]
        var portNames: [NamespacedName: [ServicePortName]] = [:]
    }

    /// Creates an empty tracker.
    public init(nodeName: String, serviceProxyName: String? = nil) {
        self.nodeName = nodeName
        self.serviceProxyName = serviceProxyName
    }

    /// Number of Services and EndpointSlices held.
    public var counts: (services: Int, slices: Int) { (services.count, slices.count) }

    /// Services changed since the last snapshot of `family`.
    public func pendingChanges(_ family: IPFamily) -> Int { pending[family]?.count ?? 0 }

    /// Folds one event into the model.
    @discardableResult
    public mutating func apply(_ event: ObjectEvent) -> ApplyOutcome {
        switch event {
        case .serviceUpserted(let svc):
            do { try Validation.validate(svc) } catch { return .rejected(error) }
            if services[svc.key] == svc { return .ignored }
            services[svc.key] = svc
            markChanged(svc.key)
        case .serviceDeleted(let key):
            guard services.removeValue(forKey: key) != nil else { return .ignored }
            markChanged(key)
        case .sliceUpserted(let slice):
            do { try Validation.validate(slice) } catch { return .rejected(error) }
            if slices[slice.key] == slice { return .ignored }
            if let old = slices[slice.key], old.serviceKey != slice.serviceKey {
                slicesByService[old.serviceKey]?.remove(slice.key)
                markChanged(old.serviceKey)
            }
            slices[slice.key] = slice
            slicesByService[slice.serviceKey, default: []].insert(slice.key)
            markChanged(slice.serviceKey)
            noteTriggerTime(slice)
        case .sliceDeleted(let key):
            guard let old = slices.removeValue(forKey: key) else { return .ignored }
            slicesByService[old.serviceKey]?.remove(key)
            // A deletion's trigger time is that of the slice's last update, not of this change
            // (kube-proxy drops the Service's pending times too).
            if let family = IPFamily(rawValue: old.addressType) { triggerTimes[family]?[old.serviceKey] = nil }
            if slicesByService[old.serviceKey]?.isEmpty == true { slicesByService[old.serviceKey] = nil }
            markChanged(old.serviceKey)
        case .nodeUpserted(let n):
            guard n.name == nodeName else { return .ignored }
            guard Validation.isNodeName(n.name) else {
                return .rejected(ObjectRejection(kind: "Node", key: n.name, reason: "metadata.name is not a valid node name"))
            }
            if node == n { return .ignored }
            if node?.labels != n.labels { nodeLabelsChanged = true }
            node = n
        case .nodeDeleted(let name):
            guard name == nodeName, node != nil else { return .ignored }
            node = nil
            nodeLabelsChanged = true
        case .serviceCIDRUpserted(let sc):
            do { try Validation.validate(sc) } catch { return .rejected(error) }
            let ranges = sc.cidrs.compactMap(CIDR.init)
            if serviceCIDRObjects[sc.name] == ranges { return .ignored }
            serviceCIDRObjects[sc.name] = ranges
            return updateServiceCIDRs()
        case .serviceCIDRDeleted(let name):
            guard serviceCIDRObjects.removeValue(forKey: name) != nil else { return .ignored }
            return updateServiceCIDRs()
        case .synced:
            if synced { return .ignored }
            synced = true
        }
        return .applied
    }

    /// Recomputes the union of the ServiceCIDR ranges; `.applied` when it changed.
    private mutating func updateServiceCIDRs() -> ApplyOutcome {
        let union = Set(serviceCIDRObjects.values.joined()).sorted {
            ($0.address, $0.prefixLength) < ($1.address, $1.prefixLength)
        }
        if union == serviceCIDRs { return .ignored }
        serviceCIDRs = union
        return .applied
    }

    private mutating func markChanged(_ key: NamespacedName) {
        for f in IPFamily.allCases { pending[f, default: []].insert(key) }
    }

    /// Remembers the slice's `last-change-trigger-time`, for families a runner snapshots (so a
    /// family nobody syncs accumulates nothing). Unparseable values are ignored, as kube-proxy does.
    private mutating func noteTriggerTime(_ slice: EndpointSlice) {
        guard let family = IPFamily(rawValue: slice.addressType), cache[family] != nil,
              let text = slice.annotations[lastChangeTriggerTimeAnnotation], let t = RFC3339.parse(text)
        else { return }
        var times = triggerTimes[family, default: [:]][slice.serviceKey, default: []]
        guard times.count < ChangeTracker.maximumTriggerTimesPerService else { return }
        times.append(t)
        triggerTimes[family, default: [:]][slice.serviceKey] = times
    }

    /// Returns and forgets the trigger times of the EndpointSlice changes of `family` recorded
    /// since the previous call, by Service, in seconds since the Unix epoch. Take them together
    /// with `snapshot(_:)`; report them once the snapshot is in the kernel.
    public mutating func takeTriggerTimes(_ family: IPFamily) -> [NamespacedName: [Double]] {
        defer { triggerTimes[family] = nil }
        return triggerTimes[family] ?? [:]
    }

    /// Builds the snapshot for one family, re-deriving only changed Services, and clears the
    /// family's pending set.
    public mutating func snapshot(_ family: IPFamily) -> ProxyState {
        // Taken out of the dictionary so the updates below mutate it in place (no copy unless
        // a previous snapshot still shares its storage).
        var c = cache.removeValue(forKey: family) ?? FamilyCache()
        let changed = pending[family] ?? []
        for key in changed {
            for old in c.portNames.removeValue(forKey: key) ?? [] {
                c.ports[old] = nil
                c.endpoints[old] = nil
            }
            if let svc = services[key], let ports = ChangeTracker.servicePorts(svc, family: family, proxyName: serviceProxyName) {
                let eps = endpointMap(for: key, ports: ports, family: family)
                for (name, info) in ports {
                    c.ports[name] = info
                    if let e = eps[name] { c.endpoints[name] = e }
                }
                c.portNames[key] = ports.keys.sorted()
            }
        }
        cache[family] = c
        pending[family] = []
        return ProxyState(family: family, servicePorts: c.ports, endpoints: c.endpoints, changedServices: changed,
                          nodeLabels: node?.labels ?? [:], portNamesByService: c.portNames,
                          serviceCIDRs: serviceCIDRs)
    }

    /// Clears the node-label flag once a full sync has consumed it.
    public mutating func acknowledgeNodeLabels() { nodeLabelsChanged = false }

    /// Derives the service ports of one Service for one family; nil when the Service is out of
    /// scope for a proxy (ExternalName, headless, no ClusterIP of this family, another proxy's).
    public static func servicePorts(_ svc: Service, family: IPFamily, proxyName: String?) -> [ServicePortName: ServicePortInfo]? {
        if let owner = svc.labels[ServiceLabels.serviceProxyName], owner != proxyName { return nil }
        if svc.labels[ServiceLabels.headless] != nil { return nil }
        guard let type = ServiceType(rawValue: svc.typeName), type != .externalName else { return nil }
        guard let clusterIP = svc.clusterIPs.compactMap(IPAddress.init).first(where: { $0.family == family }) else { return nil }
        let externallyAccessible = type == .loadBalancer || type == .nodePort || !svc.externalIPs.isEmpty
        let eTPLocal = externallyAccessible && svc.externalTrafficPolicy == TrafficPolicy.local.rawValue
        let iTPLocal = svc.internalTrafficPolicy == TrafficPolicy.local.rawValue
        let vips = type == .loadBalancer
            ? svc.loadBalancerIngress.filter { $0.ipMode == nil || $0.ipMode == "VIP" }.compactMap { IPAddress($0.ip) }.filter { $0.family == family }
            : []
        let ranges = type == .loadBalancer ? svc.loadBalancerSourceRanges.compactMap(CIDR.init).filter { $0.family == family } : []
        let externalIPs = svc.externalIPs.compactMap(IPAddress.init).filter { $0.family == family }
        let sticky = svc.sessionAffinity == "ClientIP" ? (svc.sessionAffinityTimeoutSeconds ?? 10800) : nil
        let hc = type == .loadBalancer && eTPLocal ? svc.healthCheckNodePort : 0
        let mode = svc.annotations[ServiceLabels.topologyMode] ?? svc.annotations[ServiceLabels.topologyAwareHints] ?? ""
        let hints = mode.lowercased() == "auto" || svc.trafficDistribution == "PreferClose"
            || svc.trafficDistribution == "PreferSameZone" || svc.trafficDistribution == "PreferSameNode"
        var out: [ServicePortName: ServicePortInfo] = [:]
        for p in svc.ports {
            guard let proto = TransportProtocol(rawValue: p.protocolName) else { continue }
            let spn = ServicePortName(service: svc.key, port: p.name, proto: proto)
            out[spn] = ServicePortInfo(
                name: spn, clusterIP: clusterIP, port: p.port, proto: proto,
                nodePort: type == .clusterIP ? 0 : p.nodePort,
                loadBalancerVIPs: vips, loadBalancerSourceRanges: ranges, externalIPs: externalIPs,
                stickyTimeoutSeconds: sticky, externalPolicyLocal: eTPLocal, internalPolicyLocal: iTPLocal,
                healthCheckNodePort: hc, usesTopologyHints: hints)
        }
        return out
    }

    /// Merges the slices of one Service into per-port endpoint lists (kube-proxy's
    /// EndpointSliceCache): first address only, duplicates across slices counted once with a
    /// ready copy winning, addresses that can never be endpoints skipped, sorted by `ip:port`.
    private func endpointMap(for key: NamespacedName, ports: [ServicePortName: ServicePortInfo], family: IPFamily) -> [ServicePortName: [EndpointInfo]] {
        // Keyed by address and port (what `ip:port` text names) without building the text.
        var byPort: [ServicePortName: [EndpointKey: EndpointInfo]] = [:]
        for sliceKey in (slicesByService[key] ?? []).sorted() {
            guard let slice = slices[sliceKey], slice.addressType == family.rawValue else { continue }
            for sp in slice.ports {
                guard let proto = TransportProtocol(rawValue: sp.protocolName) else { continue }
                let spn = ServicePortName(service: key, port: sp.name, proto: proto)
                guard ports[spn] != nil else { continue }
                for ep in slice.endpoints {
                    guard let first = ep.addresses.first, let ip = IPAddress(first) else { continue }
                    if ip.isLoopback || ip.isLinkLocalUnicast || ip.isLinkLocalMulticast || ip.isUnspecified { continue }
                    let ready = ep.ready ?? true
                    let info = EndpointInfo(
                        ip: ip, port: sp.port, isLocal: ep.nodeName == nodeName, ready: ready,
                        serving: ep.serving ?? ready, terminating: ep.terminating ?? false,
                        zoneHints: Set(ep.zoneHints), nodeHints: Set(ep.nodeHints))
                    let k = EndpointKey(ip: ip, port: sp.port)
                    if byPort[spn, default: [:]][k] == nil || ready { byPort[spn, default: [:]][k] = info }
                }
            }
        }
        // Sorted by `ip:port` text, each text built once (not once per comparison).
        return byPort.mapValues { eps in eps.values.map { ($0.description, $0) }.sorted { $0.0 < $1.0 }.map(\.1) }
    }

    /// An endpoint's address and port: the identity its `ip:port` text names.
    private struct EndpointKey: Hashable {
        var ip: IPAddress
        var port: Int
    }
}
