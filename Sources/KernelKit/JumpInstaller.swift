// Sluice: a per-node Kubernetes service proxy.
// The one way of installing, checking and deleting jump rules from built-in chains, either
// one iptables call per rule (iptables and userspace modes) or inside a restore batch after
// one iptables-save (IPVS mode, no fork per rule).

import SluiceCore

/// Installs, checks and deletes ``JumpRule``s.
public struct JumpInstaller: Sendable {
    /// The binaries called.
    public let tools: IPTablesTools
    /// How they are run.
    public let runner: any CommandRunner

    /// Creates an installer.
    public init(tools: IPTablesTools, runner: any CommandRunner) {
        self.tools = tools
        self.runner = runner
    }

    /// Whether `rule` is in its built-in chain (`iptables -C`); false when it cannot tell.
    public func hasJump(_ rule: JumpRule) async -> Bool {
        let r = await runner.run(tools.iptables, IPTablesTools.locked(rule.table, ["-C", rule.source] + rule.ruleArgs), input: nil)
        if case .success(let res) = r, res.status == 0 { return true }
        return false
    }

    /// Creates `chain` in `table` unless it exists (`iptables -N`; an existing chain is not an error).
    /// - Throws: ``IPTablesError`` when the tool cannot be run.
    public func ensureChain(_ chain: String, in table: Table) async throws {
        let r = await runner.run(tools.iptables, IPTablesTools.locked(table, ["-N", chain]), input: nil)
        if case .failure(let e) = r { throw IPTablesError(operation: "creating chain \(chain)", underlying: e) }
    }

    /// Installs `rule` at its position unless it is already there (kube-proxy's EnsureRule).
    /// Its target chain must exist.
    /// - Throws: ``IPTablesError`` when iptables refuses the rule.
    public func ensureJump(_ rule: JumpRule) async throws {
        if await hasJump(rule) { return }
        do {
            _ = try await runner.check(tools.iptables, IPTablesTools.locked(rule.table, Self.placement(rule) + rule.ruleArgs))
        } catch {
            throw IPTablesError(operation: "installing the \(rule.source) -> \(rule.target) jump", underlying: error)
        }
    }

    /// Deletes every copy of `rule` (a rule may have been inserted more than once); never fails.
    public func delete(_ rule: JumpRule) async {
        for _ in 0..<16 {
            let r = await runner.run(tools.iptables, IPTablesTools.locked(rule.table, ["-D", rule.source] + rule.ruleArgs), input: nil)
            guard case .success(let res) = r, res.status == 0 else { return }
        }
    }

    /// `-I <chain> 1` or `-A <chain>`, by the rule's position.
    static func placement(_ rule: JumpRule) -> [String] {
        switch rule.position {
        case .first: return ["-I", rule.source, "1"]
        case .last: return ["-A", rule.source]
        }
    }

    // MARK: Inside a restore batch

    /// How `iptables-save` prints a jump rule.
    public static func saveLine(_ r: JumpRule) -> String {
        "-A \(r.source) " + quoted(r)
    }

    /// The restore line that installs `r` at its position.
    public static func insertLine(_ r: JumpRule) -> String {
        placement(r).joined(separator: " ") + " " + quoted(r)
    }

    private static func quoted(_ r: JumpRule) -> String {
        (r.extraArgs + ["-m", "comment", "--comment", "\"\(r.comment)\"", "-j", r.target]).joined(separator: " ")
    }

    /// The rules of `rules` in `table` that `save` (that table's `iptables-save` output) lacks.
    public static func missing(_ rules: [JumpRule], in table: Table, save: String) -> [JumpRule] {
        let lines = Set(save.split(separator: "\n").map(String.init))
        return rules.filter { $0.table == table && !lines.contains(saveLine($0)) }
    }

    /// `-D` lines deleting every copy of `rules` in `table` that `save` lists.
    public static func deleteLines(_ rules: [JumpRule], in table: Table, save: String) -> [String] {
        let lines = save.split(separator: "\n").map(String.init)
        var out: [String] = []
        for rule in rules where rule.table == table {
            let line = saveLine(rule)
            for l in lines where l == line { out.append("-D" + l.dropFirst(2)) }
        }
        return out
    }

    /// `text` (a restore batch) with the insertion lines of `missing` added before each
    /// table's COMMIT.
    public static func inserting(_ missing: [Table: [JumpRule]], into text: String) -> String {
        var out = ""
        var table: Table?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("*") { table = Table(rawValue: String(line.dropFirst())) }
            if line == "COMMIT", let table {
                for r in missing[table] ?? [] { out += insertLine(r) + "\n" }
            }
            out += line
            out += "\n"
        }
        return String(out.dropLast())
    }
}
