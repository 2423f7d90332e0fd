// ServiceCIDR objects in the change tracker: validated as the API server does, kept per
// object, and joined into one sorted list the snapshot carries.

import SluiceCore
import Testing

@Suite struct ServiceCIDRTrackerTests {
    private func cidrs(_ t: inout ChangeTracker) -> [String] { t.snapshot(.ipv4).serviceCIDRs.map(\.description) }

    @Test func rangesOfEveryObjectAreJoinedSortedAndKeptPerObject() {
        var t = ChangeTracker(nodeName: "n")
        #expect(t.apply(.serviceCIDRUpserted(ServiceCIDR(name: "kubernetes", cidrs: ["10.96.0.0/16", "fd00:10:96::/112"]))) == .applied)
        #expect(t.apply(.serviceCIDRUpserted(ServiceCIDR(name: "extra", cidrs: ["10.0.0.0/24"]))) == .applied)
        // A second object with a range already held changes nothing visible, but is kept.
        #expect(t.apply(.serviceCIDRUpserted(ServiceCIDR(name: "same", cidrs: ["10.0.0.0/24"]))) == .ignored)
        #expect(cidrs(&t) == ["10.0.0.0/24", "10.96.0.0/16", "fd00:10:96::/112"])
        // Deleting one of the two objects with 10.0.0.0/24 keeps the range (kube-proxy's set
        // would lose it); deleting the other removes it.
        #expect(t.apply(.serviceCIDRDeleted("extra")) == .ignored)
        #expect(cidrs(&t) == ["10.0.0.0/24", "10.96.0.0/16", "fd00:10:96::/112"])
        #expect(t.apply(.serviceCIDRDeleted("same")) == .applied)
        #expect(cidrs(&t) == ["10.96.0.0/16", "fd00:10:96::/112"])
        #expect(t.apply(.serviceCIDRDeleted("gone")) == .ignored)
        #expect(t.apply(.serviceCIDRUpserted(ServiceCIDR(name: "kubernetes", cidrs: ["10.96.0.0/16", "fd00:10:96::/112"]))) == .ignored)
    }

    @Test(arguments: [
        (["10.96.0.1/16"], "host bits"),
        (["10.96.0.0/33"], "not a valid CIDR"),
        (["10.96.0.0"], "not a valid CIDR"),
        (["10.96.0.0/16", "10.97.0.0/16"], "two IPv4 ranges"),
        (["10.96.0.0/16", "fd00::/112", "10.1.0.0/16"], "3 entries"),
        ([String](), "0 entries"),
        (["10.96.0.0/16\n; flush ruleset"], "not a valid CIDR"),
    ])
    func invalidObjectsAreRejectedAndThePreviousVersionStays(ranges: [String], reason: String) {
        var t = ChangeTracker(nodeName: "n")
        #expect(t.apply(.serviceCIDRUpserted(ServiceCIDR(name: "kubernetes", cidrs: ["10.96.0.0/16"]))) == .applied)
        guard case .rejected(let r) = t.apply(.serviceCIDRUpserted(ServiceCIDR(name: "kubernetes", cidrs: ranges))) else {
            Issue.record("\(ranges) was accepted")
            return
        }
        #expect(r.kind == "ServiceCIDR" && r.reason.contains(reason), "\(r)")
        #expect(cidrs(&t) == ["10.96.0.0/16"])
    }

    @Test func aBadNameIsRejected() {
        var t = ChangeTracker(nodeName: "n")
        guard case .rejected(let r) = t.apply(.serviceCIDRUpserted(ServiceCIDR(name: "Bad Name", cidrs: ["10.96.0.0/16"]))) else {
            Issue.record("accepted")
            return
        }
        #expect(r.reason.contains("DNS subdomain"))
    }
}
