// The JSON parser and the YAML scalar rules behind the manifest and API sources: the types
// ObjectDecoder relies on, YAML 1.1 resolution as Yams' default resolver does it, errors.

import Foundation
@testable import KubeAPI
import SluiceCore
import Testing

private func json(_ text: String) throws -> Any { try JSONScanner.parse(Array(text.utf8)) }

@Suite struct JSONScannerTests {
    @Test func typesAreThePlainOnesTheDecoderReads() throws {
        let tree = try #require(try json(#"{"a": 1, "b": -20, "c": 1.5, "d": 2.0, "e": true, "f": null, "g": "x", "h": [1, "y"], "i": {}}"#) as? [String: Any])
        #expect(tree["a"] as? Int == 1)
        #expect(tree["b"] as? Int == -20)
        #expect(tree["c"] as? Double == 1.5)
        #expect(tree["d"] as? Int == 2)
        #expect(tree["e"] as? Bool == true)
        #expect(tree["e"] as? Int == nil)
        #expect(tree["a"] as? Bool == nil)
        #expect(tree["f"] is NSNull)
        #expect(tree["g"] as? String == "x")
        #expect((tree["h"] as? [Any])?.count == 2)
        #expect((tree["i"] as? [String: Any])?.isEmpty == true)
        #expect(try json("12345678901234567890") as? Double == 12345678901234567890.0)
        #expect(try json("1e3") as? Int == 1000)
    }

    @Test func escapesAndUnicode() throws {
        #expect(try json(#""a\"b\\c\/d\n\t\u00e9\ud83d\ude00""#) as? String == "a\"b\\c/d\n\té😀")
        #expect(try json("\"é\"") as? String == "é")
    }

    @Test(arguments: ["{\"a\": 1} x", "{\"a\": }", "[1, 2", "\"abc", "\"a\u{1}b\"", "tru", "01x", "-", "{'a': 1}",
                      "\"\\ud800\"", "\"\\q\"", String(repeating: "[", count: 600) + String(repeating: "]", count: 600)])
    func invalidDocumentsThrow(_ text: String) {
        #expect(throws: JSONShapeError.self) { try json(text) }
    }

    @Test func listItemsAreHandedOverOneByOne() throws {
        var names: [String] = []
        let rest = try JSONScanner.parseList(Array(#"{"kind": "ServiceList", "metadata": {"continue": "t"}, "items": [{"n": "a"}, {"n": "b"}, 3]}"#.utf8)) { item in
            names.append((item as? [String: Any])?["n"] as? String ?? "?")
        }
        #expect(names == ["a", "b", "?"])
        #expect((rest["metadata"] as? [String: Any])?["continue"] as? String == "t")
        #expect(rest["items"] == nil)
        #expect(throws: JSONShapeError.self) { try JSONScanner.parseList(Array(#"{"items": [{"n": 1},"#.utf8)) { _ in } }
    }
}

@Suite struct YAMLScalarTests {
    /// Plain scalars and what Yams' default resolver makes of them, as "type:value".
    @Test(arguments: [
        ("80", "i:80"), ("+12", "i:12"), ("-7", "i:-7"), ("0", "i:0"), ("0x1F", "i:31"), ("017", "i:15"), ("0o17", "i:15"),
        ("0b101", "i:5"), ("-0b101", "i:-5"), ("1_000", "i:1000"), ("1:20", "i:80"), ("1.5", "d:1.5"), ("08", "d:8.0"),
        (".5", "d:0.5"), ("1e3", "d:1000.0"), ("yes", "b:true"), ("Off", "b:false"), ("TRUE", "b:true"), ("no", "b:false"),
    ])
    func resolved(_ text: String, _ expected: String) {
        let v = YAMLTrees.resolvePlain(text)
        let shown: String
        switch v {
        case let i as Int: shown = "i:\(i)"
        case let d as Double: shown = "d:\(d)"
        case let b as Bool: shown = "b:\(b)"
        default: shown = "other:\(v)"
        }
        #expect(shown == expected, "\(text)")
    }

    @Test(arguments: ["10.96.0.1", "fd00::1", "2024-01-01", "2024-01-01T10:00:00Z", "web", "yess", "0x", "1:99", "1.2.3", "ClusterIP",
                      "9223372036854775808000"])
    func strings(_ text: String) {
        let v = YAMLTrees.resolvePlain(text)
        // An integer too large for Int stays a string, as with Yams.
        #expect(v as? String == text, "\(text): \(v)")
    }

    @Test func nullsInfinitiesAndQuotedScalars() throws {
        for t in ["", "~", "null", "Null", "NULL"] { #expect(YAMLTrees.resolvePlain(t) is NSNull) }
        #expect(YAMLTrees.resolvePlain(".inf") as? Double == .infinity)
        #expect(YAMLTrees.resolvePlain("-.Inf") as? Double == -.infinity)
        #expect((YAMLTrees.resolvePlain(".NaN") as? Double)?.isNaN == true)
        let doc = try #require(try YAMLTrees.documents("a: \"80\"\nb: '1'\nc: !!str 2\nd: 3\ne: |\n  4\n").first as? [String: Any])
        #expect(doc["a"] as? String == "80")
        #expect(doc["b"] as? String == "1")
        #expect(doc["c"] as? String == "2")
        #expect(doc["d"] as? Int == 3)
        #expect(doc["e"] as? String == "4\n")
    }

    @Test func mergeKeysAndAnchors() throws {
        let doc = try #require(try YAMLTrees.documents("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\n").first as? [String: Any])
        let m = try #require(doc["m"] as? [String: Any])
        #expect(m["x"] as? Int == 1)
        #expect(m["y"] as? Int == 3)
        #expect(m["<<"] == nil)
    }

    @Test func aJSONManifestDecodesAsItsYAMLTwin() throws {
        let yaml = """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: demo}
            spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}], sessionAffinity: ClientIP}
            """
        let jsonText = #"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}], "sessionAffinity": "ClientIP"}}"#
        let a = try ManifestParser.parse(yaml, file: "a.yaml")
        let b = try ManifestParser.parse(jsonText, file: "b.json")
        #expect(a.objects.count == 1)
        #expect(a.objects == b.objects)
        // Invalid JSON that is valid YAML still parses (as YAML).
        #expect(try ManifestParser.parse("{a: 1} # comment", file: "c.yaml").rejections.count == 1)
        #expect(throws: (any Error).self) { try ManifestParser.parse("{a: [", file: "d.yaml") }
    }
}
