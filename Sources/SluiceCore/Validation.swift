// Sluice: a per-node Kubernetes service proxy.
// Validation of incoming objects. Anything that reaches a rule must pass here first:
// names are DNS labels (no quotes, spaces or newlines can reach iptables text), ports are
// in range, addresses parse.

/// Why an object was rejected. The object is skipped; the rest of the node keeps working.
public struct ObjectRejection: Error, Sendable, Hashable, CustomStringConvertible {
    /// The kind of object ("Service", "EndpointSlice", "Node", or a manifest kind).
    public var kind: String
    /// `namespace/name` of the object (printable, escaped).
    public var key: String
    /// What is wrong, naming the field and the value.
    public var reason: String

    /// Creates a rejection.
    public init(kind: String, key: String, reason: String) {
        self.kind = kind
        self.key = Validation.printable(key)
        self.reason = reason
    }

    public var description: String { "\(kind) \(key) rejected: \(reason)" }
}

/// Validation helpers shared by the model and the sources.
public enum Validation {
    /// An RFC 1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric, 1...63.
    public static func isDNSLabel(_ s: String) -> Bool {
        let u = Array(s.utf8)
        guard (1...63).contains(u.count) else { return false }
        func alnum(_ c: UInt8) -> Bool { (c >= 97 && c <= 122) || (c >= 48 && c <= 57) }
        guard alnum(u.first!), alnum(u.last!) else { return false }
        return u.allSatisfy { alnum($0) || $0 == 45 }
    }

    /// An RFC 1123 subdomain: dot-separated labels, at most 253 characters.
    public static func isDNSSubdomain(_ s: String) -> Bool {
        guard (1...253).contains(s.utf8.count) else { return false }
        return s.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { isDNSLabel(String($0)) }
    }

    /// A node name: a DNS subdomain (the API allows that for Node names).
    public static func isNodeName(_ s: String) -> Bool { isDNSSubdomain(s) }

    /// A rendering of `s` that is safe in one log line: control characters and quotes escaped,
    /// and long strings cut.
    public static func printable(_ s: String) -> String {
        var out = ""
        for scalar in s.unicodeScalars.prefix(200) {
            switch scalar {
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7f {
                    out += "\\u{\(String(scalar.value, radix: 16))}"
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        if s.unicodeScalars.count > 200 { out += "…" }
        return out
    }

    /// Checks the fields of a Service that any proxy mode relies on.
    public static func validate(_ svc: Service) throws(ObjectRejection) {
        func reject(_ reason: String) -> ObjectRejection {
            ObjectRejection(kind: "Service", key: "\(svc.namespace)/\(svc.name)", reason: reason)
        }
        guard isDNSLabel(svc.namespace) else { throw reject("metadata.namespace \"\(printable(svc.namespace))\" is not a DNS label") }
        guard isDNSLabel(svc.name) else { throw reject("metadata.name \"\(printable(svc.name))\" is not a DNS label") }
        guard ServiceType(rawValue: svc.typeName) != nil else {
            throw reject("spec.type \"\(printable(svc.typeName))\" is not ClusterIP, NodePort, LoadBalancer or ExternalName")
        }
        if svc.typeName == ServiceType.externalName.rawValue { return }
        for ip in svc.clusterIPs where ip != "None" && !ip.isEmpty && IPAddress(ip) == nil {
            throw reject("spec.clusterIPs: \"\(printable(ip))\" is not a valid IP address")
        }
        var seenNames = Set<String>()
        var seenPorts = Set<String>()
        if svc.ports.count > 1 && svc.ports.contains(where: { $0.name.isEmpty }) {
            throw reject("spec.ports: every port must be named when there is more than one")
        }
        for (i, p) in svc.ports.enumerated() {
            if !p.name.isEmpty && !isDNSLabel(p.name) {
                throw reject("spec.ports[\(i)].name \"\(printable(p.name))\" is not a DNS label")
            }
            guard TransportProtocol(rawValue: p.protocolName) != nil else {
                throw reject("spec.ports[\(i)].protocol \"\(printable(p.protocolName))\" is not TCP, UDP or SCTP")
            }
            guard (1...65535).contains(p.port) else { throw reject("spec.ports[\(i)].port \(p.port) is not in 1-65535") }
            guard p.nodePort == 0 || (1...65535).contains(p.nodePort) else {
                throw reject("spec.ports[\(i)].nodePort \(p.nodePort) is not in 1-65535")
            }
            guard seenNames.insert(p.name).inserted else { throw reject("spec.ports[\(i)].name \"\(p.name)\" is duplicated") }
            guard seenPorts.insert("\(p.port)/\(p.protocolName)").inserted else {
                throw reject("spec.ports[\(i)]: port \(p.port)/\(p.protocolName) is duplicated")
            }
        }
        for ip in svc.externalIPs where IPAddress(ip) == nil {
            throw reject("spec.externalIPs: \"\(printable(ip))\" is not a valid IP address")
        }
        for ing in svc.loadBalancerIngress where !ing.ip.isEmpty && IPAddress(ing.ip) == nil {
            throw reject("status.loadBalancer.ingress: \"\(printable(ing.ip))\" is not a valid IP address")
        }
        for r in svc.loadBalancerSourceRanges where CIDR(r) == nil {
            throw reject("spec.loadBalancerSourceRanges: \"\(printable(r))\" is not a valid CIDR")
        }
        guard svc.sessionAffinity == "None" || svc.sessionAffinity == "ClientIP" else {
            throw reject("spec.sessionAffinity \"\(printable(svc.sessionAffinity))\" is not None or ClientIP")
        }
        if let t = svc.sessionAffinityTimeoutSeconds, !(1...86400).contains(t) {
            throw reject("spec.sessionAffinityConfig.clientIP.timeoutSeconds \(t) is not in 1-86400")
        }
        for (field, value) in [("externalTrafficPolicy", svc.externalTrafficPolicy), ("internalTrafficPolicy", svc.internalTrafficPolicy)]
        where TrafficPolicy(rawValue: value) == nil {
            throw reject("spec.\(field) \"\(printable(value))\" is not Cluster or Local")
        }
        guard svc.healthCheckNodePort == 0 || (1...65535).contains(svc.healthCheckNodePort) else {
            throw reject("spec.healthCheckNodePort \(svc.healthCheckNodePort) is not in 1-65535")
        }
    }

    /// Checks an EndpointSlice.
    public static func validate(_ slice: EndpointSlice) throws(ObjectRejection) {
        func reject(_ reason: String) -> ObjectRejection {
            ObjectRejection(kind: "EndpointSlice", key: "\(slice.namespace)/\(slice.name)", reason: reason)
        }
        guard isDNSLabel(slice.namespace) else { throw reject("metadata.namespace \"\(printable(slice.namespace))\" is not a DNS label") }
        guard isDNSSubdomain(slice.name) else { throw reject("metadata.name \"\(printable(slice.name))\" is not a DNS subdomain") }
        guard isDNSLabel(slice.serviceName) else {
            throw reject("label kubernetes.io/service-name \"\(printable(slice.serviceName))\" is missing or not a DNS label")
        }
        guard ["IPv4", "IPv6", "FQDN"].contains(slice.addressType) else {
            throw reject("addressType \"\(printable(slice.addressType))\" is not IPv4, IPv6 or FQDN")
        }
        for (i, p) in slice.ports.enumerated() {
            if !p.name.isEmpty && !isDNSLabel(p.name) { throw reject("ports[\(i)].name \"\(printable(p.name))\" is not a DNS label") }
            guard (1...65535).contains(p.port) else { throw reject("ports[\(i)].port \(p.port) is not in 1-65535") }
            guard TransportProtocol(rawValue: p.protocolName) != nil else {
                throw reject("ports[\(i)].protocol \"\(printable(p.protocolName))\" is not TCP, UDP or SCTP")
            }
        }
        if slice.addressType == "FQDN" { return }
        for (i, ep) in slice.endpoints.enumerated() {
            for a in ep.addresses {
                guard let ip = IPAddress(a) else { throw reject("endpoints[\(i)].addresses: \"\(printable(a))\" is not a valid IP address") }
                guard ip.family.rawValue == slice.addressType else {
                    throw reject("endpoints[\(i)].addresses: \(a) does not match addressType \(slice.addressType)")
                }
            }
            if let n = ep.nodeName, !isNodeName(n) { throw reject("endpoints[\(i)].nodeName \"\(printable(n))\" is not a valid node name") }
        }
    }

    /// Checks a ServiceCIDR as the API server does: a DNS-subdomain name and one or two
    /// ranges, at most one per family, each a valid CIDR without host bits. kube-proxy passes
    /// the ranges to nft unchecked, where one bad range fails the whole transaction; here the
    /// object is rejected and the others keep working.
    public static func validate(_ cidr: ServiceCIDR) throws(ObjectRejection) {
        func reject(_ reason: String) -> ObjectRejection {
            ObjectRejection(kind: "ServiceCIDR", key: printable(cidr.name), reason: reason)
        }
        guard isDNSSubdomain(cidr.name) else { throw reject("metadata.name is not a valid DNS subdomain") }
        guard (1...2).contains(cidr.cidrs.count) else {
            throw reject("spec.cidrs has \(cidr.cidrs.count) entries; one or two (one per family) are allowed")
        }
        var families: Set<IPFamily> = []
        for (i, text) in cidr.cidrs.enumerated() {
            guard let c = CIDR(text), let ip = IPAddress(String(text.split(separator: "/")[0])) else {
                throw reject("spec.cidrs[\(i)]: \"\(printable(text))\" is not a valid CIDR")
            }
            guard c.address == ip else { throw reject("spec.cidrs[\(i)]: \(text) has host bits set (the network is \(c))") }
            guard families.insert(c.family).inserted else { throw reject("spec.cidrs has two \(c.family.rawValue) ranges") }
        }
    }
}
