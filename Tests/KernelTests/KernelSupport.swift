// Shared pieces of the real-kernel tests (iptables mode): the root condition, the usual
// Services, and assertions that print sluice's log when traffic goes wrong.

import Foundation
import IPTables
import SluiceTesting
import Testing

/// The kernel tests need root (network namespaces, iptables); without it they are skipped,
/// with this reason in the test report.
let isRoot = TestBed.isRoot

extension Trait where Self == ConditionTrait {
    /// Skips the test unless running as root; the report says `skipped: "not root: ..."`.
    static var requiresRoot: Self {
        .enabled(if: isRoot, "not root: the kernel tests create network namespaces and program iptables")
    }
}

/// The usual two-backend Service: 10.96.0.10, 80/TCP -> 8080, 53/UDP -> 5353.
func webService(name: String = "web", clusterIP: String = "10.96.0.10") -> TestService {
    TestService(name: name, clusterIP: clusterIP)
}

/// A failure message with the context needed to debug it: what ran, what came back, sluice's log.
func context(_ what: String, _ result: ClientResult, _ bed: TestBed) -> Comment {
    Comment(rawValue: "\(what): \(result) [\(result.lines.joined(separator: " | "))]\n--- sluice log ---\n\(bed.sluice?.logTail(30) ?? "(sluice not started)")")
}

/// Expects every request answered by a backend, and (when given) exactly these backends.
func expectAnswered(_ result: ClientResult, count: Int, backends: Set<String>? = nil, _ what: String, _ bed: TestBed,
                    sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(result.answered == count, context(what, result, bed), sourceLocation: sourceLocation)
    if let backends {
        #expect(result.backends == backends, context(what, result, bed), sourceLocation: sourceLocation)
    }
}

/// The packet counter of the first rule line in `save -c` output that contains every needle.
func packetCount(in saveWithCounters: String, ruleContaining needles: [String]) -> Int? {
    for line in saveWithCounters.split(separator: "\n") where line.hasPrefix("[") && needles.allSatisfy({ line.contains($0) }) {
        let inside = line.dropFirst().prefix { $0 != "]" }
        if let pkts = inside.split(separator: ":").first { return Int(pkts) }
    }
    return nil
}

/// Lines of iptables-save text that declare or jump to a KUBE- chain.
func kubeLines(_ save: String) -> [String] {
    save.split(separator: "\n").map(String.init).filter { $0.hasPrefix(":KUBE-") || $0.contains("-j KUBE-") || $0.contains("-g KUBE-") }
}

/// The jump target of the first rule in `save` with `comment` (e.g. the KUBE-SVC chain of
/// a cluster IP rule).
func jumpTarget(in save: String, chain: String, comment: String) -> String? {
    for line in save.split(separator: "\n") where line.hasPrefix("-A \(chain) ") && line.contains("--comment \"\(comment)\"") {
        let words = line.split(separator: " ")
        if let j = words.firstIndex(of: "-j"), j + 1 < words.count { return String(words[j + 1]) }
    }
    return nil
}

/// One explain kernel-test case: who sends, to where (explain must agree with what the packet gets).
struct ExplainCase: CustomStringConvertible {
    var from: String
    var ns: KeyPath<TestBed, String>
    var dst: String
    var proto: ClientProtocol = .tcp
    var description: String { "\(from) -> \(dst)" }
}

/// The Services the explain kernel tests of every mode run against: a ClusterIP, a NodePort,
/// a NodePort with externalTrafficPolicy Local served by backend 3 only, an external IP, a
/// LoadBalancer with source ranges and affinity, and a Service without endpoints.
struct ExplainFixture {
    let web = webService()
    let np: TestService
    let local: TestService
    let eip: TestService
    let lb: TestService
    let empty: TestService

    init() {
        var np = webService(name: "np", clusterIP: "10.96.0.11")
        np.type = "NodePort"
        np.ports = [.http(nodePort: 30080)]
        var local = webService(name: "local", clusterIP: "10.96.0.12")
        local.type = "NodePort"
        local.ports = [.http(nodePort: 30081)]
        local.endpoints = [3]
        var eip = webService(name: "eip", clusterIP: "10.96.0.13")
        eip.externalIPs = ["203.0.113.10"]
        eip.ports = [.http()]
        var lb = webService(name: "lb", clusterIP: "10.96.0.14")
        lb.type = "LoadBalancer"
        lb.ports = [.http(nodePort: 30090)]
        lb.loadBalancerIP = "198.51.100.10"
        lb.loadBalancerSourceRanges = ["192.168.50.0/28"]
        lb.clientIPAffinitySeconds = 600
        var empty = webService(name: "empty", clusterIP: "10.96.0.15")
        empty.endpoints = []
        (self.np, self.local, self.eip, self.lb, self.empty) = (np, local, eip, lb, empty)
    }

    /// Every Service in one manifest (`local` with externalTrafficPolicy Local).
    var yaml: String {
        let localYAML = local.yaml.replacingOccurrences(of: "spec:\n  type: NodePort\n",
                                                        with: "spec:\n  type: NodePort\n  externalTrafficPolicy: Local\n")
        return [web.yaml, np.yaml, localYAML, eip.yaml, lb.yaml, empty.yaml].joined(separator: "---\n")
    }

    /// The service ports that have endpoints (the sync must show them before traffic is sent).
    var servedPorts: [String] { [web, np, local, eip, lb].map { $0.portName("http") } }
}
