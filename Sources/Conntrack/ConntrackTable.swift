// Sluice: a per-node Kubernetes service proxy.
// The one Swift wrapper over libnetfilter_conntrack: a pair of ctnetlink handles confined to
// an actor that runs on a thread of its own (netlink calls block), a streaming dump with a
// kernel-side filter, and deletes by tuple.
//
// Two handles, as conntrack-tools does it (`delete_cb` in src/conntrack.c): the dump runs on
// one; deleting through it in the middle of the dump would interleave the delete's ack with
// the dump's messages. Deletes go through the second handle, one entry at a time, each pinned
// to the entry's id so that a newer flow with the same tuple is never hit.
//
// Memory: nothing is collected. The library parses one message at a time into a scratch
// object (freed after our callback returns), the callback decides and deletes, and the
// receive buffer is fixed (32 KiB). A table of millions of entries costs time, not memory.

import CConntrack
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import SluiceCore

/// What to do with one flow.
public enum FlowVerdict: Sendable, Hashable {
    /// Leave it.
    case keep
    /// Delete it, for this reason.
    case delete(StaleReason)
}

/// Why a flow is stale.
public enum StaleReason: String, Sendable, Hashable, CaseIterable {
    /// It was translated to an address that is no longer a serving endpoint of its frontend
    /// (the endpoint went away, stopped serving, or the service has none left).
    case endpointGone = "endpoint-gone"
    /// It was never translated (the reply comes from the frontend itself): it was created
    /// while no rule sent the frontend anywhere, and the service has endpoints now.
    case neverTranslated = "never-translated"
}

/// What one sweep (a dump with decisions) did.
public struct SweepResult: Sendable, Hashable {
    /// Entries the kernel sent.
    public var received = 0
    /// Entries that matched the filter and were judged.
    public var judged = 0
    /// Entries deleted, by reason.
    public var deleted: [StaleReason: Int] = [:]
    /// Deletes answered with ENOENT: the entry had gone already (expired, or deleted twice
    /// because the dump restarted a bucket). Counted as success.
    public var alreadyGone = 0
    /// Failed deletes (not ENOENT).
    public var deleteErrors = 0
    /// Failed dumps (the table was read partly or not at all).
    public var dumpErrors = 0
    /// The first few errors (a failed dump, failed deletes), for the log.
    public var errors: [ConntrackError] = []
    /// False when an entry outside the filter arrived: the kernel ignored `CTA_FILTER`
    /// (before Linux 5.8), and the whole family's table was read.
    public var kernelFiltered = true
    /// The first few deleted flows, for the log.
    public var sample: [ConntrackFlow] = []

    /// Creates an empty result.
    public init() {}

    /// Entries deleted for any reason.
    public var deletedTotal: Int { deleted.values.reduce(0, +) }

    /// True when the dump ran to its end and every delete succeeded.
    public var complete: Bool { dumpErrors == 0 && deleteErrors == 0 }

    mutating func record(_ error: ConntrackError) {
        if errors.count < 5 { errors.append(error) }
    }
}

/// The kernel's conntrack table of the network namespace the table was opened in.
///
/// Every call runs on one dedicated thread (the actor's executor), so the blocking netlink
/// traffic never occupies a thread of the cooperative pool, and the handles are used by one
/// thread at a time.
public actor ConntrackTable {
    private let executor: BlockingThreadExecutor
    private let dumpHandle: NFCTHandle
    private let deleteHandle: NFCTHandle
    /// nil until a filtered dump showed whether the kernel applies `CTA_FILTER`.
    public private(set) var kernelAppliesFilters: Bool?

    /// The actor's executor: its own thread.
    public nonisolated var unownedExecutor: UnownedSerialExecutor { executor.asUnownedSerialExecutor() }

    /// Opens the two ctnetlink sockets. They belong to the network namespace of the calling
    /// thread, whichever thread uses them later.
    /// - Throws: `ConntrackError` (`.open`) when netlink refuses (no `CAP_NET_ADMIN`, no
    ///   conntrack in the kernel).
    public init() throws(ConntrackError) {
        let dump = try NFCTHandle()
        let delete = try NFCTHandle()
        // Larger reads than the default 8 KiB: fewer system calls per dump.
        nfnl_set_rcv_buffer_size(nfct_nfnlh(dump.raw), 32 * 1024)
        dumpHandle = dump
        deleteHandle = delete
        executor = BlockingThreadExecutor(name: "sluice-conntrack")
    }

    deinit {
        executor.shutdown()
    }

    /// Streams every entry matching `filter` through `decide`, and deletes those it returns
    /// `.delete` for, while the dump runs. Nothing is collected.
    ///
    /// The kernel filters the dump when it can; entries outside the filter that arrive anyway
    /// are skipped here, and `kernelAppliesFilters` becomes false. If the kernel rejects the
    /// filter itself, the dump is retried with the family alone.
    /// - Returns: counts, and the errors met (a failed dump leaves a partial result).
    public func sweep(_ filter: DumpFilter, deciding decide: @Sendable (ConntrackFlow) -> FlowVerdict) -> SweepResult {
        withoutActuallyEscaping(decide) { decide in
            let state = SweepState(filter: filter, decide: decide, deleter: deleteHandle)
            let familyOnly = DumpFilter(family: filter.family)
            // Once the kernel is known not to filter, do not ask it to.
            var rc = dump(kernelAppliesFilters == false ? familyOnly : filter.kernelSide, state: state)
            if rc != 0, state.result.received == 0, state.kernelFilter != familyOnly,
               errnoValue(rc) == EINVAL || errnoValue(rc) == EOPNOTSUPP {
                // A kernel that knows CTA_FILTER but not some part of ours: read it all instead
                // (and say so: the caller got more than it asked the kernel for).
                kernelAppliesFilters = false
                rc = dump(familyOnly, state: state)
                state.result.kernelFiltered = false
            }
            if rc != 0 {
                state.result.dumpErrors += 1
                state.result.record(ConntrackError(.dump, errno: errnoValue(rc), context: filter.description))
            }
            if !state.result.kernelFiltered {
                kernelAppliesFilters = false
            } else if kernelAppliesFilters == nil && state.result.received > 0 && state.kernelFilter != familyOnly {
                kernelAppliesFilters = true
            }
            return state.result
        }
    }

    /// Every entry matching `filter`, collected. For tests and small tables: the reconciler
    /// never calls it.
    public func flows(matching filter: DumpFilter) throws(ConntrackError) -> [ConntrackFlow] {
        let box = FlowCollector()
        let result = sweep(filter) { flow in
            box.append(flow)
            return .keep
        }
        if let e = result.errors.first { throw e }
        return box.flows
    }

    /// Deletes the entry with `flow`'s original tuple (and id, when not 0).
    /// - Returns: false when there was no such entry (ENOENT), which is not an error.
    /// - Throws: `ConntrackError` (`.delete`) for any other failure.
    @discardableResult
    public func delete(_ flow: ConntrackFlow) throws(ConntrackError) -> Bool {
        try deleteHandle.delete(flow)
    }

    /// Sends one dump request (for `filter`, which the kernel is asked to apply) and runs the
    /// library's receive loop until the dump ends. Returns 0, or the negated errno.
    private func dump(_ filter: DumpFilter, state: SweepState) -> Int32 {
        state.kernelFilter = filter
        // Sequence 0: libnfnetlink's receive loop rejects replies whose non-zero sequence
        // number is not the one it generated itself (EILSEQ); 0 is never checked.
        let request = CTNetlink.dumpRequest(filter, sequence: 0)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: request.count, alignment: 8)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: request)
        let context = Unmanaged.passUnretained(state).toOpaque()
        nfct_callback_register(dumpHandle.raw, NFCT_T_ALL, sweepCallback, context)
        defer { nfct_callback_unregister(dumpHandle.raw) }
        let nlh = buffer.baseAddress!.assumingMemoryBound(to: nlmsghdr.self)
        errno = 0
        let rc = nfnl_query(nfct_nfnlh(dumpHandle.raw), nlh)
        return rc == -1 ? -(errno == 0 ? EIO : errno) : 0
    }

    private func errnoValue(_ rc: Int32) -> Int32 { -rc }
}

/// Collects flows for `flows(matching:)`; used on the table's thread only.
private final class FlowCollector: @unchecked Sendable {
    var flows: [ConntrackFlow] = []
    func append(_ f: ConntrackFlow) { flows.append(f) }
}

/// The state of one running dump, reached from the C callback through its context pointer.
private final class SweepState {
    /// What the caller asked for.
    let filter: DumpFilter
    /// What the kernel was asked to apply (the caller's filter, or less).
    var kernelFilter: DumpFilter
    let decide: (ConntrackFlow) -> FlowVerdict
    let deleter: NFCTHandle
    var result = SweepResult()

    init(filter: DumpFilter, decide: @escaping (ConntrackFlow) -> FlowVerdict, deleter: NFCTHandle) {
        self.filter = filter
        self.kernelFilter = filter
        self.decide = decide
        self.deleter = deleter
    }

    func handle(_ ct: OpaquePointer) {
        result.received += 1
        guard let flow = NFCTHandle.flow(from: ct) else { return }
        if !kernelFilter.matches(flow) { result.kernelFiltered = false }
        guard filter.matches(flow) else { return }
        result.judged += 1
        guard case .delete(let reason) = decide(flow) else { return }
        do {
            if try deleter.delete(flow) {
                result.deleted[reason, default: 0] += 1
                if result.sample.count < 5 { result.sample.append(flow) }
            } else {
                result.alreadyGone += 1
            }
        } catch {
            result.deleteErrors += 1
            result.record(error)
        }
    }
}

/// libnetfilter_conntrack's callback: one parsed entry per call, `data` is the `SweepState`.
private func sweepCallback(_ type: nf_conntrack_msg_type, _ ct: OpaquePointer?, _ data: UnsafeMutableRawPointer?) -> Int32 {
    guard let ct, let data else { return Int32(NFCT_CB_CONTINUE) }
    Unmanaged<SweepState>.fromOpaque(data).takeUnretainedValue().handle(ct)
    return Int32(NFCT_CB_CONTINUE)
}

/// One `nfct_handle` (a ctnetlink socket), closed when released.
final class NFCTHandle {
    let raw: OpaquePointer

    init() throws(ConntrackError) {
        errno = 0
        guard let h = nfct_open(UInt8(CONNTRACK), 0) else {
            throw ConntrackError(.open, errno: errno, context: "ctnetlink socket")
        }
        raw = h
    }

    deinit { nfct_close(raw) }

    /// Deletes by original tuple, id and zone (a request of our own: the library cannot send
    /// the id). Returns false on ENOENT: no such entry, or one with another id.
    func delete(_ flow: ConntrackFlow) throws(ConntrackError) -> Bool {
        guard flow.family == .ipv4 || flow.family == .ipv6 else { return false }
        // Sequence 0, for the reason given in `ConntrackTable.dump`.
        let request = CTNetlink.deleteRequest(flow, sequence: 0)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: request.count, alignment: 8)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: request)
        errno = 0
        let rc = nfnl_query(nfct_nfnlh(raw), buffer.baseAddress!.assumingMemoryBound(to: nlmsghdr.self))
        if rc == 0 { return true }
        let e = errno
        if e == ENOENT { return false }
        throw ConntrackError(.delete, errno: e == 0 ? EIO : e, context: flow.description)
    }

    /// The flow a parsed entry describes; nil for families other than IPv4 and IPv6.
    static func flow(from ct: OpaquePointer) -> ConntrackFlow? {
        let family: IPFamily
        switch Int32(nfct_get_attr_u8(ct, ATTR_L3PROTO)) {
        case AF_INET: family = .ipv4
        case AF_INET6: family = .ipv6
        default: return nil
        }
        func address(_ v4: nf_conntrack_attr, _ v6: nf_conntrack_attr) -> IPAddress {
            if family == .ipv4 { return .v4(UInt32(bigEndian: nfct_get_attr_u32(ct, v4))) }
            guard let p = nfct_get_attr(ct, v6) else { return .v6(0, 0) }
            var hi: UInt64 = 0
            var lo: UInt64 = 0
            for i in 0..<8 { hi = hi << 8 | UInt64(p.load(fromByteOffset: i, as: UInt8.self)) }
            for i in 8..<16 { lo = lo << 8 | UInt64(p.load(fromByteOffset: i, as: UInt8.self)) }
            return .v6(hi, lo)
        }
        func port(_ attr: nf_conntrack_attr) -> UInt16 { UInt16(bigEndian: nfct_get_attr_u16(ct, attr)) }
        let original = FlowTuple(source: IPPort(address(ATTR_ORIG_IPV4_SRC, ATTR_ORIG_IPV6_SRC), port(ATTR_ORIG_PORT_SRC)),
                                 destination: IPPort(address(ATTR_ORIG_IPV4_DST, ATTR_ORIG_IPV6_DST), port(ATTR_ORIG_PORT_DST)))
        let reply = FlowTuple(source: IPPort(address(ATTR_REPL_IPV4_SRC, ATTR_REPL_IPV6_SRC), port(ATTR_REPL_PORT_SRC)),
                              destination: IPPort(address(ATTR_REPL_IPV4_DST, ATTR_REPL_IPV6_DST), port(ATTR_REPL_PORT_DST)))
        let zone = nfct_attr_is_set(ct, ATTR_ZONE) > 0 ? nfct_get_attr_u16(ct, ATTR_ZONE) : 0
        return ConntrackFlow(family: family, protocolNumber: nfct_get_attr_u8(ct, ATTR_L4PROTO), original: original,
                             reply: reply, id: nfct_get_attr_u32(ct, ATTR_ID), zone: zone)
    }
}

/// A serial executor that runs its jobs on one dedicated thread, for actors whose methods
/// block in system calls. The thread ends after `shutdown()` once the queue is drained.
final class BlockingThreadExecutor: SerialExecutor, @unchecked Sendable {
    private let condition = NSCondition()
    private var jobs: [UnownedJob] = []
    private var stopped = false

    init(name: String) {
        let thread = Thread { [self] in self.run() }
        thread.name = name
        thread.start()
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    func asUnownedSerialExecutor() -> UnownedSerialExecutor { UnownedSerialExecutor(ordinary: self) }

    /// Lets the thread end once every queued job has run.
    func shutdown() {
        condition.lock()
        stopped = true
        condition.signal()
        condition.unlock()
    }

    private func run() {
        while true {
            condition.lock()
            while jobs.isEmpty && !stopped { condition.wait() }
            if jobs.isEmpty {
                condition.unlock()
                return
            }
            let job = jobs.removeFirst()
            condition.unlock()
            job.runSynchronously(on: asUnownedSerialExecutor())
        }
    }
}
