// The process runner lets go of every child's `Process` once the child has exited.
//
// Foundation's `Process.run` ties the Process to a run loop source that retains it, a cycle
// only `waitUntilExit()` breaks; a runner that never called it kept every Process (with its
// arguments and file handles) for the life of sluice, and the soak's RSS grew without limit.

import Foundation
@testable import SluiceCore
import Testing

/// A `Process` that records its deallocation.
private final class WatchedProcess: Process, @unchecked Sendable {
    let released: Released
    init(_ released: Released) { self.released = released }
    deinit { released.mark() }
}

/// Set once the watched Process is deallocated.
private final class Released: @unchecked Sendable {
    private let lock = NSLock()
    private var done = false
    func mark() { lock.withLock { done = true } }
    var isSet: Bool { lock.withLock { done } }
}

/// Yields until `condition` holds (bounded by a count of short sleeps).
private func eventually(_ condition: () -> Bool) async -> Bool {
    for _ in 0..<2_000 {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(5))
    }
    return condition()
}

@Suite(.serialized) struct ProcessRunnerTests {
    @Test func aFinishedCommandsProcessIsReleased() async throws {
        let released = (0..<5).map { _ in Released() }
        for (i, flag) in released.enumerated() {
            let result = ProcessRunner.runBlocking(WatchedProcess(flag), path: "/bin/sh", arguments: ["-c", "cat; echo \(i) >&2"],
                                                   input: Array("in \(i)\n".utf8))
            let r = try result.get()
            #expect(r.status == 0)
            #expect(r.stdout == "in \(i)\n")
            #expect(r.stderr == "\(i)\n")
        }
        // Foundation's termination-handler thread may hold a Process for a moment after the
        // runner returns; a leaked one is never released.
        #expect(await eventually { released.allSatisfy(\.isSet) })
    }

    @Test func aFailingCommandsProcessIsReleasedToo() async throws {
        let flag = Released()
        let r = try ProcessRunner.runBlocking(WatchedProcess(flag), path: "/bin/sh", arguments: ["-c", "exit 3"], input: nil).get()
        #expect(r.status == 3)
        #expect(await eventually { flag.isSet })
    }
}

/// An input made a piece at a time reaches the child whole and in order, and is counted.
@Suite struct StreamedInputTests {
    @Test func piecesReachTheChildInOrderAndAreCounted() async throws {
        let pieces = (0..<300).map { "piece \($0) " + String(repeating: "x", count: $0 * 37) + "\n" }
        let made = ByteCount()
        let input = CommandInput.pieces { write in
            for p in pieces { try write(p) }
        }.counted(into: made)
        let result = try await ProcessRunner().check("cat", [], streaming: input)
        #expect(result.stdout == pieces.joined())
        #expect(made.value == pieces.joined().utf8.count)
        #expect(input.wholeText == nil)
        #expect(CommandInput.text("abc").wholeText == "abc")
    }

    @Test func aPieceThatCannotBeMadeFailsTheCommandBeforeItRuns() async throws {
        struct Refused: Error {}
        let marker = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-streamed-\(getpid())").path
        let input = CommandInput.pieces { write in
            try write("first\n")
            throw Refused()
        }
        let result = await ProcessRunner().run("sh", ["-c", "touch \(marker)"], streaming: input)
        guard case .failure(let error) = result else {
            Issue.record("the command ran although its input could not be made")
            return
        }
        #expect(error.message.contains("cannot stage input"))
        #expect(!FileManager.default.fileExists(atPath: marker))
    }

    @Test func theDefaultRunnerJoinsTheInput() async throws {
        struct Recording: CommandRunner {
            let seen = ByteCountText()
            func run(_ executable: String, _ arguments: [String], input: String?) async -> Result<CommandResult, CommandError> {
                seen.set(input ?? "")
                return .success(CommandResult(status: 0, stdout: "", stderr: ""))
            }
        }
        let runner = Recording()
        _ = try await runner.check("x", [], streaming: .pieces { write in try write("a"); try write("b") })
        #expect(runner.seen.get() == "ab")
    }
}

/// A string set from a fake runner.
private final class ByteCountText: @unchecked Sendable {
    private let lock = NSLock()
    private var text = ""
    func set(_ t: String) { lock.withLock { text = t } }
    func get() -> String { lock.withLock { text } }
}

/// Work that cannot be interrupted does not hold up a cancelled caller.
@Suite struct AbandonOnCancellationTests {
    /// Set once, waited for by polling (the operation below never suspends cooperatively).
    final class Gate: @unchecked Sendable {
        private let lock = NSLock()
        private var open = false
        private var entered = false
        func enter() { lock.withLock { entered = true } }
        var hasEntered: Bool { lock.withLock { entered } }
        func release() { lock.withLock { open = true } }
        var isOpen: Bool { lock.withLock { open } }
    }

    @Test func aResultIsReturned() async throws {
        let v = try await abandoningOnCancellation { 41 + 1 }
        #expect(v == 42)
        struct Broken: Error {}
        await #expect(throws: Broken.self) { try await abandoningOnCancellation { () async throws -> Int in throw Broken() } }
    }

    @Test func aCancelledCallerReturnsWhileTheWorkGoesOn() async throws {
        let gate = Gate()
        let finished = Gate()
        let caller = Task {
            try await abandoningOnCancellation { () async -> Int in
                gate.enter()
                // Blocks its thread, as a libnftables table read does, until released.
                while !gate.isOpen { usleep(1_000) }
                finished.release()
                return 1
            }
        }
        try #require(await eventually { gate.hasEntered }, "the work started")
        caller.cancel()
        // Were the caller to wait for the work, this releases it later so that the test fails
        // below instead of hanging.
        Task.detached { try? await Task.sleep(for: .seconds(5)); gate.release() }
        let outcome = await caller.result
        #expect(throws: CancellationError.self) { try outcome.get() }
        #expect(!finished.isOpen, "the caller waited for the work to end")
        gate.release()
        #expect(await eventually { finished.isOpen }, "the abandoned work ended on its own")
    }

    @Test func anAlreadyCancelledCallerReturnsAtOnce() async throws {
        let caller = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await abandoningOnCancellation { () async -> Int in 7 }
        }
        let outcome = await caller.result
        // Either the cancellation or the work came first; neither hangs.
        if case .success(let v) = outcome { #expect(v == 7) } else { #expect(throws: CancellationError.self) { try outcome.get() } }
    }
}
