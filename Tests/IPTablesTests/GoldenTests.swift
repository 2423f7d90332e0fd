// Golden tests: compile fixtures and compare restore text with kube-proxy's own expectations
// (after kube-proxy's sorting normalisation) and with the seed book's examples.

import ChainHashing
import Foundation
import IPTables
import SluiceCore
import SluiceTesting
import Testing

private func fixture(_ name: String) throws -> String {
    try Fixtures.read("Fixtures/\(name)", beside: #filePath)
}

private func compile(_ yaml: String, options: IPTablesOptions = Fixtures.kubeProxyTestOptions, nodeName: String = "test-node") throws -> String {
    let state = try Fixtures.state(yaml, nodeName: nodeName, family: options.family)
    return IPTablesCompiler(options: options).compile(state).restoreText
}

/// The test fake's mark text (see Fixtures/kube-proxy-overall/README.md).
private func fakeMark(_ text: String) -> String { text.replacingOccurrences(of: "0x00004000", with: "0x4000") }

@Suite struct KubeProxyGoldenTests {
    @Test func overallRulesMatchKubeProxy() throws {
        let yaml = try fixture("kube-proxy-overall/services.yaml") + "\n---\n" + fixture("kube-proxy-overall/endpointslices.yaml")
        let result = try sortRestoreText(fakeMark(compile(yaml)))
        let expected = try fixture("kube-proxy-overall/expected.txt")
        #expect(result == expected)
        if result != expected {
            let r = result.split(separator: "\n"), e = expected.split(separator: "\n")
            for (i, (a, b)) in zip(r, e).enumerated() where a != b {
                Issue.record("first difference at line \(i + 1):\n got: \(a)\nwant: \(b)")
                break
            }
        }
        #expect(try checkRuleJumps(result) == [])
        #expect(try checkRuleJumps(expected) == [])
    }

    /// With both nfacct objects present (as kube-proxy's own test runs), the output is
    /// kube-proxy's expected text with its nfacct parts: the INVALID drop counts into
    /// ct_state_invalid_dropped_pkts and each NodePort with endpoints gets its localhost
    /// counting rule first (the lines of proxier_test.go's expected output).
    @Test func overallRulesWithNFAcctMatchKubeProxy() throws {
        let yaml = try fixture("kube-proxy-overall/services.yaml") + "\n---\n" + fixture("kube-proxy-overall/endpointslices.yaml")
        var options = Fixtures.kubeProxyTestOptions
        options.nfacctCounters = Set(NFAcctCounterName.all)
        let result = try sortRestoreText(fakeMark(compile(yaml, options: options)))
        var expected = try fixture("kube-proxy-overall/expected.txt")
        expected = expected.replacingOccurrences(
            of: "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
            with: "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\n")
        for (svc, port, ext) in [("ns2/svc2:p80", 3001, "KUBE-EXT-GNZBNJ2PO5MGZ6GT"), ("ns3/svc3:p80", 3003, "KUBE-EXT-X27LE4BHSL4DOUIK"),
                                 ("ns5/svc5:p80", 3002, "KUBE-EXT-NUKIZ6OKUXPJNT4C")] {
            let plain = "-A KUBE-NODEPORTS -m comment --comment \(svc) -m tcp -p tcp --dport \(port) -j \(ext)\n"
            let counting = "-A KUBE-NODEPORTS -m comment --comment \(svc) -m tcp -p tcp -d 127.0.0.0/8 --dport \(port) -m nfacct --nfacct-name localhost_nps_accepted_pkts -j \(ext)\n"
            #expect(expected.contains(plain))
            expected = expected.replacingOccurrences(of: plain, with: counting + plain)
        }
        #expect(result == expected)
        if result != expected {
            let r = result.split(separator: "\n"), e = expected.split(separator: "\n")
            for (i, (a, b)) in zip(r, e).enumerated() where a != b {
                Issue.record("first difference at line \(i + 1):\n got: \(a)\nwant: \(b)")
                break
            }
        }
    }

    @Test func productionMarkIsGoHashFormatted() throws {
        let yaml = try fixture("kube-proxy-overall/services.yaml")
        let text = try compile(yaml)
        #expect(text.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000\n"))
        #expect(text.contains("-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN\n"))
        #expect(!text.contains("0x4000 "))
    }

    @Test func emissionOrderIsDeterministic() throws {
        let yaml = try fixture("kube-proxy-overall/services.yaml") + "\n---\n" + fixture("kube-proxy-overall/endpointslices.yaml")
        let a = try compile(yaml)
        let reversed = yaml.components(separatedBy: "\n---\n").reversed().joined(separator: "\n---\n")
        let b = try compile(reversed)
        #expect(a == b)
    }
}

@Suite struct SeedGoldenTests {
    static let mysql = """
        apiVersion: v1
        kind: Service
        metadata: {name: mysql-service, namespace: default, labels: {name: mysql, role: service}}
        spec:
          type: NodePort
          clusterIP: 10.254.162.44
          selector: {mysql-service: "true"}
          ports:
          - {port: 3306, targetPort: 3306, nodePort: 30964}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: mysql-service-x1, namespace: default, labels: {kubernetes.io/service-name: mysql-service}}
        addressType: IPv4
        ports: [{port: 3306, protocol: TCP}]
        endpoints:
        - addresses: [192.168.125.129]
        - addresses: [192.168.125.131]
        """

    /// The seed book (kube-proxy ~v1.10) hashed "ns/name:" + proto for unnamed ports; the
    /// names it prints reproduce exactly with that input.
    @Test func seedChainNamesReproduce() {
        #expect(ChainHash.hash16("default/mysql-service:tcp") == "67RL4FN6JRUPOJYM")
        #expect(ChainHash.hash16("default/mysql-service:tcp192.168.125.129:3306") == "ID6YWIT3F6WNZ47P")
    }

    /// The v1.31 generation of the seed's mysql-service: the same structure (KUBE-SERVICES ->
    /// SVC -> 50/50 -> SEP with hairpin masquerade and DNAT; NodePort via KUBE-NODEPORTS with
    /// masquerade), written the way current kube-proxy writes it.
    @Test func mysqlServiceCurrentGeneration() throws {
        let node = NodeConfig(nodeName: "node-a", nodeIPs: [IPAddress("10.0.0.5")!])
        let text = try compile(Self.mysql, options: IPTablesOptions(node: node, randomFully: true), nodeName: "node-a")
        let dump = try RestoreDump.parse(text)
        let svc = "KUBE-SVC-" + ChainHash.hash16("default/mysql-servicetcp")
        #expect(svc == "KUBE-SVC-G4UYIH746YNNDBV2")
        let ext = "KUBE-EXT-G4UYIH746YNNDBV2"
        let sep1 = "KUBE-SEP-" + ChainHash.hash16("default/mysql-servicetcp192.168.125.129:3306")
        let sep2 = "KUBE-SEP-" + ChainHash.hash16("default/mysql-servicetcp192.168.125.131:3306")
        #expect(dump.rules("nat", "KUBE-SERVICES") == [
            "-A KUBE-SERVICES -m comment --comment \"default/mysql-service cluster IP\" -m tcp -p tcp -d 10.254.162.44 --dport 3306 -j \(svc)",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        ])
        #expect(dump.rules("nat", "KUBE-NODEPORTS") == [
            "-A KUBE-NODEPORTS -m comment --comment default/mysql-service -m tcp -p tcp --dport 30964 -j \(ext)",
        ])
        #expect(dump.rules("nat", ext) == [
            "-A \(ext) -m comment --comment \"masquerade traffic for default/mysql-service external destinations\" -j KUBE-MARK-MASQ",
            "-A \(ext) -j \(svc)",
        ])
        #expect(dump.rules("nat", svc) == [
            "-A \(svc) -m comment --comment \"default/mysql-service -> 192.168.125.129:3306\" -m statistic --mode random --probability 0.5000000000 -j \(sep1)",
            "-A \(svc) -m comment --comment \"default/mysql-service -> 192.168.125.131:3306\" -j \(sep2)",
        ])
        #expect(dump.rules("nat", sep1) == [
            "-A \(sep1) -m comment --comment default/mysql-service -s 192.168.125.129 -j KUBE-MARK-MASQ",
            "-A \(sep1) -m comment --comment default/mysql-service -m tcp -p tcp -j DNAT --to-destination 192.168.125.129:3306",
        ])
        #expect(dump.rules("nat", "KUBE-POSTROUTING") == [
            "-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        ])
        #expect(dump.rules("filter", "KUBE-FORWARD").contains(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00004000/0x00004000 -j ACCEPT"))
        #expect(try checkRuleJumps(text) == [])
    }

    /// ssh-service1 (seed §3): a NodePort Service with no endpoints. In iptables mode it is
    /// rejected in the filter table and gets no nat chains.
    @Test func sshServiceWithoutEndpointsIsRejected() throws {
        let yaml = Fixtures.seedSSHService1
        let node = NodeConfig(nodeName: "node-a", nodeIPs: [IPAddress("10.0.0.5")!])
        let dump = try RestoreDump.parse(try compile(yaml, options: IPTablesOptions(node: node), nodeName: "node-a"))
        #expect(dump.rules("filter", "KUBE-SERVICES") == [
            "-A KUBE-SERVICES -m comment --comment \"default/ssh-service1 has no endpoints\" -m tcp -p tcp -d 10.254.132.107 --dport 2222 -j REJECT",
        ])
        #expect(dump.rules("filter", "KUBE-EXTERNAL-SERVICES") == [
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/ssh-service1 has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30239 -j REJECT",
        ])
        #expect(dump.chains("nat") == ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"])
        #expect(dump.rules("nat", "KUBE-NODEPORTS").isEmpty)
    }
}
