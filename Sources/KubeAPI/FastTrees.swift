// Sluice: a per-node Kubernetes service proxy.
// Fast readers into the plain trees ObjectDecoder reads: a JSON parser over bytes (no
// Foundation objects, a List's items handed over one at a time so a page is never held as a
// tree), and YAML documents built from Yams' node tree with the YAML 1.1 scalar rules of
// Yams' default resolver written out by hand (its regular expressions cost more than the
// parse itself).

import Foundation
import Yams

// MARK: - JSON

/// A JSON parser producing plain Swift values: `String`, `Int` (numbers without fraction or
/// exponent that fit, and integral ones below 10^15 as `JSONTree` normalises them), `Double`,
/// `Bool`, `NSNull`, `[Any]`, `[String: Any]` (the last of duplicated keys wins).
struct JSONScanner {
    /// Deeper nesting is refused while parsing, so a hostile document never recurses deeply.
    /// A Kubernetes list of EndpointSlices nests about 8 deep.
    static let maximumDepth = 100

    private let bytes: UnsafeBufferPointer<UInt8>
    private var i = 0
    private var depth = 0

    private init(_ bytes: UnsafeBufferPointer<UInt8>) { self.bytes = bytes }

    /// Parses one JSON document.
    static func parse(_ data: some Collection<UInt8>) throws(JSONShapeError) -> Any {
        try withBytes(data) { (buffer) throws(JSONShapeError) -> Any in
            var s = JSONScanner(buffer)
            let v = try s.value()
            try s.end()
            return v
        }
    }

    /// Parses a JSON object whose `items` member is a list, handing each item to `item` as
    /// soon as it is parsed (the tree of one item at a time, never of the whole list).
    /// - Returns: the object's other members.
    static func parseList(_ data: some Collection<UInt8>, item: (Any) -> Void) throws(JSONShapeError) -> [String: Any] {
        try withBytes(data) { (buffer) throws(JSONShapeError) -> [String: Any] in
            var s = JSONScanner(buffer)
            s.skipSpace()
            guard s.peek == UInt8(ascii: "{") else { throw s.error("not a JSON object") }
            s.i += 1
            var out: [String: Any] = [:]
            s.skipSpace()
            if s.peek == UInt8(ascii: "}") {
                s.i += 1
            } else {
                while true {
                    s.skipSpace()
                    let key = try s.string()
                    s.skipSpace()
                    try s.expect(UInt8(ascii: ":"))
                    s.skipSpace()
                    if key == "items" && s.peek == UInt8(ascii: "[") {
                        s.i += 1
                        s.skipSpace()
                        if s.peek == UInt8(ascii: "]") {
                            s.i += 1
                        } else {
                            while true {
                                s.skipSpace()
                                item(try s.value())
                                s.skipSpace()
                                if s.peek == UInt8(ascii: ",") { s.i += 1; continue }
                                try s.expect(UInt8(ascii: "]"))
                                break
                            }
                        }
                    } else {
                        out[key] = try s.value()
                    }
                    s.skipSpace()
                    if s.peek == UInt8(ascii: ",") { s.i += 1; continue }
                    try s.expect(UInt8(ascii: "}"))
                    break
                }
            }
            try s.end()
            return out
        }
    }

    private static func withBytes<T>(_ data: some Collection<UInt8>, _ body: (UnsafeBufferPointer<UInt8>) throws(JSONShapeError) -> T) throws(JSONShapeError) -> T {
        let result: Result<T, JSONShapeError>? = data.withContiguousStorageIfAvailable { buffer in
            do throws(JSONShapeError) { return .success(try body(buffer)) } catch { return .failure(error) }
        }
        if let result { return try result.get() }
        let copy = Array(data)
        let r: Result<T, JSONShapeError> = copy.withUnsafeBufferPointer { buffer in
            do throws(JSONShapeError) { return .success(try body(buffer)) } catch { return .failure(error) }
        }
        return try r.get()
    }

    private var peek: UInt8 { i < bytes.count ? bytes[i] : 0 }

    private func error(_ what: String) -> JSONShapeError {
        JSONShapeError(message: "invalid JSON at byte \(i): \(what)")
    }

    private mutating func skipSpace() {
        while i < bytes.count {
            switch bytes[i] {
            case 0x20, 0x0A, 0x0D, 0x09: i += 1
            default: return
            }
        }
    }

    private mutating func expect(_ b: UInt8) throws(JSONShapeError) {
        guard peek == b else { throw error("expected \"\(Character(Unicode.Scalar(b)))\"") }
        i += 1
    }

    private mutating func end() throws(JSONShapeError) {
        skipSpace()
        guard i == bytes.count else { throw error("text after the document") }
    }

    private mutating func value() throws(JSONShapeError) -> Any {
        skipSpace()
        guard i < bytes.count else { throw error("unexpected end") }
        switch bytes[i] {
        case UInt8(ascii: "{"): return try object()
        case UInt8(ascii: "["): return try array()
        case UInt8(ascii: "\""): return try string()
        case UInt8(ascii: "t"): try literal("true"); return true
        case UInt8(ascii: "f"): try literal("false"); return false
        case UInt8(ascii: "n"): try literal("null"); return NSNull()
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
        default: throw error("unexpected character")
        }
    }

    private mutating func literal(_ word: StaticString) throws(JSONShapeError) {
        let n = word.utf8CodeUnitCount
        guard i + n <= bytes.count else { throw error("unexpected end") }
        for k in 0..<n where bytes[i + k] != word.utf8Start[k] { throw error("unexpected character") }
        i += n
    }

    private mutating func object() throws(JSONShapeError) -> [String: Any] {
        depth += 1
        defer { depth -= 1 }
        guard depth <= JSONScanner.maximumDepth else { throw error("nested too deeply") }
        i += 1
        var out: [String: Any] = [:]
        skipSpace()
        if peek == UInt8(ascii: "}") {
            i += 1
            return out
        }
        while true {
            skipSpace()
            let key = try string()
            skipSpace()
            try expect(UInt8(ascii: ":"))
            out[key] = try value()
            skipSpace()
            if peek == UInt8(ascii: ",") {
                i += 1
                continue
            }
            try expect(UInt8(ascii: "}"))
            return out
        }
    }

    private mutating func array() throws(JSONShapeError) -> [Any] {
        depth += 1
        defer { depth -= 1 }
        guard depth <= JSONScanner.maximumDepth else { throw error("nested too deeply") }
        i += 1
        var out: [Any] = []
        skipSpace()
        if peek == UInt8(ascii: "]") {
            i += 1
            return out
        }
        while true {
            out.append(try value())
            skipSpace()
            if peek == UInt8(ascii: ",") {
                i += 1
                continue
            }
            try expect(UInt8(ascii: "]"))
            return out
        }
    }

    private mutating func string() throws(JSONShapeError) -> String {
        guard peek == UInt8(ascii: "\"") else { throw error("expected a string") }
        i += 1
        let start = i
        // Fast path: no escape.
        while i < bytes.count {
            let b = bytes[i]
            if b == UInt8(ascii: "\"") {
                let s = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<i]), as: UTF8.self)
                i += 1
                return s
            }
            if b == UInt8(ascii: "\\") { break }
            if b < 0x20 { throw error("control character in a string") }
            i += 1
        }
        var out = Array(bytes[start..<i])
        while i < bytes.count {
            let b = bytes[i]
            i += 1
            switch b {
            case UInt8(ascii: "\""):
                return String(decoding: out, as: UTF8.self)
            case UInt8(ascii: "\\"):
                guard i < bytes.count else { throw error("unexpected end") }
                let e = bytes[i]
                i += 1
                switch e {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if (0xD800..<0xDC00).contains(scalar) {
                        // A high surrogate must be followed by a low one.
                        if i + 1 < bytes.count, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") {
                            i += 2
                            let low = try hex4()
                            guard (0xDC00..<0xE000).contains(low) else { throw error("unpaired surrogate") }
                            scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                        } else {
                            throw error("unpaired surrogate")
                        }
                    } else if (0xDC00..<0xE000).contains(scalar) {
                        throw error("unpaired surrogate")
                    }
                    guard let u = Unicode.Scalar(scalar) else { throw error("invalid escape") }
                    out.append(contentsOf: Array(String(Character(u)).utf8))
                default:
                    throw error("invalid escape")
                }
            default:
                if b < 0x20 { throw error("control character in a string") }
                out.append(b)
            }
        }
        throw error("unterminated string")
    }

    private mutating func hex4() throws(JSONShapeError) -> UInt32 {
        guard i + 4 <= bytes.count else { throw error("unexpected end") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let b = bytes[i]
            let d: UInt32
            switch b {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(b - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(b - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(b - UInt8(ascii: "A") + 10)
            default: throw error("invalid \\u escape")
            }
            v = v << 4 | d
            i += 1
        }
        return v
    }

    private mutating func number() throws(JSONShapeError) -> Any {
        let start = i
        var negative = false
        if peek == UInt8(ascii: "-") {
            negative = true
            i += 1
        }
        guard i < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[i]) else { throw error("invalid number") }
        var value = 0
        var overflow = false
        if bytes[i] == UInt8(ascii: "0") {
            i += 1
        } else {
            while i < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[i]) {
                let (m, o1) = value.multipliedReportingOverflow(by: 10)
                let (a, o2) = m.addingReportingOverflow(Int(bytes[i] - UInt8(ascii: "0")))
                overflow = overflow || o1 || o2
                value = a
                i += 1
            }
        }
        var isInteger = true
        if peek == UInt8(ascii: ".") {
            isInteger = false
            i += 1
            guard i < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[i]) else { throw error("invalid number") }
            while i < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[i]) { i += 1 }
        }
        if peek == UInt8(ascii: "e") || peek == UInt8(ascii: "E") {
            isInteger = false
            i += 1
            if peek == UInt8(ascii: "+") || peek == UInt8(ascii: "-") { i += 1 }
            guard i < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[i]) else { throw error("invalid number") }
            while i < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[i]) { i += 1 }
        }
        if isInteger && !overflow { return negative ? -value : value }
        let text = String(decoding: UnsafeBufferPointer(rebasing: bytes[start..<i]), as: UTF8.self)
        guard let d = Double(text) else { throw error("invalid number") }
        return d == d.rounded() && abs(d) < 1e15 ? Int(d) as Any : d
    }
}

// MARK: - YAML

/// Multi-document YAML (JSON included) into plain trees, as Yams' `Node.any` builds them with
/// its default resolver, but with the scalar rules in code: `~`/`null`/empty are `NSNull`;
/// YAML 1.1 booleans (`true`, `yes`, `on`, ... in three casings) are `Bool`; YAML 1.1
/// integers (decimal, `0x`, `0o`/leading-0 octal, `0b`, base 60, `_` separators) are `Int`;
/// floats are `Double`. One difference: a timestamp stays a `String` (Yams makes a `Date`,
/// which no field the proxy reads can use).
enum YAMLTrees {
    /// Every document of `text`; a syntax error anywhere throws.
    /// - Parameter check: called with each YAML root before it is expanded into a tree (the
    ///   manifest limits); its error ends the parse.
    static func documents(_ text: String, check: (Node) throws -> Void = { _ in }) throws -> [Any] {
        // A JSON document (what `kubectl get -o json` writes) takes the JSON parser; anything
        // it refuses (comments, several documents, YAML, nesting past its maximum depth) goes
        // to the YAML parser, where `check` measures it.
        if let first = text.utf8.first(where: { $0 != 0x20 && $0 != 0x0A && $0 != 0x0D && $0 != 0x09 }),
           first == UInt8(ascii: "{"), let tree = try? JSONScanner.parse(text.utf8) {
            return [tree]
        }
        // No resolver rules: Yams' duplicate-key check hashes every mapping key, which
        // resolves its tag, and the default rules are seven regular expressions per key.
        // Keys are strings here; values are resolved below.
        let parser = try Parser(yaml: text, resolver: .basic)
        var docs: [Any] = []
        while let node = try parser.nextRoot() {
            try check(node)
            docs.append(tree(node))
        }
        return docs
    }

    static func tree(_ node: Node) -> Any {
        switch node {
        case .scalar(let s):
            return scalar(s)
        case .mapping(let m):
            var out: [String: Any] = [:]
            out.reserveCapacity(m.count)
            var merges: [Node] = []
            for (k, v) in m {
                // (Yams' duplicate-key check may already have resolved a key's tag.)
                if case .scalar(let ks) = k, ks.string == "<<", ks.style == .plain || ks.style == .any,
                   ["", "tag:yaml.org,2002:merge", strTag].contains(ks.tag.description) {
                    merges.append(v)
                    continue
                }
                out[key(k)] = tree(v)
            }
            // Merge keys (`<<: *base`): the mapping's own keys win, then earlier merged ones.
            for merge in merges {
                let sources: [Node]
                switch merge {
                case .mapping: sources = [merge]
                case .sequence(let seq): sources = Array(seq)
                default: sources = []
                }
                for source in sources {
                    guard case .mapping(let sm) = source else { continue }
                    for (k, v) in sm where out[key(k)] == nil { out[key(k)] = tree(v) }
                }
            }
            return out
        case .sequence(let seq):
            var out: [Any] = []
            out.reserveCapacity(seq.count)
            for n in seq { out.append(tree(n)) }
            return out
        default:
            return NSNull()
        }
    }

    private static func key(_ node: Node) -> String {
        switch node {
        case .scalar(let s): return s.string
        default: return String(describing: node)
        }
    }

    private static let strTag = "tag:yaml.org,2002:str"

    static func scalar(_ s: Node.Scalar) -> Any {
        let tag = s.tag.description
        let plain = s.style == .plain || s.style == .any
        switch tag {
        case "":
            return plain ? resolvePlain(s.string) : s.string
        case strTag, "!":
            return s.string
        case "tag:yaml.org,2002:int":
            return plain ? (yamlInt(s.string) ?? s.string as Any) : s.string
        case "tag:yaml.org,2002:float":
            return plain ? (yamlFloat(s.string) ?? s.string as Any) : s.string
        case "tag:yaml.org,2002:bool":
            return yamlBool(s.string) ?? s.string as Any
        case "tag:yaml.org,2002:null":
            return NSNull()
        default:
            return s.string
        }
    }

    /// A plain scalar, resolved in Yams' default order: bool, int, float, null, else string.
    static func resolvePlain(_ s: String) -> Any {
        if s.isEmpty { return NSNull() }
        let u = Array(s.utf8)
        let c = u[0]
        // Only these can start a non-string: digits, signs, '.', '~', and the letters of the
        // bool and null words.
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "+"), UInt8(ascii: "."):
            // The rule that matches picks the type; a value its constructor refuses (an
            // integer that overflows) stays a string, as in Yams.
            if isYAMLInt(u) { return yamlInt(s) ?? s as Any }
            if isYAMLFloat(u) { return yamlFloat(s) ?? s as Any }
            return s
        case UInt8(ascii: "~"):
            return u.count == 1 ? NSNull() : s
        default:
            if let b = yamlBoolWord(s) { return b }
            switch s {
            case "null", "Null", "NULL": return NSNull()
            default: return s
            }
        }
    }

    /// The bool rule: exactly one of the 18 words.
    private static func yamlBoolWord(_ s: String) -> Bool? {
        switch s {
        case "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON": return true
        case "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF": return false
        default: return nil
        }
    }

    private static func yamlBool(_ s: String) -> Bool? {
        switch s.lowercased() {
        case "true", "yes", "on": return true
        case "false", "no", "off": return false
        default: return nil
        }
    }

    private static func isDigit(_ b: UInt8) -> Bool { b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9") }

    /// The int rule: `[-+]?0b[0-1_]+ | [-+]?0o?[0-7_]+ | [-+]?(0|[1-9][0-9_]*) | [-+]?0x[0-9a-fA-F_]+ | [-+]?[1-9][0-9_]*(:[0-5]?[0-9])+`.
    static func isYAMLInt(_ u: [UInt8]) -> Bool {
        var i = 0
        if i < u.count, u[i] == UInt8(ascii: "-") || u[i] == UInt8(ascii: "+") { i += 1 }
        let body = Array(u[i...])
        guard let f = body.first else { return false }
        func all(_ from: Int, _ ok: (UInt8) -> Bool) -> Bool { from < body.count && body[from...].allSatisfy(ok) }
        if f == UInt8(ascii: "0") {
            if body.count == 1 { return true }
            if body[1] == UInt8(ascii: "b") { return all(2) { $0 == 0x30 || $0 == 0x31 || $0 == 0x5F } }
            if body[1] == UInt8(ascii: "x") {
                return all(2) { isDigit($0) || (0x61...0x66).contains($0) || (0x41...0x46).contains($0) || $0 == 0x5F }
            }
            let octal: (UInt8) -> Bool = { ($0 >= 0x30 && $0 <= 0x37) || $0 == 0x5F }
            if body[1] == UInt8(ascii: "o") { return all(2, octal) }
            return all(1, octal)
        }
        guard f >= UInt8(ascii: "1") && f <= UInt8(ascii: "9") else { return false }
        // Decimal, or base 60 with ":" groups of one or two digits (the first 0-5).
        var k = 1
        while k < body.count, isDigit(body[k]) || body[k] == 0x5F { k += 1 }
        if k == body.count { return true }
        var groups = 0
        while k < body.count {
            guard body[k] == UInt8(ascii: ":") else { return false }
            k += 1
            let start = k
            while k < body.count, isDigit(body[k]) { k += 1 }
            let n = k - start
            guard n == 1 || (n == 2 && body[start] <= UInt8(ascii: "5")) else { return false }
            groups += 1
        }
        return groups > 0
    }

    /// Yams' Int construction of a string the int rule matched.
    static func yamlInt(_ string: String) -> Int? {
        let s = string.replacingOccurrences(of: "_", with: "")
        if s == "0" { return 0 }
        let negative = s.hasPrefix("-")
        let hasSign = negative || s.hasPrefix("+")
        let sign = negative ? "-" : ""
        let body = s.dropFirst(hasSign ? 1 : 0)
        for (prefix, radix) in [("0x", 16), ("0b", 2), ("0o", 8), ("0", 8)] where body.hasPrefix(prefix) {
            return Int(sign + body.dropFirst(prefix.count), radix: radix)
        }
        if body.contains(":") { return sexagesimal(s).flatMap { Int(exactly: $0) } }
        return Int(s)
    }

    /// The float rule: `[-+]?[0-9][0-9_]*(\.[0-9_]*)?([eE][-+]?[0-9]+)? | \.[0-9_]+([eE][-+][0-9]+)? |
    /// [-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]* | [-+]?\.(inf|Inf|INF) | \.(nan|NaN|NAN)`.
    static func isYAMLFloat(_ u: [UInt8]) -> Bool {
        let s = String(decoding: u, as: UTF8.self)
        switch s {
        case ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", ".nan", ".NaN", ".NAN": return true
        default: break
        }
        var i = 0
        func digitsOrUnderscore() { while i < u.count, isDigit(u[i]) || u[i] == 0x5F { i += 1 } }
        func exponent(signRequired: Bool) -> Bool {
            guard i < u.count, u[i] == UInt8(ascii: "e") || u[i] == UInt8(ascii: "E") else { return true }
            i += 1
            if i < u.count, u[i] == UInt8(ascii: "-") || u[i] == UInt8(ascii: "+") { i += 1 } else if signRequired { return false }
            let start = i
            while i < u.count, isDigit(u[i]) { i += 1 }
            return i > start
        }
        if u.first == UInt8(ascii: ".") {
            // \.[0-9_]+([eE][-+][0-9]+)?
            i = 1
            let start = i
            digitsOrUnderscore()
            guard i > start, exponent(signRequired: true) else { return false }
            return i == u.count
        }
        if i < u.count, u[i] == UInt8(ascii: "-") || u[i] == UInt8(ascii: "+") { i += 1 }
        guard i < u.count, isDigit(u[i]) else { return false }
        i += 1
        digitsOrUnderscore()
        if i < u.count, u[i] == UInt8(ascii: ":") {
            // Base 60: (:[0-5]?[0-9])+ \.[0-9_]*
            var groups = 0
            while i < u.count, u[i] == UInt8(ascii: ":") {
                i += 1
                let start = i
                while i < u.count, isDigit(u[i]) { i += 1 }
                let n = i - start
                guard n == 1 || (n == 2 && u[start] <= UInt8(ascii: "5")) else { return false }
                groups += 1
            }
            guard groups > 0, i < u.count, u[i] == UInt8(ascii: ".") else { return false }
            i += 1
            digitsOrUnderscore()
            return i == u.count
        }
        if i < u.count, u[i] == UInt8(ascii: ".") {
            i += 1
            digitsOrUnderscore()
        }
        guard exponent(signRequired: false) else { return false }
        return i == u.count
    }

    /// Yams' Double construction of a string the float rule matched.
    static func yamlFloat(_ string: String) -> Double? {
        switch string.lowercased() {
        case ".inf", "+.inf": return .infinity
        case "-.inf": return -.infinity
        case ".nan": return .nan
        default:
            let s = string.replacingOccurrences(of: "_", with: "")
            if s.contains(":") { return sexagesimal(s) }
            return Double(s)
        }
    }

    /// `[-+]?a:b:c...` in base 60.
    private static func sexagesimal(_ s: String) -> Double? {
        let negative = s.hasPrefix("-")
        let body = s.drop { $0 == "-" || $0 == "+" }
        var value = 0.0
        for part in body.split(separator: ":", omittingEmptySubsequences: false) {
            guard let d = Double(part) else { return nil }
            value = value * 60 + d
        }
        return negative ? -value : value
    }
}
