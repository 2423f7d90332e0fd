// Sluice: a per-node Kubernetes service proxy.
// The userspace mode's backend: per sync, the relays are reconciled (listeners opened,
// kept with their ports, or closed; endpoints updated without dropping established relays
// to endpoints that stay; NodePorts held), and the portal rules are written through the
// iptables restore path into their own four nat chains.

import Foundation
import IPTables
#if canImport(Glibc)
import Glibc
#endif
import KernelKit
import Logging
import SluiceCore

/// The userspace proxy mode for IPv4.
public actor UserspaceBackend: ProxyBackend {
    public nonisolated let name = "userspace"
    /// The relays.
    public let relays: RelayManager
    private let restorer: IPTablesRestorer
    private let jumps: JumpInstaller
    private let nodeName: String
    private let nodeIP: IPAddress
    private let logger: Logger
    /// The restore batch last applied ("" before the first sync).
    public private(set) var lastRestore = ""
    private var synced = false
    private var reportedProblems: Set<String> = []

    /// What the kernel and the relays hold after the last successful full sync and every
    /// successful partial sync since: the plan, the node labels and the service port names of
    /// each Service it came from, and the relay port each service port's rules point at. A
    /// partial sync re-derives only the changed Services' ports and writes only their rules;
    /// nil after a failed sync.
    ///
    /// It holds no `ProxyState`: a snapshot kept here would share the change tracker's
    /// storage, and the tracker's next snapshot would copy the whole model.
    private struct Image {
        var plan: UserspacePlan
        var nodeLabels: [String: String]
        /// The service port names (relayed or skipped) of each Service in the plan.
        var portNames: [NamespacedName: [ServicePortName]]
        var ports: [ServicePortName: Int]
        /// Rules in the four chains.
        var rules: Int
    }

    private var image: Image?

    /// Whether the next partial sync can work from memory.
    public var holdsImage: Bool { image != nil }

    /// Creates a backend.
    /// - Parameters:
    ///   - nodeName: this node (endpoint locality).
    ///   - nodeIP: the IPv4 address HOST rules DNAT to.
    ///   - tools: the iptables tools.
    ///   - runner: runs them.
    ///   - relays: the relay manager.
    ///   - jumpCheckValidity: how long a check that found the jumps in place is trusted.
    public init(nodeName: String, nodeIP: IPAddress, tools: IPTablesTools, runner: any CommandRunner, relays: RelayManager, logger: Logger,
                jumpCheckValidity: Duration = .seconds(10)) {
        self.jumpCheckValidity = jumpCheckValidity
        self.nodeName = nodeName
        self.nodeIP = nodeIP
        self.restorer = IPTablesRestorer(tools: tools, runner: runner)
        self.jumps = JumpInstaller(tools: tools, runner: runner)
        self.relays = relays
        self.logger = logger
    }

    /// The backend for a node: its first IPv4 node IP, the chosen iptables flavour, and relays
    /// with `udpIdleTimeout`. Raises the open-file limit to at least 64 000 where it may, as
    /// legacy kube-proxy did (two listeners per service port, two descriptors per TCP relay).
    /// - Throws: `ConfigError` when the node has no IPv4 address.
    public static func create(node: NodeConfig, variant: IPTablesVariant, udpIdleTimeout: Duration,
                              runner: any CommandRunner, logger: Logger) throws -> UserspaceBackend {
        guard let ip = node.nodeIPs.first(where: { $0.family == .ipv4 }) else {
            throw ConfigError(field: "--node-ip", value: node.nodeIPs.map(\.description).joined(separator: ","),
                              reason: "userspace mode needs an IPv4 node IP (the address KUBE-PORTALS-HOST and KUBE-NODEPORT-HOST DNAT to)")
        }
        raiseOpenFileLimit(logger: logger)
        let relays = RelayManager(config: RelayConfig(udpIdleTimeout: udpIdleTimeout), logger: logger)
        return UserspaceBackend(nodeName: node.nodeName, nodeIP: ip, tools: IPTablesTools(variant: variant, family: .ipv4), runner: runner,
                                relays: relays, logger: logger)
    }

    /// Reconciles the relays with `state` and writes the portal rules.
    ///
    /// Order: listeners for new service ports open first, then the rules are written, then the
    /// listeners of removed service ports close, so no rule ever points at a closed port. A
    /// service port whose listener cannot be opened is left out of the rules and the sync
    /// fails after everything else has been applied (the runner retries).
    public func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        let full = kind.isFull
        var memory = image
        image = nil
        if let changed = kind.changed, synced, var m = memory, m.nodeLabels == state.nodeLabels {
            memory = nil
            return try await partialSync(state, changed: changed, from: &m)
        }
        memory = nil
        let plan = UserspacePlan(state: state, nodeName: nodeName)
        for name in plan.skipped {
            once("skip \(name)", "\(name.service):\(name.port): \(state.servicePorts[name]?.proto.rawValue ?? "?") is not relayed in userspace mode (TCP and UDP only)")
        }
        let prepared = await relays.prepare(plan.relays)
        for (name, why) in prepared.nodePortFailures.sorted(by: { $0.key < $1.key }) {
            once("nodeport \(name) \(why)", "\(name.service):\(name.port): \(why); its NodePort is redirected but not held")
        }
        if prepared.closedRelays > 0 {
            logger.info("closed \(prepared.closedRelays) relay(s) to endpoints that went away")
        }
        let rules = PortalCompiler(nodeIP: nodeIP).compile(plan, relayPorts: prepared.ports)
        let text = rules.restoreText
        var written = 0
        if full || text != lastRestore {
            try await restorer.restore(text, operation: "writing the userspace portal rules")
            lastRestore = text
            written = rules.rules.count
        }
        if full {
            for jump in userspaceJumpRules { try await jumps.ensureJump(jump) }
            jumpsFoundAt = .now
        }
        synced = true
        await relays.retire(keeping: Set(prepared.ports.keys))
        if !prepared.listenerFailures.isEmpty {
            throw SyncFailure(listenerFailures: prepared.listenerFailures)
        }
        // Only a full sync has written every rule; NodePorts not held are retried by full syncs.
        if full && prepared.nodePortFailures.isEmpty {
            image = Image(plan: plan, nodeLabels: state.nodeLabels,
                          portNames: Dictionary(grouping: plan.names + plan.skipped, by: \.service),
                          ports: prepared.ports, rules: rules.rules.count)
        }
        return SyncReport(full: full, written: [.iptablesRules(.nat): written],
                          total: [.iptablesRules(.nat): rules.rules.count, .relays: prepared.ports.count,
                                  .nodePorts: await relays.heldNodePortCount],
                          bytes: written > 0 ? text.utf8.count : 0)
    }

    /// A partial sync from memory: the changed Services' ports are re-derived, their relays
    /// prepared, and their rules replaced with `-D` and `-A` lines (no chain is flushed), so
    /// the cost is that of the change, not of the number of Services.
    private func partialSync(_ state: ProxyState, changed: Set<NamespacedName>, from memory: inout Image) async throws -> SyncReport {
        var touched = Set<ServicePortName>()
        for service in changed {
            touched.formUnion(memory.portNames[service] ?? [])
            let now = state.portNames(of: service)
            touched.formUnion(now)
            memory.portNames[service] = now.isEmpty ? nil : now
        }
        let names = touched.sorted()
        var before: [ServicePortName: ServicePortInfo] = [:]
        for name in names { before[name] = memory.plan.servicePorts[name] }
        memory.plan.update(names, state: state, nodeName: nodeName)
        let plan = memory.plan
        for name in names where state.servicePorts[name].map({ $0.proto != .tcp && $0.proto != .udp }) == true {
            once("skip \(name)", "\(name.service):\(name.port): \(state.servicePorts[name]?.proto.rawValue ?? "?") is not relayed in userspace mode (TCP and UDP only)")
        }
        var specs: [ServicePortName: RelaySpec] = [:]
        for name in names { specs[name] = plan.relays[name] }
        let prepared = await relays.prepare(specs)
        for (name, why) in prepared.nodePortFailures.sorted(by: { $0.key < $1.key }) {
            once("nodeport \(name) \(why)", "\(name.service):\(name.port): \(why); its NodePort is redirected but not held")
        }
        if prepared.closedRelays > 0 {
            logger.info("closed \(prepared.closedRelays) relay(s) to endpoints that went away")
        }

        // The rules of the touched service ports: the old ones deleted, the new ones appended.
        let compiler = PortalCompiler(nodeIP: nodeIP)
        var lines: [String] = []
        var written = 0
        for name in names {
            var old: [String] = []
            if let svc = before[name], let relay = memory.ports[name] { old = compiler.rules(name, svc, relay: relay).map(\.rule) }
            var new: [String] = []
            if let svc = plan.servicePorts[name], let relay = prepared.ports[name] { new = compiler.rules(name, svc, relay: relay).map(\.rule) }
            guard old != new else { continue }
            lines += old.map { "-D" + $0.dropFirst(2) }
            lines += new
            written += new.count
            memory.rules += new.count - old.count
        }
        var bytes = 0
        if !lines.isEmpty {
            let text = "*nat\n" + lines.joined(separator: "\n") + "\nCOMMIT\n"
            try await restorer.restore(text, operation: "writing the userspace portal rules")
            bytes = text.utf8.count
            lastRestore = ""
        }
        for name in names { memory.ports[name] = prepared.ports[name] }
        await relays.retire(names.filter { prepared.ports[$0] == nil })
        if !prepared.listenerFailures.isEmpty {
            throw SyncFailure(listenerFailures: prepared.listenerFailures)
        }
        let total: [SyncCount: Int] = [.iptablesRules(.nat): memory.rules, .relays: memory.ports.count,
                                       .nodePorts: await relays.heldNodePortCount]
        if prepared.nodePortFailures.isEmpty { image = memory }
        return SyncReport(full: false, written: [.iptablesRules(.nat): written], total: total, bytes: bytes)
    }

    /// How long a check that found the four jumps in place is trusted. Each `iptables -C`
    /// reads the whole nat table (about 90 ms at 10 000 Services with iptables-legacy), so the
    /// check the sync runner makes before every partial sync is answered from the last one
    /// when it is this recent; the canary monitor's periodic calls check again.
    public let jumpCheckValidity: Duration
    private var jumpsFoundAt: ContinuousClock.Instant?

    /// True when one of the four jumps into our chains is gone (someone flushed the nat table).
    public func externalChangeDetected() async -> Bool {
        guard synced else { return false }
        if let t = jumpsFoundAt, t.duration(to: .now) < jumpCheckValidity { return false }
        for jump in userspaceJumpRules where await !jumps.hasJump(jump) {
            logger.warning("the \(jump.source) -> \(jump.target) jump is missing from the nat table: rules were flushed, resyncing fully")
            jumpsFoundAt = nil
            return true
        }
        jumpsFoundAt = .now
        return false
    }

    /// The relay port of a service port, callable from any thread (e.g. the conntrack
    /// reconciler's `relayPort` lookup); nil when it has no relay.
    public nonisolated func relayPort(of name: ServicePortName) -> UInt16? {
        relays.currentRelayPort(name).flatMap { UInt16(exactly: $0) }
    }

    /// Removes what the userspace mode leaves in iptables (``userspaceFootprint``): its
    /// jumps, then its four nat chains.
    public static func cleanup(tools: IPTablesTools, runner: any CommandRunner, logger: Logger) async throws {
        try await IPTablesRestorer(tools: tools, runner: runner).remove(userspaceFootprint) { table, n in
            logger.info("removed \(n) userspace-mode chains from the \(table.rawValue) table")
        }
    }

    /// Closes every listener and relay (the portal rules stay).
    public func shutdown() async {
        await relays.closeAll()
    }

    private func once(_ key: String, _ message: String) {
        guard reportedProblems.insert(key).inserted else { return }
        logger.warning("\(message)")
    }

    /// The open-file limit userspace mode wants at least: legacy kube-proxy set 64 000 for it.
    /// Each service port holds two listeners (portal and NodePort) and each TCP relay two more.
    static let wantedOpenFiles: rlim_t = 64_000

    /// Raises the open-file limit: both limits to `wantedOpenFiles` when the hard limit is lower
    /// and the process may raise it (root), otherwise the soft limit to the hard one.
    private static func raiseOpenFileLimit(logger: Logger) {
        var limit = rlimit()
        guard getrlimit(RLIMIT_NOFILE_RESOURCE, &limit) == 0 else { return }
        let before = limit.rlim_cur
        if limit.rlim_max != rlim_t.max, // RLIM_INFINITY
           limit.rlim_max < wantedOpenFiles {
            var wanted = rlimit(rlim_cur: wantedOpenFiles, rlim_max: wantedOpenFiles)
            if setrlimit(RLIMIT_NOFILE_RESOURCE, &wanted) == 0 {
                logger.debug("raised the open-file limit from \(before) to \(wantedOpenFiles)")
                return
            }
            let reason = String(cString: strerror(errno))
            let hard = Int(clamping: limit.rlim_max)
            logger.warning("cannot raise the hard open-file limit from \(hard) to \(wantedOpenFiles) (\(reason)); at most \(RelayConfig.listeners(underOpenFileLimit: hard)) relay listeners (one per service port, one more per NodePort) can be open")
        }
        guard limit.rlim_cur < limit.rlim_max else { return }
        limit.rlim_cur = limit.rlim_max
        if setrlimit(RLIMIT_NOFILE_RESOURCE, &limit) == 0 {
            logger.debug("raised the open-file limit from \(before) to \(limit.rlim_max)")
        }
    }
}

#if canImport(Glibc)
let RLIMIT_NOFILE_RESOURCE = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
#else
let RLIMIT_NOFILE_RESOURCE = RLIMIT_NOFILE
#endif

extension SyncFailure {
    /// The listeners that could not be opened, one failure per service port in name order.
    init(listenerFailures: [ServicePortName: String]) {
        self.init(listenerFailures.sorted { $0.key < $1.key }.map {
            SyncFailure.Item(what: "\($0.key.service):\($0.key.port)", error: ListenerError(message: $0.value))
        })
    }
}

/// A relay listener that could not be opened (the socket call's message).
public struct ListenerError: Error, Sendable, CustomStringConvertible {
    /// Why, as the socket layer said it.
    public var message: String

    public var description: String { message }
}
