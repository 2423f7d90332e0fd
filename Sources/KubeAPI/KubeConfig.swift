// Sluice: a per-node Kubernetes service proxy.
// Where the API server is and how to authenticate to it: a kubeconfig file (its current
// context), `--master`, or the pod's in-cluster service account. Everything is read and
// checked once at start-up, so a broken file is one clear error naming the file and the
// problem; only the token file is re-read later (bound service-account tokens rotate).

import Foundation
import SluiceCore
import Yams

/// A credential value that never prints itself (tokens, passwords).
public struct Secret: Sendable, Hashable, CustomStringConvertible, CustomDebugStringConvertible {
    /// The secret text. Use it only to build the request that carries it.
    public let value: String

    /// Wraps a secret.
    public init(_ value: String) { self.value = value }

    public var description: String { "<redacted>" }
    public var debugDescription: String { "<redacted>" }
}

/// How requests authenticate, besides a client certificate.
public enum Credentials: Sendable, Hashable, CustomStringConvertible {
    /// No `Authorization` header.
    case none
    /// A fixed bearer token (kubeconfig `token`).
    case bearerToken(Secret)
    /// A bearer token read from a file and re-read when the file changes (kubeconfig
    /// `tokenFile`, the in-cluster service-account token).
    case tokenFile(String)
    /// HTTP basic authentication (kubeconfig `username` / `password`).
    case basic(username: String, password: Secret)

    public var description: String {
        switch self {
        case .none: return "none"
        case .bearerToken: return "bearer token"
        case .tokenFile(let path): return "token file \(path)"
        case .basic(let user, _): return "basic auth as \(user)"
        }
    }
}

/// A configuration that cannot be used: which file (or source) and what is wrong with it.
public struct KubeConfigError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The kubeconfig path, or a name for the source ("in-cluster config", "--master").
    public var file: String
    /// What is wrong, naming the entry and field.
    public var problem: String

    /// Creates an error.
    public init(file: String, problem: String) {
        self.file = file
        self.problem = problem
    }

    public var description: String { "kubeconfig \(file): \(problem)" }
}

/// Everything needed to reach one API server.
public struct KubeConfig: Sendable, Hashable, CustomStringConvertible {
    /// Base URL of the API server: `https://host:port` plus an optional path prefix, no
    /// trailing slash.
    public var server: String
    /// PEM bundle of the CAs that sign the server's certificate; nil means the system's roots.
    public var certificateAuthorityPEM: [UInt8]?
    /// Skip verifying the server's certificate (kubeconfig `insecure-skip-tls-verify`).
    public var insecureSkipTLSVerify: Bool
    /// PEM client certificate (chain) for mutual TLS.
    public var clientCertificatePEM: [UInt8]?
    /// PEM private key of the client certificate.
    public var clientKeyPEM: [UInt8]?
    /// Token or basic authentication.
    public var credentials: Credentials
    /// Where this came from, for log lines ("kubeconfig /etc/k.conf context prod", "in-cluster").
    public var origin: String

    /// Creates a configuration; `load`, `inCluster` and `master` are the usual ways.
    public init(server: String, certificateAuthorityPEM: [UInt8]? = nil, insecureSkipTLSVerify: Bool = false,
                clientCertificatePEM: [UInt8]? = nil, clientKeyPEM: [UInt8]? = nil, credentials: Credentials = .none,
                origin: String = "explicit") {
        self.server = server
        self.certificateAuthorityPEM = certificateAuthorityPEM
        self.insecureSkipTLSVerify = insecureSkipTLSVerify
        self.clientCertificatePEM = clientCertificatePEM
        self.clientKeyPEM = clientKeyPEM
        self.credentials = credentials
        self.origin = origin
    }

    /// One line for the start-up log: server, origin and the kinds of credential (never their values).
    public var description: String {
        var auth: [String] = []
        if clientCertificatePEM != nil { auth.append("client certificate") }
        if credentials != .none { auth.append(credentials.description) }
        if auth.isEmpty { auth.append("no credentials") }
        let tls = server.hasPrefix("https:") ? (insecureSkipTLSVerify ? ", TLS not verified" : "") : ", plain HTTP"
        return "\(server) (\(origin); \(auth.joined(separator: ", "))\(tls))"
    }

    /// The directory holding the service-account token and CA inside a pod.
    public static let serviceAccountDirectory = "/var/run/secrets/kubernetes.io/serviceaccount"

    // MARK: - --master

    /// `--master URL` alone: that server, no credentials (kube-proxy's behaviour).
    public static func master(_ url: String) throws(KubeConfigError) -> KubeConfig {
        let server = try checkServer(url, file: "--master", entry: "--master")
        return KubeConfig(server: server, origin: "--master")
    }

    // MARK: - in-cluster

    /// The pod's own configuration: `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT`,
    /// and the service account's token and CA under `directory`.
    public static func inCluster(environment: [String: String] = ProcessInfo.processInfo.environment,
                                 directory: String = serviceAccountDirectory) throws(KubeConfigError) -> KubeConfig {
        let name = "in-cluster config"
        guard let host = environment["KUBERNETES_SERVICE_HOST"], !host.isEmpty,
              let port = environment["KUBERNETES_SERVICE_PORT"], !port.isEmpty
        else {
            throw KubeConfigError(file: name, problem: "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must both be set (not running in a pod?)")
        }
        guard let p = Int(port), (1...65535).contains(p) else {
            throw KubeConfigError(file: name, problem: "KUBERNETES_SERVICE_PORT \"\(printable(port))\" is not a port number")
        }
        let hostPart = host.contains(":") ? "[\(host)]" : host
        let tokenPath = directory + "/token"
        let caPath = directory + "/ca.crt"
        guard FileManager.default.isReadableFile(atPath: tokenPath) else {
            throw KubeConfigError(file: name, problem: "service-account token \(tokenPath) is missing or unreadable")
        }
        let ca = try readFile(caPath, file: name, entry: "service account", field: "ca.crt")
        try checkCertificates(ca, file: name, entry: "service account", field: caPath)
        let server = try checkServer("https://\(hostPart):\(p)", file: name, entry: "KUBERNETES_SERVICE_HOST")
        return KubeConfig(server: server, certificateAuthorityPEM: ca, credentials: .tokenFile(tokenPath), origin: "in-cluster")
    }

    // MARK: - kubeconfig files

    /// Loads a kubeconfig file: the `context` given, else its `current-context`. `master`,
    /// when given, replaces the cluster's server. Relative paths in the file are relative to
    /// the file's directory (as kubectl reads them).
    public static func load(file: String, context: String? = nil, master: String? = nil) throws(KubeConfigError) -> KubeConfig {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: file, isDirectory: &isDir) else {
            throw KubeConfigError(file: file, problem: "no such file")
        }
        guard !isDir.boolValue else { throw KubeConfigError(file: file, problem: "is a directory, not a kubeconfig file") }
        guard let data = FileManager.default.contents(atPath: file) else {
            throw KubeConfigError(file: file, problem: "cannot be read (permissions?)")
        }
        guard data.count <= 16 << 20 else { throw KubeConfigError(file: file, problem: "\(data.count) bytes is too large for a kubeconfig") }
        guard let text = String(data: data, encoding: .utf8) else { throw KubeConfigError(file: file, problem: "is not UTF-8 text") }
        let base = URL(fileURLWithPath: file).deletingLastPathComponent().path
        return try parse(text, file: file, baseDirectory: base, context: context, master: master)
    }

    /// Parses kubeconfig text; `file` names it in errors, `baseDirectory` anchors relative paths.
    public static func parse(_ text: String, file: String, baseDirectory: String, context wanted: String? = nil,
                             master: String? = nil) throws(KubeConfigError) -> KubeConfig {
        let root: [String: Any]
        do {
            guard let tree = try Yams.load(yaml: text) else { throw KubeConfigError(file: file, problem: "is empty") }
            guard let map = tree as? [String: Any] else { throw KubeConfigError(file: file, problem: "is not a YAML mapping") }
            root = map
        } catch let e as KubeConfigError {
            throw e
        } catch {
            let firstLine = String(describing: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            throw KubeConfigError(file: file, problem: "is not valid YAML (\(firstLine.prefix(200)))")
        }
        if let kind = root["kind"] as? String, kind != "Config" {
            throw KubeConfigError(file: file, problem: "kind is \"\(printable(kind))\", expected Config")
        }
        let contextName: String
        if let w = wanted, !w.isEmpty {
            contextName = w
        } else if let c = root["current-context"] as? String, !c.isEmpty {
            contextName = c
        } else if master != nil {
            // kube-proxy's clientcmd accepts --master with a kubeconfig that has no context.
            return try KubeConfig(server: checkServer(master!, file: file, entry: "--master"), origin: "kubeconfig \(file) with --master")
        } else {
            throw KubeConfigError(file: file, problem: "current-context is not set")
        }
        let ctx = try namedEntry(root, list: "contexts", name: contextName, inner: "context", file: file)
        guard let clusterName = ctx["cluster"] as? String, !clusterName.isEmpty else {
            throw KubeConfigError(file: file, problem: "context \"\(printable(contextName))\" names no cluster")
        }
        let cluster = try namedEntry(root, list: "clusters", name: clusterName, inner: "cluster", file: file)
        let userName = ctx["user"] as? String ?? ""
        let user: [String: Any] = userName.isEmpty ? [:] : try namedEntry(root, list: "users", name: userName, inner: "user", file: file)

        let clusterEntry = "cluster \"\(printable(clusterName))\""
        let serverText: String
        if let m = master, !m.isEmpty {
            serverText = m
        } else if let s = cluster["server"] as? String, !s.isEmpty {
            serverText = s
        } else {
            throw KubeConfigError(file: file, problem: "\(clusterEntry) has no server")
        }
        let server = try checkServer(serverText, file: file, entry: master != nil ? "--master" : clusterEntry)
        var config = KubeConfig(server: server, origin: "kubeconfig \(file) context \(contextName)")
        config.insecureSkipTLSVerify = try flag(cluster, "insecure-skip-tls-verify", file: file, entry: clusterEntry)
        config.certificateAuthorityPEM = try material(cluster, data: "certificate-authority-data", path: "certificate-authority",
                                                      base: baseDirectory, file: file, entry: clusterEntry)
        if let ca = config.certificateAuthorityPEM {
            try checkCertificates(ca, file: file, entry: clusterEntry, field: "certificate-authority")
        }
        if config.insecureSkipTLSVerify && config.certificateAuthorityPEM != nil {
            throw KubeConfigError(file: file, problem: "\(clusterEntry) sets both a certificate authority and insecure-skip-tls-verify; use one")
        }

        let userEntry = "user \"\(printable(userName))\""
        for unsupported in ["exec", "auth-provider"] where user[unsupported] != nil {
            throw KubeConfigError(file: file, problem: "\(userEntry) uses \(unsupported), which Sluice does not support; use a client certificate or a token")
        }
        config.clientCertificatePEM = try material(user, data: "client-certificate-data", path: "client-certificate",
                                                   base: baseDirectory, file: file, entry: userEntry)
        config.clientKeyPEM = try material(user, data: "client-key-data", path: "client-key", base: baseDirectory, file: file, entry: userEntry)
        switch (config.clientCertificatePEM, config.clientKeyPEM) {
        case (nil, nil): break
        case (.some(let cert), .some(let key)):
            try checkCertificates(cert, file: file, entry: userEntry, field: "client-certificate")
            try checkKey(key, file: file, entry: userEntry)
        case (.some, nil): throw KubeConfigError(file: file, problem: "\(userEntry) has a client certificate but no client key")
        case (nil, .some): throw KubeConfigError(file: file, problem: "\(userEntry) has a client key but no client certificate")
        }
        if let token = try string(user, "token", file: file, entry: userEntry), !token.isEmpty {
            config.credentials = .bearerToken(Secret(token.trimmingCharacters(in: .whitespacesAndNewlines)))
        } else if let tf = try string(user, "tokenFile", file: file, entry: userEntry), !tf.isEmpty {
            let path = absolute(tf, base: baseDirectory)
            guard FileManager.default.isReadableFile(atPath: path) else {
                throw KubeConfigError(file: file, problem: "\(userEntry): tokenFile \(path) is missing or unreadable")
            }
            config.credentials = .tokenFile(path)
        } else if let u = try string(user, "username", file: file, entry: userEntry), !u.isEmpty {
            config.credentials = .basic(username: u, password: Secret(try string(user, "password", file: file, entry: userEntry) ?? ""))
        }
        return config
    }

    // MARK: - helpers

    private static func namedEntry(_ root: [String: Any], list: String, name: String, inner: String,
                                   file: String) throws(KubeConfigError) -> [String: Any] {
        let singular = String(list.dropLast())
        guard let items = root[list] as? [Any] else {
            throw KubeConfigError(file: file, problem: "has no \(list) list, so \(singular) \"\(printable(name))\" is not defined")
        }
        for item in items {
            guard let m = item as? [String: Any], (m["name"] as? String) == name else { continue }
            guard let body = m[inner] as? [String: Any] else {
                throw KubeConfigError(file: file, problem: "\(singular) \"\(printable(name))\" has no \(inner) mapping")
            }
            return body
        }
        throw KubeConfigError(file: file, problem: "\(singular) \"\(printable(name))\" is not defined")
    }

    private static func string(_ m: [String: Any], _ key: String, file: String, entry: String) throws(KubeConfigError) -> String? {
        guard let v = m[key], !(v is NSNull) else { return nil }
        guard let s = v as? String else { throw KubeConfigError(file: file, problem: "\(entry): \(key) must be a string") }
        return s
    }

    private static func flag(_ m: [String: Any], _ key: String, file: String, entry: String) throws(KubeConfigError) -> Bool {
        guard let v = m[key], !(v is NSNull) else { return false }
        if let b = v as? Bool { return b }
        if let s = v as? String, s == "true" || s == "false" { return s == "true" }
        throw KubeConfigError(file: file, problem: "\(entry): \(key) must be true or false")
    }

    /// Inline base64 `data` wins over a `path`, as in kubectl.
    private static func material(_ m: [String: Any], data: String, path: String, base: String, file: String,
                                 entry: String) throws(KubeConfigError) -> [UInt8]? {
        if let d = try string(m, data, file: file, entry: entry), !d.isEmpty {
            let compact = d.filter { !$0.isWhitespace }
            guard let bytes = Data(base64Encoded: compact) else {
                throw KubeConfigError(file: file, problem: "\(entry): \(data) is not valid base64")
            }
            return Array(bytes)
        }
        if let p = try string(m, path, file: file, entry: entry), !p.isEmpty {
            return try readFile(absolute(p, base: base), file: file, entry: entry, field: path)
        }
        return nil
    }

    private static func readFile(_ path: String, file: String, entry: String, field: String) throws(KubeConfigError) -> [UInt8] {
        guard FileManager.default.fileExists(atPath: path) else {
            throw KubeConfigError(file: file, problem: "\(entry): \(field) \(path): no such file")
        }
        guard let d = FileManager.default.contents(atPath: path) else {
            throw KubeConfigError(file: file, problem: "\(entry): \(field) \(path) cannot be read")
        }
        return Array(d)
    }

    private static func absolute(_ path: String, base: String) -> String {
        if path.hasPrefix("/") { return path }
        if path.hasPrefix("~/") { return NSHomeDirectory() + path.dropFirst(1) }
        return base.isEmpty ? path : base + "/" + path
    }

    /// Accepts `http(s)://host[:port][/prefix]`; a bare `host:port` gets `https://`.
    static func checkServer(_ text: String, file: String, entry: String) throws(KubeConfigError) -> String {
        var s = text.trimmingCharacters(in: .whitespaces)
        if !s.contains("://") { s = "https://" + s }
        guard let url = URL(string: s), let scheme = url.scheme?.lowercased(), scheme == "https" || scheme == "http",
              let host = url.host, !host.isEmpty
        else {
            throw KubeConfigError(file: file, problem: "\(entry): server \"\(printable(text))\" is not an http(s) URL")
        }
        if url.query != nil || url.fragment != nil || url.user != nil {
            throw KubeConfigError(file: file, problem: "\(entry): server \"\(printable(text))\" must not carry a query, fragment or user")
        }
        while s.hasSuffix("/") { s.removeLast() }
        return s
    }

    private static func checkCertificates(_ pem: [UInt8], file: String, entry: String, field: String) throws(KubeConfigError) {
        do {
            _ = try TLSMaterial.certificates(pem)
        } catch {
            throw KubeConfigError(file: file, problem: "\(entry): \(field) is not a PEM certificate (\(error))")
        }
    }

    private static func checkKey(_ pem: [UInt8], file: String, entry: String) throws(KubeConfigError) {
        do {
            _ = try TLSMaterial.privateKey(pem)
        } catch {
            throw KubeConfigError(file: file, problem: "\(entry): client-key is not a PEM private key (\(error))")
        }
    }

    private static func printable(_ s: String) -> String { Validation.printable(s) }
}
