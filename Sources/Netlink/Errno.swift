// Sluice: a per-node Kubernetes service proxy.
// Kernel error numbers, as netlink reports them (`nlmsgerr.error` is a negated errno).

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An error number from the kernel or the C library.
///
/// Netlink acknowledgements carry a negated errno; this type holds the positive value.
/// ipset reports its own numbers from 4096 up, which `description` names as numbers.
public struct Errno: RawRepresentable, Error, Hashable, Sendable, CustomStringConvertible {
    /// The positive error number.
    public var rawValue: Int32

    /// Wraps an error number.
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// The calling thread's current `errno`.
    public static var current: Errno { Errno(rawValue: errno) }

    /// Operation not permitted. The corresponding C error is `EPERM`.
    public static let notPermitted = Errno(rawValue: EPERM)
    /// No such file or directory (netlink: no such object). The corresponding C error is `ENOENT`.
    public static let noSuchFileOrDirectory = Errno(rawValue: ENOENT)
    /// No such process (IPVS: no such service or destination). The corresponding C error is `ESRCH`.
    public static let noSuchProcess = Errno(rawValue: ESRCH)
    /// Interrupted system call. The corresponding C error is `EINTR`.
    public static let interrupted = Errno(rawValue: EINTR)
    /// No such device or address. The corresponding C error is `ENXIO`.
    public static let noSuchDeviceOrAddress = Errno(rawValue: ENXIO)
    /// Try again. The corresponding C error is `EAGAIN`.
    public static let wouldBlock = Errno(rawValue: EAGAIN)
    /// Permission denied. The corresponding C error is `EACCES`.
    public static let permissionDenied = Errno(rawValue: EACCES)
    /// Device or resource busy. The corresponding C error is `EBUSY`.
    public static let resourceBusy = Errno(rawValue: EBUSY)
    /// File exists (netlink: the object already exists). The corresponding C error is `EEXIST`.
    public static let fileExists = Errno(rawValue: EEXIST)
    /// No such device. The corresponding C error is `ENODEV`.
    public static let noSuchDevice = Errno(rawValue: ENODEV)
    /// Invalid argument. The corresponding C error is `EINVAL`.
    public static let invalidArgument = Errno(rawValue: EINVAL)
    /// Message too long. The corresponding C error is `EMSGSIZE`.
    public static let messageTooLong = Errno(rawValue: EMSGSIZE)
    /// Protocol not supported. The corresponding C error is `EPROTONOSUPPORT`.
    public static let protocolNotSupported = Errno(rawValue: EPROTONOSUPPORT)
    /// Operation not supported. The corresponding C error is `EOPNOTSUPP`.
    public static let notSupported = Errno(rawValue: EOPNOTSUPP)
    /// Address family not supported. The corresponding C error is `EAFNOSUPPORT`.
    public static let addressFamilyNotSupported = Errno(rawValue: EAFNOSUPPORT)
    /// No buffer space (netlink: the socket's receive queue overflowed). The corresponding C error is `ENOBUFS`.
    public static let noBufferSpace = Errno(rawValue: ENOBUFS)
    /// Address not available. The corresponding C error is `EADDRNOTAVAIL`.
    public static let addressNotAvailable = Errno(rawValue: EADDRNOTAVAIL)
    /// Timed out. The corresponding C error is `ETIMEDOUT`.
    public static let timedOut = Errno(rawValue: ETIMEDOUT)
    /// Bad message (a reply the codec could not parse). The corresponding C error is `EBADMSG`.
    public static let badMessage = Errno(rawValue: EBADMSG)

    /// The C name and the C library's text, e.g. `ENOENT (No such file or directory)`.
    public var description: String {
        let text: String
        if rawValue > 0 && rawValue < 4096, let s = strerror(rawValue) {
            text = String(cString: s)
        } else {
            text = "error \(rawValue)"
        }
        if let name = Errno.names[rawValue] { return "\(name) (\(text))" }
        return text
    }

    private static let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR", ENXIO: "ENXIO", EAGAIN: "EAGAIN",
        EACCES: "EACCES", EBUSY: "EBUSY", EEXIST: "EEXIST", ENODEV: "ENODEV", EINVAL: "EINVAL",
        EMSGSIZE: "EMSGSIZE", EPROTONOSUPPORT: "EPROTONOSUPPORT", EOPNOTSUPP: "EOPNOTSUPP",
        EAFNOSUPPORT: "EAFNOSUPPORT", ENOBUFS: "ENOBUFS", EADDRNOTAVAIL: "EADDRNOTAVAIL", ETIMEDOUT: "ETIMEDOUT",
        EBADMSG: "EBADMSG",
    ]
}

/// A failed netlink request: the kernel's errno, its extended-ack message when it sent one,
/// and what was being done.
public struct NetlinkError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kernel's (or the socket's) error number.
    public var errno: Errno
    /// The kernel's extended-ack text (`NLMSGERR_ATTR_MSG`), when present.
    public var message: String?
    /// What the request was for, e.g. `IPVS_CMD_NEW_SERVICE 10.96.0.10:80/TCP`.
    public var operation: String

    /// Creates an error.
    public init(errno: Errno, message: String? = nil, operation: String) {
        self.errno = errno
        self.message = message
        self.operation = operation
    }

    public var description: String {
        var out = "\(operation): \(errno)"
        if let message, !message.isEmpty { out += ": \(message)" }
        return out
    }
}

/// A reply the codec could not parse: a length field out of bounds, a truncated attribute, a
/// value of the wrong size. The kernel never sends these; a bug or a version skew might.
public struct NetlinkDecodeError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What was wrong, with offsets.
    public var description: String

    /// Creates an error.
    public init(_ description: String) { self.description = description }
}
