// The canary check: a flush of a table's rules (chains kept) is noticed through the jump
// rules; a check that could not run or answer is never read as "missing".

import IPTables
import KernelKit
import Logging
import SluiceCore
import SluiceTesting
import Testing

/// Answers every iptables call as present, except the ones a test overrides.
private final class ScriptedIPTables: CommandRunner, @unchecked Sendable {
    let answer: @Sendable ([String]) -> Result<CommandResult, CommandError>?
    init(_ answer: @escaping @Sendable ([String]) -> Result<CommandResult, CommandError>?) { self.answer = answer }

    func run(_ executable: String, _ arguments: [String], input: String?) async -> Result<CommandResult, CommandError> {
        answer(arguments) ?? .success(CommandResult(status: 0, stdout: "", stderr: ""))
    }
}

private func backend(_ runner: any CommandRunner, _ capture: LogCapture) -> IPTablesBackend {
    IPTablesBackend(options: Fixtures.kubeProxyTestOptions, tools: IPTablesTools(variant: .auto, family: .ipv4), runner: runner,
                    logger: capture.logger())
}

private func isCheck(_ args: [String], table: String, _ op: String, _ chain: String) -> Bool {
    guard let t = args.firstIndex(of: "-t"), t + 3 < args.count else { return false }
    return args[t + 1] == table && args[t + 2] == op && args[t + 3] == chain
}

@Suite struct CanaryProbeTests {
    @Test func everythingPresentIsNoChange() async {
        let capture = LogCapture()
        let b = backend(ScriptedIPTables { _ in nil }, capture)
        #expect(await b.externalChangeDetected() == false)
        #expect(!capture.contains("canary"))
    }

    @Test func aMissingNatJumpRuleIsAFlushEvenWithEveryCanaryPresent() async {
        let capture = LogCapture()
        let b = backend(ScriptedIPTables { args in
            isCheck(args, table: "nat", "-C", "PREROUTING")
                ? .success(CommandResult(status: 1, stdout: "", stderr: "iptables: Bad rule (does a matching rule exist in that chain?).")) : nil
        }, capture)
        #expect(await b.externalChangeDetected() == true)
        #expect(capture.contains("jump rule PREROUTING -> KUBE-SERVICES missing from the nat table"))
    }

    @Test func aMissingFilterJumpRuleIsAFlush() async {
        let capture = LogCapture()
        let b = backend(ScriptedIPTables { args in
            isCheck(args, table: "filter", "-C", "FORWARD") ? .success(CommandResult(status: 1, stdout: "", stderr: "Bad rule")) : nil
        }, capture)
        #expect(await b.externalChangeDetected() == true)
    }

    @Test func aCheckThatCouldNotRunIsNotAMissingChain() async {
        let capture = LogCapture()
        let b = backend(ScriptedIPTables { args in
            if isCheck(args, table: "nat", "-S", Chain.canary) {
                return .failure(CommandError(command: "iptables -S", status: nil,
                                             message: "cannot create a temporary file in /tmp: Too many open files (errno 24)"))
            }
            if isCheck(args, table: "filter", "-S", Chain.canary) {
                return .success(CommandResult(status: 4, stdout: "", stderr: "Another app is currently holding the xtables lock."))
            }
            if isCheck(args, table: "nat", "-C", "PREROUTING") {
                return .success(CommandResult(status: 137, stdout: "", stderr: "", timedOut: true))
            }
            return nil
        }, capture)
        #expect(await b.externalChangeDetected() == false)
        #expect(capture.contains("canary check skipped, could not look"))
        #expect(capture.contains("Too many open files"))
        #expect(capture.contains("xtables lock"))
        #expect(capture.contains("timed out"))
        #expect(!capture.contains("resyncing fully"))
    }

    @Test func aRealFlushIsStillSeenWhenAnotherCheckCouldNotRun() async {
        let capture = LogCapture()
        let b = backend(ScriptedIPTables { args in
            if isCheck(args, table: "mangle", "-S", Chain.canary) {
                return .failure(CommandError(command: "iptables -S", status: nil, message: "Too many open files"))
            }
            if isCheck(args, table: "nat", "-S", Chain.canary) {
                return .success(CommandResult(status: 1, stdout: "", stderr: "iptables: No chain/target/match by that name."))
            }
            return nil
        }, capture)
        #expect(await b.externalChangeDetected() == true)
        #expect(capture.contains("canary chain KUBE-PROXY-CANARY missing from the nat table"))
    }
}
