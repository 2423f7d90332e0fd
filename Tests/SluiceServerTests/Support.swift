// Test helpers: a plain-socket HTTP client (so the servers are exercised over real TCP), a
// Prometheus text parser, a scriptable backend and a settable wall clock.

import Foundation
import SluiceCore
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// One HTTP response as a client sees it.
struct HTTPResult: Sendable {
    var status: Int
    /// Header fields, names lower-cased.
    var headers: [String: String]
    var body: String
}

struct HTTPClientError: Error, CustomStringConvertible {
    var description: String
}

/// Sends `GET path` to 127.0.0.1:`port` over a new TCP connection and reads the whole answer.
/// The blocking socket work runs on its own thread, off the cooperative pool.
func httpGet(port: Int, path: String, method: String = "GET") async throws -> HTTPResult {
    try await withCheckedThrowingContinuation { (c: CheckedContinuation<HTTPResult, Error>) in
        let thread = Thread { c.resume(with: Result { try blockingRequest(port: port, path: path, method: method) }) }
        thread.start()
    }
}

/// Whether a TCP connection to 127.0.0.1:`port` is refused (nothing listens).
func connectionRefused(port: Int) async -> Bool {
    await withCheckedContinuation { (c: CheckedContinuation<Bool, Never>) in
        let thread = Thread {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var addr = loopback(port: port)
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            c.resume(returning: rc != 0 && errno == ECONNREFUSED)
        }
        thread.start()
    }
}

private func loopback(port: Int) -> sockaddr_in {
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return addr
}

private func blockingRequest(port: Int, path: String, method: String) throws -> HTTPResult {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw HTTPClientError(description: "socket: errno \(errno)") }
    defer { close(fd) }
    // A safety net so a broken server fails the test instead of hanging it; not a timing assertion.
    var timeout = timeval(tv_sec: 30, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var addr = loopback(port: port)
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard rc == 0 else { throw HTTPClientError(description: "connect to port \(port): errno \(errno)") }
    let request = Array("\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: close\r\n\r\n".utf8)
    var sent = 0
    while sent < request.count {
        let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        guard n > 0 else { throw HTTPClientError(description: "send: errno \(errno)") }
        sent += n
    }
    var data: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n == 0 { break }
        guard n > 0 else { throw HTTPClientError(description: "recv: errno \(errno)") }
        data += chunk[0..<n]
    }
    let text = String(decoding: data, as: UTF8.self)
    guard let split = text.range(of: "\r\n\r\n") else { throw HTTPClientError(description: "no header end in \(text)") }
    let lines = text[..<split.lowerBound].components(separatedBy: "\r\n")
    let statusParts = lines[0].split(separator: " ")
    guard statusParts.count >= 2, let status = Int(statusParts[1]) else { throw HTTPClientError(description: "bad status line \(lines[0])") }
    var headers: [String: String] = [:]
    for line in lines.dropFirst() {
        guard let colon = line.firstIndex(of: ":") else { continue }
        headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
    return HTTPResult(status: status, headers: headers, body: String(text[split.upperBound...]))
}

/// A TCP port nothing listens on right now (bound to port 0 and released).
func freePort() throws -> Int { try freePorts(1)[0] }

/// `count` distinct TCP ports nothing listens on right now: all are held at once, then released.
func freePorts(_ count: Int) throws -> [Int] {
    var fds: [Int32] = []
    defer { for fd in fds { close(fd) } }
    var ports: [Int] = []
    for _ in 0..<count {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        fds.append(fd)
        var addr = loopback(port: 0)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { throw HTTPClientError(description: "bind: errno \(errno)") }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        ports.append(Int(UInt16(bigEndian: bound.sin_port)))
    }
    return ports
}

/// A parsed Prometheus text exposition.
struct Scrape {
    struct Sample {
        var name: String
        var labels: [String: String]
        var value: Double
    }

    /// `# TYPE` by metric family.
    var types: [String: String] = [:]
    /// `# HELP` by metric family.
    var help: [String: String] = [:]
    var samples: [Sample] = []

    /// Parses `text`; records an issue for any line it does not understand.
    init(_ text: String) {
        for line in text.split(separator: "\n").map(String.init) {
            if line.hasPrefix("# TYPE ") {
                let parts = line.split(separator: " ")
                if parts.count == 4 { types[String(parts[2])] = String(parts[3]) } else { Issue.record("bad TYPE line: \(line)") }
                continue
            }
            if line.hasPrefix("# HELP ") {
                let rest = line.dropFirst(7)
                if let space = rest.firstIndex(of: " ") { help[String(rest[..<space])] = String(rest[rest.index(after: space)...]) }
                continue
            }
            if line.hasPrefix("#") { continue }
            guard let sample = Scrape.parseSample(line) else {
                Issue.record("bad sample line: \(line)")
                continue
            }
            samples.append(sample)
        }
    }

    private static func parseSample(_ line: String) -> Sample? {
        var labels: [String: String] = [:]
        let name: String
        let rest: Substring
        if let brace = line.firstIndex(of: "{") {
            name = String(line[..<brace])
            guard let close = line.lastIndex(of: "}") else { return nil }
            var s = line[line.index(after: brace)..<close]
            while !s.isEmpty {
                guard let eq = s.firstIndex(of: "="), s[s.index(after: eq)] == "\"" else { return nil }
                let key = String(s[..<eq])
                let valueStart = s.index(eq, offsetBy: 2)
                guard let end = s[valueStart...].firstIndex(of: "\"") else { return nil }
                labels[key] = String(s[valueStart..<end])
                s = s[s.index(after: end)...]
                if s.first == "," { s = s.dropFirst() }
            }
            rest = line[line.index(after: close)...]
        } else {
            guard let space = line.firstIndex(of: " ") else { return nil }
            name = String(line[..<space])
            rest = line[space...]
        }
        let valueText = rest.trimmingCharacters(in: .whitespaces)
        guard let value = valueText == "+Inf" ? Double.infinity : Double(valueText) else { return nil }
        return Sample(name: name, labels: labels, value: value)
    }

    /// The value of the sample with exactly these labels.
    func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        samples.first { $0.name == name && $0.labels == labels }?.value
    }

    /// A histogram's buckets in order: (`le` text, cumulative count).
    func buckets(_ name: String) -> [(le: String, count: Double)] {
        samples.filter { $0.name == name + "_bucket" }.map { ($0.labels["le"] ?? "?", $0.value) }
    }

    /// The cumulative count of the bucket whose bound equals `le`.
    func bucket(_ name: String, le: Double) -> Double? {
        buckets(name).first { Double($0.le) == le }?.count
    }
}

/// A backend that records syncs, reports rule counts, can fail, and can make time pass on
/// a manual clock while it "works".
actor ScriptedBackend: ProxyBackend {
    nonisolated let name = "scripted"
    private(set) var syncs: [(full: Bool, ports: Int)] = []
    private var failuresLeft = 0
    private var work: (@Sendable () -> Void)?
    var report = SyncReport(full: true, written: [.iptablesRules(.filter): 4, .iptablesRules(.nat): 10], total: [.iptablesRules(.filter): 5, .iptablesRules(.nat): 12])

    func failNext(_ n: Int) { failuresLeft = n }
    /// Runs `body` inside every sync (e.g. to advance a manual clock).
    func whileSyncing(_ body: @escaping @Sendable () -> Void) { work = body }
    func setReport(_ r: SyncReport) { report = r }

    func sync(_ state: ProxyState, kind: SyncKind) async throws -> SyncReport {
        let full = kind.isFull
        work?()
        if failuresLeft > 0 {
            failuresLeft -= 1
            struct InjectedFailure: Error, CustomStringConvertible {
                var description: String { "injected restore failure" }
            }
            throw InjectedFailure()
        }
        syncs.append((full, state.servicePorts.count))
        var r = report
        r.full = full
        return r
    }

    func externalChangeDetected() async -> Bool { false }
}

/// A wall clock a test sets by hand.
final class SettableWallClock: Sendable {
    private let now: Mutex<Duration>

    init(_ start: Duration) { now = Mutex(start) }

    func read() -> Duration { now.withLock { $0 } }
    func advance(by d: Duration) { now.withLock { $0 += d } }
}

/// RFC 3339 text of a time since the Unix epoch (UTC, whole seconds or milliseconds).
func rfc3339(_ d: Duration) -> String {
    let secs = d.components.seconds
    let millis = d.components.attoseconds / 1_000_000_000_000_000
    let date = Date(timeIntervalSince1970: TimeInterval(secs))
    let f = DateFormatter()
    f.locale = Locale(identifier: "en_US_POSIX")
    f.timeZone = TimeZone(identifier: "UTC")
    f.dateFormat = "yyyy-MM-dd'T'HH:mm:ss"
    let frac = millis == 0 ? "" : "." + String(format: "%03d", millis)
    return f.string(from: date) + frac + "Z"
}
