// Sluice: a per-node Kubernetes service proxy.
// Running the kernel tools (iptables-restore, iptables-save, ...) as child processes.

import Dispatch
import Foundation
import Synchronization

/// The result of running one command.
public struct CommandResult: Sendable, Hashable {
    /// Exit status (or 128 + signal).
    public var status: Int32
    public var stdout: String
    public var stderr: String
    /// The command was killed after its time limit.
    public var timedOut: Bool

    /// Creates a result.
    public init(status: Int32, stdout: String, stderr: String, timedOut: Bool = false) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.timedOut = timedOut
    }
}

/// A command that could not be run, or that failed.
public struct CommandError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The command line (arguments only, never the input).
    public var command: String
    /// Exit status; nil when the command could not be started.
    public var status: Int32?
    /// The tool's own message (stderr, trimmed), or why it could not start.
    public var message: String
    /// Set when the command ran past this limit and was killed.
    public var timeout: Duration?

    /// Creates an error.
    public init(command: String, status: Int32?, message: String, timeout: Duration? = nil) {
        self.command = command
        self.status = status
        self.message = message
        self.timeout = timeout
    }

    public var description: String {
        if let timeout {
            return "\(command) timed out: still running after \(GoDuration.format(timeout)), killed" + (message.isEmpty ? "" : " (\(message))")
        }
        if let status { return "\(command) exited \(status): \(message)" }
        return "\(command) could not run: \(message)"
    }
}

/// What a command reads on standard input: a text, or a text made a piece at a time.
///
/// A restore payload of a full sync at 10 000 Services is tens of megabytes; made a piece at a
/// time, each piece is written to the child's input file and released before the next one is
/// made, so the payload is never whole in memory.
public struct CommandInput: Sendable {
    private enum Storage: Sendable {
        case text(String)
        case pieces(@Sendable (_ write: (String) throws -> Void) throws -> Void)
    }
    private let storage: Storage

    /// A text given whole.
    public static func text(_ text: String) -> CommandInput { CommandInput(storage: .text(text)) }

    /// A text made by `produce`, which hands each piece to `write` in order.
    public static func pieces(_ produce: @escaping @Sendable (_ write: (String) throws -> Void) throws -> Void) -> CommandInput {
        CommandInput(storage: .pieces(produce))
    }

    /// The text, when it was given whole (nil: it is made as it is written).
    public var wholeText: String? {
        if case .text(let t) = storage { return t }
        return nil
    }

    /// Hands the text to `write` a piece at a time (a whole text is one piece).
    public func write(_ write: (String) throws -> Void) throws {
        switch storage {
        case .text(let t): try write(t)
        case .pieces(let produce): try produce(write)
        }
    }

    /// The same input, with the UTF-8 size of every piece added to `count` as it is written.
    public func counted(into count: ByteCount) -> CommandInput {
        .pieces { write in
            try self.write { piece in
                count.add(piece.utf8.count)
                try write(piece)
            }
        }
    }

    /// The whole text, joined (for printing and for runners that need it whole).
    public func joined() -> String {
        if let wholeText { return wholeText }
        var out = ""
        try? write { out += $0 }
        return out
    }
}

/// A byte count added to while an input is written (``CommandInput/counted(into:)``).
public final class ByteCount: Sendable {
    private let total = Mutex(0)

    /// Creates a count at zero.
    public init() {}

    /// Adds `n` bytes.
    public func add(_ n: Int) { total.withLock { $0 += n } }

    /// The bytes counted so far.
    public var value: Int { total.withLock { $0 } }
}

/// Runs external commands. The real one forks; tests substitute a fake.
public protocol CommandRunner: Sendable {
    /// Runs `executable` with `arguments`, feeding `input` on standard input.
    func run(_ executable: String, _ arguments: [String], input: String?) async -> Result<CommandResult, CommandError>
    /// Runs `executable` with `arguments`, feeding `input` on standard input as it is made.
    /// The default joins the input and calls ``run(_:_:input:)``.
    func run(_ executable: String, _ arguments: [String], streaming input: CommandInput) async -> Result<CommandResult, CommandError>
}

extension CommandRunner {
    public func run(_ executable: String, _ arguments: [String], streaming input: CommandInput) async -> Result<CommandResult, CommandError> {
        await run(executable, arguments, input: input.joined())
    }
}

/// Runs commands with Foundation's `Process`, off the cooperative thread pool.
///
/// Input and output go through unlinked temporary files, so a payload of tens of megabytes
/// never deadlocks on a pipe and a tool that exits early never raises SIGPIPE.
///
/// Every child gets a time limit: a kernel tool that hangs (a stuck `xtables` lock holder, a
/// wedged netlink socket) is killed with SIGKILL once it has run `timeout`, and the result
/// says so; `check` turns that into a `CommandError` naming the tool and the limit, so the
/// sync fails, the previous rules stay, and the runner retries.
public struct ProcessRunner: CommandRunner {
    /// Extra directories searched after `$PATH`.
    public var searchPath: [String]
    /// How long one child may run before it is killed.
    public var timeout: Duration

    /// The default limit: far above what a restore of 10 000 Services takes (about 1 s) plus
    /// the 5 s xtables lock wait, far below "every later sync blocked".
    public static let defaultTimeout: Duration = .seconds(60)

    /// Creates a runner.
    public init(searchPath: [String] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"], timeout: Duration = ProcessRunner.defaultTimeout) {
        self.searchPath = searchPath
        self.timeout = timeout
    }

    /// Finds `name` on `$PATH` and the extra directories.
    public func resolve(_ name: String) -> String? {
        if name.hasPrefix("/") { return FileManager.default.isExecutableFile(atPath: name) ? name : nil }
        let env = ProcessInfo.processInfo.environment["PATH"]?.split(separator: ":").map(String.init) ?? []
        for dir in env + searchPath {
            let p = dir + "/" + name
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    public func run(_ executable: String, _ arguments: [String], input: String?) async -> Result<CommandResult, CommandError> {
        await run(executable, arguments, staging: input.map(CommandInput.text))
    }

    public func run(_ executable: String, _ arguments: [String], streaming input: CommandInput) async -> Result<CommandResult, CommandError> {
        await run(executable, arguments, staging: input)
    }

    private func run(_ executable: String, _ arguments: [String], staging input: CommandInput?) async -> Result<CommandResult, CommandError> {
        let commandLine = ([executable] + arguments).joined(separator: " ")
        guard let path = resolve(executable) else {
            return .failure(CommandError(command: commandLine, status: nil, message: "\(executable) not found in PATH"))
        }
        // Each piece is written to the child's input file from its own UTF-8 storage: no byte
        // copy of a restore payload (tens of MB at 10 000 Services) is held while the child
        // runs, and a payload made a piece at a time is never whole in memory.
        var stage: (@Sendable (FileHandle) throws -> Void)?
        if let input {
            stage = { (file: FileHandle) throws -> Void in
                try input.write { piece in
                    var text = piece
                    try text.withUTF8 { (bytes: UnsafeBufferPointer<UInt8>) throws -> Void in
                        try file.write(contentsOf: UnsafeRawBufferPointer(bytes))
                    }
                }
            }
        }
        let staging = stage
        let timeout = self.timeout
        return await withCheckedContinuation { (cont: CheckedContinuation<Result<CommandResult, CommandError>, Never>) in
            // A thread of its own: neither the cooperative pool nor dispatch (which delivers
            // the child's termination) is ever blocked waiting for a child.
            Thread {
                cont.resume(returning: ProcessRunner.runBlocking(Process(), path: path, arguments: arguments, stage: staging, timeout: timeout))
            }.start()
        }
    }

    /// An unlinked read-write temporary file, or why none could be made (`mkstemp`'s errno,
    /// e.g. EMFILE when the process is out of descriptors).
    static func scratchFile() -> Result<FileHandle, ScratchFileError> {
        var template = Array("/tmp/sluice-io.XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { return .failure(ScratchFileError(errno: errno)) }
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        return .success(FileHandle(fileDescriptor: fd, closeOnDealloc: true))
    }

    /// A temporary file for a command's input or output could not be created.
    struct ScratchFileError: Error, CustomStringConvertible {
        /// `mkstemp`'s errno.
        var errno: Int32
        var description: String { "cannot create a temporary file in /tmp: \(String(cString: strerror(errno))) (errno \(errno))" }
    }

    /// Starts `process` with an empty signal mask, as a shell would. `posix_spawn` passes the
    /// calling thread's mask on, and dispatch and Swift-concurrency threads block every signal:
    /// a child started from one would never see SIGTERM. So the mask of this thread is cleared
    /// around the spawn and restored right after.
    public static func launch(_ process: Process) throws {
        var empty = sigset_t()
        var old = sigset_t()
        sigemptyset(&empty)
        pthread_sigmask(SIG_SETMASK, &empty, &old)
        defer { pthread_sigmask(SIG_SETMASK, &old, nil) }
        try process.run()
    }

    /// Runs `path` to completion, blocking the calling thread. Input and output go through
    /// unlinked temporary files; after `timeout` the child is killed and `timedOut` is set.
    /// - Returns: the result, or why the command could not be started.
    public static func runBlocking(path: String, arguments: [String], input: [UInt8]?, environment: [String: String]? = nil,
                                   timeout: Duration? = nil) -> Result<CommandResult, CommandError> {
        runBlocking(Process(), path: path, arguments: arguments, input: input, environment: environment, timeout: timeout)
    }

    /// `runBlocking` with the `Process` to use given (tests pass one they can watch).
    static func runBlocking(_ process: Process, path: String, arguments: [String], input: [UInt8]?,
                            environment: [String: String]? = nil, timeout: Duration? = nil) -> Result<CommandResult, CommandError> {
        runBlocking(process, path: path, arguments: arguments, stage: input.map { bytes in { try $0.write(contentsOf: bytes) } },
                    environment: environment, timeout: timeout)
    }

    /// `runBlocking` with the input written by `stage` into the file the child reads.
    static func runBlocking(_ process: Process, path: String, arguments: [String], stage: ((FileHandle) throws -> Void)?,
                            environment: [String: String]? = nil, timeout: Duration? = nil) -> Result<CommandResult, CommandError> {
        let commandLine = ([path] + arguments).joined(separator: " ")
        func failure(_ message: String) -> Result<CommandResult, CommandError> {
            .failure(CommandError(command: commandLine, status: nil, message: message))
        }
        let out: FileHandle, err: FileHandle
        do {
            out = try scratchFile().get()
            err = try scratchFile().get()
        } catch {
            return failure("\(error)")
        }
        // Closed explicitly: the Process object holding them may outlive this call (see the
        // `waitUntilExit()` below: when Foundation never notices the exit it is kept alive), so
        // closing on dealloc could leak three descriptors per command; past ~1360 open
        // descriptors Foundation's Process.run can crash reading /proc/self/fd
        // (swift-corelibs-foundation PR #5472).
        var inFile: FileHandle?
        defer {
            try? out.close()
            try? err.close()
            try? inFile?.close()
        }
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        if let environment { process.environment = environment }
        process.standardOutput = out
        process.standardError = err
        if let stage {
            let file: FileHandle
            do {
                file = try scratchFile().get()
            } catch {
                return failure("\(error)")
            }
            inFile = file
            do {
                try stage(file)
                try file.seek(toOffset: 0)
            } catch {
                return failure("cannot stage input: \(error)")
            }
            process.standardInput = file
        } else {
            process.standardInput = FileHandle.nullDevice
        }
        let done = DispatchSemaphore(value: 0)
        process.terminationHandler = { _ in done.signal() }
        do {
            try launch(process)
        } catch {
            return failure("\(error)")
        }
        // Wait for Foundation's termination notice, but do not trust it alone: under load its
        // SIGCHLD monitor can miss a child, which then stays a zombie and the wait never ends.
        // Every 100 ms the child is looked at directly; an exited child is reaped here.
        let pid = process.processIdentifier
        let deadline = timeout.map { ContinuousClock.now + $0 }
        var timedOut = false
        var reaped: Int32?
        while done.wait(timeout: .now() + .milliseconds(100)) == .timedOut {
            var raw: Int32 = 0
            if waitpid(pid, &raw, WNOHANG) == pid {
                let signal = raw & 0x7f
                reaped = signal == 0 ? (raw >> 8) & 0xff : 128 + signal
                break
            }
            if let deadline, ContinuousClock.now >= deadline, !timedOut {
                timedOut = true
                kill(pid, SIGKILL)
            }
        }
        // Let the Process go. Foundation's `Process.run` (swift-corelibs-foundation) adds a run
        // loop source that retains the Process to the launching thread's run loop and keeps it
        // in a stored property: a cycle that only `waitUntilExit()` breaks. Without this call
        // every command leaked its Process with its arguments, environment and handles
        // (about 2 KiB each; the soak's RSS grew ~60 MiB/h). Once Foundation has seen the exit
        // (`done`), `waitUntilExit()` returns at once. When this loop reaped the child itself,
        // Foundation's notice follows shortly; if it does not come (a grandchild still holds
        // the child's end of Foundation's socket pair), the Process is left as it was rather
        // than blocking here.
        var noticed = reaped == nil
        if !noticed { noticed = done.wait(timeout: .now() + .milliseconds(250)) == .success }
        if noticed { process.waitUntilExit() }
        // A timed-out child is SIGKILLed, which it cannot ignore; its own children (a
        // wrapper's `sleep`) may live on, but their output goes to unlinked files, so
        // nothing here waits for them.
        let status = reaped ?? (process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus)
        return .success(CommandResult(status: status, stdout: ProcessRunner.readAll(out), stderr: ProcessRunner.readAll(err), timedOut: timedOut))
    }

    /// The whole content of an output file, read straight into a string's storage: an
    /// `iptables-save` of 10 000 Services is 33 MB, and reading it as `Data` first held it twice.
    static func readAll(_ h: FileHandle) -> String {
        let fd = h.fileDescriptor
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_size > 0 else { return "" }
        let size = Int(info.st_size)
        return String(unsafeUninitializedCapacity: size) { buffer in
            var done = 0
            while done < size {
                let n = pread(fd, buffer.baseAddress! + done, size - done, off_t(done))
                if n > 0 { done += n } else if n < 0 && errno == EINTR { continue } else { break }
            }
            return done
        }
    }
}

extension CommandRunner {
    /// Runs a command and returns its output, or throws when it fails to start or exits non-zero.
    public func check(_ executable: String, _ arguments: [String], input: String? = nil) async throws(CommandError) -> CommandResult {
        try checked(executable, arguments, await run(executable, arguments, input: input))
    }

    /// ``check(_:_:input:)`` with the input made as it is written.
    public func check(_ executable: String, _ arguments: [String], streaming input: CommandInput) async throws(CommandError) -> CommandResult {
        try checked(executable, arguments, await run(executable, arguments, streaming: input))
    }

    private func checked(_ executable: String, _ arguments: [String], _ r: Result<CommandResult, CommandError>) throws(CommandError) -> CommandResult {
        switch r {
        case .failure(let e): throw e
        case .success(let res):
            if res.timedOut {
                let cmd = ([executable] + arguments).joined(separator: " ")
                throw CommandError(command: cmd, status: res.status, message: res.stderr.trimmingASCIIWhitespace(),
                                   timeout: (self as? ProcessRunner)?.timeout ?? ProcessRunner.defaultTimeout)
            }
            guard res.status == 0 else {
                let cmd = ([executable] + arguments).joined(separator: " ")
                throw CommandError(command: cmd, status: res.status, message: res.stderr.trimmingASCIIWhitespace())
            }
            return res
        }
    }
}
