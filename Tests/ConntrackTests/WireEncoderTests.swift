// The two ctnetlink requests are built with the Netlink module's encoder. Before that, the
// Conntrack module had its own byte-pushing encoder; it is kept here, verbatim in what it
// produced, as the reference the new requests must equal byte for byte.

@testable import Conntrack
import SluiceCore
import Testing

/// The Conntrack module's former encoder (Sources/Conntrack/Wire.swift before it used Netlink).
private enum FormerEncoder {
    static func dumpAttributes(_ filter: DumpFilter) -> [UInt8] {
        let filter = filter.kernelSide
        var flags: CTNetlink.FilterFlags = []
        var ipNest: [UInt8] = []
        var protoNest: [UInt8] = []
        if let dst = filter.destination {
            flags.insert(.ipDst)
            ipNest = attribute(CTNetlink.IPAttr.v4Dst.rawValue, dst.bytes)
        }
        if let l4 = filter.l4 {
            flags.insert(.protoNum)
            protoNest = attribute(CTNetlink.ProtoAttr.num.rawValue, [l4.rawValue])
            if let port = filter.destinationPort {
                flags.insert(.protoDstPort)
                protoNest += attribute(CTNetlink.ProtoAttr.dstPort.rawValue, networkBytes16(port))
            }
        }
        guard !flags.isEmpty else { return [] }
        var tuple: [UInt8] = []
        if !ipNest.isEmpty { tuple += attribute(CTNetlink.TupleAttr.ip.rawValue | CTNetlink.nested, ipNest) }
        if !protoNest.isEmpty { tuple += attribute(CTNetlink.TupleAttr.proto.rawValue | CTNetlink.nested, protoNest) }
        var out = attribute(CTNetlink.Attr.tupleOrig.rawValue | CTNetlink.nested, tuple)
        out += attribute(CTNetlink.Attr.filter.rawValue | CTNetlink.nested,
                         attribute(CTNetlink.FilterAttr.origFlags.rawValue, hostBytes(flags.rawValue))
                            + attribute(CTNetlink.FilterAttr.replyFlags.rawValue, hostBytes(0)))
        return out
    }

    static func dumpRequest(_ filter: DumpFilter, sequence: UInt32) -> [UInt8] {
        message(type: CTNetlink.msgGet, flags: CTNetlink.flagRequest | CTNetlink.flagDump, family: filter.family,
                sequence: sequence, attributes: dumpAttributes(filter))
    }

    static func deleteRequest(_ flow: ConntrackFlow, sequence: UInt32) -> [UInt8] {
        let (src, dst) = (flow.original.source, flow.original.destination)
        let v4 = flow.family == .ipv4
        let ip = attribute((v4 ? CTNetlink.IPAttr.v4Src : CTNetlink.IPAttr.v6Src).rawValue, src.ip.bytes)
            + attribute((v4 ? CTNetlink.IPAttr.v4Dst : CTNetlink.IPAttr.v6Dst).rawValue, dst.ip.bytes)
        let proto = attribute(CTNetlink.ProtoAttr.num.rawValue, [flow.protocolNumber])
            + attribute(CTNetlink.ProtoAttr.srcPort.rawValue, networkBytes16(src.port))
            + attribute(CTNetlink.ProtoAttr.dstPort.rawValue, networkBytes16(dst.port))
        var attrs = attribute(CTNetlink.Attr.tupleOrig.rawValue | CTNetlink.nested,
                              attribute(CTNetlink.TupleAttr.ip.rawValue | CTNetlink.nested, ip)
                                + attribute(CTNetlink.TupleAttr.proto.rawValue | CTNetlink.nested, proto))
        if flow.id != 0 {
            attrs += attribute(CTNetlink.Attr.id.rawValue, [UInt8(flow.id >> 24), UInt8(flow.id >> 16 & 0xff),
                                                            UInt8(flow.id >> 8 & 0xff), UInt8(flow.id & 0xff)])
        }
        if flow.zone != 0 { attrs += attribute(CTNetlink.Attr.zone.rawValue, networkBytes16(flow.zone)) }
        return message(type: CTNetlink.msgDelete, flags: CTNetlink.flagRequest | CTNetlink.flagAck, family: flow.family,
                       sequence: sequence, attributes: attrs)
    }

    static func message(type: UInt16, flags: UInt16, family: IPFamily, sequence: UInt32, attributes: [UInt8]) -> [UInt8] {
        let length = UInt32(16 + 4 + attributes.count)
        var out: [UInt8] = []
        out += hostBytes(length)
        out += hostBytes16(CTNetlink.subsystem << 8 | type)
        out += hostBytes16(flags)
        out += hostBytes(sequence)
        out += hostBytes(0)
        out.append(family == .ipv4 ? 2 : 10)
        out.append(0)
        out += [0, 0]
        out += attributes
        return out
    }

    static func networkBytes16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }

    static func attribute(_ type: UInt16, _ payload: [UInt8]) -> [UInt8] {
        let len = UInt16(4 + payload.count)
        var out = hostBytes16(len) + hostBytes16(type) + payload
        while out.count % 4 != 0 { out.append(0) }
        return out
    }

    static func hostBytes(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }
    static func hostBytes16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }
}

@Suite struct WireEncoderTests {
    static let addresses: [IPAddress?] = [nil, IPAddress("10.96.0.10"), IPAddress("0.0.0.0"), IPAddress("255.255.255.255"),
                                          IPAddress("fd00::10"), IPAddress("::")]
    static let ports: [UInt16?] = [nil, 0, 53, 0x1234, 65535]

    @Test func everyDumpRequestIsByteIdenticalToTheFormerEncoders() {
        var compared = 0
        for family in [IPFamily.ipv4, .ipv6] {
            for l4 in [nil] + L4Protocol.allCases.map(Optional.some) {
                for destination in Self.addresses where destination == nil || destination?.family == family {
                    for port in Self.ports {
                        let f = DumpFilter(family: family, l4: l4, destination: destination, destinationPort: port)
                        for sequence: UInt32 in [0, 1, 0xdead_beef] {
                            #expect(CTNetlink.dumpRequest(f, sequence: sequence) == FormerEncoder.dumpRequest(f, sequence: sequence), "\(f)")
                            compared += 1
                        }
                    }
                }
            }
        }
        #expect(compared == (4 + 3) * 4 * 5 * 3)  // (IPv4: none and 3 addresses; IPv6: none and 2) x protocols x ports x sequences
    }

    @Test func everyDeleteRequestIsByteIdenticalToTheFormerEncoders() {
        let v4 = [("10.0.9.1:4000", "10.96.0.50:53", "10.244.2.10:5353"), ("1.2.3.4:1", "10.96.0.1:65535", "10.244.0.1:80")]
        let v6 = [("[fd00::1]:4000", "[fd00::50]:53", "[fd00::2]:5353"), ("[::1]:65535", "[fd00:10::ffff]:443", "[fd00::3]:8443")]
        var compared = 0
        for (client, frontend, reply) in v4 + v6 {
            for l4 in L4Protocol.allCases {
                for id: UInt32 in [0, 1, 0x0102_0304, .max] {
                    for zone: UInt16 in [0, 7, .max] {
                        var f = flow(l4, client, frontend, replyFrom: reply, id: id)
                        f.zone = zone
                        for sequence: UInt32 in [0, 42] {
                            #expect(CTNetlink.deleteRequest(f, sequence: sequence) == FormerEncoder.deleteRequest(f, sequence: sequence), "\(f)")
                            compared += 1
                        }
                    }
                }
            }
        }
        #expect(compared == 4 * 3 * 4 * 3 * 2)
    }
}
