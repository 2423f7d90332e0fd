// Sluice: a per-node Kubernetes service proxy.
// A Go-style duration flag (`30s`, `1m0s`, `250ms`), parsed once where it is read: from the
// command line (`ExpressibleByArgument`) or from the configuration file.

import ArgumentParser
import SluiceCore

/// A non-negative Go duration as given, with its parsed value.
struct FlagDuration: Sendable, Hashable, CustomStringConvertible {
    /// The text as the operator wrote it (what `--write-config-to` writes back).
    let text: String
    /// The parsed value.
    let value: Duration

    /// Parses `text`; nil when it is no non-negative Go duration.
    init?(_ text: String) {
        guard let d = GoDuration.parse(text), d >= .zero else { return nil }
        self.text = text
        self.value = d
    }

    /// A literal default that is known to parse.
    init(default text: StaticString) {
        self = FlagDuration("\(text)")!
    }

    var description: String { text }
}

extension FlagDuration: ExpressibleByArgument {
    /// Parses a command-line value; ArgumentParser names the flag when it fails.
    init?(argument: String) { self.init(argument) }

    /// The default as `--help` shows it.
    var defaultValueDescription: String { text }
}
