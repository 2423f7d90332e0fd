// Sluice: a per-node Kubernetes service proxy.
// The one iptables-restore call (with its flags and lock handling) and the one iptables-save
// read every mode uses.

import SluiceCore

/// Applies restore batches with `iptables-restore` / `ip6tables-restore` (nft or legacy, as
/// the tools say), and reads tables back with `iptables-save`.
///
/// Every batch is written with `--noflush` (the chains it declares are replaced whole,
/// everything else is left alone, and the batch applies atomically), waiting up to 5 s for
/// the xtables lock and polling it every 100 ms (`-w 5 -W 100000`), the payload on standard
/// input. A refused batch throws ``IPTablesError`` with the tool's stderr and exit status.
public struct IPTablesRestorer: Sendable {
    /// The binaries called.
    public let tools: IPTablesTools
    /// How they are run.
    public let runner: any CommandRunner

    /// Creates a restorer.
    public init(tools: IPTablesTools, runner: any CommandRunner) {
        self.tools = tools
        self.runner = runner
    }

    /// Seconds to wait for the xtables lock (`-w`).
    public static let lockWaitSeconds = 5
    /// Microseconds between attempts at the lock (`-W`).
    public static let lockIntervalMicroseconds = 100_000

    /// The restore command's arguments.
    /// - Parameter counters: `--counters`: the batch's `[packets:bytes]` counters are set
    ///   (kube-proxy's batches carry `[0:0]`).
    public static func arguments(counters: Bool) -> [String] {
        ["-w", "\(lockWaitSeconds)", "-W", "\(lockIntervalMicroseconds)", "--noflush"] + (counters ? ["--counters"] : [])
    }

    /// Applies `text` (a whole batch: `*table` ... `COMMIT`).
    /// - Parameters:
    ///   - counters: pass `--counters`.
    ///   - operation: what the batch is for, for the error message.
    /// - Throws: ``IPTablesError`` with the tool's message when the batch is refused.
    public func restore(_ text: String, counters: Bool = false, operation: String) async throws {
        try await restore(.text(text), counters: counters, operation: operation)
    }

    /// Applies a batch made as it is written (``CommandInput/pieces(_:)``): a full sync's
    /// payload is never whole in memory.
    /// - Throws: ``IPTablesError`` with the tool's message when the batch is refused.
    public func restore(_ input: CommandInput, counters: Bool = false, operation: String) async throws {
        do {
            _ = try await runner.check(tools.restore, Self.arguments(counters: counters), streaming: input)
        } catch {
            throw IPTablesError(operation: operation, underlying: error)
        }
    }

    /// A batch that removes chains from `table`: `emptied` are declared (so flushed),
    /// `ruleLines` (e.g. `-D` lines of jumps into them) follow, then `deleted` (a subset of
    /// `emptied`) are removed with `-X`.
    public static func removalBatch(_ table: Table, emptied: [String], ruleLines: [String] = [], deleted: [String]) -> String {
        var text = "*\(table.rawValue)\n"
        for c in emptied { text += ":\(c) - [0:0]\n" }
        for l in ruleLines { text += l + "\n" }
        for c in deleted { text += "-X \(c)\n" }
        return text + "COMMIT\n"
    }

    /// Removes a mode's footprint: its jumps one by one (every copy), then in one restore per
    /// table the chains it owns that exist.
    /// - Parameter log: told how many chains each table lost.
    /// - Throws: ``IPTablesError`` when a table's batch is refused.
    public func remove(_ footprint: IPTablesFootprint, log: (Table, Int) -> Void = { _, _ in }) async throws {
        let jumps = JumpInstaller(tools: tools, runner: runner)
        for rule in footprint.jumps { await jumps.delete(rule) }
        for table in footprint.tables {
            let present = (try? await chains(in: table)) ?? []
            let doomed = present.filter { footprint.owns(table, $0) }.sorted()
            if doomed.isEmpty { continue }
            try await restore(Self.removalBatch(table, emptied: doomed, deleted: doomed),
                              operation: "removing chains from the \(table.rawValue) table")
            log(table, doomed.count)
        }
    }

    /// `iptables-save -t <table>` output.
    /// - Throws: ``IPTablesError`` when the tool fails.
    public func save(_ table: Table) async throws -> String {
        do {
            return try await runner.check(tools.save, ["-t", table.rawValue]).stdout
        } catch {
            throw IPTablesError(operation: "reading the \(table.rawValue) table", underlying: error)
        }
    }

    /// Chain names currently in `table`.
    public func chains(in table: Table) async throws -> Set<String> {
        Self.parseChains(try await save(table))
    }

    /// Chain names declared in `iptables-save` output.
    public static func parseChains(_ save: String) -> Set<String> {
        var out = Set<String>()
        let utf8 = save.utf8
        var i = utf8.startIndex
        // Only the `:CHAIN` lines, without splitting the (tens of megabytes of) rules into lines.
        while i < utf8.endIndex {
            let end = utf8[i...].firstIndex(of: UInt8(ascii: "\n")) ?? utf8.endIndex
            if utf8[i] == UInt8(ascii: ":") {
                let start = utf8.index(after: i)
                let nameEnd = utf8[start..<end].firstIndex(of: UInt8(ascii: " ")) ?? end
                out.insert(String(Substring(utf8[start..<nameEnd])))
            }
            i = end < utf8.endIndex ? utf8.index(after: end) : end
        }
        return out
    }
}
