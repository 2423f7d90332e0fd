// Sluice: a per-node Kubernetes service proxy.
// TLS material from a kubeconfig, and the bearer token that goes with every request. A token
// file is re-read when it changes, when it is older than a minute, and after a 401 (bound
// service-account tokens rotate under a running pod). No token ever reaches a log line.

import Foundation
import Logging
import NIOSSL
import Synchronization

/// PEM parsing and the client TLS configuration.
enum TLSMaterial {
    /// The certificates in a PEM bundle; throws when there are none.
    static func certificates(_ pem: [UInt8]) throws -> [NIOSSLCertificate] {
        let certs = try NIOSSLCertificate.fromPEMBytes(pem)
        guard !certs.isEmpty else { throw TLSMaterialError(message: "no certificate in the PEM data") }
        return certs
    }

    /// The private key in PEM data.
    static func privateKey(_ pem: [UInt8]) throws -> NIOSSLPrivateKey {
        try NIOSSLPrivateKey(bytes: pem, format: .pem)
    }

    /// The client TLS configuration of `config` (used only for https servers).
    static func clientConfiguration(_ config: KubeConfig) throws -> TLSConfiguration {
        var tls = TLSConfiguration.makeClientConfiguration()
        if config.insecureSkipTLSVerify {
            tls.certificateVerification = .none
        } else if let ca = config.certificateAuthorityPEM {
            tls.trustRoots = .certificates(try certificates(ca))
        }
        if let cert = config.clientCertificatePEM, let key = config.clientKeyPEM {
            tls.certificateChain = try certificates(cert).map { .certificate($0) }
            tls.privateKey = .privateKey(try privateKey(key))
        }
        return tls
    }
}

struct TLSMaterialError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// Produces the `Authorization` header value for each request.
///
/// With a token file, the file is re-read when its identity (inode, size, modification time;
/// symlinks followed, as kubelet's projected volumes swap them) changes, when the last read is
/// older than `maximumAge`, and after `invalidate()` (called on a 401). A failed re-read keeps the
/// last good token and logs the path, never the content.
public final class TokenProvider: Sendable {
    private struct FileStamp: Equatable {
        var inode: UInt64
        var size: Int64
        var mtimeSeconds: Int
        var mtimeNanoseconds: Int
    }

    private struct State {
        var token: String?
        var stamp: FileStamp?
        var readAt: ContinuousClock.Instant?
        var stale = false
        var reads = 0
    }

    private let credentials: Credentials
    private let maximumAge: Duration
    private let logger: Logger
    private let state = Mutex(State())

    /// Creates a provider for `credentials`.
    public init(credentials: Credentials, maximumAge: Duration = .seconds(60), logger: Logger) {
        self.credentials = credentials
        self.maximumAge = maximumAge
        self.logger = logger
    }

    /// How many times the token file has been read (tests watch rotation through it).
    public var fileReads: Int { state.withLock { $0.reads } }

    /// Marks the current token as rejected: the next request re-reads the file.
    public func invalidate() {
        state.withLock { $0.stale = true }
    }

    /// The header value, or nil when requests carry no credentials (or no token could be read).
    public func authorization() -> String? {
        switch credentials {
        case .none: return nil
        case .bearerToken(let t): return "Bearer \(t.value)"
        case .basic(let user, let password):
            return "Basic " + Data("\(user):\(password.value)".utf8).base64EncodedString()
        case .tokenFile(let path):
            return fileToken(path).map { "Bearer \($0)" }
        }
    }

    private func fileToken(_ path: String) -> String? {
        let now = ContinuousClock.now
        let stamp = Self.stamp(path)
        let needRead: Bool = state.withLock { s in
            if s.token == nil || s.stale || s.stamp != stamp { return true }
            if let at = s.readAt, at.duration(to: now) >= maximumAge { return true }
            return false
        }
        guard needRead else { return state.withLock { $0.token } }
        let text = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        return state.withLock { s in
            s.reads += 1
            s.readAt = now
            guard let t = text, !t.isEmpty else {
                // Keep the last good token; the path is safe to log, the content never is.
                logger.warning("cannot read a token from \(path); keeping the previous token")
                s.stale = false
                return s.token
            }
            if s.token != nil && s.token != t { logger.info("token file \(path) changed; using the new token") }
            s.token = t
            s.stamp = stamp
            s.stale = false
            return t
        }
    }

    private static func stamp(_ path: String) -> FileStamp? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return FileStamp(inode: UInt64(st.st_ino), size: Int64(st.st_size), mtimeSeconds: Int(st.st_mtim.tv_sec),
                         mtimeNanoseconds: Int(st.st_mtim.tv_nsec))
    }
}
