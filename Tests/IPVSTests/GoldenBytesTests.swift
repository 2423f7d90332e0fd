// Golden bytes for every netlink message Sluice sends. Each expected value is derived by
// hand from the UAPI layouts, independently of the codec:
//
//   nlmsghdr  (linux/netlink.h):  u32 len | u16 type | u16 flags | u32 seq | u32 pid   (host order: little-endian here)
//   nlattr    (linux/netlink.h):  u16 len (header + payload, no padding) | u16 type, payload padded to 4 bytes;
//                                 type bit 15 = NLA_F_NESTED (0x8000), bit 14 = NLA_F_NET_BYTEORDER (0x4000)
//   genlmsghdr (linux/genetlink.h): u8 cmd | u8 version | u16 reserved
//   nfgenmsg  (linux/netfilter/nfnetlink.h): u8 family | u8 version | be16 res_id
//   ifinfomsg (linux/rtnetlink.h): u8 family | u8 pad | u16 type | s32 index | u32 flags | u32 change
//   ifaddrmsg (linux/if_addr.h):  u8 family | u8 prefixlen | u8 flags | u8 scope | u32 index
//
// Flags: NLM_F_REQUEST 0x1, NLM_F_ACK 0x4, NLM_F_DUMP 0x300, NLM_F_EXCL 0x200, NLM_F_CREATE 0x400.
// The IPVS family id is dynamic; these tests use 0x1c (the id seen in the UML guest).

import IPVS
import Netlink
import SluiceCore
import SluiceTesting
import Testing

private let ipvsFamily: UInt16 = 0x1c
private let vip = IPAddress("10.96.0.10")!
private let tcp80 = VirtualServerKey(address: vip, proto: .tcp, port: 80)
private let backend = RealServer(address: IPAddress("10.244.1.2")!, port: 8080, weight: 1)

/// `IPVS_CMD_ATTR_SERVICE` nest with the identity of 10.96.0.10:80/TCP (48 bytes).
private let serviceIdentityNest =
    "3000 0180" +                                       // nla_len 48, IPVS_CMD_ATTR_SERVICE (1) | NLA_F_NESTED
    "0600 0100 0200 0000" +                             // IPVS_SVC_ATTR_AF (1) u16 AF_INET (2), 2 bytes padding
    "0600 0200 0600 0000" +                             // IPVS_SVC_ATTR_PROTOCOL (2) u16 IPPROTO_TCP (6)
    "1400 0300 0a60000a 00000000 00000000 00000000" +   // IPVS_SVC_ATTR_ADDR (3): union nf_inet_addr, 16 bytes, 10.96.0.10 first
    "0600 0400 0050 0000"                               // IPVS_SVC_ATTR_PORT (4): 80 big-endian (0x0050), no NET_BYTEORDER flag

/// `IPVS_CMD_ATTR_DEST` nest with every attribute NEW/SET need, for 10.244.1.2:8080 with `weight` (72 bytes).
private func fullDestNest(weight: String) -> String {
    "4800 0280" +                                       // nla_len 72, IPVS_CMD_ATTR_DEST (2) | NLA_F_NESTED
    "1400 0100 0af40102 00000000 00000000 00000000" +   // IPVS_DEST_ATTR_ADDR (1): 10.244.1.2 in 16 bytes
    "0600 0200 1f90 0000" +                             // IPVS_DEST_ATTR_PORT (2): 8080 = 0x1f90 big-endian
    "0800 0300 00000000" +                              // IPVS_DEST_ATTR_FWD_METHOD (3): IP_VS_CONN_F_MASQ (0)
    "0800 0400 \(weight)" +                             // IPVS_DEST_ATTR_WEIGHT (4) u32
    "0800 0500 00000000" +                              // IPVS_DEST_ATTR_U_THRESH (5): 0
    "0800 0600 00000000" +                              // IPVS_DEST_ATTR_L_THRESH (6): 0
    "0600 0b00 0200 0000"                               // IPVS_DEST_ATTR_ADDR_FAMILY (11) u16 AF_INET
}

private func check(_ request: NetlinkRequest, sequence: UInt32, _ expected: String, sourceLocation: SourceLocation = #_sourceLocation) {
    let got = request.message(sequence: sequence).encoded()
    let want = hex(expected)
    #expect(grouped(got) == grouped(want), sourceLocation: sourceLocation)
}

@Suite struct GenericNetlinkGoldenTests {
    @Test func getFamilyIPVS() {
        // 16 header + 4 genlmsghdr + 12 attribute = 32 bytes.
        check(GenericNetlinkControl.getFamily("IPVS"), sequence: 1,
              "20000000 1000 0500 01000000 00000000" +  // len 32, GENL_ID_CTRL (0x10), REQUEST|ACK, seq 1, pid 0
              "03 01 0000" +                            // CTRL_CMD_GETFAMILY (3), version 1
              "0900 0200 49505653 00 000000")           // CTRL_ATTR_FAMILY_NAME (2), len 4+5, "IPVS\0", 3 bytes padding
    }
}

@Suite struct IPVSGoldenTests {
    let m = IPVSMessages(familyID: ipvsFamily)

    @Test func newServiceIPv4TCPRoundRobinWithEveryMandatoryAttribute() {
        let vs = VirtualServer(key: tcp80, scheduler: "rr")
        // Service nest: AF 8 + PROTOCOL 8 + ADDR 20 + PORT 8 + SCHED_NAME 8 + FLAGS 12 + TIMEOUT 8 + NETMASK 8 = 80, nest 84.
        // Message: 16 + 4 + 84 = 104 (0x68).
        check(m.newService(vs), sequence: 2,
              "68000000 1c00 0500 02000000 00000000" +  // len 104, IPVS family, REQUEST|ACK, seq 2
              "01 01 0000" +                            // IPVS_CMD_NEW_SERVICE (1), IPVS_GENL_VERSION 1
              "5400 0180" +                             // nla_len 84, IPVS_CMD_ATTR_SERVICE | NESTED
              "0600 0100 0200 0000" +                   // AF_INET
              "0600 0200 0600 0000" +                   // IPPROTO_TCP
              "1400 0300 0a60000a 00000000 00000000 00000000" +
              "0600 0400 0050 0000" +                   // port 80, big-endian
              "0700 0600 727200 00" +                   // IPVS_SVC_ATTR_SCHED_NAME (6): "rr\0", 1 byte padding
              "0c00 0700 00000000 ffffffff" +           // IPVS_SVC_ATTR_FLAGS (7): struct ip_vs_flags {flags 0, mask ~0}
              "0800 0800 00000000" +                    // IPVS_SVC_ATTR_TIMEOUT (8): 0
              "0800 0900 ffffffff")                     // IPVS_SVC_ATTR_NETMASK (9): 0xffffffff
    }

    @Test func newServiceIPv6UDPPersistent() {
        let key = VirtualServerKey(address: IPAddress("fd00::10")!, proto: .udp, port: 53)
        let vs = VirtualServer(key: key, scheduler: "rr", flags: .persistent, timeout: 10800)
        check(m.newService(vs), sequence: 3,
              "68000000 1c00 0500 03000000 00000000" +
              "01 01 0000" +
              "5400 0180" +
              "0600 0100 0a00 0000" +                   // AF_INET6 (10)
              "0600 0200 1100 0000" +                   // IPPROTO_UDP (17)
              "1400 0300 fd000000 00000000 00000000 00000010" +
              "0600 0400 0035 0000" +                   // port 53 big-endian
              "0700 0600 727200 00" +
              "0c00 0700 01000000 ffffffff" +           // IP_VS_SVC_F_PERSISTENT, mask ~0
              "0800 0800 302a0000" +                    // timeout 10800 = 0x2a30
              "0800 0900 80000000")                     // netmask: prefix length 128 for IPv6
    }

    @Test func setServiceSendsTheFullNestToo() {
        // SET_SERVICE needs the same four attributes as NEW_SERVICE. "wrr\0" is 4 bytes: len 8, no padding.
        let vs = VirtualServer(key: tcp80, scheduler: "wrr", flags: .persistent, timeout: 60)
        check(m.setService(vs), sequence: 15,
              "68000000 1c00 0500 0f000000 00000000" +
              "02 01 0000" +                            // IPVS_CMD_SET_SERVICE (2)
              "5400 0180" +
              "0600 0100 0200 0000" +
              "0600 0200 0600 0000" +
              "1400 0300 0a60000a 00000000 00000000 00000000" +
              "0600 0400 0050 0000" +
              "0800 0600 77727200" +                    // "wrr\0"
              "0c00 0700 01000000 ffffffff" +           // IP_VS_SVC_F_PERSISTENT
              "0800 0800 3c000000" +                    // timeout 60
              "0800 0900 ffffffff")
    }

    @Test func deleteServiceSendsTheIdentityOnly() {
        // 16 + 4 + 48 = 68 (0x44).
        check(m.deleteService(tcp80), sequence: 4,
              "44000000 1c00 0500 04000000 00000000" +
              "03 01 0000" +                            // IPVS_CMD_DEL_SERVICE (3)
              serviceIdentityNest)
    }

    @Test func getServiceDumpWithEmptyNest() {
        // 16 + 4 + 4 = 24 (0x18); flags REQUEST|ACK|DUMP = 0x305.
        check(m.dumpServices(), sequence: 5,
              "18000000 1c00 0503 05000000 00000000" +
              "04 01 0000" +                            // IPVS_CMD_GET_SERVICE (4)
              "0400 0180")                              // empty IPVS_CMD_ATTR_SERVICE nest
    }

    @Test func newDestinationMasqueradeWeightOne() {
        // 16 + 4 + 48 + 72 = 140 (0x8c).
        check(m.newDestination(tcp80, backend), sequence: 6,
              "8c000000 1c00 0500 06000000 00000000" +
              "05 01 0000" +                            // IPVS_CMD_NEW_DEST (5)
              serviceIdentityNest + fullDestNest(weight: "01000000"))
    }

    @Test func setDestinationWeightZero() {
        var drained = backend
        drained.weight = 0
        check(m.setDestination(tcp80, drained), sequence: 7,
              "8c000000 1c00 0500 07000000 00000000" +
              "06 01 0000" +                            // IPVS_CMD_SET_DEST (6)
              serviceIdentityNest + fullDestNest(weight: "00000000"))
    }

    @Test func deleteDestinationSendsIdentities() {
        // Dest nest: ADDR 20 + PORT 8 + ADDR_FAMILY 8 = 36, nest 40. Message 16 + 4 + 48 + 40 = 108 (0x6c).
        check(m.deleteDestination(tcp80, backend), sequence: 8,
              "6c000000 1c00 0500 08000000 00000000" +
              "07 01 0000" +                            // IPVS_CMD_DEL_DEST (7)
              serviceIdentityNest +
              "2800 0280" +
              "1400 0100 0af40102 00000000 00000000 00000000" +
              "0600 0200 1f90 0000" +
              "0600 0b00 0200 0000")
    }

    @Test func getDestinationDump() {
        check(m.dumpDestinations(tcp80), sequence: 9,
              "44000000 1c00 0503 09000000 00000000" +
              "08 01 0000" +                            // IPVS_CMD_GET_DEST (8), dump
              serviceIdentityNest)
    }

    @Test func flush() {
        check(m.flush(), sequence: 10,
              "14000000 1c00 0500 0a000000 00000000" +
              "11 01 0000")                             // IPVS_CMD_FLUSH (17)
    }

    @Test func getInfo() {
        check(m.getInfo(), sequence: 11,
              "14000000 1c00 0500 0b000000 00000000" +
              "0f 01 0000")                             // IPVS_CMD_GET_INFO (15)
    }

    @Test func setConfigTimeouts() {
        // Three u32 top-level attributes: 16 + 4 + 24 = 44 (0x2c).
        check(m.setConfig(IPVSTimeouts(tcp: 900, tcpFin: 120, udp: 300)), sequence: 12,
              "2c000000 1c00 0500 0c000000 00000000" +
              "0c 01 0000" +                            // IPVS_CMD_SET_CONFIG (12)
              "0800 0400 84030000" +                    // IPVS_CMD_ATTR_TIMEOUT_TCP (4): 900 = 0x384
              "0800 0500 78000000" +                    // IPVS_CMD_ATTR_TIMEOUT_TCP_FIN (5): 120
              "0800 0600 2c010000")                     // IPVS_CMD_ATTR_TIMEOUT_UDP (6): 300 = 0x12c
    }

    @Test func setConfigLeavesZeroTimeoutsOut() {
        check(m.setConfig(IPVSTimeouts(tcp: 0, tcpFin: 0, udp: 30)), sequence: 13,
              "1c000000 1c00 0500 0d000000 00000000" +
              "0c 01 0000" +
              "0800 0600 1e000000")
    }

    @Test func getConfig() {
        check(m.getConfig(), sequence: 14, "14000000 1c00 0500 0e000000 00000000 0d 01 0000")
    }

    @Test func sctpAndMaglevFlags() {
        let key = VirtualServerKey(address: vip, proto: .sctp, port: 7777)
        let bytes = m.newService(VirtualServer(key: key, scheduler: "mh", flags: .scheduler2)).message(sequence: 1).encoded()
        // PROTOCOL attribute value at offset 16+4+4+8+4 = 36: IPPROTO_SCTP (132 = 0x84).
        #expect(Array(bytes[36..<38]) == [0x84, 0x00])
        // FLAGS value: IP_VS_SVC_F_SCHED2 (0x10) then mask.
        let flagsAt = 16 + 4 + 4 + 8 + 8 + 20 + 8 + 8 + 4
        #expect(grouped(Array(bytes[flagsAt..<(flagsAt + 8)])) == "10000000 ffffffff")
    }
}

@Suite struct RouteNetlinkGoldenTests {
    @Test func newLinkDummyKubeIPVS0NoARP() {
        // 16 header + 16 ifinfomsg + 16 IFLA_IFNAME + 16 IFLA_LINKINFO = 64 (0x40).
        check(RouteMessages.newDummyLink(name: "kube-ipvs0"), sequence: 1,
              "40000000 1000 0506 01000000 00000000" +  // RTM_NEWLINK (16), REQUEST|ACK|EXCL|CREATE (0x605)
              "00 00 0000 00000000 80000000 80000000" + // AF_UNSPEC, type 0, index 0, ifi_flags IFF_NOARP, ifi_change IFF_NOARP (so: down)
              "0f00 0300 6b7562652d69707673300000" +    // IFLA_IFNAME (3): len 4+11 "kube-ipvs0\0", 1 byte padding
              "1000 1280" +                             // IFLA_LINKINFO (18) | NESTED, len 16
              "0a00 0100 64756d6d7900 0000")            // IFLA_INFO_KIND (1): "dummy\0", 2 bytes padding
    }

    @Test func getLinkByName() {
        check(RouteMessages.getLink(name: "kube-ipvs0"), sequence: 2,
              "30000000 1200 0500 02000000 00000000" +  // RTM_GETLINK (18), REQUEST|ACK
              "00 00 0000 00000000 00000000 00000000" +
              "0f00 0300 6b7562652d69707673300000")
    }

    @Test func deleteLinkByName() {
        check(RouteMessages.deleteLink(name: "kube-ipvs0"), sequence: 3,
              "30000000 1100 0500 03000000 00000000" +  // RTM_DELLINK (17)
              "00 00 0000 00000000 00000000 00000000" +
              "0f00 0300 6b7562652d69707673300000")
    }

    @Test func newAddressIPv4Slash32() {
        // 16 + 8 ifaddrmsg + 8 IFA_LOCAL + 8 IFA_ADDRESS = 40 (0x28).
        check(RouteMessages.newAddress(vip, index: 5), sequence: 4,
              "28000000 1400 0506 04000000 00000000" +  // RTM_NEWADDR (20), REQUEST|ACK|EXCL|CREATE
              "02 20 00 00 05000000" +                  // AF_INET, prefixlen 32, flags 0, RT_SCOPE_UNIVERSE, ifindex 5
              "0800 0200 0a60000a" +                    // IFA_LOCAL (2)
              "0800 0100 0a60000a")                     // IFA_ADDRESS (1)
    }

    @Test func newAddressIPv6Slash128WithoutDAD() {
        // 16 + 8 + 20 + 20 = 64 (0x40).
        check(RouteMessages.newAddress(IPAddress("fd00::10")!, index: 5), sequence: 5,
              "40000000 1400 0506 05000000 00000000" +
              "0a 80 02 00 05000000" +                  // AF_INET6, prefixlen 128, IFA_F_NODAD (0x02), scope 0, ifindex 5
              "1400 0200 fd000000 00000000 00000000 00000010" +
              "1400 0100 fd000000 00000000 00000000 00000010")
    }

    @Test func deleteAddress() {
        check(RouteMessages.deleteAddress(vip, index: 5), sequence: 6,
              "28000000 1500 0500 06000000 00000000" +  // RTM_DELADDR (21), REQUEST|ACK
              "02 20 00 00 05000000" +
              "0800 0200 0a60000a" +
              "0800 0100 0a60000a")
    }

    @Test func dumpAddresses() {
        check(RouteMessages.dumpAddresses(family: nil), sequence: 7,
              "18000000 1600 0503 07000000 00000000" +  // RTM_GETADDR (22), REQUEST|ACK|DUMP
              "00 00 00 00 00000000")
    }
}

/// ipset's wire format is libipset's now (IPVSKernelTests read the kernel back); what Sluice
/// still decides itself is the sets' names.
@Suite struct IPSetGoldenTests {
    @Test func ipv6SetNamesAreShortened() {
        #expect(KubeIPSet.definition(KubeIPSet.loadBalancerSourceCIDR, .ipv6).name == "KUBE-6-LOAD-BALANCER-SOURCE-CID")
        #expect(KubeIPSet.definition(KubeIPSet.nodePortLocalSCTP, .ipv6).name == "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS")
        #expect(KubeIPSet.definition(KubeIPSet.clusterIP, .ipv6).name == "KUBE-6-CLUSTER-IP")
        #expect(KubeIPSet.all(.ipv4).count == 17)
    }
}
