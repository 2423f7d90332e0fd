// Helpers for the tests that need a real kernel: commands, background processes, polling.

import Foundation
import Glibc
import Netlink
import SluiceCore

enum Kernel {
    /// Whether this network namespace's kernel has the IPVS generic-netlink family.
    static func ipvsPresent() async -> Bool {
        guard let c = try? NetlinkConnection(protocol: NetlinkProtocol.generic) else { return false }
        return ((try? await c.resolveFamily("IPVS")) ?? nil) != nil
    }

    /// True inside the user-mode Linux guest of scripts/uml-run.sh (a throw-away kernel).
    static var inUML: Bool { ProcessInfo.processInfo.environment["UML_RUN"] == "1" }

    static let runner = ProcessRunner()

    /// Runs a command; returns status and output (stderr appended on failure).
    @discardableResult
    static func run(_ args: [String], input: String? = nil) async -> (status: Int32, out: String) {
        switch await runner.run(args[0], Array(args.dropFirst()), input: input) {
        case .success(let r): return (r.status, r.status == 0 ? r.stdout : r.stdout + r.stderr)
        case .failure(let e): return (127, e.description)
        }
    }

    /// `ip netns exec NS args...`.
    static func inNS(_ ns: String, _ args: [String]) -> [String] { ["ip", "netns", "exec", ns] + args }

    /// Polls `condition` every 100 ms until it holds or `timeout` passes.
    static func waitUntil(_ timeout: Duration, _ condition: () async -> Bool) async -> Bool {
        let clock = ContinuousClock()
        let end = clock.now + timeout
        while clock.now < end {
            if await condition() { return true }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return await condition()
    }
}

/// A process running in the background with its output in a file.
final class Background: @unchecked Sendable {
    let process = Process()
    let logURL: URL

    init(_ args: [String], log: URL) throws {
        logURL = log
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        let handle = try FileHandle(forWritingTo: log)
        guard let exe = Kernel.runner.resolve(args[0]) else {
            throw CommandError(command: args[0], status: nil, message: "not found")
        }
        process.executableURL = URL(fileURLWithPath: exe)
        process.arguments = Array(args.dropFirst())
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    var output: String { (try? String(contentsOf: logURL, encoding: .utf8)) ?? "" }
    var isRunning: Bool { process.isRunning }

    /// SIGKILL at once: for test helpers. (Children spawned from the cooperative thread pool
    /// inherit its blocked signal mask, so a plain process such as python never sees SIGTERM.)
    func kill() async {
        guard process.isRunning else { return }
        Glibc.kill(process.processIdentifier, SIGKILL)
        _ = await Kernel.waitUntil(.seconds(5)) { !self.process.isRunning }
    }

    /// SIGTERM (sluice handles it), then SIGKILL after `grace`; waits for the exit.
    func stop(grace: Duration = .seconds(5)) async {
        guard process.isRunning else { return }
        process.terminate()
        if !(await Kernel.waitUntil(grace) { !self.process.isRunning }) {
            Glibc.kill(process.processIdentifier, SIGKILL)
            _ = await Kernel.waitUntil(.seconds(2)) { !self.process.isRunning }
        }
    }
}
