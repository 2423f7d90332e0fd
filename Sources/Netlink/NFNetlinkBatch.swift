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

/// An nfnetlink batch encoded in place, message by message, into one buffer: for
/// transactions too large to keep as separate requests (a full sync of 10 000 Services is
/// about half a million messages). Sequence numbers count from 1 (`BATCH_BEGIN`).
public struct NFNetlinkBatchBuffer: Sendable {
    /// The datagram so far.
    public private(set) var bytes: [UInt8] = []
    /// Messages between begin and end.
    public private(set) var count = 0
    /// The subsystem (`NFNL_SUBSYS_NFTABLES` is 10).
    public let subsystem: UInt16
    private var lastOffset: Int?
    /// Whether ``end()`` was called.
    public private(set) var ended = false
    /// The sequence number whose acknowledgement ends the replies (set by ``end()``; nil for
    /// an empty batch).
    public private(set) var ackSequence: UInt32?

    /// Starts a batch with its begin message.
    public init(subsystem: UInt16) {
        self.subsystem = subsystem
        append(marker: NFNetlinkBatch.beginType)
    }

    private mutating func append(marker type: UInt16) {
        var payload: [UInt8] = [0, 0]
        payload.appendBigEndian(subsystem)
        NetlinkRequest(type: type, flags: [.request], payload: payload, operation: "")
            .message(sequence: UInt32(count + (ended ? 2 : 1))).encode(into: &bytes)
    }

    /// Appends one message (its sequence number is its index from 1, plus 1 for the begin).
    public mutating func append(_ request: NetlinkRequest) {
        precondition(!ended, "the batch was ended")
        var r = request
        r.flags.remove(.ack)
        lastOffset = bytes.count
        count += 1
        r.message(sequence: UInt32(count + 1)).encode(into: &bytes)
    }

    /// The sequence number of message `index` (from 0).
    public static func sequence(ofMessage index: Int) -> UInt32 { UInt32(index + 2) }

    /// Asks the last message for an acknowledgement and appends the end message; returns the
    /// sequence number of the acknowledgement (nil for an empty batch).
    @discardableResult
    public mutating func end() -> UInt32? {
        guard !ended else { return ackSequence }
        if let lastOffset {
            // nlmsghdr: length (4), type (2), flags (2, host order).
            let flags = UInt16(bytes[lastOffset + 6]) | UInt16(bytes[lastOffset + 7]) << 8 | NetlinkMessageFlags.ack.rawValue
            bytes[lastOffset + 6] = UInt8(flags & 0xff)
            bytes[lastOffset + 7] = UInt8(flags >> 8)
        }
        ended = true
        append(marker: NFNetlinkBatch.endType)
        ackSequence = count == 0 ? nil : UInt32(count + 1)
        return ackSequence
    }

    /// The message with sequence number `sequence`, decoded (for naming a failed one).
    public func message(sequence: UInt32) -> NetlinkMessage? {
        var offset = 0
        while offset + netlinkHeaderSize <= bytes.count {
            let length = Int(bytes.readHost(UInt32.self, at: offset))
            guard length >= netlinkHeaderSize, offset + length <= bytes.count else { return nil }
            if bytes.readHost(UInt32.self, at: offset + 8) == sequence {
                return try? NetlinkMessage.decodeAll(Array(bytes[offset..<(offset + length)])).first
            }
            offset += netlinkAlign(length)
        }
        return nil
    }
}
