// Sluice test support: running commands for the real-kernel tests.
// Short commands run to completion with a time limit (output through unlinked temporary
// files, so nothing deadlocks on a pipe); long-running ones (sluice, backends) run in the
// background with their output in a log file, and are stopped by their own PID.

import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
import SluiceCore
#endif

/// What a finished command left behind.
public struct CommandOutput: Sendable, CustomStringConvertible {
    /// The command line.
    public var arguments: [String]
    /// Exit status; 128 + N when killed by signal N; -1 when it could not start.
    public var status: Int32
    public var stdout: String
    public var stderr: String
    /// The command ran past its time limit and was killed.
    public var timedOut: Bool

    /// Exited 0 in time.
    public var succeeded: Bool { status == 0 && !timedOut }

    public var description: String {
        var s = "`\(arguments.joined(separator: " "))` "
        s += timedOut ? "timed out" : "exited \(status)"
        let err = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        if !err.isEmpty { s += ": \(err.prefix(2000))" }
        return s
    }
}

/// A failure of the test bed itself (not of the code under test).
public struct TestBedError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Runs commands.
public enum Subprocess {
    /// Where tools are looked up (iproute2 and iptables live in sbin).
    public static let searchPath = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]

    /// The environment children get: ours, with sbin directories on PATH and no Python
    /// byte-code writes into the repository.
    static var environment: [String: String] {
        var env = ProcessInfo.processInfo.environment
        let current = env["PATH"]?.split(separator: ":").map(String.init) ?? []
        env["PATH"] = (searchPath + current.filter { !searchPath.contains($0) }).joined(separator: ":")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env
    }

    /// The absolute path of `name` (an absolute path is returned when executable).
    public static func resolve(_ name: String) -> String? {
        if name.hasPrefix("/") { return FileManager.default.isExecutableFile(atPath: name) ? name : nil }
        for dir in searchPath + (ProcessInfo.processInfo.environment["PATH"]?.split(separator: ":").map(String.init) ?? []) {
            let p = dir + "/" + name
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    /// Starts `process` with an empty signal mask (see `ProcessRunner.launch`).
    static func launch(_ process: Process) throws { try ProcessRunner.launch(process) }

    /// Runs `argv` to completion, blocking the calling thread (teardown uses this).
    public static func runBlocking(_ argv: [String], input: String? = nil, timeout: Duration = .seconds(60)) -> CommandOutput {
        var result = CommandOutput(arguments: argv, status: -1, stdout: "", stderr: "", timedOut: false)
        guard let first = argv.first, let path = resolve(first) else {
            result.stderr = "\(argv.first ?? "<empty>") not found on \(searchPath.joined(separator: ":"))"
            return result
        }
        switch ProcessRunner.runBlocking(path: path, arguments: Array(argv.dropFirst()), input: input.map { Array($0.utf8) },
                                         environment: environment, timeout: timeout) {
        case .success(let r):
            result.status = r.status
            result.stdout = r.stdout
            result.stderr = r.stderr
            result.timedOut = r.timedOut
        case .failure(let e):
            result.stderr = e.message
        }
        return result
    }

    /// Runs `argv` to completion on a thread of its own: neither the cooperative pool nor
    /// dispatch's (which delivers `Process` termination) is ever blocked waiting for a child.
    public static func run(_ argv: [String], input: String? = nil, timeout: Duration = .seconds(60)) async -> CommandOutput {
        await withCheckedContinuation { (cont: CheckedContinuation<CommandOutput, Never>) in
            Thread {
                cont.resume(returning: runBlocking(argv, input: input, timeout: timeout))
            }.start()
        }
    }

    /// Runs `argv` and throws with its output when it fails.
    @discardableResult
    public static func check(_ argv: [String], input: String? = nil, timeout: Duration = .seconds(60)) async throws -> CommandOutput {
        let r = await run(argv, input: input, timeout: timeout)
        guard r.succeeded else { throw TestBedError("command failed: \(r)") }
        return r
    }
}

/// A long-running child process (sluice, a backend) with its output in a log file.
public final class BackgroundProcess: @unchecked Sendable {
    /// A short name for messages ("sluice", "backend-1").
    public let name: String
    /// The command line.
    public let arguments: [String]
    /// Where stdout and stderr go.
    public let logPath: String
    /// The child's PID (with `ip netns exec` this is the program itself: it execs).
    public let pid: Int32

    private let process: Process
    private let lock = NSLock()
    private let exited: DispatchSemaphore
    private let statusBox: StatusBox

    /// Starts `argv` with stdout and stderr appended to `logPath`.
    public init(name: String, arguments argv: [String], logPath: String) throws {
        self.name = name
        self.arguments = argv
        self.logPath = logPath
        guard let first = argv.first, let path = Subprocess.resolve(first) else {
            throw TestBedError("\(name): \(argv.first ?? "<empty>") not found")
        }
        guard FileManager.default.createFile(atPath: logPath, contents: nil),
              let log = FileHandle(forWritingAtPath: logPath) else {
            throw TestBedError("\(name): cannot create log file \(logPath)")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = Array(argv.dropFirst())
        p.environment = Subprocess.environment
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = log
        p.standardError = log
        let box = StatusBox()
        let sem = DispatchSemaphore(value: 0)
        p.terminationHandler = { proc in
            box.set(proc.terminationReason == .uncaughtSignal ? 128 + proc.terminationStatus : proc.terminationStatus)
            sem.signal()
        }
        do {
            try Subprocess.launch(p)
        } catch {
            try? log.close()
            throw TestBedError("\(name): cannot start \(argv.joined(separator: " ")): \(error)")
        }
        try? log.close()
        process = p
        pid = p.processIdentifier
        statusBox = box
        exited = sem
    }

    /// The exit status, or nil while it runs.
    public var exitStatus: Int32? { statusBox.get() }

    /// True until the process has exited (and been reaped).
    public var isRunning: Bool { exitStatus == nil }

    /// Everything it printed so far.
    public func log() -> String {
        guard let d = FileManager.default.contents(atPath: logPath) else { return "" }
        return String(decoding: d, as: UTF8.self)
    }

    /// The last `lines` lines of its output, for failure messages.
    public func logTail(_ lines: Int = 40) -> String {
        log().split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    /// Sends `sig` if the process has not exited yet (never to a reaped, possibly reused PID).
    public func send(_ sig: Int32) {
        lock.lock()
        defer { lock.unlock() }
        if isRunning { kill(pid, sig) }
    }

    /// Waits up to `timeout` for the process to exit; returns its status, or nil if it still runs.
    public func waitForExit(timeout: Duration) async -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let s = exitStatus { return s }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return exitStatus
    }

    /// Stops the process (blocking): SIGTERM, up to `grace` to exit, then SIGKILL.
    /// Returns the exit status.
    @discardableResult
    public func stop(grace: Duration = .seconds(3)) -> Int32? {
        if let s = exitStatus { return s }
        send(SIGTERM)
        if exited.wait(timeout: .now() + grace.seconds) == .timedOut {
            send(SIGKILL)
            _ = exited.wait(timeout: .now() + 5)
        } else {
            exited.signal() // keep the semaphore signalled for later waits
        }
        return exitStatus
    }
}

/// A lock-protected exit status.
final class StatusBox: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Int32?
    func set(_ v: Int32) { lock.lock(); value = v; lock.unlock() }
    func get() -> Int32? { lock.lock(); defer { lock.unlock() }; return value }
}

extension Duration {
    /// The duration in seconds, as a Double.
    public var seconds: Double {
        let c = components
        return Double(c.seconds) + Double(c.attoseconds) / 1e18
    }
}
