// Sluice: a per-node Kubernetes service proxy.
// Throw-away certificates for TLS tests, made with the openssl command: a CA, a server
// certificate for 127.0.0.1 and a client certificate it signed, and an unrelated CA.

import Foundation

/// PEM files in a temporary directory.
public struct TestCertificates: Sendable {
    /// The directory holding every file.
    public var directory: String
    public var caCertificate: String { directory + "/ca.crt" }
    public var serverCertificate: String { directory + "/server.crt" }
    public var serverKey: String { directory + "/server.key" }
    public var clientCertificate: String { directory + "/client.crt" }
    public var clientKey: String { directory + "/client.key" }
    /// A CA that signed nothing here.
    public var otherCACertificate: String { directory + "/other-ca.crt" }

    /// Why certificates cannot be made here, nil when they can.
    public static var unavailableReason: String? {
        ToolRunner.which("openssl") == nil ? "the openssl command is not installed" : nil
    }

    /// Generates every file (EC P-256 keys, valid for a day).
    public static func generate() throws -> TestCertificates {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-certs-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let c = TestCertificates(directory: dir)
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for (name, cn) in [("ca", "sluice-test-ca"), ("other-ca", "unrelated-ca")] {
            try ToolRunner.check(["openssl", "req", "-x509"] + ec + ["-keyout", "\(dir)/\(name).key", "-out", "\(dir)/\(name).crt",
                                                                   "-days", "1", "-subj", "/CN=\(cn)"])
        }
        try "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n".write(toFile: "\(dir)/server.ext", atomically: true, encoding: .utf8)
        try "extendedKeyUsage=clientAuth\n".write(toFile: "\(dir)/client.ext", atomically: true, encoding: .utf8)
        for (name, cn) in [("server", "127.0.0.1"), ("client", "system:kube-proxy")] {
            try ToolRunner.check(["openssl", "req"] + ec + ["-keyout", "\(dir)/\(name).key", "-out", "\(dir)/\(name).csr", "-subj", "/CN=\(cn)"])
            try ToolRunner.check(["openssl", "x509", "-req", "-in", "\(dir)/\(name).csr", "-CA", "\(dir)/ca.crt", "-CAkey", "\(dir)/ca.key",
                                  "-CAcreateserial", "-out", "\(dir)/\(name).crt", "-days", "1", "-extfile", "\(dir)/\(name).ext"])
        }
        return c
    }

    /// Removes the directory.
    public func remove() {
        try? FileManager.default.removeItem(atPath: directory)
    }
}
