// Sluice: a per-node Kubernetes service proxy.
// The one `iptables --version` probe: which back end (nf_tables or legacy) the binary drives,
// its version, and what follows from it.

import SluiceCore

/// The kernel interface an iptables binary drives.
public enum IPTablesBackendKind: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// `iptables-nft`: the nf_tables kernel API.
    case nft = "nf_tables"
    /// `iptables-legacy`: the x_tables kernel API.
    case legacy

    public var description: String { rawValue }
}

/// Facts about the installed iptables, read once at start-up.
public struct IPTablesFeatures: Sendable, Hashable {
    /// e.g. "1.8.9".
    public var version: String
    /// The back end the binary drives.
    public var mode: IPTablesBackendKind
    /// `--random-fully` is supported (>= 1.6.2).
    public var randomFully: Bool

    /// Creates features.
    public init(version: String, mode: IPTablesBackendKind, randomFully: Bool) {
        self.version = version
        self.mode = mode
        self.randomFully = randomFully
    }

    /// Parses `iptables --version` output such as `iptables v1.8.9 (nf_tables)`.
    public static func parse(_ text: String) -> IPTablesFeatures? {
        guard let vRange = text.range(of: " v") else { return nil }
        let rest = text[vRange.upperBound...]
        let version = String(rest.prefix { $0.isNumber || $0 == "." })
        let nums = version.split(separator: ".").compactMap { Int($0) }
        guard nums.count >= 2 else { return nil }
        let mode: IPTablesBackendKind = text.contains("nf_tables") ? .nft : .legacy
        let padded = nums + [0, 0, 0]
        let atLeast162 = (padded[0], padded[1], padded[2]) >= (1, 6, 2)
        return IPTablesFeatures(version: version, mode: mode, randomFully: atLeast162)
    }

    /// Runs `<iptables> --version` and parses it; nil when it prints something that is not
    /// a version.
    /// - Throws: ``IPTablesError`` when the tool cannot be run or fails.
    public static func probe(_ tools: IPTablesTools, runner: any CommandRunner) async throws -> IPTablesFeatures? {
        do {
            let out = try await runner.check(tools.iptables, ["--version"])
            return parse(out.stdout + out.stderr)
        } catch {
            throw IPTablesError(operation: "probing \(tools.iptables)", underlying: error)
        }
    }

    /// ``probe(_:runner:)``, with unrecognised version text an error too.
    public static func require(_ tools: IPTablesTools, runner: any CommandRunner) async throws -> IPTablesFeatures {
        guard let features = try await probe(tools, runner: runner) else {
            throw IPTablesError(operation: "probing \(tools.iptables)",
                                underlying: CommandError(command: "\(tools.iptables) --version", status: 0, message: "unrecognised version text"))
        }
        return features
    }
}

/// `--random-fully` on MASQUERADE rules: as the installed iptables supports it, or forced.
public enum RandomFullyMode: String, Sendable, Hashable, CaseIterable {
    /// Ask the installed iptables (`iptables --version` >= 1.6.2); on if it cannot be asked.
    case auto
    /// Always.
    case `true`
    /// Never.
    case `false`

    /// Whether to add `--random-fully`, probing `tools` only for `auto`.
    public func resolve(_ tools: IPTablesTools, runner: any CommandRunner) async -> Bool {
        switch self {
        case .true: return true
        case .false: return false
        case .auto: return ((try? await IPTablesFeatures.probe(tools, runner: runner)) ?? nil)?.randomFully ?? true
        }
    }
}
