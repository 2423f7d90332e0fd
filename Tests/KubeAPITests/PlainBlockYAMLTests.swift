// The fast path for plain block YAML: every text it accepts gives the tree Yams gives (through
// YAMLTrees), and every text outside its subset is declined (nil), so Yams decides errors and
// limits as before.

import Foundation
@testable import KubeAPI
import Testing

/// Structural equality of plain trees, with exact types (a Bool is not an Int, an Int is not a
/// Double).
private func same(_ a: Any, _ b: Any) -> Bool {
    switch (a, b) {
    case (let x as [String: Any], let y as [String: Any]):
        return x.count == y.count && x.allSatisfy { k, v in y[k].map { same(v, $0) } ?? false }
    case (let x as [Any], let y as [Any]):
        return x.count == y.count && zip(x, y).allSatisfy { same($0.0, $0.1) }
    default:
        guard ObjectIdentifier(type(of: a)) == ObjectIdentifier(type(of: b)) else { return false }
        switch (a, b) {
        case (let x as String, let y as String): return x == y
        case (let x as Int, let y as Int): return x == y
        case (let x as Bool, let y as Bool): return x == y
        case (let x as Double, let y as Double): return x == y || (x.isNaN && y.isNaN)
        case (is NSNull, is NSNull): return true
        default: return false
        }
    }
}

private let fixtureService = """
    apiVersion: v1
    kind: Service
    metadata:
      name: svc-00001
      namespace: bench
    spec:
      type: NodePort
      clusterIP: 10.96.0.17
      clusterIPs:
        - 10.96.0.17
      ports:
        - name: http
          protocol: TCP
          port: 80
          targetPort: 8080
          nodePort: 30001
    status:
      loadBalancer:
        ingress:
          - ip: 192.0.2.1
    ---
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: svc-00001-bench
      namespace: bench
      labels:
        kubernetes.io/service-name: svc-00001
    addressType: IPv4
    ports:
      - name: http
        port: 8080
        protocol: TCP
    endpoints:
      - addresses:
          - 10.128.0.11
        conditions:
          ready: true
        nodeName: node-b
      - addresses:
          - 10.128.0.12
        conditions:
          ready: false
          serving: yes
        nodeName: node-b

    """

@Suite struct PlainBlockYAMLTests {
    /// Texts in the subset: the fast path must accept each and agree with Yams.
    @Test(arguments: [
        fixtureService,
        "---\n" + fixtureService,
        // Comments, blank lines, a sequence at its key's indentation, `-` alone, nulls.
        "# head\n\na: 1 # trailing\n  # indented comment\nb:\n- x\n- y#not-a-comment\nc:\n  -\n    d: e\n  -\nf:\ng: ~\n",
        // YAML 1.1 scalars as the default resolver reads them.
        "a: 017\nb: 0x1F\nc: 1:20\nd: yes\ne: Off\nf: 1e3\ng: .5\nh: -7\ni: 08\nj: .inf\nk: null\nl: 10.96.0.1\nm: fd00::1\nn: 2024-01-01\n",
        // Keys that look like other things stay strings; spaces inside scalars; a URL.
        "1: a\ntrue: b\nkubernetes.io/service-name: c d  e\nurl: http://example.com/x?y=1\nk : v\n",
        // An indented root, compact mappings with several keys, nested sequences under `-`.
        "  a:\n    - b: 1\n      c: 2\n    -\n      - 3\n      - 4\n",
        // Two documents, the second after a `---`.
        "a: 1\n---\nb: 2\n",
        // Nothing at all, or only comments: no document.
        "", "# only a comment\n\n",
    ])
    func agreesWithYams(_ text: String) throws {
        let fast = try #require(PlainBlockYAML.documents(text, maximumDepth: 100), "declined: \(text)")
        let yams = try YAMLTrees.documents(text)
        #expect(fast.count == yams.count)
        for (a, b) in zip(fast, yams) { #expect(same(a, b), "\(a) vs \(b)") }
    }

    /// Texts outside the subset (or not YAML at all): declined, never parsed differently.
    @Test(arguments: [
        "a: \"quoted\"\n", "a: 'quoted'\n", "'k': v\n", "a: [1, 2]\n", "a: {b: 1}\n", "{a: 1}\n", "a: &x 1\nb: *x\n",
        "a: !!str 1\n", "a: |\n  text\n", "a: >\n  text\n", "a: multi\n  line\n", "- a\n  b\n", "base:\n  <<: {}\n",
        "a: 1\na: 2\n", "a:\t1\n", "a: 1\r\nb: 2\r\n", "a: é\n", "a: 1\n---\n", "---\n---\na: 1\n", "--- a: 1\n",
        "a: 1\n...\n", "%YAML 1.1\n---\na: 1\n", "- a\n- b\n", "scalar\n", "a: b: c\n", "a:\n  - - x\n", "? a\n: b\n",
        "a: 1\n  b: 2\n", "a:\n    b: 1\n  c: 2\n", "a:\n  - x\n  b: 1\n", "a: @x\n", "a: `x\n", "a: -\n", "a: x:\n",
        "key:value\n", "a:\n- x\n - y\n",
        // Nested deeper than half the depth limit: left to Yams and ManifestLimits.
        (0..<60).map { String(repeating: " ", count: $0) + "a:\n" }.joined(),
    ])
    func declines(_ text: String) {
        #expect(PlainBlockYAML.documents(text, maximumDepth: 100) == nil, "accepted: \(text)")
    }

    /// Through the manifest parser, the fast path yields the objects the Yams path does.
    @Test func manifestObjectsAreTheSameEitherWay() throws {
        let fast = try ManifestParser.parse(fixtureService, file: "svc.yaml")
        // A trailing flow mapping document pushes the whole file down the Yams path.
        let slow = try ManifestParser.parse(fixtureService + "---\n{}\n", file: "svc.yaml")
        #expect(fast.objects.count == 2)
        #expect(fast.objects == slow.objects)
        #expect(fast.rejections.isEmpty)
    }
}
