// Sluice benchmark helper: the IPVS mode's cold ipset sync at S Services, in the network
// namespace this process runs in (start it with `ip netns exec`; needs root and ip_set).
//
//   ipset-probe [--services S]      (default 20000)
//
// The Services are those of the benchmark's `mixed` fixture (benchmarks/sluicebench/
// fixtures.py): one TCP port 80 each, ClusterIPs from 10.96.0.16, a quarter NodePorts and
// 15 % LoadBalancers (ingress IPs from 172.20.0.1), endpoints on another node. The probe
// does what the backend's first sync does with the sets: list them, create the 17 IPv4 sets,
// fill them, then reads them back to check every entry is there, and destroys them.
//
// Prints one JSON object: for each step, the wall time (`_ms`, monotonic clock) and the CPU
// time this process spent, user and system (`_cpu_ms`: the kernel's share of a netlink
// request is spent in the sender's system time). On a busy machine the CPU times are the
// figures to compare.

import Foundation
import IPVS
import SluiceCore

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("ipset-probe: \(message)\n".utf8))
    exit(2)
}

var services = 20000
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--services":
        guard let v = args.popFirst().flatMap({ Int($0) }), v > 0 else { fail("--services needs a positive number") }
        services = v
    default:
        fail("unknown argument \(a)")
    }
}

func ipv4(_ base: UInt32, _ i: Int) -> IPAddress {
    let v = base &+ UInt32(i)
    return IPAddress("\(v >> 24).\((v >> 16) & 255).\((v >> 8) & 255).\(v & 255)")!
}

// The entries the IPVS compiler derives for the mixed fixture (see IPVSCompiler.contribution).
let defs = KubeIPSet.all(.ipv4)
var want: [String: Set<IPSetEntry>] = [:]
let svcBase: UInt32 = 10 << 24 | 96 << 16 | 16
let lbBase: UInt32 = 172 << 24 | 20 << 16 | 1
for i in 0..<services {
    let vip = ipv4(svcBase, i)
    want[KubeIPSet.clusterIP, default: []].insert(.ipPort(vip, .tcp, 80))
    want[KubeIPSet.ipvsIPs, default: []].insert(.ip(vip))
    let kind = i % 20
    if kind < 8 { want[KubeIPSet.nodePortTCP, default: []].insert(.port(30000 + i % 35000)) }
    if kind >= 5 && kind < 8 {
        let lb = ipv4(lbBase, i)
        want[KubeIPSet.loadBalancer, default: []].insert(.ipPort(lb, .tcp, 80))
        want[KubeIPSet.ipvsIPs, default: []].insert(.ip(lb))
    }
}
let entryCount = want.values.reduce(0) { $0 + $1.count }

func ms(_ d: Duration) -> Double {
    Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
}

/// CPU time of this process, user and system, in milliseconds.
func cpuMilliseconds() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t)
    return Double(t.tv_sec) * 1000 + Double(t.tv_nsec) / 1e6
}

let clock = ContinuousClock()
do {
    let client = try NetfilterIPSetClient.connect()
    let names = Set(defs.map(\.name))
    try await client.destroy(defs.map(\.name))

    let c0 = cpuMilliseconds()
    let t0 = clock.now
    let listed = try await client.list(names)
    let t1 = clock.now
    let c1 = cpuMilliseconds()
    try await client.create(defs.filter { d in !listed.contains { $0.name == d.name } })
    let t2 = clock.now
    let c2 = cpuMilliseconds()
    try await client.update(defs.compactMap { d in
        guard let e = want[d.name], !e.isEmpty else { return nil }
        return (d.name, e.sorted(), [])
    })
    let t3 = clock.now
    let c3 = cpuMilliseconds()
    let back = try await client.list(names)
    let t4 = clock.now
    let c4 = cpuMilliseconds()
    try await client.destroy(defs.map(\.name))
    let t5 = clock.now

    for d in defs where Set(back.first { $0.name == d.name }?.entries ?? []) != (want[d.name] ?? []) {
        fail("\(d.name) does not hold what was written")
    }
    print("""
        {"services": \(services), "entries": \(entryCount), "list_empty_ms": \(ms(t1 - t0)), \
        "create_ms": \(ms(t2 - t1)), "fill_ms": \(ms(t3 - t2)), "cold_sync_ms": \(ms(t3 - t0)), \
        "list_full_ms": \(ms(t4 - t3)), "destroy_ms": \(ms(t5 - t4)), \
        "create_cpu_ms": \(c2 - c1), "fill_cpu_ms": \(c3 - c2), "cold_sync_cpu_ms": \(c3 - c0), "list_full_cpu_ms": \(c4 - c3)}
        """)
} catch {
    fail("\(error)")
}
