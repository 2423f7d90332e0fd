// Sluice: a per-node Kubernetes service proxy.
// Fixtures for tests: model snapshots from YAML, and a fake iptables that keeps state.

import Foundation
import IPTables
import KubeAPI
import SluiceCore

/// Builds models from manifest text.
public enum Fixtures {
    /// Parses `yaml` and folds every object into a fresh tracker.
    /// - Returns: the tracker and any rejections (parse or validation).
    public static func tracker(_ yaml: String, nodeName: String = "test-node") throws -> (ChangeTracker, [ObjectRejection]) {
        let parsed = try ManifestParser.parse(yaml, file: "fixture.yaml")
        var tracker = ChangeTracker(nodeName: nodeName)
        var rejections = parsed.rejections
        for o in parsed.objects {
            if case .rejected(let r) = tracker.apply(o.upsertEvent) { rejections.append(r) }
        }
        tracker.apply(.synced)
        return (tracker, rejections)
    }

    /// The IPv4 snapshot of `yaml`.
    public static func state(_ yaml: String, nodeName: String = "test-node", family: IPFamily = .ipv4) throws -> ProxyState {
        var (t, _) = try tracker(yaml, nodeName: nodeName)
        return t.snapshot(family)
    }

    /// Reads a file next to `filePath` (the calling test's `#filePath`).
    public static func read(_ relative: String, beside filePath: String) throws -> String {
        let dir = URL(fileURLWithPath: filePath).deletingLastPathComponent()
        return try String(contentsOf: dir.appendingPathComponent(relative), encoding: .utf8)
    }

    /// The seed book's ssh-service1 (seeds.md §3.2): a NodePort Service with no endpoints,
    /// ClusterIP 10.254.132.107:2222, nodePort 30239 (the userspace-mode example).
    public static let seedSSHService1 = """
        apiVersion: v1
        kind: Service
        metadata: {name: ssh-service1, namespace: default, labels: {name: ssh, role: service}}
        spec:
          type: NodePort
          clusterIP: 10.254.132.107
          selector: {ssh-service: "true"}
          ports: [{port: 2222, targetPort: 22, nodePort: 30239}]
        """

    /// The node settings of kube-proxy's NewFakeProxier (proxier_test.go).
    public static let kubeProxyTestNode = NodeConfig(
        nodeName: "test-node", nodeIPs: [IPAddress("192.168.0.2")!], clusterCIDRs: [CIDR("10.0.0.0/8")!])

    /// Compiler options matching kube-proxy's fake proxier (no --random-fully, be_liberal unset).
    public static let kubeProxyTestOptions = IPTablesOptions(
        node: kubeProxyTestNode, family: .ipv4, randomFully: false, conntrackTCPLiberal: false,
        localAddresses: ["127.0.0.1", "192.168.0.2", "192.168.1.2", "192.168.99.11"].compactMap(IPAddress.init))
}

/// A fake iptables: it applies restore batches to an in-memory nat/filter table set with
/// `--noflush` semantics, answers `iptables-save -t T`, `-N`, `-C`, `-I`, `-A`, `-D` and `-S`, and
/// can be told to fail the next restore.
public final class FakeIPTables: CommandRunner, @unchecked Sendable {
    private let lock = NSLock()
    /// table -> chain -> rules (argument strings after `-A CHAIN `).
    private var tables: [String: [String: [String]]] = ["filter": [:], "nat": [:], "mangle": [:]]
    private var failNextRestores = 0
    /// Restores to let through before failing one (nil: none planned).
    private var failAfter: Int?
    /// Every restore input received, in order.
    public private(set) var restores: [String] = []
    /// Every command line received, in order.
    public private(set) var commands: [String] = []
    /// When set, the tables after every restore applied (table -> chain -> rules), in order.
    public private(set) var statesAfterRestores: [[String: [String: [String]]]] = []
    private var recording = false

    /// Starts keeping the tables after every restore in `statesAfterRestores`.
    public func recordStatesAfterRestores() { lock.withLock { recording = true } }

    /// Creates an empty fake.
    public init() {}

    /// Makes the next `n` restores fail with exit status 1.
    public func failRestores(_ n: Int) { lock.withLock { failNextRestores = n } }

    /// Lets the next `n` restores through and makes the one after them fail with exit status 1.
    public func failRestore(after n: Int) { lock.withLock { failAfter = n } }

    /// The chains of `table`.
    public func chains(_ table: String) -> Set<String> { lock.withLock { Set(tables[table]?.keys ?? [:].keys) } }

    /// The rules of one chain.
    public func rules(_ table: String, _ chain: String) -> [String] { lock.withLock { tables[table]?[chain] ?? [] } }

    /// Removes a chain as an external flush would.
    public func externalFlush(_ table: String) { lock.withLock { tables[table] = [:] } }

    public func run(_ executable: String, _ arguments: [String], input: String?) async -> Result<CommandResult, CommandError> {
        lock.withLock {
            commands.append(([executable] + arguments).joined(separator: " "))
            func ok(_ out: String = "") -> Result<CommandResult, CommandError> { .success(CommandResult(status: 0, stdout: out, stderr: "")) }
            func fail(_ msg: String) -> Result<CommandResult, CommandError> { .success(CommandResult(status: 1, stdout: "", stderr: msg)) }
            var args = arguments
            if let w = args.firstIndex(of: "-w") { args.removeSubrange(w...min(w + 1, args.count - 1)) }
            if executable.hasSuffix("-restore") {
                restores.append(input ?? "")
                if failNextRestores > 0 {
                    failNextRestores -= 1
                    return fail("iptables-restore: line 1 failed (injected)")
                }
                if let n = failAfter {
                    if n == 0 {
                        failAfter = nil
                        return fail("iptables-restore: line 1 failed (injected)")
                    }
                    failAfter = n - 1
                }
                return applyRestore(input ?? "") ? ok() : fail("iptables-restore: invalid batch")
            }
            if executable.hasSuffix("-save") {
                let t = args.firstIndex(of: "-t").map { args[$0 + 1] } ?? "filter"
                var out = "*\(t)\n"
                for c in (tables[t] ?? [:]).keys.sorted() { out += ":\(c) - [0:0]\n" }
                for (c, rs) in (tables[t] ?? [:]).sorted(by: { $0.key < $1.key }) { for r in rs { out += "-A \(c) \(r)\n" } }
                return ok(out + "COMMIT\n")
            }
            if args == ["--version"] { return ok("iptables v1.8.9 (nf_tables)\n") }
            guard let ti = args.firstIndex(of: "-t"), ti + 2 < args.count else { return fail("bad arguments") }
            let t = args[ti + 1]
            let op = args[ti + 2]
            let chain = ti + 3 < args.count ? args[ti + 3] : ""
            let rest = Array(args.dropFirst(ti + 4))
            switch op {
            case "-N":
                if tables[t]?[chain] != nil { return fail("Chain already exists.") }
                tables[t, default: [:]][chain] = []
                return ok()
            case "-S":
                return tables[t]?[chain] != nil ? ok() : fail("No chain/target/match by that name.")
            case "-C":
                return (tables[t]?[chain] ?? []).contains(FakeIPTables.quote(rest)) ? ok() : fail("Bad rule")
            case "-I":
                tables[t, default: [:]][chain, default: []].insert(FakeIPTables.quote(Array(rest.dropFirst())), at: 0)
                return ok()
            case "-A":
                tables[t, default: [:]][chain, default: []].append(FakeIPTables.quote(rest))
                return ok()
            case "-D":
                guard let i = tables[t]?[chain]?.firstIndex(of: FakeIPTables.quote(rest)) else { return fail("Bad rule") }
                tables[t]?[chain]?.remove(at: i)
                return ok()
            default:
                return fail("unsupported")
            }
        }
    }

    private static func quote(_ args: [String]) -> String {
        args.map { $0.contains(" ") ? "\"\($0)\"" : $0 }.joined(separator: " ")
    }

    /// Applies a batch atomically with --noflush semantics; false (and no change) when invalid.
    /// Besides `:CHAIN`, `-A` and `-X` lines it takes `-I CHAIN [N] rule` (N from 1 to the
    /// chain's length + 1, as iptables) and `-D CHAIN rule` (the first equal rule; an error
    /// when there is none).
    private func applyRestore(_ text: String) -> Bool {
        var next = tables
        var current: String?
        for raw in text.split(separator: "\n") {
            let line = String(raw)
            if line.hasPrefix("*") {
                current = String(line.dropFirst())
            } else if line == "COMMIT" {
                current = nil
            } else if line.hasPrefix(":"), let t = current {
                let name = String(line.dropFirst().prefix { $0 != " " })
                next[t, default: [:]][name] = []
            } else if line.hasPrefix("-A "), let t = current {
                let rest = line.dropFirst(3)
                let name = String(rest.prefix { $0 != " " })
                guard next[t]?[name] != nil else { return false }
                next[t]![name]!.append(String(rest.dropFirst(name.count + 1)))
            } else if line.hasPrefix("-I "), let t = current {
                var words = line.dropFirst(3).split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
                let name = words.removeFirst()
                guard next[t]?[name] != nil else { return false }
                var position = 1
                if let n = words.first.flatMap({ Int($0) }) {
                    position = n
                    words.removeFirst()
                }
                guard position >= 1, position <= next[t]![name]!.count + 1 else { return false }
                next[t]![name]!.insert(words.joined(separator: " "), at: position - 1)
            } else if line.hasPrefix("-D "), let t = current {
                let rest = line.dropFirst(3)
                let name = String(rest.prefix { $0 != " " })
                let spec = String(rest.dropFirst(name.count + 1))
                guard let i = next[t]?[name]?.firstIndex(of: spec) else { return false }
                next[t]![name]!.remove(at: i)
            } else if line.hasPrefix("-X "), let t = current {
                let name = String(line.dropFirst(3))
                guard next[t]?[name]?.isEmpty == true else { return false }
                next[t]![name] = nil
            } else {
                return false
            }
        }
        // Every jump must land on an existing chain (iptables refuses dangling jumps).
        let targets: Set<String> = ["ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE", "REDIRECT"]
        for (_, chains) in next {
            for (_, rules) in chains {
                for r in rules {
                    guard let j = r.range(of: "-j ") else { continue }
                    let target = String(r[j.upperBound...].prefix { $0 != " " })
                    if !targets.contains(target) && chains[target] == nil { return false }
                }
            }
        }
        tables = next
        if recording { statesAfterRestores.append(next) }
        return true
    }
}
