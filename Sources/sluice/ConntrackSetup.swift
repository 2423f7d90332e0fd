// Sluice: a per-node Kubernetes service proxy.
// The conntrack flags (kube-proxy's names), the sysctls they set at startup, and the stale-
// flow reconciler every mode lists among its sync observers.

import ArgumentParser
import Conntrack
import Foundation
import IPTables
import KernelKit
import Logging
import SluiceCore

/// `--conntrack-*`: kube-proxy's conntrack flags, with kube-proxy's defaults. A value of 0
/// leaves that setting as the kernel has it; a setting is written only when it differs.
struct ConntrackOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Maximum conntrack entries per CPU core; 0 leaves the limit as it is and ignores --conntrack-min.", valueName: "n"))
    var conntrackMaxPerCore: Int = 32768

    @Option(help: ArgumentHelp("Minimum conntrack entries, whatever --conntrack-max-per-core gives.", valueName: "n"))
    var conntrackMin: Int = 131072

    @Option(help: ArgumentHelp("Idle timeout of established TCP connections (Go duration; 0 leaves it).", valueName: "duration"))
    var conntrackTCPTimeoutEstablished = FlagDuration(default: "24h0m0s")

    @Option(help: ArgumentHelp("Timeout of TCP connections in CLOSE_WAIT (Go duration; 0 leaves it).", valueName: "duration"))
    var conntrackTCPTimeoutCloseWait = FlagDuration(default: "1h0m0s")

    @Flag(name: .customLong("conntrack-tcp-be-liberal"), help: "Set nf_conntrack_tcp_be_liberal=1: out-of-window TCP packets are not marked INVALID.")
    var conntrackTCPBeLiberal = false

    @Option(help: ArgumentHelp("Idle timeout of UDP flows without replies (Go duration; 0 leaves it).", valueName: "duration"))
    var conntrackUDPTimeout = FlagDuration(default: "0s")

    @Option(help: ArgumentHelp("Idle timeout of UDP flows with replies both ways (Go duration; 0 leaves it).", valueName: "duration"))
    var conntrackUDPTimeoutStream = FlagDuration(default: "0s")

    mutating func validate() throws {
        for (flag, value) in [("--conntrack-max-per-core", conntrackMaxPerCore), ("--conntrack-min", conntrackMin)] {
            if value < 0 { throw ValidationError("\(flag) \(value) is negative") }
        }
    }

    /// The flags as settings; zero means "leave it".
    var settings: ConntrackSysctlSettings {
        func nonZero(_ d: FlagDuration) -> Duration? { d.value > .zero ? d.value : nil }
        return ConntrackSysctlSettings(
            maxPerCore: conntrackMaxPerCore, min: conntrackMin,
            tcpEstablishedTimeout: nonZero(conntrackTCPTimeoutEstablished),
            tcpCloseWaitTimeout: nonZero(conntrackTCPTimeoutCloseWait),
            tcpBeLiberal: conntrackTCPBeLiberal,
            udpTimeout: nonZero(conntrackUDPTimeout),
            udpStreamTimeout: nonZero(conntrackUDPTimeoutStream))
    }
}

/// Writes the conntrack sysctls whose values differ from the settings, as kube-proxy does at
/// start-up. Each one the host does not allow is logged once, with the reason and what to
/// do; start-up goes on.
func applyConntrackSysctls(_ options: ConntrackOptions, logger: Logger) {
    let settings = options.settings
    guard !settings.isEmpty else { return }
    let sysctls = ConntrackSysctls(cpuCount: ProcessInfo.processInfo.activeProcessorCount)
    for outcome in sysctls.apply(settings) {
        switch outcome {
        case .unchanged: logger.debug("conntrack: \(outcome)")
        case .changed: logger.info("conntrack: \(outcome)")
        case .failed: logger.warning("conntrack: \(outcome)")
        }
    }
}

/// The stale-flow reconciler for a mode's observers (one serves both families' runners).
/// - Parameter relayPort: userspace mode's relay port of a service port: flows redirected to
///   it are current (nil in the other modes).
func makeConntrackReconciler(node: NodeConfig, logger: Logger,
                             relayPort: (@Sendable (ServicePortName) -> UInt16?)? = nil) -> ConntrackReconciler {
    ConntrackReconciler(
        configuration: .init(nodePortAddresses: node.nodePortAddresses, localhostNodePorts: node.localhostNodePorts,
                             localAddresses: { LocalAddresses.current() }, relayPort: relayPort),
        logger: logger)
}

/// kube-proxy's privileged start-up work (what `--init-only` does before it exits): the
/// process's OOM score, then the conntrack sysctls.
func runPrivilegedStartup(options: ProxyOptions, logger: Logger) {
    writeOOMScoreAdj(options.oomScoreAdj, logger: logger)
    applyConntrackSysctls(options.conntrack, logger: logger)
}

/// Writes `/proc/self/oom_score_adj` when it differs (kube-proxy's `--oom-score-adj`, default
/// -999, so the kernel kills the proxy last). A failure is logged once; start-up goes on.
func writeOOMScoreAdj(_ value: Int, path: String = "/proc/self/oom_score_adj", logger: Logger) {
    let writer = SysctlWriter(hint: { _, _ in "lowering it needs CAP_SYS_RESOURCE" })
    let outcome = writer.set(path: path, name: "oom_score_adj", value)
    switch outcome {
    case .unchanged: logger.debug("oom_score_adj is already \(value)")
    case .changed(_, let from, _): logger.info("set oom_score_adj to \(value) (was \(from))")
    case .failed: logger.warning("\(outcome)")
    }
}
