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
