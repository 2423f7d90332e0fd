// Sluice test support: a bare network namespace (no links, no processes) for tests that
// only need a kernel of their own, e.g. a conntrack table; and running code on a thread
// that has joined a namespace, so that sockets it opens (netlink) belong to it.

import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// One throw-away network namespace, named `slt<pid>-x<n>-<label>` (so the test bed's
/// reaper removes it if the test process dies before `teardown`).
public final class TestNamespace: @unchecked Sendable {
    /// The namespace name (`ip netns` name).
    public let name: String
    private let lock = NSLock()
    private var gone = false

    private static let counter = Counter()
    private static let reapOnce: Void = { TestBed.reapStaleNamespaces() }()

    private init(name: String) {
        self.name = name
    }

    /// Creates the namespace, with `lo` up.
    public static func create(label: String) async throws -> TestNamespace {
        _ = reapOnce
        let clean = label.filter { $0.isASCII && ($0.isLetter || $0.isNumber) }.prefix(12)
        let name = "\(TestBed.namePrefix)\(getpid())-x\(counter.next())-\(clean)"
        guard !FileManager.default.fileExists(atPath: "/run/netns/\(name)") else {
            throw TestBedError("network namespace \(name) already exists")
        }
        let ns = TestNamespace(name: name)
        do {
            try await Subprocess.check(["ip", "netns", "add", name])
            try await Subprocess.check(["ip", "-n", name, "link", "set", "lo", "up"])
        } catch {
            ns.teardown()
            throw error
        }
        return ns
    }

    /// Creates a namespace, runs `body` with it and always deletes it afterwards.
    public static func with<T>(label: String, _ body: (TestNamespace) async throws -> T) async throws -> T {
        let ns = try await create(label: label)
        defer { ns.teardown() }
        return try await body(ns)
    }

    /// Runs `argv` inside the namespace.
    public func exec(_ argv: [String], input: String? = nil, timeout: Duration = .seconds(60)) async -> CommandOutput {
        await Subprocess.run(["ip", "netns", "exec", name] + argv, input: input, timeout: timeout)
    }

    /// Runs `argv` inside the namespace and throws when it fails.
    @discardableResult
    public func exec(checked argv: [String], input: String? = nil, timeout: Duration = .seconds(60)) async throws -> CommandOutput {
        let r = await exec(argv, input: input, timeout: timeout)
        guard r.succeeded else { throw TestBedError("command failed in \(name): \(r)") }
        return r
    }

    /// Runs `body` on a thread of its own inside the namespace (see `NamespaceThread.run`).
    public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await NamespaceThread.run(in: name, body)
    }

    /// Kills what runs inside and deletes the namespace (idempotent, blocking).
    public func teardown() {
        let first = lock.withLock { () -> Bool in
            defer { gone = true }
            return !gone
        }
        guard first else { return }
        TestBed.killProcesses(in: name)
        if FileManager.default.fileExists(atPath: "/run/netns/\(name)") {
            let r = Subprocess.runBlocking(["ip", "netns", "del", name], timeout: .seconds(20))
            if !r.succeeded { FileHandle.standardError.write(Data("TestNamespace teardown: \(r)\n".utf8)) }
        }
    }

    deinit { teardown() }
}

/// Joining network namespaces from inside the test process.
public enum NamespaceThread {
    /// `CLONE_NEWNET` from <sched.h>.
    static let cloneNewNet: Int32 = 0x4000_0000

    /// glibc's `setns` (declared only under `_GNU_SOURCE`, which Swift's Glibc module lacks),
    /// looked up once with the C calling convention.
    private static let setnsFunction: (@convention(c) (Int32, Int32) -> Int32)? = {
        guard let handle = dlopen(nil, RTLD_NOW), let sym = dlsym(handle, "setns") else { return nil }
        return unsafeBitCast(sym, to: (@convention(c) (Int32, Int32) -> Int32).self)
    }()

    /// Moves the calling thread into the network namespace at `path` (`/run/netns/NAME`, or
    /// `/proc/thread-self/ns/net` to come back). Only ever call it on a thread of one's own.
    public static func join(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TestBedError("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        try join(fd: fd, path)
    }

    /// Moves the calling thread into the namespace an open descriptor refers to.
    public static func join(fd: Int32, _ what: String = "namespace") throws {
        guard let setns = setnsFunction else { throw TestBedError("setns is not in this C library") }
        guard setns(fd, cloneNewNet) == 0 else { throw TestBedError("setns \(what): \(String(cString: strerror(errno)))") }
    }

    /// Runs `body` on a new thread that first joins namespace `name` (`setns`); the thread
    /// ends afterwards, the rest of the process never leaves its own namespace. Sockets that
    /// `body` opens belong to `name` for their whole life, whichever thread uses them later.
    public static func run<T: Sendable>(in name: String, _ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, Error>) in
            Thread {
                c.resume(with: Result {
                    try join("/run/netns/\(name)")
                    return try body()
                })
            }.start()
        }
    }
}
