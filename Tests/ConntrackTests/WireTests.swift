// The ctnetlink dump request with a kernel-side filter: golden bytes, and the constants
// checked against the C headers they mirror.

import CConntrack
@testable import Conntrack
import SluiceCore
import Testing

private func hex(_ bytes: [UInt8]) -> String {
    bytes.map { b in String(b, radix: 16).count == 1 ? "0" + String(b, radix: 16) : String(b, radix: 16) }.joined(separator: " ")
}

@Suite struct WireTests {
    @Test func constantsMatchTheHeaders() {
        #expect(UInt16(NFNL_SUBSYS_CTNETLINK) == CTNetlink.subsystem)
        #expect(UInt16(IPCTNL_MSG_CT_GET.rawValue) == CTNetlink.msgGet)
        #expect(UInt16(IPCTNL_MSG_CT_DELETE.rawValue) == CTNetlink.msgDelete)
        #expect(UInt16(NLM_F_ACK) == CTNetlink.flagAck)
        #expect(UInt16(CTA_ID.rawValue) == CTNetlink.Attr.id.rawValue)
        #expect(UInt16(CTA_ZONE.rawValue) == CTNetlink.Attr.zone.rawValue)
        #expect(UInt16(CTA_IP_V4_SRC.rawValue) == CTNetlink.IPAttr.v4Src.rawValue)
        #expect(UInt16(CTA_IP_V6_SRC.rawValue) == CTNetlink.IPAttr.v6Src.rawValue)
        #expect(UInt16(CTA_PROTO_SRC_PORT.rawValue) == CTNetlink.ProtoAttr.srcPort.rawValue)
        #expect(UInt16(NLM_F_REQUEST) == CTNetlink.flagRequest)
        #expect(UInt16(NLM_F_ROOT | NLM_F_MATCH) == CTNetlink.flagDump)
        #expect(UInt16(CTA_TUPLE_ORIG.rawValue) == CTNetlink.Attr.tupleOrig.rawValue)
        #expect(UInt16(CTA_FILTER.rawValue) == CTNetlink.Attr.filter.rawValue)
        #expect(UInt16(CTA_TUPLE_IP.rawValue) == CTNetlink.TupleAttr.ip.rawValue)
        #expect(UInt16(CTA_TUPLE_PROTO.rawValue) == CTNetlink.TupleAttr.proto.rawValue)
        #expect(UInt16(CTA_IP_V4_DST.rawValue) == CTNetlink.IPAttr.v4Dst.rawValue)
        #expect(UInt16(CTA_IP_V6_DST.rawValue) == CTNetlink.IPAttr.v6Dst.rawValue)
        #expect(UInt16(CTA_PROTO_NUM.rawValue) == CTNetlink.ProtoAttr.num.rawValue)
        #expect(UInt16(CTA_PROTO_DST_PORT.rawValue) == CTNetlink.ProtoAttr.dstPort.rawValue)
        #expect(UInt16(CTA_FILTER_ORIG_FLAGS.rawValue) == CTNetlink.FilterAttr.origFlags.rawValue)
        #expect(UInt16(CTA_FILTER_REPLY_FLAGS.rawValue) == CTNetlink.FilterAttr.replyFlags.rawValue)
        #expect(L4Protocol.udp.rawValue == UInt8(IPPROTO_UDP))
        #expect(L4Protocol.tcp.rawValue == UInt8(IPPROTO_TCP))
        #expect(L4Protocol.sctp.rawValue == UInt8(IPPROTO_SCTP))
    }

    @Test func filteredOnProtocolAddressAndPort() {
        let f = DumpFilter(family: .ipv4, l4: .udp, destination: IPAddress("10.96.0.10"), destinationPort: 53)
        #expect(hex(CTNetlink.dumpRequest(f)) == [
            "4c 00 00 00 01 01 01 03 00 00 00 00 00 00 00 00", // nlmsghdr: len 76, ctnetlink GET, REQUEST|DUMP
            "02 00 00 00",                                     // nfgenmsg: AF_INET
            "24 00 01 80",                                     // CTA_TUPLE_ORIG (nested)
            "0c 00 01 80 08 00 02 00 0a 60 00 0a",             //   CTA_TUPLE_IP { CTA_IP_V4_DST 10.96.0.10 }
            "14 00 02 80 05 00 01 00 11 00 00 00",             //   CTA_TUPLE_PROTO { CTA_PROTO_NUM 17,
            "06 00 03 00 00 35 00 00",                         //     CTA_PROTO_DST_PORT 53 (network order) }
            "14 00 19 80",                                     // CTA_FILTER (nested)
            "08 00 01 00 2a 00 00 00",                         //   ORIG_FLAGS: IP_DST | PROTO_NUM | PROTO_DST_PORT
            "08 00 02 00 00 00 00 00",                         //   REPLY_FLAGS: none
        ].joined(separator: " "))
    }

    @Test func filteredOnProtocolOnly() {
        let f = DumpFilter(family: .ipv4, l4: .sctp)
        #expect(hex(CTNetlink.dumpAttributes(f)) == [
            "10 00 01 80", "0c 00 02 80 05 00 01 00 84 00 00 00",
            "14 00 19 80", "08 00 01 00 08 00 00 00", "08 00 02 00 00 00 00 00",
        ].joined(separator: " "))
    }

    @Test func familyOnlyHasNoAttributes() {
        #expect(CTNetlink.dumpAttributes(DumpFilter(family: .ipv6)).isEmpty)
        #expect(hex(CTNetlink.dumpRequest(DumpFilter(family: .ipv6))) == "14 00 00 00 01 01 01 03 00 00 00 00 00 00 00 00 0a 00 00 00")
        // A port without a protocol cannot be filtered in the kernel.
        #expect(CTNetlink.dumpAttributes(DumpFilter(family: .ipv4, destinationPort: 53)).isEmpty)
    }

    /// Kernels with the inverted IPv6 comparison in ctnetlink_filter_match_tuple drop exactly
    /// the entries that match an IPv6 address filter (seen on 6.18): never send one.
    @Test func ipv6DestinationStaysInUserSpace() {
        let f = DumpFilter(family: .ipv6, l4: .udp, destination: IPAddress("fd00::10"), destinationPort: 53)
        #expect(f.kernelSide == DumpFilter(family: .ipv6, l4: .udp, destinationPort: 53))
        let attrs = CTNetlink.dumpAttributes(f)
        #expect(!hex(attrs).contains("01 80 14 00 04 00"), "no CTA_IP_V6_DST")
        #expect(hex(attrs).contains("08 00 01 00 28 00 00 00"), "ORIG_FLAGS = PROTO_NUM | PROTO_DST_PORT")
    }

    @Test func deleteByTupleAndID() {
        var f = flow("10.0.9.1:4000", "10.96.0.50:53", replyFrom: "10.244.2.10:5353", id: 0x0102_0304)
        #expect(hex(CTNetlink.deleteRequest(f)) == [
            "50 00 00 00 02 01 05 00 00 00 00 00 00 00 00 00", // nlmsghdr: len 80, ctnetlink DELETE, REQUEST|ACK
            "02 00 00 00",                                     // nfgenmsg: AF_INET
            "34 00 01 80",                                     // CTA_TUPLE_ORIG
            "14 00 01 80 08 00 01 00 0a 00 09 01",             //   CTA_TUPLE_IP { V4_SRC 10.0.9.1,
            "08 00 02 00 0a 60 00 32",                         //     V4_DST 10.96.0.50 }
            "1c 00 02 80 05 00 01 00 11 00 00 00",             //   CTA_TUPLE_PROTO { NUM 17,
            "06 00 02 00 0f a0 00 00 06 00 03 00 00 35 00 00", //     SRC_PORT 4000, DST_PORT 53 }
            "08 00 0c 00 01 02 03 04",                         // CTA_ID, network order
        ].joined(separator: " "))
        f.id = 0
        f.zone = 7
        let noID = hex(CTNetlink.deleteRequest(f))
        #expect(noID.hasPrefix("50 00 00 00") && !noID.contains("08 00 0c 00") && noID.hasSuffix("06 00 12 00 00 07 00 00"),
                "no CTA_ID; CTA_ZONE 7: \(noID)")
        let v6 = CTNetlink.deleteRequest(flow("[fd00::1]:4000", "[fd00::50]:53", replyFrom: "[fd00::2]:5353"))
        #expect(v6.count == 16 + 4 + 4 + (4 + 20 + 20) + 28 && v6[16] == 10, "two 16-byte addresses, AF_INET6")
    }

    @Test func userSpaceMatching() {
        let f = DumpFilter(family: .ipv4, l4: .udp, destination: IPAddress("10.96.0.10"), destinationPort: 53)
        #expect(f.matches(flow("10.0.0.1:4000", "10.96.0.10:53", replyFrom: "10.0.1.1:5353")))
        #expect(!f.matches(flow(.tcp, "10.0.0.1:4000", "10.96.0.10:53", replyFrom: "10.0.1.1:5353")))
        #expect(!f.matches(flow("10.0.0.1:4000", "10.96.0.11:53", replyFrom: "10.0.1.1:5353")))
        #expect(!f.matches(flow("10.0.0.1:4000", "10.96.0.10:54", replyFrom: "10.0.1.1:5353")))
        #expect(!f.matches(flow("[fd00::1]:4000", "[fd00::10]:53", replyFrom: "[fd00::11]:5353")))
    }
}
