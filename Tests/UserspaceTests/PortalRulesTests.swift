// Golden and shape tests of the userspace portal rules (seeds §3.4, checklist 20, 21, 23).

import IPTables
import SluiceCore
import SluiceTesting
import Testing
import Userspace

/// The seed's ssh-service1: a NodePort Service with no endpoints.
let sshService1 = Fixtures.seedSSHService1

private func plan(_ yaml: String, nodeName: String = "node-a") throws -> UserspacePlan {
    UserspacePlan(state: try Fixtures.state(yaml, nodeName: nodeName), nodeName: nodeName)
}

private func name(_ ns: String, _ svc: String, _ port: String, _ proto: TransportProtocol = .tcp) -> ServicePortName {
    ServicePortName(service: NamespacedName(namespace: ns, name: svc), port: port, proto: proto)
}

@Suite struct PortalRulesTests {
    /// Checklist 20: node IP 10.0.0.5 and relay port 36463 give exactly the four joined rules
    /// of seeds §3.4, in the order `iptables -S -t nat` lists them.
    @Test func sshService1MatchesTheSeed() throws {
        let p = try plan(sshService1)
        let rules = PortalCompiler(nodeIP: IPAddress("10.0.0.5")!).compile(p, relayPorts: [name("default", "ssh-service1", ""): 36463])
        #expect(rules.rules == [
            "-A KUBE-NODEPORT-CONTAINER -p tcp -m comment --comment \"default/ssh-service1:\" -m tcp --dport 30239 -j REDIRECT --to-ports 36463",
            "-A KUBE-NODEPORT-HOST -p tcp -m comment --comment \"default/ssh-service1:\" -m tcp --dport 30239 -j DNAT --to-destination 10.0.0.5:36463",
            "-A KUBE-PORTALS-CONTAINER -d 10.254.132.107/32 -p tcp -m comment --comment \"default/ssh-service1:\" -m tcp --dport 2222 -j REDIRECT --to-ports 36463",
            "-A KUBE-PORTALS-HOST -d 10.254.132.107/32 -p tcp -m comment --comment \"default/ssh-service1:\" -m tcp --dport 2222 -j DNAT --to-destination 10.0.0.5:36463",
        ])
        // Checklist 23: the rules exist although the Service has no endpoints.
        #expect(p.relays.values.first?.endpoints == [])
    }

    /// The restore batch declares the four chains (replacing their content under --noflush)
    /// and holds exactly the rules, nothing of the iptables mode's chains.
    @Test func restoreTextDeclaresOnlyTheFourChains() throws {
        let rules = PortalCompiler(nodeIP: IPAddress("10.0.0.5")!).compile(try plan(sshService1),
                                                                           relayPorts: [name("default", "ssh-service1", ""): 36463])
        let dump = try RestoreDump.parse(rules.restoreText)
        #expect(dump.chains("nat") == ["KUBE-NODEPORT-CONTAINER", "KUBE-NODEPORT-HOST", "KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST"])
        #expect(dump.chains("filter").isEmpty)
        for chain in Chain.userspaceNAT {
            #expect(dump.rules("nat", chain) == rules.rules(in: chain))
            #expect(rules.rules(in: chain).count == 1)
        }
        #expect(rules.restoreText.hasPrefix("*nat\n:KUBE-NODEPORT-CONTAINER - [0:0]\n"))
        #expect(rules.restoreText.hasSuffix("COMMIT\n"))
    }

    /// Checklist 21 across protocols and address kinds: CONTAINER chains REDIRECT, HOST chains
    /// DNAT to the node IP; PORTALS match the address and port, NODEPORTS only the port. A
    /// service port without a NodePort has no NODEPORT rules; each port has its own relay port.
    @Test func namedPortsUDPExternalAndLoadBalancerIPs() throws {
        let yaml = """
            apiVersion: v1
            kind: Service
            metadata: {name: dns, namespace: kube-system}
            spec:
              type: LoadBalancer
              clusterIP: 10.96.0.10
              externalIPs: [203.0.113.7]
              ports:
              - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}
              - {name: metrics, protocol: TCP, port: 9153, targetPort: 9153}
            status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}
            """
        let p = try plan(yaml)
        let dnsPort = name("kube-system", "dns", "dns", .udp)
        let metricsPort = name("kube-system", "dns", "metrics")
        let rules = PortalCompiler(nodeIP: IPAddress("192.168.50.1")!).compile(p, relayPorts: [dnsPort: 40001, metricsPort: 40002])
        #expect(rules.rules(in: Chain.nodePortContainer) == [
            "-A KUBE-NODEPORT-CONTAINER -p udp -m comment --comment \"kube-system/dns:dns\" -m udp --dport 30053 -j REDIRECT --to-ports 40001",
        ])
        #expect(rules.rules(in: Chain.nodePortHost) == [
            "-A KUBE-NODEPORT-HOST -p udp -m comment --comment \"kube-system/dns:dns\" -m udp --dport 30053 -j DNAT --to-destination 192.168.50.1:40001",
        ])
        #expect(rules.rules(in: Chain.portalsContainer) == [
            "-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p udp -m comment --comment \"kube-system/dns:dns\" -m udp --dport 53 -j REDIRECT --to-ports 40001",
            "-A KUBE-PORTALS-CONTAINER -d 203.0.113.7/32 -p udp -m comment --comment \"kube-system/dns:dns\" -m udp --dport 53 -j REDIRECT --to-ports 40001",
            "-A KUBE-PORTALS-CONTAINER -d 198.51.100.9/32 -p udp -m comment --comment \"kube-system/dns:dns\" -m udp --dport 53 -j REDIRECT --to-ports 40001",
            "-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment \"kube-system/dns:metrics\" -m tcp --dport 9153 -j REDIRECT --to-ports 40002",
            "-A KUBE-PORTALS-CONTAINER -d 203.0.113.7/32 -p tcp -m comment --comment \"kube-system/dns:metrics\" -m tcp --dport 9153 -j REDIRECT --to-ports 40002",
            "-A KUBE-PORTALS-CONTAINER -d 198.51.100.9/32 -p tcp -m comment --comment \"kube-system/dns:metrics\" -m tcp --dport 9153 -j REDIRECT --to-ports 40002",
        ])
        #expect(rules.rules(in: Chain.portalsHost).count == 6)
        #expect(rules.rules(in: Chain.portalsHost).allSatisfy { $0.contains("-j DNAT --to-destination 192.168.50.1:4000") })
    }

    /// A service port with no relay port (its listener could not be opened) gets no rules;
    /// SCTP ports are not relayed and are reported as skipped.
    @Test func portsWithoutRelayAndSCTPAreLeftOut() throws {
        let yaml = """
            apiVersion: v1
            kind: Service
            metadata: {name: mixed, namespace: ns}
            spec:
              clusterIP: 10.96.0.44
              ports:
              - {name: a, protocol: TCP, port: 1}
              - {name: b, protocol: TCP, port: 2}
              - {name: c, protocol: SCTP, port: 3}
            """
        let p = try plan(yaml)
        #expect(p.names == [name("ns", "mixed", "a"), name("ns", "mixed", "b")])
        #expect(p.skipped == [name("ns", "mixed", "c", .sctp)])
        let rules = PortalCompiler(nodeIP: IPAddress("10.0.0.5")!).compile(p, relayPorts: [name("ns", "mixed", "b"): 40000])
        #expect(rules.rules.count == 2)
        #expect(rules.rules.allSatisfy { $0.contains("\"ns/mixed:b\"") })
    }

    /// The dry run's relay ports: consecutive from 32768 in service-port order, stable for the
    /// same input whatever order the objects came in.
    @Test func dryRunPortsAreDeterministic() throws {
        let a = """
            apiVersion: v1
            kind: Service
            metadata: {name: a, namespace: ns}
            spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
            """
        let b = """
            apiVersion: v1
            kind: Service
            metadata: {name: b, namespace: ns}
            spec: {clusterIP: 10.96.0.2, ports: [{name: x, port: 81}, {name: y, protocol: UDP, port: 82}]}
            """
        let p1 = try plan(a + "\n---\n" + b)
        let p2 = try plan(b + "\n---\n" + a)
        let ports = RelayPortPlan.dryRun(p1.names)
        #expect(ports == RelayPortPlan.dryRun(p2.names))
        #expect(ports[name("ns", "a", "")] == 32768)
        #expect(ports[name("ns", "b", "x")] == 32769)
        #expect(ports[name("ns", "b", "y", .udp)] == 32770)
        let node = IPAddress("10.0.0.5")!
        #expect(PortalCompiler(nodeIP: node).compile(p1, relayPorts: ports) == PortalCompiler(nodeIP: node).compile(p2, relayPorts: ports))
    }

    /// Which endpoints new connections go to: the ready ones; an endpoint that is terminating
    /// but still serving keeps its established relays without getting new ones.
    @Test func planChoosesReadyEndpointsAndKeepsServingOnes() throws {
        let yaml = """
            apiVersion: v1
            kind: Service
            metadata: {name: web, namespace: ns}
            spec:
              clusterIP: 10.96.0.5
              sessionAffinity: ClientIP
              sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
              ports: [{port: 80, targetPort: 8080}]
            ---
            apiVersion: discovery.k8s.io/v1
            kind: EndpointSlice
            metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
            addressType: IPv4
            ports: [{port: 8080, protocol: TCP}]
            endpoints:
            - addresses: [10.244.1.10]
            - addresses: [10.244.2.10]
              conditions: {ready: false, serving: true, terminating: true}
            - addresses: [10.244.3.10]
              conditions: {ready: false, serving: false}
            """
        let spec = try #require(try plan(yaml).relays[name("ns", "web", "")])
        #expect(spec.endpoints.map(\.description) == ["10.244.1.10:8080"])
        #expect(spec.keep == ["10.244.1.10:8080", "10.244.2.10:8080"])
        #expect(spec.affinityTimeout == .seconds(60))
        #expect(spec.proto == .tcp)
    }
}
