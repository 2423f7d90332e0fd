// Real-kernel test, nftables mode: a ServiceCIDR object's range makes cluster-ips-check drop
// traffic to an address of the range that is no ClusterIP. An "impostor" host outside the
// cluster owns such an address and answers until the ServiceCIDR appears, and again after it
// is deleted; the ClusterIP Service keeps working throughout.

import Foundation
import SluiceTesting
import Testing

@Suite("Kernel (nftables): ServiceCIDR objects", .serialized, .requiresRoot, .timeLimit(.minutes(3)))
struct ServiceCIDRKernelTests {
    static let unallocated = "10.96.0.250"

    static let serviceCIDR = """
        apiVersion: networking.k8s.io/v1
        kind: ServiceCIDR
        metadata:
          name: kubernetes
        spec:
          cidrs: [10.96.0.0/16]

        """

    @Test("An unallocated address of a ServiceCIDR is dropped while the object exists; ClusterIPs are served")
    func unallocatedAddressesAreDropped() async throws {
        try await TestBed.with(.init(label: "nftcidr")) { bed in
            // The impostor: the external host owns 10.96.0.250 (the node's default route leads
            // there) and answers on the backends' port, under a backend's name.
            try await bed.exec(checked: bed.extNS, ["ip", "addr", "add", "\(Self.unallocated)/32", "dev", "eth0"])
            try await bed.exec(checked: bed.extNS, ["ip", "route", "replace", TestNet.clusterCIDR, "via", TestNet.nodeIP])
            _ = try bed.startBackground(in: bed.extNS, name: "impostor",
                                        [bed.python, bed.packageRoot + "/scripts/testbed/backend.py", "--name", "backend-9",
                                         "--bind", Self.unallocated, "--tcp-port", "\(TestNet.backendTCPPort)"])
            let impostor = "\(Self.unallocated):\(TestNet.backendTCPPort)"
            let web = webService()
            try bed.writeManifest("svc.yaml", web.yaml)
            try bed.startNFTablesSluice()
            try await bed.waitForNFTablesServices([web.portName("http")])

            let before = try await bed.waitUntilAnswered(from: bed.clientNS, .tcp, impostor, within: .seconds(10))
            #expect(before != nil, "without a ServiceCIDR the address is not Kubernetes': the impostor answers\n\(bed.sluiceLog)")

            try bed.writeManifest("servicecidr.yaml", Self.serviceCIDR)
            try await bed.waitForNFTables("the drop rule of the ServiceCIDR") {
                // nft lists a one-element anonymous set without braces.
                $0.contains("ip daddr 10.96.0.0/16 drop comment \"Drop traffic to unallocated ClusterIPs\"")
            }
            try await expectTableEqualsFullSync(bed, "with the ServiceCIDR")
            let dropped = try await bed.request(from: bed.clientNS, .tcp, impostor, count: 3, timeout: 1)
            #expect(dropped.answered == 0, context("an unallocated address of the ServiceCIDR is dropped", dropped, bed))
            let served = try await bed.request(from: bed.clientNS, .tcp, web.clusterTarget("http"), count: 10)
            expectAnswered(served, count: 10, backends: ["backend-1", "backend-2"], "the ClusterIP inside the ServiceCIDR", bed)

            try bed.removeManifest("servicecidr.yaml")
            try await bed.waitForNFTables("the drop rule gone with the object") { !$0.contains("Drop traffic to unallocated ClusterIPs") }
            let after = try await bed.waitUntilAnswered(from: bed.clientNS, .tcp, impostor, within: .seconds(10))
            #expect(after != nil, "the ServiceCIDR deleted: the impostor answers again\n\(bed.sluiceLog)")
        }
    }
}
