// Sluice: a per-node Kubernetes service proxy.
// Extended accounting objects (nfnetlink_acct, NFNL_SUBSYS_ACCT): the named packet counters
// iptables' `-m nfacct --nfacct-name NAME` match adds to. kube-proxy keeps two of them
// (ct_state_invalid_dropped_pkts, localhost_nps_accepted_pkts) and exports their packet
// counts as metrics.

/// nfacct messages and the small client kube-proxy's use needs: make sure an object exists,
/// read its packet count.
public enum NFAcct {
    /// `NFNL_SUBSYS_ACCT`.
    public static let subsystem: UInt16 = 7
    /// `NFNL_MSG_ACCT_NEW`.
    public static let msgNew: UInt16 = 0
    /// `NFNL_MSG_ACCT_GET`.
    public static let msgGet: UInt16 = 1
    /// `NFACCT_NAME` (NUL-terminated, at most 31 characters).
    public static let attrName: UInt16 = 1
    /// `NFACCT_PKTS` (`__be64`).
    public static let attrPackets: UInt16 = 2

    private static func request(_ message: UInt16, name: String, flags: NetlinkMessageFlags) -> NetlinkRequest {
        // struct nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0.
        let payload: [UInt8] = [0, 0, 0, 0] + [NetlinkAttribute.string(attrName, name)].encoded()
        return NetlinkRequest(type: subsystem << 8 | message, flags: flags, payload: payload,
                              operation: "\(message == msgNew ? "NFNL_MSG_ACCT_NEW" : "NFNL_MSG_ACCT_GET") \(name)")
    }

    /// Creates the object `name` (fails with EBUSY when it exists).
    public static func newRequest(_ name: String) -> NetlinkRequest { request(msgNew, name: name, flags: [.request, .ack, .create]) }

    /// Reads the object `name` (fails with ENOENT when it does not exist).
    public static func getRequest(_ name: String) -> NetlinkRequest { request(msgGet, name: name, flags: [.request, .ack]) }

    /// The packet count in a reply to `getRequest`, nil when the reply has none.
    public static func packets(in message: NetlinkMessage) throws -> UInt64? {
        guard message.payload.count >= 4 else { throw NetlinkDecodeError("nfacct reply without nfgenmsg") }
        let attrs = try NetlinkAttributes(parsing: Array(message.payload.dropFirst(4)))
        guard let a = attrs[attrPackets], a.payload.count >= 8 else { return nil }
        return a.payload.readBigEndian(UInt64.self, at: 0)
    }
}

/// The nfacct objects of the process's network namespace.
public struct NFAcctCounters: Sendable {
    private let connection: NetlinkConnection

    /// Opens a `NETLINK_NETFILTER` socket.
    public init() throws {
        connection = try NetlinkConnection(protocol: NetlinkProtocol.netfilter)
    }

    /// Whether `name` exists (read-only: one `NFNL_MSG_ACCT_GET`; any error counts as absent).
    public func exists(_ name: String) async -> Bool {
        (try? await connection.execute(NFAcct.getRequest(name))) != nil
    }

    /// Makes sure `name` exists: reads it, and creates it when it does not.
    public func ensure(_ name: String) async throws {
        if await exists(name) { return }
        _ = try await connection.execute(NFAcct.newRequest(name))
    }

    /// The packet count of `name`.
    public func packets(_ name: String) async throws -> UInt64 {
        for m in try await connection.execute(NFAcct.getRequest(name)) {
            if let p = try NFAcct.packets(in: m) { return p }
        }
        throw NetlinkDecodeError("no NFACCT_PKTS in the reply for \(name)")
    }
}
