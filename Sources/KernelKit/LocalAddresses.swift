// Sluice: a per-node Kubernetes service proxy.
// The addresses on this network namespace's interfaces (getifaddrs): the node IPs' default,
// the compilers' local addresses, `sluice explain`'s "from the node".

#if canImport(Glibc)
import Glibc
#endif
import SluiceCore

/// The addresses configured on this network namespace's interfaces.
public enum LocalAddresses {
    /// Reads them with getifaddrs.
    public static func current() -> [IPAddress] {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else { return [] }
        defer { freeifaddrs(head) }
        var out: [IPAddress] = []
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let ifa = cursor {
            defer { cursor = ifa.pointee.ifa_next }
            guard let sa = ifa.pointee.ifa_addr else { continue }
            var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            let len: socklen_t
            switch Int32(sa.pointee.sa_family) {
            case AF_INET: len = socklen_t(MemoryLayout<sockaddr_in>.size)
            case AF_INET6: len = socklen_t(MemoryLayout<sockaddr_in6>.size)
            default: continue
            }
            guard getnameinfo(sa, len, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST) == 0 else { continue }
            let text = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if let ip = IPAddress(String(text.split(separator: "%").first ?? "")) { out.append(ip) }
        }
        return Array(Set(out)).sorted()
    }
}
