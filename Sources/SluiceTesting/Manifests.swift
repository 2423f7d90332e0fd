// Sluice test support: Service + EndpointSlice YAML for the manifest-directory source,
// shaped like what the API server serves (see examples/web.yaml).

/// One port of a test Service (and of its EndpointSlice).
public struct TestServicePort: Sendable, Hashable {
    public var name: String
    /// "TCP" or "UDP".
    public var proto: String
    public var port: Int
    public var targetPort: Int
    /// 0: none.
    public var nodePort: Int

    public init(name: String, proto: String, port: Int, targetPort: Int, nodePort: Int = 0) {
        self.name = name
        self.proto = proto
        self.port = port
        self.targetPort = targetPort
        self.nodePort = nodePort
    }

    /// `http`: 80/TCP -> the backends' TCP port.
    public static func http(nodePort: Int = 0) -> TestServicePort {
        TestServicePort(name: "http", proto: "TCP", port: 80, targetPort: TestNet.backendTCPPort, nodePort: nodePort)
    }

    /// `dns`: 53/UDP -> the backends' UDP port.
    public static func dns(nodePort: Int = 0) -> TestServicePort {
        TestServicePort(name: "dns", proto: "UDP", port: 53, targetPort: TestNet.backendUDPPort, nodePort: nodePort)
    }
}

/// A Service and (unless it has no endpoints) one EndpointSlice for it, as YAML.
public struct TestService: Sendable {
    public var namespace = "kt"
    public var name: String
    /// ClusterIP, NodePort or LoadBalancer.
    public var type = "ClusterIP"
    public var clusterIP: String
    public var ports: [TestServicePort] = [.http(), .dns()]
    public var externalIPs: [String] = []
    /// `sessionAffinity: ClientIP` with this timeout; nil: no affinity.
    public var clientIPAffinitySeconds: Int?
    /// `status.loadBalancer.ingress[0].ip`.
    public var loadBalancerIP: String?
    public var loadBalancerSourceRanges: [String] = []
    /// Ready endpoints on this node: backend numbers (1 = backend-1). Empty: no slice at all.
    public var endpoints: [Int] = [1, 2]

    public init(name: String, clusterIP: String) {
        self.name = name
        self.clusterIP = clusterIP
    }

    /// `namespace/name:port` of a port, as sluice prints it in rule comments.
    public func portName(_ port: String = "http") -> String { "\(namespace)/\(name):\(port)" }

    /// `clusterIP:port` of the named port.
    public func clusterTarget(_ port: String = "http") -> String {
        "\(clusterIP):\(ports.first { $0.name == port }?.port ?? 0)"
    }

    /// The Service document, then the EndpointSlice document.
    public var yaml: String {
        var s = """
        apiVersion: v1
        kind: Service
        metadata:
          name: \(name)
          namespace: \(namespace)
        spec:
          type: \(type)
          selector:
            app: \(name)
          clusterIP: \(clusterIP)
          clusterIPs:
            - \(clusterIP)
          ipFamilies:
            - IPv4
          ipFamilyPolicy: SingleStack
          ports:

        """
        for p in ports {
            s += "    - name: \(p.name)\n      protocol: \(p.proto)\n      port: \(p.port)\n      targetPort: \(p.targetPort)\n"
            if p.nodePort != 0 { s += "      nodePort: \(p.nodePort)\n" }
        }
        if !externalIPs.isEmpty {
            s += "  externalIPs:\n" + externalIPs.map { "    - \($0)\n" }.joined()
        }
        if let t = clientIPAffinitySeconds {
            s += "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: \(t)\n"
        }
        if !loadBalancerSourceRanges.isEmpty {
            s += "  loadBalancerSourceRanges:\n" + loadBalancerSourceRanges.map { "    - \($0)\n" }.joined()
        }
        if let ip = loadBalancerIP {
            s += "status:\n  loadBalancer:\n    ingress:\n      - ip: \(ip)\n"
        }
        guard !endpoints.isEmpty else { return s }
        s += """
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: \(name)-kt001
          namespace: \(namespace)
          labels:
            kubernetes.io/service-name: \(name)
        addressType: IPv4
        ports:

        """
        for p in ports {
            s += "  - name: \(p.name)\n    port: \(p.targetPort)\n    protocol: \(p.proto)\n"
        }
        s += "endpoints:\n"
        for e in endpoints {
            s += "  - addresses:\n      - \(TestNet.backendIP(e))\n    conditions:\n      ready: true\n    nodeName: \(TestNet.nodeName)\n"
        }
        return s
    }
}
