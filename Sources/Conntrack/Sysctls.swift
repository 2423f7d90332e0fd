// Sluice: a per-node Kubernetes service proxy.
// The conntrack sysctls kube-proxy sets at startup (cmd/kube-proxy/app/conntrack.go and
// server_linux.go): the table size, its hash size, four timeouts and TCP liberal mode. Each
// is written only when the kernel's value differs, through the kernel kit's `SysctlWriter`
// with the conntrack-specific hints.

#if canImport(Glibc)
import Glibc
#endif
import KernelKit
import SluiceCore

/// The conntrack settings; nil (or false for `tcpBeLiberal`) means "leave the kernel's value".
public struct ConntrackSysctlSettings: Sendable, Hashable {
    /// `--conntrack-max-per-core`: entries per CPU (0: leave the limit as it is).
    public var maxPerCore: Int?
    /// `--conntrack-min`: a floor for the scaled limit.
    public var min: Int?
    /// `--conntrack-tcp-timeout-established`.
    public var tcpEstablishedTimeout: Duration?
    /// `--conntrack-tcp-timeout-close-wait`.
    public var tcpCloseWaitTimeout: Duration?
    /// `--conntrack-tcp-be-liberal`: set `nf_conntrack_tcp_be_liberal` to 1 (false leaves it).
    public var tcpBeLiberal: Bool
    /// `--conntrack-udp-timeout`.
    public var udpTimeout: Duration?
    /// `--conntrack-udp-timeout-stream`.
    public var udpStreamTimeout: Duration?

    /// Creates settings.
    public init(maxPerCore: Int? = nil, min: Int? = nil, tcpEstablishedTimeout: Duration? = nil,
                tcpCloseWaitTimeout: Duration? = nil, tcpBeLiberal: Bool = false, udpTimeout: Duration? = nil,
                udpStreamTimeout: Duration? = nil) {
        self.maxPerCore = maxPerCore
        self.min = min
        self.tcpEstablishedTimeout = tcpEstablishedTimeout
        self.tcpCloseWaitTimeout = tcpCloseWaitTimeout
        self.tcpBeLiberal = tcpBeLiberal
        self.udpTimeout = udpTimeout
        self.udpStreamTimeout = udpStreamTimeout
    }

    /// True when nothing is to be set.
    public var isEmpty: Bool { self == ConntrackSysctlSettings() }
}

/// Reads and writes the conntrack sysctls. The paths are parameters so that tests can point
/// them at a scratch directory.
public struct ConntrackSysctls: Sendable {
    /// `/proc/sys/net/netfilter`.
    public var procDirectory: String
    /// `/sys/module/nf_conntrack/parameters/hashsize`.
    public var hashsizePath: String
    /// CPUs, for `--conntrack-max-per-core` (kube-proxy uses Go's `runtime.NumCPU`).
    public var cpuCount: Int

    /// Creates an accessor.
    public init(procDirectory: String = "/proc/sys/net/netfilter",
                hashsizePath: String = "/sys/module/nf_conntrack/parameters/hashsize", cpuCount: Int) {
        self.procDirectory = procDirectory
        self.hashsizePath = hashsizePath
        self.cpuCount = cpuCount
    }

    /// The `nf_conntrack_max` the settings ask for, or nil to leave it: `maxPerCore × CPUs`,
    /// raised to `min` (kube-proxy's `getConntrackMax`). `maxPerCore` 0 leaves the limit as it
    /// is, whatever `min` says (kube-proxy's meaning of 0); `min` alone sets it to `min`.
    public func desiredMax(_ s: ConntrackSysctlSettings) -> Int? {
        if s.maxPerCore == 0 { return nil }
        let target = Swift.max((s.maxPerCore ?? 0) * cpuCount, s.min ?? 0)
        return target > 0 ? target : nil
    }

    /// Applies the settings that are given and differ from the kernel's values, in
    /// kube-proxy's order: the limit, the hash size (to a quarter of the limit, only when it
    /// is smaller), then the TCP timeouts, liberal mode, and the UDP timeouts. A failure is
    /// reported and the rest goes on.
    public func apply(_ s: ConntrackSysctlSettings) -> [SysctlOutcome] {
        var out: [SysctlOutcome] = []
        if let max = desiredMax(s) {
            out.append(set("nf_conntrack_max", max))
            // Reading the hash size never fails where conntrack exists; raising it is allowed
            // only from the host's network namespace (the kernel says EOPNOTSUPP elsewhere).
            if let hashsize = SysctlWriter.read(hashsizePath), hashsize < max / 4 {
                out.append(writer.write(path: hashsizePath, name: "nf_conntrack hashsize", value: max / 4, current: hashsize))
            }
        }
        func timeout(_ name: String, _ d: Duration?) {
            guard let d else { return }
            let seconds = Int(d.components.seconds)
            if seconds > 0 { out.append(set(name, seconds)) }
        }
        timeout("nf_conntrack_tcp_timeout_established", s.tcpEstablishedTimeout)
        timeout("nf_conntrack_tcp_timeout_close_wait", s.tcpCloseWaitTimeout)
        if s.tcpBeLiberal { out.append(set("nf_conntrack_tcp_be_liberal", 1)) }
        timeout("nf_conntrack_udp_timeout", s.udpTimeout)
        timeout("nf_conntrack_udp_timeout_stream", s.udpStreamTimeout)
        return out
    }

    /// The writer, with the conntrack hints.
    private var writer: SysctlWriter {
        SysctlWriter(root: procDirectory, hint: { [self] e, name in hint(e, name: name) })
    }

    /// Sets `net.netfilter.<name>` when it differs.
    private func set(_ name: String, _ value: Int) -> SysctlOutcome {
        writer.set(path: "\(procDirectory)/\(name)", name: "net.netfilter.\(name)", value)
    }

    /// What an errno means for a conntrack setting, and what the operator can do.
    func hint(_ e: Int32, name: String) -> String {
        let hostOnly = name.hasSuffix("nf_conntrack_max") || name.hasSuffix("hashsize")
        switch e {
        case EACCES, EPERM:
            if hostOnly {
                return "the kernel lets only the host's network namespace change it; set it on the host (sysctl -w net.netfilter.nf_conntrack_max=... and /sys/module/nf_conntrack/parameters/hashsize), or run sluice in the host network namespace"
            }
            return "not permitted: sluice needs root (CAP_NET_ADMIN) and a writable /proc/sys"
        case EOPNOTSUPP:
            return "only the host's network namespace can resize the conntrack hash table; set it on the host"
        case EROFS:
            return "the file system is mounted read-only (an unprivileged container?); run privileged or set it on the host"
        case ENOENT:
            return "no such setting: is the nf_conntrack module loaded?"
        case EINVAL:
            return "the kernel rejected the value"
        default:
            return "left as it is"
        }
    }
}
