// Metrics: /metrics scraped over HTTP and parsed; every kube-proxy name with its type, the
// histogram buckets, values that move with syncs, failures and changes, network programming
// latency from the last-change-trigger-time annotation, and /proxyMode.

import Foundation
import Logging
import SluiceCore
import SluiceServer
import SluiceTesting
import Testing

/// Every metric Sluice exports, with kube-proxy's type.
private let expectedTypes: [String: String] = [
    "kubeproxy_sync_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_full_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
    "kubeproxy_network_programming_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_service_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_service_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_total": "gauge",
    "kubeproxy_sync_proxy_rules_iptables_last": "gauge",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": "gauge",
    "kubeproxy_proxy_healthz_total": "counter",
    "kubeproxy_proxy_livez_total": "counter",
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": "histogram",
    "kubeproxy_conntrack_reconciler_deleted_entries_total": "counter",
]

/// client_golang's process collector, with its types.
private let processTypes: [String: String] = [
    "process_cpu_seconds_total": "counter", "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge", "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge", "process_max_fds": "gauge",
]

private let syncHistograms = [
    "kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
]
private let npl = "kubeproxy_network_programming_duration_seconds"
/// The label every per-proxier series carries on a single-stack IPv4 node.
private let v4 = ["ip_family": "IPv4"]

private func service(_ name: String, internalLocal: Bool = false) -> ObjectEvent {
    .serviceUpserted(Service(namespace: "ns", name: name, clusterIPs: ["10.96.0.\(Int(name.unicodeScalars.first!.value) % 200 + 10)"], ports: [ServicePort(port: 80)],
                             internalTrafficPolicy: internalLocal ? "Local" : "Cluster"))
}

private func slice(_ service: String, node: String = "node-b", triggeredAt: Duration? = nil, ip: String = "10.244.9.9") -> ObjectEvent {
    var annotations: [String: String] = [:]
    if let triggeredAt { annotations[lastChangeTriggerTimeAnnotation] = rfc3339(triggeredAt) }
    return .sliceUpserted(EndpointSlice(namespace: "ns", name: service + "-1", serviceName: service,
                                        ports: [EndpointPort(port: 8080)], endpoints: [Endpoint(addresses: [ip], nodeName: node)],
                                        annotations: annotations))
}

/// A runner wired like the executable: health and metrics record, metrics observe.
private struct Rig {
    let runner: SyncRunner<ManualClock>
    let backend: ScriptedBackend
    let clock: ManualClock
    let wall: SettableWallClock
    let metrics: ProxyMetrics
    let health: ProxyHealth

    init() {
        clock = ManualClock()
        wall = SettableWallClock(.seconds(1_714_564_800))  // 2024-05-01T12:00:00Z
        let wall = self.wall
        metrics = ProxyMetrics(nodeName: "node-a", tables: ["filter", "nat"], wallClock: { wall.read() })
        health = ProxyHealth(syncPeriod: .seconds(30), clock: HealthClock(clock, wallTimeAtStart: .seconds(1_714_564_800)))
        backend = ScriptedBackend()
        runner = SyncRunner(tracker: ChangeTracker(nodeName: "node-a"), backend: backend, clock: clock, logger: Logger(label: "test"),
                            observers: [metrics], recorders: [health, metrics])
    }

    func scrape() -> Scrape { Scrape(metrics.render()) }
}

@Suite struct ProxyMetricsTests {
    @Test func theNFAcctCountersExistOnlyOnceRegisteredAndAddUp() throws {
        let metrics = ProxyMetrics(nodeName: "n", tables: ["filter", "nat"])
        // Without nfacct nothing registers them: no series, as kube-proxy.
        let before = Scrape(metrics.render())
        #expect(!before.types.keys.contains { $0.hasPrefix("kubeproxy_iptables_") }, "\(before.types)")
        metrics.addNFAcctPackets(.localhostNodePortsAccepted, 0)
        metrics.addNFAcctPackets(.localhostNodePortsAccepted, 5)
        metrics.addNFAcctPackets(.localhostNodePortsAccepted, 2)
        let after = Scrape(metrics.render())
        #expect(after.types[ProxyMetrics.Name.localhostNodePortsAccepted] == "counter")
        #expect(after.help[ProxyMetrics.Name.localhostNodePortsAccepted] == "[ALPHA] Number of packets accepted on nodeports of loopback interface")
        #expect(after.samples.first { $0.name == ProxyMetrics.Name.localhostNodePortsAccepted }?.value == 7)
        #expect(after.types[ProxyMetrics.Name.ctStateInvalidDropped] == nil)
    }

    @Test func everyNameHasKubeProxysTypeAndBuckets() async throws {
        let rig = Rig()
        let clock = rig.clock
        await rig.backend.whileSyncing { clock.advance(by: .milliseconds(3)) }
        await rig.runner.handle(service("a"))
        await rig.runner.handle(.synced)
        await rig.runner.syncOnce()
        rig.metrics.countHealthz(code: 200)
        rig.metrics.countLivez(code: 200)

        let server = try await MetricsServer.start(address: BindAddress(host: IPAddress("127.0.0.1")!, port: 0), metrics: rig.metrics,
                                                   proxyMode: "iptables", logger: Logger(label: "test"))
        defer { Task { await server.close() } }
        let response = try await httpGet(port: server.port, path: "/metrics")
        #expect(response.status == 200)
        #expect(response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8")
        let scrape = Scrape(response.body)
        for (name, type) in expectedTypes {
            #expect(scrape.types[name] == type, "\(name)")
            #expect(scrape.help[name]?.hasPrefix("[ALPHA] ") == true, "\(name)")
        }
        // Beside kube-proxy's names, only Sluice's own (sluice_*) appear.
        #expect(Set(scrape.types.keys) == Set(expectedTypes.keys).union(processTypes.keys).union(["sluice_sync_last_written_objects"]))
        #expect(scrape.types["sluice_sync_last_written_objects"] == "gauge")
        for (name, type) in processTypes { #expect(scrape.types[name] == type, "\(name)") }
        #expect(scrape.help["kubeproxy_sync_proxy_rules_duration_seconds"] == "[ALPHA] SyncProxyRules latency in seconds")

        // 0.001 × 2^k for k = 0…14, then +Inf.
        let syncBounds = ["0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256", "0.512",
                          "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf"]
        for name in syncHistograms {
            #expect(scrape.buckets(name).map(\.le) == syncBounds, "\(name)")
        }
        // 0, 0.25, 0.5, 1…59, 60…115 by 5, 120…300 by 30, +Inf.
        let nplBounds = scrape.buckets(npl).map { Double($0.le)! }
        let expected: [Double] = [0, 0.25, 0.5] + (1...59).map(Double.init) + stride(from: 60.0, through: 115, by: 5)
            + stride(from: 120.0, through: 300, by: 30) + [.infinity]
        #expect(nplBounds == expected)
        #expect(nplBounds.count == 82)

        // The 3 ms full sync landed in the 0.004 bucket of the total and full histograms.
        #expect(scrape.bucket("kubeproxy_sync_proxy_rules_duration_seconds", le: 0.002) == 0)
        #expect(scrape.bucket("kubeproxy_sync_proxy_rules_duration_seconds", le: 0.004) == 1)
        #expect(scrape.value("kubeproxy_sync_full_proxy_rules_duration_seconds_count", v4) == 1)
        #expect(scrape.value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", v4) == 0)
        #expect(scrape.value("kubeproxy_sync_proxy_rules_duration_seconds_sum", v4) == 0.003)
        #expect(scrape.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", v4) == 1_714_564_800)
        #expect(scrape.value("kubeproxy_sync_proxy_rules_iptables_total", ["table": "nat", "ip_family": "IPv4"]) == 12)
        #expect(scrape.value("kubeproxy_sync_proxy_rules_iptables_last", ["table": "filter", "ip_family": "IPv4"]) == 4)
        #expect(scrape.value("kubeproxy_sync_proxy_rules_no_local_endpoints_total", ["traffic_policy": "internal", "ip_family": "IPv4"]) == 0)
        #expect(scrape.value("kubeproxy_sync_proxy_rules_no_local_endpoints_total", ["traffic_policy": "external", "ip_family": "IPv4"]) == 0)

        let mode = try await httpGet(port: server.port, path: "/proxyMode")
        #expect(mode.status == 200)
        #expect(mode.body == "iptables")
        #expect(mode.headers["content-type"] == "text/plain; charset=utf-8")
        #expect(try await httpGet(port: server.port, path: "/healthz").body == "ok")
        #expect(try await httpGet(port: server.port, path: "/nope").status == 404)
    }

    @Test func valuesMoveWithChangesSyncsAndFailures() async {
        let rig = Rig()
        await rig.runner.handle(.synced)
        await rig.runner.syncOnce()
        var s = rig.scrape()
        #expect(s.value("kubeproxy_sync_proxy_rules_service_changes_total") == 0)
        #expect(s.value("kubeproxy_sync_proxy_rules_duration_seconds_count", v4) == 1)

        rig.wall.advance(by: .seconds(5))
        await rig.runner.handle(service("a"))
        await rig.runner.handle(service("b"))
        await rig.runner.handle(service("a", internalLocal: true))  // the same Service again: still one pending
        await rig.runner.handle(slice("a"))
        s = rig.scrape()
        #expect(s.value("kubeproxy_sync_proxy_rules_service_changes_total") == 3)
        #expect(s.value("kubeproxy_sync_proxy_rules_service_changes_pending") == 2)
        #expect(s.value("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1)
        #expect(s.value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1)
        #expect(s.value("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", v4) == 1_714_564_805)
        #expect(s.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", v4) == 1_714_564_800)

        rig.wall.advance(by: .seconds(1))
        await rig.runner.syncOnce()
        s = rig.scrape()
        #expect(s.value("kubeproxy_sync_proxy_rules_service_changes_pending") == 0)
        #expect(s.value("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0)
        #expect(s.value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", v4) == 1)
        #expect(s.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", v4) == 1_714_564_806)
        // "a" has internalTrafficPolicy Local and its only endpoint is on node-b.
        #expect(s.value("kubeproxy_sync_proxy_rules_no_local_endpoints_total", ["traffic_policy": "internal", "ip_family": "IPv4"]) == 1)

        // A failed partial sync, then a failed full retry.
        await rig.backend.failNext(2)
        await rig.runner.handle(service("c"))
        await rig.runner.syncOnce()
        await rig.runner.syncOnce()
        s = rig.scrape()
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", v4) == 2)
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", v4) == 1)
        #expect(s.value("kubeproxy_sync_proxy_rules_duration_seconds_count", v4) == 4)  // failures are timed too
        #expect(s.value("kubeproxy_sync_full_proxy_rules_duration_seconds_count", v4) == 2)
        #expect(s.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", v4) == 1_714_564_806)  // success only

        // The endpoint moves to this node: no Local service lacks local endpoints any more.
        await rig.runner.handle(slice("a", node: "node-a"))
        await rig.runner.syncOnce()
        s = rig.scrape()
        #expect(s.value("kubeproxy_sync_proxy_rules_no_local_endpoints_total", ["traffic_policy": "internal", "ip_family": "IPv4"]) == 0)
        // Counts that are not iptables rules (an IPVS or userspace report) have no iptables series.
        await rig.backend.setReport(SyncReport(full: true, written: [.iptablesRules(.filter): 1, .iptablesRules(.nat): 2, .ipvsMessages: 9],
                                               total: [.iptablesRules(.filter): 7, .iptablesRules(.nat): 40, .virtualServers: 3, .relays: 4]))
        await rig.runner.syncOnce()
        s = rig.scrape()
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_total", ["table": "nat", "ip_family": "IPv4"]) == 40)
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_last", ["table": "nat", "ip_family": "IPv4"]) == 2)
        let tables = Set(s.samples.filter { $0.name.hasPrefix("kubeproxy_sync_proxy_rules_iptables_") }.compactMap { $0.labels["table"] })
        #expect(tables == ["filter", "nat"])
    }

    @Test func networkProgrammingLatencyComesFromTheTriggerTimeAnnotation() async {
        let rig = Rig()
        let start: Duration = .seconds(1_714_564_800)
        await rig.runner.handle(service("a"))
        await rig.runner.handle(.synced)
        await rig.runner.syncOnce()  // the first snapshot: trigger times are tracked from here
        #expect(rig.scrape().value(npl + "_count", v4) == 0)

        // The controller saw the pod change 1 s after start; the rules land 2.5 s after that.
        rig.wall.advance(by: .milliseconds(3500))
        await rig.runner.handle(slice("a", triggeredAt: start + .seconds(1)))
        await rig.runner.syncOnce()
        var s = rig.scrape()
        #expect(s.value(npl + "_count", v4) == 1)
        #expect(s.value(npl + "_sum", v4) == 2.5)
        #expect(s.bucket(npl, le: 2) == 0)
        #expect(s.bucket(npl, le: 3) == 1)

        // A failed sync does not observe; the latency is measured when the retry succeeds.
        await rig.backend.failNext(1)
        await rig.runner.handle(slice("a", triggeredAt: start + .seconds(4), ip: "10.244.9.10"))
        rig.wall.advance(by: .seconds(1))  // now = start + 4.5
        await rig.runner.syncOnce()
        #expect(rig.scrape().value(npl + "_count", v4) == 1)
        rig.wall.advance(by: .seconds(10))  // now = start + 14.5
        await rig.runner.syncOnce()
        s = rig.scrape()
        #expect(s.value(npl + "_count", v4) == 2)
        #expect(s.bucket(npl, le: 10) == 1)
        #expect(s.bucket(npl, le: 11) == 2)

        // Slices without the annotation, and trigger times from before the process started, add nothing.
        await rig.runner.handle(slice("a", ip: "10.244.9.11"))
        await rig.runner.handle(slice("b", triggeredAt: start - .seconds(60)))
        await rig.runner.syncOnce()
        #expect(rig.scrape().value(npl + "_count", v4) == 2)
    }

    @Test func eachFamilyHasItsOwnSeries() async {
        let metrics = ProxyMetrics(nodeName: "n", tables: ["nat"], families: [.ipv4, .ipv6])
        metrics.record(.synced(SyncAttempt(family: .ipv6, kind: .full, duration: .milliseconds(2),
                                           report: SyncReport(full: true, written: [.iptablesRules(.nat): 3], total: [.iptablesRules(.nat): 7]))))
        metrics.record(.synced(SyncAttempt(family: .ipv4, kind: .partial(changed: []), duration: .milliseconds(1), report: nil)))
        let s = Scrape(metrics.render())
        #expect(s.value("kubeproxy_sync_full_proxy_rules_duration_seconds_count", ["ip_family": "IPv6"]) == 1)
        #expect(s.value("kubeproxy_sync_full_proxy_rules_duration_seconds_count", ["ip_family": "IPv4"]) == 0)
        #expect(s.value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", ["ip_family": "IPv4"]) == 1)
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", ["ip_family": "IPv4"]) == 1)
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", ["ip_family": "IPv6"]) == 0)
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_total", ["table": "nat", "ip_family": "IPv6"]) == 7)
        #expect(s.value("kubeproxy_sync_proxy_rules_iptables_total", ["table": "nat", "ip_family": "IPv4"]) == 0)
        #expect(s.value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ["ip_family": "IPv4"]) == 0, "a failed sync sets no timestamp")
        #expect(s.samples.allSatisfy { !$0.name.hasPrefix("kubeproxy_sync_proxy_rules_duration") || $0.labels["ip_family"] != nil })
    }

    @Test func conntrackReconcilesAreCountedPerFamily() {
        let metrics = ProxyMetrics(nodeName: "n")
        metrics.recordConntrackReconcile(family: .ipv4, duration: .milliseconds(3), deleted: 4)
        metrics.recordConntrackReconcile(family: .ipv4, duration: .milliseconds(40), deleted: 0)
        metrics.recordConntrackReconcile(family: .ipv6, duration: .milliseconds(1), deleted: 2)
        let s = Scrape(metrics.render())
        #expect(s.value("kubeproxy_conntrack_reconciler_deleted_entries_total", ["ip_family": "IPv4"]) == 4)
        #expect(s.value("kubeproxy_conntrack_reconciler_deleted_entries_total", ["ip_family": "IPv6"]) == 2)
        #expect(s.value("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", ["ip_family": "IPv4"]) == 2)
        #expect(s.value("kubeproxy_conntrack_reconciler_sync_duration_seconds_sum", ["ip_family": "IPv4"]) == 0.043)
    }

    @Test func processMetricsDescribeThisProcess() throws {
        let s = Scrape(ProxyMetrics(nodeName: "n").render())
        let start = try #require(s.value("process_start_time_seconds"))
        let now = Date().timeIntervalSince1970
        #expect(start > now - 86_400 * 30 && start <= now + 1, "started \(start), now \(now)")
        #expect((s.value("process_resident_memory_bytes") ?? 0) > 1_048_576)
        #expect((s.value("process_virtual_memory_bytes") ?? 0) >= (s.value("process_resident_memory_bytes") ?? 0))
        #expect((s.value("process_open_fds") ?? 0) >= 3)
        #expect((s.value("process_max_fds") ?? 0) >= (s.value("process_open_fds") ?? 0))
        #expect(s.value("process_cpu_seconds_total") != nil)
    }

    /// The descriptor count walks /proc/self/fd record by record; a long directory (the
    /// userspace mode at 20 000 Services holds tens of thousands of sockets) once crashed it,
    /// reading each record as a whole `dirent` past the end of the last one.
    @Test func openDescriptorsAreCountedInALongDirectory() throws {
        let extra = 3_000
        var limit = rlimit()
        #expect(getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0)
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        }
        let metrics = ProxyMetrics(nodeName: "n")
        let before = try #require(Scrape(metrics.render()).value("process_open_fds"))
        var opened: [Int32] = []
        defer { for fd in opened { close(fd) } }
        for _ in 0..<extra {
            let fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
            try #require(fd >= 0, "open: errno \(errno) (limit \(limit.rlim_cur))")
            opened.append(fd)
        }
        let after = try #require(Scrape(metrics.render()).value("process_open_fds"))
        // Other suites open and close descriptors meanwhile: the count moves by about `extra`.
        #expect(after - before > Double(extra) - 200 && after - before < Double(extra) + 200, "before \(before), after \(after)")
    }

    @Test func configzServesTheConfiguration() async throws {
        let metrics = ProxyMetrics(nodeName: "n")
        let body = MetricsServer.configzBody(configurationJSON: #"{"mode":"iptables"}"#)
        let server = try await MetricsServer.start(address: BindAddress(host: IPAddress("127.0.0.1")!, port: 0), metrics: metrics,
                                                   proxyMode: "iptables", configz: body, logger: Logger(label: "test"))
        defer { Task { await server.close() } }
        let response = try await httpGet(port: server.port, path: "/configz")
        #expect(response.status == 200)
        #expect(response.headers["content-type"] == "application/json")
        #expect(response.body == #"{"kubeproxy.config.k8s.io":{"mode":"iptables"}}"#)
        let bare = try await MetricsServer.start(address: BindAddress(host: IPAddress("127.0.0.1")!, port: 0), metrics: metrics,
                                                 proxyMode: "iptables", logger: Logger(label: "test"))
        defer { Task { await bare.close() } }
        #expect(try await httpGet(port: bare.port, path: "/configz").status == 404)
    }
}
