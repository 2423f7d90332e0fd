// Sluice: a per-node Kubernetes service proxy.
// The sync loop shared by every mode: it folds events into the change tracker, coalesces
// them, never syncs twice within the minimum interval, resyncs fully at least every sync
// period, and retries a failed sync (as a full one) with capped exponential backoff.

import Logging

/// Timing of the sync loop.
public struct SyncTiming: Sendable, Hashable {
    /// No two syncs closer than this (`--min-sync-period`, default 1 s).
    public var minSyncPeriod: Duration
    /// A full resync at least this often (`--sync-period`, default 30 s).
    public var syncPeriod: Duration
    /// First retry delay after a failure; doubles up to `syncPeriod`.
    public var retryBase: Duration
    /// A sync still running after this long logs a warning, and again every further interval.
    public var slowSyncWarning: Duration

    /// Creates a timing.
    public init(minSyncPeriod: Duration = .seconds(1), syncPeriod: Duration = .seconds(30), retryBase: Duration = .seconds(1),
                slowSyncWarning: Duration = .seconds(10)) {
        self.minSyncPeriod = minSyncPeriod
        self.syncPeriod = syncPeriod
        self.retryBase = retryBase
        self.slowSyncWarning = slowSyncWarning
    }
}

/// Counters the loop keeps; the metrics endpoint reads them.
public struct SyncCounters: Sendable, Hashable {
    public var syncs = 0
    public var fullSyncs = 0
    public var failures = 0
    public var rejectedObjects = 0
    public var serviceChangesTotal = 0
    public var lastReport: SyncReport?
    /// Why the last sync failed; nil after a successful one.
    public var lastError: SyncErrorRecord?
}

/// The error a failed sync threw, as the runner keeps it (`SyncCounters.lastError`) and
/// reports it (`SyncAttempt.error`) for metrics, signals and tests: the error itself, typed,
/// and its text as logged (compared and hashed by the text).
public struct SyncErrorRecord: Sendable, Hashable, CustomStringConvertible {
    /// The backend's error (an ``SyncFailure``, a tool's error, ...).
    public let error: any Error
    /// Its text, as logged.
    public let description: String

    /// Records `error`.
    public init(_ error: any Error) {
        self.error = error
        self.description = "\(error)"
    }

    public static func == (a: Self, b: Self) -> Bool { a.description == b.description }
    public func hash(into h: inout Hasher) { h.combine(description) }
}

/// Drives one backend from one change tracker.
public actor SyncRunner<C: Clock> where C.Duration == Duration {
    private var tracker: ChangeTracker
    private let backend: any ProxyBackend
    private let family: IPFamily
    private let timing: SyncTiming
    private let clock: C
    private let logger: Logger
    private let observers: [any SyncObserver]
    private let recorders: [any SyncRecorder]
    /// Changes since the last snapshot, for the pending-changes metrics.
    private var pendingServiceKeys: Set<NamespacedName> = []
    private var pendingEndpointChanges = 0
    /// Trigger times taken with snapshots whose sync has not succeeded yet.
    private var unreportedTriggerTimes: [NamespacedName: [Double]] = [:]
    private var started = false

    private var pendingChange = false
    private var needFullSync = true
    private var lastSync: C.Instant?
    private var lastFullSync: C.Instant?
    private var retryAt: C.Instant?
    private var consecutiveFailures = 0
    private var wake: CheckedContinuation<Void, Never>?
    private var generation = 0
    /// Counters for metrics and tests.
    public private(set) var counters = SyncCounters()

    /// Creates a runner.
    /// - Parameters:
    ///   - observers: work run after every successful sync, in order.
    ///   - recorders: health and metrics, told about every request, change and sync attempt.
    public init(tracker: ChangeTracker, backend: any ProxyBackend, family: IPFamily = .ipv4, timing: SyncTiming = .init(),
                clock: C, logger: Logger, observers: [any SyncObserver] = [], recorders: [any SyncRecorder] = []) {
        self.observers = observers
        self.recorders = recorders
        self.tracker = tracker
        self.backend = backend
        self.family = family
        self.timing = timing
        self.clock = clock
        self.logger = logger
    }

    /// Folds one event into the model and schedules a sync when it changed something.
    public func handle(_ event: ObjectEvent) {
        switch tracker.apply(event) {
        case .applied:
            pendingChange = true
            if case .synced = event { logger.info("initial state received; first sync follows") }
            if tracker.nodeLabelsChanged { needFullSync = true }
            recordChange(event)
            resume()
        case .ignored:
            break
        case .rejected(let r):
            counters.rejectedObjects += 1
            logger.error("\(r.description); the object is skipped, the rest of the node's rules stay in place")
        }
    }

    /// Asks for a full sync at the next opportunity (e.g. the canary noticed a flush).
    public func requestFullSync() {
        needFullSync = true
        pendingChange = true
        if tracker.synced { record(.queued(family)) }
        resume()
    }

    private func record(_ event: SyncEvent) {
        for r in recorders { r.record(event) }
    }

    /// Tells the recorders what an applied event changed, and that a sync is now wanted.
    private func recordChange(_ event: ObjectEvent) {
        guard !recorders.isEmpty else { return }
        switch event {
        case .serviceUpserted(let svc):
            pendingServiceKeys.insert(svc.key)
            record(.changed(.service, pendingServices: pendingServiceKeys.count, pendingEndpoints: pendingEndpointChanges))
        case .serviceDeleted(let key):
            pendingServiceKeys.insert(key)
            record(.changed(.service, pendingServices: pendingServiceKeys.count, pendingEndpoints: pendingEndpointChanges))
        case .sliceUpserted, .sliceDeleted:
            pendingEndpointChanges += 1
            record(.changed(.endpoints, pendingServices: pendingServiceKeys.count, pendingEndpoints: pendingEndpointChanges))
        case .nodeUpserted(let node):
            record(.node(node))
        case .nodeDeleted:
            record(.node(nil))
        case .synced, .serviceCIDRUpserted, .serviceCIDRDeleted:
            break
        }
        if tracker.synced { record(.queued(family)) }
    }

    private func resume() {
        if let w = wake {
            wake = nil
            w.resume()
        }
    }

    /// When the next sync is due, or nil when nothing is due until an event arrives.
    private func nextDeadline() -> C.Instant? {
        guard tracker.synced else { return nil }
        guard let last = lastSync else { return clock.now }
        if let retryAt { return retryAt }
        let periodic = last.advanced(by: timing.syncPeriod)
        if pendingChange { return min(last.advanced(by: timing.minSyncPeriod), periodic) }
        return periodic
    }

    /// Runs until cancelled.
    public func run() async {
        if !started {
            started = true
            record(.started(family))
        }
        while !Task.isCancelled {
            if let deadline = nextDeadline(), deadline <= clock.now {
                await syncOnce()
                continue
            }
            await sleep(until: nextDeadline())
        }
    }

    private func sleep(until deadline: C.Instant?) async {
        generation += 1
        let gen = generation
        var timer: Task<Void, Never>?
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                wake = c
                if let deadline {
                    timer = Task { [clock] in
                        try? await clock.sleep(until: deadline, tolerance: nil)
                        self.timerFired(gen)
                    }
                }
            }
        } onCancel: {
            Task { await self.resumeForCancel() }
        }
        timer?.cancel()
    }

    private func timerFired(_ gen: Int) {
        if gen == generation { resume() }
    }

    private func resumeForCancel() { resume() }

    /// Logs a warning every `slowSyncWarning` while the sync started at `started` runs (a
    /// kernel tool that hangs is killed by the process runner's time limit; until then this
    /// says why no later change is applied). Cancelled when the sync ends.
    private func slowSyncWatchdog(started: C.Instant, full: Bool) -> Task<Void, Never> {
        let clock = self.clock, logger = self.logger, interval = timing.slowSyncWarning, backendName = backend.name
        return Task {
            var waited = Duration.zero
            while !Task.isCancelled {
                do {
                    try await clock.sleep(until: started.advanced(by: waited + interval), tolerance: nil)
                } catch {
                    return
                }
                if Task.isCancelled { return }
                waited += interval
                logger.warning("\(full ? "full" : "partial") \(backendName) sync still running after \(GoDuration.format(waited)); later changes wait for it")
            }
        }
    }

    /// Performs one sync now (tests call it directly).
    public func syncOnce() async {
        let now = clock.now
        if !needFullSync, await backend.externalChangeDetected() {
            needFullSync = true
        }
        let periodicDue = lastFullSync.map { now >= $0.advanced(by: timing.syncPeriod) } ?? true
        let full = needFullSync || periodicDue
        let changes = tracker.pendingChanges(family)
        let snapshotStart = ContinuousClock.now
        let state = tracker.snapshot(family)
        logger.debug("snapshot of \(changes) changed Services took \(GoDuration.format(snapshotStart.duration(to: .now)))")
        unreportedTriggerTimes.merge(tracker.takeTriggerTimes(family)) {
            Array(($0 + $1).prefix(ChangeTracker.maximumTriggerTimesPerService))
        }
        pendingServiceKeys = []
        pendingEndpointChanges = 0
        let kind: SyncKind = full ? .full : .partial(of: state)
        // Everything this sync consumes is taken before the await: the actor is reentrant, so a
        // full-sync request or a node-label change that arrives while the backend works sets
        // the flags again and is served by the next sync instead of being cleared afterwards.
        pendingChange = false
        needFullSync = false
        if full { tracker.acknowledgeNodeLabels() }
        lastSync = now
        let watchdog = slowSyncWatchdog(started: now, full: full)
        defer { watchdog.cancel() }
        do {
            let report = try await backend.sync(state, kind: kind)
            let duration = now.duration(to: clock.now)
            // The periodic resync asked for is served, whatever the backend made of it. What was
            // written is the backend's to say: it may make a partial sync full (the nftables
            // mode when its fixed part changed, the iptables mode after a lost canary) or send
            // only differences for a resync (the nftables mode between its hourly full syncs,
            // as kube-proxy's). Counts, the log and the full/partial histograms follow that.
            if full { lastFullSync = now }
            let full = report.full
            counters.syncs += 1
            if full { counters.fullSyncs += 1 }
            counters.serviceChangesTotal += changes
            counters.lastReport = report
            counters.lastError = nil
            retryAt = nil
            consecutiveFailures = 0
            logger.info("\(full ? "full" : "partial") sync: \(state.servicePorts.count) service ports, \(changes) changed, \(report.bytes) bytes")
            let triggerTimes = unreportedTriggerTimes
            unreportedTriggerTimes = [:]
            record(.synced(SyncAttempt(family: family, kind: kind, duration: duration, report: report, triggerTimes: triggerTimes,
                                       pendingServiceChanges: pendingServiceKeys.count, pendingEndpointChanges: pendingEndpointChanges)))
            // No copy of the applied state is kept for the next sync's observers: while one
            // is held, the change tracker's next snapshot must copy the whole model (its
            // storage is shared) instead of updating the changed Services in place.
            for o in observers { await o.didSync(state: state, previous: nil, report: report) }
        } catch {
            let failure = SyncErrorRecord(error)
            record(.synced(SyncAttempt(family: family, kind: kind, duration: now.duration(to: clock.now), report: nil, error: failure,
                                       pendingServiceChanges: pendingServiceKeys.count, pendingEndpointChanges: pendingEndpointChanges)))
            counters.failures += 1
            counters.lastError = failure
            consecutiveFailures += 1
            needFullSync = true
            pendingChange = true
            let factor = 1 << min(consecutiveFailures - 1, 16)
            let delay = min(timing.retryBase * factor, timing.syncPeriod)
            retryAt = now.advanced(by: delay)
            logger.error("sync failed (\(error)); the previous rules stay in place, full retry in \(delay)")
        }
    }
}
