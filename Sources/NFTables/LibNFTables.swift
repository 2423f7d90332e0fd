// Sluice: a per-node Kubernetes service proxy.
// The one Swift wrapper over libnftables: an `nft_ctx` with buffered output and error text,
// used to apply `nft -f` transactions in the process (no `nft` child per sync) and to read a
// table back. The library's own error text ends up in a typed error with the command context.

import CNFTables
import Foundation
import SluiceCore

/// A failure of libnftables, with the library's own message and what Sluice was doing.
public struct NFTablesError: Error, Sendable, CustomStringConvertible {
    /// What Sluice was doing (`full transaction`, `listing table ip kube-proxy`, ...).
    public var operation: String
    /// libnftables' error text (the lines `nft -f` prints on stderr), trimmed.
    public var message: String
    /// The library's return code (non-zero).
    public var status: Int32
    /// The first lines of the command text that failed, for the log.
    public var command: String

    /// Creates an error.
    public init(operation: String, message: String, status: Int32 = -1, command: String = "") {
        self.operation = operation
        self.message = message
        self.status = status
        self.command = command
    }

    public var description: String {
        let text = message.isEmpty ? "libnftables returned \(status)" : message
        return "\(operation): \(text)"
    }

    /// True when the error says the object does not exist (`delete table` of a missing table).
    public var isNotFound: Bool {
        message.contains("No such file or directory") || message.contains("does not exist")
    }
}

/// How `list` prints.
public enum NFTablesListFormat: Sendable, Hashable {
    /// The `nft list` text operators read.
    case text
    /// `nft --json list` (libnftables-json(5)).
    case json
    /// `nft --json --terse list`: JSON without the elements of sets and maps.
    case terseJSON
}

/// One libnftables context. Every call runs one command buffer to completion under a lock
/// (the context holds a cache and the output buffers; libnftables documents no thread safety),
/// so one `LibNFTables` may be shared; the caller's actor normally owns it anyway.
public final class LibNFTables: @unchecked Sendable {
    private let ctx: OpaquePointer
    private let lock = NSLock()

    /// Opens a context with buffered output and error text.
    public init() throws {
        guard let ctx = nft_ctx_new(UInt32(NFT_CTX_DEFAULT)) else {
            throw NFTablesError(operation: "opening libnftables", message: "nft_ctx_new failed")
        }
        guard nft_ctx_buffer_output(ctx) == 0, nft_ctx_buffer_error(ctx) == 0 else {
            nft_ctx_free(ctx)
            throw NFTablesError(operation: "opening libnftables", message: "cannot buffer the library's output")
        }
        self.ctx = ctx
    }

    deinit { nft_ctx_free(ctx) }

    /// Applies `text` (the input of `nft -f`) as one transaction: the kernel takes every
    /// command or none of them.
    /// - Parameters:
    ///   - operation: what the transaction is for, for the error.
    ///   - check: parse and evaluate, and send the batch for validation only (`nft --check`):
    ///     the kernel's ruleset does not change.
    /// - Returns: whatever the commands printed (empty for add/delete/flush).
    @discardableResult
    public func run(_ text: String, operation: String = "transaction", check: Bool = false) throws -> String {
        try run(text, operation: operation, check: check, flags: 0)
    }

    /// Prints a table as `nft list table FAMILY NAME` does, or as JSON.
    public func list(table: String, family: NFTFamily, format: NFTablesListFormat = .text) throws -> String {
        let flags: UInt32
        switch format {
        case .text: flags = 0
        case .json: flags = UInt32(NFT_CTX_OUTPUT_JSON)
        case .terseJSON: flags = UInt32(NFT_CTX_OUTPUT_JSON) | UInt32(NFT_CTX_OUTPUT_TERSE)
        }
        return try run("list table \(family.rawValue) \(table)", operation: "listing table \(family.rawValue) \(table)",
                       check: false, flags: flags)
    }

    /// Prints one chain with its rules (`nft list chain FAMILY TABLE CHAIN`).
    public func list(chain: String, table: String, family: NFTFamily) throws -> String {
        try run("list chain \(family.rawValue) \(table) \(chain)", operation: "listing chain \(family.rawValue) \(table) \(chain)",
                check: false, flags: 0)
    }

    private func run(_ text: String, operation: String, check: Bool, flags: UInt32) throws -> String {
        lock.lock()
        defer { lock.unlock() }
        nft_ctx_set_dry_run(ctx, check)
        nft_ctx_output_set_flags(ctx, flags)
        let rc = text.withCString { nft_run_cmd_from_buffer(ctx, $0) }
        // Both buffers are rewound by these calls, so each command's text stands alone.
        let out = nft_ctx_get_output_buffer(ctx).map { String(cString: $0) } ?? ""
        let err = nft_ctx_get_error_buffer(ctx).map { String(cString: $0) } ?? ""
        nft_ctx_set_dry_run(ctx, false)
        guard rc == 0 else {
            let head = text.split(separator: "\n", maxSplits: 3, omittingEmptySubsequences: true).prefix(3).joined(separator: "\n")
            throw NFTablesError(operation: operation, message: err.trimmingCharacters(in: .whitespacesAndNewlines),
                                status: rc, command: head)
        }
        return out
    }
}

/// The start-up check of the nftables mode: each kernel feature the ruleset uses, tried in a
/// check-only transaction (`nft --check`: the kernel builds the objects, then drops the
/// batch, so nothing changes). A missing module (`nft_numgen`, `nft_fib_ipv4`, ...) fails its
/// feature's probe.
public enum NFTablesSupport {
    /// One feature and the commands that need it.
    public struct Feature: Sendable, Hashable {
        /// What an operator reads in the error (`numgen`, `fib`, ...).
        public var name: String
        /// Commands after the probe table and its chains exist.
        public var commands: [String]
    }

    /// The probe table's name (never created: every probe is a dry run).
    public static let probeTable = "sluice-probe"

    /// The features kube-proxy's nftables ruleset uses, for one family.
    public static func features(_ family: NFTFamily) -> [Feature] {
        let f = family.rawValue, t = "\(f) \(probeTable)"
        let addr = family == .ip ? "ipv4_addr" : "ipv6_addr"
        let ip = family == .ip ? "ip" : "ip6"
        let endpoint = family == .ip ? "10.0.0.1:80" : "[fd00::1]:80"
        let loopback = family == .ip ? "127.0.0.0/8" : "::1"
        return [
            Feature(name: "nf_tables with comments", commands: ["add table \(t) { comment \"probe\" ; }"]),
            Feature(name: "concatenated verdict maps", commands: [
                "add map \(t) m { type \(addr) . inet_proto . inet_service : verdict ; comment \"probe\" ; }",
                "add rule \(t) filter-output \(ip) daddr . meta l4proto . th dport vmap @m",
            ]),
            Feature(name: "ct state", commands: ["add rule \(t) filter-output ct state new jump helper"]),
            Feature(name: "numgen", commands: ["add rule \(t) helper numgen random mod 2 vmap { 0 : goto helper2 , 1 : goto helper2 }"]),
            Feature(name: "fib", commands: ["add rule \(t) helper fib daddr type local \(ip) daddr != \(loopback) jump helper2"]),
            Feature(name: "reject", commands: ["add rule \(t) helper2 reject"]),
            Feature(name: "dnat", commands: ["add rule \(t) nat-output meta l4proto tcp dnat to \(endpoint)"]),
            Feature(name: "masquerade fully-random", commands: ["add rule \(t) nat-postrouting masquerade fully-random"]),
            Feature(name: "meta mark", commands: ["add rule \(t) helper2 mark set mark or 0x00004000"]),
            Feature(name: "dynamic sets with timeouts", commands: [
                "add set \(t) affinity { type \(addr) ; flags dynamic,timeout ; timeout 3h ; }",
                "add rule \(t) helper2 update @affinity { \(ip) saddr }",
                "add rule \(t) helper2 \(ip) saddr @affinity goto helper",
            ]),
        ]
    }

    /// The table and chains every probe adds its commands to.
    static func preamble(_ family: NFTFamily) -> [String] {
        let t = "\(family.rawValue) \(probeTable)"
        return [
            "add table \(t)",
            "add chain \(t) filter-output { type filter hook output priority 0 ; }",
            "add chain \(t) nat-output { type nat hook output priority -100 ; }",
            "add chain \(t) nat-postrouting { type nat hook postrouting priority 100 ; }",
            "add chain \(t) helper",
            "add chain \(t) helper2",
        ]
    }

    /// Checks every feature in one dry run; when that fails, tries each feature alone and
    /// throws one line naming every one that failed, with the library's first error line.
    public static func check(_ lib: LibNFTables, families: [NFTFamily]) throws {
        var missing: [String] = []
        for family in families {
            let all = preamble(family) + features(family).flatMap(\.commands)
            if (try? lib.run(all.joined(separator: "\n") + "\n", operation: "probe", check: true)) != nil { continue }
            do {
                try lib.run(preamble(family).joined(separator: "\n") + "\n", operation: "probe", check: true)
            } catch {
                missing.append("nf_tables (\(family.rawValue)): \(firstLine(error))")
                continue
            }
            for feature in features(family) {
                do {
                    try lib.run((preamble(family) + feature.commands).joined(separator: "\n") + "\n", operation: "probe", check: true)
                } catch {
                    missing.append("\(feature.name) (\(family.rawValue)): \(firstLine(error))")
                }
            }
            if missing.isEmpty { missing.append("the \(family.rawValue) probe transaction failed as a whole") }
        }
        if !missing.isEmpty {
            throw NFTablesError(operation: "the kernel or libnftables lacks what the nftables mode needs",
                                message: missing.joined(separator: "; "))
        }
    }

    private static func firstLine(_ error: any Error) -> String {
        let text = (error as? NFTablesError)?.message ?? "\(error)"
        // libnftables prints "<cmdline>:N:M-K: Error: ..." then the command and a caret line.
        let line = text.split(separator: "\n").first.map(String.init) ?? text
        if let r = line.range(of: "Error: ") { return String(line[r.upperBound...]) }
        return line
    }
}
