// manifests/ is what an operator applies: a DaemonSet run the way kubeadm runs kube-proxy
// (privileged, host network, /lib/modules and the xtables lock from the host, the ConfigMap at
// /var/lib/kube-proxy), the RBAC objects it refers to, and a ConfigMap in kubeadm's shape whose
// KubeProxyConfiguration the real binary accepts.

import Foundation
import SluiceTesting
import Testing
import Yams

private func documents(_ file: String, filePath: String = #filePath) throws -> [[String: Any]] {
    let root = TestBed.findPackageRoot(from: filePath) ?? "."
    let text = try String(contentsOfFile: "\(root)/manifests/\(file)", encoding: .utf8)
    return try Yams.load_all(yaml: text).compactMap { $0 as? [String: Any] }
}

private func at(_ o: Any?, _ path: String) -> Any? {
    var cur = o
    for key in path.split(separator: ".") {
        if let i = Int(key), let l = cur as? [Any] { cur = i < l.count ? l[i] : nil } else { cur = (cur as? [String: Any])?[String(key)] }
    }
    return cur
}

@Suite struct DeploymentManifestTests {
    @Test func daemonSetRunsLikeKubeadmsKubeProxy() throws {
        let ds = try #require(try documents("daemonset.yaml").first)
        #expect(at(ds, "apiVersion") as? String == "apps/v1")
        #expect(at(ds, "kind") as? String == "DaemonSet")
        #expect(at(ds, "metadata.namespace") as? String == "kube-system")
        let selector = try #require(at(ds, "spec.selector.matchLabels") as? [String: String])
        let labels = try #require(at(ds, "spec.template.metadata.labels") as? [String: String])
        #expect(!selector.isEmpty && selector.allSatisfy { labels[$0.key] == $0.value })
        #expect(at(ds, "spec.template.spec.hostNetwork") as? Bool == true)
        let containers = try #require(at(ds, "spec.template.spec.containers") as? [[String: Any]])
        #expect(containers.count == 1)
        let c = containers[0]
        #expect(at(c, "securityContext.privileged") as? Bool == true, "kube-proxy runs privileged: it writes /proc/sys")
        #expect(at(c, "livenessProbe.httpGet.port") as? Int == 10256 && at(c, "livenessProbe.httpGet.path") as? String == "/livez")
        #expect(at(c, "readinessProbe.httpGet.path") as? String == "/healthz")
        let command = at(c, "command") as? [String] ?? []
        #expect(command == ["/usr/local/bin/sluice", "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=$(NODE_NAME)"],
                "kube-proxy's command line under kubeadm, with sluice's binary")
        #expect(at(c, "env.0.valueFrom.fieldRef.fieldPath") as? String == "spec.nodeName")

        // Volumes: every mount has a volume; the lock and the modules come from the host.
        let volumes = try #require(at(ds, "spec.template.spec.volumes") as? [[String: Any]])
        let mounts = try #require(at(c, "volumeMounts") as? [[String: Any]])
        let volumeNames = Set(volumes.compactMap { $0["name"] as? String })
        #expect(mounts.allSatisfy { volumeNames.contains($0["name"] as? String ?? "") })
        func volume(_ name: String) -> [String: Any]? { volumes.first { $0["name"] as? String == name } }
        func mountPath(_ name: String) -> String? { mounts.first { $0["name"] as? String == name }?["mountPath"] as? String }
        #expect(at(volume("xtables-lock"), "hostPath.path") as? String == "/run/xtables.lock")
        #expect(at(volume("xtables-lock"), "hostPath.type") as? String == "FileOrCreate")
        #expect(mountPath("xtables-lock") == "/run/xtables.lock")
        #expect(at(volume("lib-modules"), "hostPath.path") as? String == "/lib/modules")
        #expect(mountPath("lib-modules") == "/lib/modules")
        #expect(mounts.first { $0["name"] as? String == "lib-modules" }?["readOnly"] as? Bool == true)

        // The config: the DaemonSet reads the ConfigMap's key at the path it passes to --config.
        let configMapName = try #require(at(volume("kube-proxy"), "configMap.name") as? String)
        #expect(mountPath("kube-proxy") == "/var/lib/kube-proxy")
        let cm = try #require(try documents("configmap.yaml").first)
        #expect(at(cm, "kind") as? String == "ConfigMap" && at(cm, "metadata.name") as? String == configMapName)
        #expect(at(cm, "metadata.namespace") as? String == at(ds, "metadata.namespace") as? String)
        let keys = (at(cm, "data") as? [String: String] ?? [:]).keys
        let configArg = try #require(command.first { $0.hasPrefix("--config=") })
        let configPath = String(configArg.dropFirst("--config=".count))
        #expect(keys.contains { (mountPath("kube-proxy") ?? "") + "/" + $0 == configPath }, "\(configPath) is not a key of the ConfigMap")
        #expect(Set(keys) == ["config.conf", "kubeconfig.conf"], "kubeadm's keys")

        // The ServiceAccount exists in rbac.yaml and is bound.
        let rbac = try documents("rbac.yaml")
        let account = at(ds, "spec.template.spec.serviceAccountName") as? String
        #expect(rbac.contains { at($0, "kind") as? String == "ServiceAccount" && at($0, "metadata.name") as? String == account
            && at($0, "metadata.namespace") as? String == at(ds, "metadata.namespace") as? String })
    }

    @Test func theConfigMapsConfigurationIsAcceptedByTheBinary() async throws {
        let cm = try #require(try documents("configmap.yaml").first)
        let text = try #require((at(cm, "data") as? [String: String])?["config.conf"])
        let (dir, done) = try scratch()
        defer { done() }
        try text.write(toFile: "\(dir)/config.yaml", atomically: true, encoding: .utf8)
        let r = await sluice(["--config", "\(dir)/config.yaml", "--write-config-to", "\(dir)/out.yaml"])
        #expect(r.succeeded, "\(r)")
        let out = try String(contentsOfFile: "\(dir)/out.yaml", encoding: .utf8)
        #expect(out.contains("clusterCIDR: 10.244.0.0/16") && out.contains("mode: iptables"))
        #expect(out.contains("healthzBindAddress: 0.0.0.0:10256") && out.contains("syncPeriod: 30s"), "\(out)")
        #expect(out.contains("kubeconfig: /var/lib/kube-proxy/kubeconfig.conf"), "\(out)")
    }
}
