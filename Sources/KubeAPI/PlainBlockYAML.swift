// Sluice: a per-node Kubernetes service proxy.
// A fast path for the plainest block YAML (what generators and `kubectl get -o yaml` write for
// the objects the proxy reads): block mappings and sequences of single-line plain scalars.
// Anything else is declined, and the caller parses the text with Yams as before.

import Foundation

/// Multi-document block YAML of plain scalars into the plain trees `YAMLTrees` builds, without
/// building a YAML node tree first.
///
/// The accepted subset: `---` separators, full-line and ` #` trailing comments, block mappings
/// (`key: value`, `key:` followed by a deeper block or by a sequence at the key's indentation)
/// and block sequences (`- value`, `- key: value` compact mappings, `-` followed by a deeper
/// block) of single-line plain scalars, spaces for indentation, ASCII only. Scalars are resolved
/// as `YAMLTrees` resolves a plain untagged scalar (`YAMLTrees.resolvePlain`); keys stay strings.
///
/// Everything outside the subset makes `documents` return nil, never a different tree: quotes,
/// flow collections, anchors, aliases, tags, block scalars, multi-line scalars, merge keys,
/// complex keys, directives, tabs, carriage returns, non-ASCII bytes, empty documents, a
/// duplicated key, a root that is not a mapping, nesting deeper than half `maximumDepth`, and
/// every syntax error. So Yams still decides every error and every limit: the alias and
/// expansion limits (a text without aliases is accepted here), and the depth limit (a deep
/// text is left to Yams and `ManifestLimits`).
enum PlainBlockYAML {
    /// The documents of `text`, or nil when it is not in the subset.
    static func documents(_ text: String, maximumDepth: Int) -> [Any]? {
        var text = text
        return text.withUTF8 { bytes in
            var parser = Parser(bytes: bytes, maximumNesting: max(1, maximumDepth / 2))
            return parser.documents()
        }
    }

    /// One content line: its indentation and its bytes, without the comment and the trailing
    /// spaces.
    private struct Line {
        var indent: Int
        var start: Int
        var end: Int
    }

    private struct Declined: Error {}

    private struct Parser {
        let bytes: UnsafeBufferPointer<UInt8>
        let maximumNesting: Int
        var lines: [Line] = []
        var i = 0
        var end = 0

        init(bytes: UnsafeBufferPointer<UInt8>, maximumNesting: Int) {
            self.bytes = bytes
            self.maximumNesting = maximumNesting
        }

        mutating func documents() -> [Any]? {
            // Lines, split into documents at `---`.
            var docs: [Range<Int>] = []
            var docStart = 0
            var sawSeparator = false
            var p = 0
            let n = bytes.count
            while p < n {
                var q = p
                while q < n && bytes[q] != 0x0A { q += 1 }
                for k in p..<q where bytes[k] < 0x20 || bytes[k] >= 0x7F { return nil }
                var indent = 0
                while p + indent < q && bytes[p + indent] == 0x20 { indent += 1 }
                let s = p + indent
                // The content ends at a comment: `#` at its start or after a space.
                var e = s
                while e < q && !(bytes[e] == UInt8(ascii: "#") && (e == s || bytes[e - 1] == 0x20)) { e += 1 }
                while e > s && bytes[e - 1] == 0x20 { e -= 1 }
                p = q + 1
                if e == s { continue }
                if indent == 0 && bytes[s] == UInt8(ascii: "-") && e - s >= 3 && bytes[s + 1] == UInt8(ascii: "-")
                    && bytes[s + 2] == UInt8(ascii: "-") {
                    // `---` alone separates documents; `--- text` or `---x` is not for this path.
                    guard e - s == 3 else { return nil }
                    if sawSeparator || !lines.isEmpty {
                        if docStart == lines.count { return nil }  // an empty document
                        docs.append(docStart..<lines.count)
                    }
                    sawSeparator = true
                    docStart = lines.count
                    continue
                }
                if indent == 0 && (bytes[s] == UInt8(ascii: "%") || (bytes[s] == UInt8(ascii: ".") && e - s >= 3
                    && bytes[s + 1] == UInt8(ascii: ".") && bytes[s + 2] == UInt8(ascii: "."))) {
                    return nil
                }
                lines.append(Line(indent: indent, start: s, end: e))
            }
            if docStart < lines.count {
                docs.append(docStart..<lines.count)
            } else if sawSeparator {
                return nil  // `---` with nothing after it: an empty document
            }
            var out: [Any] = []
            out.reserveCapacity(docs.count)
            do {
                for d in docs {
                    i = d.lowerBound
                    end = d.upperBound
                    guard !isSequenceItem(lines[i]) else { return nil }
                    out.append(try mapping(indent: lines[i].indent, nesting: 1))
                    guard i == end else { return nil }
                }
            } catch {
                return nil
            }
            return out
        }

        private func isSequenceItem(_ l: Line) -> Bool {
            bytes[l.start] == UInt8(ascii: "-") && (l.end == l.start + 1 || bytes[l.start + 1] == 0x20)
        }

        private func string(_ s: Int, _ e: Int) -> String {
            String(decoding: UnsafeBufferPointer(rebasing: bytes[s..<e]), as: UTF8.self)
        }

        /// A plain scalar's value, as `YAMLTrees.resolvePlain` makes it, without its work for the
        /// text that can only be a string: a first letter that starts no bool or null word, or
        /// two dots (an IPv4 address; no int or float has more than one).
        private func scalar(_ s: Int, _ e: Int) -> Any {
            switch bytes[s] {
            case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "+"), UInt8(ascii: "."):
                var dots = 0
                for k in s..<e where bytes[k] == UInt8(ascii: ".") { dots += 1 }
                return dots >= 2 ? string(s, e) : YAMLTrees.resolvePlain(string(s, e))
            case UInt8(ascii: "~"), UInt8(ascii: "y"), UInt8(ascii: "Y"), UInt8(ascii: "n"), UInt8(ascii: "N"), UInt8(ascii: "o"),
                 UInt8(ascii: "O"), UInt8(ascii: "t"), UInt8(ascii: "T"), UInt8(ascii: "f"), UInt8(ascii: "F"):
                return YAMLTrees.resolvePlain(string(s, e))
            default:
                return string(s, e)
            }
        }

        /// Where the `: ` (or the final `:`) that ends a key is, if the line is a mapping entry.
        private func colon(_ l: Line) -> Int? {
            var k = l.start
            while k < l.end {
                if bytes[k] == UInt8(ascii: ":") && (k + 1 == l.end || bytes[k + 1] == 0x20) { return k }
                k += 1
            }
            return nil
        }

        /// Whether bytes s..<e (non-empty, trimmed) can be a plain scalar here: no indicator
        /// at its start, no `: ` inside and no `:` at its end.
        private func plain(_ s: Int, _ e: Int) -> Bool {
            guard s < e else { return false }
            switch bytes[s] {
            case UInt8(ascii: "-"), UInt8(ascii: "?"), UInt8(ascii: ":"):
                if s + 1 == e || bytes[s + 1] == 0x20 { return false }
            case UInt8(ascii: ","), UInt8(ascii: "["), UInt8(ascii: "]"), UInt8(ascii: "{"), UInt8(ascii: "}"),
                 UInt8(ascii: "#"), UInt8(ascii: "&"), UInt8(ascii: "*"), UInt8(ascii: "!"), UInt8(ascii: "|"),
                 UInt8(ascii: ">"), UInt8(ascii: "'"), UInt8(ascii: "\""), UInt8(ascii: "%"), UInt8(ascii: "@"),
                 UInt8(ascii: "`"):
                return false
            default:
                break
            }
            if bytes[e - 1] == UInt8(ascii: ":") { return false }
            var k = s
            while k + 1 < e {
                if bytes[k] == UInt8(ascii: ":") && bytes[k + 1] == 0x20 { return false }
                k += 1
            }
            return true
        }

        /// A block mapping whose keys are at `indent`, starting at line `i`.
        private mutating func mapping(indent: Int, nesting: Int) throws(Declined) -> [String: Any] {
            guard nesting <= maximumNesting else { throw Declined() }
            var out: [String: Any] = [:]
            while i < end {
                let l = lines[i]
                if l.indent < indent { break }
                guard l.indent == indent, !isSequenceItem(l), let c = colon(l) else { throw Declined() }
                var ke = c
                while ke > l.start && bytes[ke - 1] == 0x20 { ke -= 1 }
                guard plain(l.start, ke) else { throw Declined() }
                let key = string(l.start, ke)
                guard key != "<<", out[key] == nil else { throw Declined() }
                var vs = c + 1
                while vs < l.end && bytes[vs] == 0x20 { vs += 1 }
                i += 1
                if vs == l.end {
                    if i < end && lines[i].indent > indent {
                        out[key] = try block(nesting: nesting + 1)
                    } else if i < end && lines[i].indent == indent && isSequenceItem(lines[i]) {
                        out[key] = try sequence(indent: indent, nesting: nesting + 1)
                    } else {
                        out[key] = NSNull()
                    }
                } else {
                    guard plain(vs, l.end), i == end || lines[i].indent <= indent else { throw Declined() }
                    out[key] = scalar(vs, l.end)
                }
            }
            return out
        }

        /// The block node that starts at line `i` (deeper than its parent).
        private mutating func block(nesting: Int) throws(Declined) -> Any {
            let l = lines[i]
            if isSequenceItem(l) { return try sequence(indent: l.indent, nesting: nesting) }
            return try mapping(indent: l.indent, nesting: nesting)
        }

        /// A block sequence whose `-` are at `indent`, starting at line `i`.
        private mutating func sequence(indent: Int, nesting: Int) throws(Declined) -> [Any] {
            guard nesting <= maximumNesting else { throw Declined() }
            var out: [Any] = []
            while i < end {
                let l = lines[i]
                if l.indent < indent || (l.indent == indent && !isSequenceItem(l)) { break }
                guard l.indent == indent else { throw Declined() }
                var s = l.start + 1
                while s < l.end && bytes[s] == 0x20 { s += 1 }
                if s == l.end {
                    // `-` alone: the item is the deeper block below, or null.
                    i += 1
                    if i < end && lines[i].indent > indent {
                        out.append(try block(nesting: nesting + 1))
                    } else {
                        out.append(NSNull())
                    }
                    continue
                }
                // The item's content, as a line of its own at its column.
                let item = Line(indent: indent + (s - l.start), start: s, end: l.end)
                if isSequenceItem(item) { throw Declined() }  // `- - x`
                if colon(item) != nil {
                    lines[i] = item
                    out.append(try mapping(indent: item.indent, nesting: nesting + 1))
                } else {
                    i += 1
                    guard plain(s, l.end), i == end || lines[i].indent <= indent else { throw Declined() }
                    out.append(scalar(s, l.end))
                }
            }
            return out
        }
    }
}
