// Sluice: a per-node Kubernetes service proxy.
// A small Kubernetes API client: paginated LIST, GET, and WATCH as a stream of decoded events,
// over AsyncHTTPClient with the kubeconfig's TLS and credentials.

import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import SluiceCore
import Synchronization

/// A resource type the proxy reads.
public struct KubeResource: Sendable, Hashable, CustomStringConvertible {
    /// `v1` or `group/version`.
    public var apiVersion: String
    /// The object kind (`Service`).
    public var kind: String
    /// The URL path segment (`services`).
    public var plural: String
    /// Whether objects live in namespaces.
    public var namespaced: Bool

    /// Creates a resource description.
    public init(apiVersion: String, kind: String, plural: String, namespaced: Bool) {
        self.apiVersion = apiVersion
        self.kind = kind
        self.plural = plural
        self.namespaced = namespaced
    }

    /// v1 Services.
    public static let services = KubeResource(apiVersion: "v1", kind: "Service", plural: "services", namespaced: true)
    /// discovery.k8s.io/v1 EndpointSlices.
    public static let endpointSlices = KubeResource(apiVersion: "discovery.k8s.io/v1", kind: "EndpointSlice",
                                                    plural: "endpointslices", namespaced: true)
    /// v1 Nodes.
    public static let nodes = KubeResource(apiVersion: "v1", kind: "Node", plural: "nodes", namespaced: false)
    /// networking.k8s.io/v1 ServiceCIDRs (cluster-scoped; served from Kubernetes 1.33).
    public static let serviceCIDRs = KubeResource(apiVersion: "networking.k8s.io/v1", kind: "ServiceCIDR",
                                                  plural: "servicecidrs", namespaced: false)

    /// The collection path across all namespaces.
    public var path: String { apiVersion.contains("/") ? "/apis/\(apiVersion)/\(plural)" : "/api/\(apiVersion)/\(plural)" }

    public var description: String { plural }

    /// The delete event for an object of this resource.
    public func deleteEvent(_ key: NamespacedName) -> ObjectEvent {
        switch kind {
        case "Service": return .serviceDeleted(key)
        case "EndpointSlice": return .sliceDeleted(key)
        case "ServiceCIDR": return .serviceCIDRDeleted(key.name)
        default: return .nodeDeleted(key.name)
        }
    }
}

/// An error the API server reported (an HTTP status, or a `Status` in a watch stream).
public struct KubeAPIError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What was asked, e.g. `list services`.
    public var request: String
    /// The HTTP status code (the Status object's `code`).
    public var code: Int
    /// The Status `reason` (`Expired`, `Forbidden`, ...), empty when none.
    public var reason: String
    /// The Status `message`, or the start of a non-Status body.
    public var message: String

    /// Creates an error.
    public init(request: String, code: Int, reason: String = "", message: String = "") {
        self.request = request
        self.code = code
        self.reason = reason
        self.message = message
    }

    /// 410 Gone: the resource version (or continue token) is too old; list again.
    public var isGone: Bool { code == 410 }

    public var description: String {
        var s = "\(request): HTTP \(code)"
        if !reason.isEmpty { s += " \(reason)" }
        if !message.isEmpty { s += ": \(Validation.printable(message))" }
        return s
    }

    /// Builds an error from a `Status` object (or whatever JSON the body held).
    static func from(status tree: [String: Any]?, code: Int, request: String) -> KubeAPIError {
        let c = (tree?["code"] as? Int) ?? code
        return KubeAPIError(request: request, code: c, reason: tree?["reason"] as? String ?? "", message: tree?["message"] as? String ?? "")
    }
}

/// The connection to the API server failed (refused, reset, TLS, timeout) before or while a
/// response arrived.
public struct KubeTransportError: Error, Sendable, CustomStringConvertible {
    /// What was asked.
    public var request: String
    /// The underlying error, described.
    public var detail: String

    public var description: String { "\(request): \(detail)" }
}

/// One page of a LIST.
public struct ListPage: Sendable {
    /// Objects decoded from the page's items.
    public var objects: [KubeObject] = []
    /// The key of every item, including those that could not be decoded.
    public var keys: [NamespacedName] = []
    /// Items that could not be decoded.
    public var rejections: [ObjectRejection] = []
    /// The list's resourceVersion: a watch started from it sees every later change.
    public var resourceVersion = ""
    /// The token for the next page, nil on the last page.
    public var continueToken: String?
}

/// One event of a WATCH stream.
public enum WatchEvent: Sendable, Equatable {
    /// ADDED or MODIFIED.
    case upserted(KubeObject, key: NamespacedName, resourceVersion: String)
    /// DELETED.
    case deleted(NamespacedName, resourceVersion: String)
    /// BOOKMARK: nothing changed up to this resourceVersion.
    case bookmark(resourceVersion: String)
    /// ADDED/MODIFIED/DELETED whose object could not be decoded.
    case rejected(ObjectRejection, resourceVersion: String?)
    /// Bytes that were not a watch event (skipped; the stream goes on).
    case malformed(reason: String)
    /// An ERROR event: the server ends the watch with this Status (410 means list again).
    case failure(KubeAPIError)
}

/// A watch stream went quiet for longer than its idle limit (a dead connection).
public struct WatchIdleTimeout: Error, Sendable, CustomStringConvertible {
    /// The limit that passed.
    public var limit: Duration
    public var description: String { "no data for \(limit); the connection is presumed dead" }
}

/// A small Kubernetes API client.
public final class KubeClient: Sendable {
    /// The configuration in use.
    public let config: KubeConfig
    /// Credentials for each request; the token file behind it is re-read as it rotates.
    public let tokens: TokenProvider
    /// Deadline for a request's response head (and for a whole LIST page).
    public let requestTimeout: Duration
    private let http: HTTPClient
    private let logger: Logger
    private let userAgent: String
    private let isShutDown = Mutex(false)

    /// The largest LIST page body accepted.
    public static let maximumListBytes = 512 << 20

    /// Creates a client. Fails when the TLS material cannot be loaded (it was checked when
    /// the kubeconfig was read, so this is rare).
    public init(config: KubeConfig, logger: Logger, requestTimeout: Duration = .seconds(60),
                tokenMaximumAge: Duration = .seconds(60), userAgent: String = "sluice") throws(KubeConfigError) {
        self.config = config
        self.logger = logger
        self.requestTimeout = requestTimeout
        self.userAgent = userAgent
        self.tokens = TokenProvider(credentials: config.credentials, maximumAge: tokenMaximumAge, logger: logger)
        var tls: TLSConfiguration?
        if config.server.lowercased().hasPrefix("https:") {
            do {
                tls = try TLSMaterial.clientConfiguration(config)
            } catch {
                throw KubeConfigError(file: config.origin, problem: "TLS material cannot be used: \(error)")
            }
        }
        var cfg = HTTPClient.Configuration(tlsConfiguration: tls, redirectConfiguration: .disallow,
                                           timeout: .init(connect: .seconds(10), read: nil))
        cfg.decompression = .disabled
        cfg.connectionPool.idleTimeout = .seconds(90)
        // Fail a request as soon as its connection cannot be made (refused, TLS refused): the
        // informers retry with their own backoff, and the log names the real cause at once
        // instead of a deadline much later.
        cfg.connectionPool.retryConnectionEstablishment = false
        self.http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: cfg, backgroundActivityLogger: logger)
    }

    /// Closes every connection. Safe to call more than once; a client dropped without it is
    /// shut down in the background.
    public func shutdown() async {
        guard isShutDown.withLock({ done in defer { done = true }; return !done }) else { return }
        do { try await http.shutdown() } catch { logger.debug("HTTP client shutdown: \(error)") }
    }

    deinit {
        if !isShutDown.withLock({ $0 }) { _ = http.shutdown() }
    }

    // MARK: - requests

    /// Lists one page of `resource` across all namespaces.
    public func list(_ resource: KubeResource, labelSelector: String? = nil, fieldSelector: String? = nil, limit: Int? = nil,
                     continueToken: String? = nil) async throws -> ListPage {
        var query: [(String, String)] = []
        if let s = labelSelector, !s.isEmpty { query.append(("labelSelector", s)) }
        if let s = fieldSelector, !s.isEmpty { query.append(("fieldSelector", s)) }
        if let l = limit { query.append(("limit", String(l))) }
        if let c = continueToken { query.append(("continue", c)) }
        let what = "list \(resource.plural)"
        let response = try await send(path: resource.path, query: query, what: what)
        let body = try await collect(response, what: what)
        var page = ListPage()
        // Items are decoded into the model one at a time as the parser reaches them: the
        // page's JSON is never held as a tree, only its bytes, until this returns.
        let tree: [String: Any]
        do {
            tree = try JSONScanner.parseList(body) { item in
                guard let item = item as? [String: Any] else { return }
                let (key, result) = Self.decode(item, resource: resource)
                guard let key else {
                    page.rejections.append(ObjectRejection(kind: resource.kind, key: "?", reason: "list item has no metadata.name"))
                    return
                }
                page.keys.append(key)
                switch result {
                case .success(let o): page.objects.append(o)
                case .failure(let r): page.rejections.append(r)
                }
            }
        } catch {
            throw KubeAPIError(request: what, code: 200, reason: "BadResponse", message: "the list body is not a JSON object")
        }
        let meta = tree["metadata"] as? [String: Any] ?? [:]
        page.resourceVersion = meta["resourceVersion"] as? String ?? ""
        if let c = meta["continue"] as? String, !c.isEmpty { page.continueToken = c }
        return page
    }

    /// Reads one object; nil when it does not exist (404).
    public func get(_ resource: KubeResource, name: String, namespace: String? = nil) async throws -> KubeObject? {
        let base = namespace.map { resource.path.replacingOccurrences(of: "/\(resource.plural)", with: "/namespaces/\(Self.escape($0))/\(resource.plural)") }
            ?? resource.path
        let what = "get \(resource.kind) \(name)"
        let response: HTTPClientResponse
        do {
            response = try await send(path: base + "/" + Self.escape(name), query: [], what: what)
        } catch let e as KubeAPIError where e.code == 404 {
            return nil
        }
        let body = try await collect(response, what: what)
        guard let tree = try? JSONTree.parseObject(body) else {
            throw KubeAPIError(request: what, code: 200, reason: "BadResponse", message: "the body is not a JSON object")
        }
        switch Self.decode(tree, resource: resource).1 {
        case .success(let o): return o
        case .failure(let r): throw r
        }
    }

    /// Starts a watch from `resourceVersion`. The stream ends cleanly when the server closes it
    /// (its `timeoutSeconds` passed); it throws when the connection breaks or stays silent for
    /// `idleTimeout`. Throws at once for an HTTP error status (410 included).
    public func watch(_ resource: KubeResource, resourceVersion: String, labelSelector: String? = nil, fieldSelector: String? = nil,
                      timeoutSeconds: Int, idleTimeout: Duration) async throws -> AsyncThrowingStream<WatchEvent, Error> {
        var query: [(String, String)] = [("watch", "true"), ("resourceVersion", resourceVersion), ("allowWatchBookmarks", "true"),
                                         ("timeoutSeconds", String(timeoutSeconds))]
        if let s = labelSelector, !s.isEmpty { query.append(("labelSelector", s)) }
        if let s = fieldSelector, !s.isEmpty { query.append(("fieldSelector", s)) }
        let what = "watch \(resource.plural)"
        let response = try await send(path: resource.path, query: query, what: what)
        let (stream, continuation) = AsyncThrowingStream<WatchEvent, Error>.makeStream()
        let lastActivity = ActivityStamp()
        let task = Task {
            do {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        var splitter = JSONFrameSplitter()
                        do {
                            for try await buffer in response.body {
                                lastActivity.touch()
                                for frame in splitter.append(buffer.readableBytesView) {
                                    continuation.yield(Self.event(frame, resource: resource, request: what))
                                }
                            }
                        } catch let e as CancellationError {
                            throw e
                        } catch {
                            throw KubeTransportError(request: what, detail: "stream broken: \(error)")
                        }
                        for frame in splitter.finish() { continuation.yield(Self.event(frame, resource: resource, request: what)) }
                    }
                    group.addTask {
                        let tick = max(idleTimeout / 4, .milliseconds(10))
                        while true {
                            try await Task.sleep(for: tick)
                            let idle = lastActivity.idle
                            if idle >= idleTimeout { throw WatchIdleTimeout(limit: idleTimeout) }
                        }
                    }
                    try await group.next()
                    group.cancelAll()
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    /// POSTs a JSON object to `path` (an object's collection, e.g. events); succeeds on 200,
    /// 201 or 202, throws `KubeAPIError` for any other status.
    public func create(path: String, json: [UInt8], what: String) async throws {
        var request = HTTPClientRequest(url: config.server + path)
        request.method = .POST
        request.headers.add(name: "Accept", value: "application/json")
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "User-Agent", value: userAgent)
        if let auth = tokens.authorization() { request.headers.add(name: "Authorization", value: auth) }
        request.body = .bytes(ByteBuffer(bytes: json))
        let response: HTTPClientResponse
        do {
            response = try await http.execute(request, timeout: .milliseconds(Int64(requestTimeout / .milliseconds(1))), logger: logger)
        } catch let e as CancellationError {
            throw e
        } catch {
            throw KubeTransportError(request: what, detail: "\(error)")
        }
        let code = Int(response.status.code)
        let body = (try? await response.body.collect(upTo: 1 << 20)).map { Array($0.readableBytesView) } ?? []
        guard (200...202).contains(code) else {
            throw KubeAPIError.from(status: try? JSONTree.parseObject(body), code: code, request: what)
        }
    }

    // MARK: - plumbing

    /// Sends a GET; returns a 200 response, throws KubeAPIError for any other status. A 401 with
    /// a token file re-reads the file and, when the token changed, tries once more.
    private func send(path: String, query: [(String, String)], what: String) async throws -> HTTPClientResponse {
        var attempt = 0
        while true {
            attempt += 1
            let auth = tokens.authorization()
            var request = HTTPClientRequest(url: config.server + path + Self.queryString(query))
            request.method = .GET
            request.headers.add(name: "Accept", value: "application/json")
            request.headers.add(name: "User-Agent", value: userAgent)
            if let auth { request.headers.add(name: "Authorization", value: auth) }
            let response: HTTPClientResponse
            do {
                response = try await http.execute(request, timeout: .milliseconds(Int64(requestTimeout / .milliseconds(1))), logger: logger)
            } catch let e as CancellationError {
                throw e
            } catch {
                throw KubeTransportError(request: what, detail: "\(error)")
            }
            if response.status == .ok { return response }
            let code = Int(response.status.code)
            let body = (try? await response.body.collect(upTo: 1 << 20)).map { Array($0.readableBytesView) } ?? []
            let tree = try? JSONTree.parseObject(body)
            var error = KubeAPIError.from(status: tree, code: code, request: what)
            if error.message.isEmpty, tree == nil, !body.isEmpty {
                error.message = String(decoding: body.prefix(200), as: UTF8.self)
            }
            if code == 401, case .tokenFile = config.credentials {
                tokens.invalidate()
                if attempt == 1, tokens.authorization() != auth {
                    logger.info("\(what): unauthorized; retrying with the re-read token")
                    continue
                }
            }
            throw error
        }
    }

    private func collect(_ response: HTTPClientResponse, what: String) async throws -> [UInt8] {
        do {
            return Array(try await response.body.collect(upTo: Self.maximumListBytes).readableBytesView)
        } catch let e as CancellationError {
            throw e
        } catch {
            throw KubeTransportError(request: what, detail: "reading the body: \(error)")
        }
    }

    /// Decodes one object, filling in apiVersion/kind (LIST items omit them).
    static func decode(_ item: [String: Any], resource: KubeResource) -> (NamespacedName?, Result<KubeObject, ObjectRejection>) {
        var tree = item
        if tree["apiVersion"] == nil { tree["apiVersion"] = resource.apiVersion }
        if tree["kind"] == nil { tree["kind"] = resource.kind }
        let key = Self.key(tree, resource: resource)
        let shown = key?.description ?? "?"
        do {
            guard let objs = try ObjectDecoder.decode(tree), objs.count == 1, let o = objs.first else {
                return (key, .failure(ObjectRejection(kind: resource.kind, key: shown,
                                                      reason: "is not a \(resource.apiVersion) \(resource.kind)")))
            }
            return (key, .success(o))
        } catch {
            return (key, .failure(ObjectRejection(kind: resource.kind, key: shown, reason: error.description)))
        }
    }

    static func key(_ tree: [String: Any], resource: KubeResource) -> NamespacedName? {
        guard let meta = tree["metadata"] as? [String: Any], let name = meta["name"] as? String, !name.isEmpty else { return nil }
        let ns = resource.namespaced ? (meta["namespace"] as? String ?? "default") : ""
        return NamespacedName(namespace: ns, name: name)
    }

    static func event(_ frame: JSONFrameSplitter.Frame, resource: KubeResource, request: String) -> WatchEvent {
        switch frame {
        case .malformed(let reason, let prefix):
            return .malformed(reason: "\(reason) (starts \"\(Validation.printable(String(prefix.prefix(40))))\")")
        case .object(let bytes):
            guard let tree = try? JSONTree.parseObject(bytes) else {
                return .malformed(reason: "not valid JSON (starts \"\(Validation.printable(String(decoding: bytes.prefix(40), as: UTF8.self)))\")")
            }
            guard let type = tree["type"] as? String, let object = tree["object"] as? [String: Any] else {
                return .malformed(reason: "a JSON object without type and object fields")
            }
            let rv = (object["metadata"] as? [String: Any])?["resourceVersion"] as? String
            switch type {
            case "ADDED", "MODIFIED":
                let (key, result) = decode(object, resource: resource)
                switch result {
                case .success(let o):
                    guard let key, let rv else { return .malformed(reason: "\(type) event without metadata.name or resourceVersion") }
                    return .upserted(o, key: key, resourceVersion: rv)
                case .failure(let r):
                    return .rejected(r, resourceVersion: rv)
                }
            case "DELETED":
                guard let key = key(object, resource: resource), let rv else {
                    return .malformed(reason: "DELETED event without metadata.name or resourceVersion")
                }
                return .deleted(key, resourceVersion: rv)
            case "BOOKMARK":
                guard let rv else { return .malformed(reason: "BOOKMARK event without resourceVersion") }
                return .bookmark(resourceVersion: rv)
            case "ERROR":
                return .failure(KubeAPIError.from(status: object, code: 500, request: request))
            default:
                return .malformed(reason: "unknown event type \"\(Validation.printable(type))\"")
            }
        }
    }

    private static let unreserved = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~".utf8)

    /// Percent-encodes everything but RFC 3986 unreserved characters.
    static func escape(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            if unreserved.contains(b) {
                out.unicodeScalars.append(Unicode.Scalar(b))
            } else {
                out += "%" + (b < 16 ? "0" : "") + String(b, radix: 16, uppercase: true)
            }
        }
        return out
    }

    static func queryString(_ items: [(String, String)]) -> String {
        items.isEmpty ? "" : "?" + items.map { "\(escape($0.0))=\(escape($0.1))" }.joined(separator: "&")
    }
}

/// When a stream last delivered bytes.
final class ActivityStamp: Sendable {
    private let last = Mutex(ContinuousClock.now)
    func touch() { last.withLock { $0 = .now } }
    var idle: Duration { last.withLock { $0 }.duration(to: .now) }
}
