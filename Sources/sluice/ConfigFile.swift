// Sluice: a per-node Kubernetes service proxy.
// `--config FILE`: kube-proxy's KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1).
// Every field kube-proxy knows is accepted and defaulted as kube-proxy defaults it
// (pkg/proxy/apis/config/v1alpha1/defaults.go and the Linux platform defaults): a zero
// duration, an empty string or a null pointer means "kube-proxy's default". Flags given on
// the command line override the file. An unknown field is an error naming it; a value
// kube-proxy would refuse is an error naming the field; a field Sluice does not act on is
// reported (by name, with its value) when it is set to anything but its default.

import Foundation
import Logging
import ServiceLifecycle
import SluiceCore
import SluiceServer
import Yams

/// The shape of one configuration field.
enum ConfigShape: Sendable {
    case string, int, number, bool, duration, strings
    /// A map of feature names to booleans (featureGates).
    case boolMap
    /// logging.flushFrequency: nanoseconds as an integer, or a duration string.
    case flushFrequency
    /// A resource quantity: a string such as "0" or "64Ki", or an integer.
    case quantity
    /// A list of anything (logging.vmodule).
    case list
}

/// A default value as kube-proxy writes it.
enum DefaultValue: Sendable, Hashable {
    case string(String), int(Int), double(Double), bool(Bool)

    var any: Any {
        switch self {
        case .string(let s): return s
        case .int(let i): return i
        case .double(let d): return d
        case .bool(let b): return b
        }
    }
}

/// kube-proxy's defaulting of one field.
enum Defaulting: Sendable {
    /// The zero value stands (and is what kube-proxy writes).
    case none
    /// An absent, null or zero value ("", 0, 0s) becomes this.
    case whenZero(DefaultValue)
    /// An absent or null value becomes this; zero is a real value (a pointer field).
    case whenNull(DefaultValue)
}

/// One field of KubeProxyConfiguration v1alpha1.
struct ConfigField: Sendable {
    /// Dotted path, e.g. `iptables.syncPeriod`.
    var path: String
    var shape: ConfigShape
    var defaulting: Defaulting = .none
    /// Removed from kube-proxy's types, still found in older ConfigMaps (kube-proxy decodes
    /// them leniently and warns): accepted, reported, never written.
    var obsolete = false

    init(_ path: String, _ shape: ConfigShape, _ defaulting: Defaulting = .none, obsolete: Bool = false) {
        self.path = path
        self.shape = shape
        self.defaulting = defaulting
        self.obsolete = obsolete
    }
}

/// kube-proxy's default health and metrics ports (pkg/cluster/ports).
let proxyHealthzPort = 10256
let proxyMetricsPort = 10249

/// Every field of KubeProxyConfiguration v1alpha1 (k8s.io/kube-proxy/config/v1alpha1,
/// Kubernetes 1.34, plus `iptables.snatNodeInternalIP` of later releases), with kube-proxy's
/// defaults. healthzBindAddress and metricsBindAddress default from bindAddress (see
/// `ConfigFile.defaulted`).
let kubeProxyConfigurationFields: [ConfigField] = [
    ConfigField("featureGates", .boolMap),
    ConfigField("clientConnection.kubeconfig", .string),
    ConfigField("clientConnection.acceptContentTypes", .string),
    ConfigField("clientConnection.contentType", .string, .whenZero(.string("application/vnd.kubernetes.protobuf"))),
    ConfigField("clientConnection.qps", .number, .whenZero(.double(5))),
    ConfigField("clientConnection.burst", .int, .whenZero(.int(10))),
    ConfigField("logging.format", .string, .whenZero(.string("text"))),
    ConfigField("logging.flushFrequency", .flushFrequency, .whenZero(.string("5s"))),
    ConfigField("logging.verbosity", .int),
    ConfigField("logging.vmodule", .list),
    ConfigField("logging.options.json.splitStream", .bool),
    ConfigField("logging.options.json.infoBufferSize", .quantity, .whenZero(.string("0"))),
    ConfigField("logging.options.text.splitStream", .bool),
    ConfigField("logging.options.text.infoBufferSize", .quantity, .whenZero(.string("0"))),
    ConfigField("hostnameOverride", .string),
    ConfigField("bindAddress", .string, .whenZero(.string("0.0.0.0"))),
    ConfigField("healthzBindAddress", .string),
    ConfigField("metricsBindAddress", .string),
    ConfigField("bindAddressHardFail", .bool),
    ConfigField("enableProfiling", .bool),
    ConfigField("showHiddenMetricsForVersion", .string),
    ConfigField("mode", .string, .whenZero(.string("iptables"))),
    ConfigField("iptables.masqueradeBit", .int, .whenNull(.int(14))),
    ConfigField("iptables.masqueradeAll", .bool),
    ConfigField("iptables.localhostNodePorts", .bool, .whenNull(.bool(true))),
    ConfigField("iptables.snatNodeInternalIP", .bool, .whenNull(.bool(false))),
    ConfigField("iptables.syncPeriod", .duration, .whenZero(.string("30s"))),
    ConfigField("iptables.minSyncPeriod", .duration, .whenZero(.string("1s"))),
    ConfigField("ipvs.syncPeriod", .duration, .whenZero(.string("30s"))),
    ConfigField("ipvs.minSyncPeriod", .duration),
    ConfigField("ipvs.scheduler", .string),
    ConfigField("ipvs.excludeCIDRs", .strings),
    ConfigField("ipvs.strictARP", .bool),
    ConfigField("ipvs.tcpTimeout", .duration),
    ConfigField("ipvs.tcpFinTimeout", .duration),
    ConfigField("ipvs.udpTimeout", .duration),
    ConfigField("nftables.masqueradeBit", .int, .whenNull(.int(14))),
    ConfigField("nftables.masqueradeAll", .bool),
    ConfigField("nftables.syncPeriod", .duration, .whenZero(.string("30s"))),
    ConfigField("nftables.minSyncPeriod", .duration, .whenZero(.string("1s"))),
    ConfigField("winkernel.networkName", .string),
    ConfigField("winkernel.sourceVip", .string),
    ConfigField("winkernel.enableDSR", .bool),
    ConfigField("winkernel.rootHnsEndpointName", .string),
    ConfigField("winkernel.forwardHealthCheckVip", .bool),
    ConfigField("detectLocalMode", .string, .whenZero(.string("ClusterCIDR"))),
    ConfigField("detectLocal.bridgeInterface", .string),
    ConfigField("detectLocal.interfaceNamePrefix", .string),
    ConfigField("clusterCIDR", .string),
    ConfigField("nodePortAddresses", .strings),
    ConfigField("oomScoreAdj", .int, .whenNull(.int(-999))),
    ConfigField("conntrack.maxPerCore", .int, .whenNull(.int(32768))),
    ConfigField("conntrack.min", .int, .whenNull(.int(131072))),
    ConfigField("conntrack.tcpEstablishedTimeout", .duration, .whenNull(.string("24h0m0s"))),
    ConfigField("conntrack.tcpCloseWaitTimeout", .duration, .whenNull(.string("1h0m0s"))),
    ConfigField("conntrack.tcpBeLiberal", .bool),
    ConfigField("conntrack.udpTimeout", .duration),
    ConfigField("conntrack.udpStreamTimeout", .duration),
    ConfigField("configSyncPeriod", .duration, .whenZero(.string("15m0s"))),
    ConfigField("portRange", .string),
    ConfigField("windowsRunAsService", .bool),
    // Older v1alpha1 fields (kube-proxy ≤ 1.25 and earlier).
    ConfigField("udpIdleTimeout", .duration, obsolete: true),
    ConfigField("resourceContainer", .string, obsolete: true),
    ConfigField("conntrack.max", .int, obsolete: true),
]

/// A Go duration that may be negative (`-1s`): kube-proxy parses those and then refuses them.
func signedGoDuration(_ text: String) -> Duration? {
    let s = text.trimmingASCIIWhitespace()
    if s.hasPrefix("-") { return GoDuration.parse(String(s.dropFirst())).map { .zero - $0 } }
    return GoDuration.parse(s)
}

/// How one configuration field maps onto a command-line option.
struct ConfigBinding: Sendable {
    /// Dotted field path, e.g. `iptables.syncPeriod`.
    var path: String
    /// Every spelling of the flag that overrides it (`--sync-period`, `--iptables-sync-period`).
    var flags: [String]
    /// Sets the option from a checked, defaulted field value.
    var apply: @Sendable (inout ProxyOptions, Any) throws(ConfigError) -> Void
    /// The option's value as the field would hold it (for `--write-config-to`).
    var current: @Sendable (ProxyOptions) -> Any?
}

private func duration(_ path: String, _ v: Any) throws(ConfigError) -> FlagDuration {
    guard let s = v as? String, let d = FlagDuration(s) else {
        if let s = v as? String, let d = signedGoDuration(s), d < .zero {
            throw ConfigError(field: path, value: s, reason: "must be greater than or equal to 0")
        }
        throw ConfigError(field: path, value: "\(v)", reason: "not a duration such as 30s or 1m0s")
    }
    return d
}

/// A duration kube-proxy requires to be positive (a sync period).
private func positiveDuration(_ path: String, _ v: Any) throws(ConfigError) -> FlagDuration {
    let d = try duration(path, v)
    guard d.value > .zero else { throw ConfigError(field: path, value: d.text, reason: "must be greater than 0") }
    return d
}

private func count(_ path: String, _ v: Any) throws(ConfigError) -> Int {
    guard let i = v as? Int, i >= 0 else { throw ConfigError(field: path, value: "\(v)", reason: "must be greater than or equal to 0") }
    return i
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
        if let s = v as? String, !s.trimmingASCIIWhitespace().isEmpty { o.hostnameOverride = s.trimmingASCIIWhitespace() }
    }, current: { $0.hostnameOverride ?? "" }),
    ConfigBinding(path: "bindAddress", flags: ["--bind-address"], apply: { o, v throws(ConfigError) in
        guard let s = v as? String, IPAddress(s) != nil else {
            throw ConfigError(field: "bindAddress", value: "\(v)", reason: "not a valid IP address")
        }
        o.bindAddress = s
    }, current: { $0.bindAddress }),
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
            throw ConfigError(field: "detectLocalMode", value: s, reason: "not ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix")
        }
        o.detectLocalMode = m
    }, current: { $0.detectLocalMode.rawValue }),
    ConfigBinding(path: "detectLocal.bridgeInterface", flags: ["--pod-bridge-interface"], apply: { o, v in
        if let s = v as? String, !s.isEmpty { o.podBridgeInterface = s }
    }, current: { $0.podBridgeInterface ?? "" }),
    ConfigBinding(path: "detectLocal.interfaceNamePrefix", flags: ["--pod-interface-name-prefix"], apply: { o, v in
        if let s = v as? String, !s.isEmpty { o.podInterfaceNamePrefix = s }
    }, current: { $0.podInterfaceNamePrefix ?? "" }),
    ConfigBinding(path: "clientConnection.kubeconfig", flags: ["--kubeconfig"], apply: { o, v in
        if let s = v as? String, !s.isEmpty { o.kubeconfig = s }
    }, current: { $0.kubeconfig ?? "" }),
    ConfigBinding(path: "healthzBindAddress", flags: ["--healthz-bind-address"], apply: { o, v in
        if let s = v as? String { o.healthzBindAddress = s }
    }, current: { $0.healthzBindAddress }),
    ConfigBinding(path: "metricsBindAddress", flags: ["--metrics-bind-address"], apply: { o, v in
        if let s = v as? String { o.metricsBindAddress = s }
    }, current: { $0.metricsBindAddress }),
    ConfigBinding(path: "bindAddressHardFail", flags: ["--bind-address-hard-fail"], apply: { o, v in
        if let b = v as? Bool { o.bindAddressHardFail = b }
    }, current: { $0.bindAddressHardFail }),
    ConfigBinding(path: "oomScoreAdj", flags: ["--oom-score-adj"], apply: { o, v throws(ConfigError) in
        guard let i = v as? Int, (-1000...1000).contains(i) else {
            throw ConfigError(field: "oomScoreAdj", value: "\(v)", reason: "must be within the range [-1000, 1000]")
        }
        o.oomScoreAdj = i
    }, current: { $0.oomScoreAdj }),
    ConfigBinding(path: "logging.verbosity", flags: ["-v", "--v"], apply: { o, v throws(ConfigError) in
        guard let i = v as? Int, i >= 0 else { throw ConfigError(field: "logging.verbosity", value: "\(v)", reason: "must be greater than or equal to 0") }
        o.v = i
    }, current: { $0.v }),
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
        o.syncPeriod = try positiveDuration("iptables.syncPeriod", v)
    }, current: { $0.syncPeriod.text }),
    ConfigBinding(path: "iptables.minSyncPeriod", flags: ["--min-sync-period", "--iptables-min-sync-period"], apply: { o, v throws(ConfigError) in
        o.minSyncPeriod = try duration("iptables.minSyncPeriod", v)
    }, current: { $0.minSyncPeriod.text }),
    ConfigBinding(path: "ipvs.scheduler", flags: ["--ipvs-scheduler"], apply: { o, v in
        if let s = v as? String, !s.isEmpty { o.ipvsScheduler = s }
    }, current: { $0.ipvsScheduler }),
    ConfigBinding(path: "ipvs.syncPeriod", flags: ["--ipvs-sync-period"], apply: { o, v throws(ConfigError) in
        o.ipvsSyncPeriod = try positiveDuration("ipvs.syncPeriod", v)
    }, current: { $0.ipvsSyncPeriod?.text }),
    ConfigBinding(path: "ipvs.minSyncPeriod", flags: ["--ipvs-min-sync-period"], apply: { o, v throws(ConfigError) in
        o.ipvsMinSyncPeriod = try duration("ipvs.minSyncPeriod", v)
    }, current: { $0.ipvsMinSyncPeriod?.text }),
    ConfigBinding(path: "ipvs.excludeCIDRs", flags: ["--ipvs-exclude-cidrs"], apply: { o, v in
        if let l = v as? [String], !l.isEmpty { o.ipvsExcludeCidrs = l.joined(separator: ",") }
    }, current: { o in o.ipvsExcludeCidrs.map { $0.split(separator: ",").map(String.init) } ?? [String]() }),
    ConfigBinding(path: "ipvs.strictARP", flags: ["--ipvs-strict-arp"], apply: { o, v in
        if let b = v as? Bool { o.ipvsStrictArp = b }
    }, current: { $0.ipvsStrictArp }),
    ConfigBinding(path: "ipvs.tcpTimeout", flags: ["--ipvs-tcp-timeout"], apply: { o, v throws(ConfigError) in
        o.ipvsTcpTimeout = try duration("ipvs.tcpTimeout", v)
    }, current: { $0.ipvsTcpTimeout.text }),
    ConfigBinding(path: "ipvs.tcpFinTimeout", flags: ["--ipvs-tcpfin-timeout"], apply: { o, v throws(ConfigError) in
        o.ipvsTcpfinTimeout = try duration("ipvs.tcpFinTimeout", v)
    }, current: { $0.ipvsTcpfinTimeout.text }),
    ConfigBinding(path: "ipvs.udpTimeout", flags: ["--ipvs-udp-timeout"], apply: { o, v throws(ConfigError) in
        o.ipvsUdpTimeout = try duration("ipvs.udpTimeout", v)
    }, current: { $0.ipvsUdpTimeout.text }),
    ConfigBinding(path: "conntrack.maxPerCore", flags: ["--conntrack-max-per-core"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackMaxPerCore = try count("conntrack.maxPerCore", v)
    }, current: { $0.conntrack.conntrackMaxPerCore }),
    ConfigBinding(path: "conntrack.min", flags: ["--conntrack-min"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackMin = try count("conntrack.min", v)
    }, current: { $0.conntrack.conntrackMin }),
    ConfigBinding(path: "conntrack.tcpEstablishedTimeout", flags: ["--conntrack-tcp-timeout-established"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackTCPTimeoutEstablished = try duration("conntrack.tcpEstablishedTimeout", v)
    }, current: { $0.conntrack.conntrackTCPTimeoutEstablished.text }),
    ConfigBinding(path: "conntrack.tcpCloseWaitTimeout", flags: ["--conntrack-tcp-timeout-close-wait"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackTCPTimeoutCloseWait = try duration("conntrack.tcpCloseWaitTimeout", v)
    }, current: { $0.conntrack.conntrackTCPTimeoutCloseWait.text }),
    ConfigBinding(path: "conntrack.tcpBeLiberal", flags: ["--conntrack-tcp-be-liberal"], apply: { o, v in
        if let b = v as? Bool { o.conntrack.conntrackTCPBeLiberal = b }
    }, current: { $0.conntrack.conntrackTCPBeLiberal }),
    ConfigBinding(path: "conntrack.udpTimeout", flags: ["--conntrack-udp-timeout"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackUDPTimeout = try duration("conntrack.udpTimeout", v)
    }, current: { $0.conntrack.conntrackUDPTimeout.text }),
    ConfigBinding(path: "conntrack.udpStreamTimeout", flags: ["--conntrack-udp-timeout-stream"], apply: { o, v throws(ConfigError) in
        o.conntrack.conntrackUDPTimeoutStream = try duration("conntrack.udpStreamTimeout", v)
    }, current: { $0.conntrack.conntrackUDPTimeoutStream.text }),
]

/// A checked configuration file.
struct ConfigDocument {
    /// The fields as the file has them, by dotted path (null fields left out).
    var raw: [String: Any]
    /// Every known field after kube-proxy's defaulting (obsolete fields only when present).
    var effective: [String: Any]
}

/// Loading, checking, defaulting and writing KubeProxyConfiguration files.
enum ConfigFile {
    static let apiVersion = "kubeproxy.config.k8s.io/v1alpha1"
    static let kind = "KubeProxyConfiguration"

    static let fieldsByPath: [String: ConfigField] = Dictionary(uniqueKeysWithValues: kubeProxyConfigurationFields.map { ($0.path, $0) })
    /// Every path that is a nested object (`iptables`, `logging.options`, ...).
    static let objectPaths: Set<String> = {
        var out = Set<String>()
        for f in kubeProxyConfigurationFields {
            let parts = f.path.split(separator: ".")
            for n in parts.indices.dropLast() { out.insert(parts[...n].joined(separator: ".")) }
        }
        return out
    }()

    /// Reads, checks and defaults `path`.
    static func load(_ path: String) throws -> ConfigDocument {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(field: "--config", value: path, reason: "cannot read the file")
        }
        return try parse(String(decoding: data, as: UTF8.self), source: path)
    }

    /// Checks and defaults a KubeProxyConfiguration document.
    static func parse(_ text: String, source: String) throws -> ConfigDocument {
        let tree: Any?
        do {
            tree = try Yams.load(yaml: text)
        } catch {
            throw ConfigError(field: "--config", value: source, reason: "not valid YAML: \(String(describing: error).prefix(200))")
        }
        guard let root = tree as? [String: Any] else {
            throw ConfigError(field: "--config", value: source, reason: "not a KubeProxyConfiguration mapping")
        }
        guard root["apiVersion"] as? String == apiVersion, root["kind"] as? String == kind else {
            throw ConfigError(field: "apiVersion/kind", value: "\(root["apiVersion"] ?? "")/\(root["kind"] ?? "")",
                              reason: "\(source) must be apiVersion \(apiVersion), kind \(kind)")
        }
        var flat: [String: Any] = [:]
        var withoutTypeMeta = root
        withoutTypeMeta["apiVersion"] = nil
        withoutTypeMeta["kind"] = nil
        try check(withoutTypeMeta, prefix: "", into: &flat)
        let effective = defaulted(flat)
        try validateUnbound(effective)
        return ConfigDocument(raw: flat, effective: effective)
    }

    private static func check(_ object: [String: Any], prefix: String, into flat: inout [String: Any]) throws(ConfigError) {
        for key in object.keys.sorted() {
            let value = object[key]!
            let path = prefix.isEmpty ? key : "\(prefix).\(key)"
            func wrong(_ want: String) -> ConfigError {
                ConfigError(field: path, value: Validation.printable("\(value)").prefix(60).description, reason: "expected \(want)")
            }
            if objectPaths.contains(path) {
                if value is NSNull { continue }
                guard let inner = value as? [String: Any] else { throw wrong("a mapping") }
                try check(inner, prefix: path, into: &flat)
                continue
            }
            guard let field = fieldsByPath[path] else {
                throw ConfigError(field: path, value: Validation.printable("\(value)").prefix(60).description,
                                  reason: "unknown field in \(kind)")
            }
            if value is NSNull { continue }
            switch field.shape {
            case .string: guard value is String else { throw wrong("a string") }
            case .int: guard value is Int, !(value is Bool) else { throw wrong("an integer") }
            case .number: guard value is Int || value is Double, !(value is Bool) else { throw wrong("a number") }
            case .bool: guard value is Bool else { throw wrong("true or false") }
            case .duration:
                guard let s = value as? String, signedGoDuration(s) != nil else { throw wrong("a duration such as 30s") }
            case .flushFrequency:
                if let s = value as? String {
                    guard signedGoDuration(s) != nil else { throw wrong("a duration such as 5s, or nanoseconds") }
                } else {
                    guard value is Int, !(value is Bool) else { throw wrong("a duration such as 5s, or nanoseconds") }
                }
            case .quantity: guard value is String || (value is Int && !(value is Bool)) else { throw wrong("a quantity such as 0 or 64Ki") }
            case .strings: guard let l = value as? [Any], l.allSatisfy({ $0 is String }) else { throw wrong("a list of strings") }
            case .list: guard value is [Any] else { throw wrong("a list") }
            case .boolMap:
                guard let m = value as? [String: Any] else { throw wrong("a mapping of feature names to true or false") }
                for (gate, on) in m where !(on is Bool) {
                    throw ConfigError(field: "\(path).\(gate)", value: "\(on)", reason: "expected true or false")
                }
            }
            flat[path] = value
        }
    }

    /// Whether `value` is the zero value of its shape (kube-proxy's "unset").
    static func isZero(_ value: Any?, shape: ConfigShape) -> Bool {
        guard let value, !(value is NSNull) else { return true }
        switch shape {
        case .string: return (value as? String ?? "").isEmpty
        case .int: return value as? Int == 0
        case .number: return (value as? Int) == 0 || (value as? Double) == 0
        case .bool: return value as? Bool == false
        case .duration: return (value as? String).flatMap(signedGoDuration) == .zero
        case .flushFrequency: return value as? Int == 0 || (value as? String).flatMap(signedGoDuration) == .zero
        case .quantity: return value as? Int == 0 || (value as? String).map { $0.isEmpty || $0 == "0" } == true
        case .strings, .list: return (value as? [Any])?.isEmpty ?? true
        case .boolMap: return (value as? [String: Any])?.isEmpty ?? true
        }
    }

    /// Whether two values of a field are the same setting (durations by length: 24h = 24h0m0s).
    static func same(_ a: Any?, _ b: Any?, shape: ConfigShape) -> Bool {
        if isZero(a, shape: shape) && isZero(b, shape: shape) { return true }
        guard let a, let b else { return false }
        switch shape {
        case .duration, .flushFrequency:
            func nanos(_ v: Any) -> Duration? { (v as? String).flatMap(signedGoDuration) ?? (v as? Int).map { .nanoseconds($0) } }
            return nanos(a) != nil && nanos(a) == nanos(b)
        case .number:
            func d(_ v: Any) -> Double? { (v as? Double) ?? (v as? Int).map(Double.init) }
            return d(a) != nil && d(a) == d(b)
        default:
            return "\(a)" == "\(b)"
        }
    }

    /// kube-proxy's default of a field, or nil when it has none (its zero value stands).
    static func defaultValue(of field: ConfigField, bindAddress: String) -> Any? {
        switch field.path {
        case "healthzBindAddress":
            return (IPAddress(bindAddress)?.family == .ipv6 ? "[::]" : "0.0.0.0") + ":\(proxyHealthzPort)"
        case "metricsBindAddress":
            return (IPAddress(bindAddress)?.family == .ipv6 ? "[::1]" : "127.0.0.1") + ":\(proxyMetricsPort)"
        default:
            switch field.defaulting {
            case .none: return nil
            case .whenZero(let d), .whenNull(let d): return d.any
            }
        }
    }

    /// Applies kube-proxy's defaulting to the fields of a file: every known field gets a value.
    static func defaulted(_ fields: [String: Any]) -> [String: Any] {
        var out: [String: Any] = [:]
        let bindAddress = (fields["bindAddress"] as? String).flatMap { $0.isEmpty ? nil : $0 } ?? "0.0.0.0"
        for field in kubeProxyConfigurationFields {
            let v = fields[field.path]
            if field.obsolete {
                if let v { out[field.path] = v }
                continue
            }
            switch field.path {
            case "healthzBindAddress", "metricsBindAddress":
                let port = field.path == "healthzBindAddress" ? proxyHealthzPort : proxyMetricsPort
                if let s = v as? String, !s.isEmpty {
                    out[field.path] = appendPortIfNeeded(s, port: port)
                } else {
                    out[field.path] = defaultValue(of: field, bindAddress: bindAddress)
                }
                continue
            default: break
            }
            switch field.defaulting {
            case .none:
                out[field.path] = v ?? zeroValue(field.shape)
            case .whenZero(let d):
                out[field.path] = isZero(v, shape: field.shape) ? d.any : v
            case .whenNull(let d):
                out[field.path] = v ?? d.any
            }
        }
        return out
    }

    /// kube-proxy's AppendPortIfNeeded: a bare IP gets the default port.
    static func appendPortIfNeeded(_ address: String, port: Int) -> String {
        guard let ip = IPAddress(address) else { return address }
        return ip.joined(port: port)
    }

    private static func zeroValue(_ shape: ConfigShape) -> Any {
        switch shape {
        case .string: return ""
        case .int, .flushFrequency: return 0
        case .number: return 0.0
        case .bool: return false
        case .duration: return "0s"
        case .quantity: return "0"
        case .strings, .list: return [Any]()
        case .boolMap: return [String: Any]()
        }
    }

    /// The checks kube-proxy makes of fields Sluice does not act on.
    private static func validateUnbound(_ e: [String: Any]) throws(ConfigError) {
        if let s = e["configSyncPeriod"] as? String, let d = signedGoDuration(s), d <= .zero {
            throw ConfigError(field: "configSyncPeriod", value: s, reason: "must be greater than 0")
        }
        if let b = e["clientConnection.burst"] as? Int, b < 0 {
            throw ConfigError(field: "clientConnection.burst", value: "\(b)", reason: "must be greater than or equal to 0")
        }
        if let f = e["logging.format"] as? String, !["text", "json"].contains(f) {
            throw ConfigError(field: "logging.format", value: f, reason: "unsupported log format (text or json)")
        }
        for (key, value) in e where key.hasSuffix("SyncPeriod") || key.hasSuffix("syncPeriod") || key.hasPrefix("conntrack.") || key.hasPrefix("ipvs.") {
            if fieldsByPath[key]?.shape == .duration, let s = value as? String, let d = signedGoDuration(s), d < .zero {
                throw ConfigError(field: key, value: s, reason: "must be greater than or equal to 0")
            }
        }
    }

    /// The flags present on a command line (`--name`, `--name=value`, and `-v`).
    static func explicitFlags(_ arguments: [String]) -> Set<String> {
        var out = Set<String>()
        for a in arguments {
            if a.hasPrefix("--") {
                out.insert(String(a.split(separator: "=", maxSplits: 1).first ?? Substring(a)))
            } else if a.hasPrefix("-v") {
                out.insert("-v")
            }
        }
        return out
    }

    /// Sets every option the file holds and the command line does not.
    /// - Returns: one line per field Sluice does not act on that the file sets to something
    ///   other than kube-proxy's default (`name=value`), for the start-up log.
    @discardableResult
    static func apply(_ document: ConfigDocument, to options: inout ProxyOptions, explicit: Set<String>) throws -> [String] {
        var used = Set<String>()
        for b in configBindings {
            used.insert(b.path)
            guard let v = document.effective[b.path] else { continue }
            if b.flags.contains(where: explicit.contains) { continue }
            try b.apply(&options, v)
        }
        let bindAddress = document.effective["bindAddress"] as? String ?? "0.0.0.0"
        var notes: [String] = []
        for field in kubeProxyConfigurationFields where !used.contains(field.path) {
            guard let v = document.raw[field.path] else { continue }
            if field.obsolete {
                notes.append("\(field.path)=\(describe(v)) (no longer a kube-proxy field)")
                continue
            }
            if field.shape == .boolMap, let gates = v as? [String: Any] {
                notes += gates.keys.sorted().map { "\(field.path).\($0)=\(gates[$0]!)" }
                continue
            }
            if same(v, defaultValue(of: field, bindAddress: bindAddress), shape: field.shape) || isZero(v, shape: field.shape) { continue }
            notes.append("\(field.path)=\(describe(v))")
        }
        return notes
    }

    private static func describe(_ v: Any) -> String {
        if let l = v as? [Any] { return "[" + l.map { "\($0)" }.joined(separator: ",") + "]" }
        return Validation.printable("\(v)").prefix(80).description
    }

    /// The effective configuration as a KubeProxyConfiguration document: kube-proxy's defaulted
    /// fields, the file's values for fields Sluice does not act on, and the options' values.
    static func render(_ options: ProxyOptions, document: ConfigDocument? = nil) throws -> String {
        return try Yams.dump(object: tree(options, document: document), sortKeys: true)
    }

    /// The effective configuration as a nested mapping (`render` writes it as YAML).
    static func tree(_ options: ProxyOptions, document: ConfigDocument?) -> [String: Any] {
        var flat = document?.effective ?? defaulted([:])
        for f in kubeProxyConfigurationFields where f.obsolete { flat[f.path] = nil }
        for b in configBindings {
            if let v = b.current(options) { flat[b.path] = v }
        }
        var root: [String: Any] = ["apiVersion": apiVersion, "kind": kind]
        for (path, value) in flat {
            insert(value, at: path.split(separator: ".").map(String.init)[...], into: &root)
        }
        return root
    }

    /// The effective configuration as compact JSON with sorted keys (for `/configz`).
    static func json(_ options: ProxyOptions, document: ConfigDocument?) -> String? {
        var root = tree(options, document: document)
        root["apiVersion"] = nil
        root["kind"] = nil
        guard let data = try? JSONSerialization.data(withJSONObject: root, options: [.sortedKeys]) else { return nil }
        return String(decoding: data, as: UTF8.self)
    }

    private static func insert(_ value: Any, at path: ArraySlice<String>, into object: inout [String: Any]) {
        guard let head = path.first else { return }
        if path.count == 1 { object[head] = value; return }
        var inner = object[head] as? [String: Any] ?? [:]
        insert(value, at: path.dropFirst(), into: &inner)
        object[head] = inner
    }
}

extension ProxyOptions {
    /// The options with `--config` applied under the command-line flags, checked again.
    func resolved(arguments: [String] = CommandLine.arguments) throws -> ProxyOptions {
        try resolvedConfiguration(arguments: arguments).options
    }

    /// The options with `--config` applied, the checked file, and the file's fields Sluice
    /// does not act on (for the start-up log).
    func resolvedConfiguration(arguments: [String] = CommandLine.arguments) throws
        -> (options: ProxyOptions, document: ConfigDocument?, unhonoured: [String]) {
        var out = self
        let explicit = ConfigFile.explicitFlags(arguments)
        var document: ConfigDocument?
        var notes: [String] = []
        if let path = config {
            do {
                let loaded = try ConfigFile.load(path)
                notes = try ConfigFile.apply(loaded, to: &out, explicit: explicit)
                document = loaded
            } catch let e as ConfigError {
                throw SluiceExit("config \(path): \(e.description)")
            } catch {
                throw SluiceExit("config \(path): \(error)")
            }
        }
        // An IPv6 bind address moves the default listeners to IPv6, as kube-proxy's defaulting
        // does, unless the flag or the file names them.
        if IPAddress(out.bindAddress)?.family == .ipv6 {
            func named(_ flag: String, _ field: String) -> Bool {
                explicit.contains(flag) || !((document?.raw[field] as? String) ?? "").isEmpty
            }
            if !named("--healthz-bind-address", "healthzBindAddress"), out.healthzBindAddress == HealthServer.defaultAddress {
                out.healthzBindAddress = "[::]:\(proxyHealthzPort)"
            }
            if !named("--metrics-bind-address", "metricsBindAddress"), out.metricsBindAddress == MetricsServer.defaultAddress {
                out.metricsBindAddress = "[::1]:\(proxyMetricsPort)"
            }
        }
        do {
            try out.validate()
        } catch {
            throw SluiceExit(config.map { "config \($0): \(error)" } ?? "\(error)")
        }
        return (out, document, notes)
    }
}

/// Logs, once at start-up, each field of the configuration file that Sluice does not act on.
func reportUnhonouredFields(_ fields: [String], path: String?, logger: Logger) {
    guard let path else { return }
    for f in fields {
        logger.warning("config \(path): \(f) is accepted but not acted on by Sluice")
    }
}

/// Ends the process when the configuration file changes, as kube-proxy does: the supervisor
/// (the kubelet for a DaemonSet) starts it again with the new content. The file is read every
/// `interval`, through symbolic links, so a ConfigMap volume's atomic swap is seen as well.
struct ConfigFileWatch: ServiceLifecycle.Service {
    let path: String
    let logger: Logger
    var interval: Duration = .seconds(2)

    func run() async throws {
        let initial = FileManager.default.contents(atPath: path)
        let (path, logger, interval) = (self.path, self.logger, self.interval)
        try await untilShutdown {
            while !Task.isCancelled {
                try await Task.sleep(for: interval)
                let now = FileManager.default.contents(atPath: path)
                guard now != initial else { continue }
                let what = now == nil ? "was removed" : "changed"
                logger.error("the configuration file \(path) \(what); exiting so that sluice is restarted with it (as kube-proxy does)")
                throw SluiceExit("the configuration file \(path) \(what)")
            }
        }
    }
}
