// Real kube-proxy ConfigMaps through the real binary: kubeadm's (every field, zero or null
// where kube-proxy's defaulting decides), a kind-style patch of it, a minimal hand-written
// one and a chart-style one. Sluice must accept each as it is and arrive at the values
// kube-proxy's defaulting gives; fields it does not act on are reported by name and value.

import Foundation
import SluiceTesting
import Testing
import Yams

/// The KubeProxyConfiguration text of a ConfigMap under Tests/CLITests/Fixtures.
func kubeProxyConfig(fixture: String, filePath: String = #filePath) throws -> String {
    let dir = (filePath as NSString).deletingLastPathComponent
    let text = try String(contentsOfFile: "\(dir)/Fixtures/\(fixture)", encoding: .utf8)
    let cm = try #require(try Yams.load(yaml: text) as? [String: Any])
    let data = try #require(cm["data"] as? [String: String])
    return try #require(data["config.conf"] ?? data["config.yaml"])
}

/// Runs `sluice --config` on `config` (plus `extra` flags) with --write-config-to and returns
/// the effective configuration as a nested mapping, and the run's stderr.
func effectiveConfig(_ config: String, extra: [String] = []) async throws -> ([String: Any], String) {
    let (dir, done) = try scratch()
    defer { done() }
    try config.write(toFile: "\(dir)/config.conf", atomically: true, encoding: .utf8)
    let r = await sluice(["--config", "\(dir)/config.conf", "--write-config-to", "\(dir)/out.yaml"] + extra)
    #expect(r.succeeded, "\(r)")
    let out = try String(contentsOfFile: "\(dir)/out.yaml", encoding: .utf8)
    return (try #require(try Yams.load(yaml: out) as? [String: Any]), r.stderr)
}

/// A value at a dotted path.
func field(_ tree: [String: Any], _ path: String) -> Any? {
    var cur: Any? = tree
    for key in path.split(separator: ".") { cur = (cur as? [String: Any])?[String(key)] }
    return cur
}

/// The fields of kube-proxy's defaulting that do not depend on the file (defaults.go and
/// the Linux platform defaults).
let kubeProxyDefaults: [(String, String)] = [
    ("bindAddress", "0.0.0.0"),
    ("healthzBindAddress", "0.0.0.0:10256"),
    ("metricsBindAddress", "127.0.0.1:10249"),
    ("oomScoreAdj", "-999"),
    ("iptables.masqueradeBit", "14"),
    ("iptables.localhostNodePorts", "true"),
    ("iptables.syncPeriod", "30s"),
    ("iptables.minSyncPeriod", "1s"),
    ("ipvs.syncPeriod", "30s"),
    ("nftables.masqueradeBit", "14"),
    ("nftables.syncPeriod", "30s"),
    ("nftables.minSyncPeriod", "1s"),
    ("conntrack.maxPerCore", "32768"),
    ("conntrack.min", "131072"),
    ("conntrack.tcpEstablishedTimeout", "24h0m0s"),
    ("conntrack.tcpCloseWaitTimeout", "1h0m0s"),
    ("conntrack.udpTimeout", "0s"),
    ("conntrack.udpStreamTimeout", "0s"),
    ("configSyncPeriod", "15m0s"),
    ("clientConnection.contentType", "application/vnd.kubernetes.protobuf"),
    ("clientConnection.qps", "5.0"),
    ("clientConnection.burst", "10"),
    ("logging.format", "text"),
    ("logging.flushFrequency", "5s"),
    ("mode", "iptables"),
    ("detectLocalMode", "ClusterCIDR"),
]

@Suite struct KubeProxyConfigMapTests {
    @Test func kubeadmsConfigMapGetsKubeProxysDefaults() async throws {
        let (eff, stderr) = try await effectiveConfig(try kubeProxyConfig(fixture: "kubeadm-v1.34-kube-proxy.yaml"))
        for (path, want) in kubeProxyDefaults {
            #expect(field(eff, path).map { "\($0)" } == want, "\(path)")
        }
        #expect(field(eff, "clusterCIDR") as? String == "10.244.0.0/16")
        #expect(field(eff, "clientConnection.kubeconfig") as? String == "/var/lib/kube-proxy/kubeconfig.conf")
        #expect(field(eff, "ipvs.minSyncPeriod") as? String == "0s", "kube-proxy does not default ipvs.minSyncPeriod")
        // Every field kubeadm wrote is zero or null: nothing to report as not acted on.
        #expect(!stderr.contains("not acted on"), "\(stderr)")
    }

    @Test func kindsPatchKeepsItsValues() async throws {
        let (eff, _) = try await effectiveConfig(try kubeProxyConfig(fixture: "kind-kube-proxy.yaml"))
        #expect(field(eff, "conntrack.maxPerCore") as? Int == 0, "0 is a value (leave nf_conntrack_max), not unset")
        #expect(field(eff, "conntrack.min") as? Int == 131072)
        #expect(field(eff, "iptables.minSyncPeriod") as? String == "1s")
        #expect(field(eff, "iptables.syncPeriod") as? String == "30s")
        #expect(field(eff, "clusterCIDR") as? String == "10.244.0.0/16,fd00:10:244::/56")
    }

    @Test func aMinimalConfigIsCompletedWithTheDefaults() async throws {
        let (eff, stderr) = try await effectiveConfig(try kubeProxyConfig(fixture: "minimal-kube-proxy.yaml"))
        for (path, want) in kubeProxyDefaults {
            #expect(field(eff, path).map { "\($0)" } == want, "\(path)")
        }
        #expect(field(eff, "clusterCIDR") as? String == "10.42.0.0/16")
        #expect(!stderr.contains("not acted on"), "\(stderr)")
    }

    @Test func aChartsConfigKeepsItsValuesAndReportsWhatSluiceIgnores() async throws {
        let (eff, stderr) = try await effectiveConfig(try kubeProxyConfig(fixture: "chart-kube-proxy.yaml"))
        #expect(field(eff, "mode") as? String == "ipvs")
        #expect(field(eff, "ipvs.scheduler") as? String == "lc")
        #expect(field(eff, "ipvs.strictARP") as? Bool == true)
        #expect(field(eff, "metricsBindAddress") as? String == "0.0.0.0:10249", "a bare IP gets the default port")
        #expect(field(eff, "conntrack.maxPerCore") as? Int == 524288)
        #expect(field(eff, "conntrack.tcpEstablishedTimeout") as? String == "2h")
        #expect(field(eff, "conntrack.tcpCloseWaitTimeout") as? String == "1h0m0s")
        #expect(field(eff, "clientConnection.qps").map { "\($0)" } == "50")
        #expect(field(eff, "featureGates.TopologyAwareHints") as? Bool == true)
        // Reported once each, by name and value; a default-valued field is not reported.
        for note in ["clientConnection.qps=50", "clientConnection.burst=100", "featureGates.TopologyAwareHints=true", "udpIdleTimeout=250ms"] {
            #expect(stderr.components(separatedBy: note).count == 2, "\(note) in \(stderr)")
        }
        #expect(!stderr.contains("configSyncPeriod="), "15m0s is kube-proxy's default: \(stderr)")
    }

    @Test func anIPv6BindAddressMovesTheDefaultListeners() async throws {
        let (eff, _) = try await effectiveConfig("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAddress: \"::\"\n")
        #expect(field(eff, "healthzBindAddress") as? String == "[::]:10256")
        #expect(field(eff, "metricsBindAddress") as? String == "[::1]:10249")
    }

    @Test func anIPv6BindAddressFlagMovesTheDefaultListenersButNotNamedOnes() async throws {
        let (dir, done) = try scratch()
        defer { done() }
        let r = await sluice(["--bind-address", "::", "--write-config-to", "\(dir)/out.yaml"])
        #expect(r.succeeded, "\(r)")
        let eff = try #require(try Yams.load(yaml: try String(contentsOfFile: "\(dir)/out.yaml", encoding: .utf8)) as? [String: Any])
        #expect(field(eff, "healthzBindAddress") as? String == "[::]:10256")
        #expect(field(eff, "metricsBindAddress") as? String == "[::1]:10249")
        let named = await sluice(["--bind-address", "::", "--healthz-bind-address", "0.0.0.0:10256", "--write-config-to", "\(dir)/named.yaml"])
        #expect(named.succeeded, "\(named)")
        let eff2 = try #require(try Yams.load(yaml: try String(contentsOfFile: "\(dir)/named.yaml", encoding: .utf8)) as? [String: Any])
        #expect(field(eff2, "healthzBindAddress") as? String == "0.0.0.0:10256")
        #expect(field(eff2, "metricsBindAddress") as? String == "[::1]:10249")
    }

    @Test func flagsStillOverrideTheDefaultedFile() async throws {
        let (eff, _) = try await effectiveConfig(try kubeProxyConfig(fixture: "kubeadm-v1.34-kube-proxy.yaml"),
                                                 extra: ["--hostname-override=node-a", "--sync-period", "45s", "--conntrack-max-per-core", "0"])
        #expect(field(eff, "hostnameOverride") as? String == "node-a")
        #expect(field(eff, "iptables.syncPeriod") as? String == "45s")
        #expect(field(eff, "conntrack.maxPerCore") as? Int == 0)
    }

    @Test(arguments: [
        ("oomScoreAdj: 2000\n", "oomScoreAdj", "[-1000, 1000]"),
        ("configSyncPeriod: -1s\n", "configSyncPeriod", "greater than 0"),
        ("iptables:\n  syncPeriod: -5s\n", "iptables.syncPeriod", "greater than or equal to 0"),
        ("conntrack:\n  maxPerCore: -1\n", "conntrack.maxPerCore", "greater than or equal to 0"),
        ("conntrack:\n  udpTimeout: -1s\n", "conntrack.udpTimeout", "greater than or equal to 0"),
        ("clientConnection:\n  burst: -3\n", "clientConnection.burst", "greater than or equal to 0"),
        ("logging:\n  format: xml\n", "logging.format", "unsupported log format"),
        ("bindAddress: not-an-ip\n", "bindAddress", "not a valid IP"),
        ("detectLocalMode: Magic\n", "detectLocalMode", "not ClusterCIDR"),
        ("detectLocalMode: BridgeInterface\n", "BridgeInterface", "--pod-bridge-interface"),
        ("featureGates:\n  Foo: maybe\n", "featureGates.Foo", "true or false"),
        ("winkernel:\n  bogus: 1\n", "winkernel.bogus", "unknown field"),
        ("logging:\n  options:\n    yaml: {}\n", "logging.options.yaml", "unknown field"),
    ])
    func valuesKubeProxyRefusesAreRefusedByName(body: String, name: String, reason: String) async throws {
        let (dir, done) = try scratch()
        defer { done() }
        try ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n" + body)
            .write(toFile: "\(dir)/bad.yaml", atomically: true, encoding: .utf8)
        let r = await sluice(["--config", "\(dir)/bad.yaml", "--write-config-to", "\(dir)/out.yaml"])
        #expect(r.status != 0)
        let errorLine = r.stderr.split(separator: "\n").first { $0.hasPrefix("Error:") }.map(String.init) ?? ""
        #expect(errorLine.contains(name) && errorLine.contains(reason), "\(r.stderr)")
    }
}
