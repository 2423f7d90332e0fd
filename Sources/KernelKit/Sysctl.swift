// Sluice: a per-node Kubernetes service proxy.
// The one sysctl writer: reads a setting, writes it only when it differs, and says what
// happened with the errno when it could not (the conntrack settings, IPVS mode's settings,
// route_localnet for localhost NodePorts).

#if canImport(Glibc)
import Glibc
#endif
import SluiceCore

/// What happened to one setting.
public enum SysctlOutcome: Sendable, Hashable, CustomStringConvertible {
    /// It already had the value.
    case unchanged(name: String, value: Int)
    /// It was written.
    case changed(name: String, from: Int, to: Int)
    /// It could not be read or written; `hint` says why and what to do.
    case failed(name: String, wanted: Int, current: Int?, errno: Int32, hint: String)

    /// True unless the setting could not be read or written.
    public var succeeded: Bool {
        if case .failed = self { return false }
        return true
    }

    /// One log line.
    public var description: String {
        switch self {
        case .unchanged(let name, let value):
            return "\(name) is already \(value)"
        case .changed(let name, let from, let to):
            return "set \(name) to \(to) (was \(from))"
        case .failed(let name, let wanted, let current, let e, let hint):
            let now = current.map { " (it is \($0))" } ?? ""
            return "cannot set \(name) to \(wanted)\(now): \(String(cString: strerror(e))); \(hint)"
        }
    }
}

/// Reads and writes integer settings under a directory (`/proc/sys`, or a scratch directory
/// in tests), each only when it differs from the wanted value.
public struct SysctlWriter: Sendable {
    /// The directory the keys are relative to.
    public var root: String
    /// What an errno means for a setting, and what the operator can do (`name` is the dotted name).
    public var hint: @Sendable (_ errno: Int32, _ name: String) -> String

    /// Creates a writer.
    public init(root: String = "/proc/sys", hint: @escaping @Sendable (Int32, String) -> String = { SysctlWriter.genericHint($0, name: $1) }) {
        self.root = root
        self.hint = hint
    }

    /// Sets `key` (a path under `root`, `net/ipv4/ip_forward`) to `value` when it differs;
    /// the outcome names it `net.ipv4.ip_forward`.
    public func set(_ key: String, _ value: Int) -> SysctlOutcome {
        set(path: root + "/" + key, name: key.split(separator: "/").joined(separator: "."), value)
    }

    /// Sets the integer file `path`, reported as `name`, to `value` when it differs.
    public func set(path: String, name: String, _ value: Int) -> SysctlOutcome {
        errno = 0
        guard let current = Self.read(path) else {
            let e = errno == 0 ? ENOENT : errno
            return .failed(name: name, wanted: value, current: nil, errno: e, hint: hint(e, name))
        }
        if current == value { return .unchanged(name: name, value: value) }
        return write(path: path, name: name, value: value, current: current)
    }

    /// Writes `value` to `path` (whose value was `current`).
    public func write(path: String, name: String, value: Int, current: Int) -> SysctlOutcome {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            return .failed(name: name, wanted: value, current: current, errno: e, hint: hint(e, name))
        }
        defer { close(fd) }
        let text = Array("\(value)\n".utf8)
        let n = text.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard n == text.count else {
            let e = n < 0 ? errno : EIO
            return .failed(name: name, wanted: value, current: current, errno: e, hint: hint(e, name))
        }
        return .changed(name: name, from: current, to: value)
    }

    /// The integer in `path`, or nil (errno set).
    public static func read(_ path: String) -> Int? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        let text = String(decoding: buffer[0..<n], as: UTF8.self).trimmingASCIIWhitespace()
        return Int(text)
    }

    /// The hint for any setting: what the errno usually means.
    public static func genericHint(_ e: Int32, name: String) -> String {
        switch e {
        case EACCES, EPERM: return "not permitted: sluice needs root (CAP_NET_ADMIN) and a writable /proc/sys"
        case EROFS: return "the file system is mounted read-only (an unprivileged container?); run privileged or set it on the host"
        case ENOENT: return "no such setting: is the kernel module loaded?"
        case EINVAL: return "the kernel rejected the value"
        default: return "left as it is"
        }
    }
}
