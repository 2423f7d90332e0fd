// Sluice: a per-node Kubernetes service proxy.
// Matching replies to requests: acknowledgements, errors with extended-ack text, multi-part
// dumps ended by NLMSG_DONE, interrupted dumps. Pure, so it is tested without a kernel.

/// Collects the replies to one or more requests sent together, by sequence number.
public struct ReplyCollector: Sendable {
    private struct Pending: Sendable {
        var request: NetlinkRequest
        var messages: [NetlinkMessage] = []
        var interrupted = false
        var result: Result<[NetlinkMessage], NetlinkError>?
    }

    private var pending: [UInt32: Pending] = [:]
    private let order: [UInt32]
    private var open: Int

    /// Starts collecting for `requests`, each with the sequence number it was sent with.
    public init(_ requests: [(sequence: UInt32, request: NetlinkRequest)]) {
        for (seq, r) in requests { pending[seq] = Pending(request: r) }
        order = requests.map(\.sequence)
        open = pending.count
    }

    /// True once every request has its final answer.
    public var isComplete: Bool { open == 0 }

    /// Sequence numbers still waiting for an answer.
    public var waiting: [UInt32] { order.filter { pending[$0]?.result == nil } }

    /// Takes one received message. Messages for other sequence numbers (stale replies) and
    /// messages after a request's final answer are ignored.
    public mutating func consume(_ m: NetlinkMessage) throws(NetlinkDecodeError) {
        // Taken out of the dictionary while it changes: a copy left behind would share the
        // messages array, and every append would copy it whole (quadratic in a dump's size:
        // seconds for the 20 000 virtual servers or addresses of a large node).
        guard var p = pending.removeValue(forKey: m.sequence) else { return }
        defer { pending[m.sequence] = p }
        guard p.result == nil else { return }
        switch m.type {
        case NetlinkMessageType.noop:
            return
        case NetlinkMessageType.error:
            let ack = try NetlinkAcknowledgement(parsing: m)
            if ack.error == 0 {
                finish(&p, .success(p.messages))
            } else {
                finish(&p, .failure(NetlinkError(errno: Errno(rawValue: ack.error), message: ack.message, operation: p.request.operation)))
            }
        case NetlinkMessageType.done:
            // A dump that failed part-way reports a negative errno (and maybe extended-ack
            // attributes) in NLMSG_DONE's payload.
            if m.payload.count >= 4 {
                let raw = m.payload.readHost(Int32.self, at: 0)
                if raw < 0 {
                    var text: String?
                    if m.flags.contains(.ackTLVs), m.payload.count > 4 {
                        text = try NetlinkAttributes(parsing: Array(m.payload[4...])).string(NetlinkErrorAttribute.message)
                    }
                    let errno = Errno(rawValue: raw == Int32.min ? Int32.max : -raw)
                    finish(&p, .failure(NetlinkError(errno: errno, message: text, operation: p.request.operation)))
                    return
                }
            }
            if p.interrupted {
                finish(&p, .failure(NetlinkError(errno: .interrupted, message: "dump interrupted (NLM_F_DUMP_INTR): the table changed while it was read",
                                                 operation: p.request.operation)))
            } else {
                finish(&p, .success(p.messages))
            }
        case NetlinkMessageType.overrun:
            finish(&p, .failure(NetlinkError(errno: .noBufferSpace, message: "NLMSG_OVERRUN", operation: p.request.operation)))
        default:
            if m.flags.contains(.dumpInterrupted) { p.interrupted = true }
            p.messages.append(m)
            // A single reply to a request that asked for no acknowledgement is final.
            if !p.request.isDump && !p.request.flags.contains(.ack) && !m.flags.contains(.multi) {
                finish(&p, .success(p.messages))
            }
        }
    }

    private mutating func finish(_ p: inout Pending, _ r: Result<[NetlinkMessage], NetlinkError>) {
        p.result = r
        open -= 1
    }

    /// The answers, in the order the requests were given; a request without an answer yet
    /// gets a `timedOut` error.
    public func results() -> [Result<[NetlinkMessage], NetlinkError>] {
        order.map { seq in
            guard let p = pending[seq] else {
                return .failure(NetlinkError(errno: .badMessage, operation: "sequence \(seq)"))
            }
            return p.result ?? .failure(NetlinkError(errno: .timedOut, message: "no answer from the kernel", operation: p.request.operation))
        }
    }
}

/// Something that sends netlink requests and returns their replies: the real socket, or a
/// scripted fake in tests.
public protocol NetlinkExecutor: Sendable {
    /// Sends one request and returns its data replies (empty for a bare acknowledgement).
    /// Throws `NetlinkError` for a kernel error, a socket error or a malformed reply.
    func execute(_ request: NetlinkRequest) async throws -> [NetlinkMessage]

    /// Sends several requests (never dumps) in as few `sendmsg` calls as fit, and returns each
    /// one's outcome in order. Throws only when the socket itself fails.
    func executeBatch(_ requests: [NetlinkRequest]) async throws -> [Result<[NetlinkMessage], NetlinkError>]
}
