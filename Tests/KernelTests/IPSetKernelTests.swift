// The IPVS mode's ipsets through libipset on the host kernel (ip_set is enough, IPVS is not
// needed), in a network namespace of their own: ipset-probe lists, creates kube-proxy's 17
// IPv4 sets, fills them with the members of S Services of the benchmark's mixed fixture,
// reads every set back (exit status 2 if one differs from what was written) and destroys them.

import Foundation
import SluiceTesting
import Testing

@Suite struct IPSetKernelTests {
    /// `.build/<config>/ipset-probe`, next to the sluice binary.
    static var probe: String? {
        var candidates: [String] = []
        if let bin = ProcessInfo.processInfo.environment["SLUICE_BIN"], !bin.isEmpty {
            candidates.append(URL(fileURLWithPath: bin).deletingLastPathComponent().appendingPathComponent("ipset-probe").path)
        }
        if let root = TestBed.findPackageRoot(from: #filePath) {
            candidates.append(root + "/.build/debug/ipset-probe")
        }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    @Test(.enabled("needs root") { isRoot })
    func kubeProxysSetsAreCreatedFilledReadBackAndDestroyed() async throws {
        let probe = try #require(Self.probe, "ipset-probe not built: run swift build")
        let services = 600
        try await TestNamespace.with(label: "ipset") { ns in
            let out = try await ns.exec(checked: [probe, "--services", "\(services)"], timeout: .seconds(120)).stdout
            let json = try #require(try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any], "\(out)")
            // ClusterIP + its address for every Service; a node port for NodePorts and
            // LoadBalancers (8 in 20); the ingress IP in two sets for LoadBalancers (3 in 20).
            let nodePorts = (0..<services).filter { $0 % 20 < 8 }.count
            let balancers = (0..<services).filter { $0 % 20 >= 5 && $0 % 20 < 8 }.count
            #expect(json["entries"] as? Int == 2 * services + nodePorts + 2 * balancers)
            #expect(json["services"] as? Int == services)
            let left = try await ns.exec(checked: ["ipset", "list", "-n"]).stdout
            #expect(left.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "sets left behind: \(left)")
        }
    }
}
