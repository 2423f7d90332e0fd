// Sluice: a per-node Kubernetes service proxy.
// The manifest-directory source: every *.yaml / *.yml / *.json file in a directory, watched.
// Adding, editing or deleting a file produces the matching object events.

import Foundation
import Logging
import Metrics
import Synchronization
import SluiceCore
import Yams

/// The largest manifest file read (bigger ones are rejected whole, with a log line).
public let maximumManifestBytes = 64 << 20

/// What one manifest file may expand to once parsed. YAML aliases let a few hundred bytes
/// stand for billions of nodes (the "billion laughs"); the file is measured on the parsed
/// tree, where an alias is still one shared node, before anything is expanded.
public struct ManifestLimits: Sendable, Hashable {
    /// Alias references (`*name`) in the text.
    public var maximumAliases: Int
    /// Nodes once every alias is expanded, on top of one per byte of the file (a file without
    /// aliases has fewer nodes than bytes, so only expansion can reach the limit).
    public var extraNodes: Int
    /// Nesting depth of mappings and sequences.
    public var maximumDepth: Int

    /// Creates limits.
    public init(maximumAliases: Int = 10_000, extraNodes: Int = 100_000, maximumDepth: Int = 100) {
        self.maximumAliases = maximumAliases
        self.extraNodes = extraNodes
        self.maximumDepth = maximumDepth
    }

    /// What the manifest source uses.
    public static let standard = ManifestLimits()
}

/// A manifest file past `ManifestLimits`.
public struct ManifestLimitError: Error, Sendable, CustomStringConvertible {
    /// Which limit, in words.
    public var description: String
}

/// Parses manifest text into objects.
public enum ManifestParser {
    /// The outcome of parsing one file.
    public struct Parsed: Sendable {
        /// Objects decoded, in file order.
        public var objects: [KubeObject] = []
        /// Documents that could not be used, each with the reason (the rest of the file still counts).
        public var rejections: [ObjectRejection] = []
    }

    /// Parses multi-document YAML (JSON is YAML too).
    /// - Throws: when the text is not YAML at all; the caller keeps the file's previous objects.
    /// - Throws: `ManifestLimitError` when the file is past `limits`.
    public static func parse(_ text: String, file: String, limits: ManifestLimits = .standard) throws -> Parsed {
        var out = Parsed()
        var index = 0
        let aliases = countAliases(text)
        if aliases > limits.maximumAliases {
            throw ManifestLimitError(description: "\(aliases) YAML aliases, more than the \(limits.maximumAliases) accepted")
        }
        // Parse every document before using any: a syntax error anywhere fails the whole file.
        // The plainest block YAML (what generators write) takes the fast path, which declines
        // aliases, deep nesting and every error; anything else goes through Yams, where each
        // tree is measured before it is expanded into dictionaries.
        let docs: [Any]
        if let fast = PlainBlockYAML.documents(text, maximumDepth: limits.maximumDepth) {
            docs = fast
        } else {
            var budget = text.utf8.count + limits.extraNodes
            let allowed = budget
            docs = try YAMLTrees.documents(text) { root in
                try measure(root, depth: 0, budget: &budget, limits: limits, allowed: allowed)
            }
        }
        for doc in docs {
            defer { index += 1 }
            if isNull(doc) { continue }
            guard let tree = doc as? [String: Any] else {
                out.rejections.append(ObjectRejection(kind: "document", key: "\(file)#\(index)", reason: "not a mapping"))
                continue
            }
            let kind = (tree["kind"] as? String) ?? "?"
            let meta = tree["metadata"] as? [String: Any]
            let key = "\((meta?["namespace"] as? String) ?? "default")/\((meta?["name"] as? String) ?? "?")"
            do {
                if let objs = try ObjectDecoder.decode(tree) { out.objects += objs }
            } catch {
                out.rejections.append(ObjectRejection(kind: kind, key: key, reason: "\(file)#\(index): \(error)"))
            }
        }
        return out
    }

    /// Counts nodes as if every alias were expanded, stopping as soon as the budget is spent
    /// (so a bomb costs at most `budget` steps), and checks the depth on the way.
    private static func measure(_ node: Yams.Node, depth: Int, budget: inout Int, limits: ManifestLimits, allowed: Int) throws {
        budget -= 1
        if budget < 0 {
            throw ManifestLimitError(description: "expands to more than \(allowed) YAML nodes (aliases referring to aliases?)")
        }
        if depth > limits.maximumDepth {
            throw ManifestLimitError(description: "nested more than \(limits.maximumDepth) levels deep")
        }
        switch node {
        case .scalar, .alias:
            return
        case .mapping(let m):
            for (k, v) in m {
                try measure(k, depth: depth + 1, budget: &budget, limits: limits, allowed: allowed)
                try measure(v, depth: depth + 1, budget: &budget, limits: limits, allowed: allowed)
            }
        case .sequence(let seq):
            for child in seq { try measure(child, depth: depth + 1, budget: &budget, limits: limits, allowed: allowed) }
        }
    }

    /// Alias references in `text`: a `*` that starts a token (after whitespace, `[`, `{`, `,`
    /// or `:` or at the start) followed by an anchor character. Quoted text may be counted
    /// too; the count only has to be an upper bound.
    static func countAliases(_ text: String) -> Int {
        var count = 0
        var previous: UInt8 = UInt8(ascii: "\n")
        var starIsToken = false
        for b in text.utf8 {
            if starIsToken {
                starIsToken = false
                if b != UInt8(ascii: " ") && b != UInt8(ascii: "\t") && b != UInt8(ascii: "\n") && b != UInt8(ascii: ",")
                    && b != UInt8(ascii: "]") && b != UInt8(ascii: "}") {
                    count += 1
                }
            }
            if b == UInt8(ascii: "*") {
                switch previous {
                case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\n"), UInt8(ascii: "["), UInt8(ascii: "{"), UInt8(ascii: ","),
                     UInt8(ascii: ":"), UInt8(ascii: "-"):
                    starIsToken = true
                default: break
                }
            }
            previous = b
        }
        return count
    }
}

/// Watches a directory of manifests and streams object events.
///
/// The directory is rescanned every `interval`; only files whose size, modification time or
/// inode changed are re-read. A file that stops parsing keeps its previous objects (a typo
/// in an editor never deletes a Service); a file that is removed deletes its objects.
///
/// A change is applied only once it has settled: the file (or its absence) reads the same
/// on two scans at least `settle` apart. `: > web.yaml; cat full > web.yaml` (what `cat >`
/// and many editors do) passes through an empty or half-written file; a scan that lands in
/// between sees a candidate, not a change, and the rewrite replaces the candidate. An empty
/// or shrunken file that stays so is a real change and is applied one scan later. The first
/// scan applies what it finds at once.
public final class ManifestDirectorySource: Sendable {
    /// The directory watched.
    public let directory: String
    /// Time between scans.
    public let interval: Duration
    /// How long a changed file must stay unchanged before it is applied (zero: at once).
    public let settle: Duration
    /// What one file may expand to.
    public let limits: ManifestLimits
    private let logger: Logger
    /// Called for every document that cannot be used.
    private let onRejection: @Sendable (ObjectRejection) -> Void
    private let now: @Sendable () -> Duration
    private let rejections = Mutex(0)

    /// Creates a source.
    /// - Parameters:
    ///   - settle: how long a change must stay put before it is applied; defaults to `interval`.
    ///   - now: a monotonic clock (tests inject one).
    public init(directory: String, interval: Duration = .milliseconds(250), settle: Duration? = nil, limits: ManifestLimits = .standard,
                now: (@Sendable () -> Duration)? = nil, logger: Logger,
                onRejection: @escaping @Sendable (ObjectRejection) -> Void = { _ in }) {
        self.directory = directory
        self.interval = interval
        self.settle = settle ?? interval
        self.limits = limits
        self.logger = logger
        self.onRejection = onRejection
        if let now {
            self.now = now
        } else {
            let origin = ContinuousClock.now
            self.now = { origin.duration(to: .now) }
        }
    }

    /// Files and documents rejected so far (also counted in the `sluice_manifest_rejections_total`
    /// metric, by `what`: `file` or `object`).
    public var rejectionCount: Int { rejections.withLock { $0 } }

    private func reject(_ r: ObjectRejection) {
        rejections.withLock { $0 += 1 }
        Counter(label: "sluice_manifest_rejections_total", dimensions: [("what", r.kind == "file" ? "file" : "object")]).increment()
        onRejection(r)
    }

    /// The state of one scan: objects per file.
    public struct Snapshot: Sendable {
        fileprivate var stamps: [String: FileStampBox] = [:]
        fileprivate var objects: [String: [KubeObject]] = [:]
        /// Content last applied, per file, to tell a rewrite with the same bytes from a change.
        fileprivate var applied: [String: ContentDigest] = [:]
        /// Changes seen but not yet settled, per file name.
        fileprivate var candidates: [String: Candidate] = [:]
        fileprivate var scanned = false

        /// Creates an empty snapshot.
        public init() {}

        /// Objects by identity; when two files define the same object the later file name wins.
        public var merged: [String: KubeObject] {
            var out: [String: KubeObject] = [:]
            for file in objects.keys.sorted() {
                for o in objects[file]! { out[o.identity] = o }
            }
            return out
        }

        /// Files whose change waits to settle.
        public var unsettled: [String] { candidates.keys.sorted() }
    }

    fileprivate struct FileStampBox: Sendable, Hashable {
        var size: Int
        var mtime: Double
        var inode: Int
    }

    /// A change not applied yet: the file's stamp and bytes (nil: the file is gone) when first
    /// seen so.
    fileprivate struct Candidate: Sendable {
        var stamp: FileStampBox?
        var digest: ContentDigest?
        var since: Duration
    }

    /// A file's length and a 64-bit hash of its bytes (the process-seeded standard hasher):
    /// what is remembered of a file instead of its bytes.
    fileprivate struct ContentDigest: Sendable, Hashable {
        var count: Int
        var hash: Int

        init(_ data: Data) {
            var h = Hasher()
            data.withUnsafeBytes { h.combine(bytes: $0) }
            count = data.count
            hash = h.finalize()
        }
    }

    /// Scans the directory once, returning the new snapshot and the events that lead from
    /// `previous` to it.
    public func scan(from previous: Snapshot) throws -> (Snapshot, [ObjectEvent]) {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: directory, isDirectory: &isDir), isDir.boolValue else {
            throw SourceError(message: "manifest directory \(directory) does not exist or is not a directory")
        }
        let names = try fm.contentsOfDirectory(atPath: directory)
            .filter { !$0.hasPrefix(".") && ($0.hasSuffix(".yaml") || $0.hasSuffix(".yml") || $0.hasSuffix(".json")) }
            .sorted()
        let settling = previous.scanned && settle > .zero
        let t = now()
        var next = Snapshot()
        next.scanned = true
        var present: Set<String> = []
        for name in names {
            let path = directory + "/" + name
            guard let attrs = try? fm.attributesOfItem(atPath: path),
                  (attrs[.type] as? FileAttributeType) == .typeRegular || (attrs[.type] as? FileAttributeType) == .typeSymbolicLink
            else { continue }
            present.insert(name)
            let stamp = FileStampBox(
                size: (attrs[.size] as? NSNumber)?.intValue ?? 0,
                mtime: (attrs[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0,
                inode: (attrs[.systemFileNumber] as? NSNumber)?.intValue ?? 0)
            if previous.stamps[name] == stamp, let objs = previous.objects[name] {
                next.stamps[name] = stamp
                next.objects[name] = objs
                next.applied[name] = previous.applied[name]
                continue
            }
            if stamp.size > maximumManifestBytes {
                reject(ObjectRejection(kind: "file", key: name, reason: "\(stamp.size) bytes is more than the \(maximumManifestBytes) accepted; keeping its previous objects"))
                keep(name, from: previous, into: &next)
                next.stamps[name] = stamp
                next.objects[name] = previous.objects[name] ?? []
                continue
            }
            guard let data = FileManager.default.contents(atPath: path) else {
                logger.warning("cannot read manifest \(path); keeping its previous objects")
                keep(name, from: previous, into: &next)
                continue
            }
            let digest = ContentDigest(data)
            if let applied = previous.applied[name], applied == digest {
                // Rewritten with the same bytes (or back to them before settling): nothing changed.
                next.stamps[name] = stamp
                next.objects[name] = previous.objects[name] ?? []
                next.applied[name] = digest
                continue
            }
            if settling {
                if let c = previous.candidates[name], c.stamp == stamp, c.digest == digest {
                    if t - c.since < settle {
                        keep(name, from: previous, into: &next)
                        next.candidates[name] = c
                        continue
                    }
                } else {
                    keep(name, from: previous, into: &next)
                    next.candidates[name] = Candidate(stamp: stamp, digest: digest, since: t)
                    continue
                }
            }
            next.stamps[name] = stamp
            next.applied[name] = digest
            next.objects[name] = read(data: data, name: name, previous: previous.objects[name])
        }
        // Files gone since the last scan: a deletion, once it has settled too.
        for name in previous.objects.keys where !present.contains(name) && settling {
            if let c = previous.candidates[name], c.stamp == nil {
                if t - c.since >= settle { continue }
                keep(name, from: previous, into: &next)
                next.candidates[name] = c
            } else {
                keep(name, from: previous, into: &next)
                next.candidates[name] = Candidate(stamp: nil, digest: nil, since: t)
            }
        }
        let before = previous.merged
        let after = next.merged
        var events: [ObjectEvent] = []
        // Deletions of slices first, then services, so no sync sees a slice without a reason.
        for (id, obj) in before.sorted(by: { $0.key < $1.key }) where after[id] == nil {
            events.append(obj.deleteEvent)
        }
        for (id, obj) in after.sorted(by: { $0.key < $1.key }) where before[id] != obj {
            events.append(obj.upsertEvent)
        }
        return (next, events)
    }

    /// Carries a file's applied state over unchanged.
    private func keep(_ name: String, from previous: Snapshot, into next: inout Snapshot) {
        next.stamps[name] = previous.stamps[name]
        if let objs = previous.objects[name] { next.objects[name] = objs }
        next.applied[name] = previous.applied[name]
    }

    private func read(data: Data, name: String, previous: [KubeObject]?) -> [KubeObject] {
        guard data.count <= maximumManifestBytes else {
            reject(ObjectRejection(kind: "file", key: name, reason: "\(data.count) bytes is more than the \(maximumManifestBytes) accepted; keeping its previous objects"))
            return previous ?? []
        }
        let text = String(decoding: data, as: UTF8.self)
        do {
            let parsed = try ManifestParser.parse(text, file: name, limits: limits)
            for r in parsed.rejections { reject(r) }
            return parsed.objects
        } catch let e as ManifestLimitError {
            reject(ObjectRejection(kind: "file", key: name, reason: "\(e); keeping its previous objects"))
            return previous ?? []
        } catch {
            reject(ObjectRejection(kind: "file", key: name, reason: "not valid YAML (\(String(describing: error).prefix(300))); keeping its previous objects"))
            return previous ?? []
        }
    }

    /// Streams events until cancelled: everything in the directory, then `.synced`, then changes.
    public func events() -> AsyncThrowingStream<ObjectEvent, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                var snapshot = Snapshot()
                var failing = false
                do {
                    let (first, events) = try scan(from: snapshot)
                    snapshot = first
                    for e in events { continuation.yield(e) }
                    continuation.yield(.synced)
                    logger.info("manifest directory \(directory): \(first.merged.count) objects")
                    while !Task.isCancelled {
                        try await Task.sleep(for: interval)
                        do {
                            let (next, events) = try scan(from: snapshot)
                            snapshot = next
                            for e in events { continuation.yield(e) }
                            if failing {
                                failing = false
                                logger.info("manifest directory \(directory) is readable again")
                            }
                        } catch {
                            // Said once when it starts failing, not on every poll.
                            if !failing { logger.warning("\(error); keeping the last objects read until it is back") }
                            failing = true
                        }
                    }
                    continuation.finish()
                } catch is CancellationError {
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}

/// A source that cannot deliver objects.
public struct SourceError: Error, Sendable, CustomStringConvertible {
    /// What went wrong.
    public var message: String

    /// Creates an error.
    public init(message: String) { self.message = message }

    public var description: String { message }
}
