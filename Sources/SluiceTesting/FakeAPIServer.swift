// Sluice: a per-node Kubernetes service proxy.
// A fake Kubernetes API server for tests. It speaks the real HTTP/1.1 protocol over a real
// socket: JSON LIST with resourceVersion, limit and continue; WATCH as a chunked stream of JSON
// lines from a resourceVersion, with bookmarks and 410 Gone; label and field selectors; bearer
// tokens. Faults are knobs: error statuses, slow responses, dropped connections, events split
// across chunks or batched into one, malformed event lines, lost watch history, restarts.

import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization

/// The kinds the fake serves.
public enum FakeResource: String, Sendable, CaseIterable {
    case services, endpointslices, nodes, servicecidrs

    /// `v1` or `group/version`.
    public var apiVersion: String {
        switch self {
        case .endpointslices: return "discovery.k8s.io/v1"
        case .servicecidrs: return "networking.k8s.io/v1"
        default: return "v1"
        }
    }
    /// The object kind.
    public var kind: String {
        switch self {
        case .services: return "Service"
        case .endpointslices: return "EndpointSlice"
        case .nodes: return "Node"
        case .servicecidrs: return "ServiceCIDR"
        }
    }

    var namespaced: Bool { self != .nodes && self != .servicecidrs }
    var collectionPath: String { apiVersion == "v1" ? "/api/v1/\(rawValue)" : "/apis/\(apiVersion)/\(rawValue)" }
}

/// A request the fake received.
public struct FakeRequest: Sendable, Hashable {
    /// `list`, `watch`, `get` or `other`.
    public var verb: String
    /// The resource, nil for unknown paths.
    public var resource: FakeResource?
    /// The URL path.
    public var path: String
    /// Query parameters, decoded.
    public var query: [String: String]
    /// The bearer token presented, if any.
    public var token: String?
    /// The status answered (200 for a watch that started).
    public var status: Int
}

/// Which requests an injected failure applies to.
public enum FakeRequestKind: Sendable, Hashable {
    case any, list, watch, get
}

/// A fake API server on 127.0.0.1 (or a socket a test hands it).
public final class FakeAPIServer: Sendable {
    /// How the listening socket is made.
    public enum Listener: Sendable {
        /// Bind `host:port` (port 0: any free port; a restart reuses the port it got).
        case tcp(host: String, port: Int)
        /// Call this with the port wanted (0 the first time) to get a bound, listening socket
        /// descriptor, e.g. one created inside another network namespace.
        case socket(@Sendable (Int) throws -> CInt)
    }

    struct Stored: Sendable {
        var namespace: String
        var name: String
        var labels: [String: String]
        var resourceVersion: Int
        /// The object without apiVersion/kind (as LIST items are served).
        var item: [UInt8]
        /// The object with apiVersion/kind (as watch events and GET serve it).
        var full: [UInt8]
    }

    struct Change: Sendable {
        var resourceVersion: Int
        var resource: FakeResource
        var type: String
        var object: Stored
        var previous: Stored?
    }

    struct Failure: Sendable {
        var status: Int
        var kind: FakeRequestKind
        var resource: FakeResource?
    }

    struct ContinueSnapshot: Sendable {
        var resource: FakeResource
        var items: [Stored]
        var resourceVersion: Int
    }

    struct State: Sendable {
        var resourceVersion = 100
        var objects: [FakeResource: [String: Stored]] = [:]
        var history: [Change] = []
        /// Watches from a version at or below this are answered 410.
        var compactedThrough = 100
        var watchers: [Int: WatchConnection] = [:]
        var connections: [ObjectIdentifier: Channel] = [:]
        var failures: [Failure] = []
        var continues: [String: ContinueSnapshot] = [:]
        var nextID = 0
        var requests: [FakeRequest] = []
        var requiredToken: String?
        var responseDelay: TimeAmount = .zero
        var chunkSize: Int?
        var chunkDelay: TimeAmount = .zero
        var batch: [Int: [UInt8]]?
        var expireContinues = 0
        var port = 0
        var serverChannel: Channel?
    }

    private let state = Mutex(State())
    private let group: EventLoopGroup
    private let listener: Listener
    private let tls: NIOSSLContext?

    /// HTTPS settings: PEM files for the server's certificate and key, and optionally the CA
    /// that client certificates must chain to (then a client certificate is required).
    public struct TLSFiles: Sendable {
        public var certificate: String
        public var key: String
        public var clientCA: String?

        public init(certificate: String, key: String, clientCA: String? = nil) {
            self.certificate = certificate
            self.key = key
            self.clientCA = clientCA
        }
    }

    /// Creates a stopped server. With `tls`, it serves HTTPS.
    public init(listener: Listener = .tcp(host: "127.0.0.1", port: 0), tls: TLSFiles? = nil,
                group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws {
        self.listener = listener
        self.group = group
        if let tls {
            var cfg = TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMFile(tls.certificate).map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(file: tls.key, format: .pem)))
            if let ca = tls.clientCA {
                cfg.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca))
                cfg.certificateVerification = .noHostnameVerification
            }
            self.tls = try NIOSSLContext(configuration: cfg)
        } else {
            self.tls = nil
        }
    }

    // MARK: - lifecycle

    /// The port listened on (after `start`).
    public var port: Int { state.withLock { $0.port } }

    /// `http://127.0.0.1:PORT` (or https).
    public var url: String { "\(tls == nil ? "http" : "https")://127.0.0.1:\(port)" }

    /// Starts listening (again, on the same port, after `stop`).
    public func start() async throws {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self, tls] channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(FakeAPIHandler(server: self))
                    self.state.withLock { $0.connections[ObjectIdentifier(channel)] = channel }
                    channel.closeFuture.whenComplete { _ in self.connectionClosed(channel) }
                }
            }
        let previousPort = port
        let channel: Channel
        switch listener {
        case .tcp(let host, let p):
            channel = try await bootstrap.bind(host: host, port: previousPort != 0 ? previousPort : p).get()
        case .socket(let make):
            channel = try await bootstrap.withBoundSocket(try make(previousPort)).get()
        }
        state.withLock {
            $0.serverChannel = channel
            $0.port = channel.localAddress?.port ?? 0
        }
    }

    /// Stops listening and closes every connection (a crash, as clients see it).
    public func stop() async {
        let (server, children) = state.withLock { s -> (Channel?, [Channel]) in
            let out = (s.serverChannel, Array(s.connections.values))
            s.serverChannel = nil
            s.watchers = [:]
            return out
        }
        try? await server?.close()
        for c in children { try? await c.close() }
    }

    /// Stops and starts again on the same port. With `losingHistory`, watches cannot resume
    /// from versions before the restart (as after an API server's watch cache is rebuilt).
    public func restart(losingHistory: Bool = false) async throws {
        await stop()
        if losingHistory { compactHistory() }
        try await start()
    }

    // MARK: - objects

    /// The current resourceVersion.
    public var resourceVersion: Int { state.withLock { $0.resourceVersion } }

    /// Creates or replaces an object (by namespace/name), bumping the resourceVersion.
    public func apply(_ resource: FakeResource, _ object: [String: Any]) {
        var tree = object
        var meta = tree["metadata"] as? [String: Any] ?? [:]
        let name = meta["name"] as? String ?? ""
        let namespace = resource.namespaced ? (meta["namespace"] as? String ?? "default") : ""
        if resource.namespaced { meta["namespace"] = namespace }
        let labels = (meta["labels"] as? [String: String]) ?? [:]
        state.withLock { s in
            s.resourceVersion += 1
            meta["resourceVersion"] = String(s.resourceVersion)
            tree["metadata"] = meta
            tree["apiVersion"] = resource.apiVersion
            tree["kind"] = resource.kind
            let full = Self.serialize(tree)
            tree["apiVersion"] = nil
            tree["kind"] = nil
            let stored = Stored(namespace: namespace, name: name, labels: labels, resourceVersion: s.resourceVersion,
                                item: Self.serialize(tree), full: full)
            let key = "\(namespace)/\(name)"
            let previous = s.objects[resource]?[key]
            s.objects[resource, default: [:]][key] = stored
            record(&s, Change(resourceVersion: s.resourceVersion, resource: resource, type: previous == nil ? "ADDED" : "MODIFIED",
                              object: stored, previous: previous))
        }
    }

    /// Creates or replaces an object given as JSON text.
    public func apply(_ resource: FakeResource, json: String) throws {
        guard let tree = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
            throw FakeServerError(message: "not a JSON object")
        }
        apply(resource, tree)
    }

    /// Deletes an object; false when it did not exist. With `silently`, open watches are not
    /// told and the change is not kept for resuming ones (as if it fell into history the server
    /// has compacted): only a client that lists again can notice it.
    @discardableResult
    public func delete(_ resource: FakeResource, namespace: String = "default", name: String, silently: Bool = false) -> Bool {
        state.withLock { s in
            let key = "\(resource.namespaced ? namespace : "")/\(name)"
            guard var old = s.objects[resource]?[key] else { return false }
            s.resourceVersion += 1
            s.objects[resource]?[key] = nil
            if silently {
                s.history.removeAll()
                s.compactedThrough = s.resourceVersion
                return true
            }
            let previous = old
            old.resourceVersion = s.resourceVersion
            old.full = Self.withResourceVersion(old.full, s.resourceVersion)
            record(&s, Change(resourceVersion: s.resourceVersion, resource: resource, type: "DELETED", object: old, previous: previous))
            return true
        }
    }

    /// Names (`namespace/name`) of the objects held.
    public func names(_ resource: FakeResource) -> [String] {
        state.withLock { s in (s.objects[resource] ?? [:]).keys.sorted() }
    }

    /// Runs `body`, then delivers every event it caused to each watch as one chunk.
    public func batch(_ body: () throws -> Void) rethrows {
        state.withLock { $0.batch = [:] }
        defer {
            state.withLock { s in
                let pending = s.batch ?? [:]
                s.batch = nil
                for (id, bytes) in pending.sorted(by: { $0.key < $1.key }) {
                    s.watchers[id]?.enqueue([bytes], delay: .zero)
                }
            }
        }
        try body()
    }

    // MARK: - faults

    /// Answers the next `count` matching requests with `status` (a Status body).
    public func failNext(_ count: Int = 1, status: Int, kind: FakeRequestKind = .any, resource: FakeResource? = nil) {
        state.withLock { s in
            for _ in 0..<count { s.failures.append(Failure(status: status, kind: kind, resource: resource)) }
        }
    }

    /// Forgets every injected failure not yet used.
    public func clearFailures() {
        state.withLock { $0.failures.removeAll() }
    }

    /// Requires `Authorization: Bearer token` on every request (nil: no check).
    public func requireToken(_ token: String?) {
        state.withLock { $0.requiredToken = token }
    }

    /// Delays every response head and every watch write by `delay`.
    public func setSlow(_ delay: Duration) {
        state.withLock { $0.responseDelay = .nanoseconds(Int64(delay / .nanoseconds(1))) }
    }

    /// Writes every watch payload in pieces of at most `bytes` (nil: whole), `delay` apart, so one
    /// event spans several HTTP chunks (and TCP reads).
    public func splitWatchWrites(into bytes: Int?, delay: Duration = .milliseconds(3)) {
        state.withLock {
            $0.chunkSize = bytes
            $0.chunkDelay = .nanoseconds(Int64(delay / .nanoseconds(1)))
        }
    }

    /// Forgets the event history: watches from any version up to now get 410 Gone.
    public func compactHistory() {
        state.withLock { s in
            s.history.removeAll()
            s.compactedThrough = s.resourceVersion
        }
    }

    /// Sends an ERROR 410 event to every open watch (of `resource`, or all), then ends them,
    /// and compacts the history so they cannot resume: they must list again.
    public func expireWatches(_ resource: FakeResource? = nil) {
        state.withLock { s in
            s.history.removeAll()
            s.compactedThrough = s.resourceVersion
            for (id, w) in s.watchers where resource == nil || w.resource == resource {
                w.enqueue([Self.statusEvent(code: 410, reason: "Expired", message: "too old resource version")], delay: .zero)
                w.end()
                s.watchers[id] = nil
            }
        }
    }

    /// Closes every connection abruptly (watches see a truncated stream).
    public func dropConnections() {
        let channels = state.withLock { s -> [Channel] in
            s.watchers = [:]
            return Array(s.connections.values)
        }
        for c in channels { c.close(promise: nil) }
    }

    /// Writes `text` as-is into every open watch of `resource` (or all).
    public func injectRaw(_ text: String, into resource: FakeResource? = nil) {
        state.withLock { s in
            for (_, w) in s.watchers where resource == nil || w.resource == resource {
                w.enqueue([Array(text.utf8)], delay: s.responseDelay)
            }
        }
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allows them.
    public func sendBookmarks() {
        state.withLock { s in
            for (_, w) in s.watchers where w.bookmarks {
                let tree: [String: Any] = ["type": "BOOKMARK", "object": ["kind": w.resource.kind, "apiVersion": w.resource.apiVersion,
                                                                          "metadata": ["resourceVersion": String(s.resourceVersion)]]]
                w.enqueue([Self.serialize(tree) + [0x0a]], delay: s.responseDelay)
            }
        }
    }

    /// Makes outstanding continue tokens expire (the next page request gets 410).
    public func expireContinueTokens() {
        state.withLock { $0.continues = [:] }
    }

    /// Makes the next `count` requests that carry a continue token find it expired (410), as
    /// when the server compacted past the list's version between two pages.
    public func expireNextContinueTokens(_ count: Int = 1) {
        state.withLock { $0.expireContinues += count }
    }

    // MARK: - observation

    /// Every request so far.
    public var requests: [FakeRequest] { state.withLock { $0.requests } }

    /// Open watches of `resource` (or all).
    public func watchCount(_ resource: FakeResource? = nil) -> Int {
        state.withLock { s in s.watchers.values.filter { resource == nil || $0.resource == resource }.count }
    }

    // MARK: - request handling

    func connectionClosed(_ channel: Channel) {
        state.withLock { s in
            s.connections[ObjectIdentifier(channel)] = nil
            for (id, w) in s.watchers where w.channel === channel { s.watchers[id] = nil }
        }
    }

    func handle(head: HTTPRequestHead, channel: Channel) {
        let (path, query) = Self.split(uri: head.uri)
        let token = head.headers.first(name: "authorization").flatMap { $0.hasPrefix("Bearer ") ? String($0.dropFirst(7)) : nil }
        let route = Self.route(path)
        let isWatch = query["watch"] == "true" || query["watch"] == "1"
        let isEventCreate = head.method == .POST && path.hasSuffix("/events")
            && (path.hasPrefix("/apis/events.k8s.io/v1/namespaces/") || path.hasPrefix("/api/v1/namespaces/"))
        let verb = isEventCreate ? "create" : (route == nil ? "other" : (route!.name != nil ? "get" : (isWatch ? "watch" : "list")))
        let keepAlive = head.isKeepAlive
        let kind: FakeRequestKind = verb == "get" ? .get : (verb == "watch" ? .watch : .list)

        var reply: (status: Int, body: [UInt8])?
        var watch: WatchConnection?
        let delay: TimeAmount = state.withLock { s in
            defer {
                s.requests.append(FakeRequest(verb: verb, resource: route?.resource, path: path, query: query, token: token,
                                              status: reply?.status ?? 200))
            }
            if let required = s.requiredToken, token != required {
                reply = (401, Self.status(401, reason: "Unauthorized", message: "Unauthorized"))
                return s.responseDelay
            }
            if let i = s.failures.firstIndex(where: { f in
                (f.kind == .any || f.kind == kind) && (f.resource == nil || f.resource == route?.resource)
            }) {
                let f = s.failures.remove(at: i)
                reply = (f.status, Self.status(f.status, reason: Self.reason(f.status), message: "injected failure"))
                return s.responseDelay
            }
            if isEventCreate {
                // Events are accepted and not stored: `requests` shows the POST.
                reply = (201, Array(#"{"apiVersion":"events.k8s.io/v1","kind":"Event"}"#.utf8))
                return s.responseDelay
            }
            guard head.method == .GET else {
                reply = (405, Self.status(405, reason: "MethodNotAllowed", message: "only GET is served"))
                return s.responseDelay
            }
            guard let route else {
                reply = (404, Self.status(404, reason: "NotFound", message: "the server could not find the requested resource"))
                return s.responseDelay
            }
            let selector: LabelSelector
            let fields: FieldSelector
            do {
                selector = try LabelSelector(query["labelSelector"] ?? "")
                fields = try FieldSelector(query["fieldSelector"] ?? "")
            } catch {
                reply = (400, Self.status(400, reason: "BadRequest", message: "\(error)"))
                return s.responseDelay
            }
            if let name = route.name {
                let key = "\(route.resource.namespaced ? (route.namespace ?? "default") : "")/\(name)"
                if let o = s.objects[route.resource]?[key] {
                    reply = (200, o.full)
                } else {
                    reply = (404, Self.status(404, reason: "NotFound", message: "\(route.resource.rawValue) \"\(name)\" not found"))
                }
            } else if isWatch {
                reply = startWatch(&s, resource: route.resource, namespace: route.namespace, selector: selector, fields: fields,
                                   query: query, channel: channel, keepAlive: keepAlive, watch: &watch)
            } else {
                reply = list(&s, resource: route.resource, namespace: route.namespace, selector: selector, fields: fields, query: query)
            }
            return s.responseDelay
        }
        if let watch {
            watch.start(delay: delay)
            return
        }
        guard let reply else { return }
        let status = HTTPResponseStatus(statusCode: reply.status)
        let write: @Sendable () -> Void = {
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "application/json")
            headers.add(name: "Content-Length", value: String(reply.body.count))
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            channel.write(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers)), promise: nil)
            channel.write(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(bytes: reply.body))), promise: nil)
            let done = channel.writeAndFlush(HTTPServerResponsePart.end(nil))
            if !keepAlive { done.whenComplete { _ in channel.close(promise: nil) } }
        }
        if delay > .zero {
            channel.eventLoop.scheduleTask(in: delay, write)
        } else {
            channel.eventLoop.execute(write)
        }
    }

    private func list(_ s: inout State, resource: FakeResource, namespace: String?, selector: LabelSelector, fields: FieldSelector,
                      query: [String: String]) -> (Int, [UInt8]) {
        let limit = Int(query["limit"] ?? "") ?? 0
        var snapshot: ContinueSnapshot
        if let token = query["continue"], !token.isEmpty {
            if s.expireContinues > 0 {
                s.expireContinues -= 1
                s.continues[token] = nil
            }
            guard let c = s.continues.removeValue(forKey: token) else {
                return (410, Self.status(410, reason: "Expired",
                                         message: "The provided continue parameter is too old to display a consistent list result."))
            }
            snapshot = c
        } else {
            let items = (s.objects[resource] ?? [:]).values
                .filter { o in (namespace == nil || o.namespace == namespace) && selector.matches(o.labels) && fields.matches(o) }
                .sorted { ($0.namespace, $0.name) < ($1.namespace, $1.name) }
            snapshot = ContinueSnapshot(resource: resource, items: items, resourceVersion: s.resourceVersion)
        }
        var page = snapshot.items
        var next: String?
        if limit > 0, page.count > limit {
            page = Array(snapshot.items.prefix(limit))
            s.nextID += 1
            let token = "c\(s.nextID)"
            s.continues[token] = ContinueSnapshot(resource: resource, items: Array(snapshot.items.dropFirst(limit)),
                                                  resourceVersion: snapshot.resourceVersion)
            next = token
        }
        var body = Array("{\"kind\":\"\(resource.kind)List\",\"apiVersion\":\"\(resource.apiVersion)\",\"metadata\":{\"resourceVersion\":\"\(snapshot.resourceVersion)\"".utf8)
        if let next { body += Array(",\"continue\":\"\(next)\"".utf8) }
        body += Array("},\"items\":[".utf8)
        for (i, o) in page.enumerated() {
            if i > 0 { body.append(UInt8(ascii: ",")) }
            body += o.item
        }
        body += Array("]}".utf8)
        return (200, body)
    }

    private func startWatch(_ s: inout State, resource: FakeResource, namespace: String?, selector: LabelSelector, fields: FieldSelector,
                            query: [String: String], channel: Channel, keepAlive: Bool, watch: inout WatchConnection?) -> (Int, [UInt8])? {
        s.nextID += 1
        let filter = WatchFilter(namespace: namespace, selector: selector, fields: fields)
        let w = WatchConnection(id: s.nextID, resource: resource, filter: filter, channel: channel, keepAlive: keepAlive,
                                bookmarks: query["allowWatchBookmarks"] == "true", chunkSize: s.chunkSize, chunkDelay: s.chunkDelay)
        watch = w
        let rvText = query["resourceVersion"] ?? ""
        var backlog: [[UInt8]] = []
        if rvText.isEmpty || rvText == "0" {
            for o in (s.objects[resource] ?? [:]).values.sorted(by: { $0.resourceVersion < $1.resourceVersion }) where filter.matches(o) {
                backlog.append(Self.event("ADDED", o.full))
            }
        } else if let rv = Int(rvText), rv >= s.compactedThrough {
            for c in s.history where c.resource == resource && c.resourceVersion > rv {
                if let e = w.render(c) { backlog.append(e) }
            }
        } else {
            // Too old: the real server answers 200 and then an ERROR event with a 410 Status.
            w.enqueue([Self.statusEvent(code: 410, reason: "Expired", message: "too old resource version: \(rvText) (\(s.compactedThrough))")],
                      delay: .zero)
            w.end()
            return nil
        }
        if !backlog.isEmpty { w.enqueue(backlog, delay: .zero) }
        s.watchers[w.id] = w
        if let t = Int(query["timeoutSeconds"] ?? ""), t > 0 {
            channel.eventLoop.scheduleTask(in: .seconds(Int64(t))) { [self] in
                let still = self.state.withLock { $0.watchers.removeValue(forKey: w.id) != nil }
                if still { w.end() }
            }
        }
        return nil
    }

    private func record(_ s: inout State, _ change: Change) {
        s.history.append(change)
        for (id, w) in s.watchers.sorted(by: { $0.key < $1.key }) where w.resource == change.resource {
            guard let bytes = w.render(change) else { continue }
            if s.batch != nil {
                s.batch![id, default: []] += bytes
            } else {
                w.enqueue([bytes], delay: s.responseDelay)
            }
        }
    }

    // MARK: - encoding

    static func serialize(_ tree: [String: Any]) -> [UInt8] {
        Array((try? JSONSerialization.data(withJSONObject: tree, options: [.sortedKeys])) ?? Data("{}".utf8))
    }

    static func withResourceVersion(_ full: [UInt8], _ rv: Int) -> [UInt8] {
        guard var tree = try? JSONSerialization.jsonObject(with: Data(full)) as? [String: Any] else { return full }
        var meta = tree["metadata"] as? [String: Any] ?? [:]
        meta["resourceVersion"] = String(rv)
        tree["metadata"] = meta
        return serialize(tree)
    }

    static func event(_ type: String, _ object: [UInt8]) -> [UInt8] {
        Array("{\"type\":\"\(type)\",\"object\":".utf8) + object + Array("}\n".utf8)
    }

    static func status(_ code: Int, reason: String, message: String) -> [UInt8] {
        serialize(["kind": "Status", "apiVersion": "v1", "metadata": [String: Any](), "status": "Failure", "message": message,
                   "reason": reason, "code": code])
    }

    static func statusEvent(code: Int, reason: String, message: String) -> [UInt8] {
        event("ERROR", status(code, reason: reason, message: message))
    }

    static func reason(_ code: Int) -> String {
        switch code {
        case 401: return "Unauthorized"
        case 403: return "Forbidden"
        case 404: return "NotFound"
        case 410: return "Expired"
        case 429: return "TooManyRequests"
        case 500: return "InternalError"
        case 503: return "ServiceUnavailable"
        default: return "Unknown"
        }
    }

    static func split(uri: String) -> (String, [String: String]) {
        guard let q = uri.firstIndex(of: "?") else { return (uri, [:]) }
        var out: [String: String] = [:]
        for pair in uri[uri.index(after: q)...].split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let k = String(parts[0]).removingPercentEncoding ?? String(parts[0])
            let v = parts.count > 1 ? (String(parts[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? "") : ""
            out[k] = v
        }
        return (String(uri[..<q]), out)
    }

    struct Route {
        var resource: FakeResource
        var namespace: String?
        var name: String?
    }

    static func route(_ path: String) -> Route? {
        var parts = path.split(separator: "/").map(String.init)
        let prefix: [String]
        if parts.starts(with: ["api", "v1"]) {
            prefix = ["api", "v1"]
        } else if parts.starts(with: ["apis", "discovery.k8s.io", "v1"]) {
            prefix = ["apis", "discovery.k8s.io", "v1"]
        } else if parts.starts(with: ["apis", "networking.k8s.io", "v1"]) {
            prefix = ["apis", "networking.k8s.io", "v1"]
        } else {
            return nil
        }
        parts.removeFirst(prefix.count)
        var namespace: String?
        if parts.count >= 3, parts[0] == "namespaces" {
            namespace = parts[1]
            parts.removeFirst(2)
        }
        guard let first = parts.first, let r = FakeResource(rawValue: first), r.collectionPath.split(separator: "/").map(String.init).starts(with: prefix)
        else { return nil }
        if namespace != nil && !r.namespaced { return nil }
        switch parts.count {
        case 1: return Route(resource: r, namespace: namespace, name: nil)
        case 2: return Route(resource: r, namespace: namespace, name: parts[1])
        default: return nil
        }
    }
}

/// A fake-server misuse.
public struct FakeServerError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// Which objects one watch sees.
struct WatchFilter: Sendable {
    var namespace: String?
    var selector: LabelSelector
    var fields: FieldSelector

    func matches(_ o: FakeAPIServer.Stored) -> Bool {
        (namespace == nil || o.namespace == namespace) && selector.matches(o.labels) && fields.matches(o)
    }
}

/// One open watch response. Its mutable state is touched only on its channel's event loop.
final class WatchConnection: @unchecked Sendable {
    let id: Int
    let resource: FakeResource
    let filter: WatchFilter
    let channel: Channel
    let keepAlive: Bool
    let bookmarks: Bool
    let chunkSize: Int?
    let chunkDelay: TimeAmount
    // Event-loop confined:
    private var queue: [(bytes: [UInt8], delay: TimeAmount)] = []
    private var started = false
    private var pumping = false
    private var ended = false

    init(id: Int, resource: FakeResource, filter: WatchFilter, channel: Channel, keepAlive: Bool, bookmarks: Bool, chunkSize: Int?,
         chunkDelay: TimeAmount) {
        self.id = id
        self.resource = resource
        self.filter = filter
        self.channel = channel
        self.keepAlive = keepAlive
        self.bookmarks = bookmarks
        self.chunkSize = chunkSize
        self.chunkDelay = chunkDelay
    }

    /// The event a change means for this watch, nil when it does not see it. An object that
    /// stops matching the selector is DELETED for the watch, one that starts matching ADDED.
    func render(_ c: FakeAPIServer.Change) -> [UInt8]? {
        let now = filter.matches(c.object)
        let before = c.previous.map(filter.matches) ?? false
        switch c.type {
        case "DELETED":
            return before ? FakeAPIServer.event("DELETED", c.object.full) : nil
        default:
            switch (before, now) {
            case (true, true): return FakeAPIServer.event("MODIFIED", c.object.full)
            case (false, true): return FakeAPIServer.event("ADDED", c.object.full)
            case (true, false): return FakeAPIServer.event("DELETED", c.object.full)
            case (false, false): return nil
            }
        }
    }

    /// Writes the response head after `delay`, then whatever is queued.
    func start(delay: TimeAmount) {
        let go: @Sendable () -> Void = { [self] in
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "application/json")
            headers.add(name: "Transfer-Encoding", value: "chunked")
            channel.writeAndFlush(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers)), promise: nil)
            started = true
            pump()
        }
        if delay > .zero {
            channel.eventLoop.scheduleTask(in: delay) { go() }
        } else {
            channel.eventLoop.execute { go() }
        }
    }

    /// Queues payloads, each written after `delay` (and split per the chunking setting).
    func enqueue(_ payloads: [[UInt8]], delay: TimeAmount) {
        channel.eventLoop.execute { [self] in
            for p in payloads {
                if let n = chunkSize, n > 0, p.count > n {
                    var first = true
                    var i = 0
                    while i < p.count {
                        queue.append((Array(p[i..<min(i + n, p.count)]), first ? delay : max(delay, chunkDelay)))
                        first = false
                        i += n
                    }
                } else {
                    queue.append((p, delay))
                }
            }
            pump()
        }
    }

    /// Ends the response cleanly after what is queued (the zero-length chunk).
    func end() {
        channel.eventLoop.execute { [self] in
            queue.append(([], .zero))
            ended = true
            pump()
        }
    }

    private func pump() {
        guard started, !pumping, !queue.isEmpty else { return }
        let next = queue.removeFirst()
        let write: @Sendable () -> Void = { [self] in
            if next.bytes.isEmpty {
                let done = channel.writeAndFlush(HTTPServerResponsePart.end(nil))
                if !keepAlive { done.whenComplete { _ in self.channel.close(promise: nil) } }
                queue.removeAll()
                return
            }
            channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(bytes: next.bytes))), promise: nil)
            pumping = false
            pump()
        }
        if next.delay > .zero {
            pumping = true
            channel.eventLoop.scheduleTask(in: next.delay) { write() }
        } else {
            pumping = true
            write()
        }
    }
}

/// Parses requests and hands each to the server.
final class FakeAPIHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let server: FakeAPIServer
    private var head: HTTPRequestHead?

    init(server: FakeAPIServer) { self.server = server }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            if let h = head { server.handle(head: h, channel: context.channel) }
            head = nil
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

/// A label selector: comma-separated `k`, `!k`, `k=v`, `k==v`, `k!=v`.
struct LabelSelector: Sendable {
    enum Requirement: Sendable {
        case exists(String), absent(String), equals(String, String), differs(String, String)
    }

    var requirements: [Requirement] = []

    init(_ text: String) throws {
        for raw in text.split(separator: ",") {
            let r = raw.trimmingCharacters(in: .whitespaces)
            if r.isEmpty { continue }
            if r.hasPrefix("!") {
                requirements.append(.absent(String(r.dropFirst())))
            } else if let i = r.range(of: "!=") {
                requirements.append(.differs(String(r[..<i.lowerBound]), String(r[i.upperBound...])))
            } else if let i = r.range(of: "==") {
                requirements.append(.equals(String(r[..<i.lowerBound]), String(r[i.upperBound...])))
            } else if let i = r.range(of: "=") {
                requirements.append(.equals(String(r[..<i.lowerBound]), String(r[i.upperBound...])))
            } else if r.contains(" ") || r.contains("(") {
                throw FakeServerError(message: "unsupported label selector \(r)")
            } else {
                requirements.append(.exists(r))
            }
        }
    }

    func matches(_ labels: [String: String]) -> Bool {
        requirements.allSatisfy { req in
            switch req {
            case .exists(let k): return labels[k] != nil
            case .absent(let k): return labels[k] == nil
            case .equals(let k, let v): return labels[k] == v
            case .differs(let k, let v): return labels[k] != v
            }
        }
    }
}

/// A field selector over `metadata.name` and `metadata.namespace` (`=`, `==`, `!=`).
struct FieldSelector: Sendable {
    var requirements: [(field: String, value: String, equal: Bool)] = []

    init(_ text: String) throws {
        for raw in text.split(separator: ",") {
            let r = String(raw)
            let equal = !r.contains("!=")
            let parts = r.components(separatedBy: equal ? (r.contains("==") ? "==" : "=") : "!=")
            guard parts.count == 2, parts[0] == "metadata.name" || parts[0] == "metadata.namespace" else {
                throw FakeServerError(message: "unsupported field selector \(r)")
            }
            requirements.append((parts[0], parts[1], equal))
        }
    }

    func matches(_ o: FakeAPIServer.Stored) -> Bool {
        requirements.allSatisfy { r in
            let v = r.field == "metadata.name" ? o.name : o.namespace
            return (v == r.value) == r.equal
        }
    }
}
