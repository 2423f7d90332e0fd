// `sluice explain` and `sluice diff` in nftables mode, pure parts: the tracer over the golden
// fixture's compiled table, checked against the model (an independent implementation) for
// every Service port address; the kernel's listing of the same table read back into the same
// normal form; and the drift comparison after hand edits of that listing.

import Foundation
import NFTables
import SluiceCore
import SluiceTesting
import Testing

private func fixture(_ name: String) throws -> String {
    try Fixtures.read("Fixtures/kube-proxy-overall/\(name)", beside: #filePath)
}

private let options = KubeProxyFake.options()
private let local = Set(options.localAddresses)
private let nodeIP = IPAddress("192.168.0.2")!

private func overallState() throws -> ProxyState {
    try Fixtures.state(try fixture("services.yaml") + "\n---\n" + fixture("endpointslices.yaml"))
}

private func packet(_ src: String?, _ dst: String) throws -> ProbePacket {
    try probePacket(from: src, to: dst, nodeIP: nodeIP, localAddresses: local)
}

@Suite struct NFTablesTracerTests {
    let state: ProxyState
    let ruleset: NFTRuleset
    let tracer: NFTablesTracer

    init() throws {
        state = try overallState()
        ruleset = NFTablesCompiler(options: options).compile(state)
        tracer = NFTablesTracer(compiled: ruleset, localAddresses: local)
    }

    /// Every address of every Service port of the golden fixture, from a pod, from outside
    /// (inside and outside svc5's source range) and from the node: the walk of the compiled
    /// table must reach exactly the endpoints the model selects, each with 1/n, and masquerade
    /// exactly when the model says so.
    @Test func compiledTableAgreesWithTheModelForEveryServiceKind() throws {
        let agreement = try TracerModelAgreement.check(tracer, state: state, node: options.node, localAddresses: local, nodeIP: nodeIP,
                                                       requireNoNotes: true)
        #expect(agreement.problems.isEmpty, "\(agreement.problems.joined(separator: "\n"))")
        #expect(agreement.checked >= 20)
        #expect(agreement.verdicts == [.forwarded, .rejected, .dropped])
    }

    @Test func stepsNameTheMapElementAndTheChains() throws {
        let trace = tracer.trace(try packet("10.0.0.5", "172.30.0.44:80"))
        #expect(trace.paths.count == 2)
        #expect(Set(trace.paths.compactMap(\.endpoint)) == ["10.180.0.4:80", "10.180.0.5:80"])
        let steps = trace.paths[0].steps
        #expect(steps.contains { $0.rule == "ip daddr . meta l4proto . th dport vmap @service-ips"
            && $0.action == "element 172.30.0.44 . tcp . 80 of @service-ips: goto service-LAUZTJTB-ns4/svc4/tcp/p80" })
        #expect(steps.contains { $0.location == "service-LAUZTJTB-ns4/svc4/tcp/p80" && $0.rule.hasPrefix("numgen random mod 2 vmap") })
        #expect(steps.contains { $0.rule == "meta l4proto tcp dnat to \(trace.paths[0].endpoint!)" && $0.action.hasPrefix("DNAT") })
        #expect(steps.last?.location.hasPrefix("masquerading") == true && steps.last?.action.hasPrefix("return: the connection is not marked") == true)
        // Jumps into chains where nothing matched (firewall-check, the endpoints checks) are left out.
        #expect(!steps.contains { $0.rule.contains("jump firewall-check") || $0.rule.contains("jump cluster-ips-check") }, "\(steps)")
        #expect(trace.paths.allSatisfy { !$0.masquerade && abs($0.probability - 0.5) < 1e-12 })
        // From outside the cluster CIDR: marked, then masqueraded in nat-postrouting.
        let outside = tracer.trace(try packet("198.51.100.7", "172.30.0.44:80"))
        #expect(outside.paths.allSatisfy { p in p.masquerade && p.steps.contains { $0.rule == "masquerade fully-random" } })
    }

    @Test func unknownDestinationIsUnchangedAndUnallocatedClusterIPIsDropped() throws {
        let none = tracer.trace(try packet("10.0.0.5", "198.51.100.1:80"))
        #expect(none.paths.map(\.verdict) == [.unchanged])
        let unallocated = tracer.trace(try packet("10.0.0.5", "172.30.9.9:80"))
        #expect(unallocated.paths.map(\.verdict) == [.dropped])
        let wrongPort = tracer.trace(try packet("10.0.0.5", "172.30.0.41:81"))
        #expect(wrongPort.paths.map(\.verdict) == [.rejected])
    }
}

@Suite struct NFTablesListingTests {
    let desired: NFTTableSnapshot
    let listing: String

    init() throws {
        desired = NFTTableSnapshot(ruleset: NFTablesCompiler(options: options).compile(try overallState()))
        listing = try fixture("listing.nft")
    }

    private func read(_ text: String) throws -> NFTTableSnapshot { try NFTTableSnapshot.parse(listing: text, family: .ip) }

    @Test func kernelListingReadsAsTheCompiledTable() throws {
        let kernel = try read(listing)
        #expect(NFTablesDrift.compare(desired: desired, actual: kernel) == [])
        #expect(kernel.chains == desired.chains)
        #expect(kernel.containers["service-ips"]?.elements == desired.containers["service-ips"]?.elements)
        #expect(kernel.chains["filter-prerouting-pre-dnat"]?.hook == NFTHook(type: "filter", hook: "prerouting", priority: -110))
        // The tracer gives the same answer over both.
        let a = NFTablesTracer(table: kernel, localAddresses: local), b = NFTablesTracer(table: desired, localAddresses: local)
        for dst in ["172.30.0.44:80", "5.6.7.8:80", "192.168.0.2:3001", "172.30.0.46:80"] {
            for src in ["10.0.0.5", "203.0.113.9", "198.51.100.7"] {
                #expect(a.trace(try packet(src, dst)) == b.trace(try packet(src, dst)), "\(src) -> \(dst)")
            }
        }
    }

    @Test func normalFormOfTheKernelsSpellings() {
        #expect(NFTTableSnapshot.normaliseRule("meta mark set meta mark | 0x00004000") == "mark set mark or 0x00004000")
        #expect(NFTTableSnapshot.normaliseRule("meta mark & 0x00004000 == 0x00000000 return") == "mark and 0x00004000 == 0 return")
        #expect(NFTTableSnapshot.normaliseRule("ip saddr != { 203.0.113.0/25 } drop") == "ip saddr != 203.0.113.0/25 drop")
        #expect(NFTTableSnapshot.normaliseRule("ip saddr != { 5.6.7.8/32 , 1.2.3.0/24 } drop")
            == NFTTableSnapshot.normaliseRule("ip saddr != { 1.2.3.0/24, 5.6.7.8 } drop"))
        #expect(NFTTableSnapshot.normaliseRule("numgen random mod 2 vmap { 0 : goto a, 1 : goto b }")
            == "numgen random mod 2 vmap { 0 : goto a , 1 : goto b }")
        #expect(NFTTableSnapshot.owner(ofChain: "endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80") == "ns5/svc5:p80")
        #expect(NFTTableSnapshot.owner(ofChain: "services") == nil)
    }

    private func diff(_ edit: (String) -> String) throws -> [DriftItem] {
        let edited = edit(listing)
        #expect(edited != listing, "the edit changed nothing")
        return NFTablesDrift.compare(desired: desired, actual: try read(edited))
    }

    @Test func deletedRuleIsMissingAndOwnedByItsService() throws {
        let items = try diff { $0.replacingOccurrences(of: "\t\tmeta l4proto tcp dnat to 10.180.0.5:80\n", with: "") }
        #expect(items == [DriftItem(kind: .missing, owner: "ns4/svc4:p80", object: "chain endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 rule",
                                    want: "meta l4proto tcp dnat to 10.180.0.5:80", have: nil)])
    }

    @Test func removedMapElementIsMissing() throws {
        let items = try diff { $0.replacingOccurrences(of: "172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80,", with: "") }
        #expect(items == [DriftItem(kind: .missing, owner: "ns1/svc1:p80", object: "element of map service-ips",
                                    want: "172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80", have: nil)])
        let set = try diff { $0.replacingOccurrences(of: "172.30.0.41, ", with: "") }
        #expect(set.map(\.kind) == [.missing] && set.first?.object == "element of set cluster-ips" && set.first?.owner == "ns1/svc1:p80")
    }

    @Test func foreignRuleInServicesIsExtraAndChangedWeightIsDifferent() throws {
        let items = try diff {
            $0.replacingOccurrences(of: "\tchain services {\n", with: "\tchain services {\n\t\tip daddr 10.9.9.9 drop\n")
        }
        #expect(items == [DriftItem(kind: .extra, owner: "", object: "chain services rule", want: nil, have: "ip daddr 10.9.9.9 drop")])
        let weight = try diff {
            $0.replacingOccurrences(of: "numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80, 1",
                                    with: "numgen random mod 3 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80, 1")
        }
        #expect(weight.count == 1 && weight.first?.kind == .different && weight.first?.owner == "ns4/svc4:p80")
    }

    @Test func missingChainAndExtraChain() throws {
        let items = try diff {
            $0.replacingOccurrences(of: "\tchain firewall-HVFWP5L3-ns5/svc5/tcp/p80 {\n\t\tip saddr != 203.0.113.0/25 drop\n\t}\n",
                                    with: "\tchain service-AAAAAAAA-ns9/old/tcp/p80 {\n\t\tdrop\n\t}\n")
        }
        #expect(items.contains(DriftItem(kind: .missing, owner: "ns5/svc5:p80", object: "chain firewall-HVFWP5L3-ns5/svc5/tcp/p80", want: "1 rules", have: nil)))
        #expect(items.contains(DriftItem(kind: .extra, owner: "ns9/old:p80", object: "chain service-AAAAAAAA-ns9/old/tcp/p80", want: nil, have: "1 rules")))
        #expect(items.count == 2)
    }
}
