// Node decoding: the fields the health server's node-eligibility check reads.

import KubeAPI
import SluiceCore
import Testing

@Suite struct NodeDecodingTests {
    @Test func deletionTimestampAndTaintsAreDecoded() throws {
        let text = """
            apiVersion: v1
            kind: Node
            metadata: {name: n1, deletionTimestamp: "2024-05-01T12:00:00Z"}
            spec:
              taints:
              - {key: ToBeDeletedByClusterAutoscaler, value: "1714564800", effect: NoSchedule}
              - {key: node.kubernetes.io/unschedulable, effect: NoSchedule}
            """
        let p = try ManifestParser.parse(text, file: "node.yaml")
        #expect(p.rejections.isEmpty)
        guard case .node(let n)? = p.objects.first else {
            Issue.record("expected a Node, got \(p.objects)")
            return
        }
        #expect(n.deletionTimestamp == "2024-05-01T12:00:00Z")
        #expect(n.taints == [NodeTaint(key: "ToBeDeletedByClusterAutoscaler", value: "1714564800", effect: "NoSchedule"),
                             NodeTaint(key: "node.kubernetes.io/unschedulable", effect: "NoSchedule")])
        #expect(n != Node(name: "n1"))  // a taint or deletion makes the Node a change the tracker passes on
    }

    @Test func aPlainNodeHasNeither() throws {
        let p = try ManifestParser.parse("apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n", file: "node.yaml")
        guard case .node(let n)? = p.objects.first else {
            Issue.record("expected a Node, got \(p.objects)")
            return
        }
        #expect(n.deletionTimestamp == nil)
        #expect(n.taints.isEmpty)
    }

    @Test func aBadTaintIsRejectedWithItsPath() throws {
        let p = try ManifestParser.parse("apiVersion: v1\nkind: Node\nmetadata: {name: n3}\nspec: {taints: [{key: [1]}]}\n", file: "node.yaml")
        #expect(p.objects.isEmpty)
        #expect(p.rejections.first?.reason.contains("spec.taints[0].key") == true, "\(p.rejections)")
    }
}
