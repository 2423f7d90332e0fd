// manifests/rbac.yaml grants exactly what the proxy needs: list/watch services and
// endpointslices and servicecidrs, get/list/watch nodes, create/patch events; nothing more.

import Foundation
import Testing
import Yams

@Suite struct RBACTests {
    private func documents() throws -> [[String: Any]] {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: root.appendingPathComponent("manifests/rbac.yaml"), encoding: .utf8)
        return try Yams.load_all(yaml: text).compactMap { $0 as? [String: Any] }
    }

    @Test func theClusterRoleGrantsExactlyTheListedRules() throws {
        let docs = try documents()
        let role = try #require(docs.first { $0["kind"] as? String == "ClusterRole" })
        var grants: Set<String> = []
        for case let rule as [String: Any] in role["rules"] as? [Any] ?? [] {
            #expect(rule["resourceNames"] == nil && rule["nonResourceURLs"] == nil)
            for group in rule["apiGroups"] as? [String] ?? [] {
                for resource in rule["resources"] as? [String] ?? [] {
                    for verb in rule["verbs"] as? [String] ?? [] { grants.insert("\(group)/\(resource):\(verb)") }
                }
            }
        }
        let expected: Set<String> = [
            "/services:list", "/services:watch",
            "discovery.k8s.io/endpointslices:list", "discovery.k8s.io/endpointslices:watch",
            "/nodes:get", "/nodes:list", "/nodes:watch",
            "networking.k8s.io/servicecidrs:list", "networking.k8s.io/servicecidrs:watch",
            "/events:create", "/events:patch", "events.k8s.io/events:create", "events.k8s.io/events:patch",
        ]
        #expect(grants == expected)
        #expect(!grants.contains { $0.contains("*") })
    }

    @Test func theServiceAccountIsBoundToTheRole() throws {
        let docs = try documents()
        #expect(docs.count == 3)
        let sa = try #require(docs.first { $0["kind"] as? String == "ServiceAccount" })
        let saMeta = try #require(sa["metadata"] as? [String: Any])
        #expect(saMeta["name"] as? String == "sluice" && saMeta["namespace"] as? String == "kube-system")
        let role = try #require(docs.first { $0["kind"] as? String == "ClusterRole" })
        let roleName = (role["metadata"] as? [String: Any])?["name"] as? String
        let binding = try #require(docs.first { $0["kind"] as? String == "ClusterRoleBinding" })
        let ref = try #require(binding["roleRef"] as? [String: Any])
        #expect(ref["kind"] as? String == "ClusterRole" && ref["name"] as? String == roleName)
        let subjects = try #require(binding["subjects"] as? [[String: Any]])
        #expect(subjects.count == 1)
        #expect(subjects[0]["kind"] as? String == "ServiceAccount")
        #expect(subjects[0]["name"] as? String == "sluice" && subjects[0]["namespace"] as? String == "kube-system")
    }
}
