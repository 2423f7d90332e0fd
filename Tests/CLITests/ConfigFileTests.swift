// The executable's configuration surface, driven through the real binary: --config with a
// KubeProxyConfiguration, flag precedence, unknown fields and bad values, --write-config-to,
// --version, and one-line fatal errors.

import Foundation
import SluiceTesting
import Testing

/// The sluice binary: `$SLUICE_BIN`, else `.build/debug/sluice` under the package root.
func sluiceBinary(filePath: String = #filePath) -> String {
    if let env = ProcessInfo.processInfo.environment["SLUICE_BIN"], !env.isEmpty { return env }
    return (TestBed.findPackageRoot(from: filePath) ?? ".") + "/.build/debug/sluice"
}

func sluice(_ args: [String]) async -> CommandOutput {
    await Subprocess.run([sluiceBinary()] + args, timeout: .seconds(30))
}

/// A scratch directory removed when the returned closure runs.
func scratch() throws -> (String, () -> Void) {
    let dir = NSTemporaryDirectory() + "sluice-cli-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return (dir, { try? FileManager.default.removeItem(atPath: dir) })
}

private let header = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"

@Suite struct ConfigFileTests {
    @Test func fileValuesApplyAndFlagsOverrideThem() async throws {
        let (dir, done) = try scratch()
        defer { done() }
        try (header + """
            mode: iptables
            clusterCIDR: 10.244.0.0/16
            metricsBindAddress: 127.0.0.1:20249
            nodePortAddresses: [192.168.0.0/16]
            iptables: {masqueradeBit: 15, syncPeriod: 45s, minSyncPeriod: 2s, masqueradeAll: true}
            conntrack: {maxPerCore: 32768, tcpEstablishedTimeout: 24h0m0s}
            featureGates: {SomeGate: true}
            """).write(toFile: "\(dir)/in.yaml", atomically: true, encoding: .utf8)
        let r = await sluice(["--config", "\(dir)/in.yaml", "--min-sync-period", "3s", "--write-config-to", "\(dir)/out.yaml"])
        #expect(r.succeeded, "\(r)")
        let out = try String(contentsOfFile: "\(dir)/out.yaml", encoding: .utf8)
        #expect(out.contains("masqueradeBit: 15"))
        #expect(out.contains("syncPeriod: 45s"))
        #expect(out.contains("minSyncPeriod: 3s"))  // the flag wins over the file's 2s
        #expect(out.contains("masqueradeAll: true"))
        #expect(out.contains("clusterCIDR: 10.244.0.0/16"))
        #expect(out.contains("metricsBindAddress: 127.0.0.1:20249"))
        #expect(out.contains("- 192.168.0.0/16"))

        // Round trip: the written file reads back to the same configuration.
        let again = await sluice(["--config", "\(dir)/out.yaml", "--write-config-to", "\(dir)/again.yaml"])
        #expect(again.succeeded, "\(again)")
        #expect(try String(contentsOfFile: "\(dir)/again.yaml", encoding: .utf8) == out)
    }

    @Test(arguments: [
        ("iptables:\n  syncPeriodz: 30s\n", "iptables.syncPeriodz", "unknown field"),
        ("bogus: 1\n", "bogus", "unknown field"),
        ("iptables:\n  masqueradeBit: 40\n", "iptables.masqueradeBit", "not in 0-31"),
        ("iptables:\n  syncPeriod: soon\n", "iptables.syncPeriod", "duration"),
        ("mode: kernelspace\n", "mode", "not iptables, ipvs, userspace or nftables"),
        ("iptables:\n  masqueradeAll: maybe\n", "iptables.masqueradeAll", "true or false"),
        ("nodePortAddresses: 10.0.0.0/8\n", "nodePortAddresses", "list of strings"),
        ("iptables:\n  syncPeriod: 1s\n  minSyncPeriod: 5s\n", "--min-sync-period", "longer than"),
    ])
    func badFilesAreOneLineErrorsNamingTheField(body: String, field: String, reason: String) async throws {
        let (dir, done) = try scratch()
        defer { done() }
        try (header + body).write(toFile: "\(dir)/bad.yaml", atomically: true, encoding: .utf8)
        let r = await sluice(["--config", "\(dir)/bad.yaml", "--write-config-to", "\(dir)/out.yaml"])
        #expect(r.status != 0)
        let errorLines = r.stderr.split(separator: "\n").filter { $0.hasPrefix("Error:") }
        #expect(errorLines.count == 1, "\(r.stderr)")
        #expect(errorLines.first?.contains(field) == true, "\(r.stderr)")
        #expect(errorLines.first?.contains(reason) == true, "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: "\(dir)/out.yaml"))
    }

    @Test func wrongKindAndMissingFileAreRejected() async throws {
        let (dir, done) = try scratch()
        defer { done() }
        try "apiVersion: v1\nkind: ConfigMap\n".write(toFile: "\(dir)/cm.yaml", atomically: true, encoding: .utf8)
        let r = await sluice(["--config", "\(dir)/cm.yaml", "--write-config-to", "/dev/null"])
        #expect(r.status != 0 && r.stderr.contains("KubeProxyConfiguration"))
        let missing = await sluice(["--config", "\(dir)/nope.yaml", "--write-config-to", "/dev/null"])
        #expect(missing.status != 0 && missing.stderr.contains("nope.yaml"))
    }

    @Test func versionAndBadFlagsAreClear() async {
        let v = await sluice(["--version"])
        #expect(v.succeeded && !v.stdout.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
        let bad = await sluice(["--iptables-masquerade-bit", "99", "--manifests", "/nonexistent"])
        #expect(bad.status != 0 && bad.stderr.contains("--iptables-masquerade-bit 99"))
        let dir = await sluice(["compile", "--manifests", "/nonexistent/sluice"])
        #expect(dir.status != 0)
        #expect(dir.stderr.split(separator: "\n").filter { $0.hasPrefix("Error:") }.count == 1, "\(dir.stderr)")
    }
}
