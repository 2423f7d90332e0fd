// Sluice test helper: one conntrack reconcile in the network namespace this process runs in
// (start it with `ip netns exec`), reporting what it did and how much memory it took.
//
//   conntrack-probe [--family ipv4|ipv6] [--collect] [--targeted-limit N]
//                   --frontend PROTO:IP:PORT=[EP[,EP...]] ...   (EP: IP:PORT, [IPv6]:PORT)
//                   --nodeport PROTO:PORT=[EP[,EP...]] ...
//
// Each frontend becomes one Service port whose endpoints are the listed ones (all ready).
// The reconcile is the first after start (every frontend is checked), through
// `ConntrackReconciler`, exactly as sluice runs it. With `--collect` it does not reconcile:
// it reads the same flows into an array first and judges them afterwards without deleting
// (the "collect everything" design the reconciler avoids), to compare memory.
//
// Prints one JSON object. Memory: the peak RSS mark is reset (`/proc/self/clear_refs`)
// after start-up, so `growth_kib` = peak during the work - resident size before it.

import Conntrack
import Foundation
import Logging
import SluiceCore

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("conntrack-probe: \(message)\n".utf8))
    exit(2)
}

func parseIPPort(_ text: String) -> IPPort? {
    var t = Substring(text)
    let ip: IPAddress?
    if t.hasPrefix("[") {
        guard let close = t.firstIndex(of: "]") else { return nil }
        ip = IPAddress(String(t[t.index(after: t.startIndex)..<close]))
        t = t[t.index(after: close)...]
    } else {
        guard let colon = t.lastIndex(of: ":") else { return nil }
        ip = IPAddress(String(t[..<colon]))
        t = t[colon...]
    }
    guard let ip, t.hasPrefix(":"), let port = UInt16(t.dropFirst()) else { return nil }
    return IPPort(ip, port)
}

func parseProto(_ text: Substring) -> TransportProtocol? {
    switch text.lowercased() {
    case "udp": return .udp
    case "tcp": return .tcp
    case "sctp": return .sctp
    default: return nil
    }
}

/// `VmRSS` / `VmHWM` of this process in KiB.
func status(_ key: String) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return -1 }
    for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? -1
    }
    return -1
}

var family = IPFamily.ipv4
var collect = false
var targetedLimit = 8
var state = ProxyState()
var args = CommandLine.arguments.dropFirst()
var n = 0
while let arg = args.popFirst() {
    switch arg {
    case "--family":
        guard let v = args.popFirst(), let f = IPFamily(rawValue: v == "ipv6" ? "IPv6" : v == "ipv4" ? "IPv4" : v) else {
            fail("--family wants ipv4 or ipv6")
        }
        family = f
    case "--collect":
        collect = true
    case "--targeted-limit":
        guard let v = args.popFirst(), let l = Int(v) else { fail("--targeted-limit wants a number") }
        targetedLimit = l
    case "--frontend", "--nodeport":
        guard let v = args.popFirst() else { fail("\(arg) wants a value") }
        let (lhs, rhs) = (v.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).first ?? "",
                          v.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).dropFirst().first ?? "")
        guard let colon = lhs.firstIndex(of: ":"), let proto = parseProto(lhs[..<colon]) else { fail("bad \(arg) \(v)") }
        let rest = String(lhs[lhs.index(after: colon)...])
        let endpoints = rhs.split(separator: ",").map { text -> EndpointInfo in
            guard let ep = parseIPPort(String(text)) else { fail("bad endpoint \(text)") }
            return EndpointInfo(ip: ep.ip, port: Int(ep.port))
        }
        n += 1
        let name = ServicePortName(service: NamespacedName(namespace: "probe", name: "svc\(n)"), port: "p", proto: proto)
        if arg == "--frontend" {
            guard let fe = parseIPPort(rest) else { fail("bad frontend \(rest)") }
            state.servicePorts[name] = ServicePortInfo(name: name, clusterIP: fe.ip, port: Int(fe.port), proto: proto)
        } else {
            guard let port = Int(rest) else { fail("bad node port \(rest)") }
            // The ClusterIP of a NodePort-only probe service: TEST-NET-1, nothing sends there.
            let cip = family == .ipv4 ? IPAddress("192.0.2.1")! : IPAddress("2001:db8::1")!
            state.servicePorts[name] = ServicePortInfo(name: name, clusterIP: cip, port: 9, proto: proto, nodePort: port)
        }
        state.endpoints[name] = endpoints.sorted()
    default:
        fail("unknown argument \(arg)")
    }
}
state.family = family

// Forget the start-up peak: from here on VmHWM is the peak of the work below.
try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)
let rssBefore = status("VmRSS")
let start = ContinuousClock.now
var fields: [(String, String)] = []

if collect {
    let table: ConntrackTable
    do {
        table = try ConntrackTable()
    } catch {
        fail("\(error)")
    }
    let map = FrontendMap.build(state, nodePortAddresses: [], localAddresses: [])
    var all: [ConntrackFlow] = []
    for f in map.frontends.keys.sorted() {
        let filter = DumpFilter(family: family, l4: f.l4, destination: f.ip, destinationPort: f.port)
        do {
            all += try await table.flows(matching: filter)
        } catch {
            fail("\(error)")
        }
    }
    var wouldDelete = 0
    for flow in all {
        if case .delete = map.verdict(for: flow) { wouldDelete += 1 }
    }
    fields = [("mode", "\"collect\""), ("read", "\(all.count)"), ("would_delete", "\(wouldDelete)")]
    withExtendedLifetime(all) {}
} else {
    var logger = Logger(label: "conntrack-probe")
    logger.logLevel = .warning
    let reconciler = ConntrackReconciler(
        configuration: .init(localAddresses: { [] }, targetedDumpLimit: targetedLimit), logger: logger)
    let report = await reconciler.reconcile(state)
    fields = [("mode", "\"stream\""), ("trigger", "\"\(report.trigger.rawValue)\""), ("frontends", "\(report.frontends)"),
              ("dumps", "\(report.dumps)"), ("read", "\(report.sweep.received)"), ("judged", "\(report.sweep.judged)"),
              ("deleted", "\(report.deleted)"), ("already_gone", "\(report.sweep.alreadyGone)"),
              ("errors", "\(report.errors)"), ("kernel_filter", report.kernelFiltered ? "true" : "false"),
              ("error_text", "\"\(report.sweep.errors.first.map { "\($0)" } ?? "")\"")]
}
let elapsed = ContinuousClock.now - start
let hwmAfter = status("VmHWM")
fields += [("duration_ms", "\(elapsed.components.seconds * 1000 + elapsed.components.attoseconds / 1_000_000_000_000_000)"),
           ("rss_before_kib", "\(rssBefore)"), ("hwm_after_kib", "\(hwmAfter)"), ("growth_kib", "\(hwmAfter - rssBefore)")]
print("{" + fields.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}")
