// Sluice: a per-node Kubernetes service proxy.
// The ctnetlink requests Sluice encodes itself, with the Netlink module's message and
// attribute encoder: a dump with a kernel-side filter, and a delete pinned to one entry.
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

import Netlink
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
        var tuple: [NetlinkAttribute] = []
        if let dst = filter.destination {
            flags.insert(.ipDst)
            tuple.append(.nested(TupleAttr.ip.rawValue, [.bytes(IPAttr.v4Dst.rawValue, dst.bytes)]))
        }
        // The kernel compares ports only together with the protocol number.
        if let l4 = filter.l4 {
            flags.insert(.protoNum)
            var proto: [NetlinkAttribute] = [.u8(ProtoAttr.num.rawValue, l4.rawValue)]
            if let port = filter.destinationPort {
                flags.insert(.protoDstPort)
                proto.append(.be16(ProtoAttr.dstPort.rawValue, port))
            }
            tuple.append(.nested(TupleAttr.proto.rawValue, proto))
        }
        guard !flags.isEmpty else { return [] }
        return [
            .nested(Attr.tupleOrig.rawValue, tuple),
            .nested(Attr.filter.rawValue, [.u32(FilterAttr.origFlags.rawValue, flags.rawValue),
                                           .u32(FilterAttr.replyFlags.rawValue, 0)]),
        ].encoded()
    }

    /// A whole dump request: `nlmsghdr`, `nfgenmsg`, attributes.
    public static func dumpRequest(_ filter: DumpFilter, sequence: UInt32 = 0) -> [UInt8] {
        message(type: msgGet, flags: [.request, .dump], family: filter.family, sequence: sequence,
                attributes: dumpAttributes(filter))
    }

    /// A request deleting the entry with `flow`'s original tuple, and only the one with its
    /// id (when not 0; the kernel answers ENOENT if the entry with that tuple has another id)
    /// and zone (when not 0). Asks for an acknowledgement.
    public static func deleteRequest(_ flow: ConntrackFlow, sequence: UInt32 = 0) -> [UInt8] {
        let (src, dst) = (flow.original.source, flow.original.destination)
        let v4 = flow.family == .ipv4
        let ip: [NetlinkAttribute] = [
            .bytes((v4 ? IPAttr.v4Src : IPAttr.v6Src).rawValue, src.ip.bytes),
            .bytes((v4 ? IPAttr.v4Dst : IPAttr.v6Dst).rawValue, dst.ip.bytes),
        ]
        let proto: [NetlinkAttribute] = [
            .u8(ProtoAttr.num.rawValue, flow.protocolNumber),
            .be16(ProtoAttr.srcPort.rawValue, src.port),
            .be16(ProtoAttr.dstPort.rawValue, dst.port),
        ]
        var attrs: [NetlinkAttribute] = [
            .nested(Attr.tupleOrig.rawValue, [.nested(TupleAttr.ip.rawValue, ip), .nested(TupleAttr.proto.rawValue, proto)]),
        ]
        if flow.id != 0 { attrs.append(.be32(Attr.id.rawValue, flow.id)) }
        if flow.zone != 0 { attrs.append(.be16(Attr.zone.rawValue, flow.zone)) }
        return message(type: msgDelete, flags: [.request, .ack], family: flow.family, sequence: sequence, attributes: attrs.encoded())
    }

    /// `nlmsghdr` (port id 0: the kernel), `nfgenmsg` (`NFNETLINK_V0`, resource id 0), then
    /// `attributes`, already encoded.
    static func message(type: UInt16, flags: NetlinkMessageFlags, family: IPFamily, sequence: UInt32, attributes: [UInt8]) -> [UInt8] {
        let nfgenmsg: [UInt8] = [family == .ipv4 ? 2 : 10, 0, 0, 0]  // AF_INET / AF_INET6, version, res_id
        return NetlinkMessage(type: subsystem << 8 | type, flags: flags, sequence: sequence, payload: nfgenmsg + attributes).encoded()
    }
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
