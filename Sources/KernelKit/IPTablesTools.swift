// Sluice: a per-node Kubernetes service proxy.
// The kernel kit: what every mode that writes iptables rules or sysctls shares. This file
// names the tools (which binaries, which flavour), the tables, the jump rules from built-in
// chains, and the one error a failed tool call becomes. The restorer, the jump installer,
// the version probe and the sysctl writer are beside it; each mode declares its own chains,
// jumps and clean-up and goes through these.

import SluiceCore

/// An iptables table.
public enum Table: String, Sendable, Hashable, CaseIterable {
    case filter, nat, mangle
}

/// Which iptables binaries to call.
public enum IPTablesVariant: String, Sendable, Hashable, CaseIterable {
    /// Whatever `iptables` is on this host (Debian's alternatives pick nft by default).
    case auto
    /// `iptables-nft*`.
    case nft
    /// `iptables-legacy*`.
    case legacy
}

/// The three binaries of one iptables flavour and family.
public struct IPTablesTools: Sendable, Hashable {
    public var iptables: String
    public var restore: String
    public var save: String

    /// Tool names for a variant and family.
    public init(variant: IPTablesVariant, family: IPFamily) {
        let base = family == .ipv4 ? "iptables" : "ip6tables"
        let suffix = variant == .auto ? "" : "-\(variant.rawValue)"
        iptables = base + suffix
        restore = base + suffix + "-restore"
        save = base + suffix + "-save"
    }

    /// Arguments of one `iptables` call on `table`, waiting for the xtables lock as the
    /// restorer does (`-w 5 -t <table> ...`).
    public static func locked(_ table: Table, _ arguments: [String]) -> [String] {
        ["-w", "\(IPTablesRestorer.lockWaitSeconds)", "-t", table.rawValue] + arguments
    }
}

/// A failed iptables tool call, in any mode: what the mode was doing, and the command with
/// the tool's exit status and its own message (stderr).
public struct IPTablesError: Error, Sendable, CustomStringConvertible {
    /// What the backend was doing.
    public var operation: String
    /// The failed command.
    public var underlying: CommandError

    /// Creates an error.
    public init(operation: String, underlying: CommandError) {
        self.operation = operation
        self.underlying = underlying
    }

    public var description: String { "\(operation): \(underlying)" }
}

/// A rule in a built-in chain that jumps to one of a mode's chains, installed outside the
/// mode's restore batch (or inserted into it, see ``JumpInstaller``).
public struct JumpRule: Sendable, Hashable {
    public var table: Table
    /// The built-in chain holding the rule (INPUT, FORWARD, ...).
    public var source: String
    /// Our chain it jumps to.
    public var target: String
    /// The rule's comment ("" for none).
    public var comment: String
    /// Extra match arguments placed before the comment.
    public var extraArgs: [String]
    /// Where the rule goes when it is missing: first in the chain (`-I CHAIN 1`) or last (`-A`).
    public var position: JumpPosition = .first

    /// Creates a jump rule `-A <source> [extraArgs] -m comment --comment <comment> -j <target>` in `table`.
    public init(table: Table, source: String, target: String, comment: String, extraArgs: [String], position: JumpPosition = .first) {
        self.table = table
        self.source = source
        self.target = target
        self.comment = comment
        self.extraArgs = extraArgs
        self.position = position
    }

    /// Creates a jump rule `-A <source> [extraArgs] -m comment --comment <comment> -j <target>` in `table`.
    public init(_ table: Table, from source: String, to target: String, comment: String, extraArgs: [String] = []) {
        self.init(table: table, source: source, target: target, comment: comment, extraArgs: extraArgs)
    }

    /// The rule's arguments after `-A/-I/-C/-D <chain>`: extra args, comment, jump.
    public var ruleArgs: [String] {
        var a = extraArgs
        if !comment.isEmpty { a += ["-m", "comment", "--comment", comment] }
        return a + ["-j", target]
    }
}

/// Where a jump rule is installed in its built-in chain.
public enum JumpPosition: Sendable, Hashable {
    /// `-I CHAIN 1`.
    case first
    /// `-A CHAIN`.
    case last
}

/// What a mode owns in iptables, so that its clean-up (and another mode's start-up) can
/// remove it: the jumps from built-in chains, and its chains per table.
public struct IPTablesFootprint: Sendable {
    /// Jumps from built-in chains into the mode's chains (deleted first).
    public var jumps: [JumpRule]
    /// The tables the mode's chains live in, in the order they are cleaned.
    public var tables: [Table]
    /// Whether a chain of `table` is the mode's (and is to be removed).
    public var owns: @Sendable (Table, String) -> Bool

    /// Creates a footprint.
    public init(jumps: [JumpRule], tables: [Table], owns: @escaping @Sendable (Table, String) -> Bool) {
        self.jumps = jumps
        self.tables = tables
        self.owns = owns
    }
}
