// Sluice: a per-node Kubernetes service proxy.
// The IPVS client interface, and its implementation over generic netlink.

import Netlink
import SluiceCore

/// One change to the kernel's IPVS table.
public enum IPVSOperation: Hashable, Sendable, CustomStringConvertible {
    /// `IPVS_CMD_NEW_SERVICE`.
    case addService(VirtualServer)
    /// `IPVS_CMD_SET_SERVICE`.
    case updateService(VirtualServer)
    /// `IPVS_CMD_DEL_SERVICE`.
    case deleteService(VirtualServerKey)
    /// `IPVS_CMD_NEW_DEST`.
    case addDestination(VirtualServerKey, RealServer)
    /// `IPVS_CMD_SET_DEST`.
    case updateDestination(VirtualServerKey, RealServer)
    /// `IPVS_CMD_DEL_DEST`.
    case deleteDestination(VirtualServerKey, RealServer)

    public var description: String {
        switch self {
        case .addService(let vs): return "add service \(vs.key) \(vs.scheduler)"
        case .updateService(let vs): return "update service \(vs.key) \(vs.scheduler)"
        case .deleteService(let k): return "delete service \(k)"
        case .addDestination(let k, let rs): return "add destination \(k) -> \(rs) weight \(rs.weight)"
        case .updateDestination(let k, let rs): return "update destination \(k) -> \(rs) weight \(rs.weight)"
        case .deleteDestination(let k, let rs): return "delete destination \(k) -> \(rs)"
        }
    }
}

/// A failed operation with the kernel's answer.
public struct IPVSOperationFailure: Error, Hashable, Sendable, CustomStringConvertible {
    /// What was attempted.
    public var operation: IPVSOperation
    /// The kernel's answer.
    public var error: NetlinkError

    /// Creates a failure.
    public init(operation: IPVSOperation, error: NetlinkError) {
        self.operation = operation
        self.error = error
    }

    public var description: String { "\(operation): \(error.errno)\(error.message.map { ": \($0)" } ?? "")" }
}

/// The kernel's IPVS table, as the backend needs it. The real one speaks generic netlink;
/// tests use an in-memory fake.
public protocol IPVSClient: Sendable {
    /// Version and connection-table size.
    func info() async throws -> IPVSInfo
    /// Every service (TCP/UDP/SCTP, both families) in this network namespace.
    func services() async throws -> [VirtualServer]
    /// The destinations of one service, with their connection counters.
    func destinations(of key: VirtualServerKey) async throws -> [RealServer]
    /// Applies `operations` in order (batched), and returns the ones that failed.
    func apply(_ operations: [IPVSOperation]) async throws -> [IPVSOperationFailure]
    /// Deletes every service (`ipvsadm -C`).
    func flush() async throws
    /// Sets the non-zero timeouts (`ipvsadm --set`).
    func setTimeouts(_ timeouts: IPVSTimeouts) async throws
    /// Reads the timeouts.
    func timeouts() async throws -> IPVSTimeouts
}

/// IPVS over the generic-netlink family `IPVS`.
public struct GenericNetlinkIPVSClient: IPVSClient {
    /// The socket (or a scripted fake).
    public let executor: any NetlinkExecutor
    /// The message builder for the resolved family id.
    public let messages: IPVSMessages

    /// Wraps an executor and a resolved family id.
    public init(executor: any NetlinkExecutor, familyID: UInt16) {
        self.executor = executor
        self.messages = IPVSMessages(familyID: familyID)
    }

    /// Opens a generic-netlink socket and resolves the `IPVS` family; resolving it makes the
    /// kernel try to load `ip_vs` on demand.
    /// - Returns: the client, or nil when the kernel has no IPVS.
    public static func connect() async throws -> GenericNetlinkIPVSClient? {
        let connection = try NetlinkConnection(protocol: NetlinkProtocol.generic)
        guard let family = try await connection.resolveFamily(ipvsFamilyName) else { return nil }
        return GenericNetlinkIPVSClient(executor: connection, familyID: family.id)
    }

    private func decode<T>(_ operation: String, _ body: () throws(NetlinkDecodeError) -> T) throws -> T {
        do {
            return try body()
        } catch {
            throw NetlinkError(errno: .badMessage, message: error.description, operation: operation)
        }
    }

    public func info() async throws -> IPVSInfo {
        let replies = try await executor.execute(messages.getInfo())
        guard let first = replies.first else {
            throw NetlinkError(errno: .badMessage, message: "no reply", operation: IPVSCommand.getInfo.cName)
        }
        return try decode(IPVSCommand.getInfo.cName) { () throws(NetlinkDecodeError) in try IPVSMessages.parseInfo(first) }
    }

    public func services() async throws -> [VirtualServer] {
        let replies = try await executor.execute(messages.dumpServices())
        return try decode(IPVSCommand.getService.cName) { () throws(NetlinkDecodeError) in
            var out: [VirtualServer] = []
            for m in replies { if let vs = try IPVSMessages.parseService(m) { out.append(vs) } }
            return out
        }
    }

    public func destinations(of key: VirtualServerKey) async throws -> [RealServer] {
        let replies = try await executor.execute(messages.dumpDestinations(key))
        return try decode("\(IPVSCommand.getDestination.cName) \(key)") { () throws(NetlinkDecodeError) in
            try replies.map { m throws(NetlinkDecodeError) in try IPVSMessages.parseDestination(m, serviceFamily: key.address.family) }
        }
    }

    /// The request for one operation.
    public func request(_ op: IPVSOperation) -> NetlinkRequest {
        switch op {
        case .addService(let vs): return messages.newService(vs)
        case .updateService(let vs): return messages.setService(vs)
        case .deleteService(let k): return messages.deleteService(k)
        case .addDestination(let k, let rs): return messages.newDestination(k, rs)
        case .updateDestination(let k, let rs): return messages.setDestination(k, rs)
        case .deleteDestination(let k, let rs): return messages.deleteDestination(k, rs)
        }
    }

    public func apply(_ operations: [IPVSOperation]) async throws -> [IPVSOperationFailure] {
        guard !operations.isEmpty else { return [] }
        let results = try await executor.executeBatch(operations.map(request))
        var failures: [IPVSOperationFailure] = []
        for (op, r) in zip(operations, results) {
            if case .failure(let e) = r { failures.append(IPVSOperationFailure(operation: op, error: e)) }
        }
        return failures
    }

    public func flush() async throws {
        _ = try await executor.execute(messages.flush())
    }

    public func setTimeouts(_ timeouts: IPVSTimeouts) async throws {
        guard timeouts.tcp > 0 || timeouts.tcpFin > 0 || timeouts.udp > 0 else { return }
        _ = try await executor.execute(messages.setConfig(timeouts))
    }

    public func timeouts() async throws -> IPVSTimeouts {
        let replies = try await executor.execute(messages.getConfig())
        guard let first = replies.first else { return IPVSTimeouts() }
        return try decode(IPVSCommand.getConfig.cName) { () throws(NetlinkDecodeError) in try IPVSMessages.parseConfig(first) }
    }
}
