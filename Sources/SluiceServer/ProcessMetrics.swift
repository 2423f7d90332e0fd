// Sluice: a per-node Kubernetes service proxy.
// The `process_*` metrics every Go program's /metrics carries (client_golang's process
// collector), read from /proc/self at each scrape, so dashboards built for kube-proxy work.

#if canImport(Glibc)
import Glibc
#endif
import Prometheus
import Synchronization

/// `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
/// `process_start_time_seconds`, `process_open_fds` and `process_max_fds`.
final class ProcessMetrics: Sendable {
    private let cpu: Counter
    private let resident: Gauge
    private let virtual: Gauge
    private let startTime: Gauge
    private let openFDs: Gauge
    private let maxFDs: Gauge
    /// CPU seconds already added to the counter.
    private let cpuSeen = Mutex<Double>(0)

    /// Metric names.
    enum Name {
        static let cpu = "process_cpu_seconds_total"
        static let resident = "process_resident_memory_bytes"
        static let virtual = "process_virtual_memory_bytes"
        static let startTime = "process_start_time_seconds"
        static let openFDs = "process_open_fds"
        static let maxFDs = "process_max_fds"
    }

    init(registry: PrometheusCollectorRegistry) {
        func d(_ name: String, _ help: String) -> MetricNameDescriptor {
            MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
        }
        cpu = registry.makeCounter(descriptor: d(Name.cpu, "Total user and system CPU time spent in seconds."))
        resident = registry.makeGauge(descriptor: d(Name.resident, "Resident memory size in bytes."))
        virtual = registry.makeGauge(descriptor: d(Name.virtual, "Virtual memory size in bytes."))
        startTime = registry.makeGauge(descriptor: d(Name.startTime, "Start time of the process since unix epoch in seconds."))
        openFDs = registry.makeGauge(descriptor: d(Name.openFDs, "Number of open file descriptors."))
        maxFDs = registry.makeGauge(descriptor: d(Name.maxFDs, "Maximum number of open file descriptors."))
        refresh()
    }

    /// Reads /proc/self and updates the values (a failed read leaves the previous ones).
    func refresh() {
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        if let stat = ProcessMetrics.statFields(), stat.count > 21, ticks > 0 {
            // Fields after the command name: index 0 is field 3 (state) of proc(5).
            let utime = Double(stat[11]) ?? 0, stime = Double(stat[12]) ?? 0
            let total = (utime + stime) / ticks
            let delta = cpuSeen.withLock { seen -> Double in
                let d = total - seen
                if d > 0 { seen = total }
                return d
            }
            if delta > 0 { cpu.increment(by: delta) }
            virtual.set(to: Double(stat[20]) ?? 0)
            resident.set(to: (Double(stat[21]) ?? 0) * Double(sysconf(Int32(_SC_PAGESIZE))))
            if let boot = ProcessMetrics.bootTime(), let start = Double(stat[19]) {
                startTime.set(to: boot + start / ticks)
            }
        }
        if let dir = opendir("/proc/self/fd") {
            var n = 0
            // Only the name is read, through a pointer: a record readdir returns is as long as
            // its name, not `MemoryLayout<dirent>.size`, so copying `e.pointee` read past the
            // end of the last record and crashed once that ended at an unmapped page (20 000
            // Services in the userspace mode: tens of thousands of descriptors).
            let nameOffset = MemoryLayout<dirent>.offset(of: \dirent.d_name)!
            while let e = readdir(dir) {
                let name = (UnsafeRawPointer(e) + nameOffset).assumingMemoryBound(to: UInt8.self)
                let dotOrDotDot = name[0] == UInt8(ascii: ".") && (name[1] == 0 || (name[1] == UInt8(ascii: ".") && name[2] == 0))
                if !dotOrDotDot { n += 1 }
            }
            closedir(dir)
            openFDs.set(to: Double(max(0, n - 1)))  // less the directory being read
        }
        var limit = rlimit()
        if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 { maxFDs.set(to: Double(limit.rlim_cur)) }
    }

    /// The fields of /proc/self/stat after the parenthesised command name.
    static func statFields() -> [Substring]? {
        guard let text = readSmallFile("/proc/self/stat"), let close = text.lastIndex(of: ")") else { return nil }
        return text[text.index(after: close)...].split(separator: " ")
    }

    /// `btime` of /proc/stat: the boot time in seconds since the epoch.
    static func bootTime() -> Double? {
        guard let text = readSmallFile("/proc/stat") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") {
            return Double(line.dropFirst(6).trimmingCharacters())
        }
        return nil
    }

    private static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 8192)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            out += buffer[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}

private extension Substring {
    func trimmingCharacters() -> Substring {
        var s = self
        while let f = s.first, f == " " || f == "\n" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\n" { s = s.dropLast() }
        return s
    }
}
