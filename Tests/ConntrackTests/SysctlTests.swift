// The conntrack sysctls against a scratch directory: what is written, when, and the
// messages for what the host refuses.

@testable import Conntrack
import Foundation
import Testing

@Suite struct SysctlTests {
    /// A fake /proc/sys/net/netfilter plus hashsize file, with kernel-like defaults.
    private func scratch(max: Int = 65536, hashsize: Int = 16384) throws -> (ConntrackSysctls, String) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-sysctl-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir + "/proc", withIntermediateDirectories: true)
        let values = ["nf_conntrack_max": max, "nf_conntrack_tcp_timeout_established": 432000,
                      "nf_conntrack_tcp_timeout_close_wait": 60, "nf_conntrack_udp_timeout": 30,
                      "nf_conntrack_udp_timeout_stream": 120]
        for (k, v) in values { try "\(v)\n".write(toFile: "\(dir)/proc/\(k)", atomically: false, encoding: .utf8) }
        try "\(hashsize)\n".write(toFile: "\(dir)/hashsize", atomically: false, encoding: .utf8)
        return (ConntrackSysctls(procDirectory: dir + "/proc", hashsizePath: dir + "/hashsize", cpuCount: 4), dir)
    }

    private func value(_ dir: String, _ name: String) -> String? {
        (try? String(contentsOfFile: "\(dir)/\(name)", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test func desiredLimit() throws {
        let s = ConntrackSysctls(cpuCount: 4)
        #expect(s.desiredMax(.init()) == nil)
        #expect(s.desiredMax(.init(maxPerCore: 32768, min: 131072)) == 131072)
        #expect(s.desiredMax(.init(maxPerCore: 65536, min: 131072)) == 262144)
        #expect(s.desiredMax(.init(maxPerCore: 0, min: 131072)) == nil, "0 leaves the limit alone, as in kube-proxy")
        #expect(s.desiredMax(.init(min: 200000)) == 200000)
    }

    @Test func nothingGivenNothingTouched() throws {
        let (s, dir) = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(s.apply(.init()).isEmpty)
    }

    @Test func writesOnlyWhatDiffers() throws {
        let (s, dir) = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let outcomes = s.apply(.init(maxPerCore: 65536, min: 131072, tcpEstablishedTimeout: .seconds(86400),
                                     tcpCloseWaitTimeout: .seconds(60), udpTimeout: .seconds(45), udpStreamTimeout: .zero))
        #expect(outcomes == [
            .changed(name: "net.netfilter.nf_conntrack_max", from: 65536, to: 262144),
            .changed(name: "nf_conntrack hashsize", from: 16384, to: 65536),
            .changed(name: "net.netfilter.nf_conntrack_tcp_timeout_established", from: 432000, to: 86400),
            .unchanged(name: "net.netfilter.nf_conntrack_tcp_timeout_close_wait", value: 60),
            .changed(name: "net.netfilter.nf_conntrack_udp_timeout", from: 30, to: 45),
        ], "a zero timeout is left alone")
        #expect(value(dir, "proc/nf_conntrack_max") == "262144")
        #expect(value(dir, "hashsize") == "65536")
        #expect(value(dir, "proc/nf_conntrack_udp_timeout") == "45")
        #expect(value(dir, "proc/nf_conntrack_udp_timeout_stream") == "120")
        // A second start with the same flags writes nothing.
        #expect(s.apply(.init(maxPerCore: 65536, min: 131072, udpTimeout: .seconds(45))).allSatisfy {
            if case .unchanged = $0 { return true } else { return false }
        })
    }

    @Test func aLargerHashIsKept() throws {
        let (s, dir) = try scratch(max: 262144, hashsize: 262144)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(s.apply(.init(maxPerCore: 65536)) == [.unchanged(name: "net.netfilter.nf_conntrack_max", value: 262144)])
        #expect(value(dir, "hashsize") == "262144")
    }

    @Test func hostOnlySettingsSaySo() {
        let s = ConntrackSysctls(cpuCount: 1)
        #expect(s.hint(EACCES, name: "net.netfilter.nf_conntrack_max").contains("only the host's network namespace"))
        #expect(s.hint(EOPNOTSUPP, name: "nf_conntrack hashsize").contains("only the host's network namespace"))
        #expect(s.hint(EACCES, name: "net.netfilter.nf_conntrack_udp_timeout").contains("needs root"))
        #expect(s.hint(EROFS, name: "net.netfilter.nf_conntrack_udp_timeout").contains("read-only"))
    }

    @Test func refusalsSayWhy() throws {
        let (s, dir) = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // No such setting (the module is missing): ENOENT with a hint.
        try FileManager.default.removeItem(atPath: "\(dir)/proc/nf_conntrack_udp_timeout_stream")
        // A directory where the file should be makes the write fail (EISDIR) even for root.
        try FileManager.default.removeItem(atPath: "\(dir)/proc/nf_conntrack_udp_timeout")
        try FileManager.default.createDirectory(atPath: "\(dir)/proc/nf_conntrack_udp_timeout", withIntermediateDirectories: false)
        let outcomes = s.apply(.init(udpTimeout: .seconds(45), udpStreamTimeout: .seconds(90)))
        #expect(outcomes.count == 2)
        guard case .failed(let name, let wanted, _, let e, _) = outcomes[0] else {
            Issue.record("expected a failure: \(outcomes)")
            return
        }
        #expect(name == "net.netfilter.nf_conntrack_udp_timeout" && wanted == 45 && e != 0)
        guard case .failed(_, _, nil, let e2, let hint) = outcomes[1] else {
            Issue.record("expected a failure: \(outcomes)")
            return
        }
        #expect(e2 == ENOENT)
        #expect(hint.contains("nf_conntrack module"))
        #expect(outcomes[1].description.hasPrefix("cannot set net.netfilter.nf_conntrack_udp_timeout_stream to 90: No such file or directory;"))
    }

    @Test func kubeProxysDefaultsAndLiberalModeInKubeProxysOrder() throws {
        let (s, dir) = try scratch(max: 65536, hashsize: 16384)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "0\n".write(toFile: "\(dir)/proc/nf_conntrack_tcp_be_liberal", atomically: false, encoding: .utf8)
        // kube-proxy's defaults on 4 CPUs, with tcpBeLiberal: the limit, the hash size, the TCP
        // timeouts, liberal mode; UDP timeouts of 0 are left alone.
        let defaults = ConntrackSysctlSettings(maxPerCore: 32768, min: 131072, tcpEstablishedTimeout: .seconds(86400),
                                               tcpCloseWaitTimeout: .seconds(3600), tcpBeLiberal: true)
        #expect(s.apply(defaults) == [
            .changed(name: "net.netfilter.nf_conntrack_max", from: 65536, to: 131072),
            .changed(name: "nf_conntrack hashsize", from: 16384, to: 32768),
            .changed(name: "net.netfilter.nf_conntrack_tcp_timeout_established", from: 432000, to: 86400),
            .changed(name: "net.netfilter.nf_conntrack_tcp_timeout_close_wait", from: 60, to: 3600),
            .changed(name: "net.netfilter.nf_conntrack_tcp_be_liberal", from: 0, to: 1),
        ])
        #expect(value(dir, "proc/nf_conntrack_tcp_be_liberal") == "1")
        // The second start writes nothing.
        #expect(s.apply(defaults).allSatisfy { if case .unchanged = $0 { return true } else { return false } })
        // Without tcpBeLiberal the setting is left as it is (kube-proxy never writes 0).
        #expect(!s.apply(ConntrackSysctlSettings(tcpEstablishedTimeout: .seconds(86400))).contains {
            $0.description.contains("be_liberal")
        })
    }
}
