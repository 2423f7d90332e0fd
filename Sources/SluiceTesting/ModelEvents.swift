// Sluice: a per-node Kubernetes service proxy.
// Object events from manifest text, for tests that walk a change tracker through a sequence.

import KubeAPI
import SluiceCore

/// Object events for tests.
public enum ModelEvents {
    /// The upsert event of every object in `yaml` (parse errors throw; rejected documents are skipped).
    public static func upserts(_ yaml: String) throws -> [ObjectEvent] {
        try ManifestParser.parse(yaml, file: "events.yaml").objects.map(\.upsertEvent)
    }

    /// The delete event of every object in `yaml`.
    public static func deletes(_ yaml: String) throws -> [ObjectEvent] {
        try ManifestParser.parse(yaml, file: "events.yaml").objects.map(\.deleteEvent)
    }
}
