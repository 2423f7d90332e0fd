// Sluice: a per-node Kubernetes service proxy.
// Log lines carry names from manifest files and API objects; a control character in one
// (a newline, ESC) must not forge a second log line or drive the operator's terminal.

import Logging

/// Escapes control characters for a single-line log message.
public enum LogText {
    /// `text` with every control character written out: `\n`, `\r`, `\t`, `\\` stay readable,
    /// other C0 and C1 controls, DEL and the Unicode line and paragraph separators become
    /// `\u{XX}`. Everything else, including non-ASCII letters, is kept.
    public static func escaped(_ text: String) -> String {
        guard text.unicodeScalars.contains(where: needsEscape) else { return text }
        var out = ""
        out.reserveCapacity(text.utf8.count + 8)
        for s in text.unicodeScalars {
            switch s {
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where needsEscape(s): out += "\\u{" + String(s.value, radix: 16) + "}"
            default: out.unicodeScalars.append(s)
            }
        }
        return out
    }

    private static func needsEscape(_ s: Unicode.Scalar) -> Bool {
        s.value < 0x20 || (0x7f...0x9f).contains(s.value) || s.value == 0x2028 || s.value == 0x2029
    }
}

/// A log handler that escapes control characters in the message and metadata values, then
/// hands the event to the handler it wraps.
public struct EscapingLogHandler: LogHandler {
    /// The handler that writes.
    public var wrapped: any LogHandler

    /// Wraps `handler`.
    public init(_ handler: any LogHandler) { wrapped = handler }

    public var logLevel: Logger.Level {
        get { wrapped.logLevel }
        set { wrapped.logLevel = newValue }
    }

    public var metadata: Logger.Metadata {
        get { wrapped.metadata }
        set { wrapped.metadata = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { wrapped.metadataProvider }
        set { wrapped.metadataProvider = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { wrapped[metadataKey: key] }
        set { wrapped[metadataKey: key] = newValue }
    }

    public func log(event: LogEvent) {
        var e = event
        e.message = Logger.Message(stringLiteral: LogText.escaped(event.message.description))
        if let m = event.metadata { e.metadata = m.mapValues { .string(LogText.escaped($0.description)) } }
        wrapped.log(event: e)
    }
}
