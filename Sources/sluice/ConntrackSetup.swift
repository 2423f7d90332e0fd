// Sluice: a per-node Kubernetes service proxy.
// The conntrack flags (kube-proxy's names), the sysctls they set at startup, and the stale-
// flow reconciler every mode lists among its sync observers.

import ArgumentParser
import Conntrack
import Foundation
import IPTables
import Logging
import SluiceCore

/// `--conntrack-*`: kube-proxy's conntrack flags. Unlike kube-proxy, nothing is written
/// unless its flag is given (kube-proxy's defaults are in each help text).
struct ConntrackOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Maximum conntrack entries per CPU core; 0 leaves the limit as it is and ignores --conntrack-min. Unset: not touched (kube-proxy's default is 32768).", valueName: "n"))
    var conntrackMaxPerCore: Int?

    @Option(help: ArgumentHelp("Minimum conntrack entries, whatever --conntrack-max-per-core gives. Unset: not touched (kube-proxy's default is 131072).", valueName: "n"))
    var conntrackMin: Int?

    @Option(help: ArgumentHelp("Idle timeout of established TCP connections (Go duration; 0 leaves it). Unset: not touched (kube-proxy's default is 24h).", valueName: "duration"))
    var conntrackTCPTimeoutEstablished: String?

    @Option(help: ArgumentHelp("Timeout of TCP connections in CLOSE_WAIT (Go duration; 0 leaves it). Unset: not touched (kube-proxy's default is 1h).", valueName: "duration"))
    var conntrackTCPTimeoutCloseWait: String?

    @Option(help: ArgumentHelp("Idle timeout of UDP flows without replies (Go duration; 0 leaves it). Unset: not touched.", valueName: "duration"))
    var conntrackUDPTimeout: String?

    @Option(help: ArgumentHelp("Idle timeout of UDP flows with replies both ways (Go duration; 0 leaves it). Unset: not touched.", valueName: "duration"))
    var conntrackUDPTimeoutStream: String?

    mutating func validate() throws {
        for (flag, value) in [("--conntrack-max-per-core", conntrackMaxPerCore), ("--conntrack-min", conntrackMin)] {
            if let value, value < 0 { throw ValidationError("\(flag) \(value) is negative") }
        }
        _ = try settings()
    }

    /// The flags as settings; durations parsed (Go syntax).
    func settings() throws -> ConntrackSysctlSettings {
        func duration(_ flag: String, _ text: String?) throws -> Duration? {
            guard let text else { return nil }
            guard let d = GoDuration.parse(text), d >= .zero else {
                throw ValidationError("\(flag) \"\(Validation.printable(text))\" is not a duration such as 30s or 1h")
            }
            return d
        }
        return ConntrackSysctlSettings(
            maxPerCore: conntrackMaxPerCore, min: conntrackMin,
            tcpEstablishedTimeout: try duration("--conntrack-tcp-timeout-established", conntrackTCPTimeoutEstablished),
            tcpCloseWaitTimeout: try duration("--conntrack-tcp-timeout-close-wait", conntrackTCPTimeoutCloseWait),
            udpTimeout: try duration("--conntrack-udp-timeout", conntrackUDPTimeout),
            udpStreamTimeout: try duration("--conntrack-udp-timeout-stream", conntrackUDPTimeoutStream))
    }
}

/// Writes the conntrack sysctls whose flags are given and whose values differ. A setting the
/// host does not allow is logged with the reason and what to do; startup goes on.
func applyConntrackSysctls(_ options: ConntrackOptions, logger: Logger) {
    guard let settings = try? options.settings(), !settings.isEmpty else { return }
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
