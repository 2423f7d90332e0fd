// Sluice: reading libipset's listings back into sets and members (the kernel round trip is in
// IPVSKernelTests and the ipset-probe kernel test).

import IPVS
import Netlink
import SluiceCore
import Testing

@Suite struct IPSetListingTests {
    /// `ipset list` as libipset 7.17 prints it (taken from a real kernel), with a set of a type
    /// Sluice does not use (F) and an empty one (G).
    static let listing = """
        Name: A
        Type: hash:ip,port,net
        Revision: 8
        Header: family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x0a3d5d5d
        Size in memory: 576
        References: 0
        Number of entries: 2
        Members:
        1.2.3.4,tcp:80,10.0.0.0/8
        1.2.3.4,udp:53,10.1.2.3

        Name: B
        Type: bitmap:port
        Revision: 3
        Header: range 0-65535
        Size in memory: 8264
        References: 0
        Number of entries: 1
        Members:
        30080

        Name: C
        Type: hash:ip,port
        Revision: 7
        Header: family inet6 hashsize 1024 maxelem 65536 bucketsize 12 initval 0xfc50a353
        Size in memory: 304
        References: 0
        Number of entries: 1
        Members:
        fd00::10,sctp:7777

        Name: D
        Type: hash:ip,port,ip
        Revision: 6
        Header: family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x85b33158
        Size in memory: 264
        References: 1
        Number of entries: 1
        Members:
        10.244.1.2,tcp:8080,10.244.1.2

        Name: F
        Type: hash:net
        Revision: 7
        Header: family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1558928f
        Size in memory: 504
        References: 0
        Number of entries: 1
        Members:
        10.0.0.0/8

        Name: G
        Type: hash:ip
        Revision: 6
        Header: family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x762eee7e
        Size in memory: 256
        References: 0
        Number of entries: 0
        Members:

        """

    @Test func readsTheNamedSetsWithTheirMembers() throws {
        let sets = try parseIPSetListing(Self.listing, names: ["A", "B", "C", "D", "G", "absent"])
        #expect(sets.map(\.name) == ["A", "B", "C", "D", "G"])
        let byName = Dictionary(uniqueKeysWithValues: sets.map { ($0.name, $0) })
        #expect(byName["A"]?.typeName == "hash:ip,port,net")
        #expect(byName["A"]?.revision == 8)
        #expect(byName["A"]?.family == 2)
        #expect(byName["C"]?.family == 10)
        #expect(byName["B"]?.family == 0)
        #expect(byName["A"]?.entries == [
            .ipPortNet(IPAddress("1.2.3.4")!, .tcp, 80, CIDR("10.0.0.0/8")!),
            .ipPortNet(IPAddress("1.2.3.4")!, .udp, 53, CIDR("10.1.2.3/32")!),  // a host net prints without /32
        ])
        #expect(byName["B"]?.entries == [.port(30080)])
        #expect(byName["C"]?.entries == [.ipPort(IPAddress("fd00::10")!, .sctp, 7777)])
        #expect(byName["D"]?.entries == [.ipPortIP(IPAddress("10.244.1.2")!, .tcp, 8080, IPAddress("10.244.1.2")!)])
        #expect(byName["G"]?.entries == [])
    }

    @Test func setsOfOtherTypesAreSkippedUnlessAskedFor() throws {
        #expect(try parseIPSetListing(Self.listing, names: ["B"]).map(\.name) == ["B"])
        #expect(throws: IPSetError.self) { try parseIPSetListing(Self.listing, names: ["F"]) }
    }

    @Test func aMemberThatCannotBeReadIsAnErrorNamingIt() {
        let text = "Name: X\nType: hash:ip,port\nRevision: 7\nHeader: family inet\nMembers:\n10.0.0.1,tcp:80\n10.0.0.1,gre\n"
        #expect {
            try parseIPSetListing(text, names: ["X"])
        } throws: { error in
            let e = error as? IPSetError
            return e?.operation == .list && e?.set == "X" && e?.message.contains("10.0.0.1,gre") == true
        }
    }

    @Test func everyMemberFormReadsBackAsWritten() {
        let cases: [(IPSetType, IPSetEntry)] = [
            (.hashIP, .ip(IPAddress("10.96.0.10")!)),
            (.hashIP, .ip(IPAddress("fd00::1")!)),
            (.hashIPPort, .ipPort(IPAddress("10.96.0.10")!, .udp, 53)),
            (.hashIPPort, .ipPort(IPAddress("fd00::10")!, .tcp, 80)),
            (.hashIPPortIP, .ipPortIP(IPAddress("fd00::2")!, .sctp, 9, IPAddress("fd00::2")!)),
            (.hashIPPortNet, .ipPortNet(IPAddress("1.2.3.4")!, .tcp, 443, CIDR("192.168.0.0/16")!)),
            (.hashIPPortNet, .ipPortNet(IPAddress("fd00::1")!, .tcp, 80, CIDR("fd00:5::/64")!)),
            (.bitmapPort, .port(65535)),
        ]
        for (type, entry) in cases {
            #expect(IPSetEntry(listed: Substring(entry.description), type: type) == entry, "\(entry)")
        }
        #expect(IPSetEntry(listed: "10.96.0.10,tcp:80", type: .hashIP) == nil)
        #expect(IPSetEntry(listed: "10.96.0.10,tcp:70000", type: .hashIPPort) == nil)
        #expect(IPSetEntry(listed: "80", type: .hashIPPort) == nil)
        // Dotted quads are read byte by byte: the edges, and what is not one.
        #expect(IPSetEntry(listed: "0.0.0.0", type: .hashIP) == .ip(IPAddress("0.0.0.0")!))
        #expect(IPSetEntry(listed: "255.255.255.255", type: .hashIP) == .ip(IPAddress("255.255.255.255")!))
        #expect(IPSetEntry(listed: "172.20.3.44,udp:53", type: .hashIPPort) == .ipPort(IPAddress("172.20.3.44")!, .udp, 53))
        for bad in ["10.96.0.256", "10.96.0", "10.96.0.1.", "10..0.1", "1000.1.1.1", "10.96.0.1a", ".10.96.0.1", ""] {
            #expect(IPSetEntry(listed: Substring(bad), type: .hashIP) == nil, "\(bad)")
        }
    }

    @Test func errorsCarryLibipsetsTextAndTheMember() {
        let e = IPSetError(operation: .add, set: "KUBE-CLUSTER-IP", entry: "10.96.0.10,tcp:80",
                           message: "Error in line 3: Element cannot be added to the set: it's already added")
        #expect(e.description == "ipset add KUBE-CLUSTER-IP 10.96.0.10,tcp:80: Error in line 3: Element cannot be added to the set: it's already added")
        #expect(IPSetError(operation: .session, message: "cannot start an ipset session", errno: .permissionDenied).description
            .hasSuffix("(\(Errno.permissionDenied))"))
    }
}
