// The drop-in, end to end: manifests/daemonset.yaml's exact command line with
// manifests/configmap.yaml mounted where the DaemonSet mounts it (/var/lib/kube-proxy), the
// service-account files where a pod has them, against the fake API server over TLS, in a
// throw-away network namespace and a private mount namespace (nothing on the host changes).
// It must sync, serve /healthz, /metrics and /configz as kube-proxy does, record the start-up
// Event, and exit when the mounted configuration changes.

import Foundation
import Glibc
import SluiceTesting
import Testing
import Yams

@Suite("Kernel: the DaemonSet's command line and ConfigMap", .serialized, .requiresRoot, .timeLimit(.minutes(2)))
struct DropInKernelTests {
    private static let node = "dropin-node"
    private static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    private static var binary: String {
        if let b = ProcessInfo.processInfo.environment["SLUICE_BIN"], !b.isEmpty { return b }
        return root + "/.build/debug/sluice"
    }

    private func manifest(_ file: String) throws -> [String: Any] {
        let text = try String(contentsOfFile: "\(Self.root)/manifests/\(file)", encoding: .utf8)
        return try #require(try Yams.load_all(yaml: text).compactMap { $0 as? [String: Any] }.first)
    }

    private func at(_ o: Any?, _ path: String) -> Any? {
        var cur = o
        for key in path.split(separator: ".") {
            if let i = Int(key), let l = cur as? [Any] { cur = i < l.count ? l[i] : nil } else { cur = (cur as? [String: Any])?[String(key)] }
        }
        return cur
    }

    @Test func theDaemonSetsCommandLineSyncsServesAndRestartsOnAConfigChange() async throws {
        let ds = try manifest("daemonset.yaml")
        let cm = try manifest("configmap.yaml")
        let container = try #require((at(ds, "spec.template.spec.containers") as? [[String: Any]])?.first)
        let command = try #require(container["command"] as? [String])
        let mounts = try #require(container["volumeMounts"] as? [[String: Any]])
        let volumes = try #require(at(ds, "spec.template.spec.volumes") as? [[String: Any]])
        let cmVolume = try #require(volumes.first { at($0, "configMap.name") as? String == at(cm, "metadata.name") as? String })
        let mountPath = try #require(mounts.first { $0["name"] as? String == cmVolume["name"] as? String }?["mountPath"] as? String)
        let data = try #require(cm["data"] as? [String: String])
        #expect(at(container, "securityContext.privileged") as? Bool == true)

        let ns = try NetworkNamespace(prefix: "sluice-dropin")
        let certs = try TestCertificates.generate()
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-dropin-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: work + "/configmap", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: work + "/serviceaccount", withIntermediateDirectories: true)
        let server = try FakeAPIServer(listener: .socket({ port in try ns.listeningSocket(port: port) }),
                                       tls: .init(certificate: certs.serverCertificate, key: certs.serverKey))
        var process: Process?
        defer {
            if let p = process, p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
            ns.delete()
            certs.remove()
            try? FileManager.default.removeItem(atPath: work)
        }
        try await server.start()
        defer { Task { await server.stop() } }

        // The ConfigMap's keys as the kubelet projects them; the operator's one edit: the
        // API server's address in kubeconfig.conf.
        for (key, value) in data {
            var text = value
            if key == "kubeconfig.conf" {
                text = text.replacingOccurrences(of: "https://control-plane.example:6443", with: "https://127.0.0.1:\(server.port)")
                #expect(text != value, "kubeconfig.conf no longer names the placeholder server")
            }
            try text.write(toFile: "\(work)/configmap/\(key)", atomically: true, encoding: .utf8)
        }
        // The pod's service-account files.
        try "dropin-token\n".write(toFile: work + "/serviceaccount/token", atomically: true, encoding: .utf8)
        try FileManager.default.copyItem(atPath: certs.caCertificate, toPath: work + "/serviceaccount/ca.crt")
        server.requireToken("dropin-token")

        server.apply(.nodes, FakeObjects.node(Self.node, internalIP: "192.168.78.1", podCIDRs: ["10.244.3.0/24"]))
        server.apply(.services, FakeObjects.service("web", clusterIP: "10.96.0.20"))
        server.apply(.endpointslices, FakeObjects.endpointSlice("web-1", service: "web", addresses: ["10.244.3.5"], nodeName: Self.node))

        // The container's command, with the kubelet's $(NODE_NAME) expansion, run with the
        // ConfigMap at the DaemonSet's mount path and the service account where pods have it.
        let argv = [Self.binary] + command.dropFirst().map { $0.replacingOccurrences(of: "$(NODE_NAME)", with: Self.node) }
        let script = """
            set -e
            mount -t tmpfs sluice-dropin \(parent(mountPath))
            mkdir -p \(mountPath)
            mount --bind \(work)/configmap \(mountPath)
            mount -t tmpfs sluice-dropin /run
            mkdir -p /run/secrets/kubernetes.io/serviceaccount
            cp \(work)/serviceaccount/token \(work)/serviceaccount/ca.crt /run/secrets/kubernetes.io/serviceaccount/
            exec "$@"
            """
        let log = work + "/sluice.log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ToolRunner.which("ip") ?? "/usr/sbin/ip")
        p.arguments = ["netns", "exec", ns.name, "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"] + argv
        p.environment = ["PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin", "NODE_NAME": Self.node]
        p.standardOutput = handle
        p.standardError = handle
        try p.run()
        process = p
        nonisolated(unsafe) let running = p
        func logText() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

        // It syncs: the Service's rules are in the namespace's nat table.
        do {
            try await Eventually.wait("the Service's rules", timeout: .seconds(20), interval: .milliseconds(50)) {
                (try ns.run(["iptables-save", "-t", "nat"]).stdout).contains("--comment \"default/web:http cluster IP\"")
            }
        } catch {
            Issue.record("no sync; sluice log:\n\(logText().suffix(4000))")
            throw error
        }
        let nat = try ns.run(["iptables-save", "-t", "nat"]).stdout
        #expect(nat.contains("! -s 10.244.0.0/16 -d 10.96.0.20/32"), "clusterCIDR from config.conf:\n\(nat)")

        // It serves, on kube-proxy's default addresses (the ConfigMap leaves them empty).
        let healthz = try ns.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:10256/healthz"])
        #expect(healthz.stdout == "200", "\(healthz)")
        let metrics = try ns.run(["curl", "-s", "http://127.0.0.1:10249/metrics"]).stdout
        #expect(metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}"), "\(metrics)")
        #expect(metrics.contains("process_start_time_seconds"))
        let configz = try ns.run(["curl", "-s", "http://127.0.0.1:10249/configz"]).stdout
        let tree = try #require(try JSONSerialization.jsonObject(with: Data(configz.utf8)) as? [String: Any], "\(configz)")
        let config = try #require(tree["kubeproxy.config.k8s.io"] as? [String: Any])
        #expect(config["healthzBindAddress"] as? String == "0.0.0.0:10256")
        #expect(config["hostnameOverride"] as? String == Self.node)
        #expect(at(config, "iptables.syncPeriod") as? String == "30s")
        #expect(at(config, "conntrack.maxPerCore") as? Int == 32768)

        // It recorded the start-up Event, and every request carried the pod's token.
        try await Eventually.wait("the start-up event", timeout: .seconds(10)) {
            server.requests.contains { $0.verb == "create" && $0.path == "/apis/events.k8s.io/v1/namespaces/default/events" }
        }
        #expect(server.requests.allSatisfy { $0.token == "dropin-token" })
        #expect(!logText().contains("not acted on"), "\(logText())")

        // A ConfigMap update (the kubelet swaps the file) ends the process, saying why.
        let updated = data["config.conf", default: ""].replacingOccurrences(of: "clusterCIDR: 10.244.0.0/16", with: "clusterCIDR: 10.245.0.0/16")
        try updated.write(toFile: work + "/configmap/config.conf.new", atomically: false, encoding: .utf8)
        try FileManager.default.removeItem(atPath: work + "/configmap/config.conf")
        try FileManager.default.moveItem(atPath: work + "/configmap/config.conf.new", toPath: work + "/configmap/config.conf")
        try await Eventually.wait("sluice exits after the change", timeout: .seconds(15)) { !running.isRunning }
        #expect(p.terminationStatus != 0)
        #expect(logText().contains("config.conf changed; exiting"), "\(logText())")
    }

    private func parent(_ path: String) -> String { (path as NSString).deletingLastPathComponent }

    /// Runs the binary inside `ns` and waits for it to exit (or kills it after `timeout`).
    private func runToExit(_ ns: NetworkNamespace, _ args: [String], timeout: Duration = .seconds(20)) async -> CommandOutput {
        await Subprocess.run(["ip", "netns", "exec", ns.name, Self.binary] + args, timeout: timeout)
    }

    @Test func initOnlyWritesTheOOMScoreAndTheSysctlsThenExits() async throws {
        let ns = try NetworkNamespace(prefix: "sluice-init")
        defer { ns.delete() }
        let before = try ns.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait"]).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let wanted = before == "1800" ? "1801" : "1800"
        let r = await runToExit(ns, ["--init-only", "--oom-score-adj=500", "--conntrack-max-per-core", "0",
                                     "--conntrack-tcp-timeout-close-wait", "\(wanted)s", "--conntrack-tcp-be-liberal"])
        #expect(r.status == 0, "\(r)")
        #expect(r.stderr.contains("set oom_score_adj to 500"), "\(r.stderr)")
        #expect(r.stderr.contains("--init-only: start-up settings applied; exiting"), "\(r.stderr)")
        #expect(!r.stderr.contains("nf_conntrack_max"), "maxPerCore 0 leaves the limit alone: \(r.stderr)")
        // The namespace's own conntrack settings were written; nothing else was started.
        #expect(try ns.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait"]).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines) == wanted)
        #expect(try ns.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"]).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines) == "1")
        #expect(!(try ns.run(["iptables-save", "-t", "nat"]).stdout.contains("KUBE-SERVICES")), "--init-only programs no rules")
    }

    @Test func bindAddressHardFailEndsTheProcessWhenThePortIsTaken() async throws {
        let ns = try NetworkNamespace(prefix: "sluice-bind")
        defer { ns.delete() }
        let taken = try ns.listeningSocket(port: 0)
        defer { close(taken) }
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(taken, $0, &length) }
        }
        let port = Int(UInt16(bigEndian: address.sin_port))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-bind-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let common = ["--manifests", dir, "--hostname-override", "n1", "--node-ip", "192.0.2.1", "--conntrack-max-per-core", "0",
                      "--healthz-bind-address", "127.0.0.1:\(port)", "--metrics-bind-address", ""]
        let r = await runToExit(ns, common + ["--bind-address-hard-fail"])
        #expect(r.status != 0 && !r.timedOut, "\(r)")
        #expect(r.stderr.contains("--bind-address-hard-fail"), "\(r.stderr)")
    }

    @Test func nfacctCountsLocalhostNodePortPacketsAsKubeProxysMetric() async throws {
        let ns = try NetworkNamespace(prefix: "sluice-nfacct")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-nfacct-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try """
            apiVersion: v1
            kind: Service
            metadata: {name: np, namespace: default}
            spec: {type: NodePort, clusterIP: 10.96.0.30, ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080}]}
            ---
            apiVersion: discovery.k8s.io/v1
            kind: EndpointSlice
            metadata: {name: np-1, namespace: default, labels: {kubernetes.io/service-name: np}}
            addressType: IPv4
            ports: [{name: http, port: 8080, protocol: TCP}]
            endpoints: [{addresses: [10.244.9.9]}]
            """.write(toFile: dir + "/np.yaml", atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ToolRunner.which("ip") ?? "/usr/sbin/ip")
        p.arguments = ["netns", "exec", ns.name, Self.binary, "--manifests", dir, "--hostname-override", "n1", "--node-ip", "192.0.2.1",
                       "--conntrack-max-per-core", "0", "--min-sync-period", "0s"]
        let log = dir + ".log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        p.standardOutput = handle
        p.standardError = handle
        try p.run()
        defer {
            if p.isRunning { kill(p.processIdentifier, SIGTERM) }
            p.waitUntilExit()
            ns.delete()
            try? FileManager.default.removeItem(atPath: dir)
            try? FileManager.default.removeItem(atPath: log)
        }
        func logText() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        do {
            try await Eventually.wait("the counting NodePort rule", timeout: .seconds(20), interval: .milliseconds(50)) {
                (try ns.run(["iptables-save", "-t", "nat"]).stdout).contains("--nfacct-name  localhost_nps_accepted_pkts")
            }
        } catch {
            Issue.record("no nfacct rule; sluice log:\n\(logText().suffix(3000))\n\((try? ns.run(["iptables-save"]).stdout) ?? "")")
            throw error
        }
        let filter = try ns.run(["iptables-save", "-t", "filter"]).stdout
        #expect(filter.contains("--ctstate INVALID -m nfacct --nfacct-name  ct_state_invalid_dropped_pkts -j DROP"), "\(filter)")
        // Three connection attempts to the localhost NodePort (the endpoint does not exist: the
        // first packet of each is counted by the rule all the same).
        for _ in 0..<3 { _ = try ns.run(["curl", "-s", "--max-time", "1", "http://127.0.0.1:30080/"]) }
        let name = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total"
        try await Eventually.wait("the counter on /metrics", timeout: .seconds(10), interval: .milliseconds(200)) {
            let metrics = try ns.run(["curl", "-s", "http://127.0.0.1:10249/metrics"]).stdout
            let value = metrics.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") }
            return (value ?? 0) >= 3
        }
        let metrics = try ns.run(["curl", "-s", "http://127.0.0.1:10249/metrics"]).stdout
        #expect(metrics.contains("kubeproxy_iptables_ct_state_invalid_dropped_packets_total"), "\(metrics)")
    }
}
