// Sluice test support: the nftables mode on the test bed -- starting sluice in that mode,
// reading `table ip kube-proxy` back with `nft`, normalising the listing so two listings of
// the same ruleset compare equal, and loading a full sync's transaction (`sluice compile`)
// into a scratch namespace to get the listing a full sync of the same state gives.

import Foundation

extension TestBed {
    /// Starts sluice with `--proxy-mode nftables` (the later flag wins over the default
    /// arguments' `--proxy-mode iptables`).
    @discardableResult
    public func startNFTablesSluice(syncPeriod: String = "10m", extra: [String] = [],
                                    environment: [String: String] = [:]) throws -> BackgroundProcess {
        try startSluice(syncPeriod: syncPeriod, extra: ["--proxy-mode", "nftables"] + extra, environment: environment)
    }

    /// `nft list table FAMILY kube-proxy` in `ns` (the node by default); nil when the table
    /// does not exist.
    public func nftTable(_ family: String = "ip", in ns: String? = nil) async throws -> String? {
        let r = await exec(ns ?? nodeNS, ["nft", "list", "table", family, "kube-proxy"])
        if r.succeeded { return r.stdout }
        if r.stderr.contains("No such file or directory") { return nil }
        throw TestBedError("nft list table failed: \(r)")
    }

    /// `nft list tables` in the node namespace.
    public func nftTables() async throws -> String {
        try await exec(checked: nodeNS, ["nft", "list", "tables"]).stdout
    }

    /// Polls `table ip kube-proxy` (every 100 ms, up to `timeout`) until `condition` holds;
    /// returns the listing. Throws with sluice's log when it does not, or when sluice exits.
    @discardableResult
    public func waitForNFTables(timeout: Duration = .seconds(15), _ what: String,
                                until condition: (String) -> Bool) async throws -> String {
        let deadline = ContinuousClock.now + timeout
        var last = ""
        trace("waiting for \(what)")
        while true {
            last = try await nftTable() ?? ""
            if condition(last) { return last }
            if let p = sluice, !p.isRunning {
                throw TestBedError("sluice exited (status \(p.exitStatus ?? -1)) before \(what):\n\(p.logTail())")
            }
            guard ContinuousClock.now < deadline else { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw TestBedError("\(what): not there after \(timeout)\n--- table ip kube-proxy ---\n\(last)\n--- sluice log ---\n\(sluice?.logTail() ?? "")")
    }

    /// Waits until the `service-ips` map sends every given service port (`ns/name:port`) to its
    /// chain (`goto service-HASH-ns/name/proto/port`), i.e. until sluice programmed them.
    @discardableResult
    public func waitForNFTablesServices(_ servicePorts: [String], timeout: Duration = .seconds(15)) async throws -> String {
        try await waitForNFTables(timeout: timeout, "service chains for \(servicePorts.joined(separator: ", "))") { text in
            servicePorts.allSatisfy { sp in
                let parts = sp.split(separator: ":", maxSplits: 1)
                let base = String(parts[0]), port = parts.count > 1 ? String(parts[1]) : ""
                return ["tcp", "udp", "sctp"].contains { text.contains("goto service-") && text.contains("-\(base)/\($0)/\(port)") }
            }
        }
    }

    /// The listing a full sync of the manifests gives: `sluice compile --proxy-mode nftables`
    /// in the node namespace (same addresses), applied with `nft -f` in a scratch namespace,
    /// listed there. `extra` are further flags for `sluice compile`.
    public func nftablesFullSyncListing(family: String = "ip", extra: [String] = []) async throws -> String {
        let args = ["compile", "--proxy-mode", "nftables", "--manifests", manifestDir, "--hostname-override", TestNet.nodeName,
                    "--node-ip", TestNet.nodeIP, "--cluster-cidr", TestNet.clusterCIDR] + extra
        let compiled = await runSluice(args)
        guard compiled.succeeded else { throw TestBedError("sluice compile failed: \(compiled)") }
        let scratch = prefix + "nftref"
        _ = await Subprocess.run(["ip", "netns", "del", scratch])
        try await Subprocess.check(["ip", "netns", "add", scratch])
        defer { _ = Subprocess.runBlocking(["ip", "netns", "del", scratch], timeout: .seconds(20)) }
        let path = tempDir + "/full-sync.nft"
        try Data(compiled.stdout.utf8).write(to: URL(fileURLWithPath: path))
        try await exec(checked: scratch, ["nft", "-f", path])
        return try await nftTable(family, in: scratch) ?? ""
    }
}

/// Normalises `nft list table` output so that two listings of the same ruleset compare
/// equal whatever order the objects were created in: the chains, sets and maps are sorted
/// by their header line, and the elements of each set or map are sorted. The rules of a
/// chain keep their order (it matters). Chains whose name holds a `/` (service, endpoint,
/// external and firewall chains) and that have no rules are left out: a sync flushes a
/// chain nobody wants any more and the next sync, a second or more later, deletes it.
public enum NFTablesListing {
    /// The normalised text.
    public static func normalise(_ listing: String) -> String {
        var blocks: [[String]] = []
        var current: [String] = []
        var inElements = false
        var elements = ""
        for raw in listing.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("table ") || line == "}" && current.isEmpty { continue }
            if inElements {
                elements += " " + line
                if line.hasSuffix("}") {
                    current.append(sortedElements(elements))
                    inElements = false
                }
                continue
            }
            if line.hasPrefix("elements = {") {
                elements = line
                if line.hasSuffix("}") { current.append(sortedElements(elements)) } else { inElements = true }
                continue
            }
            if current.isEmpty {
                // A table-level line (`comment "…"`) stands alone; a `chain …{` opens a block.
                if line.hasSuffix("{") { current = [line] } else { blocks.append([line]) }
            } else if line == "}" {
                blocks.append(current)
                current = []
            } else {
                current.append(line)
            }
        }
        let kept = blocks.filter { block in
            guard let header = block.first, header.hasPrefix("chain "), header.contains("/") else { return true }
            return block.count > 1
        }
        return kept.sorted { $0[0] < $1[0] }.map { $0.joined(separator: "\n") }.joined(separator: "\n\n") + "\n"
    }

    /// `elements = { a, b, c }` with the elements sorted.
    static func sortedElements(_ text: String) -> String {
        guard let open = text.firstIndex(of: "{"), let close = text.lastIndex(of: "}") else { return text }
        let inner = text[text.index(after: open)..<close]
        let items = inner.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        return "elements = { " + items.sorted().joined(separator: ", ") + " }"
    }

    /// Names of the chains in a listing whose name holds a `/` and that have no rules.
    public static func emptyServiceChains(_ listing: String) -> [String] {
        var out: [String] = []
        let lines = listing.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        for (i, line) in lines.enumerated() where line.hasPrefix("chain ") && line.contains("/") {
            if i + 1 < lines.count, lines[i + 1] == "}" {
                out.append(String(line.dropFirst(6).dropLast(2)))
            }
        }
        return out
    }
}
