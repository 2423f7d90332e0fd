// Sluice test support: a throw-away network of Linux network namespaces on this host, with
// real backends, a real sluice process and a real client, for the kernel tests (the second tier
// of tests described in docs/architecture.md and the README's Tests section). Needs root, iproute2, iptables and /usr/bin/python3.
//
// Address plan (each pod has its own /24 of the cluster CIDR 10.244.0.0/16; the node
// namespace is the gateway of every link, and the only namespace that forwards):
//
//   namespace  interface  address                        node side
//   cli        eth0       10.244.1.10/24                 vcli  10.244.1.1/24
//   be<i>      eth0       10.244.<i+1>.10/24             vbe<i> 10.244.<i+1>.1/24   backend-<i> :8080/tcp :5353/udp :9090/tcp echo
//   ext        eth0       192.168.50.10/24, .20/24       vext  192.168.50.1/24 (the node IP; "outside")
//
// Pod namespaces route only 10.244.0.0/16 and 10.96.0.0/12 via the node (no default
// route: name lookups fail at once and nothing leaves). `ext` knows its own /24 plus the
// external-IP range 203.0.113.0/24 and the load-balancer range 198.51.100.0/24, both via
// the node IP, so a backend can answer it only when sluice masquerades. The node's default
// route points out of its "uplink" vext (as a real node's would): node-local clients can
// reach ClusterIPs, and traffic sluice does not translate is forwarded there (or dropped
// by its firewall rules).
//
// Every namespace name starts with `slt<pid>-<n>-`, so parallel test beds (and parallel
// test processes) never collide; `teardown()` kills every process by PID, deletes the
// namespaces (which removes links, addresses, routes, iptables and conntrack state) and
// the temporary directory. Namespaces left by a test process that died are reaped by the
// next test bed created.

import Foundation
import IPTables
#if canImport(Glibc)
import Glibc
import KernelKit
#endif

/// The address plan shared by every test bed (namespaces are isolated, so every bed uses
/// the same addresses).
public enum TestNet {
    /// The node name sluice runs as (`--hostname-override`), and endpoints' nodeName.
    public static let nodeName = "kt-node"
    /// The node's IP on its uplink (`--node-ip`).
    public static let nodeIP = "192.168.50.1"
    /// The pod CIDR (`--cluster-cidr`).
    public static let clusterCIDR = "10.244.0.0/16"
    /// The service CIDR (pods route it to the node).
    public static let serviceCIDR = "10.96.0.0/12"
    /// The client pod's address.
    public static let clientIP = "10.244.1.10"
    /// The node's address on the client's link.
    public static let clientGateway = "10.244.1.1"
    /// The external host's primary address (same /24 as the node IP).
    public static let extIP = "192.168.50.10"
    /// A second address of the external host, for source-range tests.
    public static let extIP2 = "192.168.50.20"
    /// Addresses in here are routed from `ext` to the node (for `spec.externalIPs`).
    public static let externalIPRange = "203.0.113.0/24"
    /// Addresses in here are routed from `ext` to the node (load-balancer ingress IPs).
    public static let loadBalancerRange = "198.51.100.0/24"
    /// The port every backend listens on for TCP.
    public static let backendTCPPort = 8080
    /// The port every backend listens on for UDP.
    public static let backendUDPPort = 5353
    /// The port every backend echoes TCP streams on (backend.py --echo-port).
    public static let backendEchoPort = 9090

    /// The address of backend `i` (1-based).
    public static func backendIP(_ i: Int) -> String { "10.244.\(i + 1).10" }
    /// The node's address on backend `i`'s link (what a masqueraded packet to it carries).
    public static func backendGateway(_ i: Int) -> String { "10.244.\(i + 1).1" }
    /// The name backend `i` answers with.
    public static func backendName(_ i: Int) -> String { "backend-\(i)" }

    // IPv6 (dual-stack test beds): the same plan under fd00::/16.
    /// The node's IPv6 address on the external link.
    public static let nodeIPv6 = "fd00:50::1"
    /// The pod CIDR, IPv6.
    public static let clusterCIDRv6 = "fd00:244::/32"
    /// The service CIDR, IPv6.
    public static let serviceCIDRv6 = "fd00:96::/112"
    /// The client pod's IPv6 address.
    public static let clientIPv6 = "fd00:244:1::10"
    /// The external host's IPv6 address.
    public static let extIPv6 = "fd00:50::10"
    /// Backend i's IPv6 address (1-based).
    public static func backendIPv6(_ i: Int) -> String { "fd00:244:\(i + 1)::10" }
}

/// A transport protocol for the client.
public enum ClientProtocol: String, Sendable {
    case tcp, udp
}

/// What `client.py` printed: one line per request.
public struct ClientResult: Sendable, CustomStringConvertible {
    /// The raw lines, in order.
    public var lines: [String]

    /// Wraps lines.
    public init(lines: [String]) {
        self.lines = lines
    }

    /// The complete lines a background client printed so far.
    public init(log process: BackgroundProcess) {
        let text = process.log()
        var lines = text.split(separator: "\n", omittingEmptySubsequences: true).map(String.init)
        if !text.hasSuffix("\n"), !lines.isEmpty { lines.removeLast() } // still being written
        self.lines = lines
    }

    /// The first word of each line: a backend name, REFUSED, TIMEOUT or ERROR.
    public var answers: [String] { lines.map { String($0.split(separator: " ").first ?? "") } }
    /// With `showSource`: the client address each backend saw (nil for non-answers).
    public var sources: [String?] {
        lines.map { line in
            let w = line.split(separator: " ")
            return w.count == 2 && w[0].hasPrefix("backend-") ? String(w[1]) : nil
        }
    }
    /// How often each backend answered.
    public var backendCounts: [String: Int] {
        answers.filter { $0.hasPrefix("backend-") }.reduce(into: [:]) { $0[$1, default: 0] += 1 }
    }
    /// The backends that answered.
    public var backends: Set<String> { Set(backendCounts.keys) }
    /// Requests answered by some backend.
    public var answered: Int { answers.filter { $0.hasPrefix("backend-") }.count }
    /// How many lines are exactly `word` (e.g. "REFUSED", "TIMEOUT").
    public func count(_ word: String) -> Int { answers.filter { $0 == word }.count }

    public var description: String {
        var counts: [String: Int] = [:]
        for a in answers { counts[a, default: 0] += 1 }
        return counts.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", ")
    }
}

/// A network of namespaces with backends, a node running sluice, a client and an external host.
public final class TestBed: @unchecked Sendable {
    /// What to build.
    public struct Options: Sendable {
        /// Number of backend pods (backend-1 ... backend-N), at most 200.
        public var backends: Int
        /// Build the external host namespace (and the node's uplink to it, which carries the
        /// node's default route; without it the node routes only its pod links).
        public var ext: Bool
        /// A label put into the namespace names (letters and digits, for humans reading `ip netns`).
        public var label: String
        /// Also give every link IPv6 addresses and routes, run a second backend process per pod
        /// on its IPv6 address, and start sluice with both node IPs and pod CIDRs (dual-stack).
        public var dualStack: Bool

        public init(backends: Int = 2, ext: Bool = true, label: String = "", dualStack: Bool = false) {
            self.backends = backends
            self.ext = ext
            self.label = label
            self.dualStack = dualStack
        }
    }

    /// The repository root (the directory holding Package.swift).
    public let packageRoot: String
    /// The sluice binary: `$SLUICE_BIN`, else `.build/debug/sluice` under the package root.
    public let sluiceBinary: String
    /// The Python interpreter (never a pyenv shim: those cost seconds per start).
    public let python = "/usr/bin/python3"
    /// `slt<pid>-<n>-<label>`: every namespace name starts with it.
    public let prefix: String
    /// The node namespace (sluice runs here).
    public let nodeNS: String
    /// The client pod namespace.
    public let clientNS: String
    /// Backend pod namespaces, index 0 = backend-1.
    public let backendNS: [String]
    /// The external host namespace ("" when not built).
    public let extNS: String
    /// Scratch directory (logs, manifests); removed by teardown.
    public let tempDir: String
    /// The directory sluice watches (`--manifests`).
    public let manifestDir: String

    private let options: Options
    private let lock = NSLock()
    private var createdNamespaces: [String] = []
    private var processes: [BackgroundProcess] = []
    private var sluiceProcess: BackgroundProcess?
    private var sluiceVariant: IPTablesVariant = .auto
    private var tornDown = false

    private static let counter = Counter()
    private let born = ContinuousClock.now
    /// `SLUICE_TESTBED_TRACE=1`: print each phase with its time on stderr.
    private static let tracing = ProcessInfo.processInfo.environment["SLUICE_TESTBED_TRACE"] == "1"

    /// Prints `message` with the time since the bed was created, when tracing.
    public func trace(_ message: @autoclosure () -> String) {
        guard TestBed.tracing else { return }
        let t = ContinuousClock.now - born
        FileHandle.standardError.write(Data("[\(prefix) \(String(format: "%7.3f", t.seconds))] \(message())\n".utf8))
    }

    /// Stale namespaces of dead test processes are removed once per process, before the first bed.
    private static let reapOnce: Void = { TestBed.reapStaleNamespaces() }()

    /// The temporary directory (`$TMPDIR` or /tmp), without a trailing slash.
    static var tmpRoot: String {
        var t = NSTemporaryDirectory()
        while t.count > 1 && t.hasSuffix("/") { t.removeLast() }
        return t
    }

    /// True when the process runs as root (the kernel tests need it).
    public static var isRoot: Bool { geteuid() == 0 }

    /// Builds the namespaces, links, addresses and routes and starts the backends. On
    /// failure everything made so far is removed before the error is thrown.
    public static func create(_ options: Options = .init(), filePath: String = #filePath) async throws -> TestBed {
        _ = reapOnce
        let bed = try TestBed(options: options, filePath: filePath)
        do {
            try await bed.buildNetwork()
            bed.trace("network built")
            try await bed.startBackends()
            bed.trace("backends ready")
        } catch {
            bed.teardown()
            throw error
        }
        return bed
    }

    /// Creates a test bed, runs `body` with it, and always tears it down afterwards.
    public static func with<T>(_ options: Options = .init(), filePath: String = #filePath,
                               _ body: (TestBed) async throws -> T) async throws -> T {
        let bed = try await create(options, filePath: filePath)
        defer { bed.teardown() }
        return try await body(bed)
    }

    private init(options: Options, filePath: String) throws {
        guard (1...200).contains(options.backends) else { throw TestBedError("backends must be 1...200") }
        self.options = options
        guard let root = TestBed.findPackageRoot(from: filePath) else {
            throw TestBedError("no Package.swift above \(filePath)")
        }
        packageRoot = root
        if let env = ProcessInfo.processInfo.environment["SLUICE_BIN"], !env.isEmpty {
            sluiceBinary = env.hasPrefix("/") ? env : FileManager.default.currentDirectoryPath + "/" + env
        } else {
            sluiceBinary = root + "/.build/debug/sluice"
        }
        let n = TestBed.counter.next()
        let label = options.label.filter { $0.isASCII && ($0.isLetter || $0.isNumber) }.prefix(12)
        let prefix = "\(TestBed.namePrefix)\(getpid())-\(n)-" + (label.isEmpty ? "" : "\(label)-")
        self.prefix = prefix
        nodeNS = prefix + "node"
        clientNS = prefix + "cli"
        backendNS = (1...options.backends).map { "\(prefix)be\($0)" }
        extNS = options.ext ? prefix + "ext" : ""
        var template = Array((TestBed.tmpRoot + "/\(prefix)XXXXXX").utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw TestBedError("cannot create a temporary directory: \(String(cString: strerror(errno)))")
        }
        tempDir = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        manifestDir = tempDir + "/manifests"
        try FileManager.default.createDirectory(atPath: manifestDir, withIntermediateDirectories: false)
    }

    /// Walks up from `filePath` to the first directory holding Package.swift.
    public static func findPackageRoot(from filePath: String) -> String? {
        var url = URL(fileURLWithPath: filePath).deletingLastPathComponent()
        while url.path != "/" {
            if FileManager.default.fileExists(atPath: url.appendingPathComponent("Package.swift").path) {
                return url.path
            }
            url.deleteLastPathComponent()
        }
        return nil
    }

    /// All namespaces of this bed.
    public var namespaces: [String] {
        [nodeNS, clientNS] + backendNS + (extNS.isEmpty ? [] : [extNS])
    }

    // MARK: - building

    private func addNamespace(_ ns: String) async throws {
        // Never adopt (and later delete) a namespace someone else made.
        guard !FileManager.default.fileExists(atPath: "/run/netns/\(ns)") else {
            throw TestBedError("network namespace \(ns) already exists")
        }
        lock.withLock { createdNamespaces.append(ns) }
        try await Subprocess.check(["ip", "netns", "add", ns])
    }

    /// Runs `ip -n NS -batch -` with `lines`.
    private func ipBatch(_ ns: String, _ lines: [String]) async throws {
        try await Subprocess.check(["ip", "-n", ns, "-batch", "-"], input: lines.joined(separator: "\n") + "\n")
    }

    private func buildNetwork() async throws {
        for ns in namespaces { try await addNamespace(ns) }
        // Forwarding and no ICMP redirects (every pod link is routed through the node, so a
        // hairpinned packet leaves on the interface it came in on). Per namespace: the host
        // is untouched. `default` first, so the veths made below inherit it.
        try await exec(checked: nodeNS, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                                         "net.ipv4.conf.default.send_redirects=0", "net.ipv4.conf.all.send_redirects=0"])
        var node = ["link set lo up"]
        var pods: [(ns: String, address: String, gateway: String)] = [(clientNS, TestNet.clientIP, TestNet.clientGateway)]
        node += ["link add vcli type veth peer name eth0 netns \(clientNS)",
                 "addr add \(TestNet.clientGateway)/24 dev vcli", "link set vcli up"]
        for (i, ns) in backendNS.enumerated() {
            let n = i + 1
            node += ["link add vbe\(n) type veth peer name eth0 netns \(ns)",
                     "addr add \(TestNet.backendGateway(n))/24 dev vbe\(n)", "link set vbe\(n) up"]
            pods.append((ns, TestNet.backendIP(n), TestNet.backendGateway(n)))
        }
        if !extNS.isEmpty {
            node += ["link add vext type veth peer name eth0 netns \(extNS)",
                     "addr add \(TestNet.nodeIP)/24 dev vext", "link set vext up",
                     "route add default dev vext"]
        }
        let v6 = options.dualStack
        if v6 {
            // The same links get IPv6: the node is fd00:244:<k>::1 on the link whose IPv4 is
            // 10.244.<k>.1. No duplicate-address detection, so addresses work at once.
            try await exec(checked: nodeNS, ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
            node.append("addr add fd00:244:1::1/64 dev vcli nodad")
            for i in backendNS.indices { node.append("addr add fd00:244:\(i + 2)::1/64 dev vbe\(i + 1) nodad") }
            if !extNS.isEmpty { node += ["addr add \(TestNet.nodeIPv6)/64 dev vext nodad", "route add ::/0 dev vext"] }
        }
        try await ipBatch(nodeNS, node)
        for (k, pod) in pods.enumerated() {
            var lines = ["link set lo up", "addr add \(pod.address)/24 dev eth0", "link set eth0 up",
                         "route add \(TestNet.clusterCIDR) via \(pod.gateway)",
                         "route add \(TestNet.serviceCIDR) via \(pod.gateway)"]
            if v6 {
                lines += ["addr add fd00:244:\(k + 1)::10/64 dev eth0 nodad",
                          "route add \(TestNet.clusterCIDRv6) via fd00:244:\(k + 1)::1",
                          "route add \(TestNet.serviceCIDRv6) via fd00:244:\(k + 1)::1"]
            }
            try await ipBatch(pod.ns, lines)
        }
        if !extNS.isEmpty {
            var lines = ["link set lo up",
                         "addr add \(TestNet.extIP)/24 dev eth0", "addr add \(TestNet.extIP2)/24 dev eth0",
                         "link set eth0 up",
                         "route add \(TestNet.externalIPRange) via \(TestNet.nodeIP)",
                         "route add \(TestNet.loadBalancerRange) via \(TestNet.nodeIP)"]
            if v6 { lines.append("addr add \(TestNet.extIPv6)/64 dev eth0 nodad") }
            try await ipBatch(extNS, lines)
        }
    }

    private func track(_ p: BackgroundProcess) {
        lock.withLock { processes.append(p) }
    }

    private func startBackends() async throws {
        let script = packageRoot + "/scripts/testbed/backend.py"
        var started: [BackgroundProcess] = []
        for (i, ns) in backendNS.enumerated() {
            let n = i + 1
            let p = try BackgroundProcess(
                name: TestNet.backendName(n),
                arguments: ["ip", "netns", "exec", ns, python, script, "--name", TestNet.backendName(n),
                            "--bind", TestNet.backendIP(n), "--tcp-port", "\(TestNet.backendTCPPort)",
                            "--udp-port", "\(TestNet.backendUDPPort)", "--echo-port", "\(TestNet.backendEchoPort)"],
                logPath: "\(tempDir)/\(TestNet.backendName(n)).log")
            track(p)
            started.append(p)
            if options.dualStack {
                let p6 = try BackgroundProcess(
                    name: TestNet.backendName(n) + "-v6",
                    arguments: ["ip", "netns", "exec", ns, python, script, "--name", TestNet.backendName(n),
                                "--bind", TestNet.backendIPv6(n), "--tcp-port", "\(TestNet.backendTCPPort)",
                                "--udp-port", "\(TestNet.backendUDPPort)"],
                    logPath: "\(tempDir)/\(TestNet.backendName(n))-v6.log")
                track(p6)
                started.append(p6)
            }
        }
        for p in started {
            let deadline = ContinuousClock.now + .seconds(10)
            while !p.log().split(separator: "\n").contains("ready") {
                guard p.isRunning else { throw TestBedError("\(p.name) exited before it was ready:\n\(p.logTail())") }
                guard ContinuousClock.now < deadline else { throw TestBedError("\(p.name) not ready after 10 s:\n\(p.logTail())") }
                try await Task.sleep(for: .milliseconds(20))
            }
        }
    }

    // MARK: - commands

    /// Runs `argv` inside namespace `ns` (`ip netns exec`).
    public func exec(_ ns: String, _ argv: [String], input: String? = nil, timeout: Duration = .seconds(60)) async -> CommandOutput {
        await Subprocess.run(["ip", "netns", "exec", ns] + argv, input: input, timeout: timeout)
    }

    /// Runs `argv` inside `ns` and throws when it fails.
    @discardableResult
    public func exec(checked ns: String, _ argv: [String], input: String? = nil, timeout: Duration = .seconds(60)) async throws -> CommandOutput {
        let r = await exec(ns, argv, input: input, timeout: timeout)
        guard r.succeeded else { throw TestBedError("command failed in \(ns): \(r)") }
        return r
    }

    /// Runs `client.py` in `ns` and returns what it printed.
    public func request(from ns: String, _ proto: ClientProtocol, _ target: String, count: Int = 1,
                        timeout: Double = 2, showSource: Bool = false, sourceIP: String? = nil) async throws -> ClientResult {
        var argv = [python, packageRoot + "/scripts/testbed/client.py", "--proto", proto.rawValue, "--target", target,
                    "--count", "\(count)", "--timeout", "\(timeout)"]
        if showSource { argv.append("--show-source") }
        if let sourceIP { argv += ["--source-ip", sourceIP] }
        let limit = Duration.seconds(Double(count) * (timeout + 1) + 15)
        trace("client \(proto.rawValue) \(target) x\(count) from \(ns)")
        let r = await exec(ns, argv, timeout: limit)
        trace("client done")
        guard r.succeeded else { throw TestBedError("client.py failed in \(ns): \(r)") }
        let lines = r.stdout.split(separator: "\n").map(String.init)
        guard lines.count == count else {
            throw TestBedError("client.py printed \(lines.count) lines for \(count) requests:\n\(r.stdout)\(r.stderr)")
        }
        return ClientResult(lines: lines)
    }

    /// Sends single requests every `interval` until one is answered by a backend; returns the
    /// time that took, or nil after `within`.
    public func waitUntilAnswered(from ns: String, _ proto: ClientProtocol, _ target: String, within: Duration,
                                  interval: Duration = .milliseconds(200), requestTimeout: Double = 1) async throws -> Duration? {
        let start = ContinuousClock.now
        while ContinuousClock.now - start < within {
            let r = try await request(from: ns, proto, target, count: 1, timeout: requestTimeout)
            if r.answered == 1 { return ContinuousClock.now - start }
            try await Task.sleep(for: interval)
        }
        return nil
    }

    /// Starts `argv` inside `ns` in the background, its output in a log file of the bed;
    /// it is stopped at teardown at the latest.
    public func startBackground(in ns: String, name: String, _ argv: [String]) throws -> BackgroundProcess {
        let p = try BackgroundProcess(name: name, arguments: ["ip", "netns", "exec", ns] + argv,
                                      logPath: "\(tempDir)/\(name)-\(Counter.shared.next()).log")
        track(p)
        return p
    }

    /// Starts `client.py` in the background: `count` requests, `interval` seconds apart (one
    /// socket for all UDP datagrams with `sameSocket`). Read its lines with `ClientResult(log:)`.
    public func startClient(from ns: String, _ proto: ClientProtocol, _ target: String, count: Int, interval: Double,
                            timeout: Double = 1, sameSocket: Bool = false) throws -> BackgroundProcess {
        var argv = [python, packageRoot + "/scripts/testbed/client.py", "--proto", proto.rawValue, "--target", target,
                    "--count", "\(count)", "--timeout", "\(timeout)", "--interval", "\(interval)"]
        if sameSocket { argv.append("--same-socket") }
        trace("background client \(proto.rawValue) \(target) x\(count) every \(interval) s from \(ns)")
        return try startBackground(in: ns, name: "client", argv)
    }

    /// `conntrack ARGS` in the node namespace (its stdout; the tool's notes go to stderr).
    public func conntrack(_ args: [String]) async throws -> String {
        try await exec(checked: nodeNS, ["conntrack"] + args).stdout
    }

    // MARK: - manifests

    /// Writes (or replaces) `name` in the manifest directory atomically (a temporary dot
    /// file, which the source ignores, renamed into place).
    public func writeManifest(_ name: String, _ text: String) throws {
        let tmp = "\(manifestDir)/.\(name).tmp"
        try Data(text.utf8).write(to: URL(fileURLWithPath: tmp))
        guard rename(tmp, "\(manifestDir)/\(name)") == 0 else {
            throw TestBedError("rename \(tmp): \(String(cString: strerror(errno)))")
        }
    }

    /// Deletes `name` from the manifest directory.
    public func removeManifest(_ name: String) throws {
        try FileManager.default.removeItem(atPath: "\(manifestDir)/\(name)")
    }

    // MARK: - sluice

    /// The running (or last) sluice process.
    public var sluice: BackgroundProcess? { lock.withLock { sluiceProcess } }

    /// The iptables back end sluice was started with.
    public var variant: IPTablesVariant { lock.withLock { sluiceVariant } }

    /// The arguments sluice runs with in the node namespace.
    public func sluiceArguments(variant: IPTablesVariant = .auto, syncPeriod: String = "10m",
                                extra: [String] = []) -> [String] {
        ["--proxy-mode", "iptables", "--manifests", manifestDir, "--hostname-override", TestNet.nodeName,
         "--node-ip", options.dualStack ? "\(TestNet.nodeIP),\(TestNet.nodeIPv6)" : TestNet.nodeIP,
         "--cluster-cidr", options.dualStack ? "\(TestNet.clusterCIDR),\(TestNet.clusterCIDRv6)" : TestNet.clusterCIDR,
         "--iptables-backend", variant.rawValue,
         "--min-sync-period", "1s", "--sync-period", syncPeriod] + extra
    }

    /// Starts sluice in the node namespace. The default sync period is long so that no
    /// periodic resync hides a missing reaction (tests that need one pass their own).
    @discardableResult
    /// `environment` is added to sluice's environment (through `env`).
    public func startSluice(variant: IPTablesVariant = .auto, syncPeriod: String = "10m",
                            extra: [String] = [], environment: [String: String] = [:]) throws -> BackgroundProcess {
        guard FileManager.default.isExecutableFile(atPath: sluiceBinary) else {
            throw TestBedError("sluice binary \(sluiceBinary) not found: run `swift build` or set SLUICE_BIN")
        }
        if let old = sluice, old.isRunning { throw TestBedError("sluice is already running (pid \(old.pid))") }
        let n = lock.withLock { processes.filter { $0.name == "sluice" }.count }
        let p = try BackgroundProcess(
            name: "sluice",
            arguments: ["ip", "netns", "exec", nodeNS]
                + (environment.isEmpty ? [] : ["env"] + environment.keys.sorted().map { "\($0)=\(environment[$0]!)" })
                + [sluiceBinary] + sluiceArguments(variant: variant, syncPeriod: syncPeriod, extra: extra),
            logPath: "\(tempDir)/sluice-\(n).log")
        track(p)
        lock.withLock {
            sluiceProcess = p
            sluiceVariant = variant
        }
        return p
    }

    /// Sends SIGTERM to sluice and waits up to `timeout` for it to exit; returns the exit
    /// status (nil when it did not exit in time).
    public func stopSluice(timeout: Duration = .seconds(10)) async -> Int32? {
        guard let p = sluice else { return nil }
        p.send(SIGTERM)
        return await p.waitForExit(timeout: timeout)
    }

    /// Runs `sluice ARGS` (e.g. `--cleanup`) to completion in the node namespace.
    public func runSluice(_ args: [String], timeout: Duration = .seconds(60)) async -> CommandOutput {
        await exec(nodeNS, [sluiceBinary] + args, timeout: timeout)
    }

    /// sluice's output so far ("" when it never ran).
    public var sluiceLog: String { sluice?.log() ?? "" }

    // MARK: - iptables state

    /// The `*-save` tool of a back end.
    public static func saveTool(_ variant: IPTablesVariant) -> String {
        IPTablesTools(variant: variant, family: .ipv4).save
    }

    /// The `iptables` tool of a back end.
    public static func iptablesTool(_ variant: IPTablesVariant) -> String {
        IPTablesTools(variant: variant, family: .ipv4).iptables
    }

    /// `<save> [-c] [-t table]` in the node namespace, for the given back end (default: the
    /// one sluice runs with). `table` nil lists only the tables that exist, which never
    /// instantiates a table (use it to look at the other back end).
    public func save(_ table: Table? = .nat, variant: IPTablesVariant? = nil, counters: Bool = false) async throws -> String {
        var argv = [TestBed.saveTool(variant ?? self.variant)]
        if counters { argv.append("-c") }
        if let table { argv += ["-t", table.rawValue] }
        return try await exec(checked: nodeNS, argv).stdout
    }

    /// Runs the back end's `iptables ARGS` in the node namespace.
    public func iptables(_ args: [String], variant: IPTablesVariant? = nil) async -> CommandOutput {
        await exec(nodeNS, [TestBed.iptablesTool(variant ?? self.variant)] + args)
    }

    /// Polls `table` (every 100 ms, up to `timeout`) until `condition` holds; returns the
    /// table text. Throws with sluice's log when it does not, or when sluice exits.
    @discardableResult
    public func waitForRules(_ table: Table = .nat, timeout: Duration = .seconds(10), _ what: String,
                             until condition: (String) -> Bool) async throws -> String {
        let deadline = ContinuousClock.now + timeout
        var last = ""
        trace("waiting for \(what)")
        while true {
            last = try await save(table)
            if condition(last) {
                trace("rules there")
                return last
            }
            if let p = sluice, !p.isRunning {
                throw TestBedError("sluice exited (status \(p.exitStatus ?? -1)) before \(what):\n\(p.logTail())")
            }
            guard ContinuousClock.now < deadline else { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw TestBedError("\(what): not there after \(timeout)\n--- \(table.rawValue) table ---\n\(last)\n--- sluice log ---\n\(sluice?.logTail() ?? "")")
    }

    /// Waits until the nat table holds a KUBE-SERVICES rule whose comment names every given
    /// service port (`ns/name:port`), i.e. until sluice programmed them.
    @discardableResult
    public func waitForServices(_ servicePorts: [String], timeout: Duration = .seconds(10)) async throws -> String {
        try await waitForRules(.nat, timeout: timeout, "rules for \(servicePorts.joined(separator: ", "))") { text in
            servicePorts.allSatisfy { sp in
                text.split(separator: "\n").contains { $0.hasPrefix("-A KUBE-SERVICES ") && $0.contains("--comment \"\(sp) ") }
            }
        }
    }

    // MARK: - teardown

    /// Stops every process, deletes the namespaces and the scratch directory. Idempotent,
    /// synchronous (usable from `defer`), and never touches anything it did not create.
    public func teardown() {
        let (procs, nss) = lock.withLock { () -> ([BackgroundProcess], [String]) in
            if tornDown { return ([], []) }
            tornDown = true
            return (processes, createdNamespaces)
        }
        if procs.isEmpty && nss.isEmpty && !FileManager.default.fileExists(atPath: tempDir) { return }
        trace("teardown")
        for p in procs { p.send(SIGTERM) }
        for p in procs {
            let status = p.stop(grace: .seconds(3))
            trace("\(p.name) (pid \(p.pid)) stopped: \(status.map(String.init) ?? "still running")")
        }
        trace("processes stopped")
        for ns in nss { TestBed.killProcesses(in: ns) }
        trace("namespaces empty")
        for ns in nss where FileManager.default.fileExists(atPath: "/run/netns/\(ns)") {
            let r = Subprocess.runBlocking(["ip", "netns", "del", ns], timeout: .seconds(20))
            if !r.succeeded { FileHandle.standardError.write(Data("TestBed teardown: \(r)\n".utf8)) }
        }
        try? FileManager.default.removeItem(atPath: tempDir)
        trace("teardown done")
    }

    /// Kills (SIGKILL, by PID) whatever still runs inside `ns`: clients that outlived a
    /// failed test, children of our backends.
    static func killProcesses(in ns: String) {
        for _ in 0..<3 {
            let r = Subprocess.runBlocking(["ip", "netns", "pids", ns], timeout: .seconds(10))
            let pids = r.stdout.split(whereSeparator: \.isWhitespace).compactMap { Int32($0) }
            if pids.isEmpty { return }
            for pid in pids where pid != getpid() { kill(pid, SIGKILL) }
            usleep(50_000)
        }
    }

    /// `slt`, or `sltu` inside user-mode Linux (`UML_RUN=1`): the guest shares the host's /tmp
    /// but not its process IDs, so each side reaps only names of its own kind.
    static let namePrefix = ProcessInfo.processInfo.environment["UML_RUN"] == "1" ? "sltu" : "slt"

    /// Deletes namespaces `slt<pid>-...` whose test process no longer exists (a test run
    /// killed before its teardown ran).
    static func reapStaleNamespaces() {
        /// True for `slt<pid>-...` (`sltu<pid>-...` in the guest) when process <pid> is gone.
        func stale(_ name: String) -> Bool {
            let tag = TestBed.namePrefix
            guard name.hasPrefix(tag) else { return false }
            let digits = name.dropFirst(tag.count).prefix { $0.isNumber }
            guard let pid = Int32(digits), name.dropFirst(tag.count + digits.count).hasPrefix("-"), pid != getpid() else { return false }
            return kill(pid, 0) != 0 && errno == ESRCH
        }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
        for name in names where stale(name) {
            killProcesses(in: name)
            _ = Subprocess.runBlocking(["ip", "netns", "del", name], timeout: .seconds(20))
        }
        let tmp = TestBed.tmpRoot
        for name in (try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? [] where stale(name) {
            try? FileManager.default.removeItem(atPath: tmp + "/" + name)
        }
    }

    deinit { teardown() }
}

/// A process-wide counter for unique names.
final class Counter: @unchecked Sendable {
    /// For names that only need to be unique in the process.
    static let shared = Counter()
    private let lock = NSLock()
    private var value = 0
    func next() -> Int {
        lock.withLock {
            value += 1
            return value
        }
    }
}
