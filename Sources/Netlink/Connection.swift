// Sluice: a per-node Kubernetes service proxy.
// A netlink socket confined to an actor: one request (or a batch of requests in one
// sendmsg) at a time, replies matched by sequence number.

internal import CNetlink

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A netlink socket of one protocol (`NETLINK_GENERIC`, `NETLINK_ROUTE`, `NETLINK_NETFILTER`).
///
/// Every syscall goes through `syscallRetryingEINTR`. The kernel answers netlink requests
/// synchronously (the reply is queued before `sendmsg` returns, dumps continue inside
/// `recvmsg`), so the blocking calls here are short; a receive timeout guards against a
/// reply that never comes.
public actor NetlinkConnection: NetlinkExecutor {
    /// The netlink protocol of the socket.
    public nonisolated let netlinkProtocol: Int32
    private let fd: Int32
    private var nextSequence: UInt32
    private var buffer: [UInt8] = []
    /// Bytes of requests put into one `sendmsg` at most. Replies to a batch (acks of 20 to 36
    /// bytes each, errors with their text) must fit the socket's receive buffer.
    public static let batchBytes = 64 * 1024
    /// Requests put into one `sendmsg` at most. The kernel queues one reply per request before
    /// the first is read, and counts each by its buffer's true size (about 700 bytes for an
    /// ack, not its 36): past the receive buffer the rest are dropped and the next receive
    /// fails with ENOBUFS. 256 acks fit the 416 KiB a socket gets under the common
    /// `net.core.rmem_max` of 208 KiB (the kernel doubles it); 1 000 did not (seen in
    /// user-mode Linux, 1 000 IPVS services in one sync).
    public static let batchRequests = 256
    /// Requests sent, in total (for logs and tests).
    public private(set) var requestsSent = 0
    /// `sendmsg` calls made, in total.
    public private(set) var sendCalls = 0

    /// Opens and binds a socket.
    /// - Parameters:
    ///   - netlinkProtocol: e.g. `NetlinkProtocol.generic`.
    ///   - receiveTimeoutSeconds: how long a receive may wait before the request fails with `ETIMEDOUT`.
    public init(protocol netlinkProtocol: Int32, receiveTimeoutSeconds: Int = 10) throws {
        self.netlinkProtocol = netlinkProtocol
        let fd = socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), netlinkProtocol)
        guard fd >= 0 else {
            throw NetlinkError(errno: .current, operation: "socket(AF_NETLINK, \(netlinkProtocol))")
        }
        var addr = sockaddr_nl()
        addr.nl_family = sa_family_t(AF_NETLINK)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_nl>.size))
            }
        }
        if bound != 0 {
            let e = Errno.current
            close(fd)
            throw NetlinkError(errno: e, operation: "bind(AF_NETLINK, \(netlinkProtocol))")
        }
        var one: Int32 = 1
        // Best effort: older kernels lack these options; replies are then just longer.
        _ = setsockopt(fd, NetlinkProtocol.solNetlink, NetlinkProtocol.capAck, &one, socklen_t(MemoryLayout<Int32>.size))
        _ = setsockopt(fd, NetlinkProtocol.solNetlink, NetlinkProtocol.extAck, &one, socklen_t(MemoryLayout<Int32>.size))
        var size: Int32 = 1 << 20
        // Past net.core.rmem_max only with CAP_NET_ADMIN (SO_RCVBUFFORCE); else capped by it.
        if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        var tv = timeval(tv_sec: receiveTimeoutSeconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        self.fd = fd
        // Start from a time-derived value so replies left over from a previous socket with
        // the same port id can never match.
        self.nextSequence = UInt32(truncatingIfNeeded: time(nil))
    }

    deinit { close(fd) }

    private func takeSequence() -> UInt32 {
        nextSequence &+= 1
        if nextSequence == 0 { nextSequence = 1 }
        return nextSequence
    }

    /// Sends one request and returns its data replies. A dump interrupted by a concurrent
    /// change (`NLM_F_DUMP_INTR`) is retried up to three times.
    public func execute(_ request: NetlinkRequest) throws -> [NetlinkMessage] {
        var attempt = 0
        while true {
            attempt += 1
            let result = try roundTrip([request])[0]
            switch result {
            case .success(let messages):
                return messages
            case .failure(let e):
                if request.isDump && e.errno == .interrupted && attempt < 3 { continue }
                throw e
            }
        }
    }

    /// Sends several requests, packed into `sendmsg` calls of at most `batchBytes`, and
    /// returns each outcome in order. The kernel handles the messages of one datagram in
    /// order and answers each, so one failure does not stop the others.
    public func executeBatch(_ requests: [NetlinkRequest]) throws -> [Result<[NetlinkMessage], NetlinkError>] {
        var out: [Result<[NetlinkMessage], NetlinkError>] = []
        out.reserveCapacity(requests.count)
        var chunk: [NetlinkRequest] = []
        var chunkBytes = 0
        for r in requests {
            let size = netlinkAlign(netlinkHeaderSize + r.payload.count)
            if !chunk.isEmpty && (chunkBytes + size > NetlinkConnection.batchBytes || chunk.count == NetlinkConnection.batchRequests) {
                out += try roundTrip(chunk)
                chunk = []
                chunkBytes = 0
            }
            chunk.append(r)
            chunkBytes += size
        }
        if !chunk.isEmpty { out += try roundTrip(chunk) }
        return out
    }

    /// Sends `requests` in one datagram and returns the errors the kernel reported, by index
    /// into `requests` (empty: every message was accepted).
    ///
    /// For nfnetlink batches (``NFNetlinkBatch``): the kernel applies a batch only when it
    /// arrives whole in one datagram, so this never splits it, and raises the socket's send
    /// buffer (`SO_SNDBUFFORCE`) when the datagram does not fit. Only the last request should
    /// ask for an acknowledgement: the kernel reports errors of the others anyway, and after
    /// the last one's answer (or any error) every reply is already queued, so the rest is
    /// read without waiting.
    public func executeInOneDatagram(_ requests: [NetlinkRequest]) throws -> [(index: Int, error: NetlinkError)] {
        guard !requests.isEmpty else { return [] }
        var datagram: [UInt8] = []
        var indexBySequence: [UInt32: Int] = [:]
        var lastSequence: UInt32?
        for (i, r) in requests.enumerated() {
            let seq = takeSequence()
            r.message(sequence: seq).encode(into: &datagram)
            indexBySequence[seq] = i
            if r.flags.contains(.ack) { lastSequence = seq }
        }
        let operation = requests.count == 1 ? requests[0].operation : "\(requests.count) requests in one batch"
        requestsSent += requests.count
        return try exchange(datagram, ackSequence: lastSequence, operation: operation).compactMap { reported in
            indexBySequence[reported.sequence].map { i in
                (i, NetlinkError(errno: reported.error.errno, message: reported.error.message, operation: requests[i].operation))
            }
        }
    }

    /// Sends a datagram the caller encoded whole (an nfnetlink batch built in place, too large
    /// to keep as separate requests), whose last message asks for an acknowledgement with
    /// `ackSequence`, and returns the errors the kernel reported by sequence number (empty:
    /// every message was accepted). The sequence numbers are the caller's; replies are read
    /// until the acknowledgement or the first error, then whatever else is queued.
    public func executeEncodedBatch(_ datagram: [UInt8], ackSequence: UInt32, operation: String) throws -> [(sequence: UInt32, error: NetlinkError)] {
        guard !datagram.isEmpty else { return [] }
        return try exchange(datagram, ackSequence: ackSequence, operation: operation)
    }

    /// Sends one datagram (raising the send buffer when it does not fit) and reads the
    /// kernel's answers: until the acknowledgement of `ackSequence` or the first error, then
    /// whatever else is already queued (with no `ackSequence`, only what is queued). Returns
    /// the errors by sequence number.
    private func exchange(_ datagram: [UInt8], ackSequence: UInt32?, operation: String) throws -> [(sequence: UInt32, error: NetlinkError)] {
        ensureSendBuffer(datagram.count)
        try send(datagram, operation: operation)
        sendCalls += 1
        var errors: [(sequence: UInt32, error: NetlinkError)] = []
        var finished = ackSequence == nil
        while true {
            let bytes: [UInt8]
            if !finished {
                bytes = try receive(operation: operation)
            } else {
                guard let b = try receiveIfQueued(operation: operation) else { break }
                bytes = b
            }
            let messages: [NetlinkMessage]
            do {
                messages = try NetlinkMessage.decodeAll(bytes)
            } catch {
                throw NetlinkError(errno: .badMessage, message: error.description, operation: operation)
            }
            for m in messages where m.type == NetlinkMessageType.error {
                let ack: NetlinkAcknowledgement
                do {
                    ack = try NetlinkAcknowledgement(parsing: m)
                } catch {
                    throw NetlinkError(errno: .badMessage, message: error.description, operation: operation)
                }
                if ack.error != 0 {
                    errors.append((m.sequence, NetlinkError(errno: Errno(rawValue: ack.error), message: ack.message, operation: operation)))
                    finished = true
                }
                if m.sequence == ackSequence { finished = true }
            }
        }
        return errors
    }

    /// The kernel refuses a datagram longer than the send buffer less 32 bytes: raise it
    /// (past `net.core.wmem_max` with CAP_NET_ADMIN) when `bytes` would not fit.
    private func ensureSendBuffer(_ bytes: Int) {
        var current: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &current, &length) == 0, bytes + 32 > Int(current) else { return }
        var size = Int32(clamping: bytes + 64 * 1024)
        if setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    /// Receives one datagram if one is queued; nil when none is.
    private func receiveIfQueued(operation: String) throws -> [UInt8]? {
        while true {
            let wanted = recv(fd, nil, 0, Int32(MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT))
            if wanted < 0 {
                let e = Errno.current
                if e == .interrupted { continue }
                if e == .wouldBlock { return nil }
                throw NetlinkError(errno: e, operation: "recv: \(operation)")
            }
            return try receive(operation: operation)
        }
    }

    private func roundTrip(_ requests: [NetlinkRequest]) throws -> [Result<[NetlinkMessage], NetlinkError>] {
        var datagram: [UInt8] = []
        var sent: [(sequence: UInt32, request: NetlinkRequest)] = []
        for r in requests {
            let seq = takeSequence()
            r.message(sequence: seq).encode(into: &datagram)
            sent.append((seq, r))
        }
        try send(datagram, operation: requests.count == 1 ? requests[0].operation : "\(requests.count) requests")
        requestsSent += requests.count
        sendCalls += 1
        var collector = ReplyCollector(sent)
        while !collector.isComplete {
            let bytes = try receive(operation: requests.count == 1 ? requests[0].operation : "\(requests.count) requests")
            let messages: [NetlinkMessage]
            do {
                messages = try NetlinkMessage.decodeAll(bytes)
            } catch {
                throw NetlinkError(errno: .badMessage, message: error.description, operation: requests[0].operation)
            }
            for m in messages {
                do {
                    try collector.consume(m)
                } catch {
                    throw NetlinkError(errno: .badMessage, message: error.description, operation: requests[0].operation)
                }
            }
        }
        return collector.results()
    }

    private func send(_ bytes: [UInt8], operation: String) throws {
        var kernel = sockaddr_nl()
        kernel.nl_family = sa_family_t(AF_NETLINK)
        let n = try syscallRetryingEINTR(operation: "sendto: \(operation)") {
            bytes.withUnsafeBytes { raw in
                withUnsafePointer(to: &kernel) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(fd, raw.baseAddress, raw.count, 0, $0, socklen_t(MemoryLayout<sockaddr_nl>.size))
                    }
                }
            }
        }
        guard n == bytes.count else {
            throw NetlinkError(errno: .messageTooLong, message: "sent \(n) of \(bytes.count) bytes", operation: operation)
        }
    }

    /// Receives one datagram, sized exactly by a peek first.
    private func receive(operation: String) throws -> [UInt8] {
        let wanted = try syscallRetryingEINTR(operation: "recv: \(operation)") {
            recv(fd, nil, 0, Int32(MSG_PEEK | MSG_TRUNC))
        }
        let size = max(wanted, netlinkHeaderSize)
        if buffer.count < size { buffer = [UInt8](repeating: 0, count: max(size, 16 * 1024)) }
        let n = try syscallRetryingEINTR(operation: "recv: \(operation)") {
            buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, size, 0) }
        }
        return Array(buffer[0..<n])
    }

    /// Runs `body` until it does not fail with `EINTR`; a failure becomes a `NetlinkError`
    /// (`EAGAIN` from the receive timeout becomes `ETIMEDOUT`).
    private func syscallRetryingEINTR(operation: String, _ body: () -> Int) throws -> Int {
        while true {
            let r = body()
            if r >= 0 { return r }
            let e = Errno.current
            if e == .interrupted { continue }
            if e == .wouldBlock {
                throw NetlinkError(errno: .timedOut, message: "no reply from the kernel within the receive timeout", operation: operation)
            }
            throw NetlinkError(errno: e, operation: operation)
        }
    }
}
