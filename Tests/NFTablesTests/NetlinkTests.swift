// Partial syncs as nf_tables netlink messages: the encoder's bytes against what `nft` 1.0.6
// sends for the same commands (captured with `nft --debug=mnl`), and, in the kernel, a
// sequence of partial transactions applied through netlink in one namespace and through
// `nft -f` in another, compared with `nft list table` after every step.

import Foundation
import Netlink
import NFTables
import SluiceCore
import SluiceTesting
import Testing

private func hex(_ r: NetlinkRequest) -> String { hexString(r.payload) }

private func rule(_ chain: String, _ r: NFTRule, family: NFTFamily = .ip) throws -> [NetlinkRequest] {
    var enc = NFTNetlinkEncoder(family: family, anonymousSetToken: "t0ken")
    return try enc.encode([.addRule(chain: chain, r)])
}

/// nft's message `hex` with every string attribute `from` (nft's `__set%d`, nested anywhere)
/// renamed `to`, the lengths of the nests around it adjusted.
private func renaming(_ hex: String, _ from: String, to: String) throws -> String {
    func rename(_ attrs: [UInt8]) throws -> [UInt8] {
        var out: [UInt8] = []
        for a in try NetlinkAttributes(parsing: attrs).all {
            let raw = a.type | (a.isNested ? NetlinkAttribute.nestedFlag : 0) | (a.isNetByteOrder ? NetlinkAttribute.netByteOrderFlag : 0)
            let payload = a.isNested ? try rename(a.payload) : a.payload == Array(from.utf8) + [0] ? Array(to.utf8) + [0] : a.payload
            NetlinkAttribute(rawType: raw, payload: payload).encode(into: &out)
        }
        return out
    }
    let b = SluiceTesting.hex(hex)
    return hexString(Array(b.prefix(4)) + (try rename(Array(b.dropFirst(4)))))
}

/// Bytes `nft --debug=mnl` printed for `add rule …` / `add element …` into `table ip kube-proxy`
/// (the attributes after `struct nfgenmsg`, which is included).
@Suite struct NetlinkEncodingTests {
    @Test func masqueradeRuleWithBytePrefix() throws {
        let r = NFTRule([.address(.destination, negated: false, .ip(IPAddress("172.30.0.41")!)),
                         .address(.source, negated: true, .cidr(CIDR("10.0.0.0/8")!))], .verdict(.jump("mark-for-masquerade")))
        #expect(r.text(.ip) == "ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade")
        let msgs = try rule("service-X", r)
        #expect(msgs.count == 1)
        #expect(msgs[0].type == 10 << 8 | 6)
        #expect(msgs[0].flags == [.request, .create, .append])
        #expect(hex(msgs[0]) == "020000000f0001006b7562652d70726f787900000e000200736572766963652d580000000c010480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c00038008000100ac1e0029340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000012c00018008000100636d700020000280080001000000000108000200000000010c000380050001000a000000480001800e000100696d6d656469617465000000340002800800010000000000280002802400028008000100fffffffd180002006d61726b2d666f722d6d61737175657261646500")
    }

    @Test func masqueradeRuleWithMaskedPrefix() throws {
        let r = NFTRule([.address(.destination, negated: false, .ip(IPAddress("172.30.0.41")!)),
                         .address(.source, negated: true, .cidr(CIDR("10.64.0.0/10")!))], .verdict(.jump("mark-for-masquerade")))
        #expect(hex(try rule("service-X", r)[0]) == "020000000f0001006b7562652d70726f787900000e000200736572766963652d5800000050010480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c00038008000100ac1e0029340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100ffc000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000010c000380080001000a400000480001800e000100696d6d656469617465000000340002800800010000000000280002802400028008000100fffffffd180002006d61726b2d666f722d6d61737175657261646500")
    }

    @Test func ipv6PrefixOf64() throws {
        let r = NFTRule([.address(.destination, negated: false, .ip(IPAddress("fd00::1")!)),
                         .address(.source, negated: true, .cidr(CIDR("fd00:10::/64")!))], .verdict(.jump("mark-for-masquerade")))
        #expect(hex(try rule("service-X", r, family: .ip6)[0]) == "0a0000000f0001006b7562652d70726f787900000e000200736572766963652d580000001c010480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000103800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd000000000000000000000000000001340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000808000400000000083000018008000100636d70002400028008000100000000010800020000000001100003800c000100fd00001000000000480001800e000100696d6d656469617465000000340002800800010000000000280002802400028008000100fffffffd180002006d61726b2d666f722d6d61737175657261646500")
    }

    @Test func dnat() throws {
        let r = NFTRule([.l4proto("tcp")], .dnat(IPAddress("10.180.0.1")!, port: 80))
        #expect(r.text(.ip) == "meta l4proto tcp dnat to 10.180.0.1:80")
        #expect(hex(try rule("endpoint-Y", r)[0]) == "020000000f0001006b7562652d70726f787900000f000200656e64706f696e742d590000e400048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c00038005000100060000002c0001800e000100696d6d6564696174650000001800028008000100000000010c000280080001000ab400012c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001000050000038000180080001006e6174002c00028008000100000000010800020000000002080003000000000108000500000000020800070000000002")
        let r6 = NFTRule([.l4proto("udp")], .dnat(IPAddress("fd00::5")!, port: 80))
        #expect(r6.text(.ip6) == "meta l4proto udp dnat to [fd00::5]:80")
        #expect(hex(try rule("endpoint-Y", r6, family: .ip6)[0]) == "0a0000000f0001006b7562652d70726f787900000f000200656e64706f696e742d590000f000048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010011000000380001800e000100696d6d6564696174650000002400028008000100000000011800028014000100fd0000000000000000000000000000052c0001800e000100696d6d6564696174650000001800028008000100000000020c000280060001000050000038000180080001006e6174002c0002800800010000000001080002000000000a080003000000000108000500000000020800070000000002")
    }

    @Test func fibWithComment() throws {
        let r = NFTRule([.fibSourceLocal], .verdict(.jump("mark-for-masquerade")), comment: "masquerade local traffic")
        #expect(r.text(.ip) == "fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"")
        #expect(hex(try rule("service-X", r)[0]) == "020000000f0001006b7562652d70726f787900000e000200736572766963652d58000000a00004802800018008000100666962001c0002800800030000000001080002000000000308000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800800010002000000480001800e000100696d6d656469617465000000340002800800010000000000280002802400028008000100fffffffd180002006d61726b2d666f722d6d617371756572616465001f00070000196d617371756572616465206c6f63616c20747261666669630000")
    }

    @Test func singleSourceRangeIsACompare() throws {
        let r = NFTRule([.addressNotInList(.source, [.cidr(CIDR("203.0.113.0/25")!)])], .verdict(.drop))
        #expect(r.text(.ip) == "ip saddr != { 203.0.113.0/25 } drop")
        #expect(hex(try rule("service-X", r)[0]) == "020000000f0001006b7562652d70726f787900000e000200736572766963652d58000000d8000480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100ffffff800c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000010c00038008000100cb007100300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c0002800800010000000000")
    }

    /// The anonymous interval set nft builds for `ip saddr != { 203.0.113.0/25 , 5.6.7.8 , 1.2.3.4 }`
    /// (nft numbered it set id 7; the encoder's first id is 1).
    @Test func sourceRangesAnonymousSet() throws {
        let r = NFTRule([.addressNotInList(.source, [.cidr(CIDR("203.0.113.0/25")!), .ip(IPAddress("5.6.7.8")!), .ip(IPAddress("1.2.3.4")!)])],
                        .verdict(.drop))
        let msgs = try rule("service-X", r)
        #expect(msgs.map(\.type) == [10 << 8 | 9, 10 << 8 | 12, 10 << 8 | 6])
        func nftID7(_ s: String) -> String { s.replacingOccurrences(of: "08000a0000000007", with: "08000a0000000001") }
        func nftSetID7(_ s: String) -> String { s.replacingOccurrences(of: "0800040000000007", with: "0800040000000001") }
        // nft leaves the name's number to the kernel (`__set%d`); the encoder names the set.
        #expect(hex(msgs[0]) == (try renaming(nftID7("020000000f0001006b7562652d70726f787900000c0002005f5f73657425640008000300000000070800040000000007080005000000000408000a00000000070c000980080001000000000726000d000004020000000204010000000314000407000000010c00040c00000001040b0000000000"), "__set%d", to: "__set_t0ken_1")))
        #expect(hex(msgs[1]) == (try renaming(nftSetID7("020000000f0001006b7562652d70726f787900000c0002005f5f7365742564000800040000000007940003801800018008000300000000010c0001800800010000000000100002800c00018008000100010203041800038008000300000000010c0001800800010001020305100004800c00018008000100050607081800058008000300000000010c0001800800010005060709100006800c00018008000100cb0071001800078008000300000000010c00018008000100cb007180"), "__set%d", to: "__set_t0ken_1")))
        #expect(hex(msgs[2]) == (try renaming("020000000f0001006b7562652d70726f787900000e000200736572766963652d58000000a0000480340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004380001800b0001006c6f6f6b757000002800028008000200000000010c0001005f5f73657425640008000400000000010800050000000001300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c0002800800010000000000", "__set%d", to: "__set_t0ken_1")))
    }

    /// Anonymous set names: no `%` (the kernel would scan every set of the table for a
    /// number), never nft's `__map<N>`/`__set<N>`, new for every set of an encoder, different
    /// between encoders (another process, or a writer created again), within the kernel's limit.
    @Test func anonymousSetNames() throws {
        var enc = NFTNetlinkEncoder(family: .ip, anonymousSetToken: "t0ken")
        let msgs = try enc.encode([
            .addRule(chain: "service-X", NFTRule(.numgenVmap(["endpoint-A", "endpoint-B"]))),
            .addRule(chain: "service-Y", NFTRule(.numgenVmap(["endpoint-C", "endpoint-D"]))),
            .addRule(chain: "firewall-Z", NFTRule([.addressNotInList(.source, [.cidr(CIDR("10.0.0.0/8")!), .cidr(CIDR("192.168.0.0/16")!)])],
                                                  .verdict(.drop))),
        ])
        let newSets = msgs.filter { $0.type == 10 << 8 | 9 }
        let names = try newSets.map { try #require(try NetlinkAttributes(parsing: Array($0.payload.dropFirst(4))).string(2)) }
        #expect(names == ["__map_t0ken_1", "__map_t0ken_2", "__set_t0ken_3"])
        for r in newSets {
            let flags = try #require(try NetlinkAttributes(parsing: Array(r.payload.dropFirst(4))).be32(3))
            #expect(flags & 0x1 != 0, "NFT_SET_ANONYMOUS")
        }
        // The lookups and the element lists name the same sets.
        for name in names { #expect(msgs.filter { hex($0).contains(hexString(Array(name.utf8) + [0])) }.count == 3) }
        #expect(enc.anonymousSetName(.map) == "__map_t0ken_4")

        let a = NFTNetlinkEncoder.randomToken(), b = NFTNetlinkEncoder.randomToken()
        #expect(a != b)
        #expect(a.count == 12 && a.allSatisfy(\.isHexDigit))
        var random = NFTNetlinkEncoder(family: .ip6)
        let name = random.anonymousSetName(.set)
        #expect(name.hasPrefix("__set_") && !name.contains("%"))
        #expect(name.utf8.count < 256)
        var longest = NFTNetlinkEncoder(family: .ip, anonymousSetToken: a)
        for _ in 0..<3 { _ = longest.anonymousSetName(.map) }
        #expect(longest.anonymousSetName(.map) == "__map_\(a)_4")
    }

    /// Overlapping and adjacent ranges are merged, as nft does: `{ 10.0.0.0/8, 10.1.0.0/16, 11.0.0.0/8 }`
    /// is one range 10.0.0.0–11.255.255.255.
    @Test func sourceRangesMerged() throws {
        let r = NFTRule([.addressNotInList(.source, ["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8"].map { .cidr(CIDR($0)!) })], .verdict(.drop))
        let msgs = try rule("service-X", r)
        #expect(hex(msgs[1]) == (try renaming("020000000f0001006b7562652d70726f787900000c0002005f5f736574256400080004000000000b440003801800018008000300000000010c0001800800010000000000100002800c000180080001000a0000001800038008000300000000010c000180080001000c000000"
            .replacingOccurrences(of: "080004000000000b", with: "0800040000000001"), "__set%d", to: "__set_t0ken_1")))
    }

    @Test func elements() throws {
        var enc = NFTNetlinkEncoder(family: .ip)
        let msgs = try enc.encode([
            .addElement(NFTElement("cluster-ips", key: "172.30.0.41")),
            .deleteElement(NFTElementKey(container: "cluster-ips", key: "172.30.0.41")),
            .addElement(NFTElement("service-ips", key: "172.30.0.41 . tcp . 80", value: "goto service-X")),
            .addElement(NFTElement("no-endpoint-nodeports", key: "tcp . 3001", comment: "ns/svc:p", value: "drop")),
        ])
        // nft adds NFTA_SET_ELEM_LIST_SET_ID (its cache's number) to element messages; the
        // kernel finds a named set by name first.
        func noSetID(_ s: String, _ id: String) -> String { s.replacingOccurrences(of: "08000400000000" + id, with: "") }
        #expect(hex(msgs[0]) == noSetID("020000000f0001006b7562652d70726f7879000010000200636c75737465722d69707300080004000000000414000380100001800c00018008000100ac1e0029", "04"))
        #expect(hex(msgs[1]) == "020000000f0001006b7562652d70726f7879000010000200636c75737465722d6970730014000380100001800c00018008000100ac1e0029")
        #expect(msgs[1].type == 10 << 8 | 14)
        #expect(hex(msgs[2]) == noSetID("020000000f0001006b7562652d70726f7879000010000200736572766963652d6970730008000400000000023c000380380001801400018010000100ac1e00290600000000500000200002801c00028008000100fffffffc0e000200736572766963652d58000000", "02"))
        #expect(hex(msgs[3]) == noSetID("020000000f0001006b7562652d70726f787900001a0002006e6f2d656e64706f696e742d6e6f6465706f72747300000008000400000000033800038034000180100001800c000100060000000bb90000100002800c00028008000100000000000f00060000096e732f7376633a700000", "03"))
        #expect(throws: NFTEncodingError.self) {
            var e = NFTNetlinkEncoder(family: .ip)
            _ = try e.encode([.addElement(NFTElement("service-ips", key: "172.30.0.41 . tcp . 80", value: "continue"))])
        }
    }

    @Test func affinitySetAndChains() throws {
        var enc = NFTNetlinkEncoder(family: .ip)
        let msgs = try enc.encode([
            .addSet(NFTContainer(kind: .set, name: "affinity-Z", type: "ipv4_addr", flags: ["dynamic", "timeout"], timeoutSeconds: 10800)),
            .deleteSet("affinity-Z"), .flushChain("service-X"), .deleteChain("endpoint-Y"), .addChain("endpoint-Q"),
        ])
        #expect(msgs.map { $0.type & 0xff } == [9, 11, 8, 5, 3])
        #expect(hex(msgs[0]) == "020000000f0001006b7562652d70726f787900000f000200616666696e6974792d5a000008000300000000300800040000000007080005000000000408000a00000000010c000b000000000000a4cb800a000d000004020000000000")
        #expect(hex(msgs[1]) == "020000000f0001006b7562652d70726f787900000f000200616666696e6974792d5a0000")
        #expect(hex(msgs[2]) == "020000000f0001006b7562652d70726f787900000e000200736572766963652d58000000")
        #expect(hex(msgs[3]) == "020000000f0001006b7562652d70726f787900000f000300656e64706f696e742d590000")
        #expect(hex(msgs[4]) == "020000000f0001006b7562652d70726f787900000f000300656e64706f696e742d510000")
    }

    /// The batch framing: begin and end for NFNL_SUBSYS_NFTABLES, an ack asked only of the last message.
    @Test func batchFraming() throws {
        var enc = NFTNetlinkEncoder(family: .ip)
        let msgs = NFNetlinkBatch.wrap(try enc.encode([.flushChain("a"), .deleteChain("a")]), subsystem: 10)
        #expect(msgs.map(\.type) == [0x10, 10 << 8 | 8, 10 << 8 | 5, 0x11])
        #expect(msgs[0].payload == [0, 0, 0, 10])
        #expect(msgs.map { $0.flags.contains(.ack) } == [false, false, true, false])
    }
}

/// The same partial transactions through netlink and through `nft -f` leave the same table.
@Suite("nftables partial syncs through netlink equal libnftables", .serialized,
       .enabled(if: getuid() == 0 && ToolRunner.which("nft") != nil, "needs root and nft"))
struct NetlinkKernelEquivalenceTests {
    typealias Ports = PartialEqualsFullTests.Ports

    static let lb = spn("lb", "lb"), lb2 = spn("lb", "lb2", "p443")

    /// The partial-sync steps of ``PartialEqualsFullTests`` plus firewall chains with several
    /// (overlapping) source ranges and LoadBalancer IPs added to them.
    static func steps() -> [(String, (inout Ports) -> Void, [ServicePortName])] {
        let base = PartialEqualsFullTests.steps()
        return Array(base.dropLast()) + [
            ("source ranges", {
                $0[lb] = (svc(lb, "172.30.0.50", nodePort: 30050, lb: ["5.6.7.8", "5.6.7.9"],
                              sourceRanges: ["192.168.0.0/16", "203.0.113.0/25", "203.0.113.128/25", "10.0.0.0/8", "10.1.0.0/16"]),
                          [ep("10.0.5.1"), ep("10.0.5.2")])
                $0[lb2] = (svc(lb2, "172.30.0.51", port: 443, lb: ["5.6.7.10"], sourceRanges: ["198.51.100.7/32"]), [ep("10.0.5.3", 443)])
            }, [lb, lb2]),
            ("source ranges changed", {
                $0[lb] = (svc(lb, "172.30.0.50", nodePort: 30050, lb: ["5.6.7.8"], sourceRanges: ["0.0.0.0/1", "128.0.0.0/1"]),
                          [ep("10.0.5.1")])
            }, [lb]),
            ("delete all", { $0 = [:] }, [PartialEqualsFullTests.b, PartialEqualsFullTests.c, PartialEqualsFullTests.m2,
                                          PartialEqualsFullTests.y, lb, lb2]),
        ]
    }

    private func listing(_ ns: TestNamespace, _ family: NFTFamily) async throws -> String {
        try await ns.exec(checked: ["nft", "list", "table", family.rawValue, "kube-proxy"]).stdout
    }

    @Test func sequence() async throws {
        try await TestNamespace.with(label: "nlviaNL") { viaNetlink in
            try await TestNamespace.with(label: "nlviaNFT") { viaNFT in
                let writer = try await viaNetlink.run { try NFTNetlinkWriter(family: .ip) }
                let options = KubeProxyFake.options()
                let compiler = NFTablesCompiler(options: options)
                var ports: Ports = [PartialEqualsFullTests.a: (svc(PartialEqualsFullTests.a, "172.30.0.1"), [ep("10.0.0.2")])]
                var applied = compiler.compile(makeState(Array(ports.values)))
                let full = applied.fullTransaction().text
                try await viaNetlink.exec(checked: ["nft", "-f", "-"], input: full)
                try await viaNFT.exec(checked: ["nft", "-f", "-"], input: full)
                var stale = NFTStaleChains()
                var now = ContinuousClock.now
                var netlinkMessages = 0
                for (i, (name, mutate, touched)) in Self.steps().enumerated() {
                    var txs: [NFTTransaction] = []
                    if let d = stale.takeDeletionTransaction(family: .ip, now: now) { txs.append(d) }
                    mutate(&ports)
                    let state = makeState(Array(ports.values), changed: Set(touched.map(\.service)))
                    let delta = try #require(compiler.update(&applied, to: state, changed: state.changedServices), "\(name)")
                    let tx = applied.partialTransaction(delta)
                    txs.append(tx)
                    for t in txs where !t.isEmpty {
                        let ops = try #require(t.operations, "\(name): no recorded operations")
                        #expect(ops.count == t.operationCount, "\(name)")
                        netlinkMessages += ops.count
                        try await writer.apply(ops)
                        try await viaNFT.exec(checked: ["nft", "-f", "-"], input: t.text)
                    }
                    stale.record(tx, at: now)
                    let got = try await listing(viaNetlink, .ip), want = try await listing(viaNFT, .ip)
                    #expect(NFTablesListing.normalise(got) == NFTablesListing.normalise(want), "\(name)")
                    if NFTablesListing.normalise(got) != NFTablesListing.normalise(want) {
                        Issue.record("\(name)\n--- netlink ---\n\(got)\n--- nft -f ---\n\(want)")
                    }
                    if i % 2 == 1 { now = now + .seconds(2) }
                }
                #expect(netlinkMessages > 100)
            }
        }
    }

    /// The same for `table ip6 kube-proxy`: affinity, a Local policy, source ranges.
    @Test func ipv6() async throws {
        try await TestNamespace.with(label: "nl6viaNL") { viaNetlink in
            try await TestNamespace.with(label: "nl6viaNFT") { viaNFT in
                let writer = try await viaNetlink.run { try NFTNetlinkWriter(family: .ip6) }
                let options = KubeProxyFake.options(.ipv6)
                let compiler = NFTablesCompiler(options: options)
                let a = spn("v6", "a"), b = spn("v6", "b")
                var applied = compiler.compile(makeState([], family: .ipv6))
                let full = applied.fullTransaction().text
                try await viaNetlink.exec(checked: ["nft", "-f", "-"], input: full)
                try await viaNFT.exec(checked: ["nft", "-f", "-"], input: full)
                let states: [[(ServicePortInfo, [EndpointInfo])]] = [
                    [(svc(a, "fd00:10:96::1", affinity: 300), [ep("fd00:10::2"), ep("fd00:10::3")])],
                    [(svc(a, "fd00:10:96::1", affinity: 300), [ep("fd00:10::3")]),
                     (svc(b, "fd00:10:96::2", nodePort: 30002, lb: ["2001:db8:5::1"], sourceRanges: ["2001:db8::/32", "2001:db9::/66"],
                          eTPLocal: true), [ep("fd00:10::5", local: true), ep("fd00:10::6")])],
                    [(svc(b, "fd00:10:96::2", nodePort: 30002), [])],
                ]
                for (i, ports) in states.enumerated() {
                    let state = makeState(ports, family: .ipv6, changed: [a.service, b.service])
                    let delta = try #require(compiler.update(&applied, to: state, changed: state.changedServices))
                    let tx = applied.partialTransaction(delta)
                    try await writer.apply(try #require(tx.operations))
                    try await viaNFT.exec(checked: ["nft", "-f", "-"], input: tx.text)
                    let got = try await listing(viaNetlink, .ip6), want = try await listing(viaNFT, .ip6)
                    #expect(NFTablesListing.normalise(got) == NFTablesListing.normalise(want), "step \(i)")
                    if NFTablesListing.normalise(got) != NFTablesListing.normalise(want) {
                        Issue.record("step \(i)\n--- netlink ---\n\(got)\n--- nft -f ---\n\(want)")
                    }
                }
            }
        }
    }

    /// A batch the kernel rejects applies nothing and names the failing message.
    @Test func failedBatchAppliesNothing() async throws {
        try await TestNamespace.with(label: "nlfail") { ns in
            let writer = try await ns.run { try NFTNetlinkWriter(family: .ip) }
            let applied = NFTablesCompiler(options: KubeProxyFake.options()).compile(makeState([]))
            try await ns.exec(checked: ["nft", "-f", "-"], input: applied.fullTransaction().text)
            let before = try await listing(ns, .ip)
            do {
                try await writer.apply([
                    .addChain("service-NEW"),
                    .addRule(chain: "service-NEW", NFTRule(.verdict(.jump("mark-for-masquerade")))),
                    .addElement(NFTElement("service-ips", key: "172.30.0.9 . tcp . 80", value: "goto service-NEW")),
                    .addRule(chain: "service-NEW", NFTRule(.verdict(.goto("no-such-chain")))),
                ])
                Issue.record("the batch was accepted")
            } catch let e as NFTNetlinkError {
                #expect(e.errno == .noSuchFileOrDirectory)
                #expect(e.operation.contains("NFT_MSG_NEWRULE ip kube-proxy service-NEW goto no-such-chain"))
            }
            #expect(try await listing(ns, .ip) == before)
        }
    }
}

/// Full transactions as one netlink batch leave the table `nft -f` of the same text leaves.
@Suite("nftables full syncs through netlink equal nft -f", .serialized,
       .enabled(if: getuid() == 0 && ToolRunner.which("nft") != nil, "needs root and nft"))
struct NetlinkFullSyncKernelTests {
    typealias Ports = PartialEqualsFullTests.Ports

    private func listing(_ ns: TestNamespace, _ family: NFTFamily) async throws -> String {
        try await ns.exec(checked: ["nft", "list", "table", family.rawValue, "kube-proxy"]).stdout
    }

    /// Every state of the partial-sync sequence (ClusterIP, affinity, NodePort, LoadBalancer
    /// with source ranges, Local policy, no endpoints) as a full sync, with NodePorts on the
    /// node IP and on every local address, one and two service CIDRs; then a second full
    /// sync over it as a restarted process sends it (base chains recreated, stale chains
    /// flushed), and a full sync by a second writer (another process's set names).
    @Test(arguments: [(NodePortAddresses?.none, [String]()), (.some(.all), ["10.96.0.0/12"])])
    func sequenceOfFullSyncs(nodePorts: NodePortAddresses?, extraCIDRs: [String]) async throws {
        try await TestNamespace.with(label: "nlfullNL") { viaNetlink in
            try await TestNamespace.with(label: "nlfullNFT") { viaNFT in
                let writer = try await viaNetlink.run { try NFTNetlinkWriter(family: .ip) }
                let compiler = NFTablesCompiler(options: KubeProxyFake.options(nodePortAddresses: nodePorts))
                let cidrs = extraCIDRs.compactMap(CIDR.init)
                var ports: Ports = [PartialEqualsFullTests.a: (svc(PartialEqualsFullTests.a, "172.30.0.1"), [ep("10.0.0.2")])]
                var existing = NFTExistingObjects()
                var bytes = 0
                for (i, (name, mutate, _)) in ([("first", { (_: inout Ports) in }, [])] + NetlinkKernelEquivalenceTests.steps()).enumerated() {
                    mutate(&ports)
                    var state = makeState(Array(ports.values))
                    state.serviceCIDRs = cidrs
                    let ruleset = compiler.compile(state)
                    let recreate = i == 0 || i == 3
                    let tx = ruleset.fullTransaction(recreateBaseChains: recreate, existing: existing, recordingOperations: true)
                    let ops = try #require(tx.operations, "\(name): the full transaction has no recorded operations")
                    #expect(ops.count == tx.operationCount, "\(name)")
                    // The same transaction encoded while it is built, without text.
                    let encoded = ruleset.fullTransaction(recreateBaseChains: recreate, existing: existing, encodingNetlink: true)
                    let batch = try #require(encoded.netlinkBatch, "\(name): \(String(describing: encoded.encodingError))")
                    #expect(encoded.text.isEmpty && encoded.textBytes == tx.text.utf8.count && encoded.operationCount == tx.operationCount)
                    #expect(batch.messageCount >= tx.operationCount, "\(name)")
                    bytes += batch.byteCount
                    try await writer.apply(batch)
                    try await viaNFT.exec(checked: ["nft", "-f", "-"], input: tx.text)
                    let got = try await listing(viaNetlink, .ip), want = try await listing(viaNFT, .ip)
                    #expect(NFTablesListing.normalise(got) == NFTablesListing.normalise(want), "\(name)")
                    if NFTablesListing.normalise(got) != NFTablesListing.normalise(want) {
                        Issue.record("\(name)\n--- netlink ---\n\(got)\n--- nft -f ---\n\(want)")
                    }
                    let inventory = try await viaNetlink.run { try NFTablesInventory(table: "kube-proxy", family: .ip) }
                    existing = NFTExistingObjects(chains: try await inventory.chainNames(), sets: try await inventory.setNames())
                }
                #expect(bytes > 10_000)
                // A second writer (a restarted process) rewrites the table: its anonymous set
                // names do not collide with the first writer's, still bound to rules.
                let again = try await viaNetlink.run { try NFTNetlinkWriter(family: .ip) }
                var state = makeState(Array(ports.values))
                state.serviceCIDRs = cidrs
                let ruleset = compiler.compile(state)
                let tx = ruleset.fullTransaction(recreateBaseChains: true, existing: existing, recordingOperations: true)
                try await again.apply(try #require(tx.operations))
                try await viaNFT.exec(checked: ["nft", "-f", "-"], input: tx.text)
                #expect(NFTablesListing.normalise(try await listing(viaNetlink, .ip)) == NFTablesListing.normalise(try await listing(viaNFT, .ip)))
            }
        }
    }

    /// The same for `table ip6 kube-proxy`.
    @Test func ipv6() async throws {
        try await TestNamespace.with(label: "nlfull6NL") { viaNetlink in
            try await TestNamespace.with(label: "nlfull6NFT") { viaNFT in
                let writer = try await viaNetlink.run { try NFTNetlinkWriter(family: .ip6) }
                let a = spn("v6", "a"), b = spn("v6", "b")
                for nodePorts in [NodePortAddresses?.none, .some(.all)] {
                    let compiler = NFTablesCompiler(options: KubeProxyFake.options(.ipv6, nodePortAddresses: nodePorts))
                    var state = makeState([
                        (svc(a, "fd00:10:96::1", affinity: 300), [ep("fd00:10::2"), ep("fd00:10::3")]),
                        (svc(b, "fd00:10:96::2", nodePort: 30002, lb: ["2001:db8:5::1"], sourceRanges: ["2001:db8::/32", "2001:db9::/66"],
                             eTPLocal: true), [ep("fd00:10::5", local: true), ep("fd00:10::6")]),
                    ], family: .ipv6)
                    state.serviceCIDRs = [CIDR("fd00:20::/64")!]
                    let tx = compiler.compile(state).fullTransaction()
                    let encoded = compiler.compile(state).fullTransaction(encodingNetlink: true)
                    try await writer.apply(try #require(encoded.netlinkBatch, "\(String(describing: encoded.encodingError))"))
                    try await viaNFT.exec(checked: ["nft", "-f", "-"], input: tx.text)
                    let got = try await listing(viaNetlink, .ip6), want = try await listing(viaNFT, .ip6)
                    #expect(NFTablesListing.normalise(got) == NFTablesListing.normalise(want))
                    if NFTablesListing.normalise(got) != NFTablesListing.normalise(want) {
                        Issue.record("--- netlink ---\n\(got)\n--- nft -f ---\n\(want)")
                    }
                }
            }
        }
    }
}

/// A full batch the kernel rejects applies nothing, and the error names the failing message.
@Suite("nftables netlink batch failure", .serialized,
       .enabled(if: getuid() == 0 && ToolRunner.which("nft") != nil, "needs root and nft"))
struct NetlinkBatchFailureTests {
    @Test func failedFullBatchLeavesThePreviousTable() async throws {
        try await TestNamespace.with(label: "nlfullfail") { ns in
            let writer = try await ns.run { try NFTNetlinkWriter(family: .ip) }
            let a = PartialEqualsFullTests.a
            let ruleset = NFTablesCompiler(options: KubeProxyFake.options()).compile(makeState([(svc(a, "172.30.0.1"), [ep("10.0.0.2")])]))
            try await writer.apply(try #require(ruleset.fullTransaction(encodingNetlink: true).netlinkBatch))
            let before = try await ns.exec(checked: ["nft", "list", "table", "ip", "kube-proxy"]).stdout
            var tx = ruleset.fullTransaction(encodingNetlink: true).netlinkBatch!
            // A batch that flushes `services` and adds a rule jumping to a chain that does not exist.
            var broken = NFTNetlinkBatch(family: .ip)
            try broken.append(.flushChain("services"))
            try broken.append(.addRule(chain: "services", NFTRule(.verdict(.jump("no-such-chain")))))
            do {
                try await writer.apply(broken)
                Issue.record("the batch was accepted")
            } catch let e as NFTNetlinkError {
                #expect(e.errno == .noSuchFileOrDirectory)
                #expect(e.operation == "NFT_MSG_NEWRULE ip kube-proxy services", "\(e)")
            }
            #expect(try await ns.exec(checked: ["nft", "list", "table", "ip", "kube-proxy"]).stdout == before)
            tx.end()
            try await writer.apply(tx)
            #expect(try await ns.exec(checked: ["nft", "list", "table", "ip", "kube-proxy"]).stdout == before)
        }
    }
}
