// Sluice: a per-node Kubernetes service proxy.
// One informer per resource: paginated LIST, then WATCH from the list's resourceVersion; on 410
// Gone or a broken stream, LIST again and reconcile against what was known (so deletes missed
// while disconnected become delete events); reconnect with capped exponential backoff and jitter.

import Foundation
import Logging
import SluiceCore
import Synchronization

/// Capped exponential backoff with jitter.
public struct BackoffPolicy: Sendable, Hashable {
    /// The first delay's upper bound.
    public var initial: Duration
    /// No delay exceeds this.
    public var maximum: Duration
    /// Growth per consecutive failure.
    public var factor: Double

    /// Creates a policy; the defaults are client-go's reflector values (800 ms, ×2, 30 s).
    public init(initial: Duration = .milliseconds(800), maximum: Duration = .seconds(30), factor: Double = 2) {
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
    }

    /// The delay before retry `attempt` (1 for the first), given `random` uniform in [0, 1):
    /// a point in [b/2, b] with b = min(initial · factor^(attempt-1), maximum), so consecutive
    /// clients spread out and none waits longer than `maximum`.
    public func delay(attempt: Int, random: Double) -> Duration {
        let exponent = Double(max(0, min(attempt - 1, 62)))
        let cap = maximum / .nanoseconds(1)
        let bound = min(Double(initial / .nanoseconds(1)) * pow(factor, exponent), cap)
        let r = min(max(random, 0), 1)
        return .nanoseconds(Int64(bound / 2 + bound / 2 * r))
    }
}

/// Timing and paging of the informers. Every clock-dependent part is injectable so tests can
/// run the retry logic deterministically.
public struct InformerSettings: Sendable {
    /// Reconnect backoff.
    public var backoff: BackoffPolicy
    /// LIST page size (`limit`); 0 disables pagination.
    public var pageSize: Int
    /// Each watch asks the server to end it after a random number of seconds in this range
    /// (client-go: 5 to 10 minutes), so connections are renewed and spread over time.
    public var watchTimeoutSeconds: ClosedRange<Int>
    /// A watch with no bytes (not even a bookmark) for this long is treated as a dead connection.
    public var idleTimeout: Duration
    /// Uniform random numbers in [0, 1) for jitter.
    public var random: @Sendable () -> Double
    /// Waits between retries.
    public var sleep: @Sendable (Duration) async throws -> Void

    /// Creates settings; the defaults suit a real cluster.
    public init(backoff: BackoffPolicy = .init(), pageSize: Int = 500, watchTimeoutSeconds: ClosedRange<Int> = 300...600,
                idleTimeout: Duration = .seconds(660), random: @escaping @Sendable () -> Double = { Double.random(in: 0..<1) },
                sleep: @escaping @Sendable (Duration) async throws -> Void = { try await Task.sleep(for: $0) }) {
        self.backoff = backoff
        self.pageSize = pageSize
        self.watchTimeoutSeconds = watchTimeoutSeconds
        self.idleTimeout = idleTimeout
        self.random = random
        self.sleep = sleep
    }
}

/// What the informers have done, for metrics, logs and tests.
public struct APISourceCounters: Sendable, Hashable {
    /// Complete LISTs (all pages), the first ones included.
    public var lists = 0
    /// LIST pages fetched.
    public var listPages = 0
    /// LISTs after the first of each resource (410, broken stream, reconnect).
    public var relists = 0
    /// Watch streams opened.
    public var watches = 0
    /// Object changes delivered by watches.
    public var watchEvents = 0
    /// Bookmarks received.
    public var bookmarks = 0
    /// Watch stream content that was not an event (skipped).
    public var malformedEvents = 0
    /// Objects that could not be decoded (skipped; the previous version stays).
    public var rejectedObjects = 0
    /// 410 Gone answers or ERROR events.
    public var gone = 0
    /// Requests or streams that failed (transport errors, HTTP errors other than 410).
    public var failures = 0
    /// 401 answers.
    public var unauthorized = 0
    /// Delete events produced by a re-list for objects that vanished while disconnected.
    public var reconciledDeletes = 0
}

/// Shared, locked counters.
final class CounterBox: Sendable {
    private let value = Mutex(APISourceCounters())
    func update(_ body: (inout APISourceCounters) -> Void) { value.withLock { body(&$0) } }
    var snapshot: APISourceCounters { value.withLock { $0 } }
}

/// Lists and watches one resource, turning what it sees into object events.
struct Informer: Sendable {
    let client: KubeClient
    let resource: KubeResource
    let labelSelector: String?
    let fieldSelector: String?
    /// Client-side selection (objects failing it count as absent).
    let accept: @Sendable (KubeObject) -> Bool
    let settings: InformerSettings
    let counters: CounterBox
    let logger: Logger
    /// For a resource the server may not serve or the proxy may not be allowed to read
    /// (ServiceCIDRs before Kubernetes 1.33, or an older RBAC role): a 404 or 403 on LIST is
    /// logged once and retried every `unavailableRetry`, without counting as a failure.
    var optional = false
    /// How long an optional informer waits after a 404 or 403.
    static let unavailableRetry: Duration = .seconds(300)

    private enum Outcome {
        /// The stream ended normally (server timeout): watch again from the last version.
        case resume
        /// The version is too old or the stream broke: list again.
        case relist
    }

    /// Runs until cancelled; `listed` is called after the first complete LIST has been emitted.
    func run(emit: @Sendable (ObjectEvent) -> Void, listed: @Sendable () -> Void) async {
        // What the consumer holds, by key: each object's fingerprint (its hash value), not the
        // object (the consumer keeps that), to tell a change from a repeat.
        var known: [NamespacedName: Int] = [:]
        var resourceVersion: String?
        var failures = 0
        var goneInARow = 0
        var firstList = true
        var reportedUnavailable = false
        while !Task.isCancelled {
            if resourceVersion == nil {
                do {
                    let (rv, events) = try await listAndReconcile(&known)
                    for e in events { emit(e) }
                    resourceVersion = rv
                    counters.update {
                        $0.lists += 1
                        if !firstList { $0.relists += 1 }
                    }
                    if firstList {
                        firstList = false
                        logger.info("listed \(known.count) \(resource.plural) at resourceVersion \(rv)")
                        listed()
                    } else {
                        logger.info("re-listed \(known.count) \(resource.plural) at resourceVersion \(rv): \(events.count) changes reconciled")
                    }
                } catch {
                    if Task.isCancelled { return }
                    if optional, let e = error as? KubeAPIError, e.code == 404 || e.code == 403 {
                        if !reportedUnavailable {
                            reportedUnavailable = true
                            logger.warning("\(e): \(resource.apiVersion) \(resource.kind) objects are not available; going on without them and asking again every \(Self.unavailableRetry)")
                        }
                        try? await settings.sleep(Self.unavailableRetry)
                        continue
                    }
                    failures += 1
                    note(error, request: "list \(resource.plural)")
                    await pause(attempt: failures)
                    continue
                }
            }
            do {
                let started = ContinuousClock.now
                var delivered = false
                let outcome = try await watch(from: resourceVersion!, known: &known, version: &resourceVersion, emit: emit,
                                              healthy: { delivered = true; failures = 0; goneInARow = 0 })
                switch outcome {
                case .resume:
                    // A server that ends every watch at once, with nothing in it, must not be hammered.
                    if !delivered && started.duration(to: .now) < .seconds(1) {
                        failures += 1
                        await pause(attempt: failures)
                    } else {
                        failures = 0
                    }
                case .relist:
                    resourceVersion = nil
                    goneInARow += 1
                    if goneInARow > 1 {
                        failures += 1
                        await pause(attempt: failures)
                    }
                }
            } catch {
                if Task.isCancelled { return }
                note(error, request: "watch \(resource.plural)")
                // Whatever broke, what was missed is unknown: list again and reconcile.
                resourceVersion = nil
                if let e = error as? KubeAPIError, e.isGone {
                    goneInARow += 1
                    if goneInARow > 1 {
                        failures += 1
                        await pause(attempt: failures)
                    }
                } else {
                    failures += 1
                    await pause(attempt: failures)
                }
            }
        }
    }

    private func pause(attempt: Int) async {
        let d = settings.backoff.delay(attempt: attempt, random: settings.random())
        logger.debug("\(resource.plural): retrying in \(d)")
        try? await settings.sleep(d)
    }

    private func note(_ error: any Error, request: String) {
        counters.update {
            if let e = error as? KubeAPIError {
                if e.isGone { $0.gone += 1 } else { $0.failures += 1 }
                if e.code == 401 { $0.unauthorized += 1 }
            } else {
                $0.failures += 1
            }
        }
        if let e = error as? KubeAPIError, e.isGone {
            logger.info("\(e); listing again")
        } else if let e = error as? KubeAPIError, e.code == 401 || e.code == 403 {
            logger.error("\(e) (check the credentials and the RBAC rules in manifests/rbac.yaml)")
        } else {
            logger.warning("\(error)")
        }
    }

    /// Lists every page; returns the version to watch from and the events that bring `known`
    /// up to date (deletes first, then upserts).
    private func listAndReconcile(_ known: inout [NamespacedName: Int]) async throws -> (String, [ObjectEvent]) {
        var objects: [NamespacedName: KubeObject] = [:]
        var undecodable: Set<NamespacedName> = []
        var token: String?
        var rv = ""
        repeat {
            let page = try await client.list(resource, labelSelector: labelSelector, fieldSelector: fieldSelector,
                                             limit: settings.pageSize > 0 ? settings.pageSize : nil, continueToken: token)
            counters.update { $0.listPages += 1 }
            for o in page.objects {
                guard let key = Self.key(o) else { continue }
                if accept(o) { objects[key] = o }
            }
            let decoded = Set(page.objects.compactMap(Self.key))
            for k in page.keys where !decoded.contains(k) { undecodable.insert(k) }
            for r in page.rejections {
                counters.update { $0.rejectedObjects += 1 }
                logger.error("\(r.description); skipped, its previous version (if any) stays in effect")
            }
            rv = page.resourceVersion
            token = page.continueToken
        } while token != nil
        var events: [ObjectEvent] = []
        var deletes = 0
        for (key, _) in known.sorted(by: { $0.key < $1.key }) where objects[key] == nil && !undecodable.contains(key) {
            events.append(resource.deleteEvent(key))
            known[key] = nil
            deletes += 1
        }
        for (key, o) in objects.sorted(by: { $0.key < $1.key }) {
            let fingerprint = o.hashValue
            guard known[key] != fingerprint else { continue }
            events.append(o.upsertEvent)
            known[key] = fingerprint
        }
        if deletes > 0 { counters.update { $0.reconciledDeletes += deletes } }
        return (rv, events)
    }

    private func watch(from rv: String, known: inout [NamespacedName: Int], version: inout String?,
                       emit: @Sendable (ObjectEvent) -> Void, healthy: () -> Void) async throws -> Outcome {
        let span = settings.watchTimeoutSeconds
        let timeout = span.lowerBound + Int(settings.random() * Double(span.upperBound - span.lowerBound + 1))
        let stream = try await client.watch(resource, resourceVersion: rv, labelSelector: labelSelector, fieldSelector: fieldSelector,
                                            timeoutSeconds: min(timeout, span.upperBound), idleTimeout: settings.idleTimeout)
        counters.update { $0.watches += 1 }
        logger.debug("watching \(resource.plural) from resourceVersion \(rv)")
        for try await event in stream {
            switch event {
            case .upserted(let o, let key, let newRV):
                version = newRV
                counters.update { $0.watchEvents += 1 }
                if accept(o) {
                    let fingerprint = o.hashValue
                    if known[key] != fingerprint {
                        known[key] = fingerprint
                        emit(o.upsertEvent)
                    }
                } else if known.removeValue(forKey: key) != nil {
                    emit(resource.deleteEvent(key))
                }
                healthy()
            case .deleted(let key, let newRV):
                version = newRV
                counters.update { $0.watchEvents += 1 }
                if known.removeValue(forKey: key) != nil { emit(resource.deleteEvent(key)) }
                healthy()
            case .bookmark(let newRV):
                version = newRV
                counters.update { $0.bookmarks += 1 }
                healthy()
            case .rejected(let r, let newRV):
                if let newRV { version = newRV }
                counters.update { $0.rejectedObjects += 1 }
                logger.error("\(r.description); skipped, its previous version (if any) stays in effect")
            case .malformed(let reason):
                counters.update { $0.malformedEvents += 1 }
                logger.warning("watch \(resource.plural): skipped a malformed event: \(reason)")
            case .failure(let e):
                if e.isGone {
                    counters.update { $0.gone += 1 }
                    logger.info("\(e); listing again")
                    return .relist
                }
                throw e
            }
        }
        return .resume
    }

    static func key(_ o: KubeObject) -> NamespacedName? {
        switch o {
        case .service(let s): return s.key
        case .endpointSlice(let e): return e.key
        case .node(let n): return NamespacedName(namespace: "", name: n.name)
        case .serviceCIDR(let c): return NamespacedName(namespace: "", name: c.name)
        }
    }
}
