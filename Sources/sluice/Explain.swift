// Sluice: a per-node Kubernetes service proxy.
// `sluice explain`: where the first packet of a new connection to an address goes, from the
// model (Service, endpoints and why) and from the rules (compiled, or the kernel's with
// --kernel), chain by chain. `sluice diff` is in ExplainDiff.swift.

import ArgumentParser
import Foundation
import IPTables
import IPVS
import KernelKit
import KubeAPI
import Logging
import NFTables
import SluiceCore
import Userspace

/// Output format of `explain` and `diff`.
enum ReportFormat: String, ExpressibleByArgument, CaseIterable {
    case text, json
}

/// `sluice explain`.
struct Explain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Explain where a packet to DST_IP:PORT goes: the Service port it hits, the endpoints and why, masquerade, and the rules it meets.",
        discussion: """
            Reads the same sources and node flags as the proxy (--manifests or --kubeconfig, --hostname-override, --config, --proxy-mode, ...). \
            By default the rules walked are the ones a full sync would write; --kernel walks what the kernel holds now (iptables-save, IPVS, or nft list table in nftables mode). \
            The JSON form (--output json) is described in docs/explain-diff.md.
            """)

    @OptionGroup var options: ProxyOptions

    @Option(help: ArgumentHelp("The packet's source address (default: the node itself).", valueName: "ip"))
    var from: String?

    @Option(help: ArgumentHelp("The interface the packet arrives on (for --detect-local-mode BridgeInterface or InterfaceNamePrefix).", valueName: "name"))
    var inInterface: String?

    @Flag(help: "Trace the rules the kernel holds now instead of the compiled ones.")
    var kernel = false

    @Option(help: ArgumentHelp("text or json.", valueName: "format"))
    var output: ReportFormat = .text

    @Argument(help: ArgumentHelp("The destination: IP:PORT[/tcp|udp|sctp], [IPv6]:PORT for IPv6.", valueName: "dst"))
    var destination: String

    func run() async throws {
        var options = try self.options.resolved()
        let logger = makeLogger(verbosity: options.v)
        // The back end the proxy itself picks on this host (`auto`: the one holding the rules).
        options.iptablesBackend = await chooseIPTablesBackend(options.iptablesBackend, logger: logger)
        let (dst, port, proto): (IPAddress, Int, TransportProtocol)
        do {
            (dst, port, proto) = try ProbePacket.parseDestination(destination)
        } catch {
            throw SluiceExit("\(error)")
        }
        var source: IPAddress?
        if let from {
            guard let s = IPAddress(from), s.family == dst.family else {
                throw SluiceExit("--from \"\(from)\" is not an address of the destination's family")
            }
            source = s
        }
        var loaded = try await loadDesiredState(options: options, logger: logger)
        // nftables mode: NodePorts answer on the primary node IPs unless --nodeport-addresses says otherwise.
        let node = nftablesNodeConfig(loaded.node, options: options)
        let state = loaded.tracker.snapshot(dst.family)
        let local = Set(LocalAddresses.current() + node.nodeIPs)
        let fromNode = source.map { local.contains($0) || $0.isLoopback } ?? true
        let packet = ProbePacket(source: source ?? node.nodeIPs.first { $0.family == dst.family }, fromNode: fromNode,
                                 destination: dst, port: port, proto: proto, inInterface: inInterface)
        var report = ExplainReport(packet: packet, mode: options.proxyMode.rawValue, rules: kernel ? "kernel" : "compiled",
                                   model: explainModel(packet, state: state, node: node, localAddresses: local,
                                                       localFallsBackToCluster: options.proxyMode == .ipvs))
        let tracer = try await makeTracer(options: options, node: node, family: dst.family, state: state, local: local)
        if let tracer {
            report.attach(tracer.trace(packet))
        } else {
            report.notes.append("no tracer for --proxy-mode \(options.proxyMode.rawValue) and this family: the endpoints and masquerade shown are the model's")
        }
        if options.proxyMode == .userspace && !report.model.hits.isEmpty {
            // The relay opens its own connection: the iptables-mode masquerade reasons do not apply.
            report.model.masquerade = true
            report.model.masqueradeReasons = ["userspace mode: the relay connects to the endpoint from the node, so the endpoint sees the node's address"]
            report.notes.append("userspace mode: relay ports in compiled rules are the dry run's stand-ins (a running proxy gets them from the kernel; --kernel shows those)")
        }
        switch output {
        case .json: FileHandle.standardOutput.write(Data((try report.json() + "\n").utf8))
        case .text: FileHandle.standardOutput.write(Data(report.text().utf8))
        }
    }

    private func makeTracer(options: ProxyOptions, node: NodeConfig, family: IPFamily, state: ProxyState,
                            local: Set<IPAddress>) async throws -> (any PacketTracer)? {
        switch options.proxyMode {
        case .iptables:
            let opts = await iptablesCompileOptions(options: options, node: node, family: family)
            if kernel {
                let checker = IPTablesDriftChecker(options: opts, tools: IPTablesTools(variant: options.iptablesBackend, family: family),
                                                   runner: ProcessRunner())
                do {
                    return IPTablesTracer(rules: try await checker.readKernel(), localAddresses: local)
                } catch {
                    throw SluiceExit("\(error)")
                }
            }
            return IPTablesTracer(compiled: IPTablesCompiler(options: opts).compile(state), localAddresses: local)
        case .ipvs:
            let o = IPVSOptions(node: node, family: family, scheduler: options.ipvsScheduler,
                                excludeCIDRs: (try? options.ipvsExcludeCIDRList()) ?? [])
            let desired = IPVSPlanner(options: o).desired(state, nodeAddresses: Array(local.filter { $0.family == family })).desired
            guard kernel else { return IPVSTracer.compiled(desired, localAddresses: local) }
            guard let checker = await makeIPVSDriftChecker(options: options, node: node, family: family) else {
                throw SluiceExit("--kernel: cannot open the IPVS, ipset or rtnetlink sockets (a kernel with IPVS and root are needed)")
            }
            do {
                return IPVSTracer.kernel(try await checker.readKernel(setNames: Set(desired.sets.map(\.name))), localAddresses: local)
            } catch {
                throw SluiceExit("\(error)")
            }
        case .userspace:
            guard let nodeIP = node.nodeIPs.first(where: { $0.family == .ipv4 }), family == .ipv4 else { return nil }
            guard kernel else { return UserspaceTracer.compiled(state: state, nodeName: node.nodeName, nodeIP: nodeIP, localAddresses: local) }
            let opts = await iptablesCompileOptions(options: options, node: node, family: family)
            let checker = IPTablesDriftChecker(options: opts, tools: IPTablesTools(variant: options.iptablesBackend, family: family),
                                               runner: ProcessRunner())
            do {
                return UserspaceTracer.make(rules: try await checker.readKernel(), plan: UserspacePlan(state: state, nodeName: node.nodeName),
                                            localAddresses: local)
            } catch {
                throw SluiceExit("\(error)")
            }
        case .nftables:
            let opts = NFTablesOptions(node: node, family: family, localAddresses: LocalAddresses.current().filter { $0.family == family })
            guard kernel else { return NFTablesTracer(compiled: NFTablesCompiler(options: opts).compile(state), localAddresses: local) }
            do {
                let reader = NFTablesKernelReader(family: NFTFamily(family), lib: try LibNFTables())
                guard let table = try reader.read() else {
                    throw SluiceExit("--kernel: the kernel holds no table \(NFTFamily(family).rawValue) \(kubeProxyTableName) (is sluice running in nftables mode?)")
                }
                return NFTablesTracer(table: table, localAddresses: local)
            } catch let e as SluiceExit {
                throw e
            } catch {
                throw SluiceExit("\(error)")
            }
        }
    }
}

/// The model as a sync would see it, read once from the configured source.
struct LoadedState {
    var node: NodeConfig
    var tracker: ChangeTracker
}

/// Reads the configured source (manifest directory or API server) up to its initial state.
func loadDesiredState(options: ProxyOptions, logger: Logger) async throws -> LoadedState {
    let plan = try await makeSource(options: options, logger: logger)
    var tracker = ChangeTracker(nodeName: plan.node.nodeName, serviceProxyName: options.serviceProxyName)
    do {
        for try await event in plan.events() {
            if event == .synced { break }
            if case .rejected(let r) = tracker.apply(event) { logger.error("\(r.description); skipped") }
        }
    } catch {
        throw SluiceExit("reading objects: \(error)")
    }
    return LoadedState(node: plan.node, tracker: tracker)
}

/// The iptables compiler options a running proxy would use on this host (random-fully from
/// the installed iptables, be_liberal from /proc, the local addresses, the nfacct objects that exist).
func iptablesCompileOptions(options: ProxyOptions, node: NodeConfig, family: IPFamily) async -> IPTablesOptions {
    let tools = IPTablesTools(variant: options.iptablesBackend, family: family)
    let randomFully = await RandomFullyMode.auto.resolve(tools, runner: ProcessRunner())
    let liberal = SysctlWriter.read("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal") == 1
    var opts = IPTablesOptions(node: node, family: family, randomFully: randomFully, conntrackTCPLiberal: liberal,
                               localAddresses: LocalAddresses.current().filter { $0.family == family })
    // The nfacct objects the running proxy counts into (it makes sure they exist at start-up):
    // their rules are part of the desired state.
    opts.nfacctCounters = await existingNFAcctCounters()
    return opts
}

/// What `sluice explain --output json` prints (docs/explain-diff.md).
struct ExplainReport: Codable {
    /// The format's version; fields are only ever added within a version.
    var version = 1
    var packet: ProbePacket
    var mode: String
    /// "compiled" or "kernel".
    var rules: String
    var model: ModelExplanation
    /// forwarded, unchanged, rejected, dropped, relayed; "mixed" when paths differ; "unknown" without a tracer.
    var verdict = "unknown"
    /// Masquerade on every path (true), on none (false), on some (nil).
    var masquerade: Bool?
    var paths: [TracePath] = []
    var notes: [String] = []

    init(packet: ProbePacket, mode: String, rules: String, model: ModelExplanation) {
        self.packet = packet
        self.mode = mode
        self.rules = rules
        self.model = model
        masquerade = model.masquerade
    }

    mutating func attach(_ trace: TraceResult) {
        // Ten decimals: the statistic match keeps 31 bits, so further digits are noise.
        func round(_ p: Double) -> Double { (p * 1e10).rounded() / 1e10 }
        paths = trace.paths.map { var p = $0; p.probability = round(p.probability); return p }
        notes += trace.notes
        let verdicts = Set(trace.paths.map(\.verdict.rawValue))
        verdict = verdicts.count == 1 ? verdicts.first! : (verdicts.isEmpty ? "unknown" : "mixed")
        let masq = Set(trace.paths.map(\.masquerade))
        masquerade = masq.count == 1 ? masq.first : nil
        let probs = trace.endpointProbabilities
        for i in model.endpoints.indices {
            model.endpoints[i].probability = round(probs[model.endpoints[i].address] ?? 0)
        }
        let known = Set(model.endpoints.map(\.address))
        for (ep, p) in probs.sorted(by: { $0.key < $1.key }) where !known.contains(ep) {
            notes.append("the rules send \(formatProbability(p)) of new connections to \(ep), which is not an endpoint of the matched Service port (the kernel differs from the desired state? see `sluice diff`)")
        }
        let expected: String
        if model.hits.isEmpty {
            expected = "unchanged"
        } else if let a = model.noEndpointsAction {
            expected = a.hasPrefix("REJECT") ? "rejected" : "dropped"
        } else if model.sourceRange?.hasPrefix("denied") == true {
            expected = "dropped"
        } else {
            expected = "forwarded"
        }
        if verdict != expected && verdict != "unknown" && !(expected == "forwarded" && verdict == "relayed") {
            notes.append("the desired state has this packet \(expected), the \(rules) rules leave it \(verdict)" + (rules == "kernel" ? ": the kernel differs from the desired state (see `sluice diff`)" : ""))
        }
        for e in model.endpoints where e.selected && (probs[e.address] ?? 0) == 0 && (verdict == "forwarded" || verdict == "relayed") {
            notes.append("the model selects \(e.address) but the rules never send a packet there")
        }
    }

    func json() throws -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try enc.encode(self), as: UTF8.self)
    }

    func text() -> String {
        var s = ""
        let src = packet.source.map { "\($0)" } ?? "the node"
        s += "Packet:     \(src) -> \(packet.destinationText) (\(packet.fromNode ? "sent by the node: nat OUTPUT" : "arriving at the node: nat PREROUTING"))\n"
        if model.hits.isEmpty {
            s += "Service:    none\n"
            if let n = model.noMatch { s += "            \(n)\n" }
        } else {
            for (i, h) in model.hits.enumerated() {
                s += (i == 0 ? "Service:    " : "also:       ") + "\(h.servicePort) \(h.proto), \(h.kind.rawValue) \(h.address)\n"
            }
        }
        if let p = model.trafficPolicy { s += "Policy:     \(p) (\(model.trafficPolicyReason ?? ""))\n" }
        if let t = model.topology, !model.hits.isEmpty { s += "Topology:   \(t)\n" }
        if let a = model.affinity { s += "Affinity:   \(a)\n" }
        if let r = model.sourceRange { s += "Source range: \(r)\n" }
        if !model.endpoints.isEmpty {
            s += "Endpoints:\n"
            for e in model.endpoints {
                let p = e.probability.map { formatProbability($0) } ?? "-"
                s += "  \(e.selected ? "in " : "out") \(e.address.padding(toLength: 22, withPad: " ", startingAt: 0)) \(p.padding(toLength: 8, withPad: " ", startingAt: 0)) \(e.reasons.joined(separator: "; "))\n"
            }
        } else if !model.hits.isEmpty {
            s += "Endpoints:  none\n"
        }
        if let n = model.noEndpointsAction { s += "No endpoint: \(n)\n" }
        if let m = masquerade {
            s += "Masquerade: \(m ? "yes" : "no")"
        } else {
            s += "Masquerade: on some paths"
        }
        s += model.masqueradeReasons.isEmpty ? "\n" : " (\(model.masqueradeReasons.joined(separator: "; ")))\n"
        s += "Verdict:    \(verdict)\n"
        if !paths.isEmpty {
            s += "Paths (\(mode), \(rules) rules):\n"
            for p in paths {
                var head = "  [\(formatProbability(p.probability))] \(p.verdict.rawValue)"
                if let e = p.endpoint { head += " to \(e)" }
                head += p.masquerade ? ", masqueraded" : ", source kept"
                s += head + "\n"
                for st in p.steps {
                    s += "      \(st.location): \(st.rule)\n          => \(st.action)\n"
                }
            }
        }
        for n in notes { s += "Note: \(n)\n" }
        return s
    }
}
