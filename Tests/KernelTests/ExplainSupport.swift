// Shared pieces of the explain/diff kernel tests of every mode: the part of
// `sluice explain --output json` they read, running explain, the check of explain's answer
// against real packets, and reading the proxy's metrics.

import Foundation
import SluiceTesting
import Testing

/// The part of `sluice explain --output json` the kernel tests read (docs/explain-diff.md).
struct ExplainJSON: Decodable {
    struct Model: Decodable {
        struct Endpoint: Decodable {
            var address: String
            var selected: Bool
            var probability: Double?
        }
        struct Hit: Decodable {
            var servicePort: String
            var kind: String
        }
        var endpoints: [Endpoint]
        var hits: [Hit]
        var affinity: String?
    }
    struct Step: Decodable {
        var location: String
        var rule: String
        var action: String
    }
    struct Path: Decodable {
        var verdict: String
        var endpoint: String?
        var masquerade: Bool
        var probability: Double
        var steps: [Step]
    }
    var verdict: String
    var masquerade: Bool?
    var model: Model
    var paths: [Path]
    var notes: [String]

    /// The test backends a path reaches (any verdict).
    var reached: Set<String> {
        Set(paths.compactMap { p in
            (1...4).first { p.endpoint?.hasPrefix(TestNet.backendIP($0) + ":") == true }.map(TestNet.backendName)
        })
    }

    /// The test backends forwarded to with a positive probability.
    var backends: Set<String> {
        Set(paths.filter { $0.verdict == "forwarded" && $0.probability > 0 }.compactMap { p in
            (1...4).first { p.endpoint?.hasPrefix(TestNet.backendIP($0) + ":") == true }.map(TestNet.backendName)
        })
    }

    /// Decodes explain's output, naming it when it is not the documented JSON.
    static func decode(_ out: CommandOutput) throws -> ExplainJSON {
        guard out.succeeded else { throw TestBedError("sluice explain failed: \(out)") }
        do {
            return try JSONDecoder().decode(ExplainJSON.self, from: Data(out.stdout.utf8))
        } catch {
            throw TestBedError("explain printed unreadable JSON (\(error)):\n\(out.stdout)")
        }
    }
}

extension TestBed {
    /// `sluice explain` of the running proxy's sources in the node namespace: `mode` are the
    /// mode flags (empty for iptables), `from` the source (nil: from the node itself),
    /// `kernel` whether to walk the kernel's rules instead of the compiled ones.
    func explain(_ mode: [String] = [], from: String?, _ dst: String, kernel: Bool) async throws -> ExplainJSON {
        var args = ["explain"] + sluiceArguments() + mode + ["--output", "json"]
        if let from { args += ["--from", from] }
        if kernel { args.append("--kernel") }
        return try ExplainJSON.decode(await runSluice(args + [dst]))
    }

    /// The value of the first series of `name` (whose line also satisfies `matching`) on the
    /// proxy's metrics endpoint, 127.0.0.1:10249 in the node namespace; nil when absent.
    func metric(_ name: String, matching: (Substring) -> Bool = { _ in true }) async -> Double? {
        let py = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:10249/metrics',timeout=2).read().decode())"
        let out = await exec(nodeNS, [python, "-c", py])
        for line in out.stdout.split(separator: "\n") where (line.hasPrefix(name + " ") || line.hasPrefix(name + "{")) && matching(line) {
            return Double(line.split(separator: " ").last ?? "")
        }
        return nil
    }

    /// Polls ``metric(_:matching:)`` for up to 10 s until it reads `want`.
    func waitForMetric(_ name: String, _ want: Double, matching: (Substring) -> Bool = { _ in true }) async throws -> Bool {
        for _ in 0..<50 {
            if await metric(name, matching: matching) == want { return true }
            try await Task.sleep(for: .milliseconds(200))
        }
        return false
    }
}

/// Expects the sources real backends saw to match explain's masquerade answer: the node's
/// address on the backend's link when masqueraded, else the client's own.
func expectSources(_ r: ClientResult, from: String, masquerade: Bool?, _ what: String, _ bed: TestBed,
                   sourceLocation: SourceLocation = #_sourceLocation) {
    let sources = Set(r.sources.compactMap { $0 })
    if masquerade == true {
        #expect(!sources.contains(from) && sources.allSatisfy { $0.hasSuffix(".1") }, context("\(what): explain said masqueraded", r, bed),
                sourceLocation: sourceLocation)
    } else {
        #expect(sources == [from], context("\(what): explain said the source is kept", r, bed), sourceLocation: sourceLocation)
    }
}

/// For each case: explain over the compiled rules and over the kernel's must agree, and real
/// packets must get what the kernel answer says (the backends that answer, the source they
/// see, REFUSED for a reject, TIMEOUT for a drop). `check` adds a mode's own expectations on
/// the kernel answer. Returns the verdicts seen.
func expectExplainMatchesRealPackets(_ bed: TestBed, mode: [String] = [], _ cases: [ExplainCase],
                                     check: (ExplainCase, ExplainJSON) -> Void = { _, _ in }) async throws -> Set<String> {
    var verdicts: Set<String> = []
    for c in cases {
        let dst = c.dst + (c.proto == .udp ? "/udp" : "")
        let compiled = try await bed.explain(mode, from: c.from, dst, kernel: false)
        let kernel = try await bed.explain(mode, from: c.from, dst, kernel: true)
        #expect(compiled.verdict == kernel.verdict && compiled.backends == kernel.backends && compiled.masquerade == kernel.masquerade,
                "\(c): compiled and kernel rules disagree: \(compiled.verdict) \(compiled.backends) vs \(kernel.verdict) \(kernel.backends)")
        check(c, kernel)
        verdicts.insert(kernel.verdict)
        let count = kernel.verdict == "forwarded" ? 24 : 2
        let r = try await bed.request(from: bed[keyPath: c.ns], c.proto, c.dst, count: count, timeout: 1.5, showSource: true,
                                      sourceIP: c.ns == \.extNS ? c.from : nil)
        switch kernel.verdict {
        case "forwarded":
            if kernel.model.affinity != nil {
                // ClientIP affinity: a new client gets one of the paths; then it sticks.
                expectAnswered(r, count: count, "\(c): explain said \(kernel.backends)", bed)
                #expect(r.backends.count == 1 && r.backends.isSubset(of: kernel.backends), context("\(c): affinity, explain said \(kernel.backends)", r, bed))
            } else {
                expectAnswered(r, count: count, backends: kernel.backends, "\(c): explain said \(kernel.backends)", bed)
            }
            expectSources(r, from: c.from, masquerade: kernel.masquerade, "\(c)", bed)
        case "rejected":
            #expect(r.count("REFUSED") == count, context("\(c): explain said REJECT", r, bed))
        case "dropped":
            #expect(r.count("TIMEOUT") == count, context("\(c): explain said DROP", r, bed))
        default:
            Issue.record("\(c): unexpected verdict \(kernel.verdict)")
        }
    }
    return verdicts
}
