// Decoding what the kernel sends: replies written out by hand in the kernel's layout,
// multi-part dumps, acknowledgements, errors with extended-ack text, and malformed input.

import CNetlink
import IPVS
import Netlink
import SluiceCore
import SluiceTesting
import Testing

private let familyID: UInt16 = 0x1c

/// An `IPVS_CMD_NEW_SERVICE` dump entry as `ip_vs_genl_fill_service` writes it: the address
/// always in 16 bytes, flags with the kernel's HASHED bit and mask ~0, statistics nests.
private let serviceReply =
    "ac000000 1c00 0200 2a000000 d2040000" +       // len 172, IPVS family, NLM_F_MULTI, seq 42, pid 1234
    "01 01 0000" +                                 // IPVS_CMD_NEW_SERVICE
    "9800 0180" +                                  // IPVS_CMD_ATTR_SERVICE | NESTED, len 152
    "0600 0100 0200 0000" +                        // AF_INET
    "0600 0200 0600 0000" +                        // TCP
    "1400 0300 0a60000a 00000000 00000000 00000000" +
    "0600 0400 0050 0000" +                        // port 80
    "0700 0600 727200 00" +                        // "rr"
    "0c00 0700 03000000 ffffffff" +                // PERSISTENT | HASHED, mask
    "0800 0800 302a0000" +                         // timeout 10800
    "0800 0900 ffffffff" +                         // netmask
    "3400 0a80" +                                  // IPVS_SVC_ATTR_STATS | NESTED, len 52
    "0800 0100 05000000 0800 0200 0a000000 0800 0300 0a000000 0c00 0400 e803000000000000 0c00 0500 d007000000000000" +
    "1000 0c80 0c00 0100 0500000000000000"         // IPVS_SVC_ATTR_STATS64 | NESTED: CONNS u64 5

private func destReply(_ ip: String, port: String, weight: String, active: String, inactive: String, flags: String = "0200") -> String {
    "64000000 1c00 \(flags) 2b000000 d2040000" +  // len 100
    "05 01 0000" +                                 // IPVS_CMD_NEW_DEST
    "5000 0280" +                                  // IPVS_CMD_ATTR_DEST | NESTED, len 80
    "1400 0100 \(ip) 00000000 00000000 00000000" +
    "0600 0200 \(port) 0000" +
    "0800 0300 00000000" +                         // MASQ
    "0800 0400 \(weight)" +
    "0800 0700 \(active)" +                        // IPVS_DEST_ATTR_ACTIVE_CONNS
    "0800 0800 \(inactive)" +                      // IPVS_DEST_ATTR_INACT_CONNS
    "0800 0900 00000000" +                         // IPVS_DEST_ATTR_PERSIST_CONNS
    "0600 0b00 0200 0000"                          // IPVS_DEST_ATTR_ADDR_FAMILY
}

private let doneMessage = "14000000 0300 0200 2b000000 d2040000 00000000"  // NLMSG_DONE, NLM_F_MULTI, int 0

@Suite struct NetlinkDecodeTests {
    @Test func serviceReplyWithIPv4InTheFirstFourOf16Bytes() throws {
        let messages = try NetlinkMessage.decodeAll(hex(serviceReply))
        #expect(messages.count == 1)
        let vs = try #require(try IPVSMessages.parseService(messages[0]))
        #expect(vs.key == VirtualServerKey(address: IPAddress("10.96.0.10")!, proto: .tcp, port: 80))
        #expect(vs.scheduler == "rr")
        #expect(vs.flags == [.persistent, .hashed])
        #expect(vs.timeout == 10800)
        #expect(vs.netmask == 0xFFFF_FFFF)
        #expect(vs.sameConfiguration(as: VirtualServer(key: vs.key, scheduler: "rr", flags: .persistent, timeout: 10800)))
        #expect(!vs.sameConfiguration(as: VirtualServer(key: vs.key, scheduler: "wrr", flags: .persistent, timeout: 10800)))
    }

    @Test func multiPartDestinationDumpEndsWithDone() throws {
        // Two entries and NLMSG_DONE in one datagram, as a dump delivers them.
        let datagram = hex(destReply("0af40102", port: "1f90", weight: "01000000", active: "02000000", inactive: "01000000")
            + destReply("0af40103", port: "1f90", weight: "00000000", active: "00000000", inactive: "03000000")
            + doneMessage)
        let messages = try NetlinkMessage.decodeAll(datagram)
        #expect(messages.map(\.type) == [familyID, familyID, NetlinkMessageType.done])

        let request = IPVSMessages(familyID: familyID).dumpDestinations(VirtualServerKey(address: IPAddress("10.96.0.10")!, proto: .tcp, port: 80))
        var collector = ReplyCollector([(sequence: 43, request: request)])
        for m in messages { try collector.consume(m) }
        #expect(collector.isComplete)
        let replies = try collector.results()[0].get()
        let dests = try replies.map { try IPVSMessages.parseDestination($0, serviceFamily: .ipv4) }
        #expect(dests.map(\.description) == ["10.244.1.2:8080", "10.244.1.3:8080"])
        #expect(dests.map(\.weight) == [1, 0])
        #expect(dests.map(\.activeConnections) == [2, 0])
        #expect(dests.map(\.inactiveConnections) == [1, 3])
        #expect(dests[0].forwarding == .masquerade)
    }

    @Test func dumpSpreadOverSeveralDatagrams() throws {
        let request = IPVSMessages(familyID: familyID).dumpServices()
        var collector = ReplyCollector([(sequence: 42, request: request)])
        for m in try NetlinkMessage.decodeAll(hex(serviceReply)) { try collector.consume(m) }
        #expect(!collector.isComplete)
        #expect(collector.waiting == [42])
        for m in try NetlinkMessage.decodeAll(hex("14000000 0300 0200 2a000000 d2040000 00000000")) { try collector.consume(m) }
        #expect(collector.isComplete)
        #expect(try collector.results()[0].get().count == 1)
    }

    @Test func errorWithExtendedAckStringCapped() throws {
        // NLMSG_ERROR, NLM_F_CAPPED|NLM_F_ACK_TLVS (0x300): error -EINVAL, the request's header,
        // then NLMSGERR_ATTR_MSG "Invalid scheduler\0" (18 bytes, len 22, 2 bytes padding).
        let text = "496e76616c6964207363686564756c657200"
        let datagram = hex("44000000 0200 0003 07000000 d2040000" +   // len 68
                           "eaffffff" +                                 // -22
                           "68000000 1c00 0500 07000000 00000000" +     // the request's nlmsghdr (capped)
                           "1600 0100 \(text) 0000" +
                           "0800 0200 2c000000")                        // NLMSGERR_ATTR_OFFS 44
        let request = IPVSMessages(familyID: familyID).newService(VirtualServer(key: VirtualServerKey(address: IPAddress("10.96.0.10")!, proto: .tcp, port: 80), scheduler: "bogus"))
        var collector = ReplyCollector([(sequence: 7, request: request)])
        for m in try NetlinkMessage.decodeAll(datagram) { try collector.consume(m) }
        #expect(collector.isComplete)
        guard case .failure(let e) = collector.results()[0] else {
            Issue.record("expected a failure")
            return
        }
        #expect(e.errno == .invalidArgument)
        #expect(e.message == "Invalid scheduler")
        #expect(e.operation == "IPVS_CMD_NEW_SERVICE 10.96.0.10:80/TCP")
        #expect(e.description == "IPVS_CMD_NEW_SERVICE 10.96.0.10:80/TCP: EINVAL (Invalid argument): Invalid scheduler")
    }

    @Test func errorWithTheWholeRequestEchoedThenTLVs() throws {
        // Without NLM_F_CAPPED the kernel echoes the whole request (here 20 bytes); the TLVs follow it.
        let datagram = hex("34000000 0200 0002 09000000 00000000" +   // len 52, NLM_F_ACK_TLVS only
                           "efffffff" +                                 // -17 EEXIST
                           "14000000 1c00 0500 09000000 00000000 11010000" +
                           "0b00 0100 65786973747300 00")               // "exists\0"
        let request = IPVSMessages(familyID: familyID).flush()
        var collector = ReplyCollector([(sequence: 9, request: request)])
        for m in try NetlinkMessage.decodeAll(datagram) { try collector.consume(m) }
        guard case .failure(let e) = collector.results()[0] else {
            Issue.record("expected a failure")
            return
        }
        #expect(e.errno == .fileExists)
        #expect(e.message == "exists")
    }

    @Test func acknowledgementAndBatchOutcomesInOrder() throws {
        let m = IPVSMessages(familyID: familyID)
        let key = VirtualServerKey(address: IPAddress("10.96.0.10")!, proto: .tcp, port: 80)
        let requests = [m.deleteService(key), m.flush(), m.getInfo()]
        var collector = ReplyCollector([(sequence: 1, request: requests[0]), (sequence: 2, request: requests[1]), (sequence: 3, request: requests[2])])
        // Replies in the kernel's order: ack for 1, -ESRCH for 2, data then ack for 3; plus a stale reply.
        let datagram = hex(
            "24000000 0200 0001 63000000 00000000 00000000 14000000 1c00 0500 63000000 00000000" +  // stale seq 99: ignored
            "24000000 0200 0001 01000000 00000000 00000000 44000000 1c00 0500 01000000 00000000" +  // ack
            "24000000 0200 0001 02000000 00000000 fdffffff 14000000 1c00 0500 02000000 00000000" +  // -3 ESRCH
            "24000000 1c00 0000 03000000 00000000 0e010000 0800 0100 01020100 0800 0200 00100000" + // SET_INFO 1.2.1 size 4096
            "24000000 0200 0001 03000000 00000000 00000000 14000000 1c00 0500 03000000 00000000")
        for msg in try NetlinkMessage.decodeAll(datagram) { try collector.consume(msg) }
        #expect(collector.isComplete)
        let results = collector.results()
        #expect((try? results[0].get())?.isEmpty == true)
        if case .failure(let e) = results[1] { #expect(e.errno == .noSuchProcess) } else { Issue.record("expected ESRCH") }
        let info = try IPVSMessages.parseInfo(try #require(try results[2].get().first))
        #expect(info.description == "1.2.1 (size=4096)")
    }

    @Test func interruptedDumpAndDoneWithAnError() throws {
        let request = IPVSMessages(familyID: familyID).dumpServices()
        var a = ReplyCollector([(sequence: 42, request: request)])
        // The same entry flagged NLM_F_DUMP_INTR (0x10 | 0x02).
        var interrupted = try NetlinkMessage.decodeAll(hex(serviceReply))[0]
        interrupted.flags.insert(.dumpInterrupted)
        try a.consume(interrupted)
        try a.consume(try NetlinkMessage.decodeAll(hex("14000000 0300 0200 2a000000 d2040000 00000000"))[0])
        if case .failure(let e) = a.results()[0] { #expect(e.errno == .interrupted) } else { Issue.record("expected EINTR") }

        var b = ReplyCollector([(sequence: 42, request: request)])
        try b.consume(try NetlinkMessage.decodeAll(hex("14000000 0300 0200 2a000000 d2040000 f4ffffff"))[0])  // -12 ENOMEM
        if case .failure(let e) = b.results()[0] { #expect(e.errno.rawValue == 12) } else { Issue.record("expected ENOMEM") }
    }

    @Test func unansweredRequestsTimeOut() {
        let c = ReplyCollector([(sequence: 5, request: IPVSMessages(familyID: familyID).flush())])
        if case .failure(let e) = c.results()[0] { #expect(e.errno == .timedOut) } else { Issue.record("expected ETIMEDOUT") }
    }

    @Test func genlFamilyReply() throws {
        // CTRL_CMD_NEWFAMILY: FAMILY_ID u16 0x1c, FAMILY_NAME "IPVS", VERSION 1, MAXATTR 6.
        let m = try NetlinkMessage.decodeAll(hex(
            "38000000 1000 0000 01000000 00000000 01 02 0000" +
            "0600 0100 1c00 0000" + "0900 0200 4950565300 000000" + "0800 0300 01000000" + "0800 0500 06000000"))[0]
        let f = try GenericNetlinkFamily(parsing: m)
        #expect(f == GenericNetlinkFamily(name: "IPVS", id: 0x1c, version: 1, maxAttribute: 6))
    }

    @Test func addressDumpEntries() throws {
        // RTM_NEWADDR: ifaddrmsg {AF_INET, 32, 0x80 permanent, 0, index 7}, IFA_ADDRESS, IFA_LOCAL, IFA_LABEL.
        let m = try NetlinkMessage.decodeAll(hex(
            "40000000 1400 0200 01000000 00000000" + "02 20 80 00 07000000" +
            "0800 0100 0a60000a" + "0800 0200 0a60000a" + "0f00 0300 6b7562652d69707673300000" + "0800 0800 80000000"))[0]
        let a = try #require(try RouteMessages.parseAddress(m))
        #expect(a == InterfaceAddress(index: 7, address: IPAddress("10.96.0.10")!, prefixLength: 32))
        let link = try RouteMessages.parseLink(try NetlinkMessage.decodeAll(hex(
            "38000000 1000 0000 01000000 00000000" + "00 00 0100 07000000 82000000 00000000" +
            "0f00 0300 6b7562652d69707673300000" + "0800 0400 dc050000"))[0])
        #expect(link == LinkInfo(index: 7, name: "kube-ipvs0", flags: 0x82))
    }

    @Test func lengthFieldsAreBounded() {
        // nlmsg_len past the buffer.
        #expect(throws: NetlinkDecodeError.self) { try NetlinkMessage.decodeAll(hex("ff000000 1c00 0000 01000000 00000000")) }
        // nlmsg_len below the header size.
        #expect(throws: NetlinkDecodeError.self) { try NetlinkMessage.decodeAll(hex("08000000 1c00 0000 01000000 00000000")) }
        // Attribute length past its container, and below 4.
        #expect(throws: NetlinkDecodeError.self) { try NetlinkAttributes(parsing: hex("4000 0100 00000000")) }
        #expect(throws: NetlinkDecodeError.self) { try NetlinkAttributes(parsing: hex("0200 0100 00000000")) }
        // A u32 attribute with two bytes.
        #expect(throws: NetlinkDecodeError.self) { try NetlinkAttributes(parsing: hex("0600 0400 0100 0000")).u32(4) }
        // A service reply whose address is short.
        let short = try! NetlinkMessage.decodeAll(hex("30000000 1c00 0000 01000000 00000000 01010000 1c00 0180 0600 0100 0200 0000 0600 0200 0600 0000 0600 0300 0a60 0000"))[0]
        #expect(throws: NetlinkDecodeError.self) { try IPVSMessages.parseService(short) }
        // A truncated NLMSG_ERROR.
        let err = NetlinkMessage(type: NetlinkMessageType.error, flags: [], sequence: 1, payload: [0xea, 0xff])
        #expect(throws: NetlinkDecodeError.self) { try NetlinkAcknowledgement(parsing: err) }
        // Trailing bytes shorter than a header are padding, not messages.
        #expect((try? NetlinkMessage.decodeAll(hex("00000000")))?.isEmpty == true)
    }

    @Test func firewallMarkAndUnknownProtocolServicesAreSkipped() throws {
        let fwmark = try NetlinkMessage.decodeAll(hex("30000000 1c00 0200 01000000 00000000 01010000" +
            "1c00 0180 0600 0100 0200 0000 0800 0500 01000000 0700 0600 727200 00"))[0]
        #expect(try IPVSMessages.parseService(fwmark) == nil)
    }

    @Test func encodingRoundTrip() throws {
        let attrs: [NetlinkAttribute] = [.u8(1, 7), .u16(2, 0x1234), .u32(3, 0xdeadbeef), .be16(4, 80), .string(5, "abc"),
                                         .nested(6, [.u32(1, 5), .nested(2, [])]), .be32(7, 1024, flagged: true)]
        let parsed = try NetlinkAttributes(parsing: attrs.encoded())
        #expect(try parsed.u8(1) == 7)
        #expect(try parsed.u16(2) == 0x1234)
        #expect(try parsed.u32(3) == 0xdeadbeef)
        #expect(try parsed.be16(4) == 80)
        #expect(try parsed.string(5) == "abc")
        #expect(parsed[6]?.isNested == true)
        #expect(try parsed.nested(6)?.u32(1) == 5)
        #expect(parsed[7]?.isNetByteOrder == true)
        #expect(try parsed.be32(7) == 1024)
        let message = NetlinkMessage(type: 0x1c, flags: [.request, .ack], sequence: 9, payload: [1, 2, 3])
        #expect(try NetlinkMessage.decodeAll(message.encoded()) == [message])
    }
}

/// The Swift constants against the C headers they mirror.
@Suite struct UAPIConstantTests {
    @Test func ipvs() {
        #expect(Int(IPVSCommand.newService.rawValue) == Int(IPVS_CMD_NEW_SERVICE))
        #expect(Int(IPVSCommand.getDestination.rawValue) == Int(IPVS_CMD_GET_DEST))
        #expect(Int(IPVSCommand.setConfig.rawValue) == Int(IPVS_CMD_SET_CONFIG))
        #expect(Int(IPVSCommand.getInfo.rawValue) == Int(IPVS_CMD_GET_INFO))
        #expect(Int(IPVSCommand.flush.rawValue) == Int(IPVS_CMD_FLUSH))
        #expect(Int(IPVSCommandAttribute.timeoutUDP) == Int(IPVS_CMD_ATTR_TIMEOUT_UDP))
        #expect(Int(IPVSServiceAttribute.netmask) == Int(IPVS_SVC_ATTR_NETMASK))
        #expect(Int(IPVSServiceAttribute.stats64) == Int(IPVS_SVC_ATTR_STATS64))
        #expect(Int(IPVSDestinationAttribute.addressFamily) == Int(IPVS_DEST_ATTR_ADDR_FAMILY))
        #expect(Int(IPVSDestinationAttribute.persistentConnections) == Int(IPVS_DEST_ATTR_PERSIST_CONNS))
        #expect(Int(IPVSInfoAttribute.connectionTableSize) == Int(IPVS_INFO_ATTR_CONN_TAB_SIZE))
        #expect(Int(IPVSServiceFlags.persistent.rawValue) == Int(IP_VS_SVC_F_PERSISTENT))
        #expect(Int(IPVSServiceFlags.hashed.rawValue) == Int(IP_VS_SVC_F_HASHED))
        #expect(Int(IPVSServiceFlags.scheduler2.rawValue) == Int(IP_VS_SVC_F_SCHED2))
        #expect(Int(IPVSForwardingMethod.masquerade.rawValue) == Int(IP_VS_CONN_F_MASQ))
        #expect(Int(IPVSForwardingMethod.directRoute.rawValue) == Int(IP_VS_CONN_F_DROUTE))
        #expect(ipvsFamilyName == IPVS_GENL_NAME)
        #expect(Int(ipvsFamilyVersion) == Int(IPVS_GENL_VERSION))
    }

    @Test func netlinkAndGenl() {
        #expect(Int(NetlinkMessageFlags.dump.rawValue) == Int(NLM_F_DUMP))
        #expect(Int(NetlinkMessageFlags.create.rawValue) == Int(NLM_F_CREATE))
        #expect(Int(NetlinkMessageFlags.exclusive.rawValue) == Int(NLM_F_EXCL))
        #expect(Int(NetlinkMessageFlags.ackTLVs.rawValue) == Int(NLM_F_ACK_TLVS))
        #expect(Int(NetlinkMessageFlags.dumpInterrupted.rawValue) == Int(NLM_F_DUMP_INTR))
        #expect(Int(NetlinkMessageType.done) == Int(NLMSG_DONE))
        #expect(Int(NetlinkMessageType.error) == Int(NLMSG_ERROR))
        #expect(Int(NetlinkProtocol.generic) == Int(NETLINK_GENERIC))
        #expect(Int(NetlinkProtocol.netfilter) == Int(NETLINK_NETFILTER))
        #expect(Int(NetlinkProtocol.extAck) == Int(NETLINK_EXT_ACK))
        #expect(Int(NetlinkProtocol.capAck) == Int(NETLINK_CAP_ACK))
        #expect(Int(NetlinkProtocol.solNetlink) == Int(SOL_NETLINK))
        #expect(Int(NetlinkAttribute.nestedFlag) == Int(NLA_F_NESTED))
        #expect(Int(NetlinkAttribute.netByteOrderFlag) == Int(NLA_F_NET_BYTEORDER))
        #expect(Int(NetlinkErrorAttribute.message) == Int(NLMSGERR_ATTR_MSG.rawValue))
        #expect(Int(GenericNetlinkControl.familyID) == Int(GENL_ID_CTRL))
        #expect(Int(GenericNetlinkControl.getFamilyCommand) == Int(CTRL_CMD_GETFAMILY))
        #expect(Int(GenericNetlinkControl.attributeFamilyName) == Int(CTRL_ATTR_FAMILY_NAME))
    }

    @Test func rtnetlink() {
        #expect(Int(RouteMessageType.newLink) == Int(RTM_NEWLINK))
        #expect(Int(RouteMessageType.getAddress) == Int(RTM_GETADDR))
        #expect(Int(RouteMessageType.deleteAddress) == Int(RTM_DELADDR))
        #expect(Int(LinkAttribute.name) == Int(IFLA_IFNAME))
        #expect(Int(LinkAttribute.linkInfo) == Int(IFLA_LINKINFO))
        #expect(Int(AddressAttribute.local) == Int(IFA_LOCAL))
        #expect(Int(AddressFlags.noDAD) == Int(IFA_F_NODAD))
        #expect(MemoryLayout<ifinfomsg>.size == 16)
        #expect(MemoryLayout<ifaddrmsg>.size == 8)
        #expect(MemoryLayout<nlmsghdr>.size == netlinkHeaderSize)
        #expect(MemoryLayout<genlmsghdr>.size == 4)
    }
}
