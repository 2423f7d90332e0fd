// Sluice: a per-node Kubernetes service proxy.
// A throw-away network namespace for tests that program a kernel, and a way to open a
// listening socket inside it from the test process (a socket stays in the namespace it was
// created in, so an in-process fake server can serve a process running in the namespace over
// the namespace's own loopback, without touching the host's network).

import Foundation
import Glibc

/// A network namespace created with `ip netns add`, removed by `delete()`.
public final class NetworkNamespace: Sendable {
    /// The namespace name (`/var/run/netns/NAME`).
    public let name: String

    /// Why a namespace operation failed.
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Whether this process can create namespaces (root), with the reason when not.
    public static var unavailableReason: String? {
        if geteuid() != 0 { return "not running as root (network namespaces need CAP_SYS_ADMIN)" }
        if ToolRunner.which("ip") == nil { return "iproute2's ip is not installed" }
        return nil
    }

    /// Creates `prefix-PID-RANDOM` with its loopback up.
    public init(prefix: String = "sluice-test") throws {
        name = "\(prefix)-\(getpid())-\(UInt32.random(in: 0..<UInt32.max) % 100_000)"
        try ToolRunner.check(["ip", "netns", "add", name])
        do {
            try ToolRunner.check(["ip", "-n", name, "link", "set", "lo", "up"])
        } catch {
            delete()
            throw error
        }
    }

    /// Deletes the namespace (processes still inside keep it alive until they exit).
    public func delete() {
        _ = try? ToolRunner.run(["ip", "netns", "delete", name])
    }

    /// Runs a command inside the namespace; returns status and output.
    @discardableResult
    public func run(_ args: [String]) throws -> ToolRunner.Output {
        try ToolRunner.run(["ip", "netns", "exec", name] + args)
    }

    /// A TCP socket bound to `host:port` inside the namespace and listening (port 0: any).
    /// The socket is created on a dedicated thread that enters the namespace, so no other
    /// thread of the process changes namespace.
    public func listeningSocket(host: String = "127.0.0.1", port: Int) throws -> CInt {
        let path = "/var/run/netns/\(name)"
        let box = ResultBox()
        let thread = Thread {
            box.result = Result { try NetworkNamespace.makeSocket(inNamespace: path, host: host, port: port) }
            box.done.signal()
        }
        thread.start()
        box.done.wait()
        return try box.result!.get()
    }

    private final class ResultBox: @unchecked Sendable {
        var result: Result<CInt, Error>?
        let done = DispatchSemaphore(value: 0)
    }

    private static func makeSocket(inNamespace path: String, host: String, port: Int) throws -> CInt {
        // This thread is the caller's own (see listeningSocket): join, open, and come back.
        let original = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
        guard original >= 0 else { throw Failure(description: "cannot open this thread's namespace") }
        defer { close(original) }
        try NamespaceThread.join(path)
        defer { try? NamespaceThread.join(fd: original, "the thread's own namespace") }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: errno \(errno)") }
        var one: CInt = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<CInt>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &addr.sin_addr) == 1 else {
            close(fd)
            throw Failure(description: "\(host) is not an IPv4 address")
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 64) == 0 else {
            let e = errno
            close(fd)
            throw Failure(description: "bind/listen \(host):\(port) in \(path): errno \(e)")
        }
        return fd
    }
}

/// Runs host tools synchronously (a thin face over `Subprocess`).
public enum ToolRunner {
    /// A finished command.
    public struct Output: Sendable {
        public var status: Int32
        public var stdout: String
        public var stderr: String
    }

    /// The full path of `tool` on PATH (plus the sbin directories), nil when absent.
    public static func which(_ tool: String) -> String? { Subprocess.resolve(tool) }

    /// Runs `args` (the first resolved on PATH) and waits.
    public static func run(_ args: [String]) throws -> Output {
        guard let first = args.first, which(first) != nil else {
            throw NetworkNamespace.Failure(description: "\(args.first ?? "<empty>") not found")
        }
        let r = Subprocess.runBlocking(args, timeout: .seconds(120))
        return Output(status: r.status, stdout: r.stdout, stderr: r.stderr)
    }

    /// Runs `args` and throws unless it exits 0.
    public static func check(_ args: [String]) throws {
        let r = try run(args)
        guard r.status == 0 else {
            throw NetworkNamespace.Failure(description: "\(args.joined(separator: " ")) failed (\(r.status)): \(r.stderr)")
        }
    }
}
