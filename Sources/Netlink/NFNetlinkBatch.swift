// Sluice: a per-node Kubernetes service proxy.
// nfnetlink batches (include/uapi/linux/netfilter/nfnetlink.h): NFNL_MSG_BATCH_BEGIN, the
// subsystem's messages, NFNL_MSG_BATCH_END, all in one datagram; the subsystem (nf_tables)
// applies the messages between them as one transaction, all or nothing.

/// Builds the framing of an nfnetlink batch.
public enum NFNetlinkBatch {
    /// `NFNL_MSG_BATCH_BEGIN` (`NLMSG_MIN_TYPE`).
    public static let beginType: UInt16 = 0x10
    /// `NFNL_MSG_BATCH_END`.
    public static let endType: UInt16 = 0x11

    private static func marker(_ type: UInt16, subsystem: UInt16, name: String) -> NetlinkRequest {
        // struct nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id = the subsystem (big-endian).
        var payload: [UInt8] = [0, 0]
        payload.appendBigEndian(subsystem)
        return NetlinkRequest(type: type, flags: [.request], payload: payload, operation: name)
    }

    /// `requests` between a begin and an end message for `subsystem` (`NFNL_SUBSYS_NFTABLES`
    /// is 10). The last request of `requests` asks for an acknowledgement (see
    /// ``NetlinkConnection/executeInOneDatagram(_:)``); the others report only errors.
    public static func wrap(_ requests: [NetlinkRequest], subsystem: UInt16) -> [NetlinkRequest] {
        var out: [NetlinkRequest] = []
        out.reserveCapacity(requests.count + 2)
        out.append(marker(beginType, subsystem: subsystem, name: "NFNL_MSG_BATCH_BEGIN"))
        for (i, var r) in requests.enumerated() {
            if i == requests.count - 1 { r.flags.insert(.ack) } else { r.flags.remove(.ack) }
            out.append(r)
        }
        out.append(marker(endType, subsystem: subsystem, name: "NFNL_MSG_BATCH_END"))
        return out
    }
}
