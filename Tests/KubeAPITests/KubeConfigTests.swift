// Kubeconfig, in-cluster and --master configuration; TLS against the fake server over HTTPS.

import Foundation
import KubeAPI
import Logging
import SluiceCore
import SluiceTesting
import Testing

private func tempDir() throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-kubeconfig-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

private func base64(file: String) throws -> String {
    try Data(contentsOf: URL(fileURLWithPath: file)).base64EncodedString()
}

/// A kubeconfig with one context `ctx` using cluster `c` and user `u`; `cluster` and `user`
/// are extra YAML lines for those entries.
private func kubeconfig(server: String, cluster: String = "", user: String = "") -> String {
    let clusterLines = (["server: \(server)"] + cluster.split(separator: "\n").map(String.init)).map { "    " + $0 }
    let userLines = user.split(separator: "\n").map { "    " + $0 }
    var lines = ["apiVersion: v1", "kind: Config", "current-context: ctx", "preferences: {}", "clusters:", "- name: c", "  cluster:"]
    lines += clusterLines
    lines += ["contexts:", "- name: other", "  context: {cluster: nowhere, user: nobody}",
              "- name: ctx", "  context:", "    cluster: c", "    user: u", "    namespace: kube-system", "users:", "- name: u"]
    lines += userLines.isEmpty ? ["  user: {}"] : ["  user:"] + userLines
    return lines.joined(separator: "\n") + "\n"
}

@Suite struct KubeConfigTests {
    @Test func readsTheCurrentContextWithATokenFileRelativeToTheFile() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "abc.def\n".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        try kubeconfig(server: "https://10.0.0.1:6443/", cluster: "insecure-skip-tls-verify: true", user: "tokenFile: token")
            .write(toFile: dir + "/config", atomically: true, encoding: .utf8)
        let c = try KubeConfig.load(file: dir + "/config")
        #expect(c.server == "https://10.0.0.1:6443")
        #expect(c.insecureSkipTLSVerify)
        #expect(c.credentials == .tokenFile(dir + "/token"))
        #expect(c.origin.contains("context ctx"))
    }

    @Test func inlineTokenNeverPrints() throws {
        let c = try KubeConfig.parse(kubeconfig(server: "https://k:6443", user: "token: sup3r-s3cret-t0ken"), file: "k", baseDirectory: "/")
        #expect(c.credentials == .bearerToken(Secret("sup3r-s3cret-t0ken")))
        #expect(!"\(c)".contains("sup3r"))
        #expect(!String(reflecting: c).contains("sup3r"))
        #expect(!"\(c.credentials)".contains("sup3r"))
        let basic = try KubeConfig.parse(kubeconfig(server: "https://k", user: "username: admin\npassword: hunter2-pw"), file: "k", baseDirectory: "/")
        #expect(basic.credentials == .basic(username: "admin", password: Secret("hunter2-pw")))
        #expect(!String(reflecting: basic).contains("hunter2"))
    }

    @Test func namedContextAndMasterOverride() throws {
        let text = kubeconfig(server: "https://a:6443") + "\n"
        let c = try KubeConfig.parse(text, file: "k", baseDirectory: "/", master: "http://127.0.0.1:8080")
        #expect(c.server == "http://127.0.0.1:8080")
        #expect(throws: KubeConfigError.self) { try KubeConfig.parse(text, file: "k", baseDirectory: "/", context: "other") }
        #expect(try KubeConfig.master("10.0.0.1:6443").server == "https://10.0.0.1:6443")
        #expect(try KubeConfig.master("http://h:8080").credentials == .none)
    }

    @Test(arguments: [
        ("apiVersion: v1\nkind: Config\n", "current-context is not set"),
        ("- a\n- list\n", "is not a YAML mapping"),
        ("a: [unclosed\n", "is not valid YAML"),
        ("kind: Pod\n", "kind is \"Pod\""),
        ("current-context: x\ncontexts: []\n", "context \"x\" is not defined"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: [{name: d, cluster: {server: https://a}}]\n",
         "cluster \"c\" is not defined"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: [{name: c, cluster: {}}]\n", "has no server"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: [{name: c, cluster: {server: 'ftp://a'}}]\n",
         "is not an http(s) URL"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: [{name: c, cluster: {server: https://a, certificate-authority-data: '***'}}]\n",
         "certificate-authority-data is not valid base64"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: [{name: c, cluster: {server: https://a, certificate-authority-data: aGVsbG8=}}]\n",
         "certificate-authority is not a PEM certificate"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\nclusters: [{name: c, cluster: {server: https://a, certificate-authority: /nonexistent/ca.crt}}]\n",
         "certificate-authority /nonexistent/ca.crt: no such file"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\nclusters: [{name: c, cluster: {server: https://a}}]\nusers: [{name: u, user: {exec: {command: aws}}}]\n",
         "uses exec"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\nclusters: [{name: c, cluster: {server: https://a}}]\nusers: [{name: u, user: {tokenFile: /nonexistent/token}}]\n",
         "tokenFile /nonexistent/token is missing"),
        ("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\nclusters: [{name: c, cluster: {server: https://a}}]\nusers: [{name: u, user: {client-key-data: aGVsbG8=}}]\n",
         "has a client key but no client certificate"),
    ])
    func brokenFilesNameTheFileAndTheProblem(text: String, problem: String) throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/kubeconfig"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        do {
            _ = try KubeConfig.load(file: path)
            Issue.record("loaded a broken kubeconfig")
        } catch {
            #expect(error.file == path)
            #expect(error.problem.contains(problem), "\(error.problem)")
            #expect(error.description.hasPrefix("kubeconfig \(path): "))
            #expect(!error.description.contains("\n"))
        }
    }

    @Test func missingFileAndDirectory() throws {
        #expect(throws: KubeConfigError(file: "/nonexistent/config", problem: "no such file")) {
            try KubeConfig.load(file: "/nonexistent/config")
        }
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(throws: KubeConfigError.self) { try KubeConfig.load(file: dir) }
    }

    @Test func inClusterConfiguration() throws {
        guard TestCertificates.unavailableReason == nil else { return }
        let certs = try TestCertificates.generate()
        defer { certs.remove() }
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.copyItem(atPath: certs.caCertificate, toPath: dir + "/ca.crt")
        try "eyJhbGciOi.token\n".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        let c = try KubeConfig.inCluster(environment: ["KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"], directory: dir)
        #expect(c.server == "https://[fd00::1]:443")
        #expect(c.credentials == .tokenFile(dir + "/token"))
        #expect(c.certificateAuthorityPEM != nil)
        #expect(throws: KubeConfigError.self) { try KubeConfig.inCluster(environment: [:], directory: dir) }
        #expect(throws: KubeConfigError.self) {
            try KubeConfig.inCluster(environment: ["KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"], directory: "/nonexistent")
        }
    }
}

/// HTTPS with the kubeconfig's CA and client certificate, against the fake server requiring one.
@Suite struct KubeConfigTLSTests {
    private func listOnce(_ config: KubeConfig) async throws -> Int {
        let client = try KubeClient(config: config, logger: Logger(label: "tls-test"), requestTimeout: .seconds(20))
        do {
            let page = try await client.list(.services)
            await client.shutdown()
            return page.objects.count
        } catch {
            await client.shutdown()
            throw error
        }
    }

    @Test func mutualTLSWithInlineDataAndPaths() async throws {
        if let why = TestCertificates.unavailableReason {
            print("skipping mutualTLSWithInlineDataAndPaths: \(why)")
            return
        }
        let certs = try TestCertificates.generate()
        defer { certs.remove() }
        let server = try FakeAPIServer(tls: .init(certificate: certs.serverCertificate, key: certs.serverKey, clientCA: certs.caCertificate))
        try await server.start()
        server.apply(.services, FakeObjects.service("web", clusterIP: "10.96.0.10"))

        // CA by path (relative to the file), client certificate and key inline.
        let user = "client-certificate-data: \(try base64(file: certs.clientCertificate))\nclient-key-data: \(try base64(file: certs.clientKey))"
        let text = kubeconfig(server: server.url, cluster: "certificate-authority: ca.crt", user: user)
        let good = try KubeConfig.parse(text, file: "inline", baseDirectory: certs.directory)
        #expect(try await listOnce(good) == 1)

        // CA inline, client certificate and key by path.
        let text2 = kubeconfig(server: server.url, cluster: "certificate-authority-data: \(try base64(file: certs.caCertificate))",
                               user: "client-certificate: client.crt\nclient-key: client.key")
        #expect(try await listOnce(try KubeConfig.parse(text2, file: "paths", baseDirectory: certs.directory)) == 1)

        // Without the client certificate the server refuses the handshake.
        var noClientCert = good
        noClientCert.clientCertificatePEM = nil
        noClientCert.clientKeyPEM = nil
        await #expect(throws: (any Error).self) { _ = try await listOnce(noClientCert) }

        // A CA that did not sign the server's certificate fails verification.
        var wrongCA = good
        wrongCA.certificateAuthorityPEM = Array(try Data(contentsOf: URL(fileURLWithPath: certs.otherCACertificate)))
        await #expect(throws: (any Error).self) { _ = try await listOnce(wrongCA) }
        await server.stop()
    }

    @Test func insecureSkipTLSVerify() async throws {
        if let why = TestCertificates.unavailableReason {
            print("skipping insecureSkipTLSVerify: \(why)")
            return
        }
        let certs = try TestCertificates.generate()
        defer { certs.remove() }
        let server = try FakeAPIServer(tls: .init(certificate: certs.serverCertificate, key: certs.serverKey))
        try await server.start()
        let insecure = try KubeConfig.parse(kubeconfig(server: server.url, cluster: "insecure-skip-tls-verify: true"), file: "k",
                                            baseDirectory: certs.directory)
        #expect(try await listOnce(insecure) == 0)
        // The same server with verification on (system roots) is refused.
        let verifying = try KubeConfig.parse(kubeconfig(server: server.url), file: "k", baseDirectory: certs.directory)
        await #expect(throws: (any Error).self) { _ = try await listOnce(verifying) }
        await server.stop()
    }
}
