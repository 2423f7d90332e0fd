// Sluice: a per-node Kubernetes service proxy.
// Builders for the JSON objects tests put into the fake API server, and a log capture.

import Foundation
import Logging
import Synchronization

/// JSON trees of the objects a proxy reads, shaped as the API server serves them.
public enum FakeObjects {
    /// A ClusterIP (or NodePort, with `nodePort`) Service with TCP ports `(name, port)`.
    public static func service(_ name: String, namespace: String = "default", clusterIP: String,
                               ports: [(name: String, port: Int)] = [("http", 80)], type: String = "ClusterIP",
                               nodePort: Int? = nil, labels: [String: String] = [:]) -> [String: Any] {
        var spec: [String: Any] = [
            "type": type, "clusterIP": clusterIP, "clusterIPs": [clusterIP], "sessionAffinity": "None",
            "ports": ports.map { p -> [String: Any] in
                var port: [String: Any] = ["name": p.name, "port": p.port, "protocol": "TCP", "targetPort": p.port]
                if let n = nodePort { port["nodePort"] = n }
                return port
            },
        ]
        spec["internalTrafficPolicy"] = "Cluster"
        if type != "ClusterIP" { spec["externalTrafficPolicy"] = "Cluster" }
        var meta: [String: Any] = ["name": name, "namespace": namespace, "uid": UUID().uuidString.lowercased()]
        if !labels.isEmpty { meta["labels"] = labels }
        return ["metadata": meta, "spec": spec, "status": ["loadBalancer": [String: Any]()]]
    }

    /// An IPv4 EndpointSlice of Service `service` with ready endpoints at `addresses` on `port`.
    public static func endpointSlice(_ name: String, namespace: String = "default", service: String, addresses: [String],
                                     portName: String = "http", port: Int = 8080, nodeName: String? = nil,
                                     labels: [String: String] = [:]) -> [String: Any] {
        var allLabels = labels
        allLabels["kubernetes.io/service-name"] = service
        allLabels["endpointslice.kubernetes.io/managed-by"] = "endpointslice-controller.k8s.io"
        return [
            "metadata": ["name": name, "namespace": namespace, "labels": allLabels, "generateName": "\(service)-"],
            "addressType": "IPv4",
            "ports": [["name": portName, "port": port, "protocol": "TCP"]],
            "endpoints": addresses.map { a -> [String: Any] in
                var e: [String: Any] = ["addresses": [a], "conditions": ["ready": true, "serving": true, "terminating": false]]
                if let n = nodeName { e["nodeName"] = n }
                return e
            },
        ]
    }

    /// A networking.k8s.io/v1 ServiceCIDR with the given ranges.
    public static func serviceCIDR(_ name: String, _ cidrs: [String]) -> [String: Any] {
        ["metadata": ["name": name], "spec": ["cidrs": cidrs]]
    }

    /// A Node with an InternalIP, pod CIDRs and labels.
    public static func node(_ name: String, internalIP: String, podCIDRs: [String] = [], labels: [String: String] = [:]) -> [String: Any] {
        var allLabels = labels
        allLabels["kubernetes.io/hostname"] = name
        var spec: [String: Any] = [:]
        if !podCIDRs.isEmpty {
            spec["podCIDR"] = podCIDRs[0]
            spec["podCIDRs"] = podCIDRs
        }
        return [
            "metadata": ["name": name, "labels": allLabels],
            "spec": spec,
            "status": ["addresses": [["type": "InternalIP", "address": internalIP], ["type": "Hostname", "address": name]]],
        ]
    }
}

/// Captures every log line (all levels, metadata included) for assertions.
public final class LogCapture: Sendable {
    private let lines_ = Mutex<[String]>([])

    /// Creates an empty capture.
    public init() {}

    /// A logger writing into this capture at trace level.
    public func logger(label: String = "test") -> Logger {
        var l = Logger(label: label) { label in CapturingHandler(label: label, capture: self) }
        l.logLevel = .trace
        return l
    }

    /// Every line so far: `LEVEL label: message metadata`.
    public var lines: [String] { lines_.withLock { $0 } }

    /// Whether any line contains `text`.
    public func contains(_ text: String) -> Bool { lines.contains { $0.contains(text) } }

    func append(_ line: String) { lines_.withLock { $0.append(line) } }
}

struct CapturingHandler: LogHandler {
    let label: String
    let capture: LogCapture
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let all = metadata.merging(event.metadata ?? [:]) { _, b in b }
        let meta = all.isEmpty ? "" : " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let error = event.error.map { " error=\($0)" } ?? ""
        capture.append("\(event.level) \(label): \(event.message)\(meta)\(error)")
    }
}
