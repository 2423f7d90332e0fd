// Sluice: a per-node Kubernetes service proxy.
// The userspace mode's wiring into the executable: the backend for `sluice --proxy-mode
// userspace`, and the dry run of `sluice compile --proxy-mode userspace`.

import IPTables
import Logging
import SluiceCore
import Userspace

/// The userspace backend for the node, with `--udp-timeout` and `--iptables-backend`.
func makeUserspaceBackend(options: ProxyOptions, node: NodeConfig, logger: Logger) throws -> UserspaceBackend {
    let udpTimeout = options.udpTimeout.value
    do {
        return try UserspaceBackend.create(node: node, variant: options.iptablesBackend, udpIdleTimeout: udpTimeout,
                                           runner: ProcessRunner(), logger: logger)
    } catch {
        throw SluiceExit("cannot use userspace mode: \(error)")
    }
}

/// The portal rules a userspace proxy would write for `state`, as iptables-restore input,
/// with dry-run relay ports (consecutive from 32768 in service-port order) and the jump rules
/// as comments.
func userspaceDryRun(state: ProxyState, node: NodeConfig) throws -> String {
    guard let nodeIP = node.nodeIPs.first(where: { $0.family == .ipv4 }) else {
        throw SluiceExit("userspace mode needs an IPv4 node IP: pass --node-ip")
    }
    let plan = UserspacePlan(state: state, nodeName: node.nodeName)
    let ports = RelayPortPlan.dryRun(plan.names)
    var out = "# sluice userspace portal rules (dry run): relay ports are assigned from \(RelayPortPlan.dryRunStart) in\n"
    out += "# service-port order; a running proxy gets them from the kernel. Jumps into the chains:\n"
    for j in userspaceJumpRules {
        let verb = j.position == .first ? "-I \(j.source) 1" : "-A \(j.source)"
        out += "#   -t \(j.table.rawValue) \(verb) " + j.ruleArgs.map { $0.contains(" ") ? "\"\($0)\"" : $0 }.joined(separator: " ") + "\n"
    }
    for name in plan.skipped {
        out += "# \(name.service):\(name.port): \(state.servicePorts[name]?.proto.rawValue ?? "?") is not relayed in userspace mode\n"
    }
    return out + PortalCompiler(nodeIP: nodeIP).compile(plan, relayPorts: ports).restoreText
}
