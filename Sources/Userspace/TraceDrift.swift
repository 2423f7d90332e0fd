// Sluice: a per-node Kubernetes service proxy.
// Userspace-mode drift: the portal chains and their jumps against the kernel's nat table. A
// relay's port is whatever the kernel gave the running proxy, so portal rules are compared
// with their relay port masked (a rule sending a Service's traffic to another port is still a
// difference of target: its comment, match and kind stay compared). Read-only: one
// iptables-save.

import IPTables
import KernelKit
import SluiceCore

/// The userspace drift check.
public struct UserspaceDriftChecker: DriftChecking {
    public var mode: String { "userspace" }
    let nodeIP: IPAddress
    let nodeName: String
    let tools: IPTablesTools
    let runner: any CommandRunner

    /// Creates a checker.
    public init(nodeIP: IPAddress, nodeName: String, tools: IPTablesTools, runner: any CommandRunner) {
        self.nodeIP = nodeIP
        self.nodeName = nodeName
        self.tools = tools
        self.runner = runner
    }

    public func check(_ state: ProxyState) async throws -> DriftReport {
        let plan = UserspacePlan(state: state, nodeName: nodeName)
        let text = PortalCompiler(nodeIP: nodeIP).compile(plan, relayPorts: RelayPortPlan.dryRun(plan.names)).restoreText
        let desired = IPTablesDrift.desired(restoreText: text, jumps: userspaceJumpRules)
        let actual = ParsedRuleSet.parse(try await IPTablesRestorer(tools: tools, runner: runner).save(.nat))
        let owned = Set(Chain.userspaceNAT)
        return DriftReport(mode: mode, family: .ipv4,
                           items: IPTablesDrift.compare(desired: UserspaceDriftChecker.maskingRelayPorts(desired),
                                                        actual: UserspaceDriftChecker.maskingRelayPorts(actual),
                                                        owns: { owned.contains($0) }))
    }

    /// The rule set with every portal rule's relay port replaced by `RELAY` (texts unchanged).
    static func maskingRelayPorts(_ set: ParsedRuleSet) -> ParsedRuleSet {
        var out = set
        guard var nat = out.tables["nat"] else { return out }
        for chain in Chain.userspaceNAT {
            guard let rules = nat.rules[chain] else { continue }
            nat.rules[chain] = rules.map { r in
                var r = r
                r.targetOptions = r.targetOptions.map { o in
                    var o = o
                    if o.name == "--to-ports" { o.values = ["RELAY"] }
                    if o.name == "--to-destination", let v = o.values.first, let colon = v.lastIndex(of: ":") {
                        o.values = [String(v[..<colon]) + ":RELAY"]
                    }
                    return o
                }
                return r
            }
        }
        out.tables["nat"] = nat
        return out
    }
}

