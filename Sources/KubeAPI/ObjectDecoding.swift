// Sluice: a per-node Kubernetes service proxy.
// Decoding Kubernetes objects from generic trees (YAML from manifests, JSON from the API)
// into the model, with errors that name the field.

import Foundation
import SluiceCore

/// A decoded object of a kind the proxy consumes.
public enum KubeObject: Sendable, Hashable {
    case service(Service)
    case endpointSlice(EndpointSlice)
    case node(Node)
    case serviceCIDR(ServiceCIDR)

    /// `Kind namespace/name`, unique across kinds.
    public var identity: String {
        switch self {
        case .service(let s): return "Service \(s.namespace)/\(s.name)"
        case .endpointSlice(let e): return "EndpointSlice \(e.namespace)/\(e.name)"
        case .node(let n): return "Node \(n.name)"
        case .serviceCIDR(let c): return "ServiceCIDR \(c.name)"
        }
    }

    /// The upsert event for this object.
    public var upsertEvent: ObjectEvent {
        switch self {
        case .service(let s): return .serviceUpserted(s)
        case .endpointSlice(let e): return .sliceUpserted(e)
        case .node(let n): return .nodeUpserted(n)
        case .serviceCIDR(let c): return .serviceCIDRUpserted(c)
        }
    }

    /// The delete event for this object.
    public var deleteEvent: ObjectEvent {
        switch self {
        case .service(let s): return .serviceDeleted(s.key)
        case .endpointSlice(let e): return .sliceDeleted(e.key)
        case .node(let n): return .nodeDeleted(n.name)
        case .serviceCIDR(let c): return .serviceCIDRDeleted(c.name)
        }
    }

    /// The object's kind and name: what a source remembers of it instead of the object.
    public var key: KubeObjectKey {
        switch self {
        case .service(let s): return KubeObjectKey(kind: .service, namespace: s.namespace, name: s.name)
        case .endpointSlice(let e): return KubeObjectKey(kind: .endpointSlice, namespace: e.namespace, name: e.name)
        case .node(let n): return KubeObjectKey(kind: .node, namespace: "", name: n.name)
        case .serviceCIDR(let c): return KubeObjectKey(kind: .serviceCIDR, namespace: "", name: c.name)
        }
    }
}

/// Which object a `KubeObject` is, without its content: enough to name it and to delete it.
public struct KubeObjectKey: Sendable, Hashable {
    /// The kinds the proxy consumes.
    public enum Kind: UInt8, Sendable, Hashable {
        case service, endpointSlice, node, serviceCIDR
    }

    /// The kind.
    public var kind: Kind
    /// The namespace ("" for Nodes and ServiceCIDRs).
    public var namespace: String
    /// The name.
    public var name: String

    /// Creates a key.
    public init(kind: Kind, namespace: String, name: String) {
        self.kind = kind
        self.namespace = namespace
        self.name = name
    }

    /// `Kind namespace/name`, equal to `KubeObject.identity` of the object it names.
    public var identity: String {
        switch kind {
        case .service: return "Service \(namespace)/\(name)"
        case .endpointSlice: return "EndpointSlice \(namespace)/\(name)"
        case .node: return "Node \(name)"
        case .serviceCIDR: return "ServiceCIDR \(name)"
        }
    }

    /// The delete event of the object this key names.
    public var deleteEvent: ObjectEvent {
        switch kind {
        case .service: return .serviceDeleted(NamespacedName(namespace: namespace, name: name))
        case .endpointSlice: return .sliceDeleted(NamespacedName(namespace: namespace, name: name))
        case .node: return .nodeDeleted(name)
        case .serviceCIDR: return .serviceCIDRDeleted(name)
        }
    }
}

/// A field that is missing or of the wrong type.
public struct DecodeError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Dotted path of the field.
    public var path: String
    /// What is wrong.
    public var reason: String

    public var description: String { "\(path): \(reason)" }
}

/// The largest list a single object may carry (the API's EndpointSlice limit is 1000
/// endpoints; nothing legitimate comes near this for any list the proxy reads).
public let maximumListLength = 10_000

/// Whether `v` is JSON/YAML null. Compares the dynamic type: `v is NSNull` on a Swift
/// dictionary or array makes the runtime bridge the whole subtree to NSDictionary / NSArray
/// first (to test the class), which cost more than parsing.
@inline(__always)
func isNull(_ v: Any) -> Bool {
    ObjectIdentifier(type(of: v)) == ObjectIdentifier(NSNull.self)
}

/// Reads typed fields out of a generic tree (`[String: Any]` from the manifest or JSON parsers).
struct FieldReader {
    let object: [String: Any]
    let path: String

    init(_ object: [String: Any], path: String = "") {
        self.object = object
        self.path = path
    }

    private func at(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func string(_ key: String) throws(DecodeError) -> String? {
        guard let v = object[key], !isNull(v) else { return nil }
        if let s = v as? String { return s }
        throw DecodeError(path: at(key), reason: "expected a string, found \(Validation.printable(String(describing: v)))")
    }

    func int(_ key: String) throws(DecodeError) -> Int? {
        guard let v = object[key], !isNull(v) else { return nil }
        if let b = v as? Bool { throw DecodeError(path: at(key), reason: "expected an integer, found \(b)") }
        if let i = v as? Int { return i }
        if let d = v as? Double, d == d.rounded(), abs(d) < 1e15 { return Int(d) }
        throw DecodeError(path: at(key), reason: "expected an integer, found \(Validation.printable(String(describing: v)))")
    }

    func bool(_ key: String) throws(DecodeError) -> Bool? {
        guard let v = object[key], !isNull(v) else { return nil }
        if let b = v as? Bool { return b }
        throw DecodeError(path: at(key), reason: "expected true or false, found \(Validation.printable(String(describing: v)))")
    }

    func object(_ key: String) throws(DecodeError) -> FieldReader? {
        guard let v = object[key], !isNull(v) else { return nil }
        if let o = v as? [String: Any] { return FieldReader(o, path: at(key)) }
        throw DecodeError(path: at(key), reason: "expected a mapping")
    }

    func list(_ key: String) throws(DecodeError) -> [Any] {
        guard let v = object[key], !isNull(v) else { return [] }
        guard let l = v as? [Any] else { throw DecodeError(path: at(key), reason: "expected a list") }
        guard l.count <= maximumListLength else {
            throw DecodeError(path: at(key), reason: "\(l.count) entries is more than the \(maximumListLength) accepted")
        }
        return l
    }

    func objects(_ key: String) throws(DecodeError) -> [FieldReader] {
        var out: [FieldReader] = []
        for (i, item) in try list(key).enumerated() {
            guard let o = item as? [String: Any] else { throw DecodeError(path: "\(at(key))[\(i)]", reason: "expected a mapping") }
            out.append(FieldReader(o, path: "\(at(key))[\(i)]"))
        }
        return out
    }

    func strings(_ key: String) throws(DecodeError) -> [String] {
        let items = try list(key)
        var out: [String] = []
        out.reserveCapacity(items.count)
        for (i, item) in items.enumerated() {
            guard let s = item as? String else { throw DecodeError(path: "\(at(key))[\(i)]", reason: "expected a string") }
            out.append(s)
        }
        return out
    }

    func stringMap(_ key: String) throws(DecodeError) -> [String: String] {
        guard let m = try object(key) else { return [:] }
        var out: [String: String] = [:]
        for (k, v) in m.object {
            if let s = v as? String { out[k] = s } else if let i = v as? Int { out[k] = String(i) } else if let b = v as? Bool { out[k] = String(b) } else {
                throw DecodeError(path: "\(m.path).\(k)", reason: "expected a string")
            }
        }
        return out
    }
}

/// Decodes Kubernetes objects from generic trees.
public enum ObjectDecoder {
    /// Decodes one object. Returns nil for kinds the proxy does not consume.
    /// `v1 Endpoints` become one EndpointSlice per subset.
    public static func decode(_ tree: [String: Any]) throws(DecodeError) -> [KubeObject]? {
        let root = FieldReader(tree)
        let apiVersion = try root.string("apiVersion") ?? ""
        let kind = try root.string("kind") ?? ""
        guard let meta = try root.object("metadata") else { throw DecodeError(path: "metadata", reason: "missing") }
        let name = try meta.string("name") ?? ""
        let namespace = try meta.string("namespace") ?? "default"
        let labels = try meta.stringMap("labels")
        let annotations = try meta.stringMap("annotations")
        switch (apiVersion, kind) {
        case ("v1", "Service"):
            return [.service(try decodeService(root, namespace: namespace, name: name, labels: labels, annotations: annotations))]
        case ("discovery.k8s.io/v1", "EndpointSlice"):
            return [.endpointSlice(try decodeSlice(root, namespace: namespace, name: name, labels: labels, annotations: annotations))]
        case ("v1", "Endpoints"):
            return try decodeEndpoints(root, namespace: namespace, name: name).map { .endpointSlice($0) }
        case ("v1", "Node"):
            return [.node(try decodeNode(root, name: name, labels: labels))]
        case ("networking.k8s.io/v1", "ServiceCIDR"), ("networking.k8s.io/v1beta1", "ServiceCIDR"):
            return [.serviceCIDR(ServiceCIDR(name: name, cidrs: try root.object("spec")?.strings("cidrs") ?? []))]
        case ("v1", "List"):
            var out: [KubeObject] = []
            for item in try root.objects("items") {
                if let objs = try decode(item.object) { out += objs }
            }
            return out
        default:
            return nil
        }
    }

    static func decodeService(_ root: FieldReader, namespace: String, name: String, labels: [String: String],
                              annotations: [String: String]) throws(DecodeError) -> Service {
        let spec = try root.object("spec") ?? FieldReader([:], path: "spec")
        var svc = Service(namespace: namespace, name: name, labels: labels, annotations: annotations)
        svc.typeName = try spec.string("type") ?? "ClusterIP"
        var ips = try spec.strings("clusterIPs")
        if ips.isEmpty, let ip = try spec.string("clusterIP") { ips = [ip] }
        svc.clusterIPs = ips
        for p in try spec.objects("ports") {
            var port = ServicePort(port: 0)
            port.name = try p.string("name") ?? ""
            port.protocolName = try p.string("protocol") ?? "TCP"
            port.port = try p.int("port") ?? 0
            port.nodePort = try p.int("nodePort") ?? 0
            if let t = p.object["targetPort"] as? Int { port.targetPort = String(t) } else { port.targetPort = try p.string("targetPort") ?? "" }
            svc.ports.append(port)
        }
        svc.externalIPs = try spec.strings("externalIPs")
        svc.loadBalancerSourceRanges = try spec.strings("loadBalancerSourceRanges")
        svc.sessionAffinity = try spec.string("sessionAffinity") ?? "None"
        if let cfg = try spec.object("sessionAffinityConfig"), let cip = try cfg.object("clientIP") {
            svc.sessionAffinityTimeoutSeconds = try cip.int("timeoutSeconds")
        }
        svc.externalTrafficPolicy = try spec.string("externalTrafficPolicy") ?? "Cluster"
        svc.internalTrafficPolicy = try spec.string("internalTrafficPolicy") ?? "Cluster"
        svc.healthCheckNodePort = try spec.int("healthCheckNodePort") ?? 0
        svc.trafficDistribution = try spec.string("trafficDistribution")
        if let status = try root.object("status"), let lb = try status.object("loadBalancer") {
            for ing in try lb.objects("ingress") {
                svc.loadBalancerIngress.append(LoadBalancerIngress(ip: try ing.string("ip") ?? "", ipMode: try ing.string("ipMode")))
            }
        }
        return svc
    }

    static func decodeSlice(_ root: FieldReader, namespace: String, name: String, labels: [String: String],
                            annotations: [String: String]) throws(DecodeError) -> EndpointSlice {
        var slice = EndpointSlice(namespace: namespace, name: name, serviceName: labels[ServiceLabels.serviceName] ?? "",
                                  annotations: annotations)
        slice.addressType = try root.string("addressType") ?? ""
        for p in try root.objects("ports") {
            guard let port = try p.int("port") else { continue }
            slice.ports.append(EndpointPort(name: try p.string("name") ?? "", port: port, protocolName: try p.string("protocol") ?? "TCP"))
        }
        // Exactly as many as there are: appending one by one leaves up to half the capacity
        // unused, and 100 000 endpoints are held for the process's life.
        let endpoints = try root.objects("endpoints")
        slice.endpoints.reserveCapacity(endpoints.count)
        for e in endpoints {
            var ep = Endpoint(addresses: try e.strings("addresses"))
            if let c = try e.object("conditions") {
                ep.ready = try c.bool("ready")
                ep.serving = try c.bool("serving")
                ep.terminating = try c.bool("terminating")
            }
            ep.nodeName = try e.string("nodeName")
            ep.zone = try e.string("zone")
            if let h = try e.object("hints") {
                for z in try h.objects("forZones") { if let n = try z.string("name") { ep.zoneHints.append(n) } }
                for z in try h.objects("forNodes") { if let n = try z.string("name") { ep.nodeHints.append(n) } }
            }
            slice.endpoints.append(ep)
        }
        return slice
    }

    /// `v1 Endpoints`: each subset becomes a slice named `<name>-subset-<i>`; addresses are
    /// ready, notReadyAddresses are not.
    static func decodeEndpoints(_ root: FieldReader, namespace: String, name: String) throws(DecodeError) -> [EndpointSlice] {
        var out: [EndpointSlice] = []
        for (i, subset) in try root.objects("subsets").enumerated() {
            var slice = EndpointSlice(namespace: namespace, name: "\(name)-subset-\(i)", serviceName: name)
            var family = "IPv4"
            for p in try subset.objects("ports") {
                guard let port = try p.int("port") else { continue }
                slice.ports.append(EndpointPort(name: try p.string("name") ?? "", port: port, protocolName: try p.string("protocol") ?? "TCP"))
            }
            for (key, ready) in [("addresses", true), ("notReadyAddresses", false)] {
                for a in try subset.objects(key) {
                    let ip = try a.string("ip") ?? ""
                    if ip.contains(":") { family = "IPv6" }
                    slice.endpoints.append(Endpoint(addresses: [ip], ready: ready, serving: ready, terminating: false,
                                                    nodeName: try a.string("nodeName")))
                }
            }
            slice.addressType = family
            out.append(slice)
        }
        return out
    }

    static func decodeNode(_ root: FieldReader, name: String, labels: [String: String]) throws(DecodeError) -> Node {
        var node = Node(name: name, labels: labels)
        node.deletionTimestamp = try root.object("metadata")?.string("deletionTimestamp")
        if let spec = try root.object("spec") {
            node.podCIDRs = try spec.strings("podCIDRs")
            if node.podCIDRs.isEmpty, let c = try spec.string("podCIDR") { node.podCIDRs = [c] }
            for t in try spec.objects("taints") {
                node.taints.append(NodeTaint(key: try t.string("key") ?? "", value: try t.string("value") ?? "",
                                             effect: try t.string("effect") ?? ""))
            }
        }
        if let status = try root.object("status") {
            for a in try status.objects("addresses") {
                node.addresses.append((type: try a.string("type") ?? "", address: try a.string("address") ?? ""))
            }
        }
        return node
    }
}
