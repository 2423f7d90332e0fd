// Sluice: a per-node Kubernetes service proxy.
// The ctnetlink requests Sluice encodes itself: a dump with a kernel-side filter, and a
// delete pinned to one entry.
//
// libnetfilter_conntrack 1.0.9 can only ask the kernel to filter dumps by mark, family and
// status (`nfct_filter_dump`). The kernel (Linux 5.8, `CTA_FILTER`) can also filter on the
// original tuple: protocol, addresses and ports. So the request is built here, and the dump
// itself still runs through the library's handle, callbacks and parser.
//
// Deletes are built here too: the library never sends `CTA_ID` (`nfct_nlmsg_build` has no
// case for it), and without it a delete hits whatever entry has the tuple by then, possibly
// a newer flow than the one judged.
//
// UAPI: include/uapi/linux/netfilter/nfnetlink_conntrack.h; the CTA_FILTER_F_* flags are
// kernel-internal (net/netfilter/nf_internals.h), mirrored here.

import SluiceCore

/// ctnetlink numbers, and the two requests Sluice builds itself.
public enum CTNetlink {
    /// The ctnetlink subsystem. The corresponding C constant is `NFNL_SUBSYS_CTNETLINK`.
    public static let subsystem: UInt16 = 1
    /// Get (with `NLM_F_DUMP`: dump). The corresponding C constant is `IPCTNL_MSG_CT_GET`.
    public static let msgGet: UInt16 = 1
    /// Delete. The corresponding C constant is `IPCTNL_MSG_CT_DELETE`.
    public static let msgDelete: UInt16 = 2
    /// The corresponding C constant is `NLM_F_ACK`.
    public static let flagAck: UInt16 = 0x4
    /// The corresponding C constant is `NLM_F_REQUEST`.
    public static let flagRequest: UInt16 = 0x1
    /// `NLM_F_ROOT | NLM_F_MATCH`. The corresponding C constant is `NLM_F_DUMP`.
    public static let flagDump: UInt16 = 0x300
    /// Set on nested attributes. The corresponding C constant is `NLA_F_NESTED`.
    public static let nested: UInt16 = 0x8000

    /// Top-level attributes (`enum ctattr_type`).
    public enum Attr: UInt16 {
        /// The corresponding C constant is `CTA_TUPLE_ORIG`.
        case tupleOrig = 1
        /// The corresponding C constant is `CTA_ID`.
        case id = 12
        /// The corresponding C constant is `CTA_ZONE`.
        case zone = 18
        /// The corresponding C constant is `CTA_FILTER`.
        case filter = 25
    }

    /// Tuple attributes (`enum ctattr_tuple`).
    public enum TupleAttr: UInt16 {
        /// The corresponding C constant is `CTA_TUPLE_IP`.
        case ip = 1
        /// The corresponding C constant is `CTA_TUPLE_PROTO`.
        case proto = 2
    }

    /// Address attributes (`enum ctattr_ip`).
    public enum IPAttr: UInt16 {
        /// The corresponding C constant is `CTA_IP_V4_SRC`.
        case v4Src = 1
        /// The corresponding C constant is `CTA_IP_V4_DST`.
        case v4Dst = 2
        /// The corresponding C constant is `CTA_IP_V6_SRC`.
        case v6Src = 3
        /// The corresponding C constant is `CTA_IP_V6_DST`.
        case v6Dst = 4
    }

    /// Protocol attributes (`enum ctattr_l4proto`).
    public enum ProtoAttr: UInt16 {
        /// The corresponding C constant is `CTA_PROTO_NUM`.
        case num = 1
        /// The corresponding C constant is `CTA_PROTO_SRC_PORT`.
        case srcPort = 2
        /// The corresponding C constant is `CTA_PROTO_DST_PORT`.
        case dstPort = 3
    }

    /// Filter attributes (`enum ctattr_filter`).
    public enum FilterAttr: UInt16 {
        /// The corresponding C constant is `CTA_FILTER_ORIG_FLAGS`.
        case origFlags = 1
        /// The corresponding C constant is `CTA_FILTER_REPLY_FLAGS`.
        case replyFlags = 2
    }

    /// Which fields of the tuple the kernel compares (`CTA_FILTER_F_*`).
    public struct FilterFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// The corresponding C constant is `CTA_FILTER_F_CTA_IP_DST`.
        public static let ipDst = FilterFlags(rawValue: 1 << 1)
        /// The corresponding C constant is `CTA_FILTER_F_CTA_PROTO_NUM`.
        public static let protoNum = FilterFlags(rawValue: 1 << 3)
        /// The corresponding C constant is `CTA_FILTER_F_CTA_PROTO_DST_PORT`.
        public static let protoDstPort = FilterFlags(rawValue: 1 << 5)
    }

    /// The attributes of a dump request for `filter` (everything after the `nfgenmsg` header):
    /// the original tuple holding the values, and `CTA_FILTER` naming the fields to compare.
    /// Empty when the filter has nothing but the family (the family travels in `nfgenmsg`).
    ///
    /// An IPv6 destination is not sent: kernels from 5.8 until the fix of the inverted
    /// `ipv6_addr_cmp` test in `ctnetlink_filter_match_tuple` drop exactly the matching
    /// entries. The port and protocol still narrow an IPv6 dump, and user space checks the rest.
    public static func dumpAttributes(_ filter: DumpFilter) -> [UInt8] {
        let filter = filter.kernelSide
        var flags: FilterFlags = []
        var ipNest: [UInt8] = []
        var protoNest: [UInt8] = []
        if let dst = filter.destination {
            flags.insert(.ipDst)
            ipNest = attribute(IPAttr.v4Dst.rawValue, dst.bytes)
        }
        // The kernel compares ports only together with the protocol number.
        if let l4 = filter.l4 {
            flags.insert(.protoNum)
            protoNest = attribute(ProtoAttr.num.rawValue, [l4.rawValue])
            if let port = filter.destinationPort {
                flags.insert(.protoDstPort)
                protoNest += attribute(ProtoAttr.dstPort.rawValue, networkBytes16(port))
            }
        }
        guard !flags.isEmpty else { return [] }
        var tuple: [UInt8] = []
        if !ipNest.isEmpty { tuple += attribute(TupleAttr.ip.rawValue | nested, ipNest) }
        if !protoNest.isEmpty { tuple += attribute(TupleAttr.proto.rawValue | nested, protoNest) }
        var out = attribute(Attr.tupleOrig.rawValue | nested, tuple)
        out += attribute(Attr.filter.rawValue | nested,
                         attribute(FilterAttr.origFlags.rawValue, hostBytes(flags.rawValue))
                            + attribute(FilterAttr.replyFlags.rawValue, hostBytes(0)))
        return out
    }

    /// A whole dump request: `nlmsghdr`, `nfgenmsg`, attributes.
    public static func dumpRequest(_ filter: DumpFilter, sequence: UInt32 = 0) -> [UInt8] {
        message(type: msgGet, flags: flagRequest | flagDump, family: filter.family, sequence: sequence,
                attributes: dumpAttributes(filter))
    }

    /// A request deleting the entry with `flow`'s original tuple, and only the one with its
    /// id (when not 0; the kernel answers ENOENT if the entry with that tuple has another id)
    /// and zone (when not 0). Asks for an acknowledgement.
    public static func deleteRequest(_ flow: ConntrackFlow, sequence: UInt32 = 0) -> [UInt8] {
        let (src, dst) = (flow.original.source, flow.original.destination)
        let v4 = flow.family == .ipv4
        let ip = attribute((v4 ? IPAttr.v4Src : IPAttr.v6Src).rawValue, src.ip.bytes)
            + attribute((v4 ? IPAttr.v4Dst : IPAttr.v6Dst).rawValue, dst.ip.bytes)
        let proto = attribute(ProtoAttr.num.rawValue, [flow.protocolNumber])
            + attribute(ProtoAttr.srcPort.rawValue, networkBytes16(src.port))
            + attribute(ProtoAttr.dstPort.rawValue, networkBytes16(dst.port))
        var attrs = attribute(Attr.tupleOrig.rawValue | nested,
                              attribute(TupleAttr.ip.rawValue | nested, ip) + attribute(TupleAttr.proto.rawValue | nested, proto))
        if flow.id != 0 {
            attrs += attribute(Attr.id.rawValue, [UInt8(flow.id >> 24), UInt8(flow.id >> 16 & 0xff),
                                                  UInt8(flow.id >> 8 & 0xff), UInt8(flow.id & 0xff)])
        }
        if flow.zone != 0 { attrs += attribute(Attr.zone.rawValue, networkBytes16(flow.zone)) }
        return message(type: msgDelete, flags: flagRequest | flagAck, family: flow.family, sequence: sequence, attributes: attrs)
    }

    /// `nlmsghdr`, `nfgenmsg`, then `attributes`.
    static func message(type: UInt16, flags: UInt16, family: IPFamily, sequence: UInt32, attributes: [UInt8]) -> [UInt8] {
        let length = UInt32(16 + 4 + attributes.count)
        var out: [UInt8] = []
        out.reserveCapacity(Int(length))
        out += hostBytes(length)
        out += hostBytes16(subsystem << 8 | type)
        out += hostBytes16(flags)
        out += hostBytes(sequence)
        out += hostBytes(0) // nlmsg_pid: the kernel
        out.append(family == .ipv4 ? 2 : 10) // nfgen_family: AF_INET / AF_INET6
        out.append(0) // version: NFNETLINK_V0
        out += [0, 0] // res_id
        out += attributes
        return out
    }

    static func networkBytes16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }

    /// One netlink attribute: `nla_len`, `nla_type`, payload, padding to 4 bytes.
    static func attribute(_ type: UInt16, _ payload: [UInt8]) -> [UInt8] {
        let len = UInt16(4 + payload.count)
        var out = hostBytes16(len) + hostBytes16(type) + payload
        while out.count % 4 != 0 { out.append(0) }
        return out
    }

    /// Netlink headers and integer attributes are in host byte order (addresses and ports are
    /// in network order, as on the wire).
    static func hostBytes(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }

    static func hostBytes16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }
}

extension DumpFilter {
    /// The part of the filter the kernel is asked to apply: all of it, except an IPv6
    /// destination address (see `CTNetlink.dumpAttributes`) and a port without a protocol
    /// (the kernel compares ports only together with the protocol number).
    public var kernelSide: DumpFilter {
        var k = self
        if case .v6 = destination { k.destination = nil }
        if l4 == nil { k.destinationPort = nil }
        return k
    }
}
