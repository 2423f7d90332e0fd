// Sluice: a per-node Kubernetes service proxy.
// In-memory kernels for the IPVS backend's tests: an IPVS table, links and addresses, and
// ipsets, each answering like the kernel (errno included) and counting what it was asked.

import IPVS
import Netlink
import SluiceCore

/// An in-memory IPVS table.
public actor FakeIPVS: IPVSClient {
    /// Services and their destinations.
    public private(set) var table: [VirtualServerKey: (server: VirtualServer, destinations: [RealServerEndpoint: RealServer])] = [:]
    /// Every operation applied (successful or not), in order.
    public private(set) var log: [IPVSOperation] = []
    /// Flushes received.
    public private(set) var flushes = 0
    /// Operations that fail with this errno.
    private var failing: [IPVSOperation: Errno] = [:]
    public private(set) var timeoutsSet: IPVSTimeouts?
    /// Dumps of the whole service table (`services()`).
    public private(set) var serviceDumps = 0
    /// Reads of one service's destinations, by service.
    public private(set) var destinationReads: [VirtualServerKey: Int] = [:]

    /// Creates an empty table.
    public init() {}

    /// Makes `op` fail with `errno` from now on.
    public func fail(_ op: IPVSOperation, with errno: Errno) { failing[op] = errno }

    /// Sets a destination's connection counters, as traffic would.
    public func setConnections(_ key: VirtualServerKey, _ endpoint: RealServerEndpoint, active: UInt32, inactive: UInt32 = 0) {
        table[key]?.destinations[endpoint]?.activeConnections = active
        table[key]?.destinations[endpoint]?.inactiveConnections = inactive
    }

    /// Puts a service into the table directly (another program's, or a previous run's).
    public func preload(_ vs: VirtualServer, _ destinations: [RealServer] = []) {
        var vs = vs
        vs.flags.insert(.hashed)
        table[vs.key] = (vs, Dictionary(destinations.map { ($0.endpoint, $0) }, uniquingKeysWith: { a, _ in a }))
    }

    /// Forgets the operation log.
    public func clearLog() { log = [] }

    /// The table in `ipvsadm -Sn` form, sorted.
    public func save() -> String {
        var out = ""
        for key in table.keys.sorted() {
            guard let entry = table[key] else { continue }
            out += ipvsadmServiceLine(entry.server) + "\n"
            for rs in entry.destinations.values.sorted() { out += ipvsadmDestinationLine(key, rs) + "\n" }
        }
        return out
    }

    public func info() async throws -> IPVSInfo { IPVSInfo(version: 0x010201, connectionTableSize: 4096) }

    public func services() async throws -> [VirtualServer] {
        serviceDumps += 1
        return table.values.map(\.server)
    }

    public func destinations(of key: VirtualServerKey) async throws -> [RealServer] {
        destinationReads[key, default: 0] += 1
        guard let entry = table[key] else {
            throw NetlinkError(errno: .noSuchProcess, operation: "IPVS_CMD_GET_DEST \(key)")
        }
        return Array(entry.destinations.values)
    }

    public func apply(_ operations: [IPVSOperation]) async throws -> [IPVSOperationFailure] {
        var failures: [IPVSOperationFailure] = []
        for op in operations {
            log.append(op)
            if let e = failing[op] {
                failures.append(IPVSOperationFailure(operation: op, error: NetlinkError(errno: e, operation: "\(op)")))
                continue
            }
            if let e = perform(op) {
                failures.append(IPVSOperationFailure(operation: op, error: NetlinkError(errno: e, operation: "\(op)")))
            }
        }
        return failures
    }

    private func perform(_ op: IPVSOperation) -> Errno? {
        switch op {
        case .addService(var vs):
            guard table[vs.key] == nil else { return .fileExists }
            vs.flags.insert(.hashed)
            table[vs.key] = (vs, [:])
        case .updateService(var vs):
            guard let entry = table[vs.key] else { return .noSuchProcess }
            vs.flags.insert(.hashed)
            table[vs.key] = (vs, entry.destinations)
        case .deleteService(let key):
            guard table.removeValue(forKey: key) != nil else { return .noSuchProcess }
        case .addDestination(let key, let rs):
            guard let entry = table[key] else { return .noSuchProcess }
            guard entry.destinations[rs.endpoint] == nil else { return .fileExists }
            table[key]?.destinations[rs.endpoint] = rs
        case .updateDestination(let key, let rs):
            guard let old = table[key]?.destinations[rs.endpoint] else { return .noSuchFileOrDirectory }
            var new = old
            new.weight = rs.weight
            new.forwarding = rs.forwarding
            table[key]?.destinations[rs.endpoint] = new
        case .deleteDestination(let key, let rs):
            guard table[key]?.destinations.removeValue(forKey: rs.endpoint) != nil else { return .noSuchFileOrDirectory }
        }
        return nil
    }

    public func flush() async throws {
        flushes += 1
        table = [:]
    }

    public func setTimeouts(_ timeouts: IPVSTimeouts) async throws { timeoutsSet = timeouts }

    public func timeouts() async throws -> IPVSTimeouts { timeoutsSet ?? IPVSTimeouts(tcp: 900, tcpFin: 120, udp: 300) }
}

/// In-memory links and addresses.
public actor FakeLinks: LinkClient {
    /// Links by name: index and flags.
    public private(set) var links: [String: LinkInfo] = ["lo": LinkInfo(index: 1, name: "lo", flags: 0x9), "eth0": LinkInfo(index: 2, name: "eth0", flags: 0x1043)]
    /// Addresses by link index.
    public private(set) var addressesByIndex: [UInt32: Set<IPAddress>] = [:]
    /// Whether creating dummy links fails (a kernel without CONFIG_DUMMY).
    public var dummyUnsupported = false
    /// Address writes, in order ("+ip" / "-ip").
    public private(set) var log: [String] = []
    private var nextIndex: Int32 = 10

    /// Creates links `lo` (127.0.0.1) and `eth0` with `nodeAddresses`.
    public init(nodeAddresses: [IPAddress] = []) {
        addressesByIndex[1] = [IPAddress("127.0.0.1")!]
        addressesByIndex[2] = Set(nodeAddresses)
    }

    /// Makes dummy creation fail with EOPNOTSUPP.
    public func setDummyUnsupported(_ v: Bool) { dummyUnsupported = v }

    /// Addresses of the link called `name`, sorted.
    public func addresses(of name: String) -> [IPAddress] {
        guard let l = links[name] else { return [] }
        return (addressesByIndex[UInt32(bitPattern: l.index)] ?? []).sorted()
    }

    /// Adds an address outside the backend (another program).
    public func preloadAddress(_ ip: IPAddress, on name: String) {
        guard let l = links[name] else { return }
        addressesByIndex[UInt32(bitPattern: l.index), default: []].insert(ip)
    }

    /// Clears the write log.
    public func clearLog() { log = [] }

    public func link(named name: String) async throws -> LinkInfo? { links[name] }

    public func createDummy(named name: String) async throws -> LinkInfo {
        if dummyUnsupported { throw NetlinkError(errno: .notSupported, operation: "RTM_NEWLINK dummy \(name)") }
        if let l = links[name] { return l }
        nextIndex += 1
        let l = LinkInfo(index: nextIndex, name: name, flags: 0x82)
        links[name] = l
        return l
    }

    public func deleteLink(named name: String) async throws -> Bool {
        guard let l = links.removeValue(forKey: name) else { return false }
        addressesByIndex[UInt32(bitPattern: l.index)] = nil
        return true
    }

    /// Dumps of every address (`addresses()`).
    public private(set) var addressDumps = 0

    public func addresses() async throws -> [InterfaceAddress] {
        addressDumps += 1
        return addressesByIndex.flatMap { index, ips in
            ips.map { InterfaceAddress(index: index, address: $0, prefixLength: $0.family == .ipv4 ? 32 : 128) }
        }
    }

    public func addAddresses(_ ips: [IPAddress], index: UInt32) async throws -> [(IPAddress, NetlinkError)] {
        for ip in ips {
            addressesByIndex[index, default: []].insert(ip)
            log.append("+\(ip)")
        }
        return []
    }

    public func deleteAddresses(_ ips: [IPAddress], index: UInt32) async throws -> [(IPAddress, NetlinkError)] {
        for ip in ips {
            addressesByIndex[index]?.remove(ip)
            log.append("-\(ip)")
        }
        return []
    }
}

/// In-memory ipsets.
public actor FakeIPSets: IPSetClient {
    /// Sets by name: definition and members.
    public private(set) var sets: [String: (definition: IPSetDefinition, entries: Set<IPSetEntry>)] = [:]
    /// Entry writes, in order ("+SET entry" / "-SET entry").
    public private(set) var log: [String] = []
    public private(set) var creates = 0

    /// Creates no sets.
    public init() {}

    /// Members of one set, as text, sorted.
    public func members(_ name: String) -> [String] { (sets[name]?.entries ?? []).sorted().map(\.description) }

    /// Clears the write log.
    public func clearLog() { log = [] }

    /// Listings of sets with their members (`list(_:)`).
    public private(set) var listings = 0

    public func list(_ names: Set<String>) async throws -> [IPSetInfo] {
        listings += 1
        return sets.filter { names.contains($0.key) }.map {
            IPSetInfo(name: $0.key, typeName: $0.value.definition.type.rawValue, revision: 1, family: 2, entries: Array($0.value.entries))
        }
    }

    public func create(_ defs: [IPSetDefinition]) async throws {
        for d in defs where sets[d.name] == nil {
            sets[d.name] = (d, [])
            creates += 1
        }
    }

    public func update(_ changes: [(set: String, add: [IPSetEntry], delete: [IPSetEntry])]) async throws {
        for c in changes {
            guard sets[c.set] != nil else { throw NetlinkError(errno: .noSuchFileOrDirectory, operation: "IPSET_CMD_ADD \(c.set)") }
            for e in c.delete {
                sets[c.set]?.entries.remove(e)
                log.append("-\(c.set) \(e)")
            }
            for e in c.add {
                sets[c.set]?.entries.insert(e)
                log.append("+\(c.set) \(e)")
            }
        }
    }

    public func destroy(_ names: [String]) async throws {
        for n in names { sets[n] = nil }
    }
}
