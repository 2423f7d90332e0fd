// Sluice: a per-node Kubernetes service proxy.
// The IPVS backend: reads what the kernel holds (virtual and real servers, ipsets, the
// addresses of kube-ipvs0, the iptables jump rules) or remembers it, has `IPVSPlanner` (the
// pure plan, SyncPlan.swift) say what to write, and applies that plan. Removed TCP real
// servers drain at weight 0.

import IPTables
import KernelKit
import Logging
import Netlink
import SluiceCore

#if canImport(Glibc)
import Glibc
#endif

/// Settings of the IPVS backend.
public struct IPVSBackendConfig: Sendable {
    /// Compiler options; `nodePortAddresses` and `localAddresses` are read from the kernel
    /// on every sync (every address not on the dummy device).
    public var options: IPVSOptions
    /// How long a removed TCP real server may drain at weight 0 (`--ipvs-graceful-period`).
    public var gracefulPeriod: Duration
    /// The iptables binaries.
    public var tools: IPTablesTools
    /// The dummy device holding service addresses.
    public var dummyDevice: String

    /// Creates a configuration.
    public init(options: IPVSOptions, gracefulPeriod: Duration = .seconds(30), tools: IPTablesTools,
                dummyDevice: String = "kube-ipvs0") {
        self.options = options
        self.gracefulPeriod = gracefulPeriod
        self.tools = tools
        self.dummyDevice = dummyDevice
    }
}

/// Kernel writes the backend has made, by kind (for logs, metrics and tests).
public struct IPVSWriteCounters: Sendable, Hashable, CustomStringConvertible {
    public var serviceAdds = 0
    public var serviceUpdates = 0
    public var serviceDeletes = 0
    public var destinationAdds = 0
    public var destinationUpdates = 0
    public var destinationDeletes = 0
    /// `IPVS_CMD_FLUSH` messages (the backend never sends one while syncing).
    public var flushes = 0
    public var addressAdds = 0
    public var addressDeletes = 0
    public var ipsetCreates = 0
    public var ipsetAdds = 0
    public var ipsetDeletes = 0
    public var restores = 0
    public var linkCreates = 0

    /// Creates zero counters.
    public init() {}

    /// IPVS add, edit, delete and flush messages.
    public var ipvsMessages: Int {
        serviceAdds + serviceUpdates + serviceDeletes + destinationAdds + destinationUpdates + destinationDeletes + flushes
    }

    /// The difference `self - other`.
    public func since(_ other: IPVSWriteCounters) -> IPVSWriteCounters {
        var d = IPVSWriteCounters()
        d.serviceAdds = serviceAdds - other.serviceAdds
        d.serviceUpdates = serviceUpdates - other.serviceUpdates
        d.serviceDeletes = serviceDeletes - other.serviceDeletes
        d.destinationAdds = destinationAdds - other.destinationAdds
        d.destinationUpdates = destinationUpdates - other.destinationUpdates
        d.destinationDeletes = destinationDeletes - other.destinationDeletes
        d.flushes = flushes - other.flushes
        d.addressAdds = addressAdds - other.addressAdds
        d.addressDeletes = addressDeletes - other.addressDeletes
        d.ipsetCreates = ipsetCreates - other.ipsetCreates
        d.ipsetAdds = ipsetAdds - other.ipsetAdds
        d.ipsetDeletes = ipsetDeletes - other.ipsetDeletes
        d.restores = restores - other.restores
        d.linkCreates = linkCreates - other.linkCreates
        return d
    }

    /// `services +1 ~0 -0, destinations +2 ~0 -0, flushes 0, addresses +1 -0, ipset entries +3 -0, sets created 0, restores 1`.
    public var description: String {
        "services +\(serviceAdds) ~\(serviceUpdates) -\(serviceDeletes), destinations +\(destinationAdds) ~\(destinationUpdates) -\(destinationDeletes), "
            + "flushes \(flushes), addresses +\(addressAdds) -\(addressDeletes), ipset entries +\(ipsetAdds) -\(ipsetDeletes), "
            + "sets created \(ipsetCreates), restores \(restores)"
    }
}

/// The IPVS backend for one IP family.
public actor IPVSBackend: ProxyBackend {
    public nonisolated let name = "ipvs"
    private let ipvs: any IPVSClient
    private let links: any LinkClient
    private let ipsets: any IPSetClient
    private let runner: any CommandRunner
    private let logger: Logger
    private let config: IPVSBackendConfig
    private let now: @Sendable () -> Duration

    private struct Drain {
        var server: RealServer
        var deadline: Duration
    }

    private var draining: [IPVSDrainKey: Drain] = [:]
    /// A sync or a reap is running (from start to end, across its awaits).
    private var turnHeld = false
    /// Syncs and reaps waiting for the turn, first come first served.
    private var turnWaiters: [CheckedContinuation<Void, Never>] = []
    private var lastRestore: String?
    /// Writes so far.
    public private(set) var counters = IPVSWriteCounters()
    /// Writes made by the last sync.
    public private(set) var lastSyncWrites = IPVSWriteCounters()
    /// What the kernel holds after the last successful full sync and every successful
    /// partial sync since: the desired state written, the family, node labels and options it
    /// was compiled with, and kube-ipvs0's index. A partial sync updates it for the changed
    /// Services and writes the difference without reading the kernel; nil (the next sync
    /// reads the kernel) before the first full sync and after any failed sync.
    ///
    /// It holds no `ProxyState`: the desired state records each service port's share, which
    /// is all an update needs of the past. A snapshot kept here would share the change
    /// tracker's storage, and the tracker's next snapshot would copy the whole model.
    private struct KernelImage {
        var desired: IPVSDesiredState
        var family: IPFamily
        var nodeLabels: [String: String]
        var options: IPVSOptions
        var dummyIndex: UInt32
    }

    private var image: KernelImage?
    /// The desired state of the last successful sync (nil after a failed one).
    public var lastDesired: IPVSDesiredState? { image?.desired }
    /// Whether the next partial sync can work from memory (a full sync has succeeded, and no
    /// sync has failed since).
    public var holdsKernelImage: Bool { image != nil }
    /// Syncs completed.
    public private(set) var syncs = 0

    /// Creates a backend over the given kernel clients.
    /// - Parameter now: a monotonic clock for drain deadlines (tests inject one).
    public init(config: IPVSBackendConfig, ipvs: any IPVSClient, links: any LinkClient, ipsets: any IPSetClient,
                runner: any CommandRunner, logger: Logger, now: (@Sendable () -> Duration)? = nil) {
        self.config = config
        self.ipvs = ipvs
        self.links = links
        self.ipsets = ipsets
        self.runner = runner
        self.logger = logger
        if let now {
            self.now = now
        } else {
            let origin = ContinuousClock.now
            self.now = { origin.duration(to: .now) }
        }
    }

    /// Real servers draining at weight 0, as `vs -> rs` strings.
    public var drainingServers: [String] {
        draining.keys.map(\.description).sorted()
    }

    public func externalChangeDetected() async -> Bool { false }

    /// Waits until no sync or reap is running, then holds the turn. The actor releases its
    /// isolation at every `await`; the turn keeps a second multi-step operation out until
    /// the first ends.
    private func acquireTurn() async {
        if !turnHeld {
            turnHeld = true
            return
        }
        await withCheckedContinuation { turnWaiters.append($0) }
    }

    /// Passes the turn to the next waiter, or frees it.
    private func releaseTurn() {
        if turnWaiters.isEmpty {
            turnHeld = false
        } else {
            turnWaiters.removeFirst().resume()
        }
    }

    // MARK: Sync

    public func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        await acquireTurn()
        defer { releaseTurn() }
        return try await syncExclusively(state, kind: kind)
    }

    private func syncExclusively(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        let before = counters
        // Taken out: it is valid again only once this sync succeeds, and while it is out the
        // update below mutates the only copy (no copy of a 20 000-Service state).
        var memory = image
        image = nil
        let link = try await ensureDummy()
        let index = UInt32(bitPattern: link.index)
        if let changed = kind.changed, var m = memory, m.dummyIndex == index, m.family == state.family, m.nodeLabels == state.nodeLabels {
            memory = nil
            return try await partialSync(state, changed: changed, from: &m, before: before)
        }
        memory = nil
        return try await readingSync(state, kind: kind, index: index, before: before)
    }

    private var planner: IPVSPlanner { IPVSPlanner(options: config.options) }

    /// A partial sync from memory: the compiled state is updated for the changed Services
    /// only, and the IPVS messages, set members and addresses written are the difference
    /// between what the kernel holds (the image) and the update. Nothing is read from the
    /// kernel but the destinations of a TCP virtual server losing some (their connection
    /// counts decide between deleting and draining).
    private func partialSync(_ state: ProxyState, changed: Set<NamespacedName>, from memory: inout KernelImage,
                             before: IPVSWriteCounters) async throws -> SyncReport {
        let started = ContinuousClock.now
        let changes = IPVSCompiler(options: memory.options).update(&memory.desired, to: state, changed: changed)
        let updated = ContinuousClock.now
        var inKernel: [VirtualServerKey: [RealServer]] = [:]
        for key in IPVSPlanner.destinationsToRead(update: memory.desired, changes: changes) {
            inKernel[key] = try await ipvs.destinations(of: key)
        }
        let plan = planner.plan(update: memory.desired, changes: changes, options: memory.options, dummyIndex: memory.dummyIndex,
                                inKernel: inKernel, lastRestore: lastRestore, draining: Set(draining.keys))
        let outcome = try await apply(plan)
        logger.debug("ipvs partial sync: update of \(changed.count) Services took \(GoDuration.format(started.duration(to: updated))), plan and kernel writes \(GoDuration.format(updated.duration(to: .now)))")
        let report = finishSync(plan.desired, full: false, before: before, restoreBytes: outcome.restoreBytes)
        guard outcome.failures.isEmpty else { throw SyncFailure(outcome.failures) }
        image = memory
        return report
    }

    /// A sync that reads the kernel (virtual and real servers, sets, addresses) and writes
    /// the difference: every full sync, and a partial one without a valid image.
    private func readingSync(_ state: ProxyState, kind: SyncKind, index: UInt32, before: IPVSWriteCounters) async throws -> SyncReport {
        var view = IPVSKernelView(dummyIndex: index, addresses: try await links.addresses())
        let (desired, options) = planner.desired(state, nodeAddresses: view.nodeAddresses)
        view.sets = try await ipsets.list(Set(desired.sets.map(\.name)))
        if kind.isFull {
            let restorer = IPTablesRestorer(tools: config.tools, runner: runner)
            for table in [Table.nat, .filter] { view.saves[table] = try await restorer.save(table) }
        }
        view.virtualServers = try await ipvs.services()
        for key in IPVSPlanner.destinationsToRead(desired: desired, kernel: view.virtualServers.filter { $0.key.address.family == options.family },
                                                  kind: kind) {
            view.destinations[key] = try await ipvs.destinations(of: key)
        }
        let plan = planner.plan(desired, options: options, kind: kind, kernel: view, lastRestore: lastRestore, draining: Set(draining.keys))
        let outcome = try await apply(plan)
        let report = finishSync(desired, full: kind.isFull, before: before, restoreBytes: outcome.restoreBytes)
        guard outcome.failures.isEmpty else { throw SyncFailure(outcome.failures) }
        // Only a full sync has checked every virtual server's destinations against the kernel.
        if kind.isFull {
            image = KernelImage(desired: desired, family: state.family, nodeLabels: state.nodeLabels, options: options, dummyIndex: index)
        }
        return report
    }

    /// Writes a plan: the sets, the iptables batch, the IPVS messages (with the drain
    /// bookkeeping), the kube-ipvs0 addresses; then deletes drained real servers whose
    /// connections are gone. A refused write of one piece (an IPVS message, an address) is
    /// returned and the rest goes on; a failed set, restore or socket throws.
    private func apply(_ plan: IPVSSyncPlan) async throws -> (failures: [SyncFailure.Item], restoreBytes: Int) {
        var failures: [SyncFailure.Item] = []

        // ipsets first: the iptables rules reference them.
        if !plan.createSets.isEmpty {
            try await ipsets.create(plan.createSets)
            counters.ipsetCreates += plan.createSets.count
        }
        if !plan.setChanges.isEmpty {
            try await ipsets.update(plan.setChanges.map { ($0.set, $0.add, $0.delete) })
            counters.ipsetAdds += plan.setChanges.reduce(0) { $0 + $1.add.count }
            counters.ipsetDeletes += plan.setChanges.reduce(0) { $0 + $1.delete.count }
        }

        // iptables: the constant-size rule set.
        var restoreBytes = 0
        if let restore = plan.restore {
            try await IPTablesRestorer(tools: config.tools, runner: runner)
                .restore(restore.batch, counters: true, operation: "ipvs-mode iptables restore")
            lastRestore = restore.rules
            counters.restores += 1
            restoreBytes = restore.batch.utf8.count
        }

        // IPVS services and destinations, and the real servers that start or stop draining.
        let t = now()
        for change in plan.drains {
            switch change {
            case .start(let key, let h):
                draining[IPVSDrainKey(service: key, endpoint: h.endpoint)] = Drain(server: h, deadline: t + config.gracefulPeriod)
                logger.info("draining \(key) -> \(h.endpoint): \(h.activeConnections) active connections, deleted when they end or in \(config.gracefulPeriod)")
            case .stop(let dk):
                draining[dk] = nil
            case .stopAll(let key):
                draining = draining.filter { $0.key.service != key }
            }
        }
        failures += try await apply(plan.operations)

        // Addresses on kube-ipvs0.
        failures += try await writeAddresses(bind: plan.bind, unbind: plan.unbind, index: plan.dummyIndex)

        // Drained real servers whose connections are gone.
        _ = try await reapExclusively()
        return (failures, restoreBytes)
    }

    private func writeAddresses(bind toBind: [IPAddress], unbind toUnbind: [IPAddress], index: UInt32) async throws -> [SyncFailure.Item] {
        var failures: [SyncFailure.Item] = []
        // In chunks, as the IPVS operations: a cold start binds one address per Service.
        for chunk in toBind.chunks(of: IPVSBackend.applyChunk) {
            let failed = try await links.addAddresses(chunk, index: index)
            counters.addressAdds += chunk.count - failed.count
            failures += failed.map { SyncFailure.Item(what: "bind \($0.0) to \(config.dummyDevice)", error: $0.1, detail: "\($0.1.errno)") }
        }
        for chunk in toUnbind.chunks(of: IPVSBackend.applyChunk) {
            let failed = try await links.deleteAddresses(chunk, index: index)
            counters.addressDeletes += chunk.count - failed.count
            failures += failed.map { SyncFailure.Item(what: "unbind \($0.0) from \(config.dummyDevice)", error: $0.1, detail: "\($0.1.errno)") }
        }
        return failures
    }

    /// Counts, logs and reports one sync.
    private func finishSync(_ desired: IPVSDesiredState, full: Bool, before: IPVSWriteCounters, restoreBytes: Int) -> SyncReport {
        lastSyncWrites = counters.since(before)
        syncs += 1
        let realServers = desired.virtualServers.values.reduce(0) { $0 + $1.destinations.count }
        logger.info("ipvs \(full ? "full" : "partial") sync: \(desired.virtualServers.count) virtual servers, \(realServers) real servers, \(desired.boundAddresses.count) addresses, \(draining.count) draining; wrote \(lastSyncWrites)")
        let w = lastSyncWrites
        return SyncReport(
            full: full,
            written: [.ipvsMessages: w.ipvsMessages, .ipsetEntries: w.ipsetAdds + w.ipsetDeletes,
                      .serviceAddresses: w.addressAdds + w.addressDeletes,
                      .iptablesRules(.nat): w.restores > 0 ? desired.nat.rules.count : 0,
                      .iptablesRules(.filter): w.restores > 0 ? desired.filter.rules.count : 0],
            total: [.virtualServers: desired.virtualServers.count, .realServers: realServers,
                    .iptablesRules(.nat): desired.nat.rules.count, .iptablesRules(.filter): desired.filter.rules.count],
            bytes: restoreBytes)
    }

    private func ensureDummy() async throws -> LinkInfo {
        if let link = try await links.link(named: config.dummyDevice) { return link }
        let link = try await links.createDummy(named: config.dummyDevice)
        counters.linkCreates += 1
        logger.info("created dummy device \(config.dummyDevice) (NOARP, down)")
        return link
    }

    /// Operations handed to the IPVS client at once: a cold sync at 20 000 Services × 10 has
    /// 220 000, and their netlink requests all built at once held over 100 MiB.
    static let applyChunk = 4096

    private func apply(_ ops: [IPVSOperation]) async throws -> [SyncFailure.Item] {
        guard ops.count > IPVSBackend.applyChunk else { return try await applyChunk(ops[...]) }
        var failures: [SyncFailure.Item] = []
        var start = ops.startIndex
        while start < ops.endIndex {
            let end = min(start + IPVSBackend.applyChunk, ops.endIndex)
            failures += try await applyChunk(ops[start..<end])
            start = end
        }
        return failures
    }

    private func applyChunk(_ chunk: ArraySlice<IPVSOperation>) async throws -> [SyncFailure.Item] {
        guard !chunk.isEmpty else { return [] }
        let ops = Array(chunk)
        let failures = try await ipvs.apply(ops)
        let failed = Set(failures.map(\.operation))
        for op in ops where !failed.contains(op) {
            switch op {
            case .addService: counters.serviceAdds += 1
            case .updateService: counters.serviceUpdates += 1
            case .deleteService: counters.serviceDeletes += 1
            case .addDestination: counters.destinationAdds += 1
            case .updateDestination: counters.destinationUpdates += 1
            case .deleteDestination: counters.destinationDeletes += 1
            }
            logger.debug("ipvs: \(op)")
        }
        for f in failures { logger.error("ipvs: \(f)") }
        return failures.map { SyncFailure.Item(what: "", error: $0) }
    }

    /// Deletes draining real servers that have no established connection left, or whose
    /// graceful period is over. Called after every sync and periodically.
    /// - Returns: how many were deleted.
    ///
    /// It never interleaves with a sync: the actor is reentrant at every kernel call, so
    /// both take the turn first; otherwise a reap could delete a real server that a sync
    /// had just put back to weight 1.
    @discardableResult
    public func reapDraining() async throws -> Int {
        await acquireTurn()
        defer { releaseTurn() }
        return try await reapExclusively()
    }

    private func reapExclusively() async throws -> Int {
        guard !draining.isEmpty else { return 0 }
        let t = now()
        var ops: [IPVSOperation] = []
        let byService = Dictionary(grouping: draining.keys, by: \.service)
        for (service, keys) in byService.sorted(by: { $0.key < $1.key }) {
            let have: [RealServer]
            do {
                have = try await ipvs.destinations(of: service)
            } catch let e as NetlinkError where e.errno == .noSuchProcess || e.errno == .noSuchFileOrDirectory {
                for k in keys { draining[k] = nil }
                continue
            }
            let byEndpoint = Dictionary(have.map { ($0.endpoint, $0) }, uniquingKeysWith: { a, _ in a })
            for k in keys {
                guard let rs = byEndpoint[k.endpoint], let d = draining[k] else {
                    draining[k] = nil
                    continue
                }
                if rs.activeConnections == 0 || t >= d.deadline {
                    ops.append(.deleteDestination(service, rs))
                    draining[k] = nil
                    logger.info("drained \(service) -> \(k.endpoint) deleted (\(rs.activeConnections == 0 ? "no active connections" : "graceful period over"))")
                }
            }
        }
        let failures = try await apply(ops)
        return ops.count - failures.count
    }

    // MARK: Start-up and clean-up

    /// Kernel support found at start-up.
    public struct KernelSupport: Sendable {
        public var ipvs: IPVSInfo
        public var dummyIndex: Int32
    }

    /// Checks that the kernel has what IPVS mode needs, creates kube-ipvs0, sets the sysctls
    /// and timeouts. Throws one error naming everything missing; never falls back.
    public static func prepare(config: IPVSBackendConfig, ipvs: (any IPVSClient)?, links: any LinkClient, ipsets: any IPSetClient,
                               timeouts: IPVSTimeouts, strictARP: Bool, sysctlRoot: String = "/proc/sys",
                               logger: Logger) async throws -> KernelSupport {
        var missing: [String] = []
        var info: IPVSInfo?
        if let ipvs {
            do {
                info = try await ipvs.info()
                try await checkScheduler(config.options.scheduler, ipvs: ipvs)
            } catch let e as SchedulerUnavailable {
                missing.append(e.description)
            } catch {
                missing.append("IPVS does not answer (\(error)); is the ip_vs module loaded?")
            }
        } else {
            missing.append("the kernel has no IPVS: the generic netlink family \"IPVS\" is missing (load the ip_vs module, or build the kernel with CONFIG_IP_VS)")
        }
        var dummyIndex: Int32 = 0
        do {
            if let l = try await links.link(named: config.dummyDevice) {
                dummyIndex = l.index
            } else {
                dummyIndex = try await links.createDummy(named: config.dummyDevice).index
                logger.info("created dummy device \(config.dummyDevice) (NOARP, down)")
            }
        } catch let e as NetlinkError {
            if e.errno == .notSupported || e.errno == .invalidArgument {
                missing.append("the kernel cannot create dummy devices for \(config.dummyDevice) (load the dummy module, or CONFIG_DUMMY): \(e.errno)")
            } else {
                missing.append("cannot create \(config.dummyDevice): \(e)")
            }
        }
        do {
            if let client = ipsets as? NetfilterIPSetClient {
                for t in Set(KubeIPSet.all(config.options.family).map(\.type)) {
                    _ = try await client.revision(of: t, family: t.isHash ? (config.options.family == .ipv4 ? 2 : 10) : 0)
                }
            } else {
                _ = try await ipsets.list([])
            }
        } catch {
            missing.append("the kernel has no usable ipset support (ip_set and ip_set_hash_*/ip_set_bitmap_port modules, CONFIG_IP_SET): \(error)")
        }
        guard missing.isEmpty, let info else {
            throw SluiceIPVSUnavailable(missing: missing)
        }
        let sysctls: [(String, Int)] = [
            ("net/ipv4/vs/conntrack", 1),
            ("net/ipv4/vs/expire_nodest_conn", 1),
            ("net/ipv4/vs/expire_quiescent_template", 1),
            ("net/ipv4/ip_forward", 1),
        ] + (strictARP ? [("net/ipv4/conf/all/arp_ignore", 1), ("net/ipv4/conf/all/arp_announce", 2)] : [])
            + (kernelBefore(5, 9) && !kernelBefore(4, 1) ? [("net/ipv4/vs/conn_reuse_mode", 0)] : [])
        let writer = SysctlWriter(root: sysctlRoot)
        for (key, value) in sysctls {
            let outcome = writer.set(key, value)
            if !outcome.succeeded { logger.warning("cannot set \(key.replacingSlashes)=\(value): \(outcome)") }
        }
        if timeouts.tcp > 0 || timeouts.tcpFin > 0 || timeouts.udp > 0, let ipvs {
            do {
                try await ipvs.setTimeouts(timeouts)
            } catch {
                logger.error("cannot set IPVS timeouts: \(error)")
            }
        }
        logger.info("IPVS \(info), scheduler \(config.options.scheduler), \(config.dummyDevice) index \(dummyIndex)")
        return KernelSupport(ipvs: info, dummyIndex: dummyIndex)
    }

    struct SchedulerUnavailable: Error, CustomStringConvertible {
        var description: String
    }

    /// kube-proxy's scheduler check: if no service uses the scheduler yet, create and delete
    /// a probe service at 198.51.100.0:20000/TCP (TEST-NET-2) with it.
    static func checkScheduler(_ scheduler: String, ipvs: any IPVSClient) async throws {
        let services = try await ipvs.services()
        if services.contains(where: { $0.scheduler == scheduler }) { return }
        guard let probeIP = IPAddress("198.51.100.0") else { return }
        let probe = VirtualServer(key: VirtualServerKey(address: probeIP, proto: .tcp, port: 20000), scheduler: scheduler)
        let failures = try await ipvs.apply([.addService(probe)])
        if let f = failures.first {
            throw SchedulerUnavailable(description: "the IPVS scheduler \"\(scheduler)\" is not available (load the ip_vs_\(scheduler) module): \(f.error.errno)")
        }
        _ = try await ipvs.apply([.deleteService(probe.key)])
    }

    /// Removes what IPVS mode leaves behind: every IPVS service (as kube-proxy's cleanup
    /// does), the jump rules and chains of IPVS mode, the ipsets, and kube-ipvs0.
    public static func cleanup(ipvs: (any IPVSClient)?, links: (any LinkClient)?, ipsets: (any IPSetClient)?, tools: [IPTablesTools],
                               runner: any CommandRunner, dummyDevice: String = "kube-ipvs0", logger: Logger) async -> [String] {
        var failures: [String] = []
        if let ipvs {
            do {
                let n = try await ipvs.services().count
                try await ipvs.flush()
                if n > 0 { logger.info("flushed \(n) IPVS services") }
            } catch {
                failures.append("flushing IPVS: \(error)")
            }
        }
        for t in tools {
            // One save and one restore per table: the jump rules are deleted with `-D` lines in
            // the same batch that empties and removes the chains.
            for (table, chains) in [(Table.nat, ipvsNATChains), (.filter, ipvsFilterChains)] {
                let restorer = IPTablesRestorer(tools: t, runner: runner)
                guard let save = try? await restorer.save(table) else { continue }
                let present = IPTablesRestorer.parseChains(save)
                let deletes = JumpInstaller.deleteLines(ipvsJumpRules, in: table, save: save)
                // Chains only IPVS mode uses are deleted; the ones iptables mode shares
                // (KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-FORWARD,
                // KUBE-PROXY-FIREWALL) are emptied here and deleted by the iptables clean-up,
                // which knows what else may still jump to them.
                let declared = chains.filter { present.contains($0) }
                let doomed = declared.filter { !ipvsSharedChains.contains($0) }
                if declared.isEmpty && deletes.isEmpty { continue }
                let text = IPTablesRestorer.removalBatch(table, emptied: declared, ruleLines: deletes, deleted: doomed)
                do {
                    try await restorer.restore(text, operation: "removing IPVS-mode chains from the \(table.rawValue) table")
                    logger.info("\(t.restore): removed \(deletes.count) jump rules, emptied \(declared.count) and deleted \(doomed.count) IPVS-mode chains in the \(table.rawValue) table")
                } catch let e as IPTablesError {
                    failures.append("removing IPVS-mode chains from the \(table.rawValue) table: \(e.underlying)")
                } catch {
                    failures.append("\(error)")
                }
            }
        }
        if let ipsets {
            let names = IPFamily.allCases.flatMap { KubeIPSet.all($0).map(\.name) }
            do {
                let present = try await ipsets.list(Set(names)).map(\.name)
                try await ipsets.destroy(present)
                if !present.isEmpty { logger.info("destroyed \(present.count) ipsets") }
            } catch {
                failures.append("destroying ipsets: \(error)")
            }
        }
        if let links {
            do {
                if try await links.deleteLink(named: dummyDevice) { logger.info("deleted \(dummyDevice)") }
            } catch {
                failures.append("deleting \(dummyDevice): \(error)")
            }
        }
        return failures
    }
}

/// IPVS mode cannot run here; `missing` names each missing kernel feature.
public struct SluiceIPVSUnavailable: Error, Sendable, CustomStringConvertible {
    /// What is missing, one item per feature.
    public var missing: [String]

    public var description: String { "cannot use --proxy-mode ipvs: " + missing.joined(separator: "; ") }
}

extension Array {
    /// The array cut into consecutive pieces of at most `size` elements (one piece when it
    /// has no more; none when it is empty).
    fileprivate func chunks(of size: Int) -> [[Element]] {
        guard count > size else { return isEmpty ? [] : [self] }
        return stride(from: 0, to: count, by: size).map { Array(self[$0..<Swift.min($0 + size, count)]) }
    }
}

extension String {
    fileprivate var replacingSlashes: String { split(separator: "/").joined(separator: ".") }
}

/// True when the running kernel's version is below `major.minor`.
func kernelBefore(_ major: Int, _ minor: Int) -> Bool {
    var u = utsname()
    guard uname(&u) == 0 else { return false }
    let release = withUnsafeBytes(of: &u.release) { raw in
        String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
    }
    let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
    guard parts.count == 2 else { return false }
    return (parts[0], parts[1]) < (major, minor)
}
