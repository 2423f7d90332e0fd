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

    /// The state of one scan: what each file defines, by key and fingerprint. The objects
    /// themselves are not kept (the consumer of the events holds them), except the copies that
    /// lose to another file's (below).
    public struct Snapshot: Sendable {
        fileprivate var stamps: [String: FileStampBox] = [:]
        /// Per file, the objects applied from it: key → fingerprint (the object's hash value).
        fileprivate var files: [String: [KubeObjectKey: Int]] = [:]
        /// Per object, the files defining it (the last file name wins).
        fileprivate var definers: [KubeObjectKey: Definers] = [:]
        /// Objects defined by more than one file: every copy but the winning one, so the next
        /// winner's object is at hand when the winning file stops defining it.
        fileprivate var shadowed: [KubeObjectKey: [String: KubeObject]] = [:]
        /// Content last applied, per file, to tell a rewrite with the same bytes from a change.
        fileprivate var applied: [String: ContentDigest] = [:]
        /// Changes seen but not yet settled, per file name.
        fileprivate var candidates: [String: Candidate] = [:]
        /// Changed files held back this scan (see `scan`), to log it once.
        fileprivate var heldBack: Set<String> = []
        fileprivate var scanned = false

        /// Creates an empty snapshot.
        public init() {}

        /// Number of distinct objects defined (an object in two files counts once).
        public var objectCount: Int { definers.count }

        /// `Kind namespace/name` of every object defined, sorted.
        public var identities: [String] { definers.keys.map(\.identity).sorted() }

        /// Files whose change waits to settle.
        public var unsettled: [String] { candidates.keys.sorted() }

        /// Whole objects the snapshot keeps: the losing copies of objects defined in more than
        /// one file (none when every object is defined once).
        var keptObjectCount: Int { shadowed.values.reduce(0) { $0 + $1.count } }

        /// Changed files whose change waits because an object they now define is also defined by
        /// an earlier file that no longer reads as it was applied (see `scan`).
        public var waiting: [String] { heldBack.sorted() }
    }

    /// The files defining one object, sorted by name; the last one's copy is in effect.
    fileprivate enum Definers: Sendable {
        case one(String)
        /// At least two.
        case many([String])

        var winner: String {
            switch self {
            case .one(let f): return f
            case .many(let fs): return fs[fs.count - 1]
            }
        }

        var all: [String] {
            switch self {
            case .one(let f): return [f]
            case .many(let fs): return fs
            }
        }

        func adding(_ file: String) -> Definers {
            var fs = all
            guard !fs.contains(file) else { return self }
            fs.append(file)
            fs.sort()
            return .many(fs)
        }

        func removing(_ file: String) -> Definers? {
            let fs = all.filter { $0 != file }
            switch fs.count {
            case 0: return nil
            case 1: return .one(fs[0])
            default: return .many(fs)
            }
        }
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
    ///
    /// Only files whose content changed are parsed, and only their objects make events: an
    /// object a changed file no longer defines is deleted (unless another file still defines
    /// it), and an object whose fingerprint (its 64-bit hash) differs from the copy in effect
    /// before is upserted. When two files define one object the later file name wins; the
    /// losing copies are kept whole, so the next one can take over without reading its file.
    /// A copy that starts losing is read again from its file, which must still hold the same
    /// object; if it does not (that file has a change of its own that is not applied yet), the
    /// change that made it lose waits (`Snapshot.waiting`) until it does.
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
        next.definers = previous.definers
        next.shadowed = previous.shadowed
        // Files parsed again this scan: their objects by key (the last document of a key wins).
        var fresh: [String: [KubeObjectKey: KubeObject]] = [:]
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
            if previous.stamps[name] == stamp, let objs = previous.files[name] {
                next.stamps[name] = stamp
                next.files[name] = objs
                next.applied[name] = previous.applied[name]
                continue
            }
            if stamp.size > maximumManifestBytes {
                reject(ObjectRejection(kind: "file", key: name, reason: "\(stamp.size) bytes is more than the \(maximumManifestBytes) accepted; keeping its previous objects"))
                keep(name, from: previous, into: &next)
                next.stamps[name] = stamp
                next.files[name] = previous.files[name] ?? [:]
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
                next.files[name] = previous.files[name] ?? [:]
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
            if let objects = read(data: data, name: name) {
                var byKey: [KubeObjectKey: KubeObject] = [:]
                for o in objects { byKey[o.key] = o }
                fresh[name] = byKey
                next.files[name] = byKey.mapValues(\.hashValue)
            } else {
                next.files[name] = previous.files[name] ?? [:]
            }
        }
        // Files gone since the last scan: a deletion, once it has settled too.
        for name in previous.files.keys where !present.contains(name) && settling {
            if let c = previous.candidates[name], c.stamp == nil {
                if t - c.since >= settle { continue }
                keep(name, from: previous, into: &next)
                next.candidates[name] = c
            } else {
                keep(name, from: previous, into: &next)
                next.candidates[name] = Candidate(stamp: nil, digest: nil, since: t)
            }
        }
        let events = reconcile(previous: previous, next: &next, fresh: &fresh)
        return (next, events)
    }

    /// Updates `next`'s definitions for the files parsed again (`fresh`) and the files gone,
    /// and returns the events: deletions, then upserts, each sorted by identity. A fresh file
    /// whose change would need a losing copy that cannot be read back is held back (its
    /// previous state restored in `next`) and the rest is worked out again without it.
    private func reconcile(previous: Snapshot, next: inout Snapshot, fresh: inout [String: [KubeObjectKey: KubeObject]]) -> [ObjectEvent] {
        let gone = previous.files.keys.filter { next.files[$0] == nil }
        var rereads: [String: [KubeObjectKey: KubeObject]?] = [:]
        while true {
            let changed = Array(fresh.keys) + gone
            if changed.isEmpty { return [] }
            var definers = previous.definers
            var affected: Set<KubeObjectKey> = []
            for f in changed {
                for k in (previous.files[f] ?? [:]).keys {
                    affected.insert(k)
                    definers[k] = definers[k]?.removing(f)
                }
                for k in (next.files[f] ?? [:]).keys {
                    affected.insert(k)
                    definers[k] = definers[k]?.adding(f) ?? .one(f)
                }
            }
            var shadowed = previous.shadowed
            var deletes: [(String, ObjectEvent)] = []
            var upserts: [(String, ObjectEvent)] = []
            var blocked: (file: String, by: String, key: KubeObjectKey)?
            /// A file's copy of `key`: parsed this scan, kept as a losing copy, or read back.
            func copy(_ key: KubeObjectKey, in file: String) -> KubeObject? {
                if let byKey = fresh[file] { return byKey[key] }
                if let o = previous.shadowed[key]?[file] { return o }
                guard let fingerprint = previous.files[file]?[key] else { return nil }
                if rereads[file] == nil { rereads[file] = .some(readBack(file)) }
                guard let o = rereads[file]!?[key], o.hashValue == fingerprint else { return nil }
                return o
            }
            for key in affected {
                let after = definers[key]
                if case .many(let files)? = after {
                    var copies: [String: KubeObject] = [:]
                    for f in files.dropLast() {
                        if let o = copy(key, in: f) {
                            copies[f] = o
                        } else if fresh[after!.winner] != nil {
                            blocked = (after!.winner, f, key)
                            break
                        } else {
                            // Only a file parsed this scan can make a copy start losing (the
                            // others were kept); should it happen anyway, say so.
                            logger.error("manifest \(f): its copy of \(key.identity) cannot be read back; it will not take over if \(after!.winner) drops it")
                        }
                    }
                    shadowed[key] = copies
                } else {
                    shadowed[key] = nil
                }
                if blocked != nil { break }
                let before = previous.definers[key]?.winner
                guard let winner = after?.winner else {
                    if before != nil { deletes.append((key.identity, key.deleteEvent)) }
                    continue
                }
                let fingerprint = next.files[winner]?[key]
                if let before, previous.files[before]?[key] == fingerprint { continue }
                guard let o = copy(key, in: winner) else {
                    // Unreachable: a winner that was not parsed this scan was a losing copy, kept.
                    logger.error("manifest \(winner): its copy of \(key.identity) cannot be read back; no event for it")
                    continue
                }
                upserts.append((key.identity, o.upsertEvent))
            }
            if let blocked {
                let f = blocked.file
                if !previous.heldBack.contains(f) {
                    logger.warning("manifest \(f) defines \(blocked.key.identity), which \(blocked.by) defines too and no longer holds as it was applied; \(f) waits until \(blocked.by)'s change is applied")
                }
                next.heldBack.insert(f)
                fresh[f] = nil
                next.stamps[f] = previous.stamps[f]
                next.files[f] = previous.files[f]
                next.applied[f] = previous.applied[f]
                if let c = previous.candidates[f] { next.candidates[f] = c }
                continue
            }
            next.definers = definers
            next.shadowed = shadowed
            deletes.sort { $0.0 < $1.0 }
            upserts.sort { $0.0 < $1.0 }
            return deletes.map(\.1) + upserts.map(\.1)
        }
    }

    /// A file's objects read again (for a copy that starts losing to a later file's), without
    /// reporting its rejections a second time; nil when it cannot be read or parsed.
    private func readBack(_ name: String) -> [KubeObjectKey: KubeObject]? {
        guard let data = FileManager.default.contents(atPath: directory + "/" + name), data.count <= maximumManifestBytes,
              let parsed = try? ManifestParser.parse(String(decoding: data, as: UTF8.self), file: name, limits: limits)
        else { return nil }
        var byKey: [KubeObjectKey: KubeObject] = [:]
        for o in parsed.objects { byKey[o.key] = o }
        return byKey
    }

    /// Carries a file's applied state over unchanged.
    private func keep(_ name: String, from previous: Snapshot, into next: inout Snapshot) {
        next.stamps[name] = previous.stamps[name]
        if let objs = previous.files[name] { next.files[name] = objs }
        next.applied[name] = previous.applied[name]
    }

    /// The objects of a file's new content; nil when the file is rejected (its previous
    /// objects stay).
    private func read(data: Data, name: String) -> [KubeObject]? {
        guard data.count <= maximumManifestBytes else {
            reject(ObjectRejection(kind: "file", key: name, reason: "\(data.count) bytes is more than the \(maximumManifestBytes) accepted; keeping its previous objects"))
            return nil
        }
        let text = String(decoding: data, as: UTF8.self)
        do {
            let parsed = try ManifestParser.parse(text, file: name, limits: limits)
            for r in parsed.rejections { reject(r) }
            return parsed.objects
        } catch let e as ManifestLimitError {
            reject(ObjectRejection(kind: "file", key: name, reason: "\(e); keeping its previous objects"))
            return nil
        } catch {
            reject(ObjectRejection(kind: "file", key: name, reason: "not valid YAML (\(String(describing: error).prefix(300))); keeping its previous objects"))
            return nil
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
                    logger.info("manifest directory \(directory): \(first.objectCount) objects")
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
