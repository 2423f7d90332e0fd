// Sluice: a per-node Kubernetes service proxy.
// JSON for the API client: parsing into the plain trees ObjectDecoder reads, and splitting a
// watch stream into events however the bytes arrive (one event across many chunks, many events
// in one chunk, a broken event in the middle).

import Foundation

/// Parses JSON into plain Swift values (`String`, `Int`, `Double`, `Bool`, `[Any]`,
/// `[String: Any]`, `NSNull`).
///
/// Foundation's JSONSerialization returns NSNumber, which on Linux casts `1` and `0` to `Bool`
/// as well as to `Int`; ObjectDecoder must be able to tell `port: 1` from `ready: true`, so
/// numbers are normalised by their real type.
enum JSONTree {
    private static let booleanType = type(of: NSNumber(value: true))

    /// Parses one JSON document (with `JSONScanner`, which gives these types directly).
    static func parse(_ bytes: some Collection<UInt8>) throws -> Any {
        try JSONScanner.parse(bytes)
    }

    /// Parses one JSON document that must be an object.
    static func parseObject(_ bytes: some Collection<UInt8>) throws -> [String: Any] {
        guard let o = try parse(bytes) as? [String: Any] else { throw JSONShapeError(message: "not a JSON object") }
        return o
    }

    static func normalise(_ value: Any) -> Any {
        switch value {
        case let m as [String: Any]:
            var out: [String: Any] = [:]
            out.reserveCapacity(m.count)
            for (k, v) in m { out[k] = normalise(v) }
            return out
        case let l as [Any]:
            return l.map(normalise)
        case let s as String:
            return s
        case let n as NSNumber:
            if type(of: n) == booleanType { return n.boolValue }
            let t = String(cString: n.objCType)
            if t == "d" || t == "f" {
                let d = n.doubleValue
                return d == d.rounded() && abs(d) < 1e15 ? Int(d) as Any : d
            }
            return n.intValue
        default:
            return value
        }
    }
}

/// A JSON value that does not have the expected shape.
struct JSONShapeError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// Splits a byte stream of concatenated JSON objects into one frame per object.
///
/// The API server ends every watch event with a newline, but the framing does not rely on it:
/// it tracks strings, escapes and brace depth, so objects may also follow each other directly.
/// A newline inside an object (JSON from the API server never has one: the encoder escapes them)
/// or non-JSON bytes between objects end a malformed frame, so one broken event costs that event
/// and nothing after it.
public struct JSONFrameSplitter: Sendable {
    /// One piece of the stream.
    public enum Frame: Sendable, Equatable {
        /// The bytes of one complete top-level object.
        case object([UInt8])
        /// Bytes that cannot be an object, with the reason; the splitter has resynchronised.
        case malformed(reason: String, prefix: String)
    }

    /// Frames longer than this are dropped as malformed (the largest legitimate object, a
    /// 1000-endpoint slice, is well under 1 MiB).
    public var maximumFrameBytes: Int

    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var garbage = false
    private var oversized = false

    /// Creates a splitter.
    public init(maximumFrameBytes: Int = 16 << 20) {
        self.maximumFrameBytes = maximumFrameBytes
    }

    /// Bytes held for an unfinished frame.
    public var pendingBytes: Int { buffer.count }

    /// Feeds bytes; returns every frame they complete, in order.
    public mutating func append(_ bytes: some Sequence<UInt8>) -> [Frame] {
        var frames: [Frame] = []
        for b in bytes {
            if garbage {
                // Skip to the end of the line, then report it once.
                if b == UInt8(ascii: "\n") {
                    frames.append(malformed("text between events is not JSON"))
                } else if buffer.count < 64 {
                    buffer.append(b)
                }
                continue
            }
            if depth == 0 {
                switch b {
                case UInt8(ascii: "{"):
                    buffer.append(b)
                    depth = 1
                case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"):
                    continue
                default:
                    garbage = true
                    buffer = [b]
                }
                continue
            }
            if b == UInt8(ascii: "\n") {
                // Compact JSON never contains a raw newline: the frame is cut short.
                frames.append(malformed(oversized ? "event larger than \(maximumFrameBytes) bytes" : "event ends before its closing brace"))
                continue
            }
            if !oversized {
                if buffer.count >= maximumFrameBytes {
                    oversized = true
                    buffer.removeLast(buffer.count - 64)
                } else {
                    buffer.append(b)
                }
            }
            if inString {
                if escaped {
                    escaped = false
                } else if b == UInt8(ascii: "\\") {
                    escaped = true
                } else if b == UInt8(ascii: "\"") {
                    inString = false
                }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["): depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth == 0 {
                    if oversized {
                        frames.append(malformed("event larger than \(maximumFrameBytes) bytes"))
                    } else {
                        frames.append(.object(buffer))
                        buffer.removeAll(keepingCapacity: true)
                    }
                }
            default: break
            }
        }
        return frames
    }

    /// Called when the stream ends: an unfinished frame is malformed.
    public mutating func finish() -> [Frame] {
        guard depth > 0 || garbage else { return [] }
        return [malformed("stream ended inside an event")]
    }

    private mutating func malformed(_ reason: String) -> Frame {
        let prefix = String(decoding: buffer.prefix(64), as: UTF8.self)
        buffer.removeAll(keepingCapacity: true)
        depth = 0
        inString = false
        escaped = false
        garbage = false
        oversized = false
        return .malformed(reason: reason, prefix: prefix)
    }
}
