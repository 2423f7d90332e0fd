// Sluice: a per-node Kubernetes service proxy.
// What the proxy takes from its own Node object: the node IPs (when --node-ip is not given)
// and the pod CIDRs (--detect-local-mode NodeCIDR). Both are compiled into every rule set, so
// when the Node later reports different ones the proxy exits and its DaemonSet restarts it
// with the new values (newer kube-proxy does the same).

import SluiceCore

extension Node {
    /// The node's host IPs as kube-proxy picks them (`GetNodeHostIPs`): InternalIP addresses
    /// first, then ExternalIP; the first of them, then the first of the other family.
    public var hostIPs: [IPAddress] {
        let ordered = (addresses.filter { $0.type == "InternalIP" } + addresses.filter { $0.type == "ExternalIP" })
            .compactMap { IPAddress($0.address) }
        guard let first = ordered.first else { return [] }
        let other = ordered.first { $0.family != first.family }
        return [first] + (other.map { [$0] } ?? [])
    }

    /// `spec.podCIDRs` that parse as CIDRs.
    public var podCIDRValues: [CIDR] { podCIDRs.compactMap(CIDR.init) }
}

/// The Node facts a running proxy was configured with.
public struct NodeDependency: Sendable, Hashable {
    /// The node's name.
    public var nodeName: String
    /// The node IPs taken from the Node object; nil when they came from `--node-ip`.
    public var nodeIPs: [IPAddress]?
    /// The pod CIDRs taken from the Node object; nil unless `--detect-local-mode NodeCIDR`.
    public var podCIDRs: [String]?

    /// Creates a dependency record.
    public init(nodeName: String, nodeIPs: [IPAddress]? = nil, podCIDRs: [String]? = nil) {
        self.nodeName = nodeName
        self.nodeIPs = nodeIPs
        self.podCIDRs = podCIDRs
    }

    /// Whether anything was taken from the Node.
    public var isEmpty: Bool { nodeIPs == nil && podCIDRs == nil }

    /// Why `node` no longer matches what the proxy runs with, nil when it still does. A Node
    /// that reports no addresses or no pod CIDRs (yet) is not a change.
    public func change(in node: Node) -> String? {
        guard node.name == nodeName else { return nil }
        if let ips = nodeIPs {
            let now = node.hostIPs
            if !now.isEmpty && now != ips {
                return "node \(nodeName)'s IPs changed from \(ips.map(\.description).joined(separator: ",")) to \(now.map(\.description).joined(separator: ","))"
            }
        }
        if let cidrs = podCIDRs, !node.podCIDRs.isEmpty, node.podCIDRs != cidrs {
            return "node \(nodeName)'s podCIDRs changed from \(cidrs.joined(separator: ",")) to \(node.podCIDRs.joined(separator: ","))"
        }
        return nil
    }

    /// Passes `upstream` through, and ends it with `NodeChanged` as soon as the Node reports
    /// IPs or pod CIDRs other than those the proxy was configured with.
    public func guarding(_ upstream: AsyncThrowingStream<ObjectEvent, Error>) -> AsyncThrowingStream<ObjectEvent, Error> {
        if isEmpty { return upstream }
        let (stream, continuation) = AsyncThrowingStream<ObjectEvent, Error>.makeStream()
        let task = Task {
            do {
                for try await e in upstream {
                    if case .nodeUpserted(let n) = e, let why = change(in: n) {
                        continuation.finish(throwing: NodeChanged(reason: why))
                        return
                    }
                    continuation.yield(e)
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }
}

/// The Node changed in a way that needs a restart.
public struct NodeChanged: Error, Sendable, Hashable, CustomStringConvertible {
    /// What changed.
    public var reason: String
    public var description: String { "\(reason); exiting so that the proxy restarts with the new values" }
}
