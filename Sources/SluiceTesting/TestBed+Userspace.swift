// Sluice test support: the userspace mode on the test bed -- starting sluice in that mode,
// waiting for its portal rules, reading relay ports back, stopping a backend, and running
// scripts/testbed/relaytest.py (half-close, concurrency, long-lived connections).

import Foundation
import IPTables
import Userspace
#if canImport(Glibc)
import Glibc
#endif

extension TestBed {
    /// Starts sluice with `--proxy-mode userspace` (the later flag wins over the default
    /// arguments' `--proxy-mode iptables`).
    @discardableResult
    public func startUserspaceSluice(udpTimeout: String? = nil, syncPeriod: String = "10m",
                                     extra: [String] = []) throws -> BackgroundProcess {
        var args = ["--proxy-mode", "userspace"]
        if let udpTimeout { args += ["--udp-timeout", udpTimeout] }
        return try startSluice(syncPeriod: syncPeriod, extra: args + extra)
    }

    /// Waits until KUBE-PORTALS-CONTAINER holds a rule for every given service port
    /// (`ns/name:port`); returns the nat table.
    @discardableResult
    public func waitForPortals(_ servicePorts: [String], timeout: Duration = .seconds(10)) async throws -> String {
        try await waitForRules(.nat, timeout: timeout, "portal rules for \(servicePorts.joined(separator: ", "))") { text in
            servicePorts.allSatisfy { sp in
                text.split(separator: "\n").contains { $0.hasPrefix("-A \(Chain.portalsContainer) ") && $0.contains("--comment \"\(sp)\"") }
            }
        }
    }

    /// The relay port the portal rules send `servicePort` (`ns/name:port`) to, read from `nat`.
    public static func relayPort(in nat: String, for servicePort: String) -> Int? {
        for line in nat.split(separator: "\n") where line.hasPrefix("-A \(Chain.portalsContainer) ") && line.contains("--comment \"\(servicePort)\"") {
            if let r = line.range(of: "--to-ports ") { return Int(line[r.upperBound...].prefix { $0.isNumber }) }
        }
        return nil
    }

    /// How many syncs sluice has logged so far (full and partial).
    public var syncCount: Int {
        sluiceLog.split(separator: "\n").filter { $0.contains(" sync: ") && $0.contains("service ports") }.count
    }

    /// Waits until sluice has logged more than `count` syncs (see `syncCount`).
    public func waitForSyncs(after count: Int, timeout: Duration = .seconds(10)) async throws {
        let deadline = ContinuousClock.now + timeout
        while syncCount <= count {
            if let p = sluice, !p.isRunning { throw TestBedError("sluice exited:\n\(p.logTail())") }
            guard ContinuousClock.now < deadline else {
                throw TestBedError("no sync after \(count) within \(timeout):\n\(sluice?.logTail() ?? "")")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    /// Kills backend `i`'s processes (1-based): its address stays, nothing listens any more,
    /// so connections to it are refused.
    public func stopBackend(_ i: Int) {
        TestBed.killProcesses(in: backendNS[i - 1])
    }

    /// Runs `relaytest.py MODE --target TARGET ARGS` in `ns` and returns its output lines.
    public func relayTest(from ns: String, _ mode: String, _ target: String, _ args: [String] = [],
                          timeout: Duration = .seconds(90)) async throws -> [String] {
        let argv = [python, packageRoot + "/scripts/testbed/relaytest.py", mode, "--target", target] + args
        let r = await exec(ns, argv, timeout: timeout)
        guard r.succeeded else { throw TestBedError("relaytest.py \(mode) failed in \(ns): \(r)") }
        return r.stdout.split(separator: "\n").map(String.init)
    }

    /// Starts `relaytest.py hold` in `ns` against `target`, writing its output to a log; the
    /// connection is established once the log says `connected`, and is tested again when
    /// the returned trigger file is created.
    public func startHold(from ns: String, _ target: String, label: String) throws -> (process: BackgroundProcess, trigger: String) {
        let trigger = "\(tempDir)/\(label).go"
        let p = try BackgroundProcess(
            name: "hold-\(label)",
            arguments: ["ip", "netns", "exec", ns, python, packageRoot + "/scripts/testbed/relaytest.py", "hold",
                        "--target", target, "--trigger", trigger, "--timeout", "10"],
            logPath: "\(tempDir)/hold-\(label).log")
        return (p, trigger)
    }

    /// Tries to bind `port` (TCP with listen, or UDP) in the node namespace from another
    /// process, with SO_REUSEADDR; returns `OK` or the errno name (e.g. `EADDRINUSE`).
    public func tryBind(_ proto: ClientProtocol, port: Int) async throws -> String {
        let script = """
            import errno, socket, sys
            kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(socket.AF_INET, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", int(sys.argv[2])))
                if kind == socket.SOCK_STREAM:
                    s.listen(1)
                print("OK")
            except OSError as e:
                print(errno.errorcode.get(e.errno, str(e.errno)))
            """
        let r = try await exec(checked: nodeNS, [python, "-c", script, proto.rawValue, "\(port)"])
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
