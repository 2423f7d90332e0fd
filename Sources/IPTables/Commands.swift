// Sluice: a per-node Kubernetes service proxy.
// The iptables command-line operations more than one mode needs: ensure a jump rule from a
// built-in chain, check and delete it, apply a restore batch with --noflush. The iptables
// mode's backend and the userspace mode's portal rules both go through these.

import SluiceCore

/// Runs one flavour's iptables tools for a mode's own chains.
public struct IPTablesCommands: Sendable {
    /// The binaries called.
    public let tools: IPTablesTools
    /// How they are run.
    public let runner: any CommandRunner

    /// Creates a command set.
    public init(tools: IPTablesTools, runner: any CommandRunner) {
        self.tools = tools
        self.runner = runner
    }

    /// Whether `rule` is in its built-in chain (`iptables -C`); false when it cannot tell.
    public func hasJump(_ rule: JumpRule) async -> Bool {
        let r = await runner.run(tools.iptables, ["-w", "5", "-t", rule.table.rawValue, "-C", rule.source] + rule.ruleArgs, input: nil)
        if case .success(let res) = r, res.status == 0 { return true }
        return false
    }

    /// Installs `rule` at its position unless it is already there. Its target chain must exist.
    /// - Throws: `IPTablesError` when iptables refuses the rule.
    public func ensureJump(_ rule: JumpRule) async throws {
        if await hasJump(rule) { return }
        let place: [String]
        switch rule.position {
        case .first: place = ["-I", rule.source, "1"]
        case .last: place = ["-A", rule.source]
        }
        do {
            _ = try await runner.check(tools.iptables, ["-w", "5", "-t", rule.table.rawValue] + place + rule.ruleArgs)
        } catch {
            throw IPTablesError(operation: "installing the \(rule.source) -> \(rule.target) jump", underlying: error)
        }
    }

    /// Deletes every copy of `rule` (a rule may have been inserted more than once); never fails.
    public func deleteJump(_ rule: JumpRule) async {
        for _ in 0..<16 {
            let r = await runner.run(tools.iptables, ["-w", "5", "-t", rule.table.rawValue, "-D", rule.source] + rule.ruleArgs, input: nil)
            guard case .success(let res) = r, res.status == 0 else { return }
        }
    }

    /// Applies `text` with `iptables-restore -w --noflush`: the chains it declares are
    /// replaced whole, everything else is left alone, and the batch applies atomically.
    /// - Parameter operation: what the batch is for, for the error message.
    /// - Throws: `IPTablesError` with the tool's message when the batch is refused.
    public func restore(_ text: String, operation: String) async throws {
        do {
            _ = try await runner.check(tools.restore, ["-w", "5", "-W", "100000", "--noflush"], input: text)
        } catch {
            throw IPTablesError(operation: operation, underlying: error)
        }
    }
}
