// Sluice: a per-node Kubernetes service proxy.
// `--config FILE`: kube-proxy's KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1).
// Flags given on the command line override the file; unknown fields are an error naming the
// field; every value is checked with a message naming the field and saying why.

import Foundation
import SluiceCore
import Yams

/// The shape of one configuration field.
indirect enum ConfigShape: Sendable {
    case string, int, number, bool, duration, strings
    /// A map of arbitrary values (featureGates).
    case anyMap
    /// A nested object with known fields.
    case object([String: ConfigShape])
    /// Accepted and not interpreted (winkernel, logging).
    case opaque
}

/// kube-proxy v1.31's KubeProxyConfiguration fields.
let kubeProxyConfigurationSchema: [String: ConfigShape] = [
    "apiVersion": .string, "kind": .string,
    "featureGates": .anyMap,
    "clientConnection": .object(["kubeconfig": .string, "acceptContentTypes": .string, "contentType": .string,
                                 "qps": .number, "burst": .int]),
    "hostnameOverride": .string, "bindAddress": .string, "healthzBindAddress": .string, "metricsBindAddress": .string,
    "bindAddressHardFail": .bool, "enableProfiling": .bool, "showHiddenMetricsForVersion": .string,
    "mode": .string,
    "iptables": .object(["masqueradeAll": .bool, "masqueradeBit": .int, "localhostNodePorts": .bool,
                         "syncPeriod": .duration, "minSyncPeriod": .duration]),
    "ipvs": .object(["syncPeriod": .duration, "minSyncPeriod": .duration, "scheduler": .string, "excludeCIDRs": .strings,
                     "strictARP": .bool, "tcpTimeout": .duration, "tcpFinTimeout": .duration, "udpTimeout": .duration]),
    "nftables": .object(["masqueradeAll": .bool, "masqueradeBit": .int, "syncPeriod": .duration, "minSyncPeriod": .duration]),
    "winkernel": .opaque,
    "detectLocalMode": .string,
    "detectLocal": .object(["bridgeInterface": .string, "interfaceNamePrefix": .string]),
    "clusterCIDR": .string,
    "nodePortAddresses": .strings,
    "oomScoreAdj": .int,
    "conntrack": .object(["maxPerCore": .int, "min": .int, "tcpEstablishedTimeout": .duration, "tcpCloseWaitTimeout": .duration,
                          "tcpBeLiberal": .bool, "udpTimeout": .duration, "udpStreamTimeout": .duration]),
    "configSyncPeriod": .duration,
    "portRange": .string,
    "logging": .opaque,
]

/// How one configuration field maps onto a command-line option.
struct ConfigBinding: Sendable {
    /// Dotted field path, e.g. `iptables.syncPeriod`.
    var path: String
    /// Every spelling of the flag that overrides it (`--sync-period`, `--iptables-sync-period`).
    var flags: [String]
    /// Sets the option from a checked field value.
    var apply: @Sendable (inout ProxyOptions, Any) throws(ConfigError) -> Void
    /// The option's value as the field would hold it (for `--write-config-to`).
    var current: @Sendable (ProxyOptions) -> Any?
}

private func duration(_ path: String, _ v: Any) throws(ConfigError) -> String {
    guard let s = v as? String, GoDuration.parse(s) != nil else {
        throw ConfigError(field: path, value: "\(v)", reason: "not a duration such as 30s or 1m0s")
    }
    return s
}

/// The fields Sluice interprets, and the flags that override them.
let configBindings: [ConfigBinding] = [
    ConfigBinding(path: "mode", flags: ["--proxy-mode"], apply: { o, v throws(ConfigError) in
        let s = v as? String ?? ""
        if s.isEmpty { return }
        guard let m = ProxyMode(rawValue: s) else { throw ConfigError(field: "mode", value: s, reason: "not iptables, ipvs, userspace or nftables") }
        o.proxyMode = m
    }, current: { $0.proxyMode.rawValue }),
    ConfigBinding(path: "hostnameOverride", flags: ["--hostname-override"], apply: { o, v in
        if let s = v as? String, !s.isEmpty { o.hostnameOverride = s }
    }, current: { $0.hostnameOverride ?? "" }),
    ConfigBinding(path: "clusterCIDR", flags: ["--cluster-cidr"], apply: { o, v in
        if let s = v as? String, !s.isEmpty { o.clusterCIDR = s }
    }, current: { $0.clusterCIDR ?? "" }),
    ConfigBinding(path: "nodePortAddresses", flags: ["--nodeport-addresses"], apply: { o, v in
        if let l = v as? [String], !l.isEmpty { o.nodeportAddresses = l.joined(separator: ",") }
    }, current: { o in o.nodeportAddresses.map { $0.split(separator: ",").map(String.init) } ?? [String]() }),
    ConfigBinding(path: "detectLocalMode", flags: ["--detect-local-mode"], apply: { o, v throws(ConfigError) in
        let s = v as? String ?? ""
        if s.isEmpty { return }
        guard let m = LocalMode(rawValue: s) else {
            throw ConfigError(field: "detectLocalMode", value: s, reason: "Sluice supports ClusterCIDR and NodeCIDR")
        }
        o.detectLocalMode = m
    }, current: { $0.detectLocalMode.rawValue }),
    ConfigBinding(path: "clientConnection.kubeconfig", flags: ["--kubeconfig"], apply: { o, v in
        if let s = v as? String, !s.isEmpty { o.kubeconfig = s }
    }, current: { $0.kubeconfig ?? "" }),
    ConfigBinding(path: "healthzBindAddress", flags: ["--healthz-bind-address"], apply: { o, v in
        if let s = v as? String { o.healthzBindAddress = s }
    }, current: { $0.healthzBindAddress }),
    ConfigBinding(path: "metricsBindAddress", flags: ["--metrics-bind-address"], apply: { o, v in
        if let s = v as? String { o.metricsBindAddress = s }
    }, current: { $0.metricsBindAddress }),
    ConfigBinding(path: "iptables.masqueradeAll", flags: ["--masquerade-all"], apply: { o, v in
        if let b = v as? Bool { o.masqueradeAll = b }
    }, current: { $0.masqueradeAll }),
    ConfigBinding(path: "iptables.masqueradeBit", flags: ["--iptables-masquerade-bit"], apply: { o, v throws(ConfigError) in
        guard let i = v as? Int, (0...31).contains(i) else {
            throw ConfigError(field: "iptables.masqueradeBit", value: "\(v)", reason: "not in 0-31")
        }
        o.iptablesMasqueradeBit = i
    }, current: { $0.iptablesMasqueradeBit }),
    ConfigBinding(path: "iptables.localhostNodePorts", flags: ["--iptables-localhost-nodeports"], apply: { o, v in
        if let b = v as? Bool { o.iptablesLocalhostNodeports = b }
    }, current: { $0.iptablesLocalhostNodeports }),
    ConfigBinding(path: "iptables.syncPeriod", flags: ["--sync-period", "--iptables-sync-period"], apply: { o, v throws(ConfigError) in
        o.syncPeriod = try duration("iptables.syncPeriod", v)
    }, current: { $0.syncPeriod }),
    ConfigBinding(path: "iptables.minSyncPeriod", flags: ["--min-sync-period", "--iptables-min-sync-period"], apply: { o, v throws(ConfigError) in
        o.minSyncPeriod = try duration("iptables.minSyncPeriod", v)
    }, current: { $0.minSyncPeriod }),
    ConfigBinding(path: "ipvs.scheduler", flags: ["--ipvs-scheduler"], apply: { o, v in
        if let s = v as? String, !s.isEmpty { o.ipvsScheduler = s }
    }, current: { $0.ipvsScheduler }),
    ConfigBinding(path: "ipvs.syncPeriod", flags: ["--ipvs-sync-period"], apply: { o, v throws(ConfigError) in
        o.ipvsSyncPeriod = try duration("ipvs.syncPeriod", v)
    }, current: { $0.ipvsSyncPeriod }),
    ConfigBinding(path: "ipvs.minSyncPeriod", flags: ["--ipvs-min-sync-period"], apply: { o, v throws(ConfigError) in
        o.ipvsMinSyncPeriod = try duration("ipvs.minSyncPeriod", v)
    }, current: { $0.ipvsMinSyncPeriod }),
    ConfigBinding(path: "ipvs.excludeCIDRs", flags: ["--ipvs-exclude-cidrs"], apply: { o, v in
        if let l = v as? [String], !l.isEmpty { o.ipvsExcludeCidrs = l.joined(separator: ",") }
    }, current: { o in o.ipvsExcludeCidrs.map { $0.split(separator: ",").map(String.init) } ?? [String]() }),
    ConfigBinding(path: "ipvs.strictARP", flags: ["--ipvs-strict-arp"], apply: { o, v in
        if let b = v as? Bool { o.ipvsStrictArp = b }
    }, current: { $0.ipvsStrictArp }),
    ConfigBinding(path: "ipvs.tcpTimeout", flags: ["--ipvs-tcp-timeout"], apply: { o, v throws(ConfigError) in
        o.ipvsTcpTimeout = try duration("ipvs.tcpTimeout", v)
    }, current: { $0.ipvsTcpTimeout }),
    ConfigBinding(path: "ipvs.tcpFinTimeout", flags: ["--ipvs-tcpfin-timeout"], apply: { o, v throws(ConfigError) in
        o.ipvsTcpfinTimeout = try duration("ipvs.tcpFinTimeout", v)
    }, current: { $0.ipvsTcpfinTimeout }),
    ConfigBinding(path: "ipvs.udpTimeout", flags: ["--ipvs-udp-timeout"], apply: { o, v throws(ConfigError) in
        o.ipvsUdpTimeout = try duration("ipvs.udpTimeout", v)
    }, current: { $0.ipvsUdpTimeout }),
    ConfigBinding(path: "conntrack.maxPerCore", flags: ["--conntrack-max-per-core"], apply: { o, v throws(ConfigError) in
        guard let i = v as? Int, i >= 0 else { throw ConfigError(field: "conntrack.maxPerCore", value: "\(v)", reason: "not a count >= 0") }
        o.conntrack.conntrackMaxPerCore = i
    }, current: { $0.conntrack.conntrackMaxPerCore }),
    ConfigBinding(path: "conntrack.min", flags: ["--conntrack-min"], apply: { o, v throws(ConfigError) in
        guard let i = v as? Int, i >= 0 else { throw ConfigError(field: "conntrack.min", value: "\(v)", reason: "not a count >= 0") }
        o.conntrack.conntrackMin = i
    }, current: { $0.conntrack.conntrackMin }),
    ConfigBinding(path: "conntrack.tcpEstablishedTimeout", flags: ["--conntrack-tcp-timeout-established"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackTCPTimeoutEstablished = try duration("conntrack.tcpEstablishedTimeout", v)
    }, current: { $0.conntrack.conntrackTCPTimeoutEstablished }),
    ConfigBinding(path: "conntrack.tcpCloseWaitTimeout", flags: ["--conntrack-tcp-timeout-close-wait"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackTCPTimeoutCloseWait = try duration("conntrack.tcpCloseWaitTimeout", v)
    }, current: { $0.conntrack.conntrackTCPTimeoutCloseWait }),
    ConfigBinding(path: "conntrack.udpTimeout", flags: ["--conntrack-udp-timeout"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackUDPTimeout = try duration("conntrack.udpTimeout", v)
    }, current: { $0.conntrack.conntrackUDPTimeout }),
    ConfigBinding(path: "conntrack.udpStreamTimeout", flags: ["--conntrack-udp-timeout-stream"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackUDPTimeoutStream = try duration("conntrack.udpStreamTimeout", v)
    }, current: { $0.conntrack.conntrackUDPTimeoutStream }),
]

/// Loading, checking and writing KubeProxyConfiguration files.
enum ConfigFile {
    static let apiVersion = "kubeproxy.config.k8s.io/v1alpha1"
    static let kind = "KubeProxyConfiguration"

    /// Reads and checks `path`: the fields by dotted path, e.g. `["iptables.syncPeriod": "30s"]`.
    static func load(_ path: String) throws -> [String: Any] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(field: "--config", value: path, reason: "cannot read the file")
        }
        let tree: Any?
        do {
            tree = try Yams.load(yaml: String(decoding: data, as: UTF8.self))
        } catch {
            throw ConfigError(field: "--config", value: path, reason: "not valid YAML: \(String(describing: error).prefix(200))")
        }
        guard let root = tree as? [String: Any] else {
            throw ConfigError(field: "--config", value: path, reason: "not a KubeProxyConfiguration mapping")
        }
        guard root["apiVersion"] as? String == apiVersion, root["kind"] as? String == kind else {
            throw ConfigError(field: "apiVersion/kind", value: "\(root["apiVersion"] ?? "")/\(root["kind"] ?? "")",
                              reason: "\(path) must be apiVersion \(apiVersion), kind \(kind)")
        }
        var flat: [String: Any] = [:]
        try check(root, schema: kubeProxyConfigurationSchema, prefix: "", into: &flat)
        return flat
    }

    private static func check(_ object: [String: Any], schema: [String: ConfigShape], prefix: String,
                              into flat: inout [String: Any]) throws(ConfigError) {
        for key in object.keys.sorted() {
            let value = object[key]!
            let path = prefix.isEmpty ? key : "\(prefix).\(key)"
            guard let shape = schema[key] else {
                throw ConfigError(field: path, value: Validation.printable("\(value)").prefix(60).description,
                                  reason: "unknown field in \(kind)")
            }
            if value is NSNull { continue }
            func wrong(_ want: String) -> ConfigError {
                ConfigError(field: path, value: Validation.printable("\(value)").prefix(60).description, reason: "expected \(want)")
            }
            switch shape {
            case .string: guard value is String else { throw wrong("a string") }
            case .int: guard value is Int, !(value is Bool) else { throw wrong("an integer") }
            case .number: guard value is Int || value is Double, !(value is Bool) else { throw wrong("a number") }
            case .bool: guard value is Bool else { throw wrong("true or false") }
            case .duration:
                guard let s = value as? String, GoDuration.parse(s) != nil else { throw wrong("a duration such as 30s") }
            case .strings: guard let l = value as? [Any], l.allSatisfy({ $0 is String }) else { throw wrong("a list of strings") }
            case .anyMap: guard value is [String: Any] else { throw wrong("a mapping") }
            case .opaque: break
            case .object(let inner):
                guard let o = value as? [String: Any] else { throw wrong("a mapping") }
                try check(o, schema: inner, prefix: path, into: &flat)
                continue
            }
            flat[path] = value
        }
    }

    /// The flags present on a command line (`--name` or `--name=value`).
    static func explicitFlags(_ arguments: [String]) -> Set<String> {
        var out = Set<String>()
        for a in arguments where a.hasPrefix("--") {
            out.insert(String(a.split(separator: "=", maxSplits: 1).first ?? Substring(a)))
        }
        return out
    }

    /// Sets every option the file holds and the command line does not.
    /// - Returns: the fields of the file that Sluice does not interpret (for a log line).
    @discardableResult
    static func apply(_ fields: [String: Any], to options: inout ProxyOptions, explicit: Set<String>) throws -> [String] {
        var used = Set<String>(["apiVersion", "kind"])
        for b in configBindings {
            guard let v = fields[b.path] else { continue }
            used.insert(b.path)
            if b.flags.contains(where: explicit.contains) { continue }
            try b.apply(&options, v)
        }
        return fields.keys.filter { !used.contains($0) }.sorted()
    }

    /// The effective configuration as a KubeProxyConfiguration document.
    static func render(_ options: ProxyOptions) throws -> String {
        var root: [String: Any] = ["apiVersion": apiVersion, "kind": kind]
        for b in configBindings {
            guard let v = b.current(options) else { continue }
            let parts = b.path.split(separator: ".").map(String.init)
            if parts.count == 1 {
                root[parts[0]] = v
            } else {
                var inner = root[parts[0]] as? [String: Any] ?? [:]
                inner[parts[1]] = v
                root[parts[0]] = inner
            }
        }
        return try Yams.dump(object: root, sortKeys: true)
    }
}

extension ProxyOptions {
    /// The options with `--config` applied under the command-line flags, checked again.
    func resolved(arguments: [String] = CommandLine.arguments) throws -> ProxyOptions {
        guard let path = config else { return self }
        var out = self
        do {
            let fields = try ConfigFile.load(path)
            try ConfigFile.apply(fields, to: &out, explicit: ConfigFile.explicitFlags(arguments))
            try out.validate()
        } catch let e as ConfigError {
            throw SluiceExit("config \(path): \(e.description)")
        } catch {
            throw SluiceExit("config \(path): \(error)")
        }
        return out
    }
}
