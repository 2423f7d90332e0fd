// Sluice: a per-node Kubernetes service proxy.
// The manifest-directory source: every *.yaml / *.yml / *.json file in a directory, watched.
// Adding, editing or deleting a file produces the matching object events.

import Foundation
import Logging
import SluiceCore
import Yams

/// The largest manifest file read (bigger ones are rejected whole, with a log line).
public let maximumManifestBytes = 64 << 20

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
    public static func parse(_ text: String, file: String) throws -> Parsed {
        var out = Parsed()
        var index = 0
        // Parse every document before using any: a syntax error anywhere fails the whole file.
        let docs = try YAMLTrees.documents(text)
        for doc in docs {
            defer { index += 1 }
            if doc is NSNull { continue }
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
}

/// Watches a directory of manifests and streams object events.
///
/// The directory is rescanned every `interval`; only files whose size, modification time or
/// inode changed are re-read. A file that stops parsing keeps its previous objects (a typo
/// in an editor never deletes a Service); a file that is removed deletes its objects.
public final class ManifestDirectorySource: Sendable {
    /// The directory watched.
    public let directory: String
    /// Time between scans.
    public let interval: Duration
    private let logger: Logger
    /// Called for every document that cannot be used.
    private let onRejection: @Sendable (ObjectRejection) -> Void

    /// Creates a source.
    public init(directory: String, interval: Duration = .milliseconds(250), logger: Logger,
                onRejection: @escaping @Sendable (ObjectRejection) -> Void = { _ in }) {
        self.directory = directory
        self.interval = interval
        self.logger = logger
        self.onRejection = onRejection
    }

    /// The state of one scan: objects per file.
    public struct Snapshot: Sendable {
        fileprivate var stamps: [String: FileStampBox] = [:]
        fileprivate var objects: [String: [KubeObject]] = [:]

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
    }

    fileprivate struct FileStampBox: Sendable, Hashable {
        var size: Int
        var mtime: Double
        var inode: Int
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
        var next = Snapshot()
        for name in names {
            let path = directory + "/" + name
            guard let attrs = try? fm.attributesOfItem(atPath: path),
                  (attrs[.type] as? FileAttributeType) == .typeRegular || (attrs[.type] as? FileAttributeType) == .typeSymbolicLink
            else { continue }
            let stamp = FileStampBox(
                size: (attrs[.size] as? NSNumber)?.intValue ?? 0,
                mtime: (attrs[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0,
                inode: (attrs[.systemFileNumber] as? NSNumber)?.intValue ?? 0)
            next.stamps[name] = stamp
            if previous.stamps[name] == stamp, let objs = previous.objects[name] {
                next.objects[name] = objs
                continue
            }
            next.objects[name] = read(path: path, name: name, previous: previous.objects[name])
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

    private func read(path: String, name: String, previous: [KubeObject]?) -> [KubeObject] {
        guard let data = FileManager.default.contents(atPath: path) else {
            logger.warning("cannot read manifest \(path); keeping its previous objects")
            return previous ?? []
        }
        guard data.count <= maximumManifestBytes else {
            onRejection(ObjectRejection(kind: "file", key: name, reason: "\(data.count) bytes is more than the \(maximumManifestBytes) accepted"))
            return previous ?? []
        }
        let text = String(decoding: data, as: UTF8.self)
        do {
            let parsed = try ManifestParser.parse(text, file: name)
            for r in parsed.rejections { onRejection(r) }
            return parsed.objects
        } catch {
            onRejection(ObjectRejection(kind: "file", key: name, reason: "not valid YAML (\(String(describing: error).prefix(300))); keeping its previous objects"))
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
